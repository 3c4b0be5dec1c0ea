"""Turn raw peer-review data into the tokenized meta-review dataset that fine_tune.py and evaluation.py read.

Hub default (needs internet):
    python processing_meta_review.py --output_dir outputs/meta_review

Local files (JSONL/JSON/CSV/Parquet, also .gz/.bz2/.xz/.zst-compressed; a directory of such files or a saved dataset;
or ORSUM's raw nested records):
    python processing_meta_review.py --dataset_name ../shared/data/meta_review/mred_val_longest.jsonl \
        --tokenizer_name ../shared/tokenizers/pythia --output_dir outputs/meta_review

With a config file (later files and flags override it):
    python processing_meta_review.py my_config.yaml --max_length 1024

Every example becomes `prompt` (the reviews in the shared template from common.py, cut token-wise so
prompt + target fit --max_length, each review keeping a fair share) and `target` (" " + meta-review +
EOS, never cut). Output: a DatasetDict (train/validation/test) saved with save_to_disk, `stats.json`
(rows in/kept, drops by reason, token-length percentiles, truncations, counts per label) and `prompt_template.txt`.

Label columns (--label_columns, default `decision` and `avg_rating`, kept when the source has them) ride along for
`fine_tune.py --task classification/regression` and evaluation.py's decision consistency. Decisions are normalised by
DECISION_MAP (every "Accept (...)" -> accept, "Reject (...)" -> reject); `--stratify_by_column decision` keeps each
label's share the same in train, validation and test:
    python processing_meta_review.py --dataset_name ../shared/data/meta_review/mred_val_longest.jsonl \
        --tokenizer_name ../shared/tokenizers/pythia --stratify_by_column decision --output_dir outputs/meta_review_strat
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from common import (
    COMPRESSIONS,
    PROMPT_TEMPLATE,
    REVIEW_JOINER,
    SEED_MAX,
    UsageError,
    atomic_directory,
    build_prompt,
    check_hub_for_push,
    check_output_dir,
    clean_whitespace,
    encode_target,
    first_line,
    hub_offline_reason,
    iter_data_lines,
    load_tokenizer,
    not_cached_error,
    number_problems,
    raise_problems,
    read_data_head,
    render_prompt,
    render_target,
    run_cli,
    setup_logging,
    split_compression,
    to_jsonable,
    write_error,
    write_json,
)

logger = logging.getLogger("processing_meta_review")

DEFAULT_DATASET = "zqz979/meta-review"
FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation", "test": "test"}
# Splits are deduplicated in this order, so an example shared by test and train stays in test only.
SPLIT_PRIORITY = ("test", "validation", "train")
# The fewest review tokens a prompt may keep; below this the target leaves no room for the reviews.
MIN_REVIEW_TOKENS = 16
# What a file in a save_to_disk directory is called (a DatasetDict, or a single Dataset).
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")
# Columns with a paper's labels, kept beside Input/Output when the source has them (MReD: the venue's decision and the
# reviewers' average rating).
LABEL_COLUMNS = ("decision", "avg_rating")
# How a venue's decision string is normalised, by its first word (case and spacing ignored): MReD's "Accept (Poster)",
# "Accept (Oral)", "Accept (Spotlight)" and "Accept (Workshop)" are all accepted papers; "Reject (Invite to Workshop
# Track)" was rejected from the main conference. Any other string is kept lower-cased (e.g. "workshop").
DECISION_MAP = {"accept": "accept", "accepted": "accept", "reject": "reject", "rejected": "reject"}


@dataclass
class ProcessingArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub dataset id; a local .jsonl/.json/.csv/.parquet file (.jsonl/.json/.csv also compressed: "
                  ".gz/.bz2/.xz/.zst); a directory of such files (split by name: train/validation/test); or a "
                  "save_to_disk directory."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    input_column: str = field(
        default="Input",
        metadata={"help": "Column with the reviews: a string, or a list of strings / of dicts with a 'review' key."},
    )
    output_column: str = field(default="Output", metadata={"help": "Column with the meta-review."})
    review_separator: str | None = field(
        default=None,
        metadata={"help": "Split a string input column into several reviews at this separator (each then keeps "
                  "a fair share of the token budget). Default: the whole string is one review."},
    )
    tokenizer_name: str = field(
        default="EleutherAI/pythia-70m", metadata={"help": "Tokenizer (Hub id or local dir) used to measure and tokenize."}
    )
    max_length: int = field(
        default=2048, metadata={"help": "Tokens per example, prompt + target. Pythia's context is 2048."}
    )
    clean: str = field(
        default="whitespace",
        metadata={"help": "Text cleaning: 'whitespace' (normalise spaces, MReD <sep> markers to line breaks), "
                  "'alnum' (the original project's filter: whitespace plus keep only a-zA-Z0-9), or 'none'.",
                  "choices": ["whitespace", "alnum", "none"]},
    )
    min_target_words: int = field(default=10, metadata={"help": "Drop meta-reviews shorter than this (words)."})
    max_target_words: int = field(default=1000, metadata={"help": "Drop meta-reviews longer than this (words)."})
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Share of rows for validation when the source has no validation split."}
    )
    test_split_percentage: float = field(
        default=10.0, metadata={"help": "Share of rows for test when the source has no test split."}
    )
    max_examples: int | None = field(default=None, metadata={"help": "Keep at most this many rows per split (debugging)."})
    label_columns: list[str] = field(
        default_factory=lambda: list(LABEL_COLUMNS),
        metadata={"help": "Label columns kept beside Input/Output when the source has them ('decision' is normalised "
                  "by DECISION_MAP: accept/reject); counted per split in stats.json."},
    )
    stratify_by_column: str | None = field(
        default=None,
        metadata={"help": "Split so that each value of this label column (e.g. decision) has the same share in train, "
                  "validation and test. Default: a plain seeded split."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})
    output_dir: str = field(default="outputs/meta_review", metadata={"help": "Where the processed dataset goes."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the processed dataset to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub dataset as private."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a Hub dataset/tokenizer to run its own code."})

    def __post_init__(self):
        # --max_length's lower bound depends on the tokenizer: check_max_length, once it is loaded.
        problems = number_problems(self, {
            "min_target_words": "[0, inf)", "max_target_words": "[0, inf)", "validation_split_percentage": "[0, 100)",
            "test_split_percentage": "[0, 100)", "max_examples": "[1, inf)", "seed": f"[0, {SEED_MAX}]"})
        if self.max_target_words < self.min_target_words:
            problems.append(
                f"--min_target_words {self.min_target_words} / --max_target_words {self.max_target_words} "
                "must satisfy 0 <= min <= max"
            )
        if self.validation_split_percentage + self.test_split_percentage >= 100:
            problems.append("--validation_split_percentage + --test_split_percentage must leave rows for training")
        if self.push_to_hub and not self.hub_dataset_id:
            problems.append("--push_to_hub needs --hub_dataset_id (e.g. your-name/meta-review-processed)")
        if self.review_separator == "":
            problems.append("--review_separator must not be empty")
        if self.stratify_by_column and self.stratify_by_column not in self.label_columns:
            problems.append(f"--stratify_by_column {self.stratify_by_column} must be one of --label_columns "
                            f"({', '.join(self.label_columns) or 'none'})")
        raise_problems(problems)


def min_max_length(tokenizer) -> int:
    """The smallest --max_length with room for the template, MIN_REVIEW_TOKENS of one review and a one-token
    meta-review with its EOS. Every script that cuts examples to --max_length gives this one number as the hint."""
    template = len(tokenizer(render_prompt([""]), add_special_tokens=False)["input_ids"])
    return template + MIN_REVIEW_TOKENS + 2


def check_max_length(tokenizer, max_length: int, flag: str = "--max_length") -> None:
    needed = min_max_length(tokenizer)
    if max_length < needed:
        raise UsageError(f"{flag} {max_length} leaves no room for the prompt template, reviews and a meta-review with "
                         f"this tokenizer; use at least {needed} (Pythia: 2048)")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
DATA_FILE_KINDS = ".jsonl, .json, .csv or .parquet (the first three also compressed: .gz, .bz2, .xz, .zst)"


def data_format(path: Path) -> str | None:
    """The datasets builder for a data file: `data_format(Path("mred.jsonl.gz"))` -> 'json'; None if unknown."""
    return FILE_FORMATS.get(split_compression(path)[0])


def check_text_file(path: Path) -> str:
    """Fail early, naming the file, on what the datasets library would report deep in a traceback; returns the
    datasets builder name ('json', 'csv', 'parquet'). Compressed files are read decompressed."""
    ext, compression = split_compression(path)
    fmt = FILE_FORMATS.get(ext)
    if fmt is None:
        raise UsageError(f"data file {path} has an unknown extension; use {DATA_FILE_KINDS}")
    if fmt == "parquet" and compression:
        raise UsageError(f"data file {path} is a {COMPRESSIONS[compression]}-compressed Parquet file, which cannot be "
                         "read as such (Parquet compresses its columns itself); decompress it")
    head = read_data_head(path, 4)
    if not head:
        raise UsageError(f"data file {path} is empty; pass a file with {fmt} rows")
    if fmt == "parquet":
        if head != b"PAR1":
            raise UsageError(f"data file {path} is not a Parquet file; fix the file or its extension")
        return fmt
    for i, text in iter_data_lines(path):
        if ext == ".jsonl" and text.strip():
            try:
                json.loads(text)
            except json.JSONDecodeError as err:
                raise UsageError(f"cannot read data file {path}: line {i} is not JSON ({err.msg}); fix the "
                                 "line, or the extension if the file is not JSON lines") from None
    return fmt


def split_of_file(path: Path) -> str | None:
    """A data file's split from its name: 'train.jsonl.gz' and 'mred_val.csv' -> 'train' and 'validation'."""
    stem = path.name.split(".")[0].lower()
    names = [stem, *re.split(r"[-_ ]", stem)]
    return next((SPLIT_ALIASES[n] for n in names if n in SPLIT_ALIASES), None)


