"""Turn raw peer-review data into the tokenized meta-review dataset that fine_tune.py and evaluation.py read.

Hub default (needs internet):
    python processing_meta_review.py --output_dir outputs/meta_review

Local files (JSONL/JSON/CSV/Parquet, also .gz/.bz2/.xz/.zst-compressed; a directory of such files or a saved dataset;
or ORSUM's raw nested records):
    python processing_meta_review.py --dataset_name ../shared/data/meta_review/mred_val_longest.jsonl \
        --tokenizer_name ../shared/tokenizers/pythia --output_dir outputs/meta_review

With a config file (later files and flags override it):
    python processing_meta_review.py my_config.yaml --max_length 1024

Every example becomes `prompt` (the reviews in the --prompt_template of proxytune/task/prompts.py, cut token-wise so
prompt + target fit --max_length, each review keeping a fair share) and `target` (" " + meta-review +
EOS, never cut). Output: a DatasetDict (train/validation/test) saved with save_to_disk, `stats.json`
(rows in/kept, drops by reason, token-length percentiles, truncations, counts per label), `prompt_template.txt` and
`prompt_template.json` (read back by fine_tune.py). Alpaca-style instruction data (instruction, input, output) takes
`--prompt_template alpaca --min_target_words 1` (docs/data.md).

Label columns (--label_columns, default `decision` and `avg_rating`, kept when the source has them) ride along for
`fine_tune.py --task classification/regression` and evaluation.py's decision consistency. Decisions are normalised by
DECISION_MAP (every "Accept (...)" -> accept, "Reject (...)" -> reject); `--stratify_by_column decision` keeps each
label's share the same in train, validation and test:
    python processing_meta_review.py --dataset_name ../shared/data/meta_review/mred_val_longest.jsonl \
        --tokenizer_name ../shared/tokenizers/pythia --stratify_by_column decision \
        --output_dir outputs/meta_review_strat
"""

from __future__ import annotations

import logging
from pathlib import Path

from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.errors import UsageError
from proxytune.foundation.hub import check_hub_for_push
from proxytune.foundation.outputs import check_output_dir
from proxytune.models.loading import load_tokenizer
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.processing import check_max_length, process, push, save, summarize
from proxytune.task.prompts import load_template

logger = logging.getLogger("processing_meta_review")


def main(args: ProcessingArguments) -> dict:
    setup_logging()
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; choose a directory")
    check_output_dir(out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise UsageError(f"output directory {out} already exists and is not empty; use --overwrite_output_dir")
    template = load_template(args.prompt_template)
    logger.info("processing %s with tokenizer %s, max_length=%d, clean=%s, prompt template %s",
                args.dataset_name, args.tokenizer_name, args.max_length, args.clean, template.name)
    if args.push_to_hub:
        check_hub_for_push()
    tokenizer = load_tokenizer(args.tokenizer_name, trust_remote_code=args.trust_remote_code)
    check_max_length(tokenizer, args.max_length, template=template)
    # Long reviews are measured whole before they are cut; silence the "longer than the model" warning.
    tokenizer.model_max_length = int(1e30)
    dataset, stats = process(args, tokenizer, template=template)
    if stats["rows_kept"]["train"] == 0:
        raise UsageError(f"no training rows left after cleaning ({stats['dropped']}); check the data and the filters")
    save(dataset, stats, args, template)
    print(summarize(stats))
    logger.info("saved to %s", out)
    if args.push_to_hub:
        push(dataset, args)
    return stats


if __name__ == "__main__":
    run_cli(main, [ProcessingArguments], __doc__)
