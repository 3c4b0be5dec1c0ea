"""Speculative steering (proxytune/steering/speculative.py) vs the plain steered loop and L alone, side by side in one
run (issue 14).

    python bench/bench_speculative.py --threads 1      # lab acceptance + Pythia-shape costs + end-to-end; records
    python bench/bench_speculative.py --ci             # tiny shapes, seconds, no record (CI keeps it from rotting)

1. Acceptance on the lab's trained models (outputs/lab: S, S_tuned, L and the tuned blend) on real validation
   prompts: kept drafts per round and per-token agreement of S_tuned's draft with the blend, greedy and sampling,
   whether greedy speculative outputs equal the plain loop's, rows alone and as one batch.
2. Cost at the real Pythia shapes (random weights; 410m and 1.4b for L, 70m for S): one forward of k tokens per
   row on a warm cache (speculative.BatchCache, cut back after each call), t_L(k) and t_S(k), k = 1..9, batch 1
   and 8, and one row's prompt pass.
3. Time per token predicted from 1 and 2 (the lab's own rounds, priced at the Pythia shapes' t(k)), next to the
   measured end-to-end times of L alone (`generate`), the plain steered loop and speculative steering at those
   shapes: rounds over the whole batch and, for batches, rows one at a time. Random weights agree with nothing,
   so the speculative runs replay the lab's kept-draft counts (`Replay`): everything runs as in a real call but
   the accept/reject decision, and the cost model is checked against the wall time.

Targets (issue 14): speculative steered / L alone <= 0.8 at batch 1 and <= 1.0 at batch 8, 410m/70m shapes (and
1.4b/70m), with the lab's acceptance.

4. `--fallback` (issue 29; runs only this part): the default (adaptive draft length, plain steps where drafts do
   not pay: speculative.DraftSchedule) next to a fixed k = 2 (the former default), the plain steered loop
   (--speculative false) and L alone (`generate`), side by side, the systems interleaved and repeated (median),
   at three acceptances: 0 (random weights: S_tuned disagrees with the blend), the lab's (about 0.7 per token,
   replayed) and about 1 (a blend S_tuned dominates: every draft agrees). Target: the default <= 1.05x the
   plain loop at acceptance 0.

    python bench/bench_speculative.py --fallback --threads 1    # 410m/70m shapes, batch 1: about 5 minutes

5. `--pair` (issue 29; runs only this part): S_tuned a LoRA adapter on S, so one forward of 2B rows serves both
   (steering/shared_base.py), against two forwards (the adapter merged, as before), in the plain loop and the
   default speculative decoding (the lab's acceptance replayed), next to L alone. Targets at 410m/70m batch 1:
   plain <= 1.10x L alone, speculative <= 0.85x.

    python bench/bench_speculative.py --pair --threads 1        # 410m/70m shapes, batch 1: about 4 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, TOKENIZER_VOCAB, random_model, record, timeit, wait_for_device  # noqa: E402

from proxytune.models.loading import load_causal_lm, load_tokenizer
from proxytune.steering import speculative
from proxytune.steering.blend import Blend
from proxytune.steering.decoding import left_pad, steered_generate
from proxytune.steering.shared_base import paired_adapter, share_or_merge
from proxytune.steering.speculative import BatchCache, SpeculativeStats, speculative_generate
from proxytune.task.sources import load_saved_split

LAB = ROOT / "outputs" / "lab"
NEVER_EOS = TOKENIZER_VOCAB + 10  # an id past the sliced vocabulary: every run decodes exactly N tokens
DRAFT_HEAVY = Blend(large_weight=1e-3, tuned_weight=1.0, base_weight=1e-3)


def on_device(model, device: str):
    """A random model on `device`: as built (float32) on the CPU, bfloat16 on a GPU (how one is run there)."""
    return model.to(device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)


def device_name(device: str) -> str:
    """'' on the CPU; ' on <GPU name> (bf16)' on a GPU, for a record's title: one record per device."""
    return "" if device == "cpu" else f" on {torch.cuda.get_device_name(torch.device(device))} (bf16)"