def data_files_of_dir(path: Path, flag: str) -> dict[str, list[str]]:
    """{split: [files]} of a directory of data files (one format); the split comes from each file's name."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and data_format(p))
    if not files:
        raise UsageError(f"{flag} {path} is a directory without a dataset: no {', '.join(SAVED_DATASET_FILES)} (as "
                         f"save_to_disk writes) and no data files; pass a data file ({DATA_FILE_KINDS}), a directory "
                         "of them named by split (train.jsonl, validation.jsonl, test.jsonl), or the --output_dir of "
                         "processing_meta_review.py")
    formats = {data_format(f) for f in files}
    if len(formats) > 1:
        raise UsageError(f"{flag} {path} mixes data formats ({', '.join(f.name for f in files)}); keep one format, "
                         "or pass one file")
    if len(files) == 1:
        return {split_of_file(files[0]) or "train": [str(files[0])]}
    splits: dict[str, list[str]] = {}
    for f in files:
        split = split_of_file(f)
        if split is None:
            raise UsageError(f"{flag} {path}: cannot tell which split {f.name} is; name the files by split "
                             "(train, validation/val/dev, test), or pass one file")
        splits.setdefault(split, []).append(str(f))
    return splits


def load_raw_dataset(args: ProcessingArguments, flag: str = "--dataset_name"):
    """Load the source as a DatasetDict from a local file, a directory of files, a saved dataset directory, or the
    Hub. Errors name `flag` (the calling script's flag for the source)."""
    import datasets

    name = args.dataset_name
    path = Path(name).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in SAVED_DATASET_FILES):
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"{flag} {path} is not a readable save_to_disk dataset ({first_line(err)}); save it again, "
                             "or pass a data file") from None
        return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
    if path.is_dir() or data_format(path) or split_compression(path)[1] or path.exists() \
            or name.startswith((".", "/", "~")):
        if path.is_dir():
            data_files = data_files_of_dir(path, flag)
        elif not path.is_file():
            raise UsageError(f"data file {path} does not exist; check {flag}")
        else:
            data_files = {"train": [str(path)]}
        fmts = {check_text_file(Path(f)) for files in data_files.values() for f in files}
        fmt = fmts.pop()
        try:
            return datasets.load_dataset(fmt, data_files=data_files)
        except Exception as err:  # the datasets library wraps parser errors in many types
            raise UsageError(f"cannot read {path} as {fmt}: {first_line(err)}; fix the file or its extension") from None
    offline = hub_offline_reason()
    try:
        return datasets.load_dataset(name, args.dataset_config_name, trust_remote_code=args.trust_remote_code)
    except Exception as err:
        if offline:
            raise not_cached_error("dataset", name, flag, offline) from None
        raise UsageError(
            f"cannot load dataset '{name}' from the Hugging Face Hub: {first_line(err)}; "
            "check the id and your connection, or pass a local file"
        ) from None


