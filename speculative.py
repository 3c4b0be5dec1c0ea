"""Exact speculative steering: the small tuned model drafts, the blend verifies (issue 14).

The blend is L + alpha * (S_tuned - S), so S_tuned alone is a cheap draft close to it. Each round:

    1. S_tuned drafts k tokens, one forward of one token each, with its own KV cache. Its log-probs at those
       positions are the ones the blend needs anyway.
    2. L and S each run ONE forward over [last accepted token, k drafted tokens] (k + 1 positions).
    3. The blend (steer.blend_logprobs) and the per-step processing (steer.process_scores: repetition penalty,
       n-gram ban) are computed at every position, in order, exactly as the plain loop would see them.
    4. The longest drafted prefix the blend agrees with is kept, plus one token from the blend at the first
       disagreement (or a bonus token when all k were accepted); every cache is cut back to the accepted length.

Greedy: a draft token is kept when it is the argmax of the processed blend, and the token emitted at a
disagreement is that argmax, so every emitted token is the one steer.steered_generate would have chosen.
Sampling: the speculative-sampling rule (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318) with the warped blend p* as target and S_tuned's identically processed and warped
distribution q as draft: keep x with probability min(1, p*(x) / q(x)); on rejection sample from
normalize(max(0, p* - q)); the bonus token comes from p*. Each emitted token is then distributed as p*, so
the output has the plain loop's distribution (not its samples: the random draws differ).

Rows are decoded one at a time (batch 1 per round): rows accept different counts, and per row the caches stay
plain prefix caches that one `crop` rolls back. bench/bench_speculative.py measures this against the plain
batched loop.

    python bench/bench_speculative.py             # acceptance on the lab's models, t_L(k), t_S(k), end-to-end
    python steer.py --blend outputs/steer/blend.json --prompt "..." --speculative false   # the plain loop
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from steer import (
    LARGE,
    SMALL_BASE,
    SMALL_TUNED,
    Blend,
    NgramBlocker,
    UsageError,
    blend_logprobs,
    check_decoding_args,
    model_context,
    process_scores,
    slice_vocab,
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


# ---------------------------------------------------------------------------------------------
# One row's decoding state, with tentative tokens that can be taken back
# ---------------------------------------------------------------------------------------------
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


class RowCache:
    """One model's KV cache for one row (batch 1, no padding), preallocated, cut back with `crop`."""

    def __init__(self, model, prompt: torch.Tensor, max_cache_len: int):
        from transformers import StaticCache

        self.model, self.length = model, 0
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        if prompt.shape[0] > 1:  # everything but the last token, which the first round feeds
            self.logprobs(prompt[:-1].tolist(), None, None)

    def logprobs(self, tokens: list[int], vocab_size: int | None, device: torch.device | None) -> torch.Tensor | None:
        """Feed `tokens` (k of them) -> (k, V) log-softmax at their positions, on `device` (None: don't compute)."""
        k = len(tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.model.device)  # (1, k)
        positions = torch.arange(self.length, self.length + k, device=self.model.device)[None]  # (1, k)
        out = self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
                         logits_to_keep=k if vocab_size is not None else 1)
        self.cache, self.length = out.cache, self.length + k
        if vocab_size is None:
            return None
        return torch.log_softmax(slice_vocab(out.logits[0], vocab_size).float(), dim=-1).to(device)  # (k, V)

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (the next feed overwrites them)."""
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers 5: a negative count of tokens to remove
            self.length = length


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
@dataclass
class SpeculativeStats:
    """Counts over a call: rounds, drafted and kept draft tokens, emitted tokens, and forwards per model."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    forwards: dict[str, int] = field(default_factory=lambda: {LARGE: 0, SMALL_BASE: 0, SMALL_TUNED: 0})
    drafted_per_round: list[int] = field(default_factory=list)
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the blend kept (per-token agreement of the draft with the blend)."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_round(self) -> float:
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """steer.steered_generate's contract (same arguments, (B, N) new tokens and (B,) ended_with_eos), decoded
    speculatively with S_tuned as the draft, one row at a time. `draft_tokens`: a fixed k per round (default
    DEFAULT_DRAFT_TOKENS); None = adaptive, from INITIAL_DRAFT_TOKENS up to `max_draft_tokens`. `stats` is filled
    in when given. return_logprobs and use_cache=False are not offered (steered_generate has them).

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
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be (batch, length)")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("every row must end with a real token: pad prompts on the LEFT "
                         "(tokenizer.padding_side='left')")
    if draft_tokens is not None and draft_tokens < 1:
        raise UsageError(f"draft_tokens {draft_tokens} must be >= 1, or None for the adaptive length")
    if small_tuned is None:
        raise ValueError("speculative decoding drafts with small_tuned, which is None; use steer.steered_generate")
    c_large, _, c_base = blend.coefficients
    # The models that check the drafts: those the blend needs, as in steered_generate (S_tuned always runs).
    roles = {LARGE: (large, c_large != 0 or blend.has_plausibility_limit), SMALL_BASE: (small_base, c_base != 0)}
    missing = [role for role, (model, needed) in roles.items() if needed and model is None]
    if missing:
        raise ValueError(f"the blend ({blend.describe()}) needs the {', '.join(missing)} model, which is None")
    verifiers = {role: model for role, (model, needed) in roles.items() if needed}
    context = model_context({**verifiers, SMALL_TUNED: small_tuned})
    longest = int(attention_mask.sum(-1).max())
    if longest + max_new_tokens > context:
        raise UsageError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the models' "
                         f"context ({context} tokens); shorten the prompt or lower max_new_tokens")
    device = (large if large is not None else small_tuned).device
    stats = stats if stats is not None else SpeculativeStats()
    rows, ended = [], []
    for row in range(input_ids.shape[0]):
        prompt = input_ids[row, attention_mask[row].bool()].to(device)  # (T,) the row's real tokens
        tokens, eos = decode_row(
            verifiers, small_tuned, prompt, blend, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
            vocab_size=vocab_size, do_sample=do_sample, temperature=temperature, top_p=top_p,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, generator=generator,
            draft_tokens=draft_tokens, max_draft_tokens=max_draft_tokens, stats=stats, device=device)
        rows.append(tokens)
        ended.append(eos)
    width = max(len(t) for t in rows)
    new_tokens = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    for row, tokens in enumerate(rows):
        new_tokens[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
    return new_tokens, torch.tensor(ended, dtype=torch.bool, device=device)


def pick(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> int:
    """(1, V) scores (greedy) or warped log-probs (sampling) -> a token id."""
    if do_sample:
        return int(torch.multinomial(scores.exp(), 1, generator=generator)[0, 0])
    return int(scores.argmax(dim=-1)[0])


def decode_row(verifiers: dict, draft_model, prompt: torch.Tensor, blend: Blend, *, max_new_tokens: int,
               eos_token_id: int, vocab_size: int, do_sample: bool, temperature: float, top_p: float,
               repetition_penalty: float, no_repeat_ngram_size: int, generator: torch.Generator | None,
               draft_tokens: int | None, max_draft_tokens: int, stats: SpeculativeStats,
               device: torch.device) -> tuple[list[int], bool]:
    """Speculative rounds for one prompt (T,) -> (new tokens, ended with EOS)."""
    max_cache_len = prompt.shape[0] + max_new_tokens
    caches = {role: RowCache(m, prompt, max_cache_len) for role, m in verifiers.items()}
    draft = RowCache(draft_model, prompt, max_cache_len)
    state = RowState(prompt, vocab_size, repetition_penalty, no_repeat_ngram_size)
    # Sampling compares p*(x) / q(x): both renormalised after the nucleus cut.
    target = (lambda s: torch.log_softmax(warp_scores(s, temperature, top_p), dim=-1)) if do_sample else (lambda s: s)
    last, out = int(prompt[-1]), []
    k_next = draft_tokens or min(INITIAL_DRAFT_TOKENS, max_draft_tokens)
    while True:
        # The round emits at most k + 1 tokens: never draft past max_new_tokens (k = 0 is a plain step).
        k = min(k_next, max_new_tokens - len(out) - 1)
        start = draft.length  # == every cache's length: all hold the tokens before `last`
        drafted, q_logps, tuned_logps, feed = [], [], [], last
        for _ in range(k):
            logp_tuned = draft.logprobs([feed], vocab_size, device)  # (1, V)
            q = target(state.scores(logp_tuned))  # (1, V) the draft's distribution, processed like the blend's
            token = pick(q, do_sample, generator)
            tuned_logps.append(logp_tuned)
            q_logps.append(q)
            drafted.append(token)
            state.push(token)
            feed = token
            if token == eos_token_id:
                break
        k = len(drafted)
        state.pop_to(0)
        # One forward of L and of S over [last, drafts]: (k + 1, V) log-probs each.
        logps = {role: cache.logprobs([last, *drafted], vocab_size, device) for role, cache in caches.items()}
        for role in logps:
            stats.forwards[role] += 1
        stats.forwards[SMALL_TUNED] += k

        accepted, new_token = 0, None
        for j in range(k + 1):
            if j == k:  # every draft kept: S_tuned's log-probs after the last one (the bonus position)
                tuned_logps.append(draft.logprobs([feed], vocab_size, device))
                stats.forwards[SMALL_TUNED] += 1
            mixed = blend_logprobs(logps[LARGE][j:j + 1] if LARGE in logps else None, tuned_logps[j],
                                   logps[SMALL_BASE][j:j + 1] if SMALL_BASE in logps else None, blend)  # (1, V)
            p = target(state.scores(mixed))  # (1, V)
            if j < k and keep_draft(p, q_logps[j], drafted[j], do_sample, generator):
                accepted += 1
                state.push(drafted[j])
                if drafted[j] == eos_token_id:
                    break
                continue
            new_token = pick(p, do_sample, generator) if (j == k or not do_sample) else \
                pick_residual(p, q_logps[j], generator)
            state.push(new_token)
            break
        emitted = drafted[:accepted] + ([new_token] if new_token is not None else [])
        out += emitted
        stats.rounds += 1
        stats.drafted += k
        stats.accepted += accepted
        stats.emitted += len(emitted)
        stats.drafted_per_round.append(k)
        stats.accepted_per_round.append(accepted)
        if out[-1] == eos_token_id:
            return out, True
        if len(out) >= max_new_tokens:
            return out, False
        # Keep `last` and the kept drafts; the new token is the next round's `last`.
        for cache in (*caches.values(), draft):
            cache.crop(start + 1 + accepted)
        state.pushed.clear()  # the emitted tokens are final
        last = new_token
        if draft_tokens is None:
            k_next = min(k_next + DRAFT_GROWTH, max_draft_tokens) if accepted == k else max(1, k_next - 1)


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


def uses_speculation(small_tuned, blend: Blend, batch: int, speculative: bool) -> bool:
    """Whether `decode_steered` drafts: asked for, S_tuned is loaded and in the blend, and the batch holds one
    prompt. Several prompts decode faster with the plain batched loop than speculatively one row at a time on
    CPU (bench/bench_speculative.py: a batch-8 step of L costs far less than 8 batch-1 steps)."""
    return speculative and small_tuned is not None and blend.coefficients[1] != 0 and batch == 1


def decode_steered(large, small_base, small_tuned, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   blend: Blend, *, speculative: bool = True, draft_tokens: int | None = DEFAULT_DRAFT_TOKENS, **kw):
    """steer.steered_generate, or speculative_generate where `uses_speculation` says so: the same contract."""
    if uses_speculation(small_tuned, blend, input_ids.shape[0], speculative):
        return speculative_generate(large, small_base, small_tuned, input_ids, attention_mask, blend,
                                    draft_tokens=draft_tokens, **kw)
    return steered_generate(large, small_base, small_tuned, input_ids, attention_mask, blend, **kw)