def interleaved(systems: dict, repeats: int, device: str) -> dict:
    """Seconds of each system's runs: all once as a warm-up, then each once per repetition in turn (so a busy
    machine's slow minute hits them alike) -> {key: [seconds, ...]}."""
    times = {key: [] for key in systems}
    with torch.inference_mode():
        for fn in systems.values():  # warm-up: every shape each system runs
            fn()
        wait_for_device(device)
        for _ in range(repeats):
            for key, fn in systems.items():
                t0 = time.perf_counter()
                fn()
                wait_for_device(device)
                times[key].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------
# 1. Acceptance on the lab's models
# ---------------------------------------------------------------------------------------------
def load_lab(n_prompts: int, new_tokens: int):
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
    stats = SpeculativeStats()
    (tokens, _), t_spec = decode(speculative_generate, models, prompts, blend, new_tokens, eos, pad, vocab, stats=stats,
                              draft_tokens=2)
    same = sum(int(torch.equal(a[:len(b)], b) and not a[len(b):].ne(pad).any()) for a, b in zip(tokens, plain_greedy))
    rows.append((f"lab greedy, speculative K = 2, batch {len(prompts)} (rounds over the whole batch)",
                 f"{stats.acceptance:.3f}", f"{stats.tokens_per_round:.2f}", f"{same}/{len(prompts)}",
                 f"{1e3 * t_spec / n_tokens:.2f} ms", f"**{t_spec / t_plain:.2f}**", ""))
    sample = dict(do_sample=True, temperature=1.0, top_p=0.95)
    g = torch.Generator().manual_seed(0)
    (tokens, _), t_plain_s = decode(steered_generate, models, prompts[:1], blend, new_tokens, eos, pad, vocab,
                                    generator=g, **sample)
    for label, draft_tokens in (("K = 1", 1), ("adaptive K", None)):
        stats, t_spec = SpeculativeStats(), 0.0
        for p in one_by_one:
            _, t = decode(speculative_generate, models, p, blend, new_tokens, eos, pad, vocab,
                          draft_tokens=draft_tokens, stats=stats, generator=g, **sample)
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
    """k -> seconds of one forward of k new tokens per row, `batch` rows, after a `prompt_len`-token prompt, in the
    speculative decoder's own cache (BatchCache, cut back after each call; log-softmax included)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, TOKENIZER_VOCAB, (1, prompt_len), generator=g).expand(batch, -1)
    tokens = torch.arange(2, 2 + max(ks))[None].expand(batch, -1)
    out = {}
    with torch.inference_mode():
        cache = BatchCache(model, ids, torch.ones_like(ids), prompt_len + max(ks) + 1, TOKENIZER_VOCAB,
                           torch.device("cpu"))
        cache.pending = None  # the prompt pass's last log-probs (batch 1) are not what is timed here
        none_kept = torch.zeros(batch, dtype=torch.long)

        def step(k):
            start = cache.length
            cache.feed(tokens[:, :k], TOKENIZER_VOCAB, torch.device("cpu"))
            cache.keep(start, none_kept)

        for k in ks:
            out[k] = timeit(lambda: step(k), repeats=repeats)
    return out


def prompt_cost(model, prompt_len: int, repeats: int) -> float:
    """Seconds of one row's prompt pass into a fresh cache (the whole prompt, its last position's log-probs kept), as
    every decoder here starts at batch 1 (on CPU a batch's prompts are passed one row at a time, all but the last
    token: proxytune.steering.decoding.prefill_rows)."""
    ids = torch.randint(2, TOKENIZER_VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return timeit(lambda: BatchCache(model, ids, torch.ones_like(ids), prompt_len + 1, TOKENIZER_VOCAB,
                                         torch.device("cpu")), repeats=repeats)


def round_cost(k: int, bonus: bool, t_large: dict, t_small: dict) -> float:
    """One speculative round's forwards: k one-token drafts by S_tuned, one (k+1)-token forward of L and of S,
    and S_tuned's forward after the last draft when a row kept all k (the bonus position)."""
    return k * t_small[1] + t_large[k + 1] + t_small[k + 1] + (t_small[1] if bonus else 0.0)


