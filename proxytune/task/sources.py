"""Finding and reading the raw meta-review data: a Hub dataset, a file or a folder of files, or a saved split."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from proxytune.foundation.datafiles import COMPRESSIONS, iter_data_lines, read_data_head, split_compression
from proxytune.foundation.errors import UsageError, first_line
from proxytune.foundation.hub import hub_offline_reason, not_cached_error
from proxytune.task.arguments import ProcessingArguments

FILE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
                 "dev": "validation", "test": "test"}


# Splits are deduplicated in this order, so an example shared by test and train stays in test only.
SPLIT_PRIORITY = ("test", "validation", "train")


# What a file in a save_to_disk directory is called (a DatasetDict, or a single Dataset).
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")


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
            raise UsageError(f"{flag} {path} is not a readable save_to_disk dataset ({first_line(err)}); "
                             "save it again, or pass a data file") from None
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
