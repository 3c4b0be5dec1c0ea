"""The papers a model writes meta-reviews for: which dataset or file, which split, how many, in what order."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.validation import SEED_MAX, number_problems
from proxytune.task.arguments import TEMPLATE_HELP, ProcessingArguments
from proxytune.task.prompts import REVIEW_JOINER
from proxytune.task.reviews import clean_text, example_id, from_alpaca, is_alpaca, normalise_decision, reviews_of
from proxytune.task.sources import load_raw_dataset, load_saved_split

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")  # where DPO looks up the workbook's papers


PROCESSED_DATASET = "outputs/meta_review"  # processing_meta_review.py's output_dir


DEFAULT_NUM_EXAMPLES = 20


@dataclass
class DataArguments:
    dataset_path: str = field(
        default=PROCESSED_DATASET,
        metadata={"help": "A dataset dir from processing_meta_review.py (default: its output_dir), or a "
                  "JSONL/JSON/CSV file with Input/Output."},
    )
    split: str = field(default="test", metadata={"help": "Split of a processed dataset (a raw file is one split)."})
    num_examples: int | None = field(
        default=DEFAULT_NUM_EXAMPLES,
        metadata={"help": "Evaluate this many examples (seeded sample): the default takes minutes on a CPU with "
                  "pythia-410m; --all_examples for the whole split."})
    all_examples: bool = field(default=False, metadata={"help": "Evaluate every example of the split."})
    seed: int = field(default=42, metadata={"help": "Seed of the example sample, of sampling and of the bootstrap."})
    max_length: int = field(
        default=2048, metadata={"help": "Prompt + generated tokens; capped by the models' context (Pythia: 2048)."}
    )
    prompt_template: str | None = field(
        default=None, metadata={"help": TEMPLATE_HELP + " Default: the template the small tuned model's final/ (or the "
                                "--blend file) records, else meta_review."})
    decision_column: str = field(
        default="decision", metadata={"help": "With --decision_classifier: the column with the paper's real decision "
                                      "(normalised as proxytune.task.reviews.normalise_decision does)."})

    def __post_init__(self):
        # --max_length's lower bound depends on the tokenizer: checked once it is loaded (check_max_length).
        raise_problems(number_problems(self, {
            "num_examples": ("[1, inf)", "--all_examples for all examples"), "seed": f"[0, {SEED_MAX}]",
            "max_length": "[1, inf)"}))
        if self.all_examples:
            self.num_examples = None


def load_examples(data_args: DataArguments) -> list[dict[str, Any]]:
    """Rows of the chosen split as {example_id, index, reviews, Input, Output}.

    A processed dataset keeps its example_id and reviews columns; a raw file (or a dataset without them)
    is cleaned like processing_meta_review.py does and gets the same content hash as example_id, so the
    workbook matches rows across runs either way.
    """

    path = Path(data_args.dataset_path).expanduser()
    if not path.exists():
        hint = " (processing_meta_review.py's default output_dir: run it first)" \
            if data_args.dataset_path == PROCESSED_DATASET else ""
        raise UsageError(f"--dataset_path {path} does not exist{hint}; pass a dataset dir from "
                         "processing_meta_review.py or a JSONL/JSON/CSV/Parquet file (compressed or not)")
    saved = path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json"))
    if saved:  # processing_meta_review.py's output (save_to_disk)
        table = load_saved_split(path, data_args.split, "--dataset_path")
    else:  # a data file, or a directory of data files named by split
        raw = load_raw_dataset(ProcessingArguments(dataset_name=str(path)), flag="--dataset_path")
        if len(raw) == 1:
            (table,) = raw.values()
            logger.info("%s is one table; --split %s only labels it", path, data_args.split)
        elif data_args.split in raw:
            table = raw[data_args.split]
        else:
            raise UsageError(f"--split {data_args.split} is not in {path} (splits: {', '.join(raw)}); pass one of them")
    alpaca = is_alpaca(table.column_names)  # instruction (+ input) -> output rows: from_alpaca
    missing = [c for c in ("Input", "Output") if c not in table.column_names]
    if missing and not alpaca:
        raise UsageError(f"{path} has no column '{missing[0]}' (columns: {', '.join(table.column_names)}); "
                         "evaluation needs Input (reviews) and Output (meta-review), or Alpaca's instruction, input "
                         "and output")

    rows, skipped = [], 0
    for index, row in enumerate(table.to_list()):
        row = from_alpaca(row) if alpaca else row
        reviews = reviews_of(row.get("reviews") or row["Input"])
        meta = clean_text(row["Output"], "whitespace") if isinstance(row["Output"], str) else ""
        if not reviews or not meta:
            skipped += 1
            continue
        eid = row.get("example_id") or example_id(reviews, meta)
        rows.append({"example_id": str(eid), "index": index, "reviews": reviews,
                     "Input": REVIEW_JOINER.join(reviews), "Output": meta,
                     "decision": normalise_decision(row.get(data_args.decision_column))})
    if skipped:
        logger.warning("skipped %d rows with empty Input or Output", skipped)
    if not rows:
        raise UsageError(f"{path} (split {data_args.split}) has no rows with both Input and Output")
    make_ids_unique(rows)
    return rows


def make_ids_unique(rows: list[dict]) -> None:
    """Duplicate rows share a content hash; '#2', '#3' ... keep workbook keys unique and stable."""
    seen: dict[str, int] = {}
    for row in rows:
        n = seen.get(row["example_id"], 0) + 1
        seen[row["example_id"]] = n
        if n > 1:
            row["example_id"] = f"{row['example_id']}#{n}"


def select_examples(n_rows: int, num_examples: int | None, seed: int) -> list[int]:
    """A seeded sample of row positions, kept in dataset order: `select_examples(5, 2, 0)` -> [3, 4];
    all rows when `num_examples` is None or not smaller than `n_rows`."""
    if num_examples is None or num_examples >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), num_examples))


def load_papers(dataset_path: str, split: str) -> list[dict]:
    """Rows of one split as load_examples gives them: {example_id, reviews, Output, ...}."""

    return load_examples(DataArguments(dataset_path=dataset_path, split=split))


def load_all_papers(dataset_path: str) -> dict[str, dict]:
    """{example_id: row} over every split the dataset has (a rated paper may come from any of them)."""
    papers: dict[str, dict] = {}
    for split in SPLITS:
        try:
            rows = load_papers(dataset_path, split)
        except UsageError as err:
            if "split" in str(err) or "not in" in str(err):
                continue
            raise
        for row in rows:
            papers.setdefault(row["example_id"], row)
    if not papers:
        raise UsageError(f"--dataset_path {dataset_path} has none of the splits {', '.join(SPLITS)}")
    return papers
