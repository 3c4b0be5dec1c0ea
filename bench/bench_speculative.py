"""Speculative steering (speculative.py) vs the plain steered loop and L alone, side by side in one run (issue 14).

    python bench/bench_speculative.py --threads 1      # lab acceptance + Pythia-shape costs + end-to-end; records
    python bench/bench_speculative.py --ci             # tiny shapes, seconds, no record (CI keeps it from rotting)

1. Acceptance on the lab's trained models (outputs/lab: S, S_tuned, L and the tuned blend) on real validation
   prompts: kept drafts per round and per-token agreement of S_tuned's draft with the blend, greedy and sampling,
   and whether greedy speculative outputs equal the plain loop's.
2. Cost at the real Pythia shapes (random weights): one forward of k tokens on a warm cache (steer's row cache,
   cut back after each call), t_L(k) and t_S(k), k = 1..8.
3. Time per token predicted from 1 and 2 (the lab's own rounds, priced at the Pythia shapes' t(k)), next to the
   measured end-to-end times of L alone, plain steering and speculative steering at those shapes. Random weights
   agree with nothing, so the measured speculative runs bracket the lab: alpha = 1 (drafts almost never kept)
   and a draft-heavy blend (L and S weighted 1e-3: drafts almost always kept); each is printed next to its own
   prediction, so the cost model is checked at both ends.

Target (issue 14): speculative steered / L alone <= 0.8 at batch 1, 410m/70m shapes, with the lab's acceptance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, TOKENIZER_VOCAB, random_model, record, timeit  # noqa: E402

from speculative import RowCache, SpeculativeStats, speculative_generate  # noqa: E402
from steer import Blend, left_pad, steered_generate  # noqa: E402

LAB = ROOT / "outputs" / "lab"
NEVER_EOS = TOKENIZER_VOCAB + 10  # an id past the sliced vocabulary: every run decodes exactly N tokens
DRAFT_HEAVY = Blend(large_weight=1e-3, tuned_weight=1.0, base_weight=1e-3)


# ---------------------------------------------------------------------------------------------
# 1. Acceptance on the lab's models
# ---------------------------------------------------------------------------------------------
def load_lab(n_prompts: int, new_tokens: int):
    from common import load_causal_lm, load_tokenizer
    from processing_meta_review import load_saved_split

    models = [load_causal_lm(str(LAB / name / "final"), dtype="float32", device="cpu")
              for name in ("large", "small", "small_tuned")]
    tokenizer = load_tokenizer(str(LAB / "tokenizer"))
    context = min(m.config.max_position_embeddings for m in models)
    split = load_saved_split(LAB / "data", "validation", "--data")
    prompts = [row["input_ids"][:row["prompt_length"]] for row in split
               if row["prompt_length"] + new_tokens <= context][:n_prompts]
    blend = Blend.load(LAB / "steer" / "blend.json") if (LAB / "steer" / "blend.json").exists() else Blend.from_alpha(1)
    return models, tokenizer, prompts, blend


def decode(fn, models, prompts, blend, new_tokens, eos, pad, vocab, **kw):
    ids, mask = left_pad(prompts, pad)
    t0 = time.perf_counter()
    out = fn(*models, ids, mask, blend, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=pad,
             vocab_size=vocab, **kw)
    return out, time.perf_counter() - t0


def bench_acceptance(models, tokenizer, prompts, blend, new_tokens: int) -> tuple[list[tuple], dict]:
    """Rows of the acceptance table, and the traces (drafted, kept per round) priced in part 3."""
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    rows, traces = [], {}
    one_by_one = [[p] for p in prompts]
    plain_greedy, t_plain = [], 0.0
    for p in one_by_one:
        (tokens, _), t = decode(steered_generate, models, p, blend, new_tokens, eos, pad, vocab)
        plain_greedy.append(tokens[0])
        t_plain += t
    n_tokens = sum(len(t) for t in plain_greedy)
    rows.append(("lab greedy, plain loop, rows alone", "", "", "", f"{1e3 * t_plain / n_tokens:.2f} ms", "1.00", ""))
    (batched, _), t_batched = decode(steered_generate, models, prompts, blend, new_tokens, eos, pad, vocab)
    rows.append((f"lab greedy, plain loop, batch {len(prompts)}", "", "", "", f"{1e3 * t_batched / n_tokens:.2f} ms",
                 f"{t_batched / t_plain:.2f}", ""))
    for label, draft_tokens in (("K = 1", 1), ("K = 2", 2), ("K = 4", 4), ("adaptive K", None)):
        stats, same, t_spec = SpeculativeStats(), 0, 0.0
        for p, ref in zip(one_by_one, plain_greedy):
            (tokens, _), t = decode(speculative_generate, models, p, blend, new_tokens, eos, pad, vocab,
                                    draft_tokens=draft_tokens, stats=stats)
            same += int(torch.equal(tokens[0], ref))
            t_spec += t
        traces[f"greedy {label}"] = stats
        rows.append((f"lab greedy, speculative {label}", f"{stats.acceptance:.3f}", f"{stats.tokens_per_round:.2f}",
                     f"{same}/{len(prompts)}", f"{1e3 * t_spec / n_tokens:.2f} ms", f"**{t_spec / t_plain:.2f}**", ""))
    sample = dict(do_sample=True, temperature=1.0, top_p=0.95)
    g = torch.Generator().manual_seed(0)
    (tokens, _), t_plain_s = decode(steered_generate, models, prompts[:1], blend, new_tokens, eos, pad, vocab,
                                    generator=g, **sample)
    for label, draft_tokens in (("K = 1", 1), ("adaptive K", None)):
        stats, t_spec = SpeculativeStats(), 0.0
        for p in one_by_one:
            _, t = decode(speculative_generate, models, p, blend, new_tokens, eos, pad, vocab, draft_tokens=draft_tokens,
                          stats=stats, generator=g, **sample)
            t_spec += t
        traces[f"sampling {label}"] = stats
        rows.append((f"lab sampling T=1 top_p=0.95, speculative {label}", f"{stats.acceptance:.3f}",
                     f"{stats.tokens_per_round:.2f}", "(distribution: tests)",
                     f"{1e3 * t_spec / stats.emitted:.2f} ms", "", ""))
    return rows, traces


# ---------------------------------------------------------------------------------------------
# 2. Cost of a k-token forward with a warm cache
# ---------------------------------------------------------------------------------------------
def forward_costs(model, prompt_len: int, ks, repeats: int, batch: int = 1) -> dict[int, float]:
    """k -> seconds of one forward of k new tokens after a `prompt_len`-token prompt (log-softmax included)."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, TOKENIZER_VOCAB, (prompt_len,), generator=g)
    out = {}
    with torch.inference_mode():
        if batch == 1:
            cache = RowCache(model, prompt, prompt_len + max(ks) + 1)

            def step(k):
                cache.logprobs(list(range(2, 2 + k)), TOKENIZER_VOCAB, torch.device("cpu"))
                cache.crop(prompt_len - 1)
        else:
            from transformers import StaticCache
            ids = prompt[None].expand(batch, -1)
            cache = StaticCache(config=model.config, max_cache_len=prompt_len + max(ks) + 1)
            model(input_ids=ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)

            def step(k):
                pos = torch.arange(prompt_len - 1, prompt_len - 1 + k)[None].expand(batch, -1)
                o = model(input_ids=ids[:, :k], position_ids=pos, cache=cache, use_cache=True, logits_to_keep=k)
                torch.log_softmax(o.logits[..., :TOKENIZER_VOCAB].float(), -1)
                cache.crop(-k)
        for k in ks:
            out[k] = timeit(lambda: step(k), repeats=repeats)
    return out


