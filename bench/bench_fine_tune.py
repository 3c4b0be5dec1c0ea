"""Fine-tuning throughput, side by side in one run: fine_tune.py's trainer vs (a) every example padded to max_length
as the original project did and (b) TRL's SFTTrainer on the same prompt/completion data. Random weights with the
real Pythia-70m shape, float32 on CPU, the real Pythia tokenizer and real meta-review examples (MReD validation
rows with the longest reviews) made by processing_meta_review.py's own functions.

    python bench/bench_fine_tune.py                 # 70m shape, max_length 1024, batch 4, 8 timed steps; records
    python bench/bench_fine_tune.py --systems ours padded --max_length 2048   # vs (a) at fine_tune.py's default
    python bench/bench_fine_tune.py --ci            # tiny shape, 8 examples, 2 steps, max_length 128, no record

The full run takes ~25 min on 2 shared CPU cores, TRL's two runs most of it (on CPU its chunked LM head scores
every position and recomputes the projection in backward).

Metric: loss-bearing tokens (labels != -100: the meta-review and its EOS), counted in the batches each system
actually trained on, per second of training wall time. Every system trains one epoch over the same examples with
the same batch size, steps, learning rate, schedule and optimizer, after one untimed warm-up step (same model, same
optimizer), each in a fresh process with the same seeded random weights. The machine is shared, so the CPU time
of the training process is reported beside the wall time: its ratios are the ones other processes disturb least.
Targets (performance issue): fine_tune.py >= 2x (a) and >= 1.0x (b) with matched settings; (b) with TRL's own
defaults is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, random_model, record, timeit  # noqa: E402

from proxytune.models.loading import load_tokenizer
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.processing import tokenize_example
from proxytune.task.reviews import clean_rows
from proxytune.task.sources import load_raw_dataset
from proxytune.training.arguments import FineTuneTrainingArguments
from proxytune.training.data import CausalLMCollator, PreparedData, to_training_features
from proxytune.training.tasks import build_trainer

SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "meta_review" / "mred_val_longest.jsonl"
TOKENIZER = SHARED / "tokenizers" / "pythia"
IGNORE_INDEX = -100
# Settings every system but "TRL defaults" shares: fine_tune.py's own defaults.
LEARNING_RATE = 1e-4
LR_SCHEDULER = "cosine"
WARMUP = 0.05
SEED = 42
SYSTEMS = {
    "ours": "fine_tune.py (dynamic padding, length-grouped batches, logits from the first labelled position on)",
    "padded": "(a) original: padding to max_length, random order, full logits, same Trainer",
    "trl_matched": "(b) TRL SFTTrainer, matched (fp32, no gradient checkpointing, same lr/schedule, no packing)",
    "trl_defaults": "(b) TRL SFTTrainer, SFTConfig defaults (bf16=False, see notes)",
}
TARGETS = {"padded": ">= 2", "trl_matched": ">= 1.0", "trl_defaults": "(reported)"}


# ---------------------------------------------------------------------------------------------
# Data: the examples fine_tune.py would train on
# ---------------------------------------------------------------------------------------------
def load_examples(n_examples: int, max_length: int) -> list[dict]:
    """The first `n_examples` rows of DATA (file order) that fit `max_length`, made by processing_meta_review.py's
    own functions as fine_tune.py's data is: cleaned, prompt = the reviews cut to fit, ids = prompt + " " +
    meta-review + EOS. (Rows whose meta-review alone exceeds max_length are skipped, as processing drops them.)"""

    tokenizer = load_tokenizer(str(TOKENIZER))
    tokenizer.model_max_length = int(1e30)  # long reviews are measured whole before they are cut, as processing does
    pargs = ProcessingArguments(dataset_name=str(DATA), tokenizer_name=str(TOKENIZER), max_length=max_length)
    raw = load_raw_dataset(pargs)["train"].to_list()
    rows = []
    for row in clean_rows(raw, pargs.input_column, pargs.output_column, pargs, set(), {}):
        example = tokenize_example(row, tokenizer, max_length)
        if example is not None:
            rows.append({"prompt": example["prompt"], "Output": example["Output"],
                         "input_ids": example["input_ids"], "prompt_length": example["prompt_length"]})
        if len(rows) == n_examples:
            return rows
    raise SystemExit(f"only {len(rows)} examples of {DATA} fit max_length {max_length}; need {n_examples}")


# ---------------------------------------------------------------------------------------------
# Trainers: one builder per system, all from the same rows
# ---------------------------------------------------------------------------------------------
def project_features(rows: list[dict]):
    """fine_tune.py's training features (input_ids, labels with the prompt masked, length)."""
    import datasets


    split = datasets.Dataset.from_list([{"input_ids": r["input_ids"], "prompt_length": r["prompt_length"]}
                                        for r in rows])
    return to_training_features(split, "meta_review")


