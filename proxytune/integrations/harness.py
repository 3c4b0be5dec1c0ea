"""The lm-evaluation-harness backend: a steered blend as the harness's model type `proxytune-steered`.

Importing this module registers the type (lm-eval 0.4.13 has no plugin hook a checkout could use: no entry-point
group is read and there is no --plugins flag), so run the harness through `harness.py`, which imports it first:

    python harness.py run --model proxytune-steered --model_args blend=outputs/steer/blend.json \
        --tasks my_task --include_path my_tasks/ --device cpu --batch_size 8

or from Python: `import proxytune.integrations.harness`, then `lm_eval.simple_evaluate(model="proxytune-steered",
model_args="blend=...")`. `--model_args` takes steer.py's model flags without the dashes (large_model=...,
small_base_model=..., small_tuned_model=..., large_device=..., large_dtype=..., large_load_in_4bit=true, ...), and
the blend as blend=FILE, alpha=A or the blend's fields (large_weight=..., tuned_weight=..., base_weight=...);
speculative=false decodes with the plain loop, draft_tokens=K sets the draft length (0 = adaptive), seed=N seeds
sampling. docs/integrations.md has the details.

The prompt template is steer.py's: prompt_template=NAME_OR_FILE, else the one S_tuned's final/ or the blend records,
else meta_review (a recorded one that differs is warned about). The tasks' prompts are scored and continued as the
tasks write them; with the harness's --apply_chat_template, the template is the model's chat template
(apply_chat_template: each user message is put into it, as steer.py puts --prompt).

Scoring (loglikelihood, loglikelihood_rolling) is steering/scoring.py's teacher-forced pass under the blend;
generate_until is steering/speculative.py's decode_steered, stopping a row at the task's `until` sequences.
Tokenisation follows the harness's `hf` backend (its TemplateLM), so with S_tuned = S the results are the `hf`
backend's for L alone (tests/test_lm_eval_backend.py), but for two differences: log-probs are normalised over the
tokenizer's vocabulary (Pythia's 27 padded logits are dropped, as everywhere in this project), and the scoring
window is one token shorter than the models' context (score_targets feeds the last target token too), which
changes only inputs longer than the context.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from proxytune.foundation.errors import UsageError
from proxytune.integrations.steered import (
    BLEND_FIELDS,
    MODEL_FLAGS,
    SteeredModel,
    load_steered,
    resolve_blend,
    resolve_device,
)
from proxytune.steering.arguments import ModelArguments
from proxytune.steering.speculative import DEFAULT_DRAFT_TOKENS

logger = logging.getLogger(__name__)


MODEL_TYPE = "proxytune-steered"


DEFAULT_BATCH_SIZE = 8  # for the harness's batch_size=auto, which probes memory with the hf model alone


MAX_GEN_TOKS = 256  # the `hf` backend's default when a task sets no max_gen_toks


@register_model(MODEL_TYPE)
class SteeredLM(TemplateLM):
    """The steered blend of L, S_tuned and S as an lm-eval model. Give `steered` (a loaded SteeredModel, e.g. in
    tests) or the model flags and the blend as keyword arguments (what --model_args holds)."""

    def __init__(self, steered: SteeredModel | None = None, *, blend: str | None = None, alpha: float | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 device: str | None = None, speculative: bool = True, draft_tokens: int | None = DEFAULT_DRAFT_TOKENS,
                 seed: int = 1234, prompt_template: str | None = None, **flags: Any):
        super().__init__()
        unknown = [k for k in flags if k not in MODEL_FLAGS and k not in BLEND_FIELDS]
        if unknown:
            raise UsageError(f"{MODEL_TYPE}: unknown model_args {', '.join(unknown)}; known: blend, alpha, "
                             f"{', '.join(BLEND_FIELDS)}, {', '.join(MODEL_FLAGS)}, speculative, draft_tokens, seed, "
                             "prompt_template")
        if steered is None:
            weights = {k: v for k, v in flags.items() if k in BLEND_FIELDS}
            model_args = ModelArguments(**{k: v for k, v in flags.items() if k in MODEL_FLAGS})
            if model_args.large_device is None:
                model_args = dataclasses.replace(model_args, large_device=resolve_device(device))
            steered = load_steered(model_args, resolve_blend(blend, alpha, weights), blend, speculative,
                                   draft_tokens or None, prompt_template)
        elif blend is not None or alpha is not None or prompt_template is not None or flags:
            raise UsageError(f"{MODEL_TYPE}: give a loaded SteeredModel or the model flags, the blend and the prompt "
                             "template, not both")
        self.steered = steered
        self.tokenizer = steered.tokenizer
        self._device = steered.device
        if batch_size is None or str(batch_size).startswith("auto"):
            batch_size = DEFAULT_BATCH_SIZE
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UsageError(f"{MODEL_TYPE}: batch_size {batch_size} must be >= 1")
        self.generator = torch.Generator(device=self._device).manual_seed(int(seed))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by (the `hf` backend's choice: BOS, else EOS)."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """The longest input scored at once: one under the context, as score_targets feeds the last token too."""
        return self.steered.context - 1

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """As the `hf` backend: the tokenizer's own special tokens unless told, none when the text already starts
        with the prefix token's text."""
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, with_greedy: bool = True) -> list[tuple[float, bool]]:
        """(request, context ids, continuation ids) -> (log p(continuation | context), is greedy) under the blend;
        a too-long input loses tokens from the left, as in the `hf` backend."""
        pairs = []
        for _, context, continuation in requests:
            if not continuation or len(continuation) > self.max_length:
                raise UsageError(f"{MODEL_TYPE}: a continuation of {len(continuation)} tokens cannot be scored in "
                                 f"a {self.max_length}-token window")
            whole = (context + continuation)[-(self.max_length + 1):]
            pairs.append((whole[:-len(continuation)], continuation))
        order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))  # longest first: similar lengths
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), desc="scoring", unit="batch", disable=disable_tqdm):
            idx = order[start:start + self.batch_size]
            logprobs, greedy = self.steered.score([pairs[i][0] for i in idx], [pairs[i][1] for i in idx],
                                                  with_greedy=with_greedy)
            for row, i in enumerate(idx):
                results[i] = (logprobs[row], bool(greedy[row]) if greedy is not None else False)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, in disjoint windows of max_length tokens (the harness's own windows)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm, with_greedy=False)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Steered decoding of each context until one of its `until` sequences, EOS or max_gen_toks; requests with
        the same generation kwargs are decoded together, longest first, in batches."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", unit="request", disable=disable_tqdm)
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            if kwargs:
                logger.warning("%s ignores the generation kwargs %s", MODEL_TYPE, sorted(kwargs))
            room = self.steered.context - max_gen_toks
            if room < 1:
                raise UsageError(f"{MODEL_TYPE}: max_gen_toks {max_gen_toks} leaves no room for the context in the "
                                 f"models' {self.steered.context} tokens")
            # The context's last `room` tokens, as the `hf` backend cuts it; an empty one starts from the prefix token.
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room) or [self.prefix_token_id]
                       for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                completions = self.steered.generate(
                    [prompts[i] for i in idx], max_new_tokens=max_gen_toks, stop=until,
                    do_sample=do_sample and temperature > 0, temperature=temperature or 1.0, top_p=top_p,
                    generator=self.generator)
                for i, completion in zip(idx, completions):
                    results[i] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
                bar.update(len(idx))
        bar.close()
        return results

    def chat_template(self, chat_template: bool | str = False) -> str:
        """The prompt template's text: what --apply_chat_template formats with (the harness records it)."""
        return self.steered.template.describe()

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """--apply_chat_template: the conversation as the steered models were tuned to read it. Each user message,
        after the system messages before it, is put into the prompt template as its texts (a system message and a
        question become an Alpaca instruction and input; meta_review joins them as reviews); each assistant message
        follows as a training target does, " " + text + EOS, the last one without EOS when it is to be continued
        (add_generation_prompt false).

        [{"role": "user", "content": "Good paper."}] -> 'Peer reviews of a paper:\n\nGood paper.\n\nMeta-review:'
        """
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        parts, system = [], []
        for i, message in enumerate(chat_history):
            role, content = message.get("role"), str(message.get("content") or "")
            if role == "system":
                system.append(content)
            elif role == "user":
                parts.append(self.steered.template.render([*system, content]))
                system = []
            elif role == "assistant":
                last = i == len(chat_history) - 1 and not add_generation_prompt
                parts.append(" " + content + ("" if last else eos))
            else:
                raise UsageError(f"{MODEL_TYPE}: chat message {i} has role {role!r}; system, user or assistant")
        return "".join(parts)

    def get_model_info(self) -> dict:
        return {"model_type": MODEL_TYPE, "blend": self.steered.blend.to_dict(), "system": self.steered.describe(),
                "models": {role: getattr(m, "name_or_path", None) for role, m in self.steered.models.items()},
                "prompt_template": self.steered.template.record()}
