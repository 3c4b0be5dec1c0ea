"""evaluation.py --text_dataset: continuations of text prompts without references, end to end with tiny models (a
reward classifier, a judge classifier, a fluency model); the positive rate read at the asked-for label of classifiers
whose logits are built; distinct-n against a hand count; the fluency perplexity against a float64 hand computation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

import evaluation
from proxytune.evaluation.arguments import ARGUMENT_TYPES, ContinuationArguments
from proxytune.evaluation.continuations import (
    CONTINUATION_METRICS,
    load_classifiers,
    ratio_statistic,
    read_classifier,
    score_fluency,
    summarize_continuations,
)
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.task.text_metrics import distinct_n, distinct_shares
from proxytune.training.classifier_scores import load_reward_model

SYSTEMS = ["small_base", "small_tuned", "large", "steered"]
N_PROMPTS = 6


def make_classifier(path: Path, tokenizer, labels: list[str], winner: int | None = None, seed: int = 0) -> Path:
    """A tiny two-class sequence classifier saved with the tiny tokenizer. With `winner`, its logits are built: the
    final layer norm's weight is 0 and its bias e_0, so every token's hidden state is e_0 whatever the text, and the
    head maps e_0 to logit +1 for `winner` and -1 for the other class. Without, it is random."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=len(tokenizer) + 12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, num_labels=len(labels), pad_token_id=1,
                           id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    model = GPTNeoXForSequenceClassification(config)
    if winner is not None:
        with torch.no_grad():
            norm = model.gpt_neox.final_layer_norm
            norm.weight.zero_()
            norm.bias.zero_()
            norm.bias[0] = 1.0
            model.score.weight.zero_()
            model.score.weight[:, 0] = -1.0
            model.score.weight[winner, 0] = 1.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_args(tiny_model_dirs, text_file: Path, out: Path, *extra) -> tuple:
    argv = ["--text_dataset", str(text_file), "--validation_split_percentage", "25", "--num_examples",
            str(N_PROMPTS), "--prompt_length", "2,4", "--completion_length", "2,5", "--batch_size", "4",
            "--bootstrap_samples", "50", "--alpha", "1.0", "--output_dir", str(out)]
    for role in ("small_base", "small_tuned", "large"):
        argv += [f"--{role}_model", str(tiny_model_dirs[role])]
    return parse_config(ARGUMENT_TYPES, argv + [str(a) for a in extra])


# --- end to end --------------------------------------------------------------------------------------------------
def test_continuations_end_to_end(tiny_model_dirs, tiny_tokenizer, text_file, tmp_path):
    from openpyxl import load_workbook

    reward_dir = make_classifier(tmp_path / "reward", tiny_tokenizer, ["NEGATIVE", "POSITIVE"], winner=1)
    judge_dir = make_classifier(tmp_path / "judge", tiny_tokenizer, ["neg", "pos"], seed=3)
    out = tmp_path / "out"
    metrics = evaluation.main(*run_args(tiny_model_dirs, text_file, out, "--reward_model", reward_dir,
                                        "--reward_label", "positive", "--judge_classifier", judge_dir,
                                        "--judge_label", "pos", "--fluency_model", tiny_model_dirs["large"]))

    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["eval_examples.xlsx", "metrics.json", "predictions.jsonl", "ratings.jsonl", "shares_by_system.png"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert list(saved["systems"]) == SYSTEMS and saved["n_examples"] == N_PROMPTS
    for s in saved["systems"].values():
        assert s["n"] == N_PROMPTS
        assert set(CONTINUATION_METRICS) <= set(s)
        for m in CONTINUATION_METRICS:
            assert s[m]["ci_low"] <= s[m]["mean"] <= s[m]["ci_high"], m
        # The reward classifier's logits are built: class POSITIVE is always on top, with logit exactly 1.
        assert s["reward_positive_rate"] == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0}
        assert s["reward_score"]["mean"] == 1.0
    assert set(saved["notes"]) >= {"reward", "judge", "fluency_perplexity", "distinct_n", "intervals"}

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == N_PROMPTS * len(SYSTEMS)
    held_out = [json.loads(line)["text"] for line in text_file.read_text().splitlines()]
    for p in preds:
        assert 2 <= p["completion_length"] <= 5 and p["new_tokens"] <= p["completion_length"]
        assert p["ended_with_eos"] or p["new_tokens"] == p["completion_length"]  # cut at EOS, else at its draw
        assert 2 <= p["prompt_tokens"] <= 4 and any(" ".join(t.replace("<br />", " ").split()).startswith(p["prompt"])
                                                     for t in held_out)
        assert p["fluency_perplexity"] == pytest.approx(math.exp(p["fluency_nll"] / p["fluency_tokens"]))
    for system in SYSTEMS:  # one draw of lengths for every system; the same prompts
        assert [p["completion_length"] for p in preds if p["system"] == system] == \
            [p["completion_length"] for p in preds if p["system"] == "large"]
        mine = [p for p in preds if p["system"] == system]
        nll, tokens = sum(p["fluency_nll"] for p in mine), sum(p["fluency_tokens"] for p in mine)
        assert saved["systems"][system]["fluency_perplexity"]["mean"] == pytest.approx(math.exp(nll / tokens))
        assert saved["systems"][system]["distinct_2"]["mean"] == pytest.approx(
            distinct_n([p["prediction"] for p in mine], 2))

    # The judge, read independently: the share of prompt + continuation whose top class is 'pos'.
    judge = load_reward_model(str(judge_dir), "pos", "logit", "full")
    for system in SYSTEMS:
        mine = [p for p in preds if p["system"] == system]
        with torch.no_grad():
            logits = judge.logits([p["prompt"] + p["prediction"] for p in mine])  # (N, 2)
        assert saved["systems"][system]["judge_positive_rate"]["mean"] == pytest.approx(
            (logits.argmax(-1) == 1).double().mean().item())
        assert [p["judge_positive"] for p in mine] == (logits.argmax(-1) == 1).tolist()

    # The workbook: the prompts in the reviews column, no reference, every system's continuation to rate.
    wb = load_workbook(out / "eval_examples.xlsx")
    rows = list(wb["Review"].iter_rows(values_only=True))
    header, body = list(rows[0]), [dict(zip(rows[0], r)) for r in rows[1:]]
    assert {"reviews", "reference", "A output", "D rating"} <= set(header)
    assert len(body) == N_PROMPTS
    prompts = {p["example_id"]: p["prompt"] for p in preds}
    assert [r["reviews"] for r in body] == [prompts[r["example_id"]] for r in body]
    assert all(not r["reference"] for r in body)
    intervals = list(wb["Intervals"].iter_rows(values_only=True))
    assert {row[intervals[0].index("metric")] for row in intervals[1:]} >= set(CONTINUATION_METRICS)