def predicted_per_token(stats: SpeculativeStats, t_large: dict, t_small: dict) -> float:
    """Seconds per emitted token of the rounds in `stats` (decoding steps only, no prompt pass), each batch round
    priced at the t(k) of the batch size the costs were measured at."""
    cost = sum(round_cost(k, bonus, t_large, t_small) for _, k, bonus in stats.batch_rounds)
    return cost / stats.emitted


# ---------------------------------------------------------------------------------------------
# 3. End to end at the Pythia shapes, with the lab's acceptance replayed
# ---------------------------------------------------------------------------------------------
class Replay:
    """Random weights agree with nothing, so the drafts' fate is replayed from the lab: the i-th row-round keeps
    the lab's i-th count of kept drafts (cycled), whatever the models say. The models, caches, blend and
    processing all run as in a real call; only the accept/reject decision is taken from the lab."""

    def __init__(self, accepted: list[int], seed: int = 0):
        # Shuffled (seeded): a short run then samples the lab's rounds, not the first prompt's first rounds.
        order = torch.randperm(len(accepted), generator=torch.Generator().manual_seed(seed)).tolist()
        self.accepted, self.next, self.target = [accepted[i] for i in order], 0, {}

    def __call__(self, decoder, row: int, j: int, p, q, token) -> bool:
        if j == 0:
            self.target[row] = self.accepted[self.next % len(self.accepted)]
            self.next += 1
        return j < self.target[row]


@contextlib.contextmanager
def replaying(accepted: list[int]):
    """A context in which speculative rounds keep the replayed counts of drafts (RoundDecoder.accepts)."""

    replay, real = Replay(accepted), speculative.RoundDecoder.accepts
    speculative.RoundDecoder.accepts = lambda decoder, row, j, p, q, token: replay(decoder, row, j, p, q, token)
    try:
        yield
    finally:
        speculative.RoundDecoder.accepts = real


def decode_large_alone(large, ids, mask, new_tokens: int):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=1,
                              cache_implementation="static", disable_compile=True)
    return large.generate(input_ids=ids, attention_mask=mask, generation_config=config)


