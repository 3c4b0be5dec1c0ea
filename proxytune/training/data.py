"""Training data: the meta-review dataset or plain text, tokenized with prompt tokens masked out of the labels."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxytune.foundation.datafiles import split_compression
from proxytune.foundation.errors import UsageError, first_line
from proxytune.foundation.hub import hub_offline_reason, not_cached_error
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.processing import _features, process, tokenize_example
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, choose_template, read_template
from proxytune.training.arguments import DataArguments

logger = logging.getLogger(__name__)


IGNORE_INDEX = -100  # the label value torch's cross-entropy (and every HF model) skips


TEXT_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# Plain-text mode: sample generations continue the first tokens of a validation text.
TEXT_SAMPLE_PROMPT_TOKENS = 32


def build_labels(input_ids: Sequence[int], prompt_length: int) -> list[int]:
    """Labels for loss on the meta-review only: the prompt's positions become -100, the target keeps its ids.

    Masking is by POSITION, never by token id: with pad = eos, masking by id would also hide the target's
    final EOS and the model would never learn to stop. `build_labels([5, 6, 7, 0], 2)` -> [-100, -100, 7, 0].
    """
    return [IGNORE_INDEX] * prompt_length + list(input_ids[prompt_length:])


@dataclass
class CausalLMCollator:
    """Pad a list of {input_ids, labels} to the longest in the batch (dynamic padding, right side).

    Padding gets pad_token_id in input_ids, 0 in attention_mask and -100 in labels, by position, so a pad id
    equal to EOS cannot hide a real EOS label. Other keys (e.g. `length`) are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def to_training_features(split, mode: str):
    """Keep only what the Trainer needs: input_ids, labels (prompt masked in meta-review mode) and length."""

    def add_labels(row):
        if mode == "meta_review":
            labels = build_labels(row["input_ids"], row["prompt_length"])
        else:
            labels = list(row["input_ids"])
        return {"input_ids": row["input_ids"], "labels": labels, "length": len(row["input_ids"])}

    return split.map(add_labels, remove_columns=split.column_names, keep_in_memory=True, desc="adding labels")


def is_processed_dir(path: Path) -> bool:
    return path.is_dir() and (path / "processing_config.json").is_file()


