"""Time steered decoding against the large model alone (random weights, real Pythia shapes, no download).

    python bench/bench_steer.py                                   # 410m steered by 70m, batch 1, CPU or GPU
    python bench/bench_steer.py --batch_size 8 --new_tokens 128 --record true   # append to bench/RESULTS.md

The floor for steering is one step of L plus two steps of S per token (about 1.25x L alone for 410m/70m
by parameter count); the blend arithmetic itself is a few (B, V) operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from _util import PYTHIA_SHAPES, TOKENIZER_VOCAB, random_model, record, timeit

from common import default_device, parse_config, resolve_dtype
from steer import Blend, steered_generate


@dataclass
class BenchArguments:
    large: str = field(default="pythia-410m", metadata={"choices": list(PYTHIA_SHAPES)})
    small: str = field(default="pythia-70m", metadata={"choices": list(PYTHIA_SHAPES)})
    batch_size: int = 1
    prompt_tokens: int = 128
    new_tokens: int = 32
    device: str | None = None
    dtype: str = "auto"
    repeats: int = 3
    record: bool = field(default=False, metadata={"help": "Append the table to bench/RESULTS.md."})


def main(args: BenchArguments) -> list[tuple]:
    from transformers import GenerationConfig

    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    large, base, tuned = (random_model(shape, seed).to(device, dtype)
                          for seed, shape in enumerate([args.large, args.small, args.small]))
    ids = torch.randint(2, TOKENIZER_VOCAB, (args.batch_size, args.prompt_tokens), device=device)
    mask = torch.ones_like(ids)
    # eos -1 never occurs, so every run decodes exactly new_tokens tokens
    kw = dict(max_new_tokens=args.new_tokens, eos_token_id=-1, pad_token_id=1, vocab_size=TOKENIZER_VOCAB)
    config = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=1, eos_token_id=None)

    def sync(fn):
        def run():
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        return run

    def hf_large():
        with torch.inference_mode():
            large.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    runs = {
        f"{args.large} alone, HF generate": hf_large,
        f"{args.large} alone, steered_generate alpha=0": lambda: steered_generate(
            large, None, None, ids, mask, Blend.from_alpha(0), **kw),
        f"{args.large} + ({args.small} tuned - base), alpha=1": lambda: steered_generate(
            large, base, tuned, ids, mask, Blend.from_alpha(1), **kw),
        f"{args.small} alone, steered_generate alpha=0": lambda: steered_generate(
            base, None, None, ids, mask, Blend.from_alpha(0), **kw),
    }
    times = {name: timeit(sync(fn), repeats=args.repeats) for name, fn in runs.items()}
    reference = times[f"{args.large} alone, steered_generate alpha=0"]
    n = args.batch_size * args.new_tokens
    table = [(name, f"{t:.3f}", f"{1000 * t / args.new_tokens:.1f}", f"{n / t:.1f}", f"{t / reference:.2f}x")
             for name, t in times.items()]
    header = ("run", "seconds", "ms / step", "tokens / s", f"vs {args.large} alone")
    notes = (f"batch {args.batch_size}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, "
             f"{device} {str(dtype).replace('torch.', '')}, median of {args.repeats}.")
    if args.record:
        print(record("steer.py decoding speed", table, header, notes))
    else:
        print(notes)
        for row in [header, *table]:
            print(" | ".join(str(c) for c in row))
    return table


if __name__ == "__main__":
    (bench_args,) = parse_config([BenchArguments])
    main(bench_args)