def test_sharding_and_flags_without_text_dataset_are_refused(tiny_model_dirs, text_file, tmp_path):
    with pytest.raises(UsageError, match="--reward_model, --fluency_model score continuations .* pass --text_dataset"):
        ContinuationArguments(reward_model="m", fluency_model="f")
    with pytest.raises(UsageError, match="--judge_label pos names a class of --judge_classifier"):
        ContinuationArguments(text_dataset="t", judge_label="pos")
    with pytest.raises(UsageError, match="--completion_length 0,3: need 1 <= low <= high"):
        ContinuationArguments(text_dataset="t", completion_length="0,3")
    with pytest.raises(UsageError, match="--text_dataset runs in one process"):
        evaluation.main(*run_args(tiny_model_dirs, text_file, tmp_path / "out", "--num_shards", "2",
                                  "--shard_index", "0"))
    with pytest.raises(UsageError, match="--decision_classifier .* drop it with --text_dataset"):
        evaluation.main(*run_args(tiny_model_dirs, text_file, tmp_path / "out", "--decision_classifier", "c"))
    with pytest.raises(UsageError, match="a prompt of . tokens \\+ 5 new tokens exceeds 6 tokens"):
        evaluation.main(*run_args(tiny_model_dirs, text_file, tmp_path / "out", "--max_length", "6"))


