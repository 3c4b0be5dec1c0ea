"""Steering cost, side by side in one run: steered decoding vs L alone, blend scoring vs one L forward,
and peak memory vs the weights' bytes. Random weights with the real Pythia-410m / -70m shapes.

    python bench/bench_steering.py                 # full: 410m/70m shapes, records to bench/RESULTS.md
    python bench/bench_steering.py --ci            # tiny shapes, seconds, no record (CI keeps it from rotting)

Targets (issue 7): decode ratio <= 1.45 at batch 1 and 8 (the floor, L's step plus two small steps, is ~1.40
here), scoring ratio <= 1.45, peak RSS / weight bytes <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import PYTHIA_VOCAB, TOKENIZER_VOCAB, random_model, record, timeit  # noqa: E402

from proxytune.steering.blend import Blend
from proxytune.steering.decoding import steered_generate
from proxytune.steering.scoring import score_targets

# An id past the sliced vocabulary: neither system can emit it, so every run decodes exactly N tokens.
NEVER_EOS = TOKENIZER_VOCAB + 10


def load_three(large_shape: str, small_shape: str):
    return (random_model(large_shape, seed=0), random_model(small_shape, seed=1), random_model(small_shape, seed=2))


def prompts(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, TOKENIZER_VOCAB, (batch, length), generator=g)  # (B, T)
    return ids, torch.ones_like(ids)


def decode_large_alone(large, ids, mask, new_tokens: int):
    from transformers import GenerationConfig

    # The same preallocated KV cache as evaluation.py's generate and steer.py's streams, so that the ratio
    # compares the steering, not two cache kinds.
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=1,
                              cache_implementation="static", disable_compile=True)
    return large.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def decode_steered(models, ids, mask, new_tokens: int):
    large, small_base, small_tuned = models
    return steered_generate(large, small_base, small_tuned, ids, mask, Blend.from_alpha(1.0),
                            max_new_tokens=new_tokens, eos_token_id=NEVER_EOS, pad_token_id=1,
                            vocab_size=TOKENIZER_VOCAB)


def bench_decoding(models, batches, prompt_len: int, new_tokens: int, repeats: int) -> list[tuple]:
    rows = []
    with torch.inference_mode():
        for batch in batches:
            ids, mask = prompts(batch, prompt_len)
            # Alternate the two systems inside timeit's repeats so drift hits both alike.
            t_large = timeit(lambda: decode_large_alone(models[0], ids, mask, new_tokens), repeats=repeats)
            t_steer = timeit(lambda: decode_steered(models, ids, mask, new_tokens), repeats=repeats)
            t_small = timeit(lambda: decode_large_alone(models[1], ids, mask, new_tokens), repeats=repeats)
            floor = (t_large + 2 * t_small) / t_large
            rows.append((f"decode batch {batch}", f"{t_large:.2f} s", f"{t_steer:.2f} s",
                         f"**{t_steer / t_large:.2f}**", f"{floor:.2f}", "<= 1.45"))
    return rows


def bench_scoring(models, n_targets: int, prompt_len: int, target_len: int, repeats: int) -> tuple:
    large, small_base, small_tuned = models
    ids, _ = prompts(n_targets, prompt_len + target_len, seed=1)
    prompt_ids = [row[:prompt_len].tolist() for row in ids]
    target_ids = [row[prompt_len:].tolist() for row in ids]
    named = {"large": large, "small_base": small_base, "small_tuned": small_tuned}

    def one_forward():
        with torch.inference_mode():
            _ = large(input_ids=ids).logits  # (B, T, V): the cheapest honest baseline, no loss, no softmax

    def blend():
        return score_targets(named, prompt_ids, target_ids, vocab_size=TOKENIZER_VOCAB, batch_size=n_targets,
                             blend=Blend.from_alpha(1.0), show_progress=False)

    t_fwd = timeit(one_forward, repeats=repeats)
    t_blend = timeit(blend, repeats=repeats)
    return (f"score {n_targets}x{target_len} tokens", f"{t_fwd:.2f} s", f"{t_blend:.2f} s",
            f"**{t_blend / t_fwd:.2f}**", "", "<= 1.45")


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes: VmRSS (resident now) or VmHWM (peak since reset_peak_rss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak_rss() -> None:
    """Drop what building the models freed, then restart the peak counter (Linux: clear_refs 5)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def kv_cache_bytes(model, batch: int, length: int) -> int:
    """Bytes of a static KV cache for `batch` rows of `length` tokens: keys and values, every layer, float32."""
    config = model.config
    return 2 * config.num_hidden_layers * batch * length * config.hidden_size * 4