def normalise_splits(raw) -> dict[str, Any]:
    """Map split names like 'val'/'dev' to 'validation'; refuse unknown names rather than guess."""
    out = {}
    for name, split in raw.items():
        canon = SPLIT_ALIASES.get(name.lower())
        if canon is None:
            raise UsageError(f"unknown split '{name}' in the source; expected train/validation/test")
        out[canon] = split
    return out


def extract_reviews(value: Any, separator: str | None) -> list[str]:
    """The reviews of one row as a list of strings.

    Accepts a string (split at `separator` if given), a list of strings, or ORSUM's list of dicts with
    a 'review' key: `extract_reviews([{"review": "A"}, {"review": "B"}], None)` -> ['A', 'B'].
    """
    if value is None:
        return []
    if isinstance(value, str):
        return value.split(separator) if separator else [value]
    if isinstance(value, list):
        reviews = []
        for item in value:
            if isinstance(item, dict):
                item = item.get("review") or item.get("text") or item.get("comment")
            if isinstance(item, str):
                reviews.append(item)
        return reviews
    return []


def resolve_columns(columns: list[str], args: ProcessingArguments, source: str) -> tuple[str, str]:
    """The input/output column names; ORSUM's raw shape (Review, Metareview) is recognised."""
    input_col, output_col = args.input_column, args.output_column
    if input_col not in columns and output_col not in columns and {"Review", "Metareview"} <= set(columns):
        return "Review", "Metareview"
    missing = [c for c in (input_col, output_col) if c not in columns]
    if missing:
        flag = "--input_column" if missing[0] == input_col else "--output_column"
        raise UsageError(
            f"column '{missing[0]}' not found in {source} (columns: {', '.join(columns)}); pass {flag}"
        )
    return input_col, output_col


