"""The three-model decoding loop: one KV cache per model, the blend at each step, penalties, sampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.validation import decoding_problems
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend, blend_logprobs, nucleus_mask, slice_vocab
from proxytune.steering.shared_base import forward_kwargs, pair_names, paired, paired_adapter, split_pair


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) left-padded mask -> (B, T) position ids counting real tokens only, 0 on padding (as generate() does);
    without this a left-padded row would start at position = number of pads and differ from the same row alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`left_pad([[5, 6], [7]], 1)` -> ids [[5, 6], [1, 7]], mask [[1, 1], [0, 1]]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


@torch.no_grad()
def prefill_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_cache_len: int,
                 adapter_names: list[str] | None = None):
    """A StaticCache holding a LEFT-padded batch's prompts minus each row's last token, computed one row at a time.

    On CPU a batched prompt pass is slower than the same rows one at a time: padding is computed too, attention
    grows with the square of the padded width, and big activations spill the CPU caches (bench/RESULTS.md,
    evaluation generation: the batched prompt pass took 1.8x the one-at-a-time time; this way, 1.0x). Each row's
    keys and values are placed right-aligned, where a batched pass would have put them; the padding columns stay
    zero (the attention mask hides them). The caller feeds the last column next: generate() slices its inputs to
    what the cache has not seen (cache.get_seq_length() == T - 1), and so does ModelStream.
    Writes transformers 5's StaticLayer fields directly (keys, values, cumulative_length); tests/test_steer.py
    checks the result against a batched pass, so a library change shows there.
    `adapter_names` (one per row): a paired S/S_tuned batch (steering/shared_base.py), each row run as its adapter.
    -> the cache, or None when there is nothing to prefill (T == 1).
    """
    from transformers import DynamicCache, StaticCache

    batch, width = input_ids.shape
    if width < 2:
        return None
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for row in range(batch):
        prompt = input_ids[row, attention_mask[row].bool()][None, :-1]  # (1, t) the row's real tokens but the last
        if prompt.shape[1] == 0:
            continue
        # logits_to_keep=1: the output matrix sees one position (the logits are not used; the LM head is kept
        # in the call so that any wrapper, e.g. a PEFT model, runs as it would in generate()).
        out = model(input_ids=prompt, cache=DynamicCache(), use_cache=True, logits_to_keep=1,
                    **forward_kwargs(None if adapter_names is None else adapter_names[row:row + 1]))
        end, t = width - 1, prompt.shape[1]
        for layer, computed in zip(cache.layers, out.cache.layers):
            keys, values = computed.keys, computed.values  # (1, heads, t, head_dim) each
            if not layer.is_initialized:  # shapes, dtype and device as the model produced them
                layer.lazy_initialization(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
            layer.keys[row, :, end - t:end] = keys[0]
            layer.values[row, :, end - t:end] = values[0]
    if not cache.layers[0].is_initialized:
        return None
    for layer in cache.layers:
        layer.cumulative_length.fill_(width - 1)
    return cache


def prefill_separately(model, input_ids: torch.Tensor) -> bool:
    """Whether to build a batch's prompt cache one row at a time (prefill_rows): on CPU, for more than one row.
    A GPU runs a padded batch in parallel, so there the batched pass stays."""
    return input_ids.shape[0] > 1 and model.device.type == "cpu"


def model_context(models: dict[str, Any]) -> int:
    """The shortest context of the models (max_position_embeddings; 2048, Pythia's, where a config has none)."""
    return min(getattr(m.config, "max_position_embeddings", None) or 2048 for m in models.values())


class ModelStream:
    """One model's view of a batch being decoded: its KV cache, attention mask and positions, on its own device."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = True,
                 max_new_tokens: int | None = None, adapter_names: list[str] | None = None):
        self.model, self.use_cache = model, use_cache
        self.extra = forward_kwargs(adapter_names)  # a paired S/S_tuned batch: each row's adapter
        self.mask = attention_mask.to(model.device)  # (B, T) grows by one column per step
        self.positions = positions_from_mask(self.mask)  # (B, T)
        self.ids = input_ids.to(model.device)  # (B, T) the whole sequence without a cache, else the tokens not yet seen
        self.cache = None
        if use_cache and max_new_tokens is not None:
            from transformers import StaticCache

            # Allocated once for prompt + new tokens (as evaluation.py's generate does): HF's default cache
            # concatenates every layer's keys and values at each step, a copy of the whole cache per step and
            # model (bench/bench_evaluation.py: up to 3x a batched CPU step with long prompts). Same outputs.
            max_cache_len = input_ids.shape[1] + max_new_tokens
            if prefill_separately(model, self.ids):
                self.cache = prefill_rows(model, self.ids, self.mask, max_cache_len, adapter_names)
                if self.cache is not None:
                    self.ids = self.ids[:, -1:]  # (B, 1) the only column the cache has not seen
            if self.cache is None:
                self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)

    def next_logprobs(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Run the model on what it has not seen; -> (B, V) log-softmax of the last position, on `device`."""
        n_new = self.ids.shape[1]
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions[:, -n_new:],
            cache=self.cache,
            use_cache=self.use_cache,
            logits_to_keep=1,  # only the last position: skips the (T, V) output matrix of the prompt
            **self.extra,
        )
        if self.use_cache:
            self.cache = out.cache
        logits = slice_vocab(out.logits[:, -1, :], vocab_size)  # (B, V)
        return torch.log_softmax(logits.float(), dim=-1).to(device, non_blocking=True)

    def append(self, tokens: torch.Tensor) -> None:
        """Feed the step's tokens (B,): with a cache the model sees only them next time."""
        tokens = tokens.to(self.model.device)[:, None]  # (B, 1)
        self.ids = tokens if self.use_cache else torch.cat([self.ids, tokens], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)


