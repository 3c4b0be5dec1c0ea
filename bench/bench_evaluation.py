"""Evaluation generation throughput, side by side in one run: `generate` in left-padded batches of 8
vs the same examples one at a time (batch 1, same settings). Random weights with the real Pythia-70m shape, the
real Pythia tokenizer and real prompts (MReD validation rows with the longest reviews), built by evaluation.py's
own helpers (load_examples, select_examples, build_inputs, resolve_decoding).

    python bench/bench_evaluation.py                # 70m shape, 16 examples, evaluation.py's default max_new_tokens
                                                    # (128), torch's default threads; records to bench/RESULTS.md
    python bench/bench_evaluation.py --examples 64  # a test split's worth (~20 min): less padding per batch
    python bench/bench_evaluation.py --threads 1    # the same on a machine shared with other jobs (see below)
    python bench/bench_evaluation.py --ci           # tiny shape, 4 examples, 4 new tokens, seconds, no record

Target (performance issue): examples/s batched / examples/s one at a time >= 3. Two more rows split the time
into the prompt pass (generate with 1 new token) and the decoding steps (the difference), to show where it goes.
On a busy machine torch's default (one thread per core) fights the other jobs: each op waits for a descheduled
thread and a batch-1 decoding step was ~10x slower than with --threads 1, which skews the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, TOKENIZER_VOCAB, random_model, record  # noqa: E402

from proxytune.evaluation import generation
from proxytune.evaluation.arguments import GenerationArguments
from proxytune.evaluation.generation import build_inputs, generate
from proxytune.evaluation.systems import resolve_decoding
from proxytune.models.loading import load_tokenizer
from proxytune.steering.decoding import model_context
from proxytune.task.papers import DataArguments, load_examples, select_examples

SHARED = ROOT.parent / "shared"
DATA = SHARED / "data" / "meta_review" / "mred_val_longest.jsonl"
TOKENIZER = SHARED / "tokenizers" / "pythia"
SYSTEM = "small_base"  # any single-model system; generate treats them alike
# An id among the output matrix's padding rows, which generate_batch suppresses: used as EOS it can
# never be emitted, so both runs decode exactly --new_tokens tokens for every example (random weights would
# otherwise stop at EOS at different steps and the comparison would not be like for like).
NEVER_EOS = TOKENIZER_VOCAB + 10


class NeverStoppingTokenizer:
    """The real tokenizer with `eos_token_id` swapped for NEVER_EOS; everything else is passed through."""

    eos_token_id = NEVER_EOS

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self) -> int:
        return len(self._tokenizer)


def load_prompts(tokenizer, model, n_examples: int, new_tokens: int, max_length: int, seed: int) -> list[dict]:
    """The examples evaluation.py would generate for: same sample, same prompt budget, same prompt ids."""

    rows = load_examples(DataArguments(dataset_path=str(DATA), split="validation"))
    examples = [rows[i] for i in select_examples(len(rows), n_examples, seed)]
    context = min(model_context({SYSTEM: model}), max_length)
    build_inputs(examples, tokenizer, context - new_tokens, context)
    return examples


@contextmanager
def counting_padding():
    """Count the pad positions of every batch evaluation's generate builds (it calls left_pad per batch)."""
    counts = {"pad": 0, "total": 0}
    left_pad = generation.left_pad

    def counted(seqs, pad_token_id):
        ids, mask = left_pad(seqs, pad_token_id)  # (B, T) each
        counts["pad"] += int((mask == 0).sum())
        counts["total"] += mask.numel()
        return ids, mask

    generation.left_pad = counted
    try:
        yield counts
    finally:
        generation.left_pad = left_pad


def generate_all(model, examples: list[dict], tokenizer, settings: dict, batch_size: int, seed: int) -> list[dict]:
    return generate(SYSTEM, examples, {SYSTEM: model}, None, settings, tokenizer, batch_size, seed)


