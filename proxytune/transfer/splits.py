"""Each group's data as a processed dataset (train / validation / held-out test), and each training subset's data as
the union of its groups' train and validation splits, both in the layout processing_meta_review.py writes, so that
every cell of the matrix is a plain fine_tune.py run on a directory it already knows.

Layout under the transfer's --output_dir:
    groups/<group>.jsonl          the group's rows (Input/Output and the source's other columns)
    groups/<group>/               processed: train, validation, test (= the held-out rows every cell is scored on)
    subsets/<subset>/             processed: the union of its groups' splits (fine_tune.py trains on train)
    groups.json                   the settings the groups were made with, and their sizes
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import atomic_directory, write_json
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.processing import process, save
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, choose_template, read_template, write_template
from proxytune.transfer.plans import subset_name

logger = logging.getLogger(__name__)


GROUPS_DIR, SUBSETS_DIR, GROUPS_RECORD = "groups", "subsets", "groups.json"


# Settings that change what a group's splits hold: a re-run with other values would mix old cells with new data.
SETTINGS = ("tokenizer_name", "max_length", "held_out_percentage", "validation_percentage", "seed", "prompt_template")
# groups.json written before the prompt template was a setting: its groups were made with the default.
SETTING_DEFAULTS = {"prompt_template": DEFAULT_TEMPLATE.record()}


def group_dir(out: Path, group: str) -> Path:
    return out / GROUPS_DIR / group


def subset_dir(out: Path, subset: Sequence[str]) -> Path:
    return out / SUBSETS_DIR / subset_name(subset)


def write_groups(out: Path, rows: dict[str, list[dict[str, Any]]], tokenizer, settings: dict[str, Any],
                 template: PromptTemplate = DEFAULT_TEMPLATE) -> dict:
    """Process every group (clean, split, tokenize with proxytune.task.processing, prompts in `template`, recorded
    beside each group) into groups/<group>/; a group already processed with the same settings (settings_of's, the
    template's record among them) is kept. Returns groups.json's content."""
    record_path = out / GROUPS_RECORD
    if record_path.is_file():
        old = json.loads(record_path.read_text(encoding="utf-8"))
        was = {k: old["settings"].get(k, SETTING_DEFAULTS.get(k)) for k in SETTINGS}
        changed = [f"{k} {was[k]!r} -> {settings.get(k)!r}" for k in SETTINGS if was[k] != settings.get(k)]
        if set(old["groups"]) != set(rows):
            changed.append(f"groups {sorted(old['groups'])} -> {sorted(rows)}")
        if changed:
            raise UsageError(f"{out} holds groups made with other settings ({'; '.join(changed)}): its cells would mix "
                             "data; choose another --output_dir or delete it")
        if all((group_dir(out, g) / "processing_config.json").is_file() for g in rows):
            return old
    (out / GROUPS_DIR).mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, group_rows in rows.items():
        source = out / GROUPS_DIR / f"{name}.jsonl"
        tmp = source.with_name(f".{source.name}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in group_rows),
                       encoding="utf-8")
        tmp.replace(source)
        args = ProcessingArguments(
            dataset_name=str(source), tokenizer_name=settings["tokenizer_name"], max_length=settings["max_length"],
            validation_split_percentage=settings["validation_percentage"],
            test_split_percentage=settings["held_out_percentage"], seed=settings["seed"],
            output_dir=str(group_dir(out, name)), overwrite_output_dir=True)
        dataset, stats = process(args, tokenizer, flag=f"group '{name}'", template=template)
        for split in ("train", "test"):
            if len(dataset[split]) == 0:
                raise UsageError(f"group '{name}' has no {'held-out' if split == 'test' else 'training'} rows after "
                                 f"cleaning and splitting ({len(group_rows)} rows in, kept {stats['rows_kept']}); "
                                 "give it more rows or merge it with another group")
        save(dataset, stats, args, template)
        sizes[name] = {"rows": len(group_rows), **{s: len(dataset[s]) for s in dataset}}
        logger.info("group %s: %d rows -> train %d, validation %d, held-out %d", name, len(group_rows),
                    sizes[name]["train"], sizes[name]["validation"], sizes[name]["test"])
    record = {"settings": settings, "groups": sizes}
    write_json(record_path, record)
    return record


def write_subset(out: Path, subset: Sequence[str]) -> Path:
    """subsets/<A+B>/: the concatenated splits of its groups, with group A's processing record and prompt template
    (the same tokenizer, max_length and template for all), so fine_tune.py reads it as processed. Kept when already
    there."""
    import datasets

    path = subset_dir(out, subset)
    if (path / "processing_config.json").is_file():
        return path
    parts = [datasets.load_from_disk(str(group_dir(out, g))) for g in subset]
    common = set.intersection(*(set(p["train"].column_names) for p in parts))
    merged = {}
    for split in ("train", "validation", "test"):
        pieces = [p[split].select_columns(sorted(common)) for p in parts]
        merged[split] = datasets.concatenate_datasets(pieces)
    first = group_dir(out, subset[0])
    with atomic_directory(path, overwrite=True) as tmp:
        datasets.DatasetDict(merged).save_to_disk(str(tmp))
        config = json.loads((first / "processing_config.json").read_text(encoding="utf-8"))
        write_json(tmp / "processing_config.json", {**config, "dataset_name": subset_name(subset),
                                                    "groups": list(subset)})
        write_json(tmp / "stats.json", {"groups": list(subset), **{s: len(d) for s, d in merged.items()}})
        write_template(tmp, read_template(first) or DEFAULT_TEMPLATE)
    return path


def load_held_out(out: Path, groups: Sequence[str]) -> dict[str, Any]:
    """{group: its held-out (test) split}: what every cell and every estimate is scored on."""
    import datasets

    return {g: datasets.load_from_disk(str(group_dir(out, g)))["test"] for g in groups}


def load_train(out: Path, groups: Sequence[str]) -> dict[str, Any]:
    """{group: its train split}: the examples whose gradients the estimate uses."""
    import datasets

    return {g: datasets.load_from_disk(str(group_dir(out, g)))["train"] for g in groups}


def fine_tune_template(data_args, model_name_or_path: str) -> PromptTemplate:
    """The prompt template of the groups and the cells, chosen as steer.py and rl_tune.py choose theirs
    (choose_template): the fine-tune config's prompt_template, else the one its model's directory records (a
    fine_tune.py final/), else meta_review; a recorded one that differs from the one used is warned about."""
    return choose_template(data_args.prompt_template,
                           [(f"--fine_tune_config's model {model_name_or_path}", read_template(model_name_or_path))],
                           flag="--fine_tune_config's prompt_template")


def settings_of(data_args, tokenizer_name: str, held_out_percentage: float, seed: int,
                template: PromptTemplate = DEFAULT_TEMPLATE) -> dict[str, Any]:
    """The group settings from the fine-tune's data flags (its max_length and validation share) and prompt template."""
    return {"tokenizer_name": tokenizer_name, "max_length": data_args.max_length,
            "held_out_percentage": held_out_percentage,
            "validation_percentage": data_args.validation_split_percentage, "seed": seed,
            "prompt_template": template.record()}