def is_reviews_text(value: Any) -> bool:
    """A reviews cell holds text: a string, or a list with at least one review text in it."""
    return isinstance(value, str) or (isinstance(value, list) and bool(extract_reviews(value, None)))


def check_text_columns(raw: dict[str, Any], input_col: str, output_col: str, source: str) -> None:
    """One error for a column that holds no text at all (numbers, lists of numbers), naming it and the flag; single
    rows that are not text are dropped and counted by clean_rows instead."""
    checks = ((input_col, "--input_column", "reviews", is_reviews_text),
              (output_col, "--output_column", "meta-reviews", lambda v: isinstance(v, str)))
    for column, flag, what, is_text in checks:
        values = [v for split in raw.values() for v in split[column] if v is not None]
        if values and not any(is_text(v) for v in values):
            raise UsageError(f"column '{column}' of {source} holds {type(values[0]).__name__} values, not text (e.g. "
                             f"{str(values[0])[:40]!r}); pass the column with the {what} as {flag}")


def clean_text(text: str, mode: str) -> str:
    """`clean_text("Good!  <sep> 9/10", "alnum")` -> 'Good\\n910'; 'whitespace' keeps punctuation."""
    if mode == "none":
        return text.strip()
    text = clean_whitespace(text)
    if mode == "alnum":
        text = clean_whitespace(re.sub(r"[^a-zA-Z0-9\s]", "", text))
    return text