def same_tokenization(split, tokenizer, n: int = 3) -> bool:
    """Whether `tokenizer` reproduces the stored ids of the first rows (a different tokenizer would not)."""
    for row in split.select(range(min(n, len(split)))):
        ids = (tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
               + tokenizer(" " + row["Output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        if ids != list(row["input_ids"]):
            return False
    return True


def retokenize(dataset, tokenizer, max_length: int, template: PromptTemplate = DEFAULT_TEMPLATE):
    """Cut and tokenize the rows again for another max_length, tokenizer or template (processing_meta_review's code).

    Returns (DatasetDict, {split: examples dropped because the meta-review alone leaves no room at max_length})."""
    import datasets

    out, dropped = {}, {}
    first = next(iter(dataset.values()))
    # Label columns (decision, avg_rating) ride along unchanged.
    features = _features({k: f.dtype for k, f in first.features.items() if k not in _features()})
    for name, split in dataset.items():
        rows = [example for row in split.to_list()
                if (example := tokenize_example(row, tokenizer, max_length, template))]
        dropped[name] = len(split) - len(rows)
        # from_dict, not from_list: an empty list carries no keys, and from_list([]) then fails ("Keys mismatch").
        out[name] = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    if any(dropped.values()):
        logger.warning("dropped %d examples whose meta-review alone exceeds --max_length %d", sum(dropped.values()),
                       max_length)
    return datasets.DatasetDict(out), dropped


def check_splits_not_emptied(dataset, dropped: dict[str, int], max_length: int, source: str) -> None:
    """A train or validation split that --max_length emptied (every meta-review too long for it) is one error with
    the fix, in both paths: a processed directory re-cut here, and a raw file processed on the fly."""
    for name in ("train", "validation"):
        if name in dataset and len(dataset[name]) == 0 and dropped.get(name):
            raise UsageError(f"--max_length {max_length} leaves no {name} examples from {source}: their meta-reviews "
                             f"are too long to fit with a prompt ({dropped[name]} examples dropped); "
                             "raise --max_length")


def dataset_template(data_args: DataArguments) -> PromptTemplate:
    """The prompt template to train with: --prompt_template, else the one the processed --dataset_path records,
    else meta_review (choose_template; a flag that differs from the record is warned about)."""
    path = Path(data_args.dataset_path).expanduser()
    recorded = read_template(path) if is_processed_dir(path) else None
    return choose_template(data_args.prompt_template, [(str(path), recorded)])


def load_meta_review_dataset(data_args: DataArguments, tokenizer, tokenizer_name: str, tokenize: bool = True,
                             template: PromptTemplate = DEFAULT_TEMPLATE):
    """The processed DatasetDict (train/validation[/test]) for `tokenizer`, --max_length and `template`.

    A directory from processing_meta_review.py is read as is, or re-tokenized when it was made for another
    max_length, tokenizer or template; anything else goes through proxytune.task.processing.process(). `tokenize=False`
    (classification, which encodes its own inputs) keeps every row: nothing is re-cut or dropped for --max_length.
    """
    import datasets

    path = Path(data_args.dataset_path).expanduser()
    if is_processed_dir(path):
        try:
            dataset = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"{path} is not a dataset saved by processing_meta_review.py: {first_line(err)}") from None
        needed = {"reviews", "Output", "prompt", "input_ids", "prompt_length"}
        for name in ("train", "validation"):
            if name not in dataset:
                raise UsageError(f"{path} has no '{name}' split (splits: {', '.join(dataset)}); re-run "
                                 "processing_meta_review.py")
            missing = sorted(needed - set(dataset[name].column_names))
            if missing:
                raise UsageError(f"{path} split '{name}' lacks columns {missing}; re-run processing_meta_review.py "
                                 "or pass --text_column for plain text")
        made_with = json.loads((path / "processing_config.json").read_text(encoding="utf-8"))
        if not tokenize:
            return dataset
        made_template = read_template(path) or DEFAULT_TEMPLATE
        if made_with.get("max_length") != data_args.max_length or not same_tokenization(dataset["train"], tokenizer) \
                or not template.same_as(made_template):
            logger.info("re-tokenizing %s (made with max_length=%s, tokenizer %s, prompt template %s) for "
                        "max_length=%d, tokenizer %s, prompt template %s", path, made_with.get("max_length"),
                        made_with.get("tokenizer_name"), made_template.name, data_args.max_length, tokenizer_name,
                        template.name)
            dataset, dropped = retokenize(dataset, tokenizer, data_args.max_length, template)
            check_splits_not_emptied(dataset, dropped, data_args.max_length, str(path))
        return dataset
    logger.info("processing %s on the fly with proxytune.task.processing.process()", data_args.dataset_path)
    pargs = ProcessingArguments(
        dataset_name=data_args.dataset_path,
        input_column=data_args.input_column,
        output_column=data_args.output_column,
        tokenizer_name=tokenizer_name,
        max_length=data_args.max_length if tokenize else 10**9,  # classification: no row dropped for its length
        validation_split_percentage=data_args.validation_split_percentage,
    )
    dataset, stats = process(pargs, tokenizer, flag="--dataset_path", template=template)
    logger.info("processed: kept %s, dropped %s", stats["rows_kept"], stats["dropped"] or "none")
    check_splits_not_emptied(dataset, stats["exceeding_max_length"], data_args.max_length, data_args.dataset_path)
    return dataset


def text_format(path: Path) -> str | None:
    """`text_format(Path("imdb.jsonl.gz"))` -> 'json'; the datasets library decompresses by itself."""
    return TEXT_FORMATS.get(split_compression(path)[0])


def load_text_dataset(data_args: DataArguments, seed: int, keep: Sequence[str] = ()):
    """Rows of plain text as a DatasetDict(train, validation) with one column, --text_column (renamed 'text'), and the
    columns `keep` (e.g. a classifier's label column) beside it."""
    import datasets

    name = data_args.dataset_path
    path = Path(name).expanduser()
    column = data_args.text_column
    offline = None
    try:
        if path.is_dir():
            raw = datasets.load_from_disk(str(path))
        elif path.is_file():
            fmt = text_format(path)
            if fmt is None:
                raise UsageError(f"data file {path} has an unknown extension; use one of {sorted(TEXT_FORMATS)} "
                                 "(optionally .gz, .bz2, .xz or .zst)")
            raw = datasets.load_dataset(fmt, data_files={"train": str(path)})
        else:
            offline = hub_offline_reason()
            raw = datasets.load_dataset(name)
    except UsageError:
        raise
    except Exception as err:  # the datasets library wraps parser and Hub errors in many types
        if offline:
            raise not_cached_error("dataset", name, "--dataset_path", offline) from None
        raise UsageError(f"cannot read {name}: {first_line(err)}; check --dataset_path") from None
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    if path.is_file() and text_format(path) == "text":
        column = "text"  # the text builder reads one line per row into a column named 'text'
    if "train" not in raw:
        raise UsageError(f"{name} has no train split (splits: {', '.join(raw)})")
    if column not in raw["train"].column_names:
        raise UsageError(f"column '{column}' not found in {name} (columns: {', '.join(raw['train'].column_names)}); "
                         "pass --text_column")
    for extra in keep:
        if extra not in raw["train"].column_names:
            raise UsageError(f"--label_column {extra} is not a column of {name} (columns: "
                             f"{', '.join(raw['train'].column_names)}); pass its label column")
    columns = [column, *(c for c in keep if c != column)]
    has_text = lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch[column]]  # noqa: E731
    val_name = next((s for s in ("validation", "valid", "val", "dev") if s in raw), None)
    train = raw["train"].select_columns(columns).filter(has_text, batched=True, keep_in_memory=True)
    if val_name:
        validation = raw[val_name].select_columns(columns).filter(has_text, batched=True, keep_in_memory=True)
    elif data_args.validation_split_percentage > 0 and len(train) > 1:
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(train))
        n_val = max(1, round(len(train) * data_args.validation_split_percentage / 100))
        validation = train.select(sorted(order[:n_val]), keep_in_memory=True)
        train = train.select(sorted(order[n_val:]), keep_in_memory=True)
    else:
        validation = train.select([])
    if column != "text":
        train, validation = train.rename_column(column, "text"), validation.rename_column(column, "text")
    train = limit(train, data_args.max_train_samples, seed)
    validation = limit(validation, data_args.max_eval_samples, seed)
    return datasets.DatasetDict({"train": train, "validation": validation})


