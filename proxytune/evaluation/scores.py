"""Scoring the outputs: ROUGE, repetition, decision consistency, and the summary with bootstrap intervals."""

from __future__ import annotations

import warnings
from typing import Any

from proxytune.evaluation.arguments import OutputArguments
from proxytune.foundation.errors import UsageError
from proxytune.foundation.statistics import bootstrap_interval, resample_indices
from proxytune.task.text_metrics import ROUGE_TYPES, make_rouge_scorer, repetition_rate, score_rouge
from proxytune.training.classification import load_classifier, predict

SUMMARY_METRICS = (*ROUGE_TYPES, "words", "repetition", "eos_share", "perplexity", "decision_consistency")


def score_records(records: list[dict], references: dict[str, str], repetition_ngram: int) -> None:
    """Add rouge*, words and repetition to every record (in place)."""
    scorer = make_rouge_scorer()
    for rec in records:
        rec.update(score_rouge(scorer, rec["prediction"], references[rec["example_id"]]))
        rec["words"] = len(rec["prediction"].split())
        rec["repetition"] = repetition_rate(rec["prediction"], repetition_ngram)


def summarize(records: list[dict], systems: list[str], n_examples: int, samples: int, confidence: float,
              seed: int) -> dict[str, dict[str, Any]]:
    """{system: {metric: {mean, ci_low, ci_high}}} with a percentile bootstrap over examples.

    The same resampled example sets serve every system and metric, so intervals are paired. Perplexity
    is corpus-level: exp(total NLL / total tokens), resampled the same way.
    """
    import numpy as np

    idx = resample_indices(n_examples, samples, seed)
    interval = lambda stat: bootstrap_interval(stat, idx, confidence)  # noqa: E731
    out = {}
    for system in systems:
        recs = [r for r in records if r["system"] == system]
        summary: dict[str, Any] = {"n": len(recs)}
        for metric in (*ROUGE_TYPES, "words", "repetition", "ended_with_eos"):
            values = np.array([float(r[metric]) for r in recs])
            summary["eos_share" if metric == "ended_with_eos" else metric] = interval(lambda ix: values[ix].mean(-1))
        if all(r.get("nll") is not None for r in recs):
            nll = np.array([r["nll"] for r in recs])
            tokens = np.array([r["target_tokens"] for r in recs], dtype=float)
            summary["perplexity"] = interval(lambda ix: np.exp(nll[ix].sum(-1) / tokens[ix].sum(-1)))
            summary["reference_tokens"] = int(tokens.sum())  # every reference token is scored (build_inputs)
        out[system] = summary
    return out


def check_decisions(examples: list[dict], info: dict, classifier: str, source: str) -> None:
    """Before generating: the classifier predicts decisions, the papers have some, and none the classifier was not
    trained on (it could never match them)."""
    if info.get("task") != "classification" or info.get("classification_input") != "meta_review":
        raise UsageError(f"--decision_classifier {classifier} is a {info.get('task')} model of the "
                         f"{info.get('classification_input')}; decision consistency needs a classifier of meta-reviews "
                         "(fine_tune.py --task classification --classification_input meta_review)")
    decisions = [ex["decision"] for ex in examples if ex["decision"] is not None]
    if not decisions:
        raise UsageError(f"--decision_classifier needs the papers' decisions, but {source} has none; re-run "
                         "processing_meta_review.py (it keeps decision), pass a file with that column, or set "
                         "--decision_column")
    unseen = sorted(set(decisions) - set(info["labels"]))
    if unseen:
        raise UsageError(f"papers have decisions {unseen} that --decision_classifier {classifier} was not trained on "
                         f"(its labels: {', '.join(info['labels'])}); train it on data with these labels, or evaluate "
                         "papers it knows")


def decision_consistency(predicted: dict[str, list[str]], references: list[str], decisions: list[str | None],
                         info: dict, idx, confidence: float) -> dict[str, Any]:
    """Per system, the share of papers whose generated meta-review the classifier reads as the paper's real decision,
    with bootstrap intervals over the papers (resamples `idx`, shared with the other metrics); beside it the ceiling
    (the classifier's accuracy on the reference meta-reviews) and the floor (the rate of always answering the
    classifier's majority training class). Papers without a decision (None) count in no share.

    `predicted` = {system: [decision per paper]}, `references` = the classifier's decision for each reference,
    `decisions` = the papers' real ones, all in paper order.
    """
    import numpy as np

    known = np.array([d is not None for d in decisions])

    def share_of(labels: list[str]):
        hits = np.array([float(p == d) for p, d in zip(labels, decisions)])
        hits[~known] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample of unlabelled papers only: NaN, left out
            return bootstrap_interval(lambda ix: np.nanmean(hits[ix], -1), idx, confidence)

    counts = info["train_label_counts"]
    majority = max(counts, key=counts.get)
    return {"systems": {s: share_of(labels) for s, labels in predicted.items()},
            "ceiling": share_of(references),
            "floor": {**share_of([majority] * len(decisions)), "class": majority},
            "n_labelled": int(known.sum()), "n_unlabelled": int((~known).sum())}


def score_decisions(records: list[dict], examples: list[dict], systems: list[str], out_args: OutputArguments,
                    summary: dict, seed: int, device: str | None = None) -> dict[str, Any]:
    """Classify every generated and reference meta-review with --decision_classifier; add `predicted_decision` to the
    records and `decision_consistency` to each system's summary. Returns metrics.json's `decision_consistency`."""

    model, tokenizer, info = load_classifier(out_args.decision_classifier, device=device)
    order = sorted(examples, key=lambda e: e["position"])
    check_decisions(order, info, out_args.decision_classifier, "the evaluated examples")
    decisions = [e["decision"] for e in order]
    references = predict(model, tokenizer, info, [e["reference"] for e in order])
    by_key = {(r["example_id"], r["system"]): r for r in records}
    predicted = {}
    for system in systems:
        recs = [by_key[(e["example_id"], system)] for e in order]
        predicted[system] = predict(model, tokenizer, info, [r["prediction"] for r in recs])
        for rec, label in zip(recs, predicted[system]):
            rec["predicted_decision"] = label
    idx = resample_indices(len(order), out_args.bootstrap_samples, seed)
    result = decision_consistency(predicted, references, decisions, info, idx, out_args.confidence)
    for system in systems:
        summary[system]["decision_consistency"] = result["systems"][system]
    return {"classifier": out_args.decision_classifier, "label_column": info["label_column"],
            "labels": info["labels"], **result}