def bench_generation(model, examples, tokenizer, settings: dict, batch: int, repeats: int, seed: int) -> dict:
    """Median wall and CPU times of batch 1 and `batch`, interleaved so load drift on a shared machine hits both
    alike; also the last outputs of each side and the pad share of the batched prompt tensors.

    CPU time (this process, all its threads) is the load-robust cross-check: with one torch thread it counts only
    our own work, however busy the machine is; wall time is the throughput a user sees.
    """
    wall, cpu, out, padding = {1: [], batch: []}, {1: [], batch: []}, {}, {}
    for _ in range(repeats):
        for size in (1, batch):
            with counting_padding() as padding[size]:
                start, start_cpu = time.perf_counter(), time.process_time()
                out[size] = generate_all(model, examples, tokenizer, settings, size, seed)
                wall[size].append(time.perf_counter() - start)
                cpu[size].append(time.process_time() - start_cpu)
    return {"one": statistics.median(wall[1]), "batched": statistics.median(wall[batch]),
            "cpu_one": statistics.median(cpu[1]), "cpu_batched": statistics.median(cpu[batch]),
            "records_one": out[1], "records_batched": out[batch], "padding": padding[batch]}


def profile_steps(model, examples, tokenizer, settings: dict, batch: int, steps: int = 16) -> list[tuple]:
    """Where a decoding step's time goes, batch 1 vs `batch` (torch profiler, self time per operator): each side
    generates 1 and 1 + `steps` new tokens for the same `batch` examples; the difference is `steps` decoding
    steps. -> rows (operator, ms per example-step alone, ms per example-step batched, gain), biggest first."""
    from torch.profiler import ProfilerActivity, profile

    group = examples[:batch]

    def op_times(size: int, new_tokens: int) -> dict[str, float]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_all(model, group, tokenizer, {**settings, "max_new_tokens": new_tokens}, size, 0)
        return {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}  # ms

    per_step = {}
    for size in (1, batch):
        generate_all(model, group, tokenizer, {**settings, "max_new_tokens": 2}, size, 0)  # warm-up
        short, long = op_times(size, 1), op_times(size, 1 + steps)
        per_step[size] = {k: (v - short.get(k, 0.0)) / (steps * len(group)) for k, v in long.items()}
    ops = sorted(per_step[batch], key=lambda k: -per_step[batch][k])
    rows = []
    for name in ops[:6] + ["(all operators)"]:
        if name == "(all operators)":
            alone, batched = sum(per_step[1].values()), sum(per_step[batch].values())
        else:
            alone, batched = per_step[1].get(name, 0.0), per_step[batch][name]
        rows.append((f"`{name}`", f"{alone:.2f} ms", f"{batched:.2f} ms",
                     f"{alone / batched:.2f}" if batched > 0 else ""))
    return rows


