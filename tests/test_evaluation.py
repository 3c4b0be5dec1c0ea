"""evaluation.py: end to end with tiny models, ratings that survive re-runs, atomic workbook replacement,
the workbook's sheets/validation/chart read back with openpyxl, metrics against references, bad inputs.
(workbook.py's own tests, with records built in memory, are in test_workbook.py.)"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import pytest
from conftest import assert_clear_lead, record_generate_scores
from test_workbook import header_of, key_of, row_of

import evaluation
from proxytune.evaluation.arguments import ARGUMENT_TYPES, GenerationArguments
from proxytune.evaluation.generation import build_inputs, cut_at_eos, generate, generate_batch
from proxytune.evaluation.scores import summarize
from proxytune.evaluation.shards import merge_shards
from proxytune.evaluation.systems import resolve_decoding
from proxytune.foundation.cli import cli
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.steering.decoding import prefill_rows
from proxytune.task.papers import load_examples, select_examples
from proxytune.task.prompts import PROMPT_TEMPLATE
from proxytune.task.text_metrics import ROUGE_TYPES, make_rouge_scorer, repetition_rate, score_rouge, split_sentences
from proxytune.workbook.writer import cell_text

N_EXAMPLES = 3
SYSTEMS = ["small_base", "small_tuned", "large", "steered"]


def make_args(tiny_model_dirs, data: Path, out: Path, *extra: str, models=("small_base", "small_tuned", "large")):
    argv = ["--dataset_path", str(data), "--num_examples", str(N_EXAMPLES), "--max_new_tokens", "4",
            "--batch_size", "2", "--bootstrap_samples", "50", "--output_dir", str(out)]
    for role in models:
        argv += [f"--{role}_model", str(tiny_model_dirs[role])]
    return parse_config(ARGUMENT_TYPES, argv + list(extra))



@pytest.fixture
def blend_file(tmp_path) -> Path:
    from proxytune.steering.blend import Blend

    path = tmp_path / "blend.json"
    Blend.from_alpha(1.0).save(path)
    return path


def run(tiny_model_dirs, data, out, *extra, **kw) -> dict:
    return evaluation.main(*make_args(tiny_model_dirs, data, out, *extra, **kw))


def read_sheet(path: Path, name: str) -> tuple[list[str], list[dict]]:
    from openpyxl import load_workbook

    wb = load_workbook(path)
    rows = list(wb[name].iter_rows(values_only=True))
    return list(rows[0]), [dict(zip(rows[0], r)) for r in rows[1:]]


@pytest.fixture
def first_run(tiny_model_dirs, jsonl_file, tmp_path, blend_file):
    """All four systems on N_EXAMPLES examples; returns (output dir, metrics, a re-run with the same flags)."""
    out = tmp_path / "out"
    metrics = run(tiny_model_dirs, jsonl_file, out, "--blend", str(blend_file))
    return out, metrics, lambda *extra, **kw: run(tiny_model_dirs, jsonl_file, out, "--blend", str(blend_file),
                                                  *extra, **kw)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
def test_end_to_end_writes_workbook_and_artifacts(first_run):
    out, metrics, _ = first_run
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["eval_examples.xlsx", "metrics.json", "predictions.jsonl", "prompt_template.txt", "ratings.jsonl",
         "rouge_by_system.png"])
    assert (out / "ratings.jsonl").read_text() == ""  # nothing judged yet
    assert (out / "prompt_template.txt").read_text() == PROMPT_TEMPLATE + "\n"
    assert (out / "rouge_by_system.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved["systems"]) == SYSTEMS == list(metrics["systems"])
    for s in saved["systems"].values():
        assert s["n"] == N_EXAMPLES
        for m in (*ROUGE_TYPES, "words", "repetition", "eos_share", "perplexity"):
            assert s[m]["ci_low"] <= s[m]["mean"] <= s[m]["ci_high"]
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == N_EXAMPLES * len(SYSTEMS)
    assert {p["system"] for p in preds} == set(SYSTEMS)
    # Random models never stop by themselves: every output hits the 4-token limit.
    assert all(p["new_tokens"] == 4 and not p["ended_with_eos"] for p in preds)
    assert saved["run"]["systems"]["large"]["decoding"]["max_new_tokens"] == 4
    assert saved["run"]["blend"]["tuned_weight"] == 1.0
    assert all(p["perplexity"] == pytest.approx(math.exp(p["nll"] / p["target_tokens"])) for p in preds)


def test_reference_perplexity_is_the_nll_of_the_training_target(first_run, tiny_model_dirs, tiny_tokenizer):
    """Recompute one example's reference NLL under the large model by hand: prompt ids + ' ' + meta-review + EOS."""
    import torch

    from proxytune.models.loading import load_causal_lm
    from proxytune.task.prompts import build_prompt

    out, _, _ = first_run
    pred = next(p for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
                if p["system"] == "large")
    _, rows = read_sheet(out / "eval_examples.xlsx", "Review")
    reviews = next(r["reviews"] for r in rows if r["example_id"] == pred["example_id"])
    prompt, _ = build_prompt([reviews], tiny_tokenizer, 512 - 4)
    prompt_ids = tiny_tokenizer(prompt)["input_ids"]
    target_ids = tiny_tokenizer(" " + pred["reference"])["input_ids"] + [tiny_tokenizer.eos_token_id]
    model = load_causal_lm(str(tiny_model_dirs["large"]), device="cpu")
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0, len(prompt_ids) - 1:-1]
    logp = torch.log_softmax(logits[:, :len(tiny_tokenizer)], dim=-1)  # padded rows are not tokens
    nll = -logp.gather(1, torch.tensor(target_ids)[:, None]).sum().item()
    assert pred["target_tokens"] == len(target_ids)
    assert pred["nll"] == pytest.approx(nll, rel=1e-4)


