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
from conftest import ROOT, SHARED, SHARED_DATA

from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError

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


def hand_system(nll_per_token: float, rouge: float) -> dict:
    """Two papers of 10 tokens each, the same scores on both (so every bootstrap resample gives the same value)."""
    return {"nll": np.array([nll_per_token * 10] * 2), "tokens": np.array([10.0, 10.0]),
            "rouge1": np.full(2, rouge), "rouge2": np.full(2, rouge), "rougeL": np.full(2, rouge),
            "new_tokens": np.array([5.0, 7.0]), "words": np.array([4.0, 6.0]), "eos": np.array([1.0, 0.0]),
            "repetition": np.array([0.0, 0.5])}


def test_headline_matches_hand_computation():
    """NLL per token: L 3.0, L_tuned 2.0, steered 2.5 -> half the L gap closed; S_tuned 2.8 -> gain over the expert
    (2.8 - 2.5) / (2.8 - 2.0) = 0.375. ROUGE-L: L 10, L_tuned 30, steered 25 -> 75% closed; S_tuned 20 -> gain
    (20 - 25) / (20 - 30) = 0.5. The tuned blend (3.2, 15) is worse than S_tuned: gains -0.5 and -0.5."""
    per_system = {"S": hand_system(3.5, 5), "S_tuned": hand_system(2.8, 20), "L": hand_system(3.0, 10),
                  "L_tuned": hand_system(2.0, 30), "steered L, alpha=1": hand_system(2.5, 25),
                  "steered L, tuned blend": hand_system(3.2, 15)}
    out = steering_lab.analyse(per_system, samples=50, seed=0)
    h = out["headline"]["steered L, alpha=1"]
    assert h["gap_closed_nll"]["mean"] == pytest.approx(0.5)
    assert h["gap_closed_rougeL"]["mean"] == pytest.approx(0.75)
    assert h["gain_over_expert_nll"]["mean"] == pytest.approx(0.375)
    assert h["gain_over_expert_rougeL"]["mean"] == pytest.approx(0.5)
    assert h["expert_gap_nll"]["mean"] == pytest.approx(0.8) and h["expert_gap_rougeL"]["mean"] == pytest.approx(10)
    assert h["nll_gain_vs_S_tuned"]["mean"] == pytest.approx(0.3)
    assert h["beats_all_nll"] and h["beats_all_rougeL"] and h["beats_expert_nll"] and h["beats_expert_rougeL"]
    worse = out["headline"]["steered L, tuned blend"]
    assert worse["gap_closed_nll"]["mean"] == pytest.approx(-0.2)
    assert worse["gain_over_expert_nll"]["mean"] == pytest.approx(-0.5)
    assert worse["gain_over_expert_rougeL"]["mean"] == pytest.approx(-0.5)
    assert not worse["beats_all_nll"] and not worse["beats_all_rougeL"]
    assert not worse["beats_expert_nll"] and not worse["beats_expert_rougeL"]
    assert out["systems"]["L"]["perplexity"]["mean"] == pytest.approx(math.exp(3.0))
    assert out["systems"]["S"]["eos"]["mean"] == pytest.approx(0.5)

    lines = "\n".join(steering_lab.headline_lines({d: out for d in steering_lab.DECODINGS}))
    assert lines.count("**does not beat S_tuned on NLL** (it is worse)") == len(steering_lab.DECODINGS)
    assert "gain over expert (NLL) 37% [37, 37] (target >= 50%: missed by 1" in lines  # 37.5%, shown rounded
    assert "gain over expert (ROUGE-L) 50% [50, 50] (target >= 50%: met)" in lines
    assert "gap closed (NLL) 50% [50, 50] (target >= 90%: missed by 40 points)" in lines


