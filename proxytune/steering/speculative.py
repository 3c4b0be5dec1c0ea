"""Exact speculative steering: the small tuned model drafts, the blend verifies (issue 14).

The blend is L + alpha * (S_tuned - S), so S_tuned alone is a cheap draft close to it. Each round:

    1. S_tuned drafts k tokens, one forward of one token each, with its own KV cache. Its log-probs at those
       positions are the ones the blend needs anyway.
    2. L and S each run ONE forward over [last accepted token, k drafted tokens] (k + 1 positions).
    3. The blend (blend.blend_logprobs) and the per-step processing (decoding.process_scores: repetition
       penalty, n-gram ban) are computed at every position, in order, exactly as the plain loop would see them.
    4. The longest drafted prefix the blend agrees with is kept, plus one token from the blend at the first
       disagreement (or a bonus token when all k were accepted); every cache is cut back to the accepted length.

Greedy: a draft token is kept when it is the argmax of the processed blend, and the token emitted at a
disagreement is that argmax, so every emitted token is the one decoding.steered_generate would have chosen.
Sampling: the speculative-sampling rule (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318) with the warped blend p* as target and S_tuned's identically processed and warped
distribution q as draft: keep x with probability min(1, p*(x) / q(x)); on rejection sample from
normalize(max(0, p* - q)); the bonus token comes from p*. Each emitted token is then distributed as p*, so
the output has the plain loop's distribution (not its samples: the random draws differ).

A batch runs its rows together in every round. Rows keep different numbers of drafts; instead of cutting each
row's cache to its own length, the slots a row did not keep are masked out like left padding (BatchCache),
so one forward per model and round serves the whole batch. bench/bench_speculative.py measures this against
the plain batched loop and against rows decoded one at a time.

The draft length (issue 29): by default DraftSchedule picks each round's k from the measured acceptance and the
measured time of rounds, k = 0 being a plain steered step (one token per model, the plain loop's cost), so where
drafts do not pay (an S_tuned that disagrees with the blend, sampling at a high temperature, a CPU on which a
forward of k + 1 tokens costs k + 1 times one) decoding goes on with plain steps, and comes back to drafting
when S_tuned agrees again (a plain step measures the agreement for free).

    python bench/bench_speculative.py             # acceptance on the lab's models, t_L(k), t_S(k), end-to-end
    python steer.py --blend outputs/steer/blend.json --prompt "..." --speculative false   # the plain loop
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from proxytune.foundation.errors import UsageError
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend, blend_logprobs, slice_vocab
from proxytune.steering.decoding import (
    NgramBlocker,
    check_decoding_args,
    models_to_run,
    positions_from_mask,
    prefill_rows,
    prefill_separately,
    process_scores,
    steered_generate,
    warp_scores,
)
from proxytune.steering.shared_base import forward_kwargs, pair_names, paired, paired_adapter, split_pair

# The default draft length: adaptive (DraftSchedule); a number fixes k per round.
DEFAULT_DRAFT_TOKENS: int | None = None


MAX_DRAFT_TOKENS = 8


class UndoableNgramBlocker(NgramBlocker):
    """An NgramBlocker for one row whose appended tokens can be taken back (`truncate`): drafted tokens are
    pushed while drafting and verifying, and the rejected ones popped."""

    def __init__(self, n: int, prompt: torch.Tensor):
        self.log: list[tuple[tuple, int]] = []  # (prefix, token) entries that were new when added
        super().__init__(n, prompt[None], torch.ones_like(prompt)[None])
        self.log.clear()  # the prompt's n-grams stay

    def _add(self, row: int, gram: list[int]) -> None:
        banned = self.seen[row].setdefault(tuple(gram[:-1]), set())
        if gram[-1] not in banned:
            banned.add(gram[-1])
            self.log.append((tuple(gram[:-1]), gram[-1]))

    def mark(self) -> tuple[int, int]:
        return len(self.seqs[0]), len(self.log)

    def truncate(self, mark: tuple[int, int]) -> None:
        length, n_log = mark
        del self.seqs[0][length:]
        for prefix, token in reversed(self.log[n_log:]):
            self.seen[0][prefix].discard(token)
        del self.log[n_log:]


class RowState:
    """What the per-step processing of one row depends on: the tokens seen (repetition penalty) and the n-grams
    made (no_repeat_ngram_size), after the prompt and the tokens pushed so far. `pop_to(n)` keeps n pushed ones."""

    def __init__(self, prompt: torch.Tensor, vocab_size: int, repetition_penalty: float, no_repeat_ngram_size: int):
        self.repetition_penalty = repetition_penalty
        self.seen = None
        if repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=prompt.device)  # (1, V)
            self.seen[0, prompt] = True
        self.blocker = UndoableNgramBlocker(no_repeat_ngram_size, prompt) if no_repeat_ngram_size else None
        self.pushed: list[tuple[int, bool, tuple[int, int] | None]] = []  # (token, newly seen, blocker mark)

    @property
    def stateless(self) -> bool:
        """No repetition penalty and no n-gram ban: the processing is the identity."""
        return self.seen is None and self.blocker is None

    def scores(self, logp: torch.Tensor) -> torch.Tensor:
        """(1, V) blended log-probs -> (1, V) processed scores at the current position."""
        return process_scores(logp, self.seen, self.repetition_penalty, self.blocker, [0])

    def push(self, token: int) -> None:
        newly_seen = self.seen is not None and not bool(self.seen[0, token])
        mark = self.blocker.mark() if self.blocker is not None else None
        if newly_seen:
            self.seen[0, token] = True
        if self.blocker is not None:
            self.blocker.append([token], [0])
        self.pushed.append((token, newly_seen, mark))

    def pop_to(self, n: int) -> None:
        while len(self.pushed) > n:
            token, newly_seen, mark = self.pushed.pop()
            if newly_seen:
                self.seen[0, token] = False
            if mark is not None:
                self.blocker.truncate(mark)


class BatchCache:
    """One model's KV cache over a LEFT-padded batch whose rows keep different numbers of each round's tokens.

    Every row writes a round's slots; the slots a row does not keep are masked out (attention mask 0, as left
    padding is) instead of removed, and the cache is cut back to the longest kept prefix, so the next round
    overwrites what no row kept. Position ids count a row's kept tokens only, so each row's keys, values and
    logits are those of the row decoded alone. The masked slots use room; when a round would not fit,
    `reserve` moves every row's kept slots to the right end (the left-padded layout again, as prefill_rows
    builds it). A batch of one never has masked slots: its cache is a plain prefix cache.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int,
                 vocab_size: int, device: torch.device, adapter_names: list[str] | None = None):
        from transformers import StaticCache

        self.model, self.capacity = model, capacity
        self.extra = forward_kwargs(adapter_names)  # a paired S/S_tuned batch (shared_base.py): each row's adapter
        ids, mask = input_ids.to(model.device), attention_mask.to(model.device)  # (B, T) each
        self.pending = None  # (B, 1, V) log-probs after the last column when the prompt pass computed them
        if prefill_separately(model, ids):
            # Every row's prompt but its last token, row by row; the first round feeds the last column (as
            # ModelStream does).
            self.cache = prefill_rows(model, ids, mask, capacity, adapter_names)
            self.mask = mask[:, :-1].clone()  # (B, length) 1 where a slot holds a kept token
        else:
            # The whole prompt in one pass, its last position's log-probs kept for the first round (as the plain
            # loop's first step): no forward of the last token alone.
            self.cache = StaticCache(config=model.config, max_cache_len=capacity)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), cache=self.cache,
                        use_cache=True, logits_to_keep=1, **self.extra)
            self.cache = out.cache
            self.pending = torch.log_softmax(slice_vocab(out.logits, vocab_size).float(), dim=-1).to(device)
            self.mask = mask.clone()
        self.kept = self.mask.sum(-1)  # (B,) kept tokens per row: the next token's position id
        self.masked = not bool(self.mask.all())  # whether any slot is masked out: kept on the host (keep, reserve)

    @property
    def length(self) -> int:
        """Slots before the next round's: the last prompt token's slot counts as the first round's."""
        return self.mask.shape[1] - (self.pending is not None)

    def feed(self, tokens: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Feed (B, n) tokens, one per row and slot -> (B, n, V) log-softmax at their positions, on `device`. The
        first round's first column is the prompt's last token: its log-probs come from the prompt pass when it
        computed them (`pending`)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            tokens = tokens[:, 1:]  # (B, n - 1): the first column is in the cache already
            if tokens.shape[1] == 0:
                return pending
        batch, n = tokens.shape
        if self.length + n > self.capacity:
            raise RuntimeError(f"BatchCache: {self.length} + {n} slots exceed its {self.capacity}; call reserve first")
        positions = self.kept[:, None] + torch.arange(n, device=self.mask.device)  # (B, n)
        self.mask = torch.cat([self.mask, self.mask.new_ones(batch, n)], dim=1)
        # No mask when nothing is masked (a batch of one): attention then takes the plain causal path.
        mask = self.mask if self.masked else None
        out = self.model(input_ids=tokens.to(self.model.device), attention_mask=mask, position_ids=positions,
                         cache=self.cache, use_cache=True, logits_to_keep=n, **self.extra)
        self.cache, self.kept = out.cache, self.kept + n
        logp = torch.log_softmax(slice_vocab(out.logits, vocab_size).float(), dim=-1).to(device)  # (B, n, V)
        return logp if pending is None else torch.cat([pending, logp], dim=1)

    def keep(self, start: int, kept: torch.Tensor) -> None:
        """Of the slots fed since length `start`, row r keeps the first kept[r] (B,, on the host); the rest are masked
        or cut."""
        most, least = int(kept.max()), int(kept.min())  # `kept` is on the host: no wait for the device
        kept = kept.to(self.mask.device)
        fed = self.length - start
        self.mask[:, start:] = torch.arange(fed, device=self.mask.device)[None] < kept[:, None]
        self.kept = self.kept - fed + kept
        self.masked = self.masked or least < most  # a row that kept fewer than the most has masked slots
        end = start + most
        if end < self.length:
            self.cache.crop(end - self.length)  # transformers 5: a negative count of tokens to remove
            self.mask = self.mask[:, :end]

    def reserve(self, n: int) -> None:
        """Make room for n more slots: if they do not fit, move each row's kept slots, in order, to the right end
        of the first max(kept) slots. Writes transformers 5's StaticLayer fields (keys, values,
        cumulative_length) as prefill_rows does; tests/test_speculative.py forces it and compares outputs."""
        if self.length + n <= self.capacity:
            return
        width = int(self.kept.max())
        if width + n > self.capacity:
            raise RuntimeError(f"BatchCache: {width} kept + {n} slots exceed its {self.capacity}")
        # A stable sort of the mask puts each row's masked slots first and its kept ones last, each in order.
        take = torch.sort(self.mask, dim=1, stable=True).indices[:, -width:]  # (B, width)
        for layer in self.cache.layers:
            index = take.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.shape[1], -1,
                                                                        layer.keys.shape[3])
            layer.keys[:, :, :width] = layer.keys[:, :, :self.length].gather(2, index)
            layer.values[:, :, :width] = layer.values[:, :, :self.length].gather(2, index)
            layer.cumulative_length.fill_(width)
        self.mask = self.mask.gather(1, take)
        self.masked = not bool(self.mask.all())