def bench_end_to_end(models, costs: dict, prompt_len: int, new_tokens: int, repeats: int, batch: int,
                     accepted: list[int], draft_tokens: int, shape: str = "") -> list[tuple]:
    """Predicted and measured time per token at one batch size, prompt passes included in both: L alone, the
    plain steered loop, speculative rounds over the whole batch and (batch > 1) rows one at a time, the latter
    two with the lab's kept-draft counts replayed."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(2, TOKENIZER_VOCAB, (batch, prompt_len), generator=g).tolist()
    ids, mask = left_pad(prompts, 1)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=NEVER_EOS, pad_token_id=1, vocab_size=TOKENIZER_VOCAB)
    large, blend = models[0], Blend.from_alpha(1.0)
    t_large, t_small, p_large, p_small = (costs[name][batch] for name in ("t_large", "t_small", "p_large", "p_small"))
    n = batch * new_tokens
    prompts_cost = batch * (p_large + 2 * p_small)
    with torch.inference_mode():
        t_alone = timeit(lambda: decode_large_alone(large, ids, mask, new_tokens), repeats=repeats)
        t_plain = timeit(lambda: steered_generate(*models, ids, mask, blend, **kw), repeats=repeats)
    alone = (batch * p_large + new_tokens * t_large[1]) / n
    plain = (prompts_cost + new_tokens * (t_large[1] + 2 * t_small[1])) / n
    rows = [(f"{shape}, batch {batch}: L alone `generate`", f"{1e3 * alone:.0f} ms", "1.00",
             f"{1e3 * t_alone / n:.0f} ms", "1.00", ""),
            (f"{shape}, batch {batch}: plain steered loop (alpha = 1)", f"{1e3 * plain:.0f} ms", f"{plain / alone:.2f}",
             f"{1e3 * t_plain / n:.0f} ms", f"**{t_plain / t_alone:.2f}**", "")]
    ways = [("rounds over the whole batch", lambda: speculative_generate(*models, ids, mask, blend, stats=stats,
                                                                         draft_tokens=draft_tokens, **kw))]
    if batch > 1:
        rows_alone = [left_pad([p], 1) for p in prompts]
        ways.append(("rows one at a time", lambda: [speculative_generate(*models, i, m, blend, stats=stats,
                                                                         draft_tokens=draft_tokens, **kw)
                                                    for i, m in rows_alone]))
    target = "<= 0.8" if batch == 1 else "<= 1.0"
    for label, fn in ways:
        stats = SpeculativeStats()
        with torch.inference_mode(), replaying(accepted):
            t_spec = timeit(fn, repeats=repeats)
        if label == "rows one at a time":  # priced at batch 1
            step = predicted_per_token(stats, costs["t_large"][1], costs["t_small"][1])
            pred = (batch * (costs["p_large"][1] + 2 * costs["p_small"][1]) + step * n) / n
        else:
            pred = (prompts_cost + predicted_per_token(stats, t_large, t_small) * n) / n
        rows.append((f"{shape}, batch {batch}: speculative K = {draft_tokens}, {label}, lab acceptance replayed "
                     f"(kept {stats.acceptance:.2f}, {stats.tokens_per_round:.2f} tokens / row-round)",
                     f"{1e3 * pred:.0f} ms", f"{pred / alone:.2f}", f"{1e3 * t_spec / n:.0f} ms",
                     f"**{t_spec / t_alone:.2f}**", target))
    return rows


def measure_costs(models, prompt_len: int, batches, repeats: int, ks) -> dict:
    costs = {"t_large": {}, "t_small": {}, "p_large": {}, "p_small": {}}
    p_large, p_small = (prompt_cost(m, prompt_len, repeats) for m in models[:2])
    for b in sorted(set(batches) | {1}):
        costs["t_large"][b] = forward_costs(models[0], prompt_len, ks, repeats, batch=b)
        costs["t_small"][b] = forward_costs(models[1], prompt_len, ks, repeats, batch=b)
        costs["p_large"][b], costs["p_small"][b] = p_large, p_small
    return costs


def cost_rows(costs: dict, shape: str, small: str, prompt_len: int, ks) -> list[tuple]:
    rows = []
    for b, t_large in costs["t_large"].items():
        t_small = costs["t_small"][b]
        rows.append((f"{shape}/{small}, batch {b}: t(k) ms, k = {', '.join(map(str, ks))}",
                     f"L: {', '.join(f'{1e3 * t_large[k]:.0f}' for k in ks)}",
                     f"S: {', '.join(f'{1e3 * t_small[k]:.1f}' for k in ks)}", "", "", ""))
    rows.append((f"{shape}/{small}: prompt pass, {prompt_len - 1} tokens, one row",
                 f"L: {1e3 * costs['p_large'][1]:.0f} ms", f"S: {1e3 * costs['p_small'][1]:.0f} ms", "", "", ""))
    return rows


def lab_rows_priced(traces: dict, costs: dict, shape: str) -> list[tuple]:
    rows = []
    for name, stats in traces.items():
        pred = predicted_per_token(stats, costs["t_large"][1], costs["t_small"][1])
        rows.append((f"{shape}, batch 1: decoding steps priced with the lab's rounds, {name} "
                     f"(kept {stats.acceptance:.2f})", f"{1e3 * pred:.0f} ms",
                     f"{pred / costs['t_large'][1][1]:.2f} of t_L(1)", "", "", ""))
    return rows


# ---------------------------------------------------------------------------------------------
# 4. The adaptive default and its fallback (issue 29)
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def replaying_rate(rate: float, seed: int = 0):
    """A context in which every position's agreement of the draft with the blend is drawn, independently, with
    probability `rate` (seeded), and a checked draft is kept exactly when it agreed: the acceptance a trained
    S_tuned would have, on random weights. RoundDecoder.agreement runs before RoundDecoder.accepts."""
    g = torch.Generator().manual_seed(seed)
    drawn = []
    real = speculative.RoundDecoder.agreement, speculative.RoundDecoder.accepts

    def agreement(decoder, p, q):  # (n, V) each, one row per position -> (n,), as the real one
        draws = [float(torch.rand(1, generator=g)) < rate for _ in range(p.shape[0])]
        drawn.extend(draws)
        return torch.tensor(draws, dtype=torch.float64)

    speculative.RoundDecoder.agreement = agreement
    speculative.RoundDecoder.accepts = lambda decoder, row, j, p, q, token: drawn[-1]
    try:
        yield
    finally:
        speculative.RoundDecoder.agreement, speculative.RoundDecoder.accepts = real


def bench_fallback(shape: str, small: str, prompt_len: int, new_tokens: int, batch: int, repeats: int,
                   lab_rate: float, device: str = "cpu") -> list[tuple]:
    """Seconds per token of L alone, the plain loop, the default and k = 2 at three acceptances, one batch size;
    every system runs once per repetition, in turn (so a busy machine's slow minute hits them alike); medians."""
    large, small_base, small_tuned = (on_device(random_model(shape, seed=0), device),
                                      on_device(random_model(small, seed=1), device),
                                      on_device(random_model(small, seed=2), device))
    models = (large, small_base, small_tuned)
    g = torch.Generator().manual_seed(1)
    ids, mask = left_pad(torch.randint(2, TOKENIZER_VOCAB, (batch, prompt_len), generator=g).tolist(), 1)
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=NEVER_EOS, pad_token_id=1, vocab_size=TOKENIZER_VOCAB)
    proxy = Blend.from_alpha(1.0)
    scenarios = {"acceptance 0 (random weights, alpha = 1)": (proxy, None),
                 f"lab acceptance ({lab_rate:.2f} per token, replayed)": (proxy, lab_rate),
                 "acceptance ~1 (a blend S_tuned dominates)": (DRAFT_HEAVY, None)}
    systems = {"L alone `generate`": lambda: decode_large_alone(large, ids, mask, new_tokens),
               "plain steered loop (--speculative false)": lambda: steered_generate(*models, ids, mask, proxy, **kw)}
    stats = {}
    for name, (blend, rate) in scenarios.items():
        for label, draft_tokens in (("default (adaptive)", None), ("k = 2 fixed (the former default)", 2)):
            def run(blend=blend, rate=rate, draft_tokens=draft_tokens, key=(name, label)):
                stats[key] = SpeculativeStats()
                with contextlib.ExitStack() as stack:
                    if rate is not None:
                        stack.enter_context(replaying_rate(rate))
                    speculative_generate(*models, ids, mask, blend, draft_tokens=draft_tokens, stats=stats[key],
                                         **kw)
            systems[(name, label)] = run
    times = interleaved(systems, repeats, device)
    per_token = {key: statistics.median(t) / (batch * new_tokens) for key, t in times.items()}
    alone, plain = per_token["L alone `generate`"], per_token["plain steered loop (--speculative false)"]
    head = f"{shape}/{small}, batch {batch}"
    rows = [(f"{head}: L alone `generate`", "", "", f"{1e3 * alone:.0f} ms", f"{alone / plain:.2f}", "1.00", ""),
            (f"{head}: plain steered loop (--speculative false)", "", "", f"{1e3 * plain:.0f} ms", "1.00",
             f"**{plain / alone:.2f}**", "")]
    for key, t in per_token.items():
        if isinstance(key, str):
            continue
        name, label = key
        st = stats[key]
        target = "<= 1.05 of plain" if name.startswith("acceptance 0") and label.startswith("default") else ""
        rows.append((f"{head}, {name}: {label}", f"{st.acceptance:.2f}",
                     f"{st.plain_steps} / {len(st.batch_rounds)}", f"{1e3 * t:.0f} ms", f"**{t / plain:.2f}**",
                     f"{t / alone:.2f}", target))
    return rows


