"""Which training subsets to fine-tune on (or to estimate): a plan over the groups, as IPA-GPT's generator of every
combination does (for groups A and B: A+B, A, B, each then evaluated on A and on B).

A plan is a comma-separated list of kinds, their union in a fixed order:
    every          every non-empty combination of the groups (2^n - 1 subsets)
    alone          each group by itself
    all            all groups together (the meta-initialisation of the estimate is fine-tuned on it)
    leave_one_out  all groups but one
    pairs          every two groups
    random:N:K     N random subsets of K groups (seeded)
    with:G:K       every subset of at most K groups that holds group G (what to add to a target's own data)
or an explicit list of subsets, groups joined by '+': `A+B,A,C` (`--subsets`).
A subset is named by its groups joined by '+', in the sources file's order: 'A+B'.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from proxytune.foundation.errors import UsageError

KINDS = ("every", "alone", "all", "leave_one_out", "pairs", "random:N:K", "with:G:K")


# 2^n - 1 fine-tunes grows fast: beyond this, ask for a smaller plan rather than start a week of training.
MAX_EVERY_GROUPS = 6


SEPARATOR = "+"


def subset_name(groups: Sequence[str]) -> str:
    return SEPARATOR.join(groups)


def plan_subsets(plan: str, groups: Sequence[str], seed: int = 0, flag: str = "--plan") -> list[tuple[str, ...]]:
    """The subsets of a plan, each a tuple of group names in the groups' order, without repeats.

    `plan_subsets("alone,all", ["A", "B"])` -> [('A',), ('B',), ('A', 'B')].
    """
    order = {g: i for i, g in enumerate(groups)}
    found: list[tuple[str, ...]] = []

    def add(subset) -> None:
        subset = tuple(sorted(set(subset), key=order.__getitem__))
        if subset and subset not in found:
            found.append(subset)

    kinds = [k.strip() for k in plan.split(",") if k.strip()]
    if not kinds:
        raise UsageError(f"{flag} is empty; give one or more of {', '.join(KINDS)}")
    for kind in kinds:
        if kind == "every":
            if len(groups) > MAX_EVERY_GROUPS:
                raise UsageError(f"{flag} every: {len(groups)} groups make {2 ** len(groups) - 1} fine-tunes; use "
                                 f"alone,all,leave_one_out,pairs or random:N:K (at most {MAX_EVERY_GROUPS} groups)")
            for size in range(1, len(groups) + 1):
                for subset in itertools.combinations(groups, size):
                    add(subset)
        elif kind == "alone":
            for g in groups:
                add([g])
        elif kind == "all":
            add(groups)
        elif kind == "leave_one_out":
            for g in groups:
                add([h for h in groups if h != g])
        elif kind == "pairs":
            for pair in itertools.combinations(groups, 2):
                add(pair)
        elif kind.startswith("random:"):
            parts = kind.split(":")
            try:
                n, k = int(parts[1]), int(parts[2])
                if len(parts) != 3:
                    raise ValueError
            except (ValueError, IndexError):
                raise UsageError(f"{flag} {kind}: write random:N:K, e.g. random:20:3") from None
            if not 1 <= k <= len(groups) or n < 1:
                raise UsageError(f"{flag} {kind}: need N >= 1 and 1 <= K <= {len(groups)} (the number of groups)")
            rng = random.Random(seed)
            combinations = list(itertools.combinations(groups, k))
            for subset in rng.sample(combinations, min(n, len(combinations))):
                add(subset)
        elif kind.startswith("with:"):
            target, _, size = kind[len("with:"):].rpartition(":")
            if target not in order or not size.isdigit() or int(size) < 1:
                raise UsageError(f"{flag} {kind}: write with:G:K, G one of the groups ({', '.join(groups)}) and "
                                 f"K >= 1, e.g. with:{groups[0]}:3")
            others = [g for g in groups if g != target]
            for k in range(min(int(size), len(groups))):
                for more in itertools.combinations(others, k):
                    add([target, *more])
        else:
            raise UsageError(f"{flag}: unknown plan '{kind}'; use {', '.join(KINDS)}")
    return found


def parse_subsets(text: str, groups: Sequence[str], flag: str = "--subsets") -> list[tuple[str, ...]]:
    """An explicit list: `parse_subsets("A+B,A", ["A", "B"])` -> [('A', 'B'), ('A',)]; unknown groups are refused."""
    order = {g: i for i, g in enumerate(groups)}
    found: list[tuple[str, ...]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        names = [n.strip() for n in item.split(SEPARATOR)]
        unknown = [n for n in names if n not in order]
        if unknown:
            raise UsageError(f"{flag}: '{item}' names unknown group(s) {unknown} (groups: {', '.join(groups)})")
        subset = tuple(sorted(set(names), key=order.__getitem__))
        if subset not in found:
            found.append(subset)
    if not found:
        raise UsageError(f"{flag} is empty; give subsets like A+B,A")
    return found