def test_gain_over_expert_is_undefined_when_l_tuned_does_not_beat_s_tuned():
    """A share of a gap that is 0 or reversed means nothing: L_tuned worse than S_tuned on NLL (2.9 vs 2.8) and tied
    on ROUGE-L leaves the gain over the expert undefined (NaN), said so in words, while the plain differences from
    S_tuned still decide whether steering beats it."""
    per_system = {"S": hand_system(3.5, 5), "S_tuned": hand_system(2.8, 20), "L": hand_system(3.0, 10),
                  "L_tuned": hand_system(2.9, 20), "steered L, alpha=1": hand_system(2.7, 22),
                  "steered L, tuned blend": hand_system(2.8, 19)}
    out = steering_lab.analyse(per_system, samples=50, seed=0)
    h = out["headline"]["steered L, alpha=1"]
    assert math.isnan(h["gain_over_expert_nll"]["mean"]) and math.isnan(h["gain_over_expert_rougeL"]["mean"])
    assert h["expert_gap_nll"]["mean"] == pytest.approx(-0.1)
    assert h["beats_expert_nll"] and h["beats_expert_rougeL"]  # better than S_tuned all the same
    assert h["gap_closed_nll"]["mean"] == pytest.approx(3.0)  # (3.0 - 2.7) / (3.0 - 2.9): defined, L_tuned beats L
    tied = out["headline"]["steered L, tuned blend"]
    assert not tied["beats_expert_nll"] and not tied["beats_expert_rougeL"]  # a tie is not a win
    line = steering_lab.verdict_lines(out)[0]
    assert line.count("undefined: L_tuned is no better than S_tuned") == 2  # on NLL and on ROUGE-L
    tied_line = steering_lab.verdict_lines(out)[1]
    assert "**does not beat S_tuned on NLL** (0.000" in tied_line  # a tie: not beaten, and not 'it is worse'
    assert "**does not beat S_tuned on ROUGE-L** (it is worse) (-1.0" in tied_line