def prompt_cost(model, prompt_len: int, repeats: int) -> float:
    """Seconds of the prompt pass (all but the last token into a fresh cache), as every decoder here starts."""
    prompt = torch.randint(2, TOKENIZER_VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return timeit(lambda: RowCache(model, prompt, prompt_len + 1), repeats=repeats)


def round_cost(k: int, kept: int, t_large: dict, t_small: dict) -> float:
    """One speculative round's forwards: k one-token drafts by S_tuned, one (k+1)-token forward of L and of S,
    and S_tuned's forward after the last draft when all k were kept."""
    return k * t_small[1] + t_large[k + 1] + t_small[k + 1] + (t_small[1] if kept == k else 0.0)


def predicted_per_token(stats: SpeculativeStats, t_large: dict, t_small: dict) -> float:
    """Seconds per emitted token of the rounds in `stats` (decoding steps only, no prompt pass)."""
    cost = sum(round_cost(k, a, t_large, t_small) for k, a in zip(stats.drafted_per_round, stats.accepted_per_round))
    return cost / stats.emitted


# ---------------------------------------------------------------------------------------------
# 3. End to end at the Pythia shapes
# ---------------------------------------------------------------------------------------------
def decode_large_alone(large, ids, mask, new_tokens: int):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=1,
                              cache_implementation="static", disable_compile=True)
    return large.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def bench_end_to_end(models, t_large, t_small, p_large, p_small, traces, prompt_len, new_tokens, repeats,
                     batch: int) -> list[tuple]:
    """Predicted and measured time per token, the prompt pass included (p_large, p_small: its seconds, batch 1)
    in both; the lab rows price the decoding steps only, against t_L(1)."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, TOKENIZER_VOCAB, (batch, prompt_len), generator=g).tolist()
    ids, mask = left_pad(prompts, 1)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=NEVER_EOS, pad_token_id=1, vocab_size=TOKENIZER_VOCAB)
    large = models[0]
    n = batch * new_tokens
    with torch.inference_mode():
        t_alone = timeit(lambda: decode_large_alone(large, ids, mask, new_tokens), repeats=repeats)
        t_plain = timeit(lambda: steered_generate(*models, ids, mask, Blend.from_alpha(1.0), **kw), repeats=repeats)
    alone = (p_large + new_tokens * t_large[1]) / new_tokens  # predicted, batch 1
    plain = (p_large + 2 * p_small + new_tokens * (t_large[1] + 2 * t_small[1])) / new_tokens
    one = batch == 1
    rows = [(f"batch {batch}: L alone `generate`", f"{1e3 * alone:.0f} ms" if one else "", "1.00" if one else "",
             f"{1e3 * t_alone / n:.0f} ms", "1.00", ""),
            (f"batch {batch}: plain steered loop (alpha = 1)", f"{1e3 * plain:.0f} ms" if one else "",
             f"{plain / alone:.2f}" if one else "", f"{1e3 * t_plain / n:.0f} ms", f"{t_plain / t_alone:.2f}", "")]
    for label, blend in (("alpha = 1 (random weights: drafts rarely kept)", Blend.from_alpha(1.0)),
                         ("draft-heavy blend (drafts almost always kept)", DRAFT_HEAVY)):
        stats = SpeculativeStats()
        with torch.inference_mode():
            t_spec = timeit(lambda: speculative_generate(*models, ids, mask, blend, stats=stats, **kw),
                            repeats=repeats)
        runs = repeats + 1  # timeit's warmup run filled the stats too
        pred = (batch * (p_large + 2 * p_small) + predicted_per_token(stats, t_large, t_small) * stats.emitted / runs) / n
        rows.append((f"batch {batch}: speculative K = 2, {label}, kept {stats.acceptance:.2f}",
                     f"{1e3 * pred:.0f} ms", f"{pred / alone:.2f}" if one else "", f"{1e3 * t_spec / n:.0f} ms",
                     f"**{t_spec / t_alone:.2f}**", ""))
    if batch == 1:
        for name, stats in traces.items():
            if name.startswith("greedy") or name.startswith("sampling"):
                pred = predicted_per_token(stats, t_large, t_small)
                rows.append((f"decoding steps priced with the lab's rounds, {name} (kept {stats.acceptance:.2f})",
                             f"{1e3 * pred:.0f} ms", f"**{pred / t_large[1]:.2f}** of t_L(1)", "", "", "<= 0.8"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="tiny shapes, a few tokens, no record")
    parser.add_argument("--large", default="pythia-410m")
    parser.add_argument("--small", default="pythia-70m")
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=32, help="new tokens of the end-to-end runs")
    parser.add_argument("--lab_prompts", type=int, default=8)
    parser.add_argument("--lab_new_tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="end-to-end batch sizes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no_record", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads or args.ci:  # tiny shapes gain nothing from threads
        torch.set_num_threads(args.threads or 1)
    if args.ci:
        args.large, args.small, args.prompt_len, args.new_tokens, args.repeats = "tiny-large", "tiny", 16, 6, 1
        args.lab_prompts, args.lab_new_tokens = 2, 8
    t0 = time.perf_counter()
    lab_rows, traces = [], {}
    if (LAB / "small_tuned" / "final").is_dir():
        lab_models, tokenizer, prompts, blend = load_lab(args.lab_prompts, args.lab_new_tokens)
        lab_rows, traces = bench_acceptance(lab_models, tokenizer, prompts, blend, args.lab_new_tokens)
        lab_title = f"lab blend {blend.describe()}, {len(prompts)} validation prompts, {args.lab_new_tokens} new tokens"
    else:
        lab_title = "no lab models (outputs/lab): acceptance not measured"
    models = (random_model(args.large, seed=0), random_model(args.small, seed=1), random_model(args.small, seed=2))
    ks = range(1, 10)  # a round with k drafts runs k + 1 tokens through L and S
    t_large = forward_costs(models[0], args.prompt_len, ks, args.repeats)
    t_small = forward_costs(models[1], args.prompt_len, ks, args.repeats)
    cost_rows = [(f"t(k) ms, k = {', '.join(map(str, ks))}", f"L: {', '.join(f'{1e3 * t_large[k]:.0f}' for k in ks)}",
                  f"S: {', '.join(f'{1e3 * t_small[k]:.1f}' for k in ks)}", "", "", "")]
    p_large, p_small = (prompt_cost(m, args.prompt_len, args.repeats) for m in models[:2])
    cost_rows.append((f"prompt pass, {args.prompt_len - 1} tokens", f"L: {1e3 * p_large:.0f} ms",
                      f"S: {1e3 * p_small:.0f} ms", "", "", ""))
    # Batches: speculative rounds run row by row, the plain loop runs the batch's rows in one step each.
    t8_large, t8_small = (forward_costs(m, args.prompt_len, [1], args.repeats, batch=8)[1] for m in models[:2])
    plain8 = (t8_large + 2 * t8_small) / 8
    best = min((predicted_per_token(s, t_large, t_small), name) for name, s in traces.items()) if traces else None
    cost_rows.append(("batch 8: one step of the plain loop, per token ((t_L + 2 t_S) / 8 at batch 8)",
                      f"{1e3 * plain8:.0f} ms", f"{plain8 / t_large[1]:.2f} of t_L(1)",
                      f"speculative row by row, best lab rounds ({best[1]}): {1e3 * best[0]:.0f} ms" if best else "",
                      "", ""))
    e2e = []
    for batch in args.batches:
        e2e += bench_end_to_end(models, t_large, t_small, p_large, p_small, traces, args.prompt_len,
                                args.new_tokens, args.repeats, batch)
    header1 = ("what", "kept / drafted", "tokens / round", "greedy = plain", "time / token", "vs plain alone", "")
    header2 = ("what", "predicted / token", "predicted vs L alone", "measured / token", "measured vs L alone",
               "target")
    load = os.getloadavg()
    notes = (f"torch threads {torch.get_num_threads()}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
             f"{time.perf_counter() - t0:.0f} s in all. Part 1: {lab_title}; rows alone unless a batch is named; "
             f"`vs plain alone` = time over the plain loop's on the same rows one at a time. Part 2/3: "
             f"L={args.large}, S={args.small} shapes, random weights, {args.prompt_len}-token prompts, "
             f"{args.new_tokens} new tokens. Predicted = the forwards only (round_cost over the rounds "
             "actually run, priced with part 2's t(k), plus the prompt passes); measured includes the per-position "
             "blend and processing. End-to-end speculative rows use the default k = 2 (speculative.DEFAULT_DRAFT_TOKENS).")
    if args.ci or args.no_record:
        for r in lab_rows + cost_rows + e2e:
            print(" | ".join(str(c) for c in r))
        print(notes)
    else:
        print(record("Speculative steering: acceptance on the lab (part 1)", lab_rows, header1, ""))
        print(record(f"Speculative steering: cost at {args.large}/{args.small} shapes (parts 2-3)", cost_rows + e2e,
                     header2, notes))


if __name__ == "__main__":
    main()