def project_args(out: str, batch: int, steps: int, sampling: str):
    return FineTuneTrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=LEARNING_RATE,
        lr_scheduler_type=LR_SCHEDULER, warmup_steps=WARMUP, eval_strategy="no", save_strategy="no",
        report_to="none", seed=SEED, train_sampling_strategy=sampling, disable_tqdm=True,
    )


def build_ours(model, tokenizer, rows, out, batch, steps, max_length):
    """proxytune.training.tasks.build_trainer itself: LMTrainer, CausalLMCollator, length-grouped sampler."""

    data = PreparedData(project_features(rows), project_features(rows[:0]), [], "meta_review", "bench")
    return build_trainer(model, tokenizer, data, project_args(out, batch, steps, "group_by_length"))


def build_padded(model, tokenizer, rows, out, batch, steps, max_length):
    """The original project's batching through the same Trainer: padding="max_length" (the collator rounds every
    batch up to a multiple of max_length, i.e. to max_length), random order, and the plain Trainer's loss over
    the full (B, max_length, V) logits (LMTrainer's base class, without trim_to_label_logits)."""
    from transformers import Trainer


    return Trainer(model=model, args=project_args(out, batch, steps, "random"),
                   data_collator=CausalLMCollator(tokenizer.pad_token_id, pad_to_multiple_of=max_length),
                   train_dataset=project_features(rows), processing_class=tokenizer)


def trl_dataset(rows):
    """TRL's prompt/completion format from the same processed rows. TRL appends EOS to the completion and, with
    completion_only_loss (its default for this format), masks the prompt."""
    import datasets

    return datasets.Dataset.from_dict({"prompt": [r["prompt"] for r in rows],
                                       "completion": [" " + r["Output"] for r in rows]})


def build_trl_matched(model, tokenizer, rows, out, batch, steps, max_length):
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=batch, max_length=max_length, packing=False,
        gradient_checkpointing=False, bf16=False, learning_rate=LEARNING_RATE, lr_scheduler_type=LR_SCHEDULER,
        warmup_steps=WARMUP, save_strategy="no", report_to="none", seed=SEED, dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    return SFTTrainer(model=model, args=config, train_dataset=trl_dataset(rows), processing_class=tokenizer)


def build_trl_defaults(model, tokenizer, rows, out, batch, steps, max_length):
    """SFTConfig's defaults but for output_dir, steps, batch, max_length and bf16: its default bf16=True is refused
    on a machine without a GPU ("Your setup doesn't support bf16/gpu"), and forced with use_cpu=True it autocasts
    every matmul to bf16, which this CPU has no instructions for (the notes give the measured slowdown)."""
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, max_length=max_length,
                       bf16=False, disable_tqdm=True)
    return SFTTrainer(model=model, args=config, train_dataset=trl_dataset(rows), processing_class=tokenizer)


BUILDERS = {"ours": build_ours, "padded": build_padded, "trl_matched": build_trl_matched,
            "trl_defaults": build_trl_defaults}


class CountingCollator:
    """Wraps a trainer's collator; counts the label tokens and the positions (incl. padding) of every batch."""

    def __init__(self, inner):
        self.inner, self.batches, self.label_tokens, self.positions = inner, 0, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        labels = batch["labels"]  # (B, T)
        self.batches += 1
        self.label_tokens += int((labels != IGNORE_INDEX).sum())
        self.positions += labels.numel()
        return batch


