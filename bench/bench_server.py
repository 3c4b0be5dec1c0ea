"""The OpenAI-compatible endpoint's cost, side by side in one run (serve.py's app in this process, called over HTTP
on loopback with the official `openai` client): time per generated token at one client against steer.py's decoding
of the same prompts (steering/generation.py's generate_texts, what steer.py's main calls), and the total throughput
of 8 concurrent clients against one client's (the decode queue batching their requests). Random weights with
Pythia shapes and the real Pythia tokenizer (../shared/tokenizers/pythia); prompts cut from MReD reviews.

    python bench/bench_server.py                   # pythia-160m / -70m shapes, a few minutes on 2 CPU cores
    python bench/bench_server.py --ci              # tiny shapes, seconds, no record

Targets (issue 31): server time per token at one client <= 1.10 x steer.py's; 8 clients' throughput >= 3 x one's.
Beside them, the machine's ceiling: steer.py's own throughput at batch 8 over batch 1 on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, random_model, record  # noqa: E402

from proxytune.integrations.server import ServeArguments, create_app, serving
from proxytune.integrations.steered import SteeredModel
from proxytune.models.loading import load_tokenizer
from proxytune.steering.arguments import SteerArguments
from proxytune.steering.blend import Blend
from proxytune.steering.generation import generate_texts

SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "tokenizers" / "pythia"
REVIEWS = SHARED / "data" / "meta_review" / "mred_val_longest.jsonl"

DRAFT_TOKENS = 2  # serve.py's default: a fixed draft length (seeded samples repeat); steer.py gets the same


def make_prompts(tokenizer, n: int, length: int) -> list[str]:
    """n review openings of about `length` tokens each (decoded back to text: both sides tokenize the same text)."""
    rows = [json.loads(line) for line in REVIEWS.read_text(encoding="utf-8").splitlines()[:n * 2] if line.strip()]
    texts = [tokenizer.decode(tokenizer.encode(r["Input"])[:length]) for r in rows]
    return [t for t in texts if t.strip()][:n]


def steer_once(models, tokenizer, prompt: str, blend: Blend, new_tokens: int, speculative: bool) -> tuple[float, int]:
    """steer.py's decoding of one prompt -> (seconds, tokens generated)."""
    args = SteerArguments(prompt=prompt, use_template=False, max_new_tokens=new_tokens, batch_size=1,
                          speculative=speculative, draft_tokens=DRAFT_TOKENS)
    start = time.perf_counter()
    (result,) = generate_texts(models, tokenizer, [prompt], blend, args, desc="steer.py")
    return time.perf_counter() - start, result["n_new_tokens"]


def steer_batch(models, tokenizer, prompts: list[str], blend: Blend, new_tokens: int, speculative: bool,
                batch_size: int) -> tuple[float, int]:
    """steer.py's decoding of `prompts`, `batch_size` rows at a time -> (seconds, tokens generated)."""
    args = SteerArguments(use_template=False, max_new_tokens=new_tokens, batch_size=batch_size,
                          speculative=speculative, draft_tokens=DRAFT_TOKENS)
    start = time.perf_counter()
    results = generate_texts(models, tokenizer, prompts, blend, args, desc="steer.py")
    return time.perf_counter() - start, sum(r["n_new_tokens"] for r in results)