@dataclass
class SpeculativeStats:
    """Counts over a call. Per row and round (a "row-round"): drafted (checked) and kept draft tokens, emitted
    tokens; per batch round: the draft length k and whether S_tuned ran after the last draft (the bonus position);
    forwards per model."""

    rounds: int = 0  # row-rounds
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    forwards: dict[str, int] = field(default_factory=lambda: {LARGE: 0, SMALL_BASE: 0, SMALL_TUNED: 0})
    accepted_per_round: list[int] = field(default_factory=list)  # per row-round
    batch_rounds: list[tuple[int, int, bool]] = field(default_factory=list)  # (rows, k, bonus) per batch round

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the blend kept (per-token agreement of the draft with the blend)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def plain_steps(self) -> int:
        """Batch rounds that drafted nothing: plain steered steps (DraftSchedule's fallback)."""
        return sum(1 for _, k, _ in self.batch_rounds if k == 0)

    @property
    def tokens_per_round(self) -> float:
        """Tokens a row gains per round."""
        return self.emitted / self.rounds if self.rounds else float("nan")


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a row gains in a round of k drafts when each draft is kept with probability `acceptance` given the
    ones before it: the kept prefix plus the blend's own token, E = 1 + a + a^2 + ... + a^k (k = 0: a plain step,
    1). `expected_tokens(0.5, 2)` -> 1.75."""
    return sum(acceptance ** i for i in range(k + 1))


class FixedSchedule:
    """k drafts every round (--draft_tokens K)."""

    def __init__(self, k: int):
        self.k, self.max_k, self.clock = k, k, time.perf_counter

    def next_k(self) -> int:
        return self.k

    def observe(self, k: int, seconds: float, agreements: list[float]) -> None:
        pass


class DraftSchedule:
    """The adaptive draft length (the default): each round's k (0 = a plain steered step) maximises the expected
    tokens per second,

        k* = argmax_k  E(a, k) / c(k),    E(a, k) = 1 + a + ... + a^k   (expected_tokens)

    with `a` the measured per-token acceptance and c(k) the measured cost of a round of k drafts, in plain steps
    (c(0) = 1). Like transformers' assisted generation (`num_assistant_tokens_schedule="heuristic"`) the length
    follows the acceptance, but it is priced with what a round costs on this machine: a forward of k + 1 tokens
    costs about one token's on a GPU and up to k + 1 times as much on a busy CPU (bench/RESULTS.md#bench_speculative),
    so where drafts do not pay, decoding continues with plain steps (k = 0).

    - Plain steps first, until FIRST_OBSERVATIONS positions are observed (one per row and step): the time of a
      step, and a first acceptance, so that an S_tuned that disagrees from the start costs no draft at all.
    - a: the draft's agreement with the blend over the recent rounds, at every position the blend picked or
      checked, plain steps included: S_tuned runs there anyway, so a plain step measures the acceptance a draft
      would have had for free (greedy: 1 if S_tuned's processed argmax is the blend's, sampling:
      sum_x min(p*(x), q(x)), the chance a draft is kept). That is the "probe" of a plain step: it costs nothing.
      "Recent" is counted in rounds, not positions: a = sum of agreements / number of positions, both decayed by
      ACCEPTANCE_DECAY per round (starting from one position at ACCEPTANCE_PRIOR). A batch of 8 observes 8 to 80
      positions a round; weighted per position, the last rows of one round would decide the next round's length
      (at a per-token acceptance of 0.69 that sent half the rounds of a batch of 8 to plain steps, 0.98x the plain
      loop on an H200 where k = 2 took 0.74-0.80x: bench/RESULTS.md#bench_speculative, part 4).
    - c(k): the seconds of a round of k drafts over the seconds of a plain step as last measured (both moving
      averages, weight COST_STEP), so that a machine that gets busier or quieter changes both alike. A length is
      tried one above the longest measured when it would pay at an optimistic price (the longest measured
      length's plus COST_PRIOR_SLOPE per draft): on a machine where drafts cost, only at a high acceptance.
    - After `probe_every` plain steps in a row, one round with the best k >= 1 is run again when it would pay at
      its optimistic price 1 + COST_PRIOR_SLOPE * k (its measured price may be stale or a busy minute's); each
      probe that does not bring speculation back doubles the wait (up to MAX_PROBE_EVERY).

    Every choice depends on what was decoded before only, so the emitted tokens keep the plain loop's greedy output
    and sampling distribution; the times make the choices (not the tokens) vary between runs, so seeded sampling
    repeats exactly with a fixed --draft_tokens only. `clock` is read before and after each round.
    """

    ACCEPTANCE_PRIOR = 0.5
    ACCEPTANCE_DECAY = 0.8
    FIRST_OBSERVATIONS = 4
    COST_STEP = 0.5
    COST_PRIOR_SLOPE = 0.15
    PROBE_EVERY = 16
    MAX_PROBE_EVERY = 256

    def __init__(self, max_k: int = MAX_DRAFT_TOKENS, clock: Callable[[], float] = time.perf_counter):
        self.max_k, self.clock = max_k, clock
        self.acceptance, self.observed = self.ACCEPTANCE_PRIOR, 0
        self.agreed, self.positions = self.ACCEPTANCE_PRIOR, 1.0  # decayed sums behind `acceptance`
        self.step_seconds: float | None = None  # a plain step's time, moving average
        self.cost: dict[int, float] = {}  # k >= 1 -> a round's time in plain steps, moving average
        self.plain_run, self.probe_every = 0, self.PROBE_EVERY

    def price(self, k: int) -> float:
        """c(k) in plain steps: 1 for k = 0, measured, or (not measured yet) optimistically the longest measured
        length's plus COST_PRIOR_SLOPE per draft more: tried once where it would pay at that price, then known."""
        if k == 0:
            return 1.0
        if k in self.cost:
            return self.cost[k]
        top = max((m for m in self.cost if m < k), default=0)
        return self.price(top) + (k - top) * self.COST_PRIOR_SLOPE

    def best(self, candidates: list[int], longer_on_ties: bool = False) -> int:
        """The candidate with the most expected tokens per plain step's time; ties: the shorter (a probe: the
        longer, which tries the length one above the measured ones)."""
        return max(candidates, key=lambda k: (round(expected_tokens(self.acceptance, k) / self.price(k), 9),
                                              k if longer_on_ties else -k))

    def next_k(self) -> int:
        if self.step_seconds is None or self.observed < self.FIRST_OBSERVATIONS:
            return 0  # plain steps first: the time of a step, and a first acceptance
        top = max(self.cost, default=0)
        candidates = [k for k in range(min(top + 1, self.max_k) + 1) if k == 0 or k in self.cost or k == top + 1]
        best = self.best(candidates)
        if best > 0:
            self.plain_run, self.probe_every = 0, self.PROBE_EVERY
            return best
        self.plain_run += 1
        if self.plain_run >= self.probe_every:
            probe = self.best([k for k in candidates if k > 0] or [0], longer_on_ties=True)
            if probe and expected_tokens(self.acceptance, probe) / (1 + self.COST_PRIOR_SLOPE * probe) > 1:
                self.plain_run, self.probe_every = 0, min(2 * self.probe_every, self.MAX_PROBE_EVERY)
                return probe
        return 0

    def observe(self, k: int, seconds: float, agreements: list[float]) -> None:
        """A round of k drafts took `seconds`; `agreements`: one value in [0, 1] per position observed."""
        if k == 0:
            old = self.step_seconds
            self.step_seconds = seconds if old is None else old + self.COST_STEP * (seconds - old)
        elif self.step_seconds:
            ratio, old = seconds / self.step_seconds, self.cost.get(k)
            self.cost[k] = ratio if old is None else old + self.COST_STEP * (ratio - old)
        self.agreed = self.ACCEPTANCE_DECAY * self.agreed + sum(agreements)
        self.positions = self.ACCEPTANCE_DECAY * self.positions + len(agreements)
        self.acceptance = self.agreed / self.positions
        self.observed += len(agreements)


@torch.inference_mode()
def speculative_generate(
    large,
    small_base,
    small_tuned,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    blend: Blend,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    generator: torch.Generator | None = None,
    draft_tokens: int | None = DEFAULT_DRAFT_TOKENS,
    max_draft_tokens: int = MAX_DRAFT_TOKENS,
    stats: SpeculativeStats | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    schedule: DraftSchedule | FixedSchedule | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """steered_generate's contract (same arguments, (B, N) new tokens and (B,) ended_with_eos), decoded
    speculatively with S_tuned as the draft, every row of the batch in each round (rows keep different counts:
    BatchCache). `draft_tokens`: a fixed k per round; None (the default) = adaptive (DraftSchedule: from 0, a plain
    step, up to `max_draft_tokens`, following the measured acceptance and round times). `schedule`: one given
    replaces both (next_k() <= max_draft_tokens, observe(k, seconds, agreements), clock()). `stats` is filled in
    when given. `stop`: as steered_generate's, called after each round with the row's tokens so far (a round may
    have emitted tokens past the stop).
    return_logprobs and use_cache=False are not offered (steered_generate has them).

    Exactness. Greedy: every emitted token is the argmax of the processed blend given the tokens before it, as
    in the plain loop; in float64 the outputs are identical (tests/test_speculative.py). In float32 a k-token
    forward rounds differently from k one-token forwards (the matrix products are blocked differently), by
    about 1e-6 in a log-prob; a position whose two best processed scores are closer than that can pick the
    other token, in either path: no tie-break can make two differently rounded computations agree, so none is
    attempted, and a row can then diverge from the plain loop's. The tests compare float32 outputs on their
    prompts too. Sampling: the output distribution is the plain loop's (tests: exact enumeration on a tiny
    vocabulary vs a seeded sample, chi-square).
    """
    check_decoding_args(max_new_tokens, temperature, top_p, repetition_penalty, no_repeat_ngram_size)
    if draft_tokens is not None and draft_tokens < 1:
        raise UsageError(f"draft_tokens {draft_tokens} must be >= 1, or None for the adaptive length")
    if small_tuned is None:
        raise ValueError("speculative decoding drafts with small_tuned, which is None; use steered_generate")
    # The models that check the drafts: those the blend needs, as in steered_generate; S_tuned drafts.
    verifiers = models_to_run(large, small_base, small_tuned, input_ids, attention_mask, blend, max_new_tokens,
                              with_small_tuned=True)
    del verifiers[SMALL_TUNED]
    device = (large if large is not None else small_tuned).device
    if schedule is None:
        schedule = FixedSchedule(draft_tokens) if draft_tokens is not None else DraftSchedule(max_draft_tokens)
    decoder = RoundDecoder(verifiers, small_tuned, input_ids, attention_mask, blend, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, vocab_size=vocab_size,
                           do_sample=do_sample, temperature=temperature, top_p=top_p,
                           repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                           generator=generator, max_draft_tokens=draft_tokens or max_draft_tokens,
                           stats=stats if stats is not None else SpeculativeStats(), device=device, stop=stop)
    while not decoder.finished:
        k = schedule.next_k()
        start = schedule.clock()
        agreements = decoder.round(k)
        ran = decoder.stats.batch_rounds[-1][1]  # fewer drafts than k when the rows' budgets end sooner
        schedule.observe(ran, schedule.clock() - start, agreements)
    return decoder.result()


def pick(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> int:
    """(1, V) scores (greedy) or warped log-probs (sampling) -> a token id."""
    if do_sample:
        return int(torch.multinomial(scores.exp(), 1, generator=generator)[0, 0])
    return int(scores.argmax(dim=-1)[0])


def cache_capacity(batch: int, width: int, max_new_tokens: int, max_draft_tokens: int) -> int:
    """Slots per BatchCache: a batch of one keeps a plain prefix (prompt + new tokens + one round's drafts); a
    bigger batch also holds masked slots, here up to max_new_tokens of them before BatchCache.reserve packs them."""
    return width + max_new_tokens + max_draft_tokens + 1 + (max_new_tokens if batch > 1 else 0)


class RoundDecoder:
    """The speculative rounds over a batch: the three models' BatchCaches, each row's RowState and its output."""

    def __init__(self, verifiers: dict, draft_model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 blend: Blend, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int, vocab_size: int,
                 do_sample: bool, temperature: float, top_p: float, repetition_penalty: float,
                 no_repeat_ngram_size: int, generator: torch.Generator | None, max_draft_tokens: int,
                 stats: SpeculativeStats, device: torch.device, stop: Callable[[int, list[int]], bool] | None = None):
        self.blend, self.max_new_tokens, self.eos, self.pad = blend, max_new_tokens, eos_token_id, pad_token_id
        self.stop = stop
        self.vocab_size, self.do_sample, self.generator, self.stats, self.device = (
            vocab_size, do_sample, generator, stats, device)
        batch, width = input_ids.shape
        capacity = cache_capacity(batch, width, max_new_tokens, max_draft_tokens)
        # S_tuned a LoRA adapter on S's weights (shared_base.py): S rides along in the drafting forwards (2B rows,
        # S's first), so S's log-probs at every round position come from them and S runs no verifying forward.
        self.adapter = paired_adapter(verifiers.get(SMALL_BASE), draft_model)
        verifiers = {role: m for role, m in verifiers.items() if not (self.adapter and role == SMALL_BASE)}
        self.caches = {role: BatchCache(m, input_ids, attention_mask, capacity, vocab_size, device)
                       for role, m in verifiers.items()}
        self.draft = BatchCache(draft_model, paired(input_ids), paired(attention_mask), capacity, vocab_size, device,
                                pair_names(self.adapter, batch)) if self.adapter else \
            BatchCache(draft_model, input_ids, attention_mask, capacity, vocab_size, device)
        self.states = [RowState(input_ids[r, attention_mask[r].bool()].to(device), vocab_size, repetition_penalty,
                                no_repeat_ngram_size) for r in range(batch)]
        # Sampling compares p*(x) / q(x): both renormalised after the nucleus cut.
        self.target = (lambda s: torch.log_softmax(warp_scores(s, temperature, top_p), dim=-1)) if do_sample \
            else (lambda s: s)
        self.last_ids = input_ids[:, -1].tolist()  # each row's token not yet fed, and on the device (B,):
        self.last = input_ids[:, -1].clone().to(device)
        self.best: list[list[int]] | None = None  # a greedy round's blend argmaxes per row and position (`blended`)
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.done = [False] * batch

    @property
    def finished(self) -> bool:
        return all(self.done)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(t) for t in self.out)
        new_tokens = torch.full((len(self.out), width), self.pad, dtype=torch.long, device=self.device)
        for row, tokens in enumerate(self.out):
            new_tokens[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        ended = [tokens[-1] == self.eos for tokens in self.out]  # every row emits at least one token
        return new_tokens, torch.tensor(ended, dtype=torch.bool, device=self.device)

    def round(self, k_next: int) -> list[float]:
        """One round for every row still decoding, k_next drafts (0: a plain steered step) -> the draft's agreement
        with the blend at every position observed (DraftSchedule): each checked draft, and where the blend picked
        a token itself, what S_tuned's draft there would have been (`agreement`)."""
        active = [r for r, done in enumerate(self.done) if not done]
        # A row emits at most its budget: it checks at most `remaining - 1` drafts, then picks one token.
        limits = {r: self.max_new_tokens - len(self.out[r]) - 1 for r in active}
        k = min(k_next, max(limits.values()))
        for cache in (*self.caches.values(), self.draft):
            cache.reserve(k + 1)
        starts = {id(c): c.length for c in (*self.caches.values(), self.draft)}
        if k == 0:
            drafts, kept, new, agreements = [[] for _ in self.out], {r: 0 for r in active}, *self.plain_step(active)
            bonus = True
        else:
            drafts, kept, new, agreements, k, bonus = self.draft_and_verify(active, limits, k)

        # Emit, and keep in every cache each row's `last` and its kept drafts.
        keep = torch.zeros(len(self.out), dtype=torch.long)
        for r in active:
            emitted = drafts[r][:kept[r]] + ([new[r]] if new[r] is not None else [])
            if new[r] is not None:
                self.states[r].push(new[r])
            self.states[r].pushed.clear()  # the emitted tokens are final
            self.out[r] += emitted
            self.stats.rounds += 1
            self.stats.drafted += min(k, limits[r])
            self.stats.accepted += kept[r]
            self.stats.emitted += len(emitted)
            self.stats.accepted_per_round.append(kept[r])
            if (self.out[r][-1] == self.eos or len(self.out[r]) >= self.max_new_tokens
                    or (self.stop is not None and self.stop(r, self.out[r]))):
                self.done[r] = True
            else:
                keep[r] = 1 + kept[r]
                self.last_ids[r] = new[r]
        self.last = torch.tensor(self.last_ids, dtype=torch.long, device=self.device)  # one copy to the device
        self.stats.batch_rounds.append((len(active), k, bonus))
        for cache in (*self.caches.values(), self.draft):
            cache.keep(starts[id(cache)], paired(keep) if self.adapter and cache is self.draft else keep)
        # The agreements as numbers: one wait for the device, after everything the round queued.
        return torch.cat([a.to(self.device) for a in agreements]).tolist() if agreements else []

    def plain_step(self, active: list[int]) -> tuple[dict, list]:
        """A round of k = 0 for the whole batch at once: one forward per model, the blend, the processing and the pick
        over (B, V) (per row only for a row's repetition penalty or n-gram ban) and one wait for the device, as a
        step of decoding.steered_generate; on a GPU, per-row picks would each wait for it (issue 29: this is the
        fallback, so it must cost no more than the plain loop's step). -> ({row: token}, [(B,) agreements])."""
        tokens = self.last[:, None]  # (B, 1)
        logps = {role: cache.feed(tokens, self.vocab_size, self.device)[:, 0] for role, cache in self.caches.items()}
        for role in logps:
            self.stats.forwards[role] += 1
        based = [] if self.adapter else None
        tuned = self.feed_draft(tokens, based)  # (B, V) S_tuned: the probe of what a draft would have been
        self.stats.forwards[SMALL_TUNED] += 1
        if based is not None:
            logps[SMALL_BASE] = based[0]
        p = self.target(self.rows_scores(blend_logprobs(logps.get(LARGE), tuned, logps.get(SMALL_BASE), self.blend),
                                         active))  # (B, V)
        q = self.target(self.rows_scores(tuned, active))  # (B, V) the draft S_tuned would have made, processed alike
        picks = torch.multinomial(p.exp(), 1, generator=self.generator)[:, 0] if self.do_sample else p.argmax(dim=-1)
        rows = active if len(active) < len(self.out) else slice(None)
        agreement = self.agreement(p[rows], q[rows])  # (A,)
        picks = picks.tolist()  # the step's wait for the device
        return {r: picks[r] for r in active}, [agreement]

    def rows_scores(self, logp: torch.Tensor, active: list[int]) -> torch.Tensor:
        """(B, V) log-probs -> (B, V) each active row processed by its RowState (the same tensor when no row has a
        repetition penalty or n-gram ban to apply)."""
        if all(self.states[r].stateless for r in active):
            return logp
        out = logp.clone()
        for r in active:
            out[r:r + 1] = self.states[r].scores(logp[r:r + 1])
        return out

    def draft_and_verify(self, active: list[int], limits: dict[int, int], k: int):
        """A round of k >= 1 drafts: S_tuned drafts, L and S verify in one forward each, each row keeps the longest
        prefix the blend agrees with and one token from the blend. -> (drafts [B][k] ids, {row: kept},
        {row: token or None after a kept EOS}, [agreement tensors], k as run, whether S_tuned ran the bonus)."""
        # 1. S_tuned drafts k tokens per row; its log-probs at those positions are the blend's tuned term.
        # A finished row feeds its last token again: any real id serves, its slots are never kept.
        drafts = [[self.last_ids[r]] * k for r in range(len(self.out))]  # (B, k) on the host
        tuned, q_logps = [], []  # tuned[j]: (B, V) S_tuned at position j; q_logps[j]: (B, V) the draft there
        based = [] if self.adapter else None  # paired: based[j] (B, V) S at position j
        feed = self.last
        for i in range(k):
            tuned.append(self.feed_draft(feed[:, None], based))
            q_logps.append(self.target(self.rows_scores(tuned[i], active)))  # (B, V) processed like the blend
            feed = torch.multinomial(q_logps[i].exp(), 1, generator=self.generator)[:, 0] if self.do_sample \
                else q_logps[i].argmax(dim=-1)  # (B,) the drafts, fed next; a finished row's serve as any id
            for r, token in enumerate(feed.tolist()):  # the draft step's wait for the device
                drafts[r][i] = token
            for r in active:
                self.states[r].push(drafts[r][i])
                if drafts[r][i] == self.eos:  # nothing after a drafted EOS is checked
                    limits[r] = min(limits[r], i + 1)
            if all(limits[r] <= i + 1 for r in active):  # every row has drafted all it can use
                k = i + 1
                drafts = [row[:k] for row in drafts]
                break
        for r in active:
            self.states[r].pop_to(0)
        self.stats.forwards[SMALL_TUNED] += k

        # 2. L and S: one forward each over [last, drafts], (B, k + 1, V) log-probs.
        tokens = torch.cat([self.last[:, None], torch.tensor(drafts, dtype=torch.long, device=self.device)],
                           dim=1)  # (B, k + 1)
        logps = {role: cache.feed(tokens, self.vocab_size, self.device) for role, cache in self.caches.items()}
        for role in logps:
            self.stats.forwards[role] += 1

        # 3. Each row keeps the longest prefix the blend agrees with, then one token from the blend.
        # Greedy, where no row's processing has state: the blend at every position of every row at once, and its
        # argmaxes in one wait for the device (self.best), instead of one per position.
        blended = self.blended(logps, tuned, based, active, k)  # (B, k, V) or None
        kept, new, stopped, agreements = {}, {}, [], []
        for r in active:
            limit = min(k, limits[r])
            j = 0
            while j < limit:
                p = blended[r, j][None] if blended is not None else self.processed(r, j, logps, tuned, based)
                d, q = drafts[r][j], q_logps[j][r:r + 1]
                agreements.append(self.agreement(p, q))
                if not self.accepts(r, j, p, q, d):
                    new[r] = self.best_token(r, j, p) if not self.do_sample else pick_residual(p, q, self.generator)
                    break
                self.states[r].push(d)
                j += 1
                if d == self.eos:
                    new[r] = None
                    break
            kept[r] = j
            if r not in new:
                stopped.append(r)  # no draft rejected up to the limit: the token at `limit` comes from the blend
        bonus = any(kept[r] == k for r in stopped)
        if bonus:  # S_tuned's log-probs after the last draft
            tuned.append(self.feed_draft(tokens[:, -1:], based))
            self.stats.forwards[SMALL_TUNED] += 1
        for r in stopped:
            p = blended[r, kept[r]][None] if blended is not None and kept[r] < k else \
                self.processed(r, kept[r], logps, tuned, based)
            agreements.append(self.agreement(p, self.target(self.states[r].scores(tuned[kept[r]][r:r + 1]))))
            new[r] = self.best_token(r, kept[r], p) if not self.do_sample else pick(p, True, self.generator)
        self.best = None
        return drafts, kept, new, agreements, k, bonus

    def blended(self, logps: dict, tuned: list, based: list | None, active: list[int], k: int):
        """Greedy with stateless processing: (B, k, V) the blend at the round's first k positions of every row, its
        argmaxes read into self.best ([B][k], the verification's one wait for the device); else None (each
        position is then processed in turn, after the row's earlier tokens: `processed`)."""
        if self.do_sample or not all(self.states[r].stateless for r in active):
            return None
        at = {role: lp[:, :k] for role, lp in logps.items()}  # (B, k, V) each
        if based is not None:
            at[SMALL_BASE] = torch.stack(based[:k], dim=1)
        mixed = blend_logprobs(at.get(LARGE), torch.stack(tuned[:k], dim=1), at.get(SMALL_BASE), self.blend)
        self.best = mixed.argmax(dim=-1).tolist()
        return mixed

    def best_token(self, r: int, j: int, p: torch.Tensor) -> int:
        """The blend's greedy token at row r's position j (p: (1, V) its processed blend there)."""
        return self.best[r][j] if self.best is not None and j < len(self.best[r]) else pick(p, False, None)

    def feed_draft(self, tokens: torch.Tensor, based: list | None) -> torch.Tensor:
        """S_tuned's forward of (B, 1) tokens -> (B, V) its log-probs; paired, S's (B, V) are appended to `based`."""
        if not self.adapter:
            return self.draft.feed(tokens, self.vocab_size, self.device)[:, 0]
        base, tuned = split_pair(self.draft.feed(paired(tokens), self.vocab_size, self.device)[:, 0])
        based.append(base)
        return tuned

    def agreement(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """How far S_tuned's draft agrees with the blend, per row (p, q: (n, V) target and draft, as `accepts` takes
        them) -> (n,): greedy, 1.0 where their argmaxes are one token, else 0.0; sampling, the chance that a draft is
        kept, sum_x min(p*(x), q(x)) = 1 - total variation distance (Leviathan et al. 2023, section 3.5). A tensor on
        the device: `round` reads them all at its end, so that no position waits for the device."""
        if not self.do_sample:
            return (p.argmax(dim=-1) == q.argmax(dim=-1)).to(torch.float64)
        return torch.minimum(p.exp(), q.exp()).sum(dim=-1).to(torch.float64)

    def accepts(self, row: int, j: int, p: torch.Tensor, q: torch.Tensor, token: int) -> bool:
        """Whether row `row` keeps its j-th draft `token` (p, q: (1, V) target and draft). One place, so that
        bench/bench_speculative.py can replay measured acceptance at shapes with no trained weights."""
        if not self.do_sample and self.best is not None:
            return self.best[row][j] == token  # the argmax of p, read with the round's others
        return keep_draft(p, q, token, self.do_sample, self.generator)

    def processed(self, r: int, j: int, logps: dict, tuned: list, based: list | None = None) -> torch.Tensor:
        """Row r's processed (and, sampling, warped) blend at the round's position j -> (1, V)."""
        at = {role: lp[r, j][None] for role, lp in logps.items()}  # (1, V) each
        if based is not None:
            at[SMALL_BASE] = based[j][r:r + 1]
        mixed = blend_logprobs(at.get(LARGE), tuned[j][r:r + 1], at.get(SMALL_BASE), self.blend)  # (1, V)
        return self.target(self.states[r].scores(mixed))


def keep_draft(p: torch.Tensor, q: torch.Tensor, token: int, do_sample: bool,
               generator: torch.Generator | None) -> bool:
    """Greedy: the draft token is the processed blend's argmax. Sampling: keep it with probability
    min(1, p*(x) / q(x)) (p, q: (1, V) log-probs), which makes the kept-or-resampled token distributed as p*."""
    if not do_sample:
        return int(p.argmax(dim=-1)[0]) == token
    u = torch.rand(1, generator=generator, device=p.device)
    return bool(u.log() < p[0, token] - q[0, token])


def pick_residual(p: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None) -> int:
    """After a rejection: sample from normalize(max(0, p* - q)) (p, q: (1, V) log-probs). When rounding leaves no
    mass (p* == q to the last bit, where a rejection has probability ~0), sample from p*."""
    residual = (p.exp() - q.exp()).clamp(min=0)  # (1, V)
    if not bool(residual.sum() > 0):
        residual = p.exp()
    return int(torch.multinomial(residual, 1, generator=generator)[0, 0])


def uses_speculation(small_tuned, blend: Blend, speculative: bool) -> bool:
    """Whether `decode_steered` drafts: asked for, and S_tuned is loaded and in the blend. Batches too: rounds
    over the whole batch beat both the plain batched loop and rows one at a time (bench/RESULTS.md,
    bench_speculative.py)."""
    return speculative and small_tuned is not None and blend.coefficients[1] != 0


def decode_steered(large, small_base, small_tuned, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   blend: Blend, *, speculative: bool = True, draft_tokens: int | None = DEFAULT_DRAFT_TOKENS, **kw):
    """steered_generate, or speculative_generate where `uses_speculation` says so: the same contract."""
    if uses_speculation(small_tuned, blend, speculative):
        return speculative_generate(large, small_base, small_tuned, input_ids, attention_mask, blend,
                                    draft_tokens=draft_tokens, **kw)
    return steered_generate(large, small_base, small_tuned, input_ids, attention_mask, blend, **kw)