def test_steering_with_alpha_zero_is_the_large_model(tiny_model_dirs, jsonl_file, tmp_path):
    """Blend.from_alpha(0) is L alone: the steered loop must reproduce HF generate's greedy output and L's NLL."""
    run(tiny_model_dirs, jsonl_file, tmp_path, "--alpha", "0", "--systems", "large", "steered",
        "--max_new_tokens", "8")
    preds = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    by_system = {s: [(p["example_id"], p["prediction"], p["new_tokens"]) for p in preds if p["system"] == s]
                 for s in ("large", "steered")}
    assert by_system["large"] == by_system["steered"]
    nll = {s: [p["nll"] for p in preds if p["system"] == s] for s in ("large", "steered")}
    assert nll["steered"] == pytest.approx(nll["large"], rel=1e-5)


def test_workbook_sheets_validation_and_chart(first_run):
    from openpyxl import load_workbook

    out, _, _ = first_run
    wb = load_workbook(out / "eval_examples.xlsx")
    assert wb.sheetnames == ["Review", "Pairwise", "Summary", "Scores", "Intervals", "Run", "Key"]
    assert wb["Key"].sheet_state == "hidden"
    ws = wb["Review"]
    col = header_of(ws)
    assert ws.max_row == 1 + N_EXAMPLES  # one row per example
    assert [h for h in col if h.endswith(" output")] == ["A output", "B output", "C output", "D output"]
    key, preds = key_of(wb), [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for p in preds:  # the letter the Key gives shows that system's output
        row = row_of(ws, p["example_id"])
        shown = ws.cell(row, col[f"{key[('Review', p['example_id'], p['system'])]} output"]).value
        assert shown == cell_text(p["prediction"])  # control characters a random model emits are dropped
    (rule,) = ws.data_validations.dataValidation
    assert (rule.type, rule.formula1) == ("list", '"1,2,3,4,5"') and len(rule.sqref.ranges) == len(SYSTEMS)
    assert all(ws.cell(r, col["A rating"]).value is None for r in range(2, ws.max_row + 1))
    pairwise = wb["Pairwise"]  # default: steered vs large, both evaluated
    assert pairwise.max_row == 1 + N_EXAMPLES
    assert {key[("Pairwise", p["example_id"], s)] for p in preds for s in ("steered", "large")} == {"A", "B"}

    summary = wb["Summary"]
    assert [c.value for c in summary[1]][:7] == ["system", "model", "n", *ROUGE_TYPES]
    assert [summary.cell(r, 1).value for r in range(2, 6)] == SYSTEMS
    (chart,) = summary._charts
    assert chart.tagname == "barChart" and len(chart.series) == len(ROUGE_TYPES)
    assert chart.series[0].val.numRef.f.replace("'", "") == "Summary!$D$2:$D$5"  # (quoted or not)
    scores = wb["Scores"]
    assert scores.max_row == 1 + N_EXAMPLES * len(SYSTEMS) and scores.freeze_panes == "D2"

    run_info = {r[0]: r[1] for r in wb["Run"].iter_rows(min_row=2, values_only=True)}
    assert run_info["split"] == "test" and run_info["n_examples"] == N_EXAMPLES
    assert run_info["systems.small_tuned.model"].endswith("small_tuned")
    assert run_info["systems.large.decoding.do_sample"] is False
    assert run_info["prompt_template"] == PROMPT_TEMPLATE
    assert (run_info["review.seed"], run_info["review.pairwise"]) == (42, "steered vs large")  # --seed's default


def test_ratings_survive_rerun(first_run, tiny_model_dirs, jsonl_file):
    """Ratings and comments typed under the blind letters, a pairwise choice and a column the reviewer added come
    back after re-runs with another review seed, including for a system left out of one run (kept aside, then
    restored); ratings.jsonl holds them on every run."""
    from openpyxl import load_workbook

    out, _, rerun = first_run
    path = out / "eval_examples.xlsx"
    wb = load_workbook(path)
    key, ws = key_of(wb), wb["Review"]
    col = header_of(ws)
    ws.cell(1, ws.max_column + 1, "second_opinion")
    eids = [ws.cell(r, col["example_id"]).value for r in range(2, ws.max_row + 1)]
    typed = {}
    for eid, system, rating, comment in ((eids[0], "small_base", 4, "fluent but vague"), (eids[1], "steered", 1,
                                                                                         "=not a formula"),
                                         (eids[2], "large", 5, None)):
        label = key[("Review", eid, system)]
        ws.cell(row_of(ws, eid), col[f"{label} rating"], rating)
        if comment:
            ws.cell(row_of(ws, eid), col[f"{label} comment"], comment)
        typed[(eid, system)] = (rating, comment)
    ws.cell(row_of(ws, eids[0]), ws.max_column, "note 1")
    pw = wb["Pairwise"]
    pw.cell(row_of(pw, eids[0]), header_of(pw)["choice"], key[("Pairwise", eids[0], "steered")])
    wb.save(path)

    def judged():
        lines = [json.loads(line) for line in (out / "ratings.jsonl").read_text().splitlines()]
        ratings = {(r["example_id"], r["system"]): (r["rating"], r["comment"]) for r in lines if r["type"] == "rating"}
        current = {(r["example_id"], r["system"]) for r in lines if r["type"] == "rating" and r["kept"] is None}
        choices = [(r["example_id"], r["winner"], r["kept"]) for r in lines if r["type"] == "pairwise"]
        notes = [(r["example_id"], r["values"]) for r in lines if r["type"] == "note"]
        return ratings, current, choices, notes

    rerun("--review_seed", "5")  # every letter reshuffled
    assert judged() == (typed, set(typed), [(eids[0], "steered", None)], [(eids[0], {"second_opinion": "note 1"})])

    # small_base (and with it steered) left out: their judgments move to 'Kept ratings', nothing is dropped.
    run(tiny_model_dirs, jsonl_file, out, models=("small_tuned", "large"))
    assert "Kept ratings" in load_workbook(path).sheetnames and "Pairwise" not in load_workbook(path).sheetnames
    ratings, current, choices, _ = judged()
    assert ratings == typed and current == {k for k in typed if k[1] == "large"}
    run_date = json.loads((out / "metrics.json").read_text())["run"]["date"]
    assert choices == [(eids[0], "steered", f"not in run of {run_date}")]

    rerun()
    assert judged()[:3] == (typed, set(typed), [(eids[0], "steered", None)])
    assert "Kept ratings" not in load_workbook(path).sheetnames


def test_changed_output_keeps_the_rating_and_the_rated_output(first_run, tiny_model_dirs, jsonl_file):
    from openpyxl import load_workbook

    out, _, rerun = first_run
    path = out / "eval_examples.xlsx"
    wb = load_workbook(path)
    ws = wb["Review"]
    eid = ws.cell(2, header_of(ws)["example_id"]).value
    label = key_of(wb)[("Review", eid, "large")]
    ws.cell(2, header_of(ws)[f"{label} rating"], 3)
    old_output = ws.cell(2, header_of(ws)[f"{label} output"]).value
    wb.save(path)
    rerun("--max_new_tokens", "6")
    wb = load_workbook(path)
    ws = wb["Review"]
    label = key_of(wb)[("Review", eid, "large")]
    row = row_of(ws, eid)
    assert ws.cell(row, header_of(ws)[f"{label} rating"]).value == 3
    assert ws.cell(row, header_of(ws)[f"{label} output"]).value != old_output
    assert f"{label}: another rating of this output is in 'Kept ratings'" in ws.cell(row, header_of(ws)["note"]).value
    _, kept = read_sheet(path, "Kept ratings")
    assert [(k["example_id"], k["system"], k["rating"], k["output"]) for k in kept] == [(eid, "large", 3, old_output)]
    assert kept[0]["reason"].startswith("output changed since judged")


def test_workbook_replaced_atomically_when_saving_fails(first_run, tiny_model_dirs, jsonl_file, monkeypatch):
    out, _, rerun = first_run
    path = out / "eval_examples.xlsx"
    before = path.read_bytes()

    def crash(wb, f):  # in place of proxytune.workbook.writer.write_xlsx, which writes the book into the file f
        f.write(b"PK\x03\x04 half a workbook")
        raise RuntimeError("disk pulled out mid-write")

    monkeypatch.setattr("proxytune.workbook.writer.write_xlsx", crash)
    with pytest.raises(RuntimeError, match="mid-write"):
        rerun()
    assert path.read_bytes() == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []

    def disk_full(wb, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("proxytune.workbook.writer.write_xlsx", disk_full)
    with pytest.raises(UsageError, match="previous workbook is untouched"):
        rerun()
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Data, generation, sharding
# ---------------------------------------------------------------------------------------------
def test_processed_dataset_split_and_ids_are_used(tiny_model_dirs, rows, tmp_path):
    import datasets

    def table(offset):
        return datasets.Dataset.from_list([{"example_id": f"ex{offset + i}", "reviews": [r["Input"]],
                                            "Input": r["Input"], "Output": r["Output"]}
                                           for i, r in enumerate(rows[offset:offset + 4])])

    data = tmp_path / "processed"
    datasets.DatasetDict({"train": table(0), "validation": table(4), "test": table(8)}).save_to_disk(str(data))
    run(tiny_model_dirs, data, tmp_path / "out", "--split", "validation", "--num_examples", "10",
        models=("large",))
    _, got = read_sheet(tmp_path / "out" / "eval_examples.xlsx", "Review")
    assert [r["example_id"] for r in got] == ["ex4", "ex5", "ex6", "ex7"]
    assert got[0]["reference"] == rows[4]["Output"]


def test_raw_file_ids_match_processing(tiny_model_dirs, jsonl_file, rows):
    from proxytune.task.reviews import clean_text, example_id

    data_args = make_args(tiny_model_dirs, jsonl_file, Path("unused"))[1]
    loaded = load_examples(data_args)
    first = rows[0]
    assert loaded[0]["example_id"] == example_id([clean_text(first["Input"], "whitespace")],
                                                 clean_text(first["Output"], "whitespace"))
    assert "<sep>" not in loaded[0]["Input"]
    assert len({r["example_id"] for r in loaded}) == len(rows)


def test_example_selection_is_seeded_and_in_order():
    a = select_examples(100, 10, seed=1)
    assert a == select_examples(100, 10, seed=1) == sorted(a)
    assert a != select_examples(100, 10, seed=2)
    assert select_examples(5, None, 0) == select_examples(5, 50, 0) == [0, 1, 2, 3, 4]


@pytest.mark.exactness
def test_batched_left_padded_generation_equals_one_at_a_time(tiny_model_dirs, tiny_tokenizer, monkeypatch):
    """Left padding with an attention mask must not change greedy outputs."""
    from proxytune.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dirs["large"]), device="cpu")
    prompts = ["Peer reviews of a paper:\n\nGood.\n\nMeta-review:",
               "Peer reviews of a paper:\n\nThe method is simple and effective but the evaluation is thin.\n\n"
               "Meta-review:"]
    examples = [{"example_id": str(i), "prompt_ids": tiny_tokenizer(p)["input_ids"], "prompt_truncated": False}
                for i, p in enumerate(prompts)]
    settings = {"max_new_tokens": 6, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    scores = record_generate_scores(model, monkeypatch)
    together = generate("large", examples, {"large": model}, None, settings, tiny_tokenizer, 2, 0)
    assert_clear_lead(scores[0])  # float32: no near-tie that batching's rounding could flip (conftest)
    alone = [generate("large", [ex], {"large": model}, None, settings, tiny_tokenizer, 1, 0)[0]
             for ex in examples]
    assert [r["prediction"] for r in together] == [r["prediction"] for r in alone]
    assert len({r["prediction"] for r in together}) == 2


@pytest.mark.exactness
@pytest.mark.parametrize("penalties", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}])
def test_static_cache_generation_equals_the_default_cache(tiny_model_dirs, tiny_tokenizer, penalties,
                                                          monkeypatch):
    """generate_batch preallocates its KV cache and, on CPU, fills it row by row (bench/bench_evaluation.py); the new
    tokens must be exactly those of HF generate with its default (dynamic) cache, left padding included."""
    import torch
    from transformers import GenerationConfig

    from proxytune.evaluation import generation
    from proxytune.models.loading import load_causal_lm, vocab_size_of
    from proxytune.steering.decoding import left_pad, prefill_rows

    model = load_causal_lm(str(tiny_model_dirs["large"]), device="cpu")
    prompts = ["Peer reviews of a paper:\n\nGood.\n\nMeta-review:",
               "Peer reviews of a paper:\n\nThe method is simple and effective but the evaluation is thin."
               "\n\nMeta-review:",
               "Peer reviews of a paper:\n\nWell written.\n\nStrong results on CIFAR.\n\nMeta-review:"]
    ids, mask = left_pad([tiny_tokenizer(p)["input_ids"] for p in prompts], tiny_tokenizer.pad_token_id)  # (3, T)
    settings = {"max_new_tokens": 12, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, **penalties}
    calls = []
    monkeypatch.setattr(generation, "prefill_rows", lambda *a, **k: calls.append(a) or prefill_rows(*a, **k))
    new = generate_batch("large", {"large": model}, None, ids, mask, settings, tiny_tokenizer, None)
    assert len(calls) == 1  # on CPU the prompts ran row by row into one cache (prefill_rows)

    vocab, rows = vocab_size_of(tiny_tokenizer), model.get_output_embeddings().weight.shape[0]
    reference = GenerationConfig(
        do_sample=False, max_new_tokens=12, repetition_penalty=settings["repetition_penalty"],
        no_repeat_ngram_size=settings["no_repeat_ngram_size"], eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id, suppress_tokens=list(range(vocab, rows)))
    assert reference.cache_implementation is None  # HF's default: a DynamicCache
    scores = record_generate_scores(model, monkeypatch)
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=reference)[:, ids.shape[1]:]
    assert_clear_lead(scores[0])  # float32: no near-tie that the two caches' rounding could flip (conftest)
    assert new.shape == expected.shape and torch.equal(new, expected)
    assert len({tuple(row) for row in new.tolist()}) == 3


