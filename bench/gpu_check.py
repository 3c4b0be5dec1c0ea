"""One short check on a CUDA GPU (bf16), side by side in one run; prints a table (no record: GPU sessions are rare,
the note of the session that ran it quotes it).

- the premise of speculative steering (issue 29): L's forward over k + 1 tokens against over 1 token, with a KV cache;
- steered decoding (plain loop and speculative) against L alone's `generate`, batch 1 and 8, time per token;
- greedy speculative output against the plain loop's on the GPU (the same tokens are expected in float32; bf16 rows
  may differ where two tokens nearly tie).

    python bench/gpu_check.py                     # pythia-410m / -70m shapes, random weights, about a minute
    python bench/gpu_check.py --large pythia-1.4b
    python bench/gpu_check.py --ci                # tiny shapes, CPU allowed, seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import random_model, wait_for_device  # noqa: E402

from proxytune.steering.blend import Blend
from proxytune.steering.decoding import steered_generate
from proxytune.steering.speculative import speculative_generate

VOCAB = 50277  # the Pythia tokenizer's size (random models have 50,304 rows)


def timed(fn, device: str, repeats: int = 3) -> float:
    fn()  # warm-up
    wait_for_device(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        wait_for_device(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def forward_cost(model, device: str, prompt: int, ks: list[int]) -> dict[int, float]:
    """Seconds of one forward of k tokens after a `prompt`-token cache (the cache rebuilt each time, not timed)."""
    out = {}
    ids = torch.randint(2, VOCAB, (1, prompt + max(ks)), device=device)
    for k in ks:
        def step(k=k):
            cache = model(ids[:, :prompt], use_cache=True).past_key_values
            wait_for_device(device)
            start = time.perf_counter()
            model(ids[:, prompt:prompt + k], cache=cache, use_cache=True)
            wait_for_device(device)
            return time.perf_counter() - start
        step()
        out[k] = sorted(step() for _ in range(5))[2]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", default="pythia-410m")
    parser.add_argument("--small", default="pythia-70m")
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--ci", action="store_true", help="tiny shapes, a few tokens; CPU allowed")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.ci:
        raise SystemExit("no CUDA device: this check is for a GPU (use --ci for a CPU smoke run)")
    if args.ci:
        args.large, args.small, args.prompt_len, args.new_tokens = "tiny-large", "tiny", 16, 6
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    models = [random_model(shape, seed=s).to(device=device, dtype=dtype)
              for shape, s in ((args.large, 0), (args.small, 1), (args.small, 2))]
    large, small_base, small_tuned = models
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, {dtype}, torch {torch.__version__}")

    costs = forward_cost(large, device, args.prompt_len, [1, 2, 3, 5, 9])
    print(f"L forward after a {args.prompt_len}-token cache, k tokens: "
          + ", ".join(f"k={k}: {t * 1000:.2f} ms ({t / costs[1]:.2f}x)" for k, t in costs.items()))

    blend = Blend.from_alpha(1.0)
    for batch in (1, 8):
        ids = torch.randint(2, VOCAB, (batch, args.prompt_len), device=device)
        mask = torch.ones_like(ids)
        kw = dict(max_new_tokens=args.new_tokens, eos_token_id=VOCAB + 10, pad_token_id=1, vocab_size=VOCAB)
        alone = timed(lambda: large.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=1),
                      device)
        plain_out = []
        plain = timed(lambda: plain_out.append(steered_generate(large, small_base, small_tuned, ids, mask, blend,
                                                                **kw)), device)
        spec_out = []
        spec = timed(lambda: spec_out.append(speculative_generate(large, small_base, small_tuned, ids, mask, blend,
                                                                  draft_tokens=None, **kw)), device)
        same = torch.equal(plain_out[-1][0], spec_out[-1][0])
        rows = (plain_out[-1][0] == spec_out[-1][0]).all(dim=1).float().mean().item()
        print(f"batch {batch}: L alone generate {alone:.2f} s; steered plain loop {plain:.2f} s "
              f"({plain / alone:.2f}x); speculative (adaptive) {spec:.2f} s ({spec / alone:.2f}x, "
              f"{spec / plain:.2f}x the plain loop); greedy tokens equal: {same} (rows equal {rows:.2f})")


if __name__ == "__main__":
    main()
