"""Generate meta-reviews with every system you name, score them, and write a workbook for human review.

After processing_meta_review.py, fine_tune.py and steer.py --tune at their defaults, with no flag: 20 examples of
outputs/meta_review's test split, small_base, small_tuned, large and steered with outputs/steer/blend.json, whose
record names the models it was tuned with (--all_examples for the whole split):
    python evaluation.py

The same with every flag written out (a model flag given explicitly wins over the blend's record):
    python evaluation.py --dataset_path outputs/meta_review --split test --num_examples 20 \
        --small_base_model EleutherAI/pythia-70m --small_tuned_model outputs/pythia-70m-meta-review/final \
        --large_model EleutherAI/pythia-410m --blend outputs/steer/blend.json --output_dir outputs/evaluation

A raw JSONL/JSON/CSV file with Input/Output columns works too, and config files cascade:
    python evaluation.py eval.yaml --dataset_path ../shared/data/meta_review/mred_val_longest.jsonl --alpha 1.0

Sharded over processes (each generates its share; rank 0 merges and writes everything):
    torchrun --nproc_per_node 4 evaluation.py eval.yaml
    # or by hand: --shard_index K --num_shards N for each K, then the same command with --merge_only

Systems: small_base, small_tuned, large, large_tuned, steered (a system runs when its models are given;
--systems picks a subset). Every system gets the same prompts (--prompt_template, else the template the small tuned
model's final/, the blend or the processed data records, else meta_review; re-cut to fit
min(model context, --max_length) - max_new_tokens) and the same decoding settings unless
--decoding_overrides changes them for one system.

Writes to --output_dir: eval_examples.xlsx (workbook.py: a blind Review sheet with rating dropdowns, a
Pairwise sheet for --pairwise, Summary with a chart, Scores, Intervals, Run; judgments already typed into
an existing workbook are carried over, never dropped), ratings.jsonl (every judgment), metrics.json,
predictions.jsonl, prompt_template.txt and rouge_by_system.png.

Decision consistency (does the generated meta-review reach the paper's real decision?), with a classifier from
`fine_tune.py --task classification --label_column decision --classification_input meta_review`
(proxytune/training/classification.py):
    python evaluation.py --decision_classifier outputs/decision-classifier/final

Continuations of text prompts, without references (docs/rl-from-a-reward.md): the first 2-8 tokens of held-out texts
continued by every system, scored by a reward classifier (positive rate, mean score), an independent judge
classifier (positive rate), a fluency model (perplexity given the prompt), distinct-1/2/3, EOS share and length:
    python evaluation.py --text_dataset ../shared/data/imdb/imdb_partial.jsonl.gz --completion_length 4,16 \
        --small_base_model EleutherAI/pythia-70m --small_tuned_model outputs/rl-ppo-imdb/final \
        --large_model EleutherAI/pythia-410m --alpha 1.0 --reward_model path/to/sentiment-classifier \
        --reward_label positive --judge_classifier path/to/another-classifier --fluency_model EleutherAI/pythia-1.4b

ROUGE-Lsum needs one sentence per line; nltk's punkt data cannot be downloaded here, so sentences are
split with a regular expression (`split_sentences`) instead. Scores are F1 x 100, with percentile
bootstrap confidence intervals over examples (the same resamples for every system, so they are paired).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from proxytune.evaluation.arguments import (
    ARGUMENT_TYPES,
    ContinuationArguments,
    GenerationArguments,
    ModelArguments,
    OutputArguments,
)
from proxytune.evaluation.continuations import CONTINUATION_METRICS, evaluate_continuations
from proxytune.evaluation.outputs import format_table, write_outputs
from proxytune.evaluation.shards import (
    evaluate_shard,
    merge_shards,
    resolve_sharding,
    shard_path,
    wait_for_ranks,
    write_shard,
)
from proxytune.evaluation.systems import resolve_models
from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import check_output_dir
from proxytune.models.loading import default_device
from proxytune.task.papers import DataArguments
from proxytune.workbook.judgments import read_judgments

logger = logging.getLogger("evaluation")


def main(model_args: ModelArguments, data_args: DataArguments, gen_args: GenerationArguments,
         out_args: OutputArguments, cont_args: ContinuationArguments | None = None) -> dict | None:
    """Evaluate; returns metrics.json's content (None on ranks other than 0 and on hand-run shards)."""
    setup_logging()
    shard_index, num_shards, launched = resolve_sharding(out_args)
    out_dir = Path(out_args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output_dir {out_dir} is a file; choose a directory")
    check_output_dir(out_dir)  # fail now, not after an hour of generation
    writes_outputs = out_args.merge_only or shard_index == 0 and (num_shards == 1 or launched)
    if writes_outputs:
        check_output_dir(out_args.workbook_path.parent, f"--output_xlsx {out_args.workbook_path}: directory")
        read_judgments(out_args.workbook_path)  # fail now, not after an hour of generation
    if cont_args is not None and cont_args.text_dataset:  # continuations of text prompts, no references
        metrics = evaluate_continuations(model_args, data_args, gen_args, out_args, cont_args,
                                         model_args.device or default_device(), num_shards)
        print(format_table(metrics["systems"], CONTINUATION_METRICS))
        logger.info("wrote %s and metrics/predictions/plot to %s", out_args.workbook_path, out_dir)
        return metrics
    if out_args.merge_only:
        merged = merge_shards(out_dir, out_args.num_shards)
    else:
        started = time.perf_counter()
        device = model_args.device or default_device()
        if launched and device.startswith("cuda") and ":" not in device:
            device = f"cuda:{os.environ.get('LOCAL_RANK', shard_index)}"
        model_args = resolve_models(model_args)
        shard = evaluate_shard(model_args, data_args, gen_args, out_args, shard_index, num_shards, device)
        logger.info("loaded, generated and scored in %.1f s", time.perf_counter() - started)
        if num_shards == 1:
            merged = shard
        else:
            write_shard(shard_path(out_dir, shard_index, num_shards), shard)
            if not launched:
                logger.info("wrote shard %d of %d; when all are done, run the same command with --merge_only",
                            shard_index, num_shards)
                return None
            created = wait_for_ranks(out_args.shard_timeout)
            try:
                if shard_index != 0:
                    return None
                merged = merge_shards(out_dir, num_shards)
            finally:
                if created:
                    import torch.distributed as dist

                    dist.destroy_process_group()
    metrics = write_outputs(merged, out_args)
    print(format_table(metrics["systems"]))
    logger.info("wrote %s and metrics/predictions/plot to %s", out_args.workbook_path, out_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main, ARGUMENT_TYPES, __doc__)
