"""A small learning-rate search for the offline lab's S_tuned stage (bench/steering_lab.py, profile `full`), on the real
MReD data, through `fine_tune.py --hp_search`; records the chosen rate and its validation loss against the lab's
default (finetune_lr_small) in bench/RESULTS.md.

    python bench/bench_hp_search.py                       # 3 rates around the lab's 1e-3; ~2-3 min on 2 CPU cores
    python bench/bench_hp_search.py --rates 1e-3 3e-3 --train_examples 16 --no_record   # a quicker look
    python bench/bench_hp_search.py --ci                  # smoke run: 2 rates, 8 papers, 1 epoch, no record

Scaled down to fit minutes on a CPU, and said so in the record: S is a FRESH GPT-NeoX of the lab's small shape
(hidden 96, 2 layers, 4 heads) with the Pythia tokenizer (the lab pretrains S on IMDB with its own 8k BPE first);
the lab's fine-tuning settings otherwise (max_length 512, batch 8, 2 epochs, cosine schedule), on --train_examples
papers, validation loss on --eval_examples held-out papers. Every trial starts from the same seeded weights.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, record  # noqa: E402
from steering_lab import PROFILES

import fine_tune
import processing_meta_review
from proxytune.foundation.config import parse_config
from proxytune.task.arguments import ProcessingArguments
from proxytune.training.arguments import parse_args

sys.path.insert(0, str(ROOT / "bench"))
SHARED = ROOT.parent / "shared"
MRED = SHARED / "data" / "meta_review" / "mred_val_longest.jsonl"
TOKENIZER = SHARED / "tokenizers" / "pythia"


def lab_settings() -> dict:
    """The lab's S_tuned settings (profile `full`), read from steering_lab.py rather than copied."""

    p = PROFILES["full"]
    return {"max_length": p.max_length, "batch": p.finetune_batch, "lr": p.finetune_lr_small, "shape": p.small,
            "epochs": p.finetune_epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="Default: lab's lr / 3, x 1, x 3.")
    parser.add_argument("--train_examples", type=int, default=48)
    parser.add_argument("--eval_examples", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=None, help="Default: the lab's (2).")
    parser.add_argument("--no_record", action="store_true")
    parser.add_argument("--ci", action="store_true", help="2 rates, 8 papers, 1 epoch, no record (under a minute).")
    args = parser.parse_args()
    if args.ci:
        args.train_examples, args.eval_examples, args.epochs, args.no_record = 8, 4, 1.0, True
    if not (MRED.is_file() and TOKENIZER.is_dir()):
        sys.exit(f"needs {MRED} and {TOKENIZER} (../shared beside the repo)")


    lab = lab_settings()
    args.epochs = args.epochs or lab["epochs"]
    rates = args.rates or ([lab["lr"], lab["lr"] * 3] if args.ci else [lab["lr"] / 3, lab["lr"], lab["lr"] * 3])
    if lab["lr"] not in rates:
        rates.append(lab["lr"])
    shape = lab["shape"]
    quiet = ["--disable_tqdm", "true", "--report_to", "none", "--dataloader_num_workers", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        t0 = time.perf_counter()
        processing_meta_review.main(*parse_config([ProcessingArguments], [
            "--dataset_name", str(MRED), "--tokenizer_name", str(TOKENIZER), "--max_length", str(lab["max_length"]),
            "--output_dir", str(data)]))
        space = tmp / "space.yaml"
        space.write_text(yaml.safe_dump({"parameters": {"learning_rate": rates, "epochs": args.epochs}}))
        out = tmp / "search"
        result = fine_tune.main(*parse_args([
            "--config_name", "pythia-14m", "--config_overrides", ",".join(f"{k}={v}" for k, v in shape.items()),
            "--tokenizer_name", str(TOKENIZER), "--dataset_path", str(data), "--max_length", str(lab["max_length"]),
            "--per_device_train_batch_size", str(lab["batch"]), "--per_device_eval_batch_size", "8",
            "--max_train_samples", str(args.train_examples), "--max_eval_samples", str(args.eval_examples),
            "--eval_strategy", "epoch", "--save_strategy", "epoch", "--num_samples", "0", "--seed", "42",
            "--hp_search", str(space), "--hp_pruner_startup_trials", "-1", "--output_dir", str(out), *quiet]))
        seconds = time.perf_counter() - t0
    trials = sorted(result["summary"]["trials"], key=lambda t: t["params"]["learning_rate"])
    best = result["best"]
    default = next(t for t in trials if t["params"]["learning_rate"] == lab["lr"])
    table = [(f"{t['params']['learning_rate']:g}", f"{t['objective']:.4f}" if t["objective"] is not None else "-",
              t["state"].lower(), t["seconds"],
              "chosen" if t["number"] == best["number"] else "lab default" if t is default else "") for t in trials]
    for row in table:
        print(" | ".join(map(str, row)))
    notes = (f"Chosen learning rate {best['params']['learning_rate']:g}: validation loss {best['objective']:.4f} "
             f"against {default['objective']:.4f} at the lab's default {lab['lr']:g} "
             f"({default['objective'] - best['objective']:+.4f} nats/token). Grid search ({len(rates)} points, Optuna "
             f"GridSampler, one worker, sqlite study) through `fine_tune.py --hp_search`; "
             f"{seconds / 60:.1f} min in all (processing included). Setting (scaled down, see "
             f"bench/bench_hp_search.py): fresh S of the lab's small shape {shape} with the Pythia tokenizer, the "
             f"lab's S_tuned settings (max_length {lab['max_length']}, batch {lab['batch']}, cosine), "
             f"{args.train_examples} MReD training papers, {args.epochs:g} epoch(s), "
             f"validation loss on {args.eval_examples} held-out papers (best epoch's).")
    print(notes)
    if not args.no_record:
        record("Learning-rate search for the lab's S_tuned stage (fine_tune.py --hp_search)", table,
               ("learning rate", "validation loss", "state", "seconds", ""), notes)


if __name__ == "__main__":
    main()