class NgramBlocker:
    """no_repeat_ngram_size: ban a token that would complete an n-gram already in the row (prompt included,
    padding not). Kept incrementally, O(1) per row and step, instead of rescanning the sequence."""

    def __init__(self, n: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.n = n
        self.seqs = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        self.seen: list[dict[tuple, set[int]]] = [{} for _ in self.seqs]
        for row, seq in enumerate(self.seqs):
            for end in range(n, len(seq) + 1):
                self._add(row, seq[end - n:end])

    def _add(self, row: int, gram: list[int]) -> None:
        self.seen[row].setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def ban(self, scores: torch.Tensor, active: list[int]) -> torch.Tensor:
        """(B, V) scores -> the same with banned tokens at -inf (rows in `active` only)."""
        rows, cols = [], []
        for row in active:
            prefix = tuple(self.seqs[row][len(self.seqs[row]) - self.n + 1:]) if self.n > 1 else ()
            banned = self.seen[row].get(prefix, ())
            rows += [row] * len(banned)
            cols += list(banned)
        if rows:
            scores[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = float("-inf")
        return scores

    def append(self, tokens: list[int], active: list[int]) -> None:
        for row in active:
            self.seqs[row].append(tokens[row])
            if len(self.seqs[row]) >= self.n:
                self._add(row, self.seqs[row][-self.n:])


def process_scores(logp: torch.Tensor, seen: torch.Tensor | None = None, repetition_penalty: float = 1.0,
                   blocker: NgramBlocker | None = None, active: list[int] | None = None) -> torch.Tensor:
    """(B, V) blended log-probs -> (B, V) the scores a token is picked from: repetition penalty on the tokens
    `seen` (B, V) marks, then the n-gram ban for the rows in `active`. One step's processing, shared by
    steered_generate and speculative.py (which runs it at every drafted position).

    On log-probs (all <= 0) multiplying by the penalty always lowers the token; on raw logits, as in HF's
    processor, the sign decides, and a negative logit would be pushed the wrong way.
    """
    scores = logp
    if seen is not None and repetition_penalty != 1.0:
        scores = torch.where(seen, scores * repetition_penalty, scores)
    if blocker is not None:
        scores = blocker.ban(scores.clone(), active if active is not None else list(range(scores.shape[0])))
    return scores


def warp_scores(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) processed scores -> (B, V) log-probs of the sampling distribution (temperature, then nucleus), not
    renormalised after the nucleus cut (torch.multinomial normalises). `warp_scores(log([.5, .3, .2]), 1, .6)`
    -> log([.5, .3, 0])."""
    scores = torch.log_softmax(scores / temperature, dim=-1)
    if top_p < 1:
        scores = scores.masked_fill(~nucleus_mask(scores, top_p), float("-inf"))
    return scores


def check_decoding_args(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float,
                        no_repeat_ngram_size: int) -> None:
    raise_problems(decoding_problems(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          repetition_penalty=repetition_penalty,
                                          no_repeat_ngram_size=no_repeat_ngram_size)))


def models_to_run(large, small_base, small_tuned, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  blend: Blend, max_new_tokens: int, with_small_tuned: bool = False) -> dict[str, Any]:
    """The checks every steered decoder makes of its inputs -> {role: model} for the models the blend needs (a
    zero coefficient's model does not run; `with_small_tuned`: S_tuned runs anyway, as speculative.py's draft).
    Raises on a batch that is not (B, T) and LEFT-padded, a needed model that is None, or prompt + max_new_tokens
    past the models' context."""
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be (batch, length)")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("every row must end with a real token: "
                         "pad prompts on the LEFT (tokenizer.padding_side='left')")
    c_large, c_tuned, c_base = blend.coefficients
    roles = {LARGE: (large, c_large != 0 or blend.has_plausibility_limit),
             SMALL_TUNED: (small_tuned, c_tuned != 0 or with_small_tuned), SMALL_BASE: (small_base, c_base != 0)}
    missing = [role for role, (model, needed) in roles.items() if needed and model is None]
    if missing:
        raise ValueError(f"the blend ({blend.describe()}) needs the {', '.join(missing)} model, which is None")
    needed = {role: model for role, (model, run) in roles.items() if run}
    context = model_context(needed)
    longest = int(attention_mask.sum(-1).max())
    if longest + max_new_tokens > context:
        raise UsageError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the models' "
                         f"context ({context} tokens); shorten the prompt or lower max_new_tokens")
    return needed


