"""steer.py without --tune: read the prompts, decode them under the blend, write the generations."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from proxytune.foundation.datafiles import read_data_text, split_compression
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import atomic_directory, write_json
from proxytune.foundation.progress import progress_bar
from proxytune.models.loading import vocab_size_of
from proxytune.steering.arguments import SteerArguments
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend, describe_blend
from proxytune.steering.decoding import left_pad
from proxytune.steering.speculative import decode_steered
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_prompt
from proxytune.task.reviews import from_alpaca, is_alpaca, reviews_of

logger = logging.getLogger(__name__)


def read_prompt_texts(args: SteerArguments) -> list[tuple[Any, dict]]:
    """-> [(reviews value, source row)] from --prompt or --prompts_file (Alpaca rows: [instruction, input])."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty; pass the reviews text to steer on")
        return [(args.prompt, {})]
    if args.prompts_file is None:
        raise UsageError("nothing to generate from: pass --prompt TEXT or --prompts_file FILE (or --tune)")
    path = Path(args.prompts_file)
    if not path.is_file():
        raise UsageError(f"--prompts_file {path} does not exist")
    text = read_data_text(path, "--prompts_file")
    kind, _ = split_compression(path)  # 'x.jsonl.gz' -> '.jsonl'
    if kind not in (".jsonl", ".json"):
        items = [(line, {}) for line in text.splitlines() if line.strip()]
    else:
        try:
            rows = json.loads(text) if kind == ".json" else [json.loads(line) for line in text.split("\n")
                                                             if line.strip()]
        except json.JSONDecodeError as err:
            raise UsageError(f"--prompts_file {path} is not valid {kind[1:].upper()}: {err}") from None
        if isinstance(rows, list) and all(isinstance(r, dict) and is_alpaca(r, args.input_column) for r in rows):
            rows = [from_alpaca(row) for row in rows]  # instruction (+ input) in Input, output as the reference
            items = [(row["Input"] or "", row) for row in rows]
        elif not isinstance(rows, list) or not all(isinstance(r, dict) and args.input_column in r for r in rows):
            raise UsageError(f"--prompts_file {path}: every record needs an '{args.input_column}' column (or "
                             "Alpaca's instruction and output); set --input_column")
        else:
            items = [(row[args.input_column], row) for row in rows]
    if not items:
        raise UsageError(f"--prompts_file {path} holds no prompts")
    return items


def build_prompts(items: list[tuple[Any, dict]], tokenizer, budget: int, use_template: bool,
                  template: PromptTemplate = DEFAULT_TEMPLATE) -> list[str]:
    """Reviews (or an instruction and its input) -> prompt texts of at most `budget` tokens, cut as in training."""
    prompts, n_truncated = [], 0
    for i, (value, _) in enumerate(items):
        if use_template:
            reviews = reviews_of(value)
            if not reviews:
                raise UsageError(f"prompt {i} has no review text; every prompt needs the reviews to summarise")
            prompt, truncated = build_prompt(reviews, tokenizer, budget, template)
            n_truncated += truncated
        else:
            prompt = value if isinstance(value, str) else "\n\n".join(map(str, value))
            if not prompt.strip():
                raise UsageError(f"prompt {i} is empty")
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n > budget:
                raise UsageError(f"prompt {i} has {n} tokens but the context leaves {budget} after --max_new_tokens; "
                                 "shorten it, lower --max_new_tokens, or use the template (which cuts reviews)")
        prompts.append(prompt)
    if n_truncated:
        logger.info("%d of %d prompts had their reviews cut to fit %d tokens", n_truncated, len(prompts), budget)
    return prompts


def resolve_blend(args: SteerArguments) -> Blend:
    blend = Blend.load(args.blend) if args.blend else Blend.from_alpha(1.0 if args.alpha is None else args.alpha)
    if args.plausibility_top_p is not None:
        blend = dataclasses.replace(blend, plausibility_top_p=args.plausibility_top_p)
    return blend


def generate_texts(models: dict[str, Any], tokenizer, prompts: list[str], blend: Blend, args: SteerArguments,
                   desc: str = "generating") -> list[dict]:
    """Decode every prompt in batches (longest first, so rows of a batch have similar lengths)."""

    large = models[LARGE]
    generator = torch.Generator(device=large.device).manual_seed(args.seed)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[dict] = [{} for _ in prompts]
    for start in progress_bar(range(0, len(order), args.batch_size), desc=desc, unit="batch"):
        idx = order[start:start + args.batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        tokens, ended = decode_steered(
            large, models[SMALL_BASE], models[SMALL_TUNED], ids.to(large.device), mask.to(large.device), blend,
            max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size_of(tokenizer), do_sample=args.do_sample,
            temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size, generator=generator,
            speculative=args.speculative, draft_tokens=args.draft_tokens or None)
        for row, i in enumerate(idx):
            row_tokens = tokens[row].tolist()
            if ended[row]:
                row_tokens = row_tokens[:row_tokens.index(tokenizer.eos_token_id)]
            results[i] = {"generation": tokenizer.decode(row_tokens, skip_special_tokens=True).strip(),
                          "ended_with_eos": bool(ended[row]), "n_new_tokens": len(row_tokens),
                          "n_prompt_tokens": len(encoded[i])}
    return results


def write_generations(items, prompts, results, blend, config: dict, output_dir: str | None, overwrite: bool,
                      system: str | None = None) -> None:
    """generations.jsonl and config.json (the flags, the blend and `system`, what it is: describe_blend) in
    `output_dir`, else the generations printed."""
    rows = []
    for (_value, source), prompt, result in zip(items, prompts, results):
        row = {"prompt": prompt, **result}
        if "Output" in source:
            row["reference"] = source["Output"]
        rows.append(row)
    if output_dir is None:
        for i, row in enumerate(rows):
            print(f"=== {i}: {row['n_prompt_tokens']} prompt tokens, {row['n_new_tokens']} new"
                  f"{', ended with EOS' if row['ended_with_eos'] else ''}\n{row['generation']}\n")
        return
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        with open(tmp / "generations.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_json(tmp / "config.json", {**config, "resolved_blend": blend.to_dict(),
                                         "system": system or describe_blend(blend)})
    logger.info("wrote %d generations to %s", len(rows), Path(output_dir) / "generations.jsonl")
