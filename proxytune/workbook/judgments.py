"""Reading people's ratings back from a workbook (every layout it has had), and exporting them as JSONL."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openpyxl import load_workbook

from proxytune.foundation.errors import UsageError, first_line
from proxytune.workbook.sheets import (
    GENERATED_SHEETS,
    KEPT,
    KEPT_FIXED,
    KEPT_TAIL,
    KEY,
    LABELED,
    OLD_EXAMPLE_COLUMNS,
    OLD_EXAMPLES,
    PAIRWISE,
    PAIRWISE_COLUMNS,
    REVIEW,
    REVIEW_FIXED,
    REVIEW_TAIL,
    SCORES,
    SCORES_FIXED,
    TIE,
)


@dataclass
class Judgment:
    """What one person typed about one thing, and where it is typed.

    sheet: where it lives when its (example, systems) is in the run: "Review" (a rating and comment of one
    output; systems = (system,)), "Pairwise" (a choice; systems = both, sorted), or the columns a reviewer added
    to a sheet: "Review" with systems = () (one per example), "Scores" with systems = (system,).
    values: column -> value; a pairwise "choice" holds the chosen system's name, "tie", or the text typed.
    outputs: system -> the output as it was when judged. reason: why it is kept aside (None while in the run).
    """

    sheet: str
    example_id: str
    systems: tuple[str, ...]
    values: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        return self.sheet, self.example_id, self.systems


@dataclass
class Judgments:
    """Everything people typed into a book: judgments in place, judgments kept aside, added sheets."""

    current: dict[tuple, Judgment] = field(default_factory=dict)
    kept: list[Judgment] = field(default_factory=list)
    added_columns: dict[str, list[str]] = field(default_factory=dict)  # sheet -> columns a reviewer added
    added_sheets: dict[str, list[list[Any]]] = field(default_factory=dict)
    signature: tuple[int, int] | None = None  # (mtime_ns, size) of the file that was read

    def all(self) -> list[Judgment]:
        return [*self.current.values(), *self.kept]


def lock_files(path: Path) -> list[Path]:
    """Lock files of office programs that have `path` open (LibreOffice, Excel)."""
    names = [f".~lock.{path.name}#", f"~${path.name}", f"~${path.name[2:]}"]
    return [path.with_name(n) for n in names if path.with_name(n).exists()]


def file_signature(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def read_judgments(path: Path) -> Judgments:
    """Every judgment, added column and added sheet of an existing book (empty Judgments if there is none).

    Raises UsageError (and touches nothing) if the path is a directory, the book is open in an office program,
    unreadable, not one evaluation.py wrote, or its blind labels cannot be mapped back to systems.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"workbook path {path} is a directory; pass --output_xlsx FILE.xlsx")
    locks = lock_files(path)
    if locks:
        raise UsageError(f"workbook {path} is open in another program (lock file {locks[0].name}); "
                         f"save and close it, then re-run; if no program has it open (a crash left the lock "
                         f"behind), delete {locks[0]}")
    if path.suffix.lower() != ".xlsx":
        raise UsageError(f"workbook path {path} must end in .xlsx; pass --output_xlsx FILE.xlsx")
    signature = file_signature(path)
    if signature is None:
        return Judgments()
    try:
        wb = load_workbook(path)
    except PermissionError:
        raise UsageError(f"cannot read workbook {path}: permission denied; fix its permissions") from None
    except Exception as err:  # openpyxl raises zip, XML and key errors for damaged files
        raise UsageError(f"workbook {path} cannot be read ({type(err).__name__}: {first_line(err)}); it was left "
                         "untouched: repair or move it, or pass another --output_xlsx") from None
    found = Judgments(signature=signature)
    untouched = "it was left untouched"
    if REVIEW in wb.sheetnames or PAIRWISE in wb.sheetnames:
        if KEY not in wb.sheetnames:
            raise UsageError(f"workbook {path} has lost its hidden '{KEY}' sheet, so its blind labels cannot be "
                             f"mapped to systems; {untouched}: restore it from a copy, or pass another --output_xlsx")
        key = read_key(wb[KEY])
        for sheet in (REVIEW, PAIRWISE, SCORES):
            if sheet in wb.sheetnames:
                header, rows = read_table(wb[sheet])
                if "example_id" not in header:
                    raise UsageError(f"sheet '{sheet}' of {path} lacks its example_id column; {untouched}: restore "
                                     "the header row or pass another --output_xlsx")
                reader = {REVIEW: read_review, PAIRWISE: read_pairwise, SCORES: read_scores}[sheet]
                found.added_columns[sheet] = reader(header, rows, key, found, path)
    elif OLD_EXAMPLES in wb.sheetnames:
        header, rows = read_table(wb[OLD_EXAMPLES])
        if "example_id" not in header or "system" not in header:
            raise UsageError(f"sheet '{OLD_EXAMPLES}' of {path} lacks the example_id/system columns; {untouched}: "
                             "restore the header row or pass another --output_xlsx")
        found.added_columns[SCORES] = read_old_examples(header, rows, found)
    else:
        raise UsageError(f"workbook {path} has no '{REVIEW}' sheet, so it was not written by evaluation.py; "
                         f"{untouched}: move it or pass another --output_xlsx")
    if KEPT in wb.sheetnames:
        read_kept(*read_table(wb[KEPT]), found)
    for name in wb.sheetnames:
        if name not in GENERATED_SHEETS:
            found.added_sheets[name] = [list(r) for r in wb[name].iter_rows(values_only=True)]
    wb.close()
    return found


