"""bench/harness_lab.py on a finished lab made of tiny models: the harness (its own `hf` backend and ours) scores the
lab's test papers with the NLL the lab's evaluation.py measured, and the record is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import make_rows, make_tiny_model

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install lm-eval==0.4.13")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import harness_lab  # noqa: E402
import steering_lab  # noqa: E402

from proxytune.foundation.errors import UsageError  # noqa: E402


@pytest.fixture(scope="module")
def finished_lab(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir):
    """A smoke-profile work dir holding what harness_lab reads: four models, the processed papers and the 'main'
    evaluation.py run (made by the lab's own functions, as steering_lab.py runs them)."""
    work = tmp_path_factory.mktemp("lab")
    vocab = len(tiny_tokenizer)  # no padded rows: the `hf` backend normalises over every output row
    specs = {"small": (0, 32, 2), "small_tuned": (1, 32, 2), "large": (2, 64, 3), "large_tuned": (3, 64, 3)}
    for name, (seed, hidden, layers) in specs.items():
        model = make_tiny_model(vocab, seed=seed, hidden_size=hidden, num_layers=layers)
        model.save_pretrained(work / name / "final")
        tiny_tokenizer.save_pretrained(work / name / "final")
    rows = make_rows(40)
    for i, row in enumerate(rows):
        row["decision"] = ["Accept (Poster)", "Reject", "Withdrawn"][i % 3]
    source = work / "papers.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    lab = steering_lab.resolve_lab(steering_lab.LabArguments(work_dir=str(work), smoke=True, task_data=str(source)))
    steering_lab.run_script(lab, "processing_meta_review", [
        *steering_lab.processing_arguments(lab, tokenizer_dir=str(tiny_tokenizer_dir)),
        "--output_dir", str(work / "data")])
    steering_lab.run_script(lab, "evaluation", steering_lab.evaluation_arguments(lab, "main", "greedy"))
    return work


def test_the_harness_scores_the_lab_papers_as_the_lab_did(finished_lab, tmp_path):
    results = tmp_path / "RESULTS.md"
    out = harness_lab.main(harness_lab.HarnessLabArguments(work_dir=str(finished_lab), smoke=True, batch_size=4,
                                                           results_file=str(results)))
    assert out["worst_diff"] < 1e-3  # per paper, in nats: the same tokens scored by the harness and by the lab
    labels = [row[0] for row in out["rows"]]
    assert labels == [label for label, _ in harness_lab.HARNESS_SYSTEMS]
    nll = {row[0]: float(row[1]) for row in out["rows"]}
    assert nll["steered L, alpha=1"] not in (nll["L"], nll["S_tuned"])  # the blend is neither model alone
    docs = [json.loads(line) for line in (finished_lab / "harness" / "test_decided.jsonl").read_text().splitlines()]
    assert docs and all(d["label"] in (0, 1) for d in docs)  # 'Withdrawn' papers are left out of the decision task
    text = results.read_text()
    assert "## harness_lab" in text and "| steered L, alpha=1 |" in text


def test_a_work_dir_without_a_finished_lab_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="run python bench/steering_lab.py --smoke first"):
        harness_lab.main(harness_lab.HarnessLabArguments(work_dir=str(tmp_path), smoke=True))


def test_decisions_read_as_accept_or_reject():
    assert [harness_lab.decision_label(d) for d in ("Accept (Oral)", "reject", "Withdrawn", None)] == [0, 1, None, None]