def test_gain_over_expert_interval_is_a_paired_bootstrap():
    """Against a reference computed by hand from the same resamples: per resample, the corpus NLL per token of each
    system on the same papers, then the share; the interval is its 2.5th and 97.5th percentiles."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(5, 40, size=30).astype(float)
    per_system = {}
    for name, level in (("S", 3.6), ("S_tuned", 2.9), ("L", 3.2), ("L_tuned", 2.3), ("steered L, alpha=1", 2.6),
                        ("steered L, tuned blend", 2.7)):
        s = hand_system(level, 10.0)
        per_paper = level + rng.normal(0, 0.3, size=30)
        s.update(nll=per_paper * tokens, tokens=tokens, rougeL=rng.uniform(5, 30, size=30))
        for key in ("rouge1", "rouge2", "new_tokens", "words", "eos", "repetition"):
            s[key] = np.zeros(30)
        per_system[name] = s
    out = steering_lab.analyse(per_system, samples=400, seed=3)
    idx = np.random.default_rng(3).integers(0, 30, size=(400, 30))
    corpus = {n: s["nll"][idx].sum(1) / s["tokens"][idx].sum(1) for n, s in per_system.items()}
    ratio = (corpus["S_tuned"] - corpus["steered L, alpha=1"]) / (corpus["S_tuned"] - corpus["L_tuned"])
    ratio = np.where(corpus["S_tuned"] - corpus["L_tuned"] > 0, ratio, np.nan)
    got = out["headline"]["steered L, alpha=1"]["gain_over_expert_nll"]
    assert got["ci_low"] == pytest.approx(np.nanpercentile(ratio, 2.5))
    assert got["ci_high"] == pytest.approx(np.nanpercentile(ratio, 97.5))
    point = {n: s["nll"].sum() / s["tokens"].sum() for n, s in per_system.items()}
    assert got["mean"] == pytest.approx((point["S_tuned"] - point["steered L, alpha=1"])
                                        / (point["S_tuned"] - point["L_tuned"]))


def test_default_checks_compare_decodings_and_the_tuned_blend_paired():
    """Steered alpha = 1 scores 25 with the 3-gram ban and 20 greedy: +5, the ban better; the tuned blend ties alpha = 1
    under the ban on one paper and trails by 4 on the other: -2, an interval that spans 0 (no clear difference)."""
    fair = {name: hand_system(3.0, 10) for name in ("S", "S_tuned", "L", "L_tuned")}
    greedy = {name: hand_system(3.0, 10) for name in fair}
    fair["steered L, alpha=1"], greedy["steered L, alpha=1"] = hand_system(2.5, 25), hand_system(2.5, 20)
    fair["steered L, tuned blend"] = {**hand_system(2.5, 0), "rougeL": np.array([25.0, 21.0])}
    greedy["steered L, tuned blend"] = hand_system(2.5, 20)
    checks = steering_lab.default_checks({"no_repeat_3": fair, "greedy": greedy}, samples=200, seed=0)
    ban = checks["steered L, alpha=1: greedy, no_repeat_ngram_size 3 - greedy"]
    assert (ban["mean"], ban["ci_low"], ban["ci_high"]) == (5.0, 5.0, 5.0)
    tuned = checks["steered L, tuned blend - steered L, alpha=1, greedy, no_repeat_ngram_size 3"]
    assert tuned["mean"] == pytest.approx(-2.0) and tuned["ci_low"] == pytest.approx(-4.0) and tuned["ci_high"] == 0
    lines = steering_lab.check_lines(checks)
    assert lines[2] == ("- steered L, alpha=1: greedy, no_repeat_ngram_size 3 - greedy: +5.0 [+5.0, +5.0]: the first "
                        "is better.")
    assert lines[-1].endswith("[-4.0, +0.0]: no clear difference.")


def test_share_is_nan_where_the_gap_is_not_positive():
    got = steering_lab.share(np.array([1.0, 1.0, 1.0, -1.0]), np.array([2.0, 0.0, -1.0, 4.0]))
    assert got[0] == 0.5 and got[3] == -0.25 and np.isnan(got[1]) and np.isnan(got[2])


@requires_lab_data
def test_smoke_lab_end_to_end_cached_redo_and_test_file(tmp_path):
    work = tmp_path / "lab"
    args = lab_args("--smoke", "--work_dir", str(work))
    summary = steering_lab.main(args)

    results = work / "RESULTS.md"
    assert results.read_text().count("## Steering lab (smoke, MReD test split)") == 1
    assert (work / "eval" / "test" / "steering_lab.png").stat().st_size > 0
    # Every system under both decodings, the fair one (no_repeat_ngram_size 3) the headline.
    analyses = summary["analyses"]
    assert list(analyses) == list(steering_lab.DECODINGS) and summary["headline_decoding"] == "no_repeat_3"
    for decoding, analysis in analyses.items():
        assert list(analysis["systems"]) == [label for label, _, _ in steering_lab.SYSTEMS]
        assert analysis["n_papers"] == steering_lab.PROFILES["smoke"].test_examples
        for name, s in analysis["systems"].items():
            for metric in ("nll", "perplexity", "rouge1", "rouge2", "rougeL", "new_tokens", "eos", "repetition"):
                assert math.isfinite(s[metric]["mean"]), (decoding, name, metric)
        systems = analysis["systems"]
        for h in analysis["headline"].values():
            for m in ("nll", "rougeL"):  # a share is defined exactly when its gap is positive
                sign = -1 if m == "nll" else 1
                l_gap = sign * (systems["L_tuned"][m]["mean"] - systems["L"][m]["mean"])
                expert_gap = sign * (systems["L_tuned"][m]["mean"] - systems["S_tuned"][m]["mean"])
                assert math.isfinite(h[f"gap_closed_{m}"]["mean"]) == (l_gap > 0), (decoding, m)
                assert math.isfinite(h[f"gain_over_expert_{m}"]["mean"]) == (expert_gap > 0), (decoding, m)
    analysis = analyses["no_repeat_3"]
    # NLL is teacher-forced: the same whatever the decoding; the generations differ.
    assert analysis["systems"]["S_tuned"]["nll"] == analyses["greedy"]["systems"]["S_tuned"]["nll"]
    for run in steering_lab.EVAL_RUNS:
        rows = [(work / "eval" / "test" / d / run / "predictions.jsonl").read_text() for d in steering_lab.DECODINGS]
        assert all(rows)
    text = results.read_text()
    assert "ROUGE-L [95% CI], greedy, no_repeat_ngram_size 3" in text and "ROUGE-L [95% CI], greedy |" in text
    assert "**Headline: what steering adds**" in text and "Gain over the expert" in text
    assert "**L against S on general text**" in text and "pythia-410m 10.83 (loss 2.38" in text
    assert "**The tuner and the default decoding, checked on the test papers**" in text and len(summary["checks"]) == 3
    # The alpha curve (score_targets on evaluation.py's prompts) reproduces evaluation.py's steered NLL.
    assert summary["alpha_curve_nll_at_1"] == pytest.approx(analysis["systems"]["steered L, alpha=1"]["nll"]["mean"],
                                                            abs=1e-4)
    assert summary["models"]["L"]["non_embedding"] >= 4 * summary["models"]["S"]["non_embedding"]
    commands = (work / "commands.sh").read_text()
    for script in ("processing_meta_review.py", "fine_tune.py", "steer.py", "evaluation.py"):
        assert f"python {script} " in commands
    tune = next(line for line in commands.splitlines() if line.startswith("python steer.py"))
    assert "--tune" in tune and "--no_repeat_ngram_size 3" in tune  # the tuner chooses under the fair decoding
    evaluations = [line for line in commands.splitlines() if line.startswith("python evaluation.py")]
    assert len(evaluations) == 2 * len(steering_lab.EVAL_RUNS)
    assert sum("--no_repeat_ngram_size 3" in line for line in evaluations) == len(steering_lab.EVAL_RUNS)

    # Everything cached: only the report is rebuilt, with the same numbers.
    again = steering_lab.main(args)
    assert all(t["cached"] for t in again["stages"].values())
    assert json.dumps(again["analyses"], sort_keys=True) == json.dumps(analyses, sort_keys=True)  # NaN-safe
    assert results.read_text().count("## Steering lab (smoke, MReD test split)") == 1  # a re-run replaces its record

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
    assert all(a["n_papers"] == 4 for a in checked["analyses"].values())
    assert "--test_file" in results.read_text()

    # A cached stage made with other settings is refused rather than silently reused.
    with pytest.raises(UsageError, match="other settings"):
        steering_lab.main(lab_args("--smoke", "--work_dir", str(work), "--seed", "7"))


def test_preset_and_source_flags_are_checked():
    with pytest.raises(UsageError, match="--large 1.4b needs --preset pythia"):
        lab_args("--large", "1.4b")
    with pytest.raises(UsageError, match="--preset gpt2: unknown"):
        lab_args("--preset", "gpt2")
    with pytest.raises(UsageError, match="--large 7b: choose from"):
        lab_args("--preset", "pythia", "--large", "7b")
    with pytest.raises(UsageError, match="--tokenizer does not apply with --preset pythia"):
        lab_args("--preset", "pythia", "--tokenizer", str(ROOT))
    with pytest.raises(UsageError, match="--corpus missing.jsonl: no such file"):
        lab_args("--corpus", "missing.jsonl")


def test_sources_fall_back_to_the_hub_without_shared(tmp_path):
    absent = tmp_path / "shared" / "imdb.jsonl.gz"
    assert steering_lab.resolve_source(None, absent, "stanfordnlp/imdb") == "stanfordnlp/imdb"
    assert steering_lab.resolve_source("user/data", absent, "stanfordnlp/imdb") == "user/data"
    local = tmp_path / "corpus.jsonl"
    local.write_text('{"text": "a"}\n')
    assert steering_lab.resolve_source(str(local), absent, "stanfordnlp/imdb") == str(local.resolve())


def test_preset_arguments_for_a_large_l(tmp_path):
    """--large 1.4b: L's batch of 8 in two micro-batches, a tenth of its pretraining learning rate; S unchanged."""
    lab = steering_lab.resolve_lab(lab_args("--preset", "pythia", "--large", "1.4b", "--device", "cpu",
                                            "--work_dir", str(tmp_path)))
    assert (lab.model("small"), lab.model("large")) == ("EleutherAI/pythia-70m", "EleutherAI/pythia-1.4b")
    assert lab.tokenizer_dir == "EleutherAI/pythia-70m" and lab.uses_hub
    large = steering_lab.finetune_arguments(lab, "large")
    flag = lambda argv, name: argv[argv.index(name) + 1]  # noqa: E731
    assert (flag(large, "--per_device_train_batch_size"), flag(large, "--gradient_accumulation_steps")) == ("4", "2")
    assert flag(large, "--learning_rate") == "2e-05" and flag(large, "--max_length") == "2048"
    small = steering_lab.finetune_arguments(lab, "small")
    assert flag(small, "--per_device_train_batch_size") == "8" and "--gradient_accumulation_steps" not in small
    assert flag(small, "--model_name_or_path") == "EleutherAI/pythia-70m"
    assert flag(steering_lab.evaluation_arguments(lab, "main"), "--large_model") == "EleutherAI/pythia-1.4b"
    assert lab.figure.name == "steering_lab_pythia-1.4b.png"