def read_table(ws) -> tuple[list[str], list[dict[str, Any]]]:
    """A sheet as (header, rows as dicts). A column without a header but with values gets a name."""
    grid = [list(r) for r in ws.iter_rows(values_only=True)]
    if not grid:
        return [], []
    width = max(len(r) for r in grid)
    header = []
    for j in range(width):
        name = grid[0][j] if j < len(grid[0]) else None
        header.append(str(name).strip() if not is_empty(name) else f"column {j + 1}")
    rows = [{h: (r[j] if j < len(r) else None) for j, h in enumerate(header)} for r in grid[1:]]
    rows = [r for r in rows if any(not is_empty(v) for v in r.values())]
    used = [h for h in header if not h.startswith("column ") or any(not is_empty(r[h]) for r in rows)]
    return used, rows


def read_key(ws) -> dict[tuple[str, str, str], str]:
    """{(sheet, example_id, label): system} from the Key sheet."""
    _, rows = read_table(ws)
    return {(str(r["sheet"]), str(r["example_id"]), str(r["label"])): str(r["system"]) for r in rows
            if not is_empty(r.get("example_id")) and not is_empty(r.get("system"))}


def typed(row: dict, columns) -> dict[str, Any]:
    """The non-empty values of `columns`; a rating typed or picked as text ("4") is the number 4, as Excel would
    have stored it (other columns stay as typed: "0012" may be an id)."""
    out = {c: row.get(c) for c in columns if not is_empty(row.get(c))}
    for c, v in out.items():
        if c.endswith("rating") and isinstance(v, str) and v.strip().isdigit():
            out[c] = int(v.strip())
    return out


def unmapped(sheet: str, example_id: str, label: str, path: Path) -> UsageError:
    return UsageError(f"sheet '{sheet}' of {path} holds a judgment under label {label} for example {example_id}, "
                      f"which the hidden '{KEY}' sheet does not map to a system; it was left untouched: restore "
                      "the row's example_id (or the Key), or move the judgment to a sheet of your own")


def read_review(header, rows, key, found: Judgments, path: Path) -> list[str]:
    labels = sorted({m.group(1) for h in header if (m := LABELED.match(h))})
    added = [h for h in header if h not in (*REVIEW_FIXED, *REVIEW_TAIL) and not LABELED.match(h)]
    for row in rows:
        if is_empty(row.get("example_id")):
            continue
        eid = str(row["example_id"])
        for label in labels:
            values = typed(row, (f"{label} rating", f"{label} comment"))
            if not values:
                continue
            system = key.get((REVIEW, eid, label))
            if system is None:
                raise unmapped(REVIEW, eid, label, path)
            j = Judgment(REVIEW, eid, (system,), {k.split(" ", 1)[1]: v for k, v in values.items()},
                         {system: row.get(f"{label} output")})
            found.current[j.key] = j
        values = typed(row, added)
        if values:
            found.current[(REVIEW, eid, ())] = Judgment(REVIEW, eid, (), values)
    return added


def read_pairwise(header, rows, key, found: Judgments, path: Path) -> list[str]:
    added = [h for h in header if h not in PAIRWISE_COLUMNS]
    for row in rows:
        values = typed(row, ("choice", "comment", *added))
        if is_empty(row.get("example_id")) or not values:
            continue
        eid = str(row["example_id"])
        systems = {label: key.get((PAIRWISE, eid, label)) for label in "AB"}
        for label, system in systems.items():
            if system is None:
                raise unmapped(PAIRWISE, eid, label, path)
        choice = str(values.get("choice", "")).strip()
        if choice.upper() in systems:
            values["choice"] = systems[choice.upper()]
        elif choice.lower() == TIE:
            values["choice"] = TIE
        j = Judgment(PAIRWISE, eid, tuple(sorted(systems.values())), values,
                     {systems[label]: row.get(f"{label} output") for label in "AB"})
        found.current[j.key] = j
    return added


def read_scores(header, rows, key, found: Judgments, path: Path) -> list[str]:
    """Columns added to the analysis table; and a rating typed over its `rating` formula, which counts as a rating
    of that (example, system) unless the Review sheet holds another one (then it is kept aside)."""
    added = [h for h in header if h not in SCORES_FIXED]
    for row in rows:
        if is_empty(row.get("example_id")):
            continue
        eid, system = str(row["example_id"]), str(row.get("system"))
        values = typed(row, added)
        if values:
            found.current[(SCORES, eid, (system,))] = Judgment(SCORES, eid, (system,), values)
        rating = typed(row, ("rating",)).get("rating")
        if rating is None or (isinstance(rating, str) and rating.startswith("=")):
            continue
        review = found.current.get((REVIEW, eid, (system,)))
        if review is None:
            found.current[(REVIEW, eid, (system,))] = Judgment(REVIEW, eid, (system,), {"rating": rating})
        elif review.values.get("rating") != rating:
            found.kept.append(Judgment(REVIEW, eid, (system,), {"rating": rating}, {},
                                       f"typed into '{SCORES}'; the rating in '{REVIEW}' was kept"))
    return added


