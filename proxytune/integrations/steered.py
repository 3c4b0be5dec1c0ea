"""A steered model as the integrations use it: the three models, their tokenizer, the blend and the prompt template
the models were tuned with, loaded from the project's model flags or a blend.json; decoding a batch with stop
sequences, and scoring continuations."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from proxytune.foundation.errors import UsageError
from proxytune.models.loading import vocab_size_of
from proxytune.steering.arguments import ModelArguments
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend, describe_blend
from proxytune.steering.decoding import left_pad, model_context
from proxytune.steering.loading import load_models, resolve_model_args
from proxytune.steering.records import run_template
from proxytune.steering.scoring import score_targets
from proxytune.steering.speculative import DEFAULT_DRAFT_TOKENS, decode_steered
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_prompt
from proxytune.task.reviews import reviews_of

logger = logging.getLogger(__name__)


BLEND_FIELDS = tuple(f.name for f in dataclasses.fields(Blend))  # large_weight, ..., plausibility_min_ratio


MODEL_FLAGS = tuple(f.name for f in dataclasses.fields(ModelArguments))  # large_model, large_device, ...


def resolve_blend(blend_file: str | None = None, alpha: float | None = None,
                  weights: dict[str, Any] | None = None) -> Blend:
    """The blend from one of: a blend.json (`blend_file`), `alpha` (proxy-tuning), or Blend's own fields
    (`weights`: large_weight=1, tuned_weight=0.5, ...). None of them: alpha = 1, as steer.py."""
    given = [name for name, value in (("blend", blend_file), ("alpha", alpha), ("the blend's fields", weights))
             if value]
    if len(given) > 1:
        raise UsageError(f"give one of blend=FILE, alpha=A or the blend's fields ({', '.join(BLEND_FIELDS)}), "
                         f"not {' and '.join(given)}")
    if blend_file:
        return Blend.load(blend_file)
    if weights:
        return Blend(**weights)
    return Blend.from_alpha(1.0 if alpha is None else float(alpha))


def resolve_device(device: str | None) -> str | None:
    """A device the caller asks for by default (lm-eval passes cuda:0 unless told): None (ours: cuda if there is
    one, else cpu) when it names CUDA on a machine without it."""
    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s asked for, but CUDA is not available here: using the CPU", device)
        return None
    return device or None


@dataclass
class Completion:
    """One prompt's decoded continuation: its tokens (EOS not included), the text cut before the first stop
    sequence, and why it ended ("stop": EOS or a stop sequence, "length": max_new_tokens)."""

    tokens: list[int]
    text: str
    finish_reason: str


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`cut_at_stop("a.\\nb", ["\\n"])` -> ("a.", True): the text before the earliest stop sequence (an empty one
    is ignored), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def stop_checker(tokenizer, stops: Sequence[Sequence[str]], limits: Sequence[int] | None = None
                 ) -> Callable[[int, list[int]], bool] | None:
    """The decoders' `stop` hook: row r ends once its decoded text holds one of `stops[r]` or once it has
    `limits[r]` tokens (rows of one batch may ask for different lengths). The whole row is decoded each step (a
    multi-byte character split over tokens decodes right only whole); None when no row needs the hook."""
    stops = [[s for s in row if s] for row in stops]
    ragged = limits is not None and len(set(limits)) > 1
    if not any(stops) and not ragged:
        return None

    def stop(row: int, tokens: list[int]) -> bool:
        if ragged and len(tokens) >= limits[row]:
            return True
        return bool(stops[row]) and cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops[row])[1]

    return stop


@dataclass
class TokenLogprobs:
    """The blend's log-prob of each target token given everything before it, and the `top` most likely tokens at
    each position as (token id, log-prob), most likely first."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


ROWS_PER_SCORING_PASS = 2**27  # log-prob values (V per target token) one token_logprobs pass keeps: 512 MB in float32


