"""Reviews and meta-reviews as text: extracting a paper's reviews (or an Alpaca row's instruction and input), cleaning
them, and the decision/rating labels."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.prompts import REVIEW_JOINER, clean_whitespace

# How a venue's decision string is normalised, by its first word (case and spacing ignored): MReD's "Accept (Poster)",
# "Accept (Oral)", "Accept (Spotlight)" and "Accept (Workshop)" are all accepted papers; "Reject (Invite to Workshop
# Track)" was rejected from the main conference. Any other string is kept lower-cased (e.g. "workshop").
DECISION_MAP = {"accept": "accept", "accepted": "accept", "reject": "reject", "rejected": "reject"}


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


def is_alpaca(columns: Sequence[str], input_column: str = "Input", output_column: str = "Output") -> bool:
    """Instruction data in Alpaca's shape (tatsu-lab/alpaca: instruction, input, output) rather than Input/Output."""
    return input_column not in columns and output_column not in columns and {"instruction", "output"} <= set(columns)


def from_alpaca(row: dict) -> dict:
    """An Alpaca row as an Input/Output row: its texts (Input) are [instruction, input], the input left out when
    empty, so a {instruction}/{input} template renders the no-input prompt; the output is the target (Output).
    `from_alpaca({"instruction": "Add.", "input": "", "output": "5"})` -> {..., 'Input': ['Add.'], 'Output': '5'};
    a row without an instruction gets none (None: dropped as empty)."""
    instruction, given = row.get("instruction"), row.get("input")
    texts = [instruction] if isinstance(instruction, str) and instruction.strip() else []
    if texts and isinstance(given, str) and given.strip():
        texts.append(given)
    return {**row, "Input": texts or None, "Output": row.get("output")}


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


def reviews_of(value: Any) -> list[str]:
    """A row's reviews, cleaned as processing_meta_review.py cleans them (MReD <sep> markers become line breaks)."""
    return [r for r in (clean_text(r, "whitespace") for r in extract_reviews(value, None)) if r]