@pytest.mark.exactness
def test_shards_merge_to_the_single_process_result(tiny_model_dirs, jsonl_file, tmp_path):
    def predictions(out):
        return [(p["example_id"], p["system"], p["prediction"])
                for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())]

    # One example per batch: a shard's batches then hold what the single run's do, the same computation to the bit,
    # so no near-tie of the float32 tiny model can turn a shard's tokens apart on any CPU.
    run(tiny_model_dirs, jsonl_file, tmp_path / "single", "--batch_size", "1", models=("small_base",))
    sharded = tmp_path / "sharded"
    for k in (1, 0):
        assert run(tiny_model_dirs, jsonl_file, sharded, "--shard_index", str(k), "--num_shards", "2",
                   "--batch_size", "1", models=("small_base",)) is None
    assert not (sharded / "eval_examples.xlsx").exists()
    evaluation.main(*parse_config(ARGUMENT_TYPES, ["--output_dir", str(sharded), "--merge_only"]))
    assert predictions(sharded) == predictions(tmp_path / "single")
    assert (sharded / "eval_examples.xlsx").is_file()


def test_merge_refuses_missing_or_mixed_shards(tiny_model_dirs, jsonl_file, tmp_path):
    run(tiny_model_dirs, jsonl_file, tmp_path, "--shard_index", "0", "--num_shards", "2", models=("small_base",))
    with pytest.raises(UsageError, match="shard 1 of 2 is missing"):
        merge_shards(tmp_path, 2)
    run(tiny_model_dirs, jsonl_file, tmp_path, "--shard_index", "1", "--num_shards", "2", "--seed", "7",
        models=("small_base",))
    with pytest.raises(UsageError, match="different runs"):
        merge_shards(tmp_path, None)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