def format_row(what: str, t1: float, tb: float, cpu1: float, cpub: float, n: int, target: str = "") -> tuple:
    return (what, f"{t1:.2f} s ({n / t1:.2f} ex/s)", f"{tb:.2f} s ({n / tb:.2f} ex/s)", f"**{t1 / tb:.2f}**",
            f"{cpu1 / cpub:.2f}", target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="tiny shape, 4 examples, 4 new tokens, no record")
    parser.add_argument("--shape", default="pythia-70m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=None,
                        help="new tokens per example (default: evaluation.py's --max_new_tokens default)")
    parser.add_argument("--max_length", type=int, default=2048, help="evaluation.py's --max_length (prompt + new)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's choice); 1 avoids thread fights on a busy machine")
    parser.add_argument("--no_record", action="store_true")
    parser.add_argument("--no_profile", action="store_true", help="skip the per-operator table of a decoding step")
    args = parser.parse_args()
    if args.ci:
        args.shape, args.examples, args.new_tokens, args.max_length, args.repeats = "tiny", 4, 4, 256, 1
    if args.new_tokens is None:
        args.new_tokens = GenerationArguments().max_new_tokens
    if not (DATA.is_file() and TOKENIZER.is_dir()):
        sys.exit(f"needs the real data and tokenizer: {DATA} and {TOKENIZER} (../shared beside the repo)")

    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = load_tokenizer(str(TOKENIZER), padding_side="left")
    tokenizer.model_max_length = int(1e30)  # as load_models: reviews are measured whole, then cut
    model = random_model(args.shape)
    examples = load_prompts(tokenizer, model, args.examples, args.new_tokens, args.max_length, args.seed)
    never_stopping = NeverStoppingTokenizer(tokenizer)
    settings = resolve_decoding(GenerationArguments(max_new_tokens=args.new_tokens),
                                           [SYSTEM])[SYSTEM]  # greedy, no penalties: evaluation.py's defaults
    prefill = {**settings, "max_new_tokens": 1}

    load_before = os.getloadavg()
    generate_all(model, examples[:2], never_stopping, settings, 2, args.seed)  # warm-up: allocator, first calls
    full = bench_generation(model, examples, never_stopping, settings, args.batch, args.repeats, args.seed)
    prompt = bench_generation(model, examples, never_stopping, prefill, args.batch, args.repeats, args.seed)
    for records in (full["records_one"], full["records_batched"]):  # like for like: N tokens each, no EOS
        lengths = {r["new_tokens"] for r in records}
        if lengths != {args.new_tokens} or any(r["ended_with_eos"] for r in records):
            sys.exit(f"not like for like: new-token counts {sorted(lengths)}, expected {args.new_tokens} for all")
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(full["records_one"], full["records_batched"]))
    op_rows = [] if args.no_profile else profile_steps(model, examples, never_stopping, settings, args.batch,
                                                        steps=2 if args.ci else 16)
    padding = full["padding"]

    n = len(examples)
    t1, tb, p1, pb = full["one"], full["batched"], prompt["one"], prompt["batched"]
    c1, cb, q1, qb = full["cpu_one"], full["cpu_batched"], prompt["cpu_one"], prompt["cpu_batched"]
    rows = [
        format_row(f"generate {n} examples x {args.new_tokens} new tokens", t1, tb, c1, cb, n, ">= 3"),
        format_row("of which prompt pass (generate 1 new token)", p1, pb, q1, qb, n),
        format_row(f"of which {args.new_tokens - 1} decoding steps (difference)", t1 - p1, tb - pb, c1 - q1, cb - qb,
                   n),
    ]
    prompt_lengths = [len(ex["prompt_ids"]) for ex in examples]
    budget = min(model.config.max_position_embeddings, args.max_length) - args.new_tokens
    load = os.getloadavg()
    facts = (f"{n} examples of {DATA.name} (seed {args.seed}), prompts {min(prompt_lengths)}-{max(prompt_lengths)} "
             f"tokens, mean {statistics.mean(prompt_lengths):.0f} ({sum(ex['prompt_truncated'] for ex in examples)} "
             f"cut to the {budget}-token budget); "
             f"padding share of the batched prompt tensors {padding['pad'] / padding['total']:.1%} "
             f"({padding['pad']} of {padding['total']} positions); identical predictions batched vs alone: "
             f"{same}/{n}; load average (1/5/15 min) {'/'.join(f'{x:.1f}' for x in load_before)} before, "
             f"{'/'.join(f'{x:.1f}' for x in load)} after, on {os.cpu_count()} cores.")
    header = ("what", "one at a time (batch 1)", f"evaluation.py (batch {args.batch})", "ratio", "CPU-time ratio",
              "target")
    title = (f"Evaluation generation: {args.shape} shape, batch {args.batch} vs 1, {n} real prompts, "
             f"{args.new_tokens} new tokens, greedy")
    notes = ("Both sides call `generate` (HF `generate`, static KV cache, greedy, left padding, longest "
             "prompts first; at batch > 1 on CPU the prompts run row by row into one batched cache, "
             "`prefill_rows`) on the same examples built by `build_inputs`; only `batch_size` "
             "differs. Random "
             f"weights, so EOS is swapped for id {NEVER_EOS}, a suppressed padding row of the output matrix: every "
             f"example gets exactly {args.new_tokens} new tokens on both sides (checked). Median of "
             f"{args.repeats} interleaved runs, {torch.get_num_threads()} torch threads; ratio = wall-time examples/s, "
             "CPU-time ratio = the same from this process's CPU time (robust to other load when threads = 1). "
             + facts)
    if op_rows:
        notes += ("\n\nWhere a decoding step goes (torch profiler, self time per operator, per example and step: "
                  f"the first {args.batch} examples, 16 steps, batch 1 vs {args.batch}; gain = alone / batched):\n\n"
                  f"| operator | alone | batch {args.batch} | gain |\n|---|---|---|---|\n"
                  + "\n".join("| " + " | ".join(r) + " |" for r in op_rows))
    print(f"ratio (examples/s batch {args.batch} / batch 1): {t1 / tb:.2f} wall, {c1 / cb:.2f} CPU time")
    if args.ci or args.no_record:
        print("\n".join(" | ".join(str(c) for c in r) for r in rows + op_rows))
        print(facts)
    else:
        print(record(title, rows, header, notes))


if __name__ == "__main__":
    main()
