"""The sources file: which groups of training data there are (a dataset, a filter, its columns), read and checked.

The shape follows the IPA-GPT library's database of datasets (one entry per source: where the data is, which columns
are the input and the target, the task type), as YAML (or JSON):

    defaults:                         # optional: keys every group inherits
      dataset: ../shared/data/meta_review/mred_val_longest.jsonl   # a local file or a Hub dataset id
      input_column: Input             # the reviews
      output_column: Output           # the meta-review
      task: language_modeling
    groups:
      accept-2018: {filter: {year: 2018, decision: "Accept (Poster)"}}
      reject-2018: {filter: {year: 2018, decision: [Reject, "Reject (Invite to Workshop Track)"]}}
      orsum: {dataset: orsum.jsonl, input_column: Review, output_column: Metareview}

Two shortcuts instead of `groups` (with `defaults.dataset`):
    group_by: year                    # one group per value of a column (or a list of columns: [year, decision])
    kmeans: {clusters: 4}             # k-means of the base model's mean hidden state over the prompt
                                      # (proxytune/transfer/clusters.py; also: model, seed, max_examples)

A filter keeps the rows whose column equals the value (compared as text, so `year: 2018` matches "2018"), or one of
the values of a list. Every problem is reported at once, one line each, naming the file and the group.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxytune.foundation.config import read_config_file
from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.sources import load_raw_dataset, normalise_splits

GROUP_KEYS = {"dataset": str, "filter": dict, "input_column": str, "output_column": str, "task": str, "split": str}


TOP_KEYS = {"defaults", "groups", "group_by", "kmeans"}


KMEANS_KEYS = {"clusters", "model", "seed", "max_examples", "max_prompt_tokens"}


# Tasks the transfer matrix and the estimate can run; classification's held-out metric is another story.
TASKS = ("language_modeling",)


# A group's name becomes a directory name and a column of the matrix.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


@dataclass
class Group:
    """One source of training data: the rows of `dataset` (its `split`) that pass `filter`."""

    name: str
    dataset: str
    filter: dict[str, list[str]] = field(default_factory=dict)  # column -> accepted values (as text)
    input_column: str = "Input"
    output_column: str = "Output"
    task: str = "language_modeling"
    split: str = "train"

    def matches(self, row: dict[str, Any]) -> bool:
        return all(str(row.get(column)) in values for column, values in self.filter.items())


@dataclass
class Sources:
    """A parsed sources file: explicit groups, or a shortcut (group_by columns, k-means) over `defaults`."""

    path: str
    groups: list[Group]
    group_by: list[str] | None = None
    kmeans: dict[str, Any] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


def close_hint(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"did you mean '{close[0]}'?" if close else f"keys: {', '.join(sorted(known))}"


def group_problems(where: str, entry: Any) -> list[str]:
    """What is wrong with one group's (or the defaults') mapping: unknown keys, wrong types, a bad filter or task."""
    if not isinstance(entry, dict):
        return [f"{where} must be a mapping of {', '.join(GROUP_KEYS)}, got {type(entry).__name__}"]
    problems = []
    for key, value in entry.items():
        if key not in GROUP_KEYS:
            problems.append(f"{where}: unknown key '{key}'; {close_hint(key, set(GROUP_KEYS))}")
        elif not isinstance(value, GROUP_KEYS[key]):
            problems.append(f"{where}: '{key}' must be a {GROUP_KEYS[key].__name__}, got {value!r}")
    condition = entry.get("filter")
    if isinstance(condition, dict):
        for column, value in condition.items():
            values = value if isinstance(value, list) else [value]
            if not values or any(isinstance(v, (dict, list)) or v is None for v in values):
                problems.append(f"{where}: filter '{column}' must be a value or a list of values, got {value!r}")
    task = entry.get("task")
    if isinstance(task, str) and task not in TASKS:
        problems.append(f"{where}: task '{task}' is not supported here (only {', '.join(TASKS)})")
    return problems


def make_group(name: str, entry: dict[str, Any]) -> Group:
    condition = {str(c): [str(v) for v in (value if isinstance(value, list) else [value])]
                 for c, value in (entry.get("filter") or {}).items()}
    keys = {k: v for k, v in entry.items() if k in GROUP_KEYS and k != "filter"}
    return Group(name=name, filter=condition, **keys)


def parse_sources(path: str | Path) -> Sources:
    """Read and check a sources file; every problem is raised at once, each naming the entry.

    `parse_sources("s.yaml")` with `{defaults: {dataset: d.jsonl}, groups: {a: {filter: {year: 2018}}}}` ->
    Sources(groups=[Group(name='a', dataset='d.jsonl', filter={'year': ['2018']}, ...)]).
    """
    where = f"sources file {path}"
    if not Path(path).is_file():
        raise UsageError(f"{where} does not exist; pass a YAML file of groups (docs/which-data.md)")
    try:
        raw = read_config_file(path)
    except UsageError as err:
        raise UsageError(" ".join(str(err).replace("config file", "sources file").split())) from None
    if not isinstance(raw, dict):
        raise UsageError(f"{where} must be a mapping with 'groups' (or 'group_by' / 'kmeans')")
    problems = [f"{where}: unknown key '{k}'; {close_hint(k, TOP_KEYS)}" for k in raw if k not in TOP_KEYS]
    defaults = raw.get("defaults") or {}
    problems += group_problems(f"{where}: defaults", defaults)
    ways = [k for k in ("groups", "group_by", "kmeans") if raw.get(k) is not None]
    if len(ways) != 1:
        problems.append(f"{where}: give exactly one of 'groups', 'group_by' or 'kmeans'"
                        + (f" (it has {', '.join(ways)})" if ways else ""))
    groups: list[Group] = []
    group_by = kmeans = None
    if raw.get("groups") is not None and len(ways) == 1:
        entries = raw["groups"]
        if isinstance(entries, list):  # a list of {name: ..., ...} entries, as IPA-GPT's database has them
            named = [e for e in entries if isinstance(e, dict) and "name" in e]
            if len(named) != len(entries):
                problems.append(f"{where}: every entry of the 'groups' list needs a 'name'")
            entries = {str(e["name"]): {k: v for k, v in e.items() if k != "name"} for e in named}
            if len(entries) != len(named):
                problems.append(f"{where}: two groups have the same name")
        if not isinstance(entries, dict) or not entries:
            problems.append(f"{where}: 'groups' must be a non-empty mapping of group name -> entry")
            entries = {}
        for name, entry in entries.items():
            name = str(name)
            here = f"{where}: group '{name}'"
            if not NAME_RE.match(name):
                problems.append(f"{here}: a name is letters, digits and _ . = - (it names a directory)")
            entry_problems = group_problems(here, entry)
            problems += entry_problems
            if entry_problems:
                continue
            merged = {**(defaults if isinstance(defaults, dict) else {}), **entry}
            if not merged.get("dataset"):
                problems.append(f"{here}: no dataset; give 'dataset' (a file or Hub id) or defaults.dataset")
                continue
            groups.append(make_group(name, merged))
        if len(groups) == 1 and not problems:
            problems.append(f"{where}: one group only; a transfer matrix needs at least two")
    elif raw.get("group_by") is not None and len(ways) == 1:
        group_by = raw["group_by"] if isinstance(raw["group_by"], list) else [raw["group_by"]]
        if not group_by or not all(isinstance(c, str) and c for c in group_by):
            problems.append(f"{where}: group_by must be a column name or a list of them, got {raw['group_by']!r}")
    elif raw.get("kmeans") is not None and len(ways) == 1:
        kmeans = raw["kmeans"]
        if not isinstance(kmeans, dict):
            problems.append(f"{where}: kmeans must be a mapping like {{clusters: 4}}, got {kmeans!r}")
        else:
            problems += [f"{where}: kmeans: unknown key '{k}'; {close_hint(k, KMEANS_KEYS)}"
                         for k in kmeans if k not in KMEANS_KEYS]
            k = kmeans.get("clusters")
            if not isinstance(k, int) or isinstance(k, bool) or k < 2:
                problems.append(f"{where}: kmeans: 'clusters' must be an integer >= 2, got {k!r}")
    if (group_by is not None or kmeans is not None) and isinstance(defaults, dict) and not defaults.get("dataset"):
        problems.append(f"{where}: {'group_by' if group_by is not None else 'kmeans'} splits one dataset: give "
                        "defaults.dataset")
    raise_problems(problems)
    return Sources(str(path), groups, group_by, kmeans, dict(defaults))


def read_rows(dataset: str, split: str, where: str) -> list[dict[str, Any]]:
    """The rows of one split of a local data file (or folder, or saved dataset) or a Hub dataset."""
    raw = normalise_splits(load_raw_dataset(ProcessingArguments(dataset_name=dataset), flag=f"{where}: dataset"))
    if split not in raw:
        raise UsageError(f"{where}: split '{split}' not in {dataset} (splits: {', '.join(raw)})")
    return raw[split].to_list()


def safe_name(value: str) -> str:
    """`safe_name("Accept (Poster)")` -> 'Accept_Poster'."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", value).strip("_") or "empty"