def test_rouge_matches_rouge_score_with_newline_sentences():
    from rouge_score import rouge_scorer

    pred, ref = "The paper is strong. Accept it!", "The paper is strong overall.\nWe accept it."
    ours = score_rouge(make_rouge_scorer(), pred, ref)
    theirs = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True).score(
        "The paper is strong overall.\nWe accept it.", "The paper is strong.\nAccept it!")
    assert ours == pytest.approx({k: 100 * v.fmeasure for k, v in theirs.items()})
    assert score_rouge(make_rouge_scorer(), ref, ref)["rougeLsum"] == pytest.approx(100)


def test_split_sentences_and_repetition():
    assert split_sentences('He said "no." Then left!\nNew line? yes') == \
        ['He said "no."', "Then left!", "New line?", "yes"]
    assert split_sentences("  ") == []
    assert repetition_rate("a b a b a b", 2) == pytest.approx(0.6)
    assert repetition_rate("one two three four", 3) == 0.0
    assert repetition_rate("short", 3) == 0.0
    assert cut_at_eos([5, 6, 0, 1, 1], 0) == ([5, 6], True)
    assert cut_at_eos([5, 6, 7], 0) == ([5, 6, 7], False)


def test_summary_means_intervals_and_corpus_perplexity():
    import math

    records = [{"system": "s", "example_id": str(i), "rouge1": v, "rouge2": v, "rougeL": v, "rougeLsum": v,
                "words": 10, "repetition": 0.0, "ended_with_eos": i % 2 == 0, "nll": nll, "target_tokens": n}
               for i, (v, nll, n) in enumerate([(10, 2.0, 1), (20, 6.0, 3), (30, 4.0, 4), (40, 0.0, 2)])]
    summary = summarize(records, ["s"], 4, samples=200, confidence=0.9, seed=0)["s"]
    assert summary["rouge1"]["mean"] == pytest.approx(25)
    assert 10 <= summary["rouge1"]["ci_low"] < 25 < summary["rouge1"]["ci_high"] <= 40
    assert summary["words"] == {"mean": 10, "ci_low": 10, "ci_high": 10}
    assert summary["eos_share"]["mean"] == pytest.approx(0.5)
    assert summary["perplexity"]["mean"] == pytest.approx(math.exp(12 / 10))