def main_fallback(args) -> None:
    t0 = time.perf_counter()
    shapes = ", ".join(args.large) if args.device != "cpu" else args.large[0]
    dtype = "" if args.device == "cpu" else " in bfloat16"
    rows = []
    for batch in args.batches:
        for shape in args.large if args.device != "cpu" else args.large[:1]:
            rows += bench_fallback(shape, args.small, args.prompt_len, args.new_tokens if batch == 1
                                   else args.batch_new_tokens, batch, args.repeats, args.lab_rate, args.device)
    header = ("what", "kept / drafted", "plain steps / rounds", "time / token", "vs plain loop", "vs L alone",
              "target")
    load = os.getloadavg()
    notes = (f"torch threads {torch.get_num_threads()}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
             f"{time.perf_counter() - t0:.0f} s in all. L = {shapes}, S = S_tuned = {args.small} shapes, "
             f"random weights{dtype}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens at batch 1, "
             f"{args.batch_new_tokens} at bigger batches, greedy, no EOS; every system run once per repetition in "
             f"turn, {args.repeats} repetitions after a warm-up, medians; prompt passes included. `kept / drafted` "
             "and `plain steps / rounds` are of the last repetition. The lab's acceptance is replayed as independent "
             "per-token agreements at its rate (the models, caches, blend and processing all run; only the "
             "agreement is drawn).")
    if args.ci or args.no_record:
        for r in rows:
            print(" | ".join(str(c) for c in r))
        print(notes)
    else:
        print(record(f"Speculative steering falls back: the adaptive default vs k = 2, the plain loop and L alone, "
                     f"{shapes}/{args.small} shapes{device_name(args.device)} (part 4)", rows, header, notes))


