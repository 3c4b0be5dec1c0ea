"""Turn raw peer-review data into the tokenized meta-review dataset that fine_tune.py and evaluation.py read.

Hub default (needs internet):
    python processing_meta_review.py --output_dir outputs/meta_review

Local files (JSONL/JSON/CSV/Parquet, a saved dataset directory, or ORSUM's raw nested records):
    python processing_meta_review.py --dataset_name ../shared/data/meta_review/mred_val_longest.jsonl \
        --tokenizer_name ../shared/tokenizers/pythia --output_dir outputs/meta_review

With a config file (later files and flags override it):
    python processing_meta_review.py my_config.yaml --max_length 1024

Every example becomes `prompt` (the reviews in the shared template from common.py, cut token-wise so
prompt + target fit --max_length, each review keeping a fair share) and `target` (" " + meta-review +
EOS, never cut). Output: a DatasetDict (train/validation/test) saved with save_to_disk, `stats.json`
(rows in/kept, drops by reason, token-length percentiles, truncations) and `prompt_template.txt`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    PROMPT_TEMPLATE,
    REVIEW_JOINER,
    UsageError,
    atomic_directory,
    build_prompt,
    check_output_dir,
    clean_whitespace,
    encode_target,
    first_line,
    load_tokenizer,
    render_prompt,
    render_target,
    run_cli,
    setup_logging,
    to_jsonable,
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


@dataclass
class ProcessingArguments:
    dataset_name: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "Hub dataset id, or a local .jsonl/.json/.csv/.parquet file, or a save_to_disk directory."},
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
    seed: int = field(default=42, metadata={"help": "Seed of the train/validation/test split."})
    output_dir: str = field(default="outputs/meta_review", metadata={"help": "Where the processed dataset goes."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the processed dataset to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset id for --push_to_hub."})
    hub_private: bool = field(default=True, metadata={"help": "Create the Hub dataset as private."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a Hub dataset/tokenizer to run its own code."})

    def __post_init__(self):
        problems = []
        if self.max_length < 32:
            problems.append(f"--max_length {self.max_length} is too small; use at least 32 (Pythia: 2048)")
        if self.min_target_words < 0 or self.max_target_words < self.min_target_words:
            problems.append(
                f"--min_target_words {self.min_target_words} / --max_target_words {self.max_target_words} "
                "must satisfy 0 <= min <= max"
            )
        for name in ("validation_split_percentage", "test_split_percentage"):
            if not 0 <= getattr(self, name) < 100:
                problems.append(f"--{name} {getattr(self, name)} must be in [0, 100)")
        if self.validation_split_percentage + self.test_split_percentage >= 100:
            problems.append("--validation_split_percentage + --test_split_percentage must leave rows for training")
        if self.push_to_hub and not self.hub_dataset_id:
            problems.append("--push_to_hub needs --hub_dataset_id (e.g. your-name/meta-review-processed)")
        if self.review_separator == "":
            problems.append("--review_separator must not be empty")
        if problems:
            raise UsageError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def check_text_file(path: Path) -> None:
    """Fail early, naming the file, on what the datasets library would report deep in a traceback."""
    if path.stat().st_size == 0:
        raise UsageError(f"data file {path} is empty; pass a file with {FILE_FORMATS[path.suffix]} rows")
    if FILE_FORMATS[path.suffix] == "parquet":
        with path.open("rb") as f:
            if f.read(4) != b"PAR1":
                raise UsageError(f"data file {path} is not a Parquet file; fix the file or its extension")
        return
    json_lines = path.suffix == ".jsonl"
    with path.open("rb") as f:
        for i, line in enumerate(f, 1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError(
                    f"data file {path} is not UTF-8 (line {i}); re-encode it, e.g. iconv -t UTF-8"
                ) from None
            if json_lines and text.strip():
                try:
                    json.loads(text)
                except json.JSONDecodeError as err:
                    raise UsageError(f"cannot read data file {path}: line {i} is not JSON ({err.msg}); fix the "
                                     "line, or the extension if the file is not JSON lines") from None


def load_raw_dataset(args: ProcessingArguments):
    """Load the source as a DatasetDict from a local file, a saved dataset directory, or the Hub."""
    import datasets

    name = args.dataset_name
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"{path} is not a dataset saved with save_to_disk: {first_line(err)}") from None
        return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
    if path.suffix in FILE_FORMATS or path.exists() or name.startswith((".", "/", "~")):
        if not path.is_file():
            raise UsageError(f"data file {path} does not exist; check --dataset_name")
        if path.suffix not in FILE_FORMATS:
            raise UsageError(f"data file {path} has an unknown extension; use one of {sorted(FILE_FORMATS)}")
        check_text_file(path)
        try:
            return datasets.load_dataset(FILE_FORMATS[path.suffix], data_files={"train": str(path)})
        except Exception as err:  # the datasets library wraps parser errors in many types
            raise UsageError(
                f"cannot read {path} as {FILE_FORMATS[path.suffix]}: {first_line(err)}; fix the file or its extension"
            ) from None
    try:
        return datasets.load_dataset(name, args.dataset_config_name, trust_remote_code=args.trust_remote_code)
    except Exception as err:
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
               seen: set[str], drops: dict[str, int]) -> list[dict]:
    """Clean one split's rows; drop (and count by reason) empty, too short/long and duplicate rows."""
    kept = []
    for row in rows:
        reviews = [clean_text(r, args.clean) for r in extract_reviews(row.get(input_col), args.review_separator)]
        reviews = [r for r in reviews if r]
        meta = row.get(output_col)
        meta = clean_text(meta, args.clean) if isinstance(meta, str) else ""
        if not reviews:
            reason = "empty_reviews"
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
        kept.append({"example_id": eid, "reviews": reviews, "Input": REVIEW_JOINER.join(reviews), "Output": meta})
    return kept