def limit(split, n: int | None, seed: int):
    """At most n rows: a seeded sample kept in file order (the first n rows of a file sorted by label or by
    date would be one class or one period)."""
    if n is None or len(split) <= n:
        return split
    import numpy as np

    return split.select(sorted(np.random.default_rng(seed).permutation(len(split))[:n].tolist()))


def tokenize_texts(split, tokenizer, max_length: int, packing: bool):
    """Texts -> input_ids. Packed: texts + EOS concatenated and cut into max_length blocks (the remainder of
    each 1,000-text batch is dropped, as in run_clm.py). Unpacked: one example per text, EOS-terminated."""
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if not packing:
            # A text cut at max_length gets no EOS: the model must not learn to stop mid-text.
            return {"input_ids": [(x + [eos]) if len(x) < max_length else x[:max_length] for x in ids]}
        stream = [tok for x in ids for tok in x + [eos]]
        usable = len(stream) // max_length * max_length
        return {"input_ids": [stream[i:i + max_length] for i in range(0, usable, max_length)]}

    return split.map(encode, batched=True, batch_size=1000, remove_columns=split.column_names, keep_in_memory=True,
                     desc="tokenizing")


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels, length
    validation: Any
    samples: list[dict]  # {"id", "prompt_ids", "prompt", "reference"} for the sample generations
    mode: str  # "meta_review" or "text"
    description: str
    test: Any = None  # meta-review mode: the test split, evaluated with --do_predict
    # classification/regression (training/classification.py): label map, template, head config
    label_info: dict | None = None
    template: PromptTemplate | None = None  # the prompt template (meta-review mode): recorded in final/


def check_dataset_path(name: str) -> None:
    """A local-looking --dataset_path must exist (anything else is taken for a Hub dataset id)."""
    path = Path(name).expanduser()
    if (path.suffix or name.startswith((".", "/", "~"))) and not path.exists():
        raise UsageError(f"--dataset_path {name} does not exist; pass the directory processing_meta_review.py wrote, "
                         "a data file, or a Hub dataset id")