# ---------------------------------------------------------------------------------------------
# 5. A LoRA S_tuned: one forward for S and S_tuned (issue 29, steering/shared_base.py)
# ---------------------------------------------------------------------------------------------
def lora_on(base, seed: int = 3, rank: int = 16):
    """S_tuned as fine_tune.py --use_lora makes it (rank 16 on every linear layer of the blocks), random adapters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                        target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    return get_peft_model(copy.deepcopy(base), config).eval()


def bench_pair(shape: str, small: str, prompt_len: int, new_tokens: int, batch: int, repeats: int,
               lab_rate: float, device: str = "cpu") -> list[tuple]:
    """Seconds per token with a LoRA S_tuned on S: paired (one forward of 2B rows) vs two forwards (the adapter
    merged, as loading did before), in the plain loop and the default speculative decoding at the lab's acceptance
    (replayed), next to L alone; interleaved, medians."""
    large, small_base = on_device(random_model(shape, seed=0), device), on_device(random_model(small, seed=1), device)
    tuned = share_or_merge(small_base, lora_on(small_base))
    assert paired_adapter(small_base, tuned), "the LoRA S_tuned was not paired with S"
    merged = copy.deepcopy(tuned).merge_and_unload().eval()
    g = torch.Generator().manual_seed(1)
    ids, mask = left_pad(torch.randint(2, TOKENIZER_VOCAB, (batch, prompt_len), generator=g).tolist(), 1)
    ids, mask = ids.to(device), mask.to(device)
    kw = dict(max_new_tokens=new_tokens, eos_token_id=NEVER_EOS, pad_token_id=1, vocab_size=TOKENIZER_VOCAB)
    blend = Blend.from_alpha(1.0)
    stats = {}

    def speculate(small_tuned, key):
        def run():
            stats[key] = SpeculativeStats()
            with replaying_rate(lab_rate):
                speculative_generate(large, small_base, small_tuned, ids, mask, blend, stats=stats[key], **kw)
        return run

    systems = {
        "L alone `generate`": lambda: decode_large_alone(large, ids, mask, new_tokens),
        "plain steered loop, S and S_tuned two forwards (merged adapter)":
            lambda: steered_generate(large, small_base, merged, ids, mask, blend, **kw),
        "plain steered loop, S and S_tuned one paired forward":
            lambda: steered_generate(large, small_base, tuned, ids, mask, blend, **kw),
        "default speculative, lab acceptance replayed, two forwards (merged adapter)": speculate(merged, "two"),
        "default speculative, lab acceptance replayed, one paired forward": speculate(tuned, "one"),
    }
    times = interleaved(systems, repeats, device)
    per_token = {key: statistics.median(t) / (batch * new_tokens) for key, t in times.items()}
    alone = per_token["L alone `generate`"]
    targets = {"plain steered loop, S and S_tuned one paired forward": "<= 1.10" if batch == 1 else "",
               "default speculative, lab acceptance replayed, one paired forward": "<= 0.85" if batch == 1 else ""}
    rows = []
    for key, t in per_token.items():
        st = stats.get("one" if key.endswith("paired forward") and "speculative" in key else
                       "two" if "speculative" in key else "")
        rounds = f"{st.plain_steps} / {len(st.batch_rounds)}" if st else ""
        kept = f"{st.acceptance:.2f}" if st else ""
        rows.append((f"{shape}/{small} + LoRA r16, batch {batch}: {key}", kept, rounds, f"{1e3 * t:.0f} ms",
                     f"**{t / alone:.2f}**", targets.get(key, "")))
    return rows


def main_pair(args) -> None:
    t0 = time.perf_counter()
    rows = []
    for batch in args.batches:
        rows += bench_pair(args.large[0], args.small, args.prompt_len, args.new_tokens if batch == 1
                           else args.batch_new_tokens, batch, args.repeats, args.lab_rate, args.device)
    header = ("what", "kept / drafted", "plain steps / rounds", "time / token", "vs L alone", "target")
    load = os.getloadavg()
    notes = (f"torch threads {torch.get_num_threads()}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
             f"{time.perf_counter() - t0:.0f} s in all. L = {args.large[0]}, S = {args.small} shapes, random "
             f"weights{'' if args.device == 'cpu' else ' in bfloat16'}; S_tuned = a rank-16 LoRA on S (every "
             "linear layer of the blocks, random adapters); "
             f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens at batch 1, {args.batch_new_tokens} at "
             f"bigger batches, greedy, no EOS, alpha = 1; speculative rows replay the lab's acceptance "
             f"({args.lab_rate:.2f} per token) as independent per-token agreements. Two forwards: the adapter merged "
             "into a copy of S (how a LoRA S_tuned loaded before); paired: one forward of 2B rows with PEFT's "
             "adapter_names (steering/shared_base.py). Every system once per repetition in turn, "
             f"{args.repeats} repetitions after a warm-up, medians; prompt passes included.")
    if args.ci or args.no_record:
        for r in rows:
            print(" | ".join(str(c) for c in r))
        print(notes)
    else:
        print(record(f"A LoRA S_tuned: one paired forward for S and S_tuned vs two, {args.large[0]}/{args.small} "
                     f"shapes{device_name(args.device)} (part 5)", rows, header, notes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="tiny shapes, a few tokens, no record")
    parser.add_argument("--large", nargs="+", default=["pythia-410m", "pythia-1.4b"], help="L shapes")
    parser.add_argument("--small", default="pythia-70m")
    parser.add_argument("--prompt_len", type=int, default=256)
    parser.add_argument("--new_tokens", type=int, default=64, help="new tokens of the end-to-end runs at batch 1")
    parser.add_argument("--batch_new_tokens", type=int, default=32, help="new tokens of the end-to-end runs at "
                        "batches over 1 (fewer: a batch-8 run of 410m is minutes per system on CPU)")
    parser.add_argument("--lab_prompts", type=int, default=8)
    parser.add_argument("--lab_new_tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="end-to-end batch sizes")
    parser.add_argument("--batch_shapes", nargs="+", default=["pythia-410m"],
                        help="L shapes run end to end at batches over 1 (the others: batch 1 only)")
    parser.add_argument("--draft_tokens", type=int, default=2, help="the fixed k of the end-to-end runs of parts 2-3 "
                        "(the lab's rounds of that k are replayed; the adaptive default is part 4's)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no_record", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--fallback", action="store_true", help="part 4 only (issue 29): the adaptive default vs "
                        "k = 2, the plain loop and L alone at acceptance 0, the lab's and ~1; --large's first shape, "
                        "--batches (default here: 1), --new_tokens 32, --prompt_len 128, --repeats 3 unless given")
    parser.add_argument("--pair", action="store_true", help="part 5 only (issue 29): a LoRA S_tuned on S, one "
                        "paired forward vs two, plain loop and default speculative decoding; defaults as --fallback")
    parser.add_argument("--lab_rate", type=float, default=0.69, help="part 4: the per-token acceptance replayed as "
                        "the lab's (0.69: bench/RESULTS.md, part 1, greedy K = 2)")
    parser.add_argument("--device", default="cpu", help="parts 4 and 5 only: where the models run; on a GPU "
                        "(cuda) in bfloat16, every --large shape (part 4; the CPU runs the first), titled with the GPU")
    args = parser.parse_args()
    if args.device != "cpu" and not (args.fallback or args.pair):
        parser.error("--device is for --fallback and --pair (parts 4 and 5)")
    if args.threads or args.ci:  # tiny shapes gain nothing from threads
        torch.set_num_threads(args.threads or 1)
    if args.ci:
        args.large, args.batch_shapes, args.small = ["tiny-large"], ["tiny-large"], "tiny"
        args.prompt_len, args.new_tokens, args.batch_new_tokens, args.repeats = 16, 6, 6, 1
        args.lab_prompts, args.lab_new_tokens = 2, 8
    if args.fallback or args.pair:
        given = set(sys.argv[1:]) | ({"--new_tokens", "--prompt_len"} if args.ci else set())
        if "--batches" not in given:
            args.batches = [1]
        if "--new_tokens" not in given:
            args.new_tokens = 32
        if "--prompt_len" not in given:
            args.prompt_len = 128
        if "--repeats" not in given:
            args.repeats = 3
        if args.ci:
            args.repeats = 1
        return main_pair(args) if args.pair else main_fallback(args)
    t0 = time.perf_counter()
    lab_rows, traces = [], {}
    if (LAB / "small_tuned" / "final").is_dir():
        lab_models, tokenizer, prompts, blend = load_lab(args.lab_prompts, args.lab_new_tokens)
        lab_rows, traces = bench_acceptance(lab_models, tokenizer, prompts, blend, args.lab_new_tokens)
        lab_title = f"lab blend {blend.describe()}, {len(prompts)} validation prompts, {args.lab_new_tokens} new tokens"
        del lab_models
    else:
        lab_title = "no lab models (outputs/lab): acceptance not measured"
    replayed = f"greedy K = {args.draft_tokens}"
    if replayed in traces:
        accepted, source = traces[replayed].accepted_per_round, f"the lab's {replayed} rounds"
    else:  # no lab here: the first measurement's agreement (79% per token) as a fixed pattern
        accepted, source = [2, 1, 2, 0, 2], "a fixed pattern (no lab models here)"
    ks = range(1, 10)  # a round with k drafts runs k + 1 tokens through L and S
    rows = []
    small_models = (random_model(args.small, seed=1), random_model(args.small, seed=2))
    for shape in args.large:
        models = (random_model(shape, seed=0), *small_models)
        batches = args.batches if shape in args.batch_shapes else [1]
        costs = measure_costs(models, args.prompt_len, batches, args.repeats + 1, ks)
        rows += cost_rows(costs, shape, args.small, args.prompt_len, ks)
        rows += lab_rows_priced(traces, costs, shape)
        for batch in batches:
            new_tokens = args.new_tokens if batch == 1 else args.batch_new_tokens
            rows += bench_end_to_end(models, costs, args.prompt_len, new_tokens, args.repeats, batch, accepted,
                                     args.draft_tokens, shape)
        del models
    header1 = ("what", "kept / drafted", "tokens / round", "greedy = plain", "time / token", "vs plain alone", "")
    header2 = ("what", "predicted / token", "predicted vs L alone", "measured / token", "measured vs L alone",
               "target")
    load = os.getloadavg()
    notes = (f"torch threads {torch.get_num_threads()}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
             f"{time.perf_counter() - t0:.0f} s in all. Part 1: {lab_title}; rows alone unless a batch is named; "
             f"`vs plain alone` = time over the plain loop's on the same rows one at a time. Parts 2-3: "
             f"L = {', '.join(args.large)}, S = {args.small} shapes, random weights, {args.prompt_len}-token "
             f"prompts, {args.new_tokens} new tokens at batch 1, {args.batch_new_tokens} at bigger batches; "
             f"speculative rows replay {source} (kept-draft counts per "
             "row-round; the models, caches, blend and processing all run). Predicted = the forwards only, priced "
             "with part 2's t(k) at the batch size run (rows one at a time: at batch 1), plus one prompt pass per "
             "row and model; measured = wall time, prompt passes included.")
    if args.ci or args.no_record:
        for r in lab_rows + rows:
            print(" | ".join(str(c) for c in r))
        print(notes)
    else:
        print(record("Speculative steering: acceptance on the lab (part 1)", lab_rows, header1, ""))
        print(record(f"Speculative steering: cost and end to end at {', '.join(args.large)}/{args.small} shapes "
                     "(parts 2-3)", rows, header2, notes))


if __name__ == "__main__":
    main()