def test_decoding_overrides_apply_to_one_system(tmp_path):
    gen = GenerationArguments(max_new_tokens=16, decoding_overrides='{"steered": {"do_sample": true, '
                                         '"temperature": 0.7, "max_new_tokens": 32}}')
    got = resolve_decoding(gen, ["large", "steered"])
    assert got["large"]["do_sample"] is False and got["large"]["max_new_tokens"] == 16
    assert got["steered"] == {**got["large"], "do_sample": True, "temperature": 0.7, "max_new_tokens": 32}
    path = tmp_path / "o.yaml"
    path.write_text("large:\n  top_p: 0.9\n")
    assert resolve_decoding(GenerationArguments(decoding_overrides=str(path)),
                                       ["large"])["large"]["top_p"] == 0.9
    for bad, match in [('{"large": {"top_k": 5}}', "unknown setting 'top_k'"),
                       ('{"large": {"max_new_tokens": 2.5}}', "is not a int"),
                       ('{"large": {"temperature": 0}}', "large.temperature 0.0 must be > 0"),
                       ('{"small_base": {"top_p": 0.5}}', "not evaluated"),
                       ("{not json", "not valid JSON")]:
        with pytest.raises(UsageError, match=match):
            resolve_decoding(GenerationArguments(decoding_overrides=bad), ["large"])


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing touched
# ---------------------------------------------------------------------------------------------
def expect_usage_error(capsys, args, match: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli(evaluation.main)(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error:"), err
    assert err.count("error:") == 1 and match in err.splitlines()[-1], err


def test_bad_inputs_fail_cleanly(tiny_model_dirs, jsonl_file, tmp_path, capsys):
    import datasets

    data = tmp_path / "processed"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"Input": "a", "Output": "b"}])}).save_to_disk(str(data))
    out = tmp_path / "out"
    expect_usage_error(capsys, make_args(tiny_model_dirs, data, out, "--split", "tset"), "--split tset is not in")
    expect_usage_error(capsys, make_args(tiny_model_dirs, tmp_path / "nope.jsonl", out), "does not exist")
    args = make_args(tiny_model_dirs, jsonl_file, out)
    args[0].large_model = str(tmp_path / "no_such_model")
    expect_usage_error(capsys, args, "--large_model")
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    args = make_args(tiny_model_dirs, jsonl_file, out)
    args[0].small_base_model = str(broken)
    expect_usage_error(capsys, args, "cannot load model")
    expect_usage_error(capsys, make_args(tiny_model_dirs, jsonl_file, out, "--systems", "steered"),
                       "needs --blend")
    expect_usage_error(capsys, make_args(tiny_model_dirs, jsonl_file, out, "--alpha", "1", models=("large",)),
                       "--small_base_model, --small_tuned_model missing")
    expect_usage_error(capsys, make_args(tiny_model_dirs, jsonl_file, out, "--output_xlsx", str(tmp_path)),
                       "is a directory")
    expect_usage_error(capsys, make_args(tiny_model_dirs, jsonl_file, out, "--output_xlsx", str(tmp_path / "a.xls")),
                       "must end in .xlsx")
    with pytest.raises(UsageError, match="--num_examples 0 must be >= 1"):
        make_args(tiny_model_dirs, jsonl_file, out, "--num_examples", "0")
    assert not out.exists()