@dataclass
class SteeredModel:
    """The models of a blend (roles large, small_base, small_tuned), their shared tokenizer, the blend, and the prompt
    template S_tuned was tuned with (what `templated` puts a text into; prompts are otherwise taken as given)."""

    models: dict[str, Any]
    tokenizer: Any
    blend: Blend
    speculative: bool = True
    draft_tokens: int | None = DEFAULT_DRAFT_TOKENS
    template: PromptTemplate = DEFAULT_TEMPLATE

    def __post_init__(self):
        missing = [role for role in (LARGE, SMALL_BASE, SMALL_TUNED) if self.models.get(role) is None]
        if missing:
            raise UsageError(f"a steered model needs the {', '.join(missing)} model")

    @property
    def vocab_size(self) -> int:
        return vocab_size_of(self.tokenizer)

    @property
    def context(self) -> int:
        """Tokens the models take at once (prompt + generated)."""
        return model_context(self.models)

    @property
    def device(self) -> torch.device:
        return self.models[LARGE].device

    def describe(self) -> str:
        return f"{self.blend.describe()} ({describe_blend(self.blend)})"

    def templated(self, texts: str | Sequence[str], max_tokens: int | None = None) -> str:
        """The prompt of `texts` in the template, as steer.py makes it from --prompt (a string: one text, cleaned as
        reviews are, MReD's <sep> becoming a line break) or a --prompts_file row (a list: the reviews, or an
        instruction and its input); the texts are cut, never the template, so that the prompt has at most
        `max_tokens` tokens (None: uncut)."""
        reviews = reviews_of(texts)
        if not reviews:
            raise UsageError("the text to put into the prompt template is empty")
        return build_prompt(reviews, self.tokenizer, max_tokens, self.template)[0]

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 stop: Sequence[str] = (), row_stops: Sequence[Sequence[str]] | None = None, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> list[Completion]:
        """Decode one batch of token-id prompts (each non-empty) under the blend, speculatively where
        `decode_steered` says so; a row ends at EOS, at a stop sequence or after max_new_tokens. `max_new_tokens`
        is one length for every row or one per row (each >= 1); `row_stops`, one list of stop sequences per row,
        replaces `stop` (the same for every row)."""
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        stops = [list(stop)] * len(prompts) if row_stops is None else [list(s) for s in row_stops]
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)  # (B, T)
        tokens, ended = decode_steered(
            self.models[LARGE], self.models[SMALL_BASE], self.models[SMALL_TUNED], ids.to(self.device),
            mask.to(self.device), self.blend, max_new_tokens=max(limits), eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id, vocab_size=self.vocab_size, do_sample=do_sample,
            temperature=temperature, top_p=top_p, generator=generator, speculative=self.speculative,
            draft_tokens=self.draft_tokens, stop=stop_checker(self.tokenizer, stops, limits))
        out = []
        for row, eos, limit, row_stop in zip(tokens.tolist(), ended.tolist(), limits, stops):
            # A row that ended early is padded; one that stopped may hold tokens past the stop or its own limit (a
            # speculative round emits several): keep the tokens up to EOS (if within the limit), else up to the
            # limit, then up to the first token that completes a stop sequence.
            eos = eos and row.index(self.tokenizer.eos_token_id) < limit
            row = row[:row.index(self.tokenizer.eos_token_id)] if eos else row[:limit]
            text, stopped = cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True), row_stop)
            if stopped:
                row = row[:next(k for k in range(1, len(row) + 1) if cut_at_stop(
                    self.tokenizer.decode(row[:k], skip_special_tokens=True), row_stop)[1])]
            out.append(Completion(row, text, "stop" if eos or stopped else "length"))
        return out

    def score(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
              with_greedy: bool = False) -> tuple[list[float], list[bool] | None]:
        """Teacher-forced log-prob of each target given its prompt under the blend (float, summed over the target's
        tokens; one batch), and with `with_greedy` whether every target token is the blend's argmax there."""
        result = score_targets(self.models, [list(p) for p in prompts], [list(t) for t in targets],
                               vocab_size=self.vocab_size, batch_size=len(prompts), blend=self.blend,
                               keep_logprobs=("blend",) if with_greedy else (),
                               pad_token_id=self.tokenizer.pad_token_id, show_progress=False)
        logprobs = (-result["blend"]).tolist()
        if not with_greedy:
            return logprobs, None
        missed = result["logprobs/blend"].argmax(-1) != result["targets"]  # (R,) a target token not the argmax
        misses = torch.zeros(len(prompts), dtype=torch.long).index_add_(0, result["example_index"].cpu(),
                                                                         missed.long().cpu())
        return logprobs, (misses == 0).tolist()


    def token_logprobs(self, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                       top: int = 0) -> list[TokenLogprobs]:
        """Teacher-forced, per token: the blend's log-prob of each target token given its prompt and the target
        before it (the rows score() sums), and the `top` most likely tokens there. Prompts and targets non-empty;
        the rows are scored in passes that keep at most ROWS_PER_SCORING_PASS values."""
        out: list[TokenLogprobs] = []
        per_pass = max(1, ROWS_PER_SCORING_PASS // self.vocab_size)  # target tokens scored per pass
        start = 0
        while start < len(prompts):
            end, rows = start + 1, len(targets[start])
            while end < len(prompts) and rows + len(targets[end]) <= per_pass:
                rows += len(targets[end])
                end += 1
            result = score_targets(self.models, [list(p) for p in prompts[start:end]],
                                   [list(t) for t in targets[start:end]], vocab_size=self.vocab_size,
                                   batch_size=end - start, blend=self.blend, keep_logprobs=("blend",),
                                   pad_token_id=self.tokenizer.pad_token_id, show_progress=False)
            logps, chosen = result["logprobs/blend"], result["targets"]  # (R, V), (R,)
            chosen_logp = logps.gather(-1, chosen[:, None])[:, 0].tolist()  # (R,)
            best = logps.topk(min(top, self.vocab_size), dim=-1) if top else None  # (R, top)
            rows_of: dict[int, list[int]] = {}  # example -> its rows, in target order (as score_targets keeps them)
            for r, example in enumerate(result["example_index"].tolist()):
                rows_of.setdefault(example, []).append(r)
            top_ids, top_logps = (best.indices.tolist(), best.values.tolist()) if best is not None else ([], [])
            for i in range(end - start):
                out.append(TokenLogprobs([chosen_logp[r] for r in rows_of[i]],
                                         [list(zip(top_ids[r], top_logps[r])) if top else [] for r in rows_of[i]]))
            start = end
        return out


def load_steered(model_args: ModelArguments, blend: Blend, blend_file: str | None = None, speculative: bool = True,
                 draft_tokens: int | None = DEFAULT_DRAFT_TOKENS, prompt_template: str | None = None) -> SteeredModel:
    """Load L, S and S_tuned as steer.py does (model flags left out come from the blend file's record, else the
    defaults; each role's device, dtype and 4/8-bit flags) into a SteeredModel, with steer.py's prompt template:
    `prompt_template` (a name or file) when given, else the one S_tuned's final/ or the blend file records, else
    meta_review; a recorded one that differs is warned about (run_template)."""
    model_args = resolve_model_args(model_args, blend_file)
    template = run_template(prompt_template, model_args.small_tuned_model, blend_file)
    models, tokenizer = load_models(model_args)
    steered = SteeredModel(models, tokenizer, blend, speculative, draft_tokens, template)
    logger.info("steered model: blend %s, context %d tokens, %s, prompt template %s", steered.describe(),
                steered.context, "speculative decoding" if speculative else "the plain decoding loop", template.name)
    return steered
