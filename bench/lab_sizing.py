"""What the steering lab's models cost on this CPU: training and decoding tokens/s of candidate S and L shapes,
measured side by side in one run, so the lab's stages can be sized to its budget (the plan: docs/lab.md).

    python bench/lab_sizing.py --threads 1                 # the candidate shapes, ~5 min; records
    python bench/lab_sizing.py --threads 1 --batch 4 --shapes "d64 x 2" "d256 x 4"   # the lab's S and L, its steps
    python bench/lab_sizing.py --threads 1 --ci            # two tiny shapes, a few seconds, no record

Each shape is a GPT-NeoX of the lab's kind (the lab's 8,192-token BPE, rotary, untied embeddings), random weights,
float32. Training: a fine_tune.py-sized step (AdamW, forward + backward over `--batch` blocks of `--block` tokens)
timed over `--steps` steps after one warm-up step; tokens/s = batch x block / seconds per step. Decoding:
transformers' greedy `generate` with the KV cache, `--eval_batch` prompts of `--prompt` tokens (the lab's 512-token
context less 128 new tokens): the prefill (a decode of 1 new token) in prompt tokens/s, and the time of one further
step of the whole batch (from a decode of `--new_tokens` tokens, less the prefill). The machine may
be shared: the process's CPU time per step is reported beside the wall time (its ratios are the ones other
processes disturb least), with the load average.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import record  # noqa: E402

VOCAB = 8192
# name -> (hidden, layers, heads): the lab's S and L before issue 32, the candidates around the new ones.
SHAPES = {
    "d64 x 2": (64, 2, 4),
    "d96 x 2": (96, 2, 4),
    "d128 x 2": (128, 2, 4),
    "d256 x 4": (256, 4, 4),
    "d320 x 6": (320, 6, 5),
    "d384 x 6": (384, 6, 6),
    "d512 x 6": (512, 6, 8),
}
CI_SHAPES = {"d32 x 1": (32, 1, 2), "d64 x 2": (64, 2, 4)}


def build(hidden: int, layers: int, heads: int, context: int):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=context,
                           use_parallel_residual=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                           tie_word_embeddings=False)
    return GPTNeoXForCausalLM(config)


def parameters(model) -> tuple[int, int]:
    """(non-embedding, total): the input embedding and the output layer are the embedding parameters."""
    embedding = model.get_input_embeddings().weight.numel() + model.get_output_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    return total - embedding, total


def time_steps(fn, steps: int) -> tuple[float, float]:
    """(wall, CPU) seconds per call of `fn` over `steps` calls after one warm-up call."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure(shape: tuple[int, int, int], args) -> dict:
    import torch

    model = build(*shape, context=args.prompt + args.new_tokens)
    non_embedding, total = parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(2, VOCAB, (args.batch, args.block), generator=generator)  # (B, T)

    def train_step():
        loss = model(input_ids=blocks, labels=blocks).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    train_wall, train_cpu = time_steps(train_step, args.steps)
    model.eval()
    prompts = torch.randint(2, VOCAB, (args.eval_batch, args.prompt), generator=generator)  # (B, P)

    def decode(new_tokens: int):
        with torch.inference_mode():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=1)

    # A decode of 1 new token is the prompt's forward (prefill); the rest of a longer one is per-token steps.
    prefill_wall, prefill_cpu = time_steps(lambda: decode(1), 1)
    decode_wall, decode_cpu = time_steps(lambda: decode(args.new_tokens), 1)
    step_wall = max(decode_wall - prefill_wall, 1e-9) / (args.new_tokens - 1)
    step_cpu = max(decode_cpu - prefill_cpu, 1e-9) / (args.new_tokens - 1)
    tokens = args.batch * args.block
    return {"non_embedding": non_embedding, "total": total, "train_tok_s": tokens / train_wall,
            "train_tok_cpu_s": tokens / train_cpu, "prefill_tok_s": args.eval_batch * args.prompt / prefill_wall,
            "step_ms": 1000 * step_wall, "step_cpu_ms": 1000 * step_cpu}

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--shapes", nargs="+", default=None, help=f"a subset of {', '.join(SHAPES)}")
    parser.add_argument("--batch", type=int, default=8, help="training blocks per step")
    parser.add_argument("--block", type=int, default=512, help="tokens per training block")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per shape")
    parser.add_argument("--eval_batch", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--prompt", type=int, default=384, help="prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=32, help="new tokens decoded")
    parser.add_argument("--ci", action="store_true", help="two tiny shapes, small sizes, no record")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = CI_SHAPES if args.ci else {name: SHAPES[name] for name in (args.shapes or SHAPES)}
    if args.ci:
        args.batch, args.block, args.steps, args.eval_batch, args.prompt, args.new_tokens = 2, 32, 1, 2, 16, 4
    rows = []
    for name, shape in shapes.items():
        m = measure(shape, args)
        print(f"{name}: {m['non_embedding']:,} non-embedding params; train {m['train_tok_s']:,.0f} tok/s "
              f"(CPU {m['train_tok_cpu_s']:,.0f}); prefill {m['prefill_tok_s']:,.0f} tok/s; decode step "
              f"{m['step_ms']:.1f} ms (CPU {m['step_cpu_ms']:.1f})", flush=True)
        rows.append((name, f"{m['non_embedding']:,}", f"{m['total']:,}", f"{m['train_tok_s']:,.0f}",
                     f"{m['train_tok_cpu_s']:,.0f}", f"{m['prefill_tok_s']:,.0f}", f"{m['step_ms']:.1f}",
                     f"{m['step_cpu_ms']:.1f}"))
    if args.ci:
        return
    header = ("shape (d x layers)", "non-embedding params", "total params", "train tok/s", "train tok/CPU-s",
              "prefill tok/s", "decode step (ms)", "decode step (CPU ms)")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    notes = (f"Training: AdamW steps of {args.batch} x {args.block} tokens, {args.steps} timed after a warm-up. "
             f"Decoding: greedy generate, {args.eval_batch} prompts of {args.prompt} tokens: the prefill (1 new "
             f"token) and the time per further step of the whole batch ({args.new_tokens} new tokens, KV cache). "
             f"Vocabulary {VOCAB:,}, float32, torch threads {torch.get_num_threads()}; load average at the end "
             f"{load} (1/5/15 min; other jobs share the cores, so wall figures are a floor and CPU-time figures "
             "what a quiet core gives). Used to size the steering lab: docs/lab.md.")
    title = f"Steering lab sizing: tokens/s of candidate shapes, training steps of {args.batch} x {args.block} tokens"
    record(title, rows, header, notes=notes)


if __name__ == "__main__":
    main()