@pytest.mark.parametrize("case", ["corrupt", "locked", "foreign"])
def test_unusable_existing_workbook_is_left_untouched(case, tiny_model_dirs, jsonl_file, tmp_path, capsys):
    from openpyxl import Workbook

    path = tmp_path / "book.xlsx"
    if case == "corrupt":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    else:
        wb = Workbook()
        wb.active.title = "Examples" if case == "locked" else "My budget"
        wb.save(path)
        if case == "locked":
            (tmp_path / ".~lock.book.xlsx#").write_text("someone,host,2026")
    before = path.read_bytes()
    match = {"corrupt": "cannot be read", "locked": "a crash left the lock behind), delete",
             "foreign": "not written by"}[case]
    expect_usage_error(capsys, make_args(tiny_model_dirs, jsonl_file, tmp_path / "out", "--output_xlsx", str(path)),
                       match)
    assert path.read_bytes() == before
    assert not (tmp_path / "out").exists()


def test_reviewer_sheets_and_unnamed_columns_are_kept(first_run, tiny_model_dirs, jsonl_file):
    from openpyxl import load_workbook

    out, _, rerun = first_run
    path = out / "eval_examples.xlsx"
    wb = load_workbook(path)
    wb.create_sheet("My notes").append(["to discuss", 42])
    ws = wb["Review"]
    ws.cell(3, ws.max_column + 3, "typed without a header")
    eid = ws.cell(3, header_of(ws)["example_id"]).value
    wb.save(path)
    rerun()
    wb = load_workbook(path)
    assert [list(r) for r in wb["My notes"].iter_rows(values_only=True)] == [["to discuss", 42]]
    header, rows = read_sheet(path, "Review")
    extra = [h for h in header if h.startswith("column ")]
    assert len(extra) == 1 and next(r for r in rows if r["example_id"] == eid)[extra[0]] == "typed without a header"
    assert zipfile.is_zipfile(path)


