"""Does a meta-review state the right decision? Train a meta-review -> decision classifier on the real MReD data
(`fine_tune.py --task classification`), report its test accuracy and macro-F1 against the majority-class rate, then
report decision consistency (evaluation.py's metric) for every system the offline lab evaluated, from the lab's own
predictions (no generation here). Records both tables in bench/RESULTS.md.

    python bench/bench_decision.py                   # from the lab's pretrained L; a few minutes on 2 CPU cores
    python bench/bench_decision.py --init scratch    # a fresh GPT-NeoX of L's shape instead
    python bench/bench_decision.py --ci --no_record  # smoke run: fresh tiny model, 48 papers, 1 epoch (seconds)

The data are processed exactly as the lab's (bench/steering_lab.py via commands.sh: the lab's 8k tokenizer, max_length
512, 10% validation, 15% test, seed 42), so the test papers are the lab's test papers and its predictions join by
example_id; the decision comes from the source file (processing_meta_review.py keeps it, normalised to accept/reject).
The lab lives in /work/main/outputs/lab (--lab); without it the bench trains from scratch with the Pythia tokenizer and
skips the consistency table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, record  # noqa: E402

import fine_tune
import processing_meta_review
from proxytune.evaluation.scores import decision_consistency
from proxytune.foundation.config import parse_config
from proxytune.foundation.statistics import bootstrap_interval, resample_indices
from proxytune.task.arguments import ProcessingArguments
from proxytune.training import classification as classify
from proxytune.training.arguments import parse_args

SHARED = ROOT.parent / "shared"
MRED = SHARED / "data" / "meta_review" / "mred_val_longest.jsonl"
PYTHIA_TOKENIZER = SHARED / "tokenizers" / "pythia"
DEFAULT_LAB = Path("/work/main/outputs/lab")
# The lab's processing (its commands.sh) and L's shape (bench/steering_lab.py, profile full).
LAB_PROCESSING = ["--max_length", "512", "--validation_split_percentage", "10", "--test_split_percentage", "15",
                  "--seed", "42"]
L_SHAPE = "hidden_size=256,num_hidden_layers=4,num_attention_heads=4,intermediate_size=1024,max_position_embeddings=512"


def lab_predictions(lab: Path) -> dict[str, list[dict]]:
    """{system: records} of every evaluation the lab ran on its test split; the runs that evaluate one blend as
    'steered' are named after their directory (eval/test/tuned_blend -> 'steered (tuned_blend)')."""
    out: dict[str, list[dict]] = {}
    paths = sorted((lab / "eval" / "test").glob("*/predictions.jsonl"), key=lambda p: (p.parent.name != "main", p))
    for path in paths:
        for rec in map(json.loads, path.read_text(encoding="utf-8").splitlines()):
            name = rec["system"] if path.parent.name == "main" else f"{rec['system']} ({path.parent.name})"
            out.setdefault(name, []).append(rec)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=Path, default=DEFAULT_LAB)
    parser.add_argument("--init", choices=["lab", "scratch"], default="lab", help="Start from the lab's L, or fresh.")
    parser.add_argument("--epochs", type=float, default=6)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--max_length", type=int, default=384, help="Meta-review tokens: p95 is 324 with the lab BPE.")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bootstrap_samples", type=int, default=1000)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "bench_decision",
                        help="Processed data and the classifier (final/: pass it to evaluation.py "
                        "--decision_classifier); replaced on every run. --ci uses a temporary directory.")
    parser.add_argument("--no_record", action="store_true")
    parser.add_argument("--ci", action="store_true", help="Fresh tiny model, 48 papers, 1 epoch, no record.")
    args = parser.parse_args()
    if not MRED.is_file():
        sys.exit(f"needs {MRED} (../shared beside the repo)")
    import torch

    torch.set_num_threads(args.threads)

    has_lab = (args.lab / "large" / "final").is_dir() and (args.lab / "tokenizer").is_dir()
    if args.ci or not has_lab:
        args.init = "scratch"
    tokenizer = args.lab / "tokenizer" if has_lab else PYTHIA_TOKENIZER
    quiet = ["--disable_tqdm", "true", "--report_to", "none", "--dataloader_num_workers", "0"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch) if args.ci else args.output_dir
        if tmp.exists():
            shutil.rmtree(tmp)
        data = tmp / "data"
        processing_meta_review.main(*parse_config([ProcessingArguments], [
            "--dataset_name", str(MRED), "--tokenizer_name", str(tokenizer), *LAB_PROCESSING,
            "--output_dir", str(data)]))
        model = (["--model_name_or_path", str(args.lab / "large" / "final")] if args.init == "lab" else
                 ["--config_name", "tiny" if args.ci else "pythia-14m", "--config_overrides",
                  "max_position_embeddings=512" if args.ci else L_SHAPE])
        small = ["--max_train_samples", "48"] if args.ci else []
        epochs = 1.0 if args.ci else args.epochs
        result = fine_tune.main(*parse_args([
            *model, "--tokenizer_name", str(tokenizer), "--dataset_path", str(data), "--task", "classification",
            "--label_column", "decision", "--classification_input", "meta_review", "--class_weights", "balanced",
            "--max_length", str(args.max_length), "--num_train_epochs", str(epochs),
            "--learning_rate", str(args.learning_rate), "--warmup_steps", "0.1", "--weight_decay", "0.01",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--eval_strategy", "epoch",
            "--save_strategy", "epoch", "--metric_for_best_model", "eval_macro_f1", "--greater_is_better", "true",
            "--do_predict", "--seed", "42", "--output_dir", str(tmp / "classifier"), *small, *quiet]))
        final = Path(result["final_dir"])
        m = result["metrics"]
        train_seconds = time.perf_counter() - started
        clf, clf_tok, info = classify.load_classifier(final, device="cpu")
        import datasets

        test = datasets.load_from_disk(str(data))["test"]
        decision_of = dict(zip(test["example_id"], test["decision"]))
        # Paired bootstrap of accuracy against the majority rate on the test papers.
        import numpy as np

        said = classify.predict(clf, clf_tok, info, list(test["Output"]))
        truth = list(test["decision"])
        counts = info["train_label_counts"]
        majority = max(counts, key=counts.get)
        idx = resample_indices(len(truth), args.bootstrap_samples, 42)
        hit = np.array([float(s == t) for s, t in zip(said, truth)])
        base = np.array([float(t == majority) for t in truth])
        conf = 0.95
        acc = bootstrap_interval(lambda ix: hit[ix].mean(-1), idx, conf)
        margin = bootstrap_interval(lambda ix: (hit - base)[ix].mean(-1), idx, conf)
        if abs(acc["mean"] - m["test_accuracy"]) > 1e-9:  # classify.predict and the Trainer batch differently
            print(f"warning: predict() gives accuracy {acc['mean']:.4f}, the Trainer {m['test_accuracy']:.4f}")
        beats = margin["ci_low"] > 0
        from scipy.stats import binomtest

        # McNemar's exact test: of the papers where exactly one of the two is right, how many go to the classifier.
        only_clf, only_base = int(((hit == 1) & (base == 0)).sum()), int(((hit == 0) & (base == 1)).sum())
        p_value = binomtest(only_clf, only_clf + only_base).pvalue if only_clf + only_base else 1.0
        start = f"the lab's pretrained L ({args.lab / 'large' / 'final'})" if args.init == "lab" else \
            ("a fresh tiny GPT-NeoX" if args.ci else "a fresh GPT-NeoX of L's shape")
        table = [("classifier (best epoch by validation macro-F1)", len(truth), f"{m['test_accuracy']:.3f} "
                  f"[{acc['ci_low']:.3f}, {acc['ci_high']:.3f}]", f"{m['test_macro_f1']:.3f}"),
                 (f"majority class '{majority}'", len(truth), f"{m['test_majority_rate']:.3f}", "-"),
                 ("accuracy - majority (paired)", len(truth), f"**{margin['mean']:+.3f}** [{margin['ci_low']:+.3f}, "
                  f"{margin['ci_high']:+.3f}]", "-")]
        for row in table:
            print(" | ".join(map(str, row)))
        ahead = margin["mean"] > 0
        verdict = (f"{'beats' if ahead else 'does NOT beat'} the majority-class rate by {margin['mean']:+.3f} "
                   f"({'and' if beats else 'but'} the paired 95% bootstrap interval of the margin "
                   f"{'lies above 0' if beats else 'reaches 0 or below'}; McNemar's exact test: {only_clf} papers "
                   f"only the classifier gets right, {only_base} only the majority guess, p = {p_value:.3f})")
        notes = (f"Meta-review -> decision classifier trained with `fine_tune.py --task classification --label_column "
                 f"decision --classification_input meta_review --class_weights balanced` from {start}: "
                 f"{len(test)} test papers of the lab's split (test split of mred_val_longest.jsonl, lab processing), "
                 f"train {result['metrics']['train_examples']} / validation {result['metrics']['validation_examples']} "
                 f"papers, labels {counts}; max_length {args.max_length}, lr {args.learning_rate:g}, "
                 f"{epochs:g} epochs, batch 8, class weights balanced, the epoch with the best validation macro-F1 "
                 f"kept ({Path(str(m.get('best_checkpoint'))).name}, {m['global_step']} steps in all); "
                 f"{train_seconds / 60:.1f} min with --threads "
                 f"{args.threads}. Test confusion matrix (rows true {info['labels']}, columns predicted): "
                 f"{m['test_confusion_matrix']}. The classifier {verdict}.")
        print(notes)
        if not args.no_record:
            record("Decision classifier on MReD meta-reviews (fine_tune.py --task classification)", table,
                   ("predictor", "test papers", "accuracy [95% CI]", "macro-F1"), notes)
        if args.ci or not has_lab:
            print("decision consistency: skipped (no lab predictions)" if not args.ci else "")
            return
        systems = lab_predictions(args.lab)
        order = list(test["example_id"])
        rows = []
        missing = {s: sum(r["example_id"] not in decision_of for r in recs) for s, recs in systems.items()}
        if any(missing.values()):
            sys.exit(f"lab predictions without a test paper of this split: {missing}; the lab's data changed")
        predicted = {}
        for system, recs in systems.items():
            by_id = {r["example_id"]: r for r in recs}
            ids = [eid for eid in order if eid in by_id]
            if ids != order:
                sys.exit(f"{system}: the lab evaluated {len(ids)} of the {len(order)} test papers")
            predicted[system] = classify.predict(clf, clf_tok, info, [by_id[eid]["prediction"] for eid in order])
        references = said
        result = decision_consistency(predicted, references, truth, info, idx, conf)
        for system, s in result["systems"].items():
            rows.append((system, len(order), f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]",
                         f"{sum(p == majority for p in predicted[system]) / len(order):.2f}"))
        c, f = result["ceiling"], result["floor"]
        above = [s for s, v in result["systems"].items() if v["ci_low"] > f["mean"]]
        below = [s for s, v in result["systems"].items() if v["ci_high"] < f["mean"]]
        rows.append(("ceiling: reference meta-reviews", len(order), f"**{c['mean']:.3f}** [{c['ci_low']:.3f}, "
                     f"{c['ci_high']:.3f}]", f"{sum(p == majority for p in references) / len(order):.2f}"))
        rows.append((f"floor: always '{f['class']}'", len(order), f"{f['mean']:.3f}", "1.00"))
        for row in rows:
            print(" | ".join(map(str, row)))
        notes2 = (f"The classifier above reads each of the lab's generated meta-reviews ({args.lab}/eval/test/*/"
                  f"predictions.jsonl: greedy, 128 new tokens; joined to the papers' real decisions by example_id, all "
                  f"{len(order)} papers matched, none without a decision); decision consistency = share of papers "
                  f"whose generated meta-review it reads as the real decision (evaluation.py --decision_classifier's "
                  f"metric), 95% bootstrap intervals over the papers, {args.bootstrap_samples} resamples shared by all "
                  f"rows. 'share {majority}' is how often the classifier answered the majority class: a system near "
                  f"the floor with share 1.00 says nothing the classifier can read. Systems whose interval lies above "
                  f"the floor ({f['mean']:.3f}): {', '.join(above) or 'none'}; below it: {', '.join(below) or 'none'}. "
                  f"The ceiling is only {c['mean']:.3f} (the classifier's own accuracy), and "
                  + ("its margin over the majority rate is clear." if beats else
                     "its margin over the majority rate is not clear at 95%, so read these shares as a rough signal."))
        print(notes2)
        if not args.no_record:
            record("Decision consistency of the lab's systems (evaluation.py's metric, lab predictions)", rows,
                   ("system", "papers", "decision consistency [95% CI]", f"share '{majority}'"), notes2)
    print(f"total {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
