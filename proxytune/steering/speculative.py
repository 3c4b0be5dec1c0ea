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

    python bench/bench_speculative.py             # acceptance on the lab's models, t_L(k), t_S(k), end-to-end
    python steer.py --blend outputs/steer/blend.json --prompt "..." --speculative false   # the plain loop
"""

from __future__ import annotations

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

# Draft length, adaptive mode (draft_tokens=None): as transformers' assisted generation
# (`num_assistant_tokens_schedule="heuristic"`):
# +2 after a round whose every draft was kept, -1 (down to 1) otherwise, between 1 and MAX_DRAFT_TOKENS.
INITIAL_DRAFT_TOKENS = 2


DRAFT_GROWTH = 2


MAX_DRAFT_TOKENS = 8


# The default is a fixed k = 2: at the Pythia-410m/70m shapes on CPU a forward of 4+ tokens costs far more than
# one of 3 (bench/RESULTS.md, t_L(k)), and the adaptive schedule's long drafts lost to k = 2 on the lab's rounds.
DEFAULT_DRAFT_TOKENS = 2


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

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, capacity: int):
        from transformers import StaticCache

        self.model, self.capacity = model, capacity
        ids, mask = input_ids.to(model.device), attention_mask.to(model.device)  # (B, T) each
        # Everything but the last column, which the first round feeds (as ModelStream does).
        self.cache = prefill_rows(model, ids, mask, capacity) if prefill_separately(model, ids) else None
        if self.cache is None:
            self.cache = StaticCache(config=model.config, max_cache_len=capacity)
            if ids.shape[1] > 1:
                model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                      position_ids=positions_from_mask(mask)[:, :-1], cache=self.cache, use_cache=True,
                      logits_to_keep=1)
        self.mask = mask[:, :-1].clone()  # (B, length) 1 where a slot holds a kept token
        self.kept = self.mask.sum(-1)  # (B,) kept tokens per row: the next token's position id

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def feed(self, tokens: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Feed (B, n) tokens, one per row and slot -> (B, n, V) log-softmax at their positions, on `device`."""
        batch, n = tokens.shape
        if self.length + n > self.capacity:
            raise RuntimeError(f"BatchCache: {self.length} + {n} slots exceed its {self.capacity}; call reserve first")
        positions = self.kept[:, None] + torch.arange(n, device=self.mask.device)  # (B, n)
        self.mask = torch.cat([self.mask, self.mask.new_ones(batch, n)], dim=1)
        # No mask when nothing is masked (a batch of one): attention then takes the plain causal path.
        mask = None if bool(self.mask.all()) else self.mask
        out = self.model(input_ids=tokens.to(self.model.device), attention_mask=mask, position_ids=positions,
                         cache=self.cache, use_cache=True, logits_to_keep=n)
        self.cache, self.kept = out.cache, self.kept + n
        return torch.log_softmax(slice_vocab(out.logits, vocab_size).float(), dim=-1).to(device)  # (B, n, V)

    def keep(self, start: int, kept: torch.Tensor) -> None:
        """Of the slots fed since length `start`, row r keeps the first kept[r] (B,); the rest are masked or cut."""
        kept = kept.to(self.mask.device)
        fed = self.length - start
        self.mask[:, start:] = torch.arange(fed, device=self.mask.device)[None] < kept[:, None]
        self.kept = self.kept - fed + kept
        end = start + int(kept.max())
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
    def tokens_per_round(self) -> float:
        """Tokens a row gains per round."""
        return self.emitted / self.rounds if self.rounds else float("nan")


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """steered_generate's contract (same arguments, (B, N) new tokens and (B,) ended_with_eos), decoded
    speculatively with S_tuned as the draft, every row of the batch in each round (rows keep different counts:
    BatchCache). `draft_tokens`: a fixed k per round (default DEFAULT_DRAFT_TOKENS); None = adaptive, from
    INITIAL_DRAFT_TOKENS up to `max_draft_tokens`. `stats` is filled in when given. `stop`: as steered_generate's,
    called after each round with the row's tokens so far (a round may have emitted tokens past the stop).
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
    decoder = RoundDecoder(verifiers, small_tuned, input_ids, attention_mask, blend, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, vocab_size=vocab_size,
                           do_sample=do_sample, temperature=temperature, top_p=top_p,
                           repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                           generator=generator, max_draft_tokens=draft_tokens or max_draft_tokens,
                           stats=stats if stats is not None else SpeculativeStats(), device=device, stop=stop)
    k = draft_tokens or min(INITIAL_DRAFT_TOKENS, max_draft_tokens)
    while not decoder.finished:
        all_kept = decoder.round(k)
        if draft_tokens is None:
            k = min(k + DRAFT_GROWTH, max_draft_tokens) if all_kept else max(1, k - 1)
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
        self.caches = {role: BatchCache(m, input_ids, attention_mask, capacity) for role, m in verifiers.items()}
        self.draft = BatchCache(draft_model, input_ids, attention_mask, capacity)
        self.states = [RowState(input_ids[r, attention_mask[r].bool()].to(device), vocab_size, repetition_penalty,
                                no_repeat_ngram_size) for r in range(batch)]
        # Sampling compares p*(x) / q(x): both renormalised after the nucleus cut.
        self.target = (lambda s: torch.log_softmax(warp_scores(s, temperature, top_p), dim=-1)) if do_sample \
            else (lambda s: s)
        self.last = input_ids[:, -1].clone().to(device)  # (B,) each row's token not yet fed
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

    def round(self, k_next: int) -> bool:
        """One round for every row still decoding -> whether every row kept every draft it checked."""
        active = [r for r, done in enumerate(self.done) if not done]
        # A row emits at most its budget: it checks at most `remaining - 1` drafts, then picks one token.
        limits = {r: self.max_new_tokens - len(self.out[r]) - 1 for r in active}
        k = min(k_next, max(limits.values()))
        for cache in (*self.caches.values(), self.draft):
            cache.reserve(k + 1)
        starts = {id(c): c.length for c in (*self.caches.values(), self.draft)}

        # 1. S_tuned drafts k tokens per row; its log-probs at those positions are the blend's tuned term.
        # (B, k); a finished row feeds its last token again: any real id serves, its slots are never kept.
        drafts = self.last[:, None].repeat(1, k)
        tuned, q_logps = [], {r: [] for r in active}  # tuned[j]: (B, V) S_tuned at position j
        feed = self.last
        for i in range(k):
            tuned.append(self.draft.feed(feed[:, None], self.vocab_size, self.device)[:, 0])
            for r in active:
                q = self.target(self.states[r].scores(tuned[i][r:r + 1]))  # (1, V) processed like the blend
                q_logps[r].append(q)
                drafts[r, i] = pick(q, self.do_sample, self.generator)
                self.states[r].push(int(drafts[r, i]))
                if drafts[r, i] == self.eos:  # nothing after a drafted EOS is checked
                    limits[r] = min(limits[r], i + 1)
            feed = drafts[:, i]
            if all(limits[r] <= i + 1 for r in active):  # every row has drafted all it can use
                k = i + 1
                drafts = drafts[:, :k]
                break
        for r in active:
            self.states[r].pop_to(0)
        self.stats.forwards[SMALL_TUNED] += k

        # 2. L and S: one forward each over [last, drafts], (B, k + 1, V) log-probs.
        tokens = torch.cat([self.last[:, None], drafts], dim=1)  # (B, k + 1)
        logps = {role: cache.feed(tokens, self.vocab_size, self.device) for role, cache in self.caches.items()}
        for role in logps:
            self.stats.forwards[role] += 1

        # 3. Each row keeps the longest prefix the blend agrees with, then one token from the blend.
        kept, new, stopped = {}, {}, []
        for r in active:
            limit = min(k, limits[r])
            j = 0
            while j < limit:
                p = self.processed(r, j, logps, tuned)
                d = int(drafts[r, j])
                if not self.accepts(r, j, p, q_logps[r][j], d):
                    new[r] = pick(p, False, None) if not self.do_sample else pick_residual(p, q_logps[r][j],
                                                                                           self.generator)
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
        if bonus:  # S_tuned's log-probs after the last draft (or after `last` when k == 0)
            tuned.append(self.draft.feed(tokens[:, -1:], self.vocab_size, self.device)[:, 0])
            self.stats.forwards[SMALL_TUNED] += 1
        for r in stopped:
            new[r] = pick(self.processed(r, kept[r], logps, tuned), self.do_sample, self.generator)

        # 4. Emit, and keep in every cache each row's `last` and its kept drafts.
        keep = torch.zeros(len(self.out), dtype=torch.long)
        for r in active:
            emitted = drafts[r, :kept[r]].tolist() + ([new[r]] if new[r] is not None else [])
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
                self.last[r] = new[r]
        self.stats.batch_rounds.append((len(active), k, bonus))
        for cache in (*self.caches.values(), self.draft):
            cache.keep(starts[id(cache)], keep)
        return all(kept[r] == min(k, limits[r]) for r in active)

    def accepts(self, row: int, j: int, p: torch.Tensor, q: torch.Tensor, token: int) -> bool:
        """Whether row `row` keeps its j-th draft `token` (p, q: (1, V) target and draft). One place, so that
        bench/bench_speculative.py can replay measured acceptance at shapes with no trained weights."""
        return keep_draft(p, q, token, self.do_sample, self.generator)

    def processed(self, r: int, j: int, logps: dict, tuned: list) -> torch.Tensor:
        """Row r's processed (and, sampling, warped) blend at the round's position j -> (1, V)."""
        at = {role: lp[r, j][None] for role, lp in logps.items()}  # (1, V) each
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