@requires_lab_data
def test_default_lab_keeps_its_stage_keys():
    """With ../shared present and no new flag, the stages' settings (their cache keys) are the shared sources' and
    the full profile's, with no key for --corpus/--task_data/--preset, so a cached lab is reused, not retrained."""
    lab = steering_lab.resolve_lab(lab_args("--threads", "1", "--redo", "tune"))
    assert (lab.corpus, lab.task_data, lab.device) == (str(steering_lab.IMDB), str(steering_lab.MRED), "cpu")
    assert steering_lab.corpus_settings(lab) == {"rows": steering_lab.PROFILES["full"].corpus_rows, "seed": 42}
    assert not lab.uses_hub
    assert steering_lab.processing_arguments(lab)[:2] == ["--dataset_name", str(steering_lab.MRED)]
    for size in ("small", "large"):
        argv = steering_lab.finetune_arguments(lab, size)
        assert not {"--bf16", "--max_eval_samples", "--gradient_accumulation_steps", "--use_cpu"} & set(argv)
    assert "--large_device" not in steering_lab.tune_arguments(lab)
    argv = steering_lab.evaluation_arguments(lab, "main")
    assert argv[argv.index("--device") + 1] == "cpu"


def run_lab_offline(hf_home, argv: list[str], cwd) -> subprocess.CompletedProcess:
    from hub_cache import offline_env

    env = offline_env(hf_home)
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def lab_hub(tmp_path_factory):
    """A simulated warm Hub cache: tiny models as EleutherAI/pythia-70m and -410m, zqz979/meta-review (48/6/6
    papers) and stanfordnlp/imdb."""
    from conftest import make_rows, train_tiny_tokenizer
    from hub_cache import build_hub_cache

    root = tmp_path_factory.mktemp("lab_hub")
    imdb = {"train": [{"text": f"A fine film, number {i}. The acting was good.", "label": 1} for i in range(30)],
            "test": [{"text": f"A dull film, number {i}. The plot was thin.", "label": 0} for i in range(10)]}
    build_hub_cache(root / "hf", train_tiny_tokenizer(root / "tok"),
                    datasets={"zqz979/meta-review": make_rows(60), "stanfordnlp/imdb": imdb})
    return root / "hf"


