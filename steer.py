"""Steer a large base model with a small fine-tuned one at decoding time (proxy-tuning / EFT up-scaling).

Generate (OUT/final is fine_tune.py's result: a model directory or a LoRA adapter directory):
    python steer.py --large_model EleutherAI/pythia-410m --small_base_model EleutherAI/pythia-70m \
        --small_tuned_model OUT/final --alpha 1.0 --prompt "The paper proposes ..." --max_new_tokens 128

Tune the blend on validation papers (writes blend.json, tune_report.json): a perplexity search, then the candidates
(proxy-tuning at a few alphas, the perplexity-best blends) are decoded on held-out papers and the best ROUGE-L wins:
    python steer.py --large_model EleutherAI/pythia-410m --small_base_model EleutherAI/pythia-70m \
        --small_tuned_model OUT/final --tune --validation_data outputs/meta_review --output_dir outputs/steer

Generate for many reviews (JSONL with an `Input` column) with the tuned blend; blend.json records the models it was
tuned with and how each was quantised, so no model or quantisation flag is needed (a flag given explicitly wins,
with a warning if it differs):
    python steer.py --blend outputs/steer/blend.json \
        --prompts_file ../shared/data/meta_review/mred_val_longest.jsonl --output_dir outputs/steer_generations

The prompt template is the one the small tuned model's final/ (else the --blend file) records; --prompt_template
chooses another, with a warning (docs/data.md).

Each model may sit on its own device and dtype (--large_device cuda:0 --small_base_device cuda:1 --large_dtype
bfloat16 ...) and be loaded in 4 or 8 bits (--large_load_in_4bit, bitsandbytes; README "Quantised models"); the
arithmetic runs on L's device, on float32 log-probs.

The next-token distribution is, normalised over the whole vocabulary,

    log p~(x) = w_L * log p_L(x; T_L) + w_tuned * log p_S_tuned(x; T_S) - w_base * log p_S(x; T_S) - log Z

w_L = 1, w_tuned = w_base = alpha is proxy-tuning (Liu et al. 2024, arXiv:2401.08565) and EFT up-scaling
(Mitchell et al. 2023). The three models must share one tokenizer; each keeps its own KV cache, so after the
prompt every step costs one token per model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.config import to_jsonable
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import check_output_dir
from proxytune.models.quantization import loaded_bits
from proxytune.steering.arguments import DEFAULT_TUNE_DIR, ModelArguments, SteerArguments, TuneArguments
from proxytune.steering.blend import describe_blend
from proxytune.steering.decoding import check_decoding_args, model_context
from proxytune.steering.generation import (
    build_prompts,
    generate_texts,
    read_prompt_texts,
    resolve_blend,
    write_generations,
)
from proxytune.steering.loading import load_models, model_records, resolve_model_args
from proxytune.steering.records import run_template
from proxytune.steering.tuning import format_report, tune, warn_if_not_steering, write_tune_outputs

logger = logging.getLogger("steer")


def main(model_args: ModelArguments, steer_args: SteerArguments, tune_args: TuneArguments) -> Any:
    """Generate with the steered blend, or (--tune) choose the blend. Returns the rows / the report."""
    setup_logging()
    if tune_args.tune and steer_args.output_dir is None:
        steer_args = dataclasses.replace(steer_args, output_dir=DEFAULT_TUNE_DIR)
    check_decoding_args(steer_args.max_new_tokens, steer_args.temperature, steer_args.top_p,
                        steer_args.repetition_penalty, steer_args.no_repeat_ngram_size)
    out = Path(steer_args.output_dir) if steer_args.output_dir else None
    if out:
        check_output_dir(out)
    if out and out.is_dir() and any(out.iterdir()) and not steer_args.overwrite_output_dir:
        raise UsageError(f"output directory {out} already exists and is not empty; use --overwrite_output_dir")
    if not tune_args.tune:
        blend = resolve_blend(steer_args)  # a bad blend file fails before the models load
        items = read_prompt_texts(steer_args)
    model_args = resolve_model_args(model_args, steer_args.blend)
    template = run_template(steer_args.prompt_template, model_args.small_tuned_model, steer_args.blend,
                            tune_args.validation_data if tune_args.tune else None)
    config = to_jsonable(model_args, steer_args, tune_args)
    logger.info("config: %s", json.dumps(config))
    torch.manual_seed(steer_args.seed)
    models, tokenizer = load_models(model_args, with_large_tuned=tune_args.tune)

    if tune_args.tune:
        report, rows = tune(models, tokenizer, tune_args, steer_args, template)
        report["models"] = model_records(model_args, models)
        print(format_report(report))
        write_tune_outputs(report, rows, config, steer_args.output_dir, steer_args.overwrite_output_dir)
        return report

    context = model_context(models)
    budget = context - steer_args.max_new_tokens
    if budget < 1:
        raise UsageError(f"--max_new_tokens {steer_args.max_new_tokens} leaves no room for the prompt in the "
                         f"{context}-token context; lower it")
    prompts = build_prompts(items, tokenizer, budget, steer_args.use_template, template)
    system = describe_blend(blend, loaded_bits(models))
    logger.info("%d prompts, blend %s (%s), %s decoding, max_new_tokens=%d", len(prompts), blend.describe(),
                system, "sampled" if steer_args.do_sample else "greedy", steer_args.max_new_tokens)
    warn_if_not_steering("blend", blend)
    results = generate_texts(models, tokenizer, prompts, blend, steer_args)
    write_generations(items, prompts, results, blend, config, steer_args.output_dir, steer_args.overwrite_output_dir,
                      system)
    return results


if __name__ == "__main__":
    run_cli(main, [ModelArguments, SteerArguments, TuneArguments], __doc__)
