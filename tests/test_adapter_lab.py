"""bench/adapter_lab.py on a finished lab made of tiny models: LoRA and bottleneck adapters trained on its S, each
evaluated as S_tuned alone and steering L, beside the lab's own rows, and the record written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import make_rows, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import adapter_lab  # noqa: E402
import steering_lab  # noqa: E402

from proxytune.foundation.errors import UsageError  # noqa: E402


@pytest.fixture(scope="module")
def finished_lab(tmp_path_factory, tiny_tokenizer, tiny_tokenizer_dir):
    """A smoke-profile work dir holding what adapter_lab reads: four models, the processed papers and the lab's 'main'
    evaluation.py run under its fair decoding (made by the lab's own functions, as steering_lab.py runs them)."""
    work = tmp_path_factory.mktemp("lab")
    specs = {"small": (0, 32, 2), "small_tuned": (1, 32, 2), "large": (2, 64, 3), "large_tuned": (3, 64, 3)}
    for name, (seed, hidden, layers) in specs.items():
        make_tiny_model(len(tiny_tokenizer), seed=seed, hidden_size=hidden, num_layers=layers).save_pretrained(
            work / name / "final")
        tiny_tokenizer.save_pretrained(work / name / "final")
    source = work / "papers.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in make_rows(40)), encoding="utf-8")
    lab = steering_lab.resolve_lab(steering_lab.LabArguments(work_dir=str(work), smoke=True, task_data=str(source)))
    steering_lab.run_script(lab, "processing_meta_review", [
        *steering_lab.processing_arguments(lab, tokenizer_dir=str(tiny_tokenizer_dir)),
        "--output_dir", str(work / "data")])
    steering_lab.run_script(lab, "evaluation", steering_lab.evaluation_arguments(lab, "main", steering_lab.FAIR))
    return work


def test_adapters_are_trained_evaluated_steered_and_recorded(finished_lab, tmp_path):
    before = sorted(str(p.relative_to(finished_lab)) for p in finished_lab.rglob("*"))
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    args = adapter_lab.AdapterLabArguments(lab_dir=str(finished_lab), smoke=True, output_dir=str(out), lora_r=1,
                                           reduction_factor=4, learning_rates=[1e-3, 1e-2], results_file=str(results))
    report = adapter_lab.main(args)
    rows = {row[0]: row for row in report["rows"]}
    # LoRA r=1 on d=32, 2 layers: 16*r*d per layer; bottleneck f=4 (8 units): 2 * (2*32*8 + 8 + 32) per layer.
    assert rows["S_tuned, LoRA r=1"][1] == f"{2 * 16 * 32:,}"
    assert rows["S_tuned, bottleneck f=4"][1] == f"{2 * 2 * (2 * 32 * 8 + 8 + 32):,}"
    for adapter in ("LoRA r=1", "bottleneck f=4"):  # the steered row is trained like its S_tuned, and is neither model
        tuned, steered = rows[f"S_tuned, {adapter}"], rows[f"L steered by (S, {adapter} S_tuned), alpha 1"]
        assert steered[1:4] == tuned[1:4] and steered[4] != tuned[4]
        assert tuned[2] in ("0.001", "0.01")
    lab_rows = report["analysis"]["systems"]
    assert lab_rows["L (the lab's)"]["nll"]["mean"] != lab_rows["L_tuned (the lab's)"]["nll"]["mean"]
    assert report["analysis"]["n_papers"] == steering_lab.PROFILES["smoke"].test_examples
    for kept in report["kept"].values():  # the kept run is the grid's lowest validation loss
        runs = [json.loads((Path(p).parent / "final" / "metrics.json").read_text())["eval_loss"]
                for p in (out / "train").glob(f"{Path(kept['final_dir']).parent.name.split('-lr')[0]}-lr*/final")]
        assert kept["metrics"]["eval_loss"] == min(runs)
    text = results.read_text()
    assert "## adapter_lab" in text and "| L steered by (S, bottleneck f=4 S_tuned), alpha 1 |" in text
    assert "bottleneck f=4 S_tuned), alpha 1 vs L steered by (S, LoRA r=1 S_tuned), alpha 1" in text
    assert sorted(str(p.relative_to(finished_lab)) for p in finished_lab.rglob("*")) == before  # the lab: read only

    # A re-run reuses every run made with the same settings; another rank trains that adapter again, and only it.
    def made():
        return {p.parent.parent.name: p.stat().st_mtime_ns for p in (out / "train").glob("*/final/metrics.json")}

    first = made()
    adapter_lab.main(args)
    assert made() == first
    args.lora_r = 2
    rows = {row[0]: row for row in adapter_lab.main(args)["rows"]}
    assert rows["S_tuned, LoRA r=2"][1] == f"{2 * 2 * 16 * 32:,}"
    again = made()
    assert all(again[k] != first[k] if k.startswith("lora") else again[k] == first[k] for k in first)


def test_a_work_dir_without_a_finished_lab_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="run python bench/steering_lab.py --smoke first"):
        adapter_lab.main(adapter_lab.AdapterLabArguments(lab_dir=str(tmp_path), smoke=True))


def test_bad_sizes_are_refused():
    with pytest.raises(UsageError, match="--reduction_factor 0"):
        adapter_lab.AdapterLabArguments(reduction_factor=0)