@torch.inference_mode()
def steered_generate(
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
    use_cache: bool = True,
    return_logprobs: bool = False,
    stop: Callable[[int, list[int]], bool] | None = None,
):
    """Decode from the blend of three models, each with its own KV cache.

    input_ids / attention_mask: (B, T), LEFT-padded, so that every row's next token sits in the last column.
    Returns (new_tokens (B, N) with N <= max_new_tokens, pad_token_id after a row's EOS; ended_with_eos (B,)),
    plus (B, N, V) blended log-probs (before repetition penalties / sampling warps) if `return_logprobs`.
    A model whose coefficient in the blend is 0 is not run at all. The arithmetic happens on large's device;
    `use_cache=False` recomputes every prefix (for tests: it must give the same result).
    `stop(row, new_tokens_of_the_row)`, called after each step for the rows still decoding: True ends the row there
    (as EOS does, but ended_with_eos stays False): stop sequences (the lm-eval backend, the server).
    """
    check_decoding_args(max_new_tokens, temperature, top_p, repetition_penalty, no_repeat_ngram_size)
    needed = models_to_run(large, small_base, small_tuned, input_ids, attention_mask, blend, max_new_tokens)
    device = large.device
    adapter = paired_adapter(small_base, small_tuned) if {SMALL_BASE, SMALL_TUNED} <= set(needed) else None
    if adapter:  # S_tuned is a LoRA adapter on S's weights: one stream of 2B rows, S's then S_tuned's
        del needed[SMALL_BASE]
        needed[SMALL_TUNED] = small_tuned
    streams = {role: ModelStream(model, *((paired(input_ids), paired(attention_mask)) if adapter and
                                          role == SMALL_TUNED else (input_ids, attention_mask)),
                                 use_cache, max_new_tokens,
                                 pair_names(adapter, input_ids.shape[0]) if adapter and role == SMALL_TUNED else None)
               for role, model in needed.items()}

    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ended_with_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    history = []
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, vocab_size, device=device)  # (B, V) > 0 where the row already holds the token
        seen.scatter_add_(1, input_ids, attention_mask.float())
        seen = seen > 0
    blocker = NgramBlocker(no_repeat_ngram_size, input_ids, attention_mask) if no_repeat_ngram_size else None

    n_steps = 0
    for step in range(max_new_tokens):
        logps = {role: stream.next_logprobs(vocab_size, device) for role, stream in streams.items()}  # each (B, V)
        if adapter:
            logps[SMALL_BASE], logps[SMALL_TUNED] = split_pair(logps[SMALL_TUNED])  # (2B, V) -> (B, V) each
        logp = blend_logprobs(logps.get(LARGE), logps.get(SMALL_TUNED), logps.get(SMALL_BASE), blend)  # (B, V)
        if return_logprobs:
            history.append(logp)
        active = (~finished).nonzero().flatten().tolist() if blocker is not None else None
        scores = process_scores(logp, seen, repetition_penalty, blocker, active)  # shared with speculative.py
        if do_sample:
            scores = warp_scores(scores, temperature, top_p)
            next_tokens = torch.multinomial(scores.exp(), 1, generator=generator)[:, 0]  # (B,)
        else:
            next_tokens = scores.argmax(dim=-1)  # (B,)
        next_tokens = next_tokens.masked_fill(finished, pad_token_id)
        new_tokens[:, step] = next_tokens
        n_steps = step + 1
        just_ended = ~finished & (next_tokens == eos_token_id)
        ended_with_eos |= just_ended
        finished |= just_ended
        if stop is not None:
            for row in (~finished).nonzero().flatten().tolist():
                finished[row] = stop(row, new_tokens[row, :n_steps].tolist())
        if seen is not None:
            seen[torch.arange(batch, device=device), next_tokens] = True
        if blocker is not None:
            blocker.append(next_tokens.tolist(), active)
        if bool(finished.all()):
            break
        if step + 1 < max_new_tokens:
            for role, stream in streams.items():
                stream.append(paired(next_tokens) if adapter and role == SMALL_TUNED else next_tokens)
    new_tokens = new_tokens[:, :n_steps]
    if return_logprobs:
        return new_tokens, ended_with_eos, torch.stack(history, dim=1)  # (B, N, V)
    return new_tokens, ended_with_eos
