"""Generating every system's meta-reviews and scoring the references' perplexity."""

from __future__ import annotations

from typing import Any

from proxytune.evaluation.arguments import SYSTEM_ROLES
from proxytune.models.loading import vocab_size_of
from proxytune.steering.decoding import left_pad, prefill_rows, prefill_separately
from proxytune.steering.scoring import score_targets
from proxytune.steering.speculative import decode_steered
from proxytune.task.processing import tokenize_example
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_prompt, encode_target


def build_inputs(examples: list[dict], tokenizer, prompt_budget: int, context: int,
                 template: PromptTemplate = DEFAULT_TEMPLATE) -> None:
    """Add the generation prompt (cut to `prompt_budget` by build_prompt) and the inputs for scoring.

    The reference is " " + meta-review + EOS, exactly the training target, scored whole: its prompt gets its own
    budget (reviews cut so that prompt + reference fit the context, tokenize_example's rule,
    as in training), not the generation prompt's, which leaves only max_new_tokens for the reference. Only a
    reference that alone (nearly) fills the context is cut, after the generation prompt; `reference_cut` says so.
    """

    for ex in examples:
        prompt, truncated = build_prompt(ex["reviews"], tokenizer, prompt_budget, template)
        ex["prompt_ids"] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ex["prompt_truncated"] = truncated
        scored = tokenize_example({"reviews": ex["reviews"], "Output": ex["Output"]}, tokenizer, context, template)
        if scored is not None:
            n_prompt = scored["prompt_length"]
            ex["score_prompt_ids"], ex["target_ids"] = scored["input_ids"][:n_prompt], scored["input_ids"][n_prompt:]
            ex["reference_cut"] = False
        else:
            target = encode_target(ex["Output"], tokenizer)
            ex["score_prompt_ids"], ex["target_ids"] = ex["prompt_ids"], target[: context - len(ex["prompt_ids"])]
            ex["reference_cut"] = True


def cut_at_eos(tokens: list[int], eos_id: int) -> tuple[list[int], bool]:
    """`cut_at_eos([5, 6, 0, 1, 1], 0)` -> ([5, 6], True): tokens before the first EOS, and whether there was one."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id)], True
    return tokens, False


def generate_batch(system: str, models: dict[str, Any], blend, input_ids, attention_mask, settings: dict,
                   tokenizer, generator, speculative: bool = True) -> Any:
    """New tokens (B, <= max_new_tokens) for one left-padded batch."""
    import torch

    vocab = vocab_size_of(tokenizer)
    if system == "steered":
        new_tokens, _ = decode_steered(
            models["large"], models["small_base"], models["small_tuned"], input_ids, attention_mask, blend,
            speculative=speculative,
            max_new_tokens=settings["max_new_tokens"], eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=vocab, do_sample=settings["do_sample"],
            temperature=settings["temperature"], top_p=settings["top_p"],
            repetition_penalty=settings["repetition_penalty"],
            no_repeat_ngram_size=settings["no_repeat_ngram_size"], generator=generator,
        )
        return new_tokens
    from transformers import GenerationConfig


    model = models[system]
    rows = model.get_output_embeddings().weight.shape[0]
    # top_k=0: GenerationConfig would otherwise sample from the 50 likeliest tokens only, unlike the steered system
    # (decode_steered), rl_tune.py and PPO, which sample from the whole distribution (after --top_p).
    sampling = dict(temperature=settings["temperature"], top_p=settings["top_p"], top_k=0) \
        if settings["do_sample"] else {}
    # On CPU the prompts' pass runs one row at a time into one batched cache; generate() then runs the last
    # column and the decoding steps batched (prefill_rows says why; bench/bench_evaluation.py).
    cache = None
    if prefill_separately(model, input_ids):
        cache = prefill_rows(model, input_ids, attention_mask, input_ids.shape[1] + settings["max_new_tokens"])
    config = GenerationConfig(
        do_sample=settings["do_sample"], max_new_tokens=settings["max_new_tokens"],
        repetition_penalty=settings["repetition_penalty"], no_repeat_ngram_size=settings["no_repeat_ngram_size"],
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        # Pythia's output matrix is wider than its tokenizer; the padding rows are not tokens.
        suppress_tokens=list(range(vocab, rows)) or None, **sampling,
        # A KV cache allocated once for prompt + new tokens: the default cache concatenates every layer's keys and
        # values at each step, which at batch 8 with ~1,000-token prompts was up to 3x the step's time on CPU
        # (bench/bench_evaluation.py). Same outputs. No auto torch.compile (it would recompile per prompt width).
        cache_implementation=None if cache is not None else "static", disable_compile=True,
    )
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             generation_config=config)
    return out[:, input_ids.shape[1]:]  # (B, <= max_new_tokens)


def generate(system: str, examples: list[dict], models: dict[str, Any], blend, settings: dict, tokenizer,
             batch_size: int, seed: int, progress=None, speculative: bool = True) -> list[dict]:
    """Generate for every example; returns one record per example, in the order given. `progress` (a tqdm bar)
    advances by one per example."""
    import torch


    torch.manual_seed(seed)
    device = models[SYSTEM_ROLES[system][0]].device
    generator = torch.Generator(device=device).manual_seed(seed)
    # Longest prompts first: similar lengths share a batch (less padding) and memory trouble shows at once.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["prompt_ids"]))
    records: list[dict | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([examples[i]["prompt_ids"] for i in batch], tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # (B, T) each
        new_tokens = generate_batch(system, models, blend, input_ids, attention_mask, settings, tokenizer, generator,
                                    speculative)
        for i, row in zip(batch, new_tokens.tolist()):
            tokens, ended = cut_at_eos(row, tokenizer.eos_token_id)
            records[i] = {
                "example_id": examples[i]["example_id"], "system": system,
                "prediction": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "new_tokens": len(tokens), "ended_with_eos": ended,
                "prompt_tokens": len(examples[i]["prompt_ids"]), "prompt_truncated": examples[i]["prompt_truncated"],
            }
        if progress is not None:
            progress.update(len(batch))
    return records


def score_references(systems: list[str], examples: list[dict], models: dict[str, Any], blend, tokenizer,
                     batch_size: int) -> dict[str, list[tuple[float, int]]]:
    """{system: [(summed NLL, tokens) per example]} of the reference meta-reviews given the prompts, from
    score_targets: one forward pass per model; the steered system is scored as the blend of them."""

    roles = sorted({r for s in systems for r in SYSTEM_ROLES[s]})
    scores = score_targets({r: models[r] for r in roles}, [ex["score_prompt_ids"] for ex in examples],
                           [ex["target_ids"] for ex in examples], vocab_size=vocab_size_of(tokenizer),
                           batch_size=batch_size, blend=blend if "steered" in systems else None,
                           pad_token_id=tokenizer.pad_token_id)
    n_tokens = scores["n_tokens"].tolist()
    return {s: list(zip(scores["blend" if s == "steered" else s].tolist(), n_tokens)) for s in systems}