def step_timer():
    """A callback that marks wall and process CPU time at the start of training and at the end of every step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), time.process_time())]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

    return StepTimer()


def describe(trainer) -> str:
    """The settings that decide the cost of a step, as the trainer resolved them."""
    a = trainer.args
    return (f"{'bf16 autocast' if a.bf16 else 'fp32'}, {'' if a.activation_checkpointing else 'no '}checkpointing, "
            f"{a.train_sampling_strategy} order, lr {a.learning_rate:g} {a.lr_scheduler_type.value}, {a.optim.value}")


def run_one(system: str, rows: list[dict], shape: str, batch: int, steps: int, max_length: int) -> dict:
    """Warm up one step, then time `steps` steps over all rows (one epoch), on a fresh seeded model."""
    import torch


    tokenizer = load_tokenizer(str(TOKENIZER))
    model = random_model(shape, seed=SEED).train()
    build = BUILDERS[system]
    with tempfile.TemporaryDirectory() as out:
        warm = build(model, tokenizer, rows[:batch], out, batch, 1, max_length)
        warm.train()
        # TRL patches model.forward with its fused LM head in every SFTTrainer; drop the first patch so the timed
        # trainer wraps the model's own forward once, as in a normal run.
        model.__dict__.pop("forward", None)
        timed = build(model, tokenizer, rows, out, batch, steps, max_length)
        # Reuse the warmed-up optimizer: its state (Adam moments) is allocated on the first step, a one-off cost.
        timed.optimizer = getattr(warm.optimizer, "optimizer", warm.optimizer)
        counter = CountingCollator(timed.data_collator)
        timed.data_collator = counter
        timer = step_timer()
        timed.add_callback(timer)
        timed.train()
    (wall0, cpu0), (wall1, cpu1) = timer.marks[0], timer.marks[-1]
    return {"system": system, "seconds": wall1 - wall0, "cpu_seconds": cpu1 - cpu0, "steps": len(timer.marks) - 1,
            "step_seconds": [round(b[0] - a[0], 2) for a, b in zip(timer.marks, timer.marks[1:])],
            "batches": counter.batches, "label_tokens": counter.label_tokens, "positions": counter.positions,
            "threads": torch.get_num_threads(), "settings": describe(timed)}


def run_system(system: str, rows: list[dict], args, tmp: Path) -> dict:
    """One system in a fresh process (in this one with --ci: the interpreter start-up would dominate)."""
    if args.ci:
        out = run_one(system, rows, args.shape, args.batch, args.steps, args.max_length)
    else:
        rows_path = tmp / "rows.json"
        if not rows_path.exists():
            rows_path.write_text(json.dumps(rows), encoding="utf-8")
        cmd = [sys.executable, __file__, "--_child", system, "--_rows", str(rows_path), "--shape", args.shape,
               "--batch", str(args.batch), "--steps", str(args.steps), "--max_length", str(args.max_length)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{system} failed:\n{res.stderr[-4000:]}")
        out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["steps"] != args.steps or out["batches"] != args.steps:
        raise SystemExit(f"{system}: {out['steps']} steps over {out['batches']} batches; expected {args.steps} each")
    out["tokens_per_s"] = out["label_tokens"] / out["seconds"]
    out["tokens_per_cpu_s"] = out["label_tokens"] / out["cpu_seconds"]
    print(f"{system}: {out['label_tokens']} label tokens in {out['seconds']:.1f} s ({out['cpu_seconds']:.1f} CPU s); "
          f"steps {out['step_seconds']} s; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------
def bf16_matmul_slowdown() -> float:
    """How much slower a (16, 512) x (512, 50,304) matmul (an LM head's shape) is in bf16 than in fp32 here."""
    import torch

    a, w = torch.randn(16, 512), torch.randn(512, 50304)
    a16, w16 = a.bfloat16(), w.bfloat16()
    return timeit(lambda: torch.mm(a16, w16)) / timeit(lambda: torch.mm(a, w))


def table(results: dict[str, dict], steps: int) -> list[tuple]:
    ours = results["ours"]
    rows = []
    for system, r in results.items():
        wall = "" if system == "ours" else f"**{ours['tokens_per_s'] / r['tokens_per_s']:.2f}**"
        cpu = "" if system == "ours" else f"{ours['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}"
        rows.append((SYSTEMS[system], r["settings"], f"{r['label_tokens']:,}", f"{r['positions']:,}",
                     f"{r['seconds'] / steps:.1f} s", f"{r['tokens_per_s']:.1f}", wall, cpu, TARGETS.get(system, "")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="tiny shape, 8 examples, 2 steps, max_length 128, no record")
    parser.add_argument("--shape", default="pythia-70m")
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (one epoch of batch*steps rows)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--no_record", action="store_true")
    parser.add_argument("--_child", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--_rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        rows = json.loads(Path(args._rows).read_text(encoding="utf-8"))
        print(json.dumps(run_one(args._child, rows, args.shape, args.batch, args.steps, args.max_length)))
        return
    if args.ci:
        args.shape, args.max_length, args.batch, args.steps = "tiny", 128, 4, 2
    systems = ["ours"] + [s for s in args.systems if s != "ours"]
    rows = load_examples(args.batch * args.steps, args.max_length)
    lengths = [len(r["input_ids"]) for r in rows]
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = {system: run_system(system, rows, args, Path(tmp)) for system in systems}
    minutes = (time.perf_counter() - start) / 60
    load_after = os.getloadavg()
    counts = {s: r["label_tokens"] for s, r in results.items()}
    same = "the same in every system" if len(set(counts.values())) == 1 else f"DIFFER: {counts}"
    out = table(results, args.steps)
    header = ("system", "settings (as resolved)", "label tokens", "positions incl. padding", "wall time / step",
              "label tokens/s", "fine_tune.py / this (wall)", "(CPU time)", "target")
    title = (f"Fine-tuning throughput: {args.shape} shape, {len(rows)} real meta-review examples, max_length "
             f"{args.max_length}, batch {args.batch}, {args.steps} timed steps")
    notes = (
        f"Examples: the first {len(rows)} rows of `mred_val_longest.jsonl` that fit max_length {args.max_length} "
        f"(lengths min/mean/max {min(lengths)}/{sum(lengths) / len(lengths):.0f}/{max(lengths)} tokens; "
        f"loss-bearing share {results['ours']['label_tokens'] / sum(lengths):.0%}). Label tokens counted from the "
        f"batches each trainer built: {same}. One epoch each, {results['ours']['threads']} torch threads, after one "
        f"untimed warm-up step on the same model and optimizer; each system "
        f"{'in this process on a fresh model' if args.ci else 'in a fresh process'}. Wall time = on_train_begin to "
        f"the last on_step_end (data loading, forward, backward, optimizer step); CPU time = the training process's "
        f"over the same span."
    )
    if "trl_defaults" in results:
        notes += (f" TRL defaults other than those shown: max_length 1024, packing off, padding_free off, "
                  f"completion_only_loss on for prompt/completion data, logging every 10 steps; its default bf16=True "
                  f"is replaced by fp32 because a bf16 matmul on this CPU takes {bf16_matmul_slowdown():.1f}x the fp32 "
                  f"time (no native bf16).")
    if any(s.startswith("trl") for s in results):
        notes += (" TRL on CPU scores every position in its chunked LM head (it keeps only labelled positions on "
                  "CUDA/XPU with Triton) and recomputes the projection in backward.")
    notes += (f" Whole comparison {minutes:.1f} min; load average (1 min) {load_before[0]:.1f} before, "
              f"{load_after[0]:.1f} after, on {os.cpu_count()} cores shared with other jobs.")
    if args.ci or args.no_record:
        print("\n".join(" | ".join(str(c) for c in r) for r in out))
        print(notes)
    else:
        print(record(title, out, header, notes))


if __name__ == "__main__":
    main()
