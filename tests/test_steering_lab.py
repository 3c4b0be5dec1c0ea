"""bench/steering_lab.py: the headline arithmetic against numbers worked by hand, and the whole lab in its smoke
mode (every stage through the project's scripts, the report, the stage cache, --redo, --test_file; ~1 minute on
one thread, which conftest's session fixture sets)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from common import UsageError, parse_config
from conftest import ROOT, SHARED, SHARED_DATA

sys.path.insert(0, str(ROOT / "bench"))
import steering_lab  # noqa: E402

requires_lab_data = pytest.mark.skipif(
    not ((SHARED_DATA / "mred_val_longest.jsonl").is_file() and (SHARED / "data/imdb/imdb_partial.jsonl.gz").is_file()),
    reason="the lab needs ../shared/data (MReD and IMDB) beside the repo",
)


def lab_args(*argv: str) -> steering_lab.LabArguments:
    (args,) = parse_config([steering_lab.LabArguments], list(argv))
    return args


def test_help_exits_zero():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "steering_lab.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--redo" in res.stdout and "--test_file" in res.stdout


def test_unknown_stage_is_refused():
    with pytest.raises(UsageError, match="--redo pretrain: unknown stage"):
        lab_args("--redo", "pretrain")


def test_headline_matches_hand_computation():
    """Two papers of 10 tokens each. NLL per token: L 3.0, L_tuned 2.0, steered 2.5 -> half the gap closed;
    ROUGE-L: L 10, L_tuned 30, steered 25 -> 75%."""
    def system(nll_per_token: float, rouge: float) -> dict:
        return {"nll": np.array([nll_per_token * 10] * 2), "tokens": np.array([10.0, 10.0]),
                "rouge1": np.full(2, rouge), "rouge2": np.full(2, rouge), "rougeL": np.full(2, rouge),
                "new_tokens": np.array([5.0, 7.0]), "words": np.array([4.0, 6.0]), "eos": np.array([1.0, 0.0]),
                "repetition": np.array([0.0, 0.5])}

    per_system = {"S": system(3.5, 5), "S_tuned": system(2.8, 20), "L": system(3.0, 10), "L_tuned": system(2.0, 30),
                  "steered L, alpha=1": system(2.5, 25), "steered L, tuned blend": system(3.2, 15)}
    out = steering_lab.analyse(per_system, samples=50, seed=0)
    h = out["headline"]["steered L, alpha=1"]
    assert h["gap_closed_nll"]["mean"] == pytest.approx(0.5)
    assert h["gap_closed_rougeL"]["mean"] == pytest.approx(0.75)
    assert h["nll_gain_vs_S_tuned"]["mean"] == pytest.approx(0.3)
    assert h["beats_all_nll"] and h["beats_all_rougeL"]
    worse = out["headline"]["steered L, tuned blend"]
    assert worse["gap_closed_nll"]["mean"] == pytest.approx(-0.2)
    assert not worse["beats_all_nll"] and not worse["beats_all_rougeL"]
    assert out["systems"]["L"]["perplexity"]["mean"] == pytest.approx(math.exp(3.0))
    assert out["systems"]["S"]["eos"]["mean"] == pytest.approx(0.5)


@requires_lab_data
def test_smoke_lab_end_to_end_cached_redo_and_test_file(tmp_path):
    work = tmp_path / "lab"
    args = lab_args("--smoke", "--work_dir", str(work))
    summary = steering_lab.main(args)

    results = work / "RESULTS.md"
    assert results.read_text().count("## Steering lab (smoke, MReD test split)") == 1
    assert (work / "eval" / "test" / "steering_lab.png").stat().st_size > 0
    analysis = summary["analysis"]
    assert list(analysis["systems"]) == [label for label, _, _ in steering_lab.SYSTEMS]
    assert analysis["n_papers"] == steering_lab.PROFILES["smoke"].test_examples
    for name, s in analysis["systems"].items():
        for metric in ("nll", "perplexity", "rouge1", "rouge2", "rougeL", "new_tokens", "eos", "repetition"):
            assert math.isfinite(s[metric]["mean"]), (name, metric)
    rouge_tie = analysis["systems"]["L"]["rougeL"]["mean"] == analysis["systems"]["L_tuned"]["rougeL"]["mean"]
    for h in analysis["headline"].values():
        assert math.isfinite(h["gap_closed_nll"]["mean"])
        assert math.isfinite(h["gap_closed_rougeL"]["mean"]) or rouge_tie  # 0 / 0 only when L and L_tuned tie
    # The alpha curve (steer.score_targets on evaluation.py's prompts) reproduces evaluation.py's steered NLL.
    assert summary["alpha_curve_nll_at_1"] == pytest.approx(analysis["systems"]["steered L, alpha=1"]["nll"]["mean"],
                                                            abs=1e-4)
    assert summary["models"]["L"]["non_embedding"] >= 4 * summary["models"]["S"]["non_embedding"]
    commands = (work / "commands.sh").read_text()
    for script in ("processing_meta_review.py", "fine_tune.py", "steer.py", "evaluation.py"):
        assert f"python {script} " in commands

    # Everything cached: only the report is rebuilt, with the same numbers.
    again = steering_lab.main(args)
    assert all(t["cached"] for t in again["stages"].values())
    assert json.dumps(again["analysis"], sort_keys=True) == json.dumps(analysis, sort_keys=True)  # NaN-safe
    assert results.read_text().count("## Steering lab (smoke, MReD test split)") == 2

    # --redo reruns that stage and the later ones only.
    redone = steering_lab.main(lab_args("--smoke", "--work_dir", str(work), "--redo", "alpha_curve"))
    assert [n for n, t in redone["stages"].items() if not t["cached"]] == ["alpha_curve"]

    # Other papers: the finished models are evaluated on a raw Input/Output file, nothing is retrained.
    rows = [json.loads(line) for line in (SHARED_DATA / "mred_val_longest.jsonl").read_text().splitlines()[:5]]
    other = tmp_path / "other_papers.jsonl"
    other.write_text("".join(json.dumps({"Input": r["Input"], "Output": r["Output"]}) + "\n" for r in rows))
    checked = steering_lab.main(lab_args("--smoke", "--work_dir", str(work), "--test_file", str(other),
                                         "--num_test_examples", "4"))
    assert [n for n, t in checked["stages"].items() if not t["cached"]] == ["evaluate", "alpha_curve"]
    assert checked["analysis"]["n_papers"] == 4
    assert "--test_file" in results.read_text()

    # A cached stage made with other settings is refused rather than silently reused.
    with pytest.raises(UsageError, match="other settings"):
        steering_lab.main(lab_args("--smoke", "--work_dir", str(work), "--seed", "7"))