def test_reference_is_scored_whole_after_a_truncated_prompt(tiny_model_dirs, tiny_tokenizer, tmp_path):
    """Long reviews and a reference far longer than max_new_tokens: the generation prompt fills the context minus
    max_new_tokens, but the reference gets its own prompt budget and every one of its tokens is scored."""
    from proxytune.task.prompts import encode_target

    meta = "The reviewers agree the baselines are weak. Reject. " * 2
    rows = [{"Input": "The method is simple and effective. " * 60 + f"Paper {i}.", "Output": f"Paper {i}. {meta}"}
            for i in range(2)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    n_target = len(encode_target(rows[0]["Output"], tiny_tokenizer))
    assert n_target > 40  # much longer than the 4 new tokens the generation prompt leaves room for
    metrics = evaluation.main(*parse_config(ARGUMENT_TYPES, [
        "--dataset_path", str(data), "--max_length", "200", "--max_new_tokens", "4", "--batch_size", "2",
        "--bootstrap_samples", "10", "--large_model", str(tiny_model_dirs["large"]),
        "--output_dir", str(tmp_path / "o")]))
    preds = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert all(p["prompt_truncated"] for p in preds)
    for p in preds:
        assert p["target_tokens"] == len(encode_target(p["reference"], tiny_tokenizer))
    assert metrics["systems"]["large"]["reference_tokens"] == sum(p["target_tokens"] for p in preds)


def test_build_inputs_fits_the_context_and_cuts_only_references_that_fill_it(tiny_tokenizer):
    from proxytune.task.prompts import encode_target

    long_meta = "The reviewers agree the baselines are weak. " * 40
    examples = [{"reviews": ["Simple and effective. " * 80], "Output": "Weak baselines; reject."},
                {"reviews": ["Simple and effective. " * 80], "Output": long_meta}]
    build_inputs(examples, tiny_tokenizer, prompt_budget=96, context=100)
    short, cut = examples
    assert len(short["prompt_ids"]) <= 96 and len(short["score_prompt_ids"]) + len(short["target_ids"]) <= 100
    assert short["target_ids"] == encode_target(short["Output"], tiny_tokenizer) and not short["reference_cut"]
    assert cut["reference_cut"] and len(cut["score_prompt_ids"]) + len(cut["target_ids"]) == 100


def test_decoding_calls_raise_no_future_warning(tiny_model_dirs, tiny_tokenizer):
    """transformers 5.24 renamed `past_key_values` to `cache` (removal announced for 5.40): our decoding calls use
    the current names, so the next minor release cannot break them."""
    import warnings

    import torch

    from proxytune.models.loading import load_causal_lm
    from proxytune.steering.blend import Blend
    from proxytune.steering.decoding import left_pad

    models = {r: load_causal_lm(str(tiny_model_dirs[r]), device="cpu") for r in ("large", "small_base", "small_tuned")}
    ids, mask = left_pad([tiny_tokenizer("Good paper. Weak baselines.")["input_ids"], [5, 6, 7]],
                         tiny_tokenizer.pad_token_id)
    settings = dict(max_new_tokens=3, do_sample=False, temperature=1.0, top_p=1.0, repetition_penalty=1.0,
                    no_repeat_ngram_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        for system in ("large", "steered"):
            generate_batch(system, models, Blend.from_alpha(1.0), ids, mask, settings, tiny_tokenizer,
                                      torch.Generator().manual_seed(0))
        prefill_rows(models["large"], ids, mask, ids.shape[1] + 2)