def serve_once(client, prompt: str, new_tokens: int) -> tuple[float, int]:
    """One /v1/completions request, greedy -> (seconds, tokens generated)."""
    start = time.perf_counter()
    answer = client.completions.create(model="proxytune-steered", prompt=prompt, max_tokens=new_tokens,
                                       temperature=0)
    return time.perf_counter() - start, answer.usage.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="tiny shapes, a few tokens, no record")
    parser.add_argument("--large", default="pythia-160m")
    parser.add_argument("--small", default="pythia-70m")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=4, help="prompts timed at one client (each side)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests_per_client", type=int, default=3)
    parser.add_argument("--speculative", action="store_true",
                        help="S_tuned drafting on both sides (serve.py's default); default: the plain loop, as "
                             "random weights reject every draft and the server's cost, not drafting, is measured")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 on a machine shared with other jobs)")
    parser.add_argument("--batch_wait_ms", type=float, default=ServeArguments.batch_wait_ms,
                        help="serve.py's --batch_wait_ms (default: serve.py's)")
    parser.add_argument("--no_record", action="store_true")
    args = parser.parse_args()
    if not TOKENIZER.is_dir() or not REVIEWS.is_file():
        raise SystemExit(f"needs the Pythia tokenizer and MReD reviews in {SHARED}")
    import openai

    if args.ci:
        args.large, args.small, args.prompt_len, args.new_tokens, args.prompts = "tiny-large", "tiny", 16, 4, 2
        args.requests_per_client = 1
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(str(TOKENIZER))
    models = {"large": random_model(args.large, seed=0), "small_base": random_model(args.small, seed=1),
              "small_tuned": random_model(args.small, seed=2)}
    blend = Blend.from_alpha(1.0)
    steered = SteeredModel(models, tokenizer, blend, speculative=args.speculative, draft_tokens=DRAFT_TOKENS)
    prompts = make_prompts(tokenizer, max(args.prompts, args.clients * args.requests_per_client), args.prompt_len)
    app = create_app(steered, batch_size=args.clients, batch_wait_s=args.batch_wait_ms / 1000)
    with serving(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
        steer_once(models, tokenizer, prompts[0], blend, args.new_tokens, args.speculative)  # warm-up, both sides
        serve_once(client, prompts[0], args.new_tokens)
        # One client, interleaved with steer.py prompt by prompt (a busy machine slows both alike).
        steer_s = serve_s = 0.0
        steer_n = serve_n = 0
        for prompt in prompts[:args.prompts]:
            s, n = steer_once(models, tokenizer, prompt, blend, args.new_tokens, args.speculative)
            steer_s, steer_n = steer_s + s, steer_n + n
            s, n = serve_once(client, prompt, args.new_tokens)
            serve_s, serve_n = serve_s + s, serve_n + n
        # Eight clients at once, each its own requests one after another.
        tokens = [0] * args.clients

        def run_client(c: int) -> None:
            own = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=600)
            for r in range(args.requests_per_client):
                tokens[c] += serve_once(own, prompts[c * args.requests_per_client + r], args.new_tokens)[1]

        threads = [threading.Thread(target=run_client, args=(c,)) for c in range(args.clients)]
        before = len(app.state.queue.batch_rows)
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        many_s = time.perf_counter() - start
        rows_per_batch = app.state.queue.batch_rows[before:]

    # The machine's ceiling for batching: steer.py decoding the clients' first prompts together against one at a
    # time, no server. Where a batch of 8 costs nearly 8 single steps (a CPU's compute-bound matmuls), no queue
    # can reach the target.
    firsts = prompts[:args.clients]
    single_s, single_n = steer_batch(models, tokenizer, firsts, blend, args.new_tokens, args.speculative, 1)
    batch_s, batch_n = steer_batch(models, tokenizer, firsts, blend, args.new_tokens, args.speculative, args.clients)
    ceiling = (batch_n / batch_s) / (single_n / single_s)

    steer_per_token, serve_per_token = steer_s / steer_n, serve_s / serve_n
    overhead = serve_per_token / steer_per_token
    one_rate, many_rate = serve_n / serve_s, sum(tokens) / many_s
    speedup = many_rate / one_rate
    met = {True: "met", False: "**missed**"}
    table = [
        ("one client: seconds per generated token", f"{steer_per_token * 1000:.1f} ms (steer.py)",
         f"{serve_per_token * 1000:.1f} ms", f"**{overhead:.3f}**", "<= 1.10", met[overhead <= 1.10]),
        (f"{args.clients} clients: total throughput", f"{one_rate:.1f} tokens/s (one client)",
         f"{many_rate:.1f} tokens/s", f"**{speedup:.2f}**", ">= 3", met[speedup >= 3]),
        (f"(this machine's ceiling: steer.py, the {args.clients} first prompts in one batch)",
         f"{single_n / single_s:.1f} tokens/s (one at a time)", f"{batch_n / batch_s:.1f} tokens/s (steer.py)",
         f"{ceiling:.2f}", "", ""),
    ]
    header = ("what", "baseline", "server", "ratio", "target", "")
    title = (f"Server: L={args.large} shape, S={args.small} shape, {args.prompt_len}-token prompts, "
             f"{args.new_tokens} new tokens, greedy, "
             f"{f'speculative k={DRAFT_TOKENS}' if args.speculative else 'plain decoding loop'}"
             + (f", batch wait {args.batch_wait_ms:g} ms"
                if args.batch_wait_ms != ServeArguments.batch_wait_ms else ""))
    load = os.getloadavg()
    notes = (f"batch wait {args.batch_wait_ms:g} ms; torch threads {torch.get_num_threads()}; load average at the end "
             f"{load[0]:.1f}/{load[1]:.1f}/"
             f"{load[2]:.1f} (1/5/15 min). One client: {args.prompts} prompts, each decoded by steer.py's "
             "generate_texts (batch 1) and then requested from the server (official `openai` client over HTTP on "
             f"loopback, app in this process), {steer_n} and {serve_n} tokens. {args.clients} clients: threads, "
             f"{args.requests_per_client} requests each one after another, {sum(tokens)} tokens in "
             f"{many_s:.1f} s; rows per decoded batch: {rows_per_batch} (the queue gathers a batch until no row "
             "arrived for the batch wait, or it is full). Throughput = generated tokens / wall "
             f"time. Ceiling: steer.py's generate_texts on the {args.clients} clients' first prompts with --batch_size "
             f"{args.clients} against --batch_size 1 ({batch_n} and {single_n} tokens), no server: the most a queue "
             "that batches perfectly could give on this machine.")
    if args.ci or args.no_record:
        print("\n".join(" | ".join(str(c) for c in r) for r in table))
        print(notes)
    else:
        print(record(title, table, header, notes))


if __name__ == "__main__":
    main()