def example_id(reviews: list[str], meta_review: str) -> str:
    """A stable id from the cleaned content (16 hex digits), used to match workbook rows across runs."""
    digest = hashlib.sha1(json.dumps([reviews, meta_review]).encode("utf-8")).hexdigest()
    return digest[:16]


# ---------------------------------------------------------------------------------------------
# Cleaning, splitting, tokenizing
# ---------------------------------------------------------------------------------------------
def clean_rows(rows: list[dict], input_col: str, output_col: str, args: ProcessingArguments,
               seen: set[str], drops: dict[str, int], label_columns: Sequence[str] = ()) -> list[dict]:
    """Clean one split's rows; drop (and count by reason) empty, too short/long and duplicate rows. The
    `label_columns` are kept (normalise_label); a missing label is None, never a reason to drop the row."""
    kept = []
    for row in rows:
        reviews = [clean_text(r, args.clean) for r in extract_reviews(row.get(input_col), args.review_separator)]
        reviews = [r for r in reviews if r]
        raw_meta = row.get(output_col)
        meta = clean_text(raw_meta, args.clean) if isinstance(raw_meta, str) else ""
        if row.get(input_col) is not None and not is_reviews_text(row.get(input_col)):
            reason = "reviews_not_text"
        elif not reviews:
            reason = "empty_reviews"
        elif raw_meta is not None and not isinstance(raw_meta, str):
            reason = "meta_review_not_text"
        elif not meta:
            reason = "empty_meta_review"
        elif len(meta.split()) < args.min_target_words:
            reason = "meta_review_too_short"
        elif len(meta.split()) > args.max_target_words:
            reason = "meta_review_too_long"
        else:
            reason = None
            eid = example_id(reviews, meta)
            if eid in seen:
                reason = "duplicate"
        if reason:
            drops[reason] = drops.get(reason, 0) + 1
            continue
        seen.add(eid)
        labels = {c: normalise_label(c, row.get(c)) for c in label_columns}
        kept.append({"example_id": eid, "reviews": reviews, "Input": REVIEW_JOINER.join(reviews), "Output": meta,
                     **labels})
    return kept


def normalise_decision(value: Any) -> str | None:
    """A venue's decision by DECISION_MAP: `normalise_decision("Accept (Poster)")` -> 'accept',
    `normalise_decision("Reject (Invite to Workshop Track)")` -> 'reject', `normalise_decision(" Workshop ")` ->
    'workshop'; None or a blank string -> None."""
    if value is None or not str(value).strip():
        return None
    text = " ".join(str(value).split()).lower()
    first = re.split(r"[\s(:/-]", text, maxsplit=1)[0]
    return DECISION_MAP.get(first, text)