def test_hub_sources_for_the_from_scratch_lab(lab_hub, tmp_path):
    """--corpus/--task_data as Hub ids (what the lab takes without ../shared): the IMDB sample, the BPE trained on
    it and the train split, and the processed data with the source's own splits."""
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT / 'bench')!r})
import steering_lab
from proxytune.foundation.config import parse_config
(args,) = parse_config([steering_lab.LabArguments], ["--smoke", "--corpus", "stanfordnlp/imdb", "--task_data",
                       "zqz979/meta-review", "--work_dir", {str(tmp_path / 'work')!r}])
lab = steering_lab.resolve_lab(args)
assert lab.uses_hub
steering_lab.sample_corpus(lab)
steering_lab.train_tokenizer(lab)
train = steering_lab.train_split_texts(lab)
steering_lab.run_script(lab, "processing_meta_review", [*steering_lab.processing_arguments(lab), "--output_dir",
                        str(lab.path("data"))])
print("LAB" + json.dumps({{"corpus": lab.path("corpus", "imdb_sample.jsonl").read_text().count("\\n"),
                          "train_texts": len(train), "settings": steering_lab.corpus_settings(lab)}}))
"""
    res = run_lab_offline(lab_hub, ["-c", script], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("LAB", 1)[1])
    assert out["corpus"] == 40  # fewer texts than the smoke profile's 200: all of them, both splits
    assert out["train_texts"] == 2 * 48  # reviews + meta-review of each train paper, and no other split's
    assert out["settings"] == {"rows": 200, "seed": 42, "source": "stanfordnlp/imdb"}
    stats = json.loads((tmp_path / "work" / "data" / "stats.json").read_text())
    assert stats["source"] == "zqz979/meta-review" and stats["rows_kept"] == {"train": 48, "validation": 6, "test": 6}
    assert (tmp_path / "work" / "tokenizer" / "tokenizer.json").is_file()


def test_pythia_preset_smoke_on_the_simulated_hub(lab_hub, tmp_path):
    """--preset pythia --smoke end to end through the real Hub code paths (offline, from the simulated cache): no
    corpus, BPE or pretraining; S and L load by their Hub ids, both are fine-tuned, the blend is tuned and every
    system is evaluated; the report names the models."""
    work = tmp_path / "work"
    res = run_lab_offline(lab_hub, [str(ROOT / "bench" / "steering_lab.py"), "--preset", "pythia", "--smoke",
                                    "--task_data", "zqz979/meta-review", "--threads", "1", "--work_dir", str(work)],
                          cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    stages = json.loads((work / "stages.json").read_text())
    assert list(stages) == ["data", "finetune_small", "finetune_large", "tune", "evaluate:test", "alpha_curve:test"]
    commands = (work / "commands.sh").read_text()
    assert "--config_name" not in commands and "--tokenizer_name EleutherAI/pythia-70m" in commands
    assert "fine_tune.py --model_name_or_path EleutherAI/pythia-70m" in commands
    assert "fine_tune.py --model_name_or_path EleutherAI/pythia-410m" in commands
    assert "--large_model EleutherAI/pythia-410m" in commands and "--max_eval_samples 16" in commands
    report = json.loads((work / "eval" / "test" / "lab_report.json").read_text())
    assert report["models"]["S"]["pretrained"] == "EleutherAI/pythia-70m"
    assert report["models"]["L"]["pretrained"] == "EleutherAI/pythia-410m"
    assert report["models"]["L"]["non_embedding"] > report["models"]["S"]["non_embedding"]
    assert report["models"]["S_tuned"]["steps"] > 0 and report["models"]["L_tuned"]["steps"] > 0
    analysis = report["analyses"][report["headline_decoding"]]
    assert list(analysis["systems"]) == [label for label, _, _ in steering_lab.SYSTEMS] and analysis["n_papers"] == 6
    assert report["alpha_curve_nll_at_1"] == pytest.approx(analysis["systems"]["steered L, alpha=1"]["nll"]["mean"],
                                                           abs=1e-4)
    results = (work / "RESULTS.md").read_text()
    assert "## Steering lab (pythia-70m + pythia-410m, smoke, zqz979/meta-review test split)" in results
    assert "pretrained (Pythia, 300B Pile tokens)" in results


def test_lab_sizing_counts_parameters_as_the_formula_and_runs():
    """bench/lab_sizing.py: a GPT-NeoX layer has 12 d^2 + 13 d non-embedding parameters (QKV 3d^2 + 3d, output d^2 + d,
    MLP 8d^2 + 5d, two LayerNorms 4d) plus the final LayerNorm's 2d; the embedding and the output layer are d x vocab
    each. Its --ci run measures two tiny shapes end to end."""
    import lab_sizing

    for hidden, layers, heads in ((64, 2, 4), (256, 4, 4)):
        non_embedding, total = lab_sizing.parameters(lab_sizing.build(hidden, layers, heads, context=64))
        assert non_embedding == layers * (12 * hidden**2 + 13 * hidden) + 2 * hidden
        assert total == non_embedding + 2 * hidden * lab_sizing.VOCAB
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "lab_sizing.py"), "--ci", "--threads", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == list(lab_sizing.CI_SHAPES)
