"""Building the processed dataset: clean, split, tokenize, summarise, save and push (processing_meta_review.py's
job)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxytune.foundation.config import to_jsonable
from proxytune.foundation.errors import UsageError, first_line
from proxytune.foundation.outputs import atomic_directory, write_error, write_json
from proxytune.foundation.progress import progress_bar
from proxytune.task.arguments import MIN_REVIEW_TOKENS, ProcessingArguments
from proxytune.task.prompts import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    build_prompt,
    encode_target,
    load_template,
    render_target,
    write_template,
)
from proxytune.task.reviews import (
    check_text_columns,
    clean_rows,
    count_labels,
    from_alpaca,
    is_alpaca,
    label_columns_of,
    resolve_columns,
)
from proxytune.task.sources import SPLIT_PRIORITY, load_raw_dataset, normalise_splits

logger = logging.getLogger(__name__)


def min_max_length(tokenizer, template: PromptTemplate = DEFAULT_TEMPLATE) -> int:
    """The smallest --max_length with room for the template (with an input, if it has one), MIN_REVIEW_TOKENS of one
    text and a one-token target with its EOS. Every script that cuts examples to --max_length gives this one number as
    the hint."""
    skeleton = template.render([""] * (2 if template.splits_input else 1))
    return len(tokenizer(skeleton, add_special_tokens=False)["input_ids"]) + MIN_REVIEW_TOKENS + 2


def check_max_length(tokenizer, max_length: int, flag: str = "--max_length",
                     template: PromptTemplate = DEFAULT_TEMPLATE) -> None:
    needed = min_max_length(tokenizer, template)
    if max_length < needed:
        raise UsageError(f"{flag} {max_length} leaves no room for the prompt template, reviews and a meta-review with "
                         f"this tokenizer; use at least {needed} (Pythia: 2048)")


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


def tokenize_example(row: dict, tokenizer, max_length: int,
                     template: PromptTemplate = DEFAULT_TEMPLATE) -> dict | None:
    """Add prompt/target text and ids. The target (" " + meta-review + EOS) is never cut; the reviews (or the
    input, then the instruction) are, so that prompt + target <= max_length. Returns None if the target leaves no
    room for them."""
    target_ids = encode_target(row["Output"], tokenizer)
    overhead = len(tokenizer(template.render([""] * len(row["reviews"])), add_special_tokens=False)["input_ids"])
    budget = max_length - len(target_ids)
    if budget < overhead + MIN_REVIEW_TOKENS:
        return None
    prompt, truncated = build_prompt(row["reviews"], tokenizer, budget, template)
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


def process(args: ProcessingArguments, tokenizer, flag: str = "--dataset_name",
            template: PromptTemplate | None = None) -> tuple[Any, dict]:
    """Load, clean, split and tokenize. Returns (DatasetDict, stats). Writes nothing. Errors about the source name
    `flag`. The prompts are `template`'s, by default --prompt_template's."""
    import datasets

    template = template or load_template(args.prompt_template)
    raw = normalise_splits(load_raw_dataset(args, flag))
    columns = next(iter(raw.values())).column_names
    alpaca = is_alpaca(columns, args.input_column, args.output_column)
    if alpaca:  # instruction (+ input) as the prompt's texts, output as the target: from_alpaca
        check_text_columns(raw, "instruction", "output", args.dataset_name)
        input_col, output_col = "Input", "Output"
        if not template.splits_input:
            logger.warning("%s holds instruction data (instruction, input, output) but the prompt template %s has no "
                           "{instruction}/{input}; pass --prompt_template alpaca", args.dataset_name, template.name)
    else:
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
            if alpaca:
                rows = [from_alpaca(row) for row in rows]
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
        for row in progress_bar(cleaned[name], desc=f"tokenizing {name}", disable=len(cleaned[name]) < 200):
            example = tokenize_example(row, tokenizer, args.max_length, template)
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


def save(dataset, stats: dict, args: ProcessingArguments, template: PromptTemplate = DEFAULT_TEMPLATE) -> None:
    """Write everything into a temporary directory that replaces --output_dir only when complete; a write that
    fails midway (a full disk) leaves --output_dir as it was and removes the partial copy."""
    try:
        with atomic_directory(args.output_dir, overwrite=args.overwrite_output_dir) as tmp:
            dataset.save_to_disk(str(tmp))
            write_json(tmp / "stats.json", stats)
            write_json(tmp / "processing_config.json", to_jsonable(args))
            write_template(tmp, template)
    except OSError as err:
        raise write_error(Path(args.output_dir), err, "--output_dir") from None


def push(dataset, args: ProcessingArguments) -> None:
    # The token comes from HF_TOKEN or `huggingface-cli login`; it is never printed or written.
    try:
        dataset.push_to_hub(args.hub_dataset_id, private=args.hub_private)
    except Exception as err:
        raise UsageError(f"push to {args.hub_dataset_id} failed: {first_line(err)}; check `hf auth login`") from None
    logger.info("pushed to https://huggingface.co/datasets/%s", args.hub_dataset_id)