def normalise_label(column: str, value: Any) -> Any:
    """A label cell as kept: decisions normalised, numbers as floats, other text stripped, blanks None."""
    if column == "decision":
        return normalise_decision(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return None if value != value else float(value)  # NaN (pandas' empty CSV cell) is a missing label
    return str(value).strip() or None


def label_columns_of(columns: list[str], args: ProcessingArguments) -> list[str]:
    """The --label_columns the source has; a --stratify_by_column it lacks is an error."""
    present = [c for c in args.label_columns if c in columns]
    if args.stratify_by_column and args.stratify_by_column not in present:
        raise UsageError(f"--stratify_by_column {args.stratify_by_column}: no such column in {args.dataset_name} "
                         f"(columns: {', '.join(columns)}); pass a label column it has, or drop the flag")
    return present


def count_labels(splits: dict[str, Any], label_columns: list[str]) -> dict[str, Any]:
    """stats.json's `labels`: per column and split (a Dataset or a list of rows), counts of each text label
    (`{"decision": {"train": {"accept": 3, "reject": 5}}}`), or for numbers n / missing / mean / min / max."""
    import numpy as np

    out: dict[str, Any] = {}
    for column in label_columns:
        out[column] = {}
        for name, split in splits.items():
            column_values = [r.get(column) for r in split] if isinstance(split, list) else list(split[column])
            values = [v for v in column_values if v is not None]
            missing = len(column_values) - len(values)
            if values and all(isinstance(v, float) for v in values):
                out[column][name] = {"n": len(values), "missing": missing, "mean": float(np.mean(values)),
                                     "min": float(min(values)), "max": float(max(values))}
            else:
                counts = {str(k): values.count(k) for k in sorted(set(map(str, values)))}
                out[column][name] = {**counts, **({"missing": missing} if missing else {})}
    return out


def split_rows(rows: list[dict], validation_pct: float, test_pct: float, seed: int,
               stratify_by: str | None = None) -> dict[str, list[dict]]:
    """A deterministic seeded split of one list of rows into train/validation/test.

    With `stratify_by`, each value of that column (a missing one is a group of its own) is split by itself at the same
    shares, so every split keeps the label mix. Done here rather than with datasets' train_test_split(
    stratify_by_column=...), which needs a ClassLabel column and splits in two, not three.
    """
    import numpy as np

    if stratify_by:
        groups: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(str(row.get(stratify_by)), []).append(i)
        out: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
        for k, (_, members) in enumerate(sorted(groups.items())):
            part = split_rows(members, validation_pct, test_pct, seed + k)  # type: ignore[arg-type]
            for name in out:
                out[name] += part[name]
        return {name: [rows[i] for i in sorted(idx)] for name, idx in out.items()}
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = round(len(rows) * test_pct / 100)
    n_val = round(len(rows) * validation_pct / 100)
    pick = lambda idx: [rows[i] for i in sorted(idx)]  # noqa: E731  (keep source order inside a split)
    return {
        "train": pick(order[n_test + n_val:]),
        "validation": pick(order[n_test:n_test + n_val]),
        "test": pick(order[:n_test]),
    }


def tokenize_example(row: dict, tokenizer, max_length: int) -> dict | None:
    """Add prompt/target text and ids. The target (" " + meta-review + EOS) is never cut; the reviews
    are, so that prompt + target <= max_length. Returns None if the target leaves no room for reviews."""
    target_ids = encode_target(row["Output"], tokenizer)
    overhead = len(tokenizer(render_prompt([""] * len(row["reviews"])), add_special_tokens=False)["input_ids"])
    budget = max_length - len(target_ids)
    if budget < overhead + MIN_REVIEW_TOKENS:
        return None
    prompt, truncated = build_prompt(row["reviews"], tokenizer, budget)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return {
        **row,
        "prompt": prompt,
        "target": render_target(row["Output"], tokenizer.eos_token),
        "input_ids": prompt_ids + target_ids,
        "prompt_length": len(prompt_ids),
        "truncated": truncated,
    }


def percentiles(values: list[int]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {}
    qs = np.percentile(np.asarray(values), [0, 50, 90, 95, 99, 100])
    return {k: float(v) for k, v in zip(("min", "p50", "p90", "p95", "p99", "max"), qs)}


def process(args: ProcessingArguments, tokenizer, flag: str = "--dataset_name") -> tuple[Any, dict]:
    """Load, clean, split and tokenize. Returns (DatasetDict, stats). Writes nothing. Errors about the source name
    `flag`."""
    import datasets
    from tqdm.auto import tqdm

    raw = normalise_splits(load_raw_dataset(args, flag))
    columns = next(iter(raw.values())).column_names
    input_col, output_col = resolve_columns(columns, args, args.dataset_name)
    check_text_columns(raw, input_col, output_col, args.dataset_name)
    label_columns = label_columns_of(columns, args)
    stats: dict[str, Any] = {"source": args.dataset_name, "source_splits": sorted(raw), "rows_in": {},
                             "dropped": {}, "rows_kept": {}}
    seen: set[str] = set()
    drops: dict[str, int] = {}
    cleaned: dict[str, list[dict]] = {}
    for name in SPLIT_PRIORITY:
        if name in raw:
            rows = raw[name].to_list()
            if args.max_examples is not None:
                rows = rows[: args.max_examples]
            stats["rows_in"][name] = len(rows)
            cleaned[name] = clean_rows(rows, input_col, output_col, args, seen, drops, label_columns)
    if "train" not in cleaned:
        raise UsageError(f"the source has no train split (splits: {', '.join(raw)}); pass a file or a dataset with one")
    if "validation" not in cleaned or "test" not in cleaned:
        carved = split_rows(
            cleaned["train"],
            validation_pct=0 if "validation" in cleaned else args.validation_split_percentage,
            test_pct=0 if "test" in cleaned else args.test_split_percentage,
            seed=args.seed,
            stratify_by=args.stratify_by_column,
        )
        cleaned = {"train": carved["train"],
                   "validation": cleaned.get("validation", carved["validation"]),
                   "test": cleaned.get("test", carved["test"])}
    features = _features(label_features(label_columns, cleaned))
    out, prompt_lens, target_lens, n_truncated = {}, [], [], 0
    for name in ("train", "validation", "test"):
        rows = []
        for row in tqdm(cleaned[name], desc=f"tokenizing {name}", disable=len(cleaned[name]) < 200):
            example = tokenize_example(row, tokenizer, args.max_length)
            if example is None:
                drops["meta_review_exceeds_max_length"] = drops.get("meta_review_exceeds_max_length", 0) + 1
                continue
            rows.append(example)
            prompt_lens.append(example["prompt_length"])
            target_lens.append(len(example["input_ids"]) - example["prompt_length"])
            n_truncated += example["truncated"]
        out[name] = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
        stats["rows_kept"][name] = len(rows)
        # Per split, so that a split --max_length emptied can be told from one that was empty to begin with.
        stats.setdefault("exceeding_max_length", {})[name] = len(cleaned[name]) - len(rows)
    stats["dropped"] = dict(sorted(drops.items()))
    stats["rows_in_total"] = sum(stats["rows_in"].values())
    stats["rows_kept_total"] = sum(stats["rows_kept"].values())
    stats["prompts_truncated"] = n_truncated
    stats["prompt_tokens"] = percentiles(prompt_lens)
    stats["target_tokens"] = percentiles(target_lens)
    stats["max_length"] = args.max_length
    stats["tokenizer"] = args.tokenizer_name
    if label_columns:
        stats["labels"] = count_labels(out, label_columns)
        if args.stratify_by_column:
            stats["stratified_by"] = args.stratify_by_column
    return datasets.DatasetDict(out), stats


def label_features(label_columns: Sequence[str], cleaned: dict[str, list[dict]]) -> dict[str, str]:
    """{column: "float64" | "string"}: a column of numbers (and blanks) is float64, anything else text."""
    kinds = {}
    for column in label_columns:
        values = [r[column] for rows in cleaned.values() for r in rows if r.get(column) is not None]
        numeric = bool(values) and all(isinstance(v, float) for v in values)
        kinds[column] = "float64" if numeric else "string"
        if not numeric:
            for rows in cleaned.values():
                for r in rows:
                    r[column] = None if r.get(column) is None else str(r[column])
    return kinds


def _features(labels: dict[str, str] | None = None):
    """The processed dataset's columns; `labels` adds label columns ({name: "string" | "float64"})."""
    import datasets

    return datasets.Features({
        "example_id": datasets.Value("string"),
        "reviews": datasets.List(datasets.Value("string")),
        "Input": datasets.Value("string"),
        "Output": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "target": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "prompt_length": datasets.Value("int32"),
        "truncated": datasets.Value("bool"),
        **{name: datasets.Value(kind) for name, kind in (labels or {}).items()},
    })


def summarize(stats: dict) -> str:
    dropped = ", ".join(f"{k}={v}" for k, v in stats["dropped"].items()) or "none"
    lines = [
        f"source: {stats['source']} (splits {', '.join(stats['source_splits'])})",
        f"rows in: {stats['rows_in_total']}  kept: {stats['rows_kept_total']}  dropped: {dropped}",
        "kept per split: " + ", ".join(f"{k}={v}" for k, v in stats["rows_kept"].items()),
        *[f"{column} per split: " + "; ".join(f"{split} {json.dumps(counts)}" for split, counts in per_split.items())
          for column, per_split in stats.get("labels", {}).items()],
        f"prompt tokens p50/p95/max: {stats['prompt_tokens'].get('p50', 0):.0f}/"
        f"{stats['prompt_tokens'].get('p95', 0):.0f}/{stats['prompt_tokens'].get('max', 0):.0f}; "
        f"target tokens p50/p95/max: {stats['target_tokens'].get('p50', 0):.0f}/"
        f"{stats['target_tokens'].get('p95', 0):.0f}/{stats['target_tokens'].get('max', 0):.0f}",
        f"prompts truncated to fit max_length={stats['max_length']}: {stats['prompts_truncated']}",
    ]
    return "\n".join(lines)


def load_saved_split(path: Path, split: str, flag: str, split_flag: str = "--split"):
    """One split of a dataset this script saved (`save`), for the scripts that read it back; a saved single
    Dataset is returned whole. Errors name the flag: `flag` for the path, `split_flag` for the split."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"{flag} {path} is not a dataset saved by processing_meta_review.py ({first_line(err)}); pass "
                         "the --output_dir that processing_meta_review.py wrote, or a data file "
                         f"({DATA_FILE_KINDS})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UsageError(f"{split_flag} {split} is not in {path} (splits: {', '.join(data)})")
        data = data[split]
    return data


def save(dataset, stats: dict, args: ProcessingArguments) -> None:
    """Write everything into a temporary directory that replaces --output_dir only when complete; a write that
    fails midway (a full disk) leaves --output_dir as it was and removes the partial copy."""
    try:
        with atomic_directory(args.output_dir, overwrite=args.overwrite_output_dir) as tmp:
            dataset.save_to_disk(str(tmp))
            write_json(tmp / "stats.json", stats)
            write_json(tmp / "processing_config.json", to_jsonable(args))
            (tmp / "prompt_template.txt").write_text(PROMPT_TEMPLATE + "\n", encoding="utf-8")
    except OSError as err:
        raise write_error(Path(args.output_dir), err, "--output_dir") from None


def push(dataset, args: ProcessingArguments) -> None:
    # The token comes from HF_TOKEN or `huggingface-cli login`; it is never printed or written.
    try:
        dataset.push_to_hub(args.hub_dataset_id, private=args.hub_private)
    except Exception as err:
        raise UsageError(f"push to {args.hub_dataset_id} failed: {first_line(err)}; check `hf auth login`") from None
    logger.info("pushed to https://huggingface.co/datasets/%s", args.hub_dataset_id)


def main(args: ProcessingArguments) -> dict:
    setup_logging()
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; choose a directory")
    check_output_dir(out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        raise UsageError(f"output directory {out} already exists and is not empty; use --overwrite_output_dir")
    logger.info("processing %s with tokenizer %s, max_length=%d, clean=%s",
                args.dataset_name, args.tokenizer_name, args.max_length, args.clean)
    if args.push_to_hub:
        check_hub_for_push()
    tokenizer = load_tokenizer(args.tokenizer_name, trust_remote_code=args.trust_remote_code)
    check_max_length(tokenizer, args.max_length)
    # Long reviews are measured whole before they are cut; silence the "longer than the model" warning.
    tokenizer.model_max_length = int(1e30)
    dataset, stats = process(args, tokenizer)
    if stats["rows_kept"]["train"] == 0:
        raise UsageError(f"no training rows left after cleaning ({stats['dropped']}); check the data and the filters")
    save(dataset, stats, args)
    print(summarize(stats))
    logger.info("saved to %s", out)
    if args.push_to_hub:
        push(dataset, args)
    return stats


if __name__ == "__main__":
    run_cli(main, [ProcessingArguments], __doc__)