def split_rows(rows: list[dict], validation_pct: float, test_pct: float, seed: int) -> dict[str, list[dict]]:
    """A deterministic seeded split of one list of rows into train/validation/test."""
    import numpy as np

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


def process(args: ProcessingArguments, tokenizer) -> tuple[Any, dict]:
    """Load, clean, split and tokenize. Returns (DatasetDict, stats). Writes nothing."""
    import datasets
    from tqdm.auto import tqdm

    raw = normalise_splits(load_raw_dataset(args))
    columns = next(iter(raw.values())).column_names
    input_col, output_col = resolve_columns(columns, args, args.dataset_name)
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
            cleaned[name] = clean_rows(rows, input_col, output_col, args, seen, drops)
    if "train" not in cleaned:
        raise UsageError(f"the source has no train split (splits: {', '.join(raw)}); pass a file or a dataset with one")
    if "validation" not in cleaned or "test" not in cleaned:
        carved = split_rows(
            cleaned["train"],
            validation_pct=0 if "validation" in cleaned else args.validation_split_percentage,
            test_pct=0 if "test" in cleaned else args.test_split_percentage,
            seed=args.seed,
        )
        cleaned = {"train": carved["train"],
                   "validation": cleaned.get("validation", carved["validation"]),
                   "test": cleaned.get("test", carved["test"])}
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
        features = _features()
        out[name] = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
        stats["rows_kept"][name] = len(rows)
    stats["dropped"] = dict(sorted(drops.items()))
    stats["rows_in_total"] = sum(stats["rows_in"].values())
    stats["rows_kept_total"] = sum(stats["rows_kept"].values())
    stats["prompts_truncated"] = n_truncated
    stats["prompt_tokens"] = percentiles(prompt_lens)
    stats["target_tokens"] = percentiles(target_lens)
    stats["max_length"] = args.max_length
    stats["tokenizer"] = args.tokenizer_name
    return datasets.DatasetDict(out), stats


def _features():
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
    })


def summarize(stats: dict) -> str:
    dropped = ", ".join(f"{k}={v}" for k, v in stats["dropped"].items()) or "none"
    lines = [
        f"source: {stats['source']} (splits {', '.join(stats['source_splits'])})",
        f"rows in: {stats['rows_in_total']}  kept: {stats['rows_kept_total']}  dropped: {dropped}",
        "kept per split: " + ", ".join(f"{k}={v}" for k, v in stats["rows_kept"].items()),
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
        raise UsageError(f"{flag} {path} is not a dataset saved by processing_meta_review.py: {first_line(err)}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UsageError(f"{split_flag} {split} is not in {path} (splits: {', '.join(data)})")
        data = data[split]
    return data


def save(dataset, stats: dict, args: ProcessingArguments) -> None:
    """Write everything into a temporary directory that replaces --output_dir only when complete."""
    with atomic_directory(args.output_dir, overwrite=args.overwrite_output_dir) as tmp:
        dataset.save_to_disk(str(tmp))
        write_json(tmp / "stats.json", stats)
        write_json(tmp / "processing_config.json", to_jsonable(args))
        (tmp / "prompt_template.txt").write_text(PROMPT_TEMPLATE + "\n", encoding="utf-8")


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
    tokenizer = load_tokenizer(args.tokenizer_name, trust_remote_code=args.trust_remote_code)
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