# --- the positive rate reads the label asked for ------------------------------------------------------------------
@pytest.mark.parametrize("labels, winner", [(["negative", "positive"], 1), (["positive", "negative"], 0)])
def test_positive_rate_reads_the_asked_for_label(tmp_path, tiny_tokenizer, labels, winner):
    """'positive' always wins, whichever index it has: the rate read at 'positive' is 1, at 'negative' 0; the score
    is that class's built logit (+1 or -1), or its log-odds (+2 or -2)."""
    path = make_classifier(tmp_path / "c", tiny_tokenizer, labels, winner=winner)
    records = [{"prompt": p, "prediction": c, "system": "large", "ended_with_eos": False, "new_tokens": 2, "words": 2}
               for p, c in (("The paper", " is good"), ("Reject", " it now"), ("Strong", ""))]
    expected = {"positive": (True, 1.0, 2.0), "negative": (False, -1.0, -2.0)}
    for label, (positive, logit, log_odds) in expected.items():
        args = ContinuationArguments(text_dataset="t", reward_model=str(path), reward_label=label,
                                     judge_classifier=str(path), judge_label=label, reward_score="log_odds")
        reward, judge = load_classifiers(args, "cpu")
        read_classifier(reward, records, "reward", with_score=True)
        read_classifier(judge, records, "judge", with_score=False)
        assert [r["reward_positive"] for r in records] == [positive] * 3
        assert [r["judge_positive"] for r in records] == [positive] * 3
        assert [r["reward_score"] for r in records] == pytest.approx([log_odds] * 3)
        summary = summarize_continuations(records, ["large"], 3, 20, 0.95, 0)["large"]
        assert summary["reward_positive_rate"]["mean"] == summary["judge_positive_rate"]["mean"] == float(positive)
        assert summary["reward_score"]["mean"] == pytest.approx(log_odds)
        logit_reward = load_reward_model(str(path), label, "logit", "full")
        assert logit_reward.scores(["any text"]) == pytest.approx([logit])
    args = ContinuationArguments(text_dataset="t", judge_classifier=str(path), judge_label="happy")
    with pytest.raises(UsageError, match="--judge_classifier .* no label 'happy' .* as --judge_label"):
        load_classifiers(args, "cpu")
    with pytest.raises(UsageError, match="pass --judge_label"):
        load_classifiers(ContinuationArguments(text_dataset="t", judge_classifier=str(path)), "cpu")


# --- distinct-n ------------------------------------------------------------------------------------------------------
def test_distinct_n_against_a_hand_count():
    """'the cat sat', 'the cat ran', '': unigrams the, cat, sat, the, cat, ran: 4 distinct of 6; bigrams (the cat),
    (cat sat), (the cat), (cat ran): 3 of 4; trigrams: 2 of 2. Shares of unigrams: the and cat occur twice (1/2 each),
    sat and ran once: text 0 holds 1/2 + 1/2 + 1 = 2, text 1 also 2, text 2 nothing."""
    import numpy as np

    texts = ["the cat sat", "the cat ran", ""]
    assert [distinct_n(texts, n) for n in (1, 2, 3)] == pytest.approx([4 / 6, 3 / 4, 1.0])
    shares, counts = distinct_shares(texts, 1)
    assert shares == pytest.approx([2.0, 2.0, 0.0]) and counts == [3, 3, 0]
    stat = ratio_statistic(np.array(shares), np.array(counts, dtype=float))
    # Resamples: (0, 0, 1) -> (2 + 2 + 2) / 9; (2, 2, 2) has no n-gram -> 0, as distinct_n of no text.
    assert stat(np.array([[0, 1, 2], [0, 0, 1], [2, 2, 2]])) == pytest.approx([4 / 6, 6 / 9, 0.0])
    records = [{"system": "s", "prompt": "p", "prediction": t, "ended_with_eos": k == 2, "new_tokens": len(t.split()),
                "words": len(t.split())} for k, t in enumerate(texts)]
    summary = summarize_continuations(records, ["s"], 3, 200, 0.9, 0)["s"]
    assert [summary[f"distinct_{n}"]["mean"] for n in (1, 2, 3)] == pytest.approx([4 / 6, 3 / 4, 1.0])
    assert summary["eos_share"]["mean"] == pytest.approx(1 / 3) and summary["words"]["mean"] == pytest.approx(2.0)
    assert "reward_positive_rate" not in summary and "fluency_perplexity" not in summary


# --- fluency ---------------------------------------------------------------------------------------------------------
def test_fluency_perplexity_equals_a_float64_hand_computation(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    model = make_tiny_model(vocab, seed=5, padded_vocab=vocab + 12)
    records = [{"prompt": "The paper", "prediction": " is clearly written and the results are strong."},
               {"prompt": "Reject", "prediction": ""},
               {"prompt": "Strong results", "prediction": " overall"}]
    score_fluency(model, tiny_tokenizer, records, batch_size=2)
    reference = copy.deepcopy(model).double()
    for rec in records:
        p = tiny_tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
        c = tiny_tokenizer(rec["prediction"], add_special_tokens=False)["input_ids"]
        assert rec["fluency_tokens"] == len(c)
        if not c:
            assert rec["fluency_perplexity"] is None and rec["fluency_nll"] is None
            continue
        with torch.no_grad():
            logits = reference(torch.tensor([p + c])).logits[0, :, :vocab]  # (T, V) float64, the tokenizer's rows
        logp = logits.log_softmax(-1)
        nll = -sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c))  # position k predicts token k + 1
        assert rec["fluency_nll"] == pytest.approx(nll, rel=1e-5)
        assert rec["fluency_perplexity"] == pytest.approx(math.exp(nll / len(c)), rel=1e-5)