def memory_child(system: str, large_shape: str, small_shape: str, batch: int, prompt_len: int,
                 new_tokens: int) -> None:
    """Runs in a fresh process: the peak RSS while decoding, counted from when the models are built (random
    initialisation's temporaries are not part of decoding's cost). `system`: "steered" (three models) or "large"
    (L alone with `generate`, for comparison)."""
    models = load_three(large_shape, small_shape) if system == "steered" else (random_model(large_shape, seed=0),)
    weight_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    cache_bytes = sum(kv_cache_bytes(m, batch, prompt_len + new_tokens) for m in models)
    ids, mask = prompts(batch, prompt_len)
    reset_peak_rss()
    start = proc_status_bytes("VmRSS")  # weights + the Python/torch/transformers runtime
    with torch.inference_mode():
        if system == "steered":
            decode_steered(models, ids, mask, new_tokens)
        else:
            decode_large_alone(models[0], ids, mask, new_tokens)
    print(json.dumps({"peak_rss": proc_status_bytes("VmHWM"), "weight_bytes": weight_bytes, "start_rss": start,
                      "cache_bytes": cache_bytes}))


def bench_memory(large_shape: str, small_shape: str, batch: int, prompt_len: int, new_tokens: int) -> list[tuple]:
    rows = []
    for system in ("steered", "large"):
        cmd = [sys.executable, __file__, "--_memory_child", system, "--threads", str(torch.get_num_threads()),
               "--large", large_shape, "--small", small_shape,
               "--batch", str(batch), "--prompt_len", str(prompt_len), "--new_tokens", str(new_tokens)]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out = json.loads(run.stdout.strip().splitlines()[-1])
        ratio = out["peak_rss"] / out["weight_bytes"]
        # The least any decoder holding float32 KV caches can reach by this measure: what is resident when
        # decoding starts (weights + runtime) plus the caches themselves.
        floor = (out["start_rss"] + out["cache_bytes"]) / out["weight_bytes"]
        what = (f"memory, steered decode batch {batch}" if system == "steered"
                else f"(for comparison: L alone `generate`, batch {batch}, over L's weights)")
        rows.append((what, f"weights {out['weight_bytes'] / 2**30:.2f} GiB, KV caches "
                     f"{out['cache_bytes'] / 2**30:.2f} GiB, resident at start {out['start_rss'] / 2**30:.2f} GiB",
                     f"peak RSS {out['peak_rss'] / 2**30:.2f} GiB", f"**{ratio:.2f}**" if system == "steered"
                     else f"{ratio:.2f}", f"{floor:.2f}", "<= 1.3" if system == "steered" else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="tiny shapes, a few tokens, no record")
    parser.add_argument("--large", default="pythia-410m")
    parser.add_argument("--small", default="pythia-70m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=["decode", "score", "memory"],
                        choices=["decode", "score", "memory"], help="which measurements to run")
    parser.add_argument("--no_record", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 on a machine shared with other jobs; default: torch's choice)")
    parser.add_argument("--_memory_child", choices=["steered", "large"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_child:
        return memory_child(args._memory_child, args.large, args.small, args.batch, args.prompt_len,
                            args.new_tokens)
    if args.ci:
        args.large, args.small, args.prompt_len, args.new_tokens, args.repeats = "tiny-large", "tiny", 16, 4, 1
    rows = []
    if {"decode", "score"} & set(args.parts):
        models = load_three(args.large, args.small)
        if "decode" in args.parts:
            rows += bench_decoding(models, sorted({1, args.batch}), args.prompt_len, args.new_tokens, args.repeats)
        if "score" in args.parts:
            rows.append(bench_scoring(models, args.batch, 56 if not args.ci else 8, 200 if not args.ci else 8,
                                      args.repeats))
        del models
    if "memory" in args.parts:
        for batch in sorted({1, args.batch}):
            rows += bench_memory(args.large, args.small, batch, args.prompt_len, args.new_tokens)
    header = ("what", "baseline (L alone)", "steered", "ratio", "floor", "target")
    title = (f"Steering cost: L={args.large} shape, S={args.small} shape, {args.prompt_len}-token prompts, "
             f"{args.new_tokens} new tokens, vocab {PYTHIA_VOCAB} sliced to {TOKENIZER_VOCAB}")
    load = os.getloadavg()
    notes = (f"torch threads {torch.get_num_threads()}; "
             f"load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} "
             "(1/5/15 min) on 2 cores. Decode baseline: `model.generate` greedy on L alone, static KV cache "
             "(as steer.py and evaluation.py). Floor = (t_L + 2 t_S) / t_L with t_S the small "
             "model's own `generate` time. Scoring baseline: one forward pass of L over the same 8 prompt+target "
             "sequences; blend = `proxytune.steering.scoring.score_targets` (three forwards, log-softmax over the "
             "full vocabulary, blend NLL). Memory: peak RSS (VmHWM, reset after the three models are built) of a "
             "fresh process while it decodes, over the models' weight bytes (float32); it includes the "
             "Python/torch/transformers runtime and the KV caches. Memory floor = (RSS when decoding starts + the "
             "KV caches' bytes) / weight bytes: the least any decoder keeping float32 caches reaches by this "
             "measure. Prompts run row by row into one cache on CPU (proxytune.steering.decoding.prefill_rows).")
    if args.ci or args.no_record:
        print("\n".join(" | ".join(str(c) for c in r) for r in rows))
    else:
        print(record(title, rows, header, notes))


if __name__ == "__main__":
    main()