def split_by_columns(sources: Sources, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """group_by: one group per combination of the columns' values, named by them ('2018-Reject')."""
    where = f"sources file {sources.path}: group_by"
    missing = [c for c in sources.group_by or [] if rows and c not in rows[0]]
    if missing:
        raise UsageError(f"{where}: column(s) {missing} not in {sources.defaults['dataset']} (columns: "
                         f"{', '.join(rows[0])})")
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = "-".join(safe_name(str(row.get(c))) for c in sources.group_by or [])
        out.setdefault(name, []).append(row)
    if len(out) < 2:
        raise UsageError(f"{where}: {sources.group_by} has {len(out)} value(s) in {sources.defaults['dataset']}; a "
                         "transfer matrix needs at least two groups")
    return dict(sorted(out.items()))


def as_meta_review_rows(rows: list[dict[str, Any]], group: Group, where: str) -> list[dict[str, Any]]:
    """The rows with the group's columns renamed to Input/Output (what proxytune.task.processing reads)."""
    if rows and (group.input_column not in rows[0] or group.output_column not in rows[0]):
        raise UsageError(f"{where}: columns '{group.input_column}'/'{group.output_column}' not in {group.dataset} "
                         f"(columns: {', '.join(rows[0])}); set input_column/output_column")
    renamed = []
    for row in rows:
        other = {k: v for k, v in row.items() if k not in (group.input_column, group.output_column, "Input", "Output")}
        renamed.append({**other, "Input": row[group.input_column], "Output": row[group.output_column]})
    return renamed


def load_groups(sources: Sources) -> dict[str, list[dict[str, Any]]]:
    """Each explicit group's rows (filter applied, columns renamed to Input/Output), or group_by's groups.

    k-means groups need a model: proxytune.transfer.clusters.cluster_groups makes them."""
    if sources.kmeans is not None:
        raise UsageError(f"sources file {sources.path}: kmeans groups are made by proxytune.transfer.clusters")
    if sources.group_by is not None:
        base = make_group("all", sources.defaults)
        rows = as_meta_review_rows(read_rows(base.dataset, base.split, f"sources file {sources.path}"), base,
                                   f"sources file {sources.path}: defaults")
        return split_by_columns(sources, rows)
    cache: dict[tuple[str, str], list[dict[str, Any]]] = {}
    out = {}
    for group in sources.groups:
        where = f"sources file {sources.path}: group '{group.name}'"
        key = (group.dataset, group.split)
        if key not in cache:
            cache[key] = read_rows(group.dataset, group.split, where)
        rows = cache[key]
        missing = [c for c in group.filter if rows and c not in rows[0]]
        if missing:
            raise UsageError(f"{where}: filter column(s) {missing} not in {group.dataset} (columns: "
                             f"{', '.join(rows[0])})")
        kept = [r for r in rows if group.matches(r)]
        if not kept:
            raise UsageError(f"{where}: the filter {group.filter} keeps no row of {group.dataset}")
        out[group.name] = as_meta_review_rows(kept, group, where)
    return out