def read_old_examples(header, rows, found: Judgments) -> list[str]:
    """The previous layout: ratings go to the Review sheet, columns a reviewer added to the Scores sheet."""
    added = [h for h in header if h not in OLD_EXAMPLE_COLUMNS]
    for row in rows:
        if is_empty(row.get("example_id")):
            continue
        for j in split_old_row(row, added):
            found.current[j.key] = j
    return added


def split_old_row(row: dict, added: list[str], reason: str | None = None) -> list[Judgment]:
    eid, system = str(row["example_id"]), str(row.get("system"))
    out = []
    rating = typed(row, ("rating", "comment"))
    if rating:
        out.append(Judgment(REVIEW, eid, (system,), rating, {system: row.get("output")}, reason))
    extra = typed(row, added)
    if extra:
        out.append(Judgment(SCORES, eid, (system,), extra, {}, reason))
    return out


def read_kept(header, rows, found: Judgments) -> None:
    if "sheet" not in header:  # the previous layout's Kept ratings: example_id, system, rating, comment, reason, output
        added = [h for h in header if h not in ("example_id", "system", "rating", "comment", "reason", "output")]
        for row in rows:
            found.kept += split_old_row(row, added, row.get("reason") or "kept")
        return
    added = [h for h in header if h not in (*KEPT_FIXED, *KEPT_TAIL)]
    for row in rows:
        sheet = str(row.get("sheet") or REVIEW)
        systems = tuple(str(row[c]) for c in ("system", "other_system") if not is_empty(row.get(c)))
        outputs = {str(row[c]): row.get(o) for c, o in (("system", "output"), ("other_system", "other_output"))
                   if not is_empty(row.get(c))}
        values = typed(row, ("rating", "choice", "comment", *added))
        if not values:
            continue
        reason = row.get("reason") or "kept"
        if sheet == REVIEW and len(systems) == 1 and set(values) - {"rating", "comment"}:
            # Columns added to this sheet by hand belong to the pair's row of the Scores sheet.
            extra = {k: v for k, v in values.items() if k not in ("rating", "comment")}
            found.kept.append(Judgment(SCORES, str(row["example_id"]), systems, extra, {}, reason))
            values = {k: v for k, v in values.items() if k in ("rating", "comment")}
        if values:
            found.kept.append(Judgment(sheet, str(row["example_id"]), tuple(sorted(systems)), values, outputs, reason))


def judgment_record(j: Judgment) -> dict[str, Any]:
    """One line of ratings.jsonl. Examples:
    {"type": "rating", "example_id": "3f..", "system": "steered", "rating": 4, "comment": "vague", "output": "..",
     "kept": null}
    {"type": "pairwise", "example_id": "3f..", "systems": ["large", "steered"], "choice": "steered",
     "winner": "steered", "loser": "large", "comment": null, "outputs": {"large": "..", "steered": ".."}, "kept": null}
    {"type": "note", "sheet": "Scores", "example_id": "3f..", "system": "large", "values": {"my column": "x"}, ...}
    """
    if j.sheet == REVIEW and len(j.systems) == 1:
        (system,) = j.systems
        return {"type": "rating", "example_id": j.example_id, "system": system, "rating": j.values.get("rating"),
                "comment": j.values.get("comment"), "output": j.outputs.get(system), "kept": j.reason}
    if j.sheet == PAIRWISE:
        choice = j.values.get("choice")
        winner = choice if choice in j.systems else None
        loser = next((s for s in j.systems if s != winner), None) if winner else None
        extra = {k: v for k, v in j.values.items() if k not in ("choice", "comment")}
        return {"type": "pairwise", "example_id": j.example_id, "systems": list(j.systems), "choice": choice,
                "winner": winner, "loser": loser, "comment": j.values.get("comment"),
                "outputs": dict(sorted(j.outputs.items())),
                **({"values": extra} if extra else {}), "kept": j.reason}
    return {"type": "note", "sheet": j.sheet, "example_id": j.example_id, "system": j.systems[0] if j.systems else None,
            "values": j.values, "kept": j.reason}


def export_judgments(judgments: Judgments, path: Path) -> int:
    """Write every judgment (in place, then kept aside; each sorted by sheet, example_id and systems) to a JSONL
    file atomically; returns the number of lines."""
    path = Path(path)
    order = {REVIEW: 0, PAIRWISE: 1, SCORES: 2}
    ranked = sorted(judgments.all(), key=lambda j: (j.reason is not None, str(j.reason), order.get(j.sheet, 3),
                                                     j.example_id, j.systems))
    lines = [json.dumps(judgment_record(j), ensure_ascii=False, default=str) for j in ranked]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines)
