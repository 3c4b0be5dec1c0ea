"""evaluation.py's outputs: predictions, summary, figure, table and the review workbook."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from proxytune.evaluation.arguments import OutputArguments
from proxytune.evaluation.scores import SUMMARY_METRICS, score_decisions, score_records, summarize
from proxytune.foundation.outputs import write_json
from proxytune.task.text_metrics import ROUGE_TYPES
from proxytune.workbook.judgments import export_judgments
from proxytune.workbook.writer import BookOptions, write_workbook

logger = logging.getLogger(__name__)


def write_jsonl_atomically(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def plot_systems(path: Path, summary: dict, metrics: tuple[str, ...] = ROUGE_TYPES, ylabel: str = "F1 x 100",
                 title: str = "ROUGE") -> None:
    """Grouped bars of `metrics` (default ROUGE) per system with the bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = list(summary)
    x = np.arange(len(systems))
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(systems), 4))
    for k, metric in enumerate(metrics):
        means = np.array([summary[s][metric]["mean"] for s in systems])
        err = np.array([[means[i] - summary[s][metric]["ci_low"], summary[s][metric]["ci_high"] - means[i]]
                        for i, s in enumerate(systems)]).T  # (2, n_systems)
        ax.bar(x + (k - (len(metrics) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=metric)
    ax.set_xticks(x, systems)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} per system (n = {summary[systems[0]]['n']}, bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def resolve_pairwise(spec: str, systems: list[str]) -> tuple[str, str] | None:
    """The two systems of the Pairwise sheet: `resolve_pairwise("auto", ["large", "steered"])` -> ("steered", "large").

    A named system that was not evaluated gives no Pairwise sheet (with a warning) rather than failing after the
    generation: the rest of the outputs are still written."""
    if spec == "none":
        return None
    if spec == "auto":
        return ("steered", "large") if {"steered", "large"} <= set(systems) else None
    pair = tuple(s.strip() for s in spec.split(","))
    missing = [s for s in pair if s not in systems]
    if missing:
        logger.warning("--pairwise %s: %s not evaluated, so the workbook has no Pairwise sheet", spec,
                       ", ".join(missing))
        return None
    return pair


def write_outputs(merged: dict, out_args: OutputArguments) -> dict:
    """Score the merged predictions and write the workbook (first: it is the file that can refuse), ratings.jsonl,
    metrics.json, predictions.jsonl, prompt_template.txt and the PNG. Returns metrics.json's content."""
    run_info = merged["run_info"]
    systems = list(run_info["systems"])
    examples = {e["example_id"]: e for e in merged["examples"]}
    position = {e["example_id"]: e["position"] for e in merged["examples"]}
    records = sorted(merged["records"], key=lambda r: (position[r["example_id"]], systems.index(r["system"])))
    score_records(records, {k: e["reference"] for k, e in examples.items()}, out_args.repetition_ngram)
    for rec in records:
        rec["perplexity"] = math.exp(rec["nll"] / rec["target_tokens"]) if rec.get("nll") is not None else None
    summary = summarize(records, systems, len(examples), out_args.bootstrap_samples, out_args.confidence,
                        run_info["seed"])
    decision = None
    if out_args.decision_classifier:
        decision = score_decisions(records, merged["examples"], systems, out_args, summary, run_info["seed"],
                                   run_info.get("device"))
        run_info = {**run_info, "decision_consistency": {k: decision[k] for k in ("classifier", "ceiling", "floor",
                                                                                    "n_labelled", "n_unlabelled")}}
    out_dir = Path(out_args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = BookOptions(review_chars=out_args.review_chars, pairwise=resolve_pairwise(out_args.pairwise, systems),
                          seed=run_info["seed"] if out_args.review_seed is None else out_args.review_seed,
                          bootstrap_samples=out_args.bootstrap_samples, confidence=out_args.confidence)
    book = write_workbook(out_args.workbook_path, records, merged["examples"], summary, run_info, options)
    export_judgments(book.judgments, out_dir / "ratings.jsonl")
    metrics = {"n_examples": len(examples), "systems": summary, "run": run_info,
               "human": {"review_seed": options.seed, "pairwise": options.pairwise, "systems": book.human,
                         "judgments": len(book.judgments.current), "kept": len(book.judgments.kept)},
               "notes": {"rouge": "F1 x 100, rouge-score with Porter stemming; rougeLsum on sentences split by a "
                         "regex (nltk punkt data is not available offline)",
                         "intervals": f"{out_args.confidence:.0%} percentile bootstrap over examples, "
                         f"{out_args.bootstrap_samples} resamples shared by all systems",
                         "repetition": f"share of repeated word {out_args.repetition_ngram}-grams",
                         "perplexity": "of the reference ' ' + meta-review + EOS given the prompt; corpus-level",
                         "human": "mean rating (1-5) and pairwise win rate (ties count half) from the workbook as "
                         "read at the start of this run, with bootstrap intervals over the judged examples"}}
    if decision is not None:
        metrics["decision_consistency"] = decision
        metrics["notes"]["decision_consistency"] = (
            "share of papers whose generated meta-review --decision_classifier reads as the paper's real decision; "
            "ceiling = its accuracy on the reference meta-reviews, floor = always its majority training class; papers "
            "without a decision are left out of all three (n_unlabelled), and the bootstrap resamples all papers")
    write_json(out_dir / "metrics.json", metrics)
    write_jsonl_atomically(out_dir / "predictions.jsonl",
                           [{**r, "reference": examples[r["example_id"]]["reference"]} for r in records])
    (out_dir / "prompt_template.txt").write_text(run_info["prompt_template"] + "\n", encoding="utf-8")
    plot_systems(out_dir / "rouge_by_system.png", summary)
    return metrics


def format_table(summary: dict, order: tuple[str, ...] = SUMMARY_METRICS) -> str:
    """The summary's metrics (those of `order` it has) as aligned text for the log."""
    metrics = [m for m in order if any(m in s for s in summary.values())]
    width = {m: max(10, len(m)) for m in metrics}
    lines = [f"{'system':<12} " + " ".join(f"{m:>{width[m]}}" for m in metrics)]
    for system, s in summary.items():
        lines.append(f"{system:<12} " + " ".join(f"{s[m]['mean']:>{width[m]}.3f}" if m in s else " " * width[m]
                                                 for m in metrics))
    return "\n".join(lines)
