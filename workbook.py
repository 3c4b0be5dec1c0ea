"""The evaluation workbook: blind side-by-side review, pairwise choices, scores, and every judgment read back.

evaluation.py writes the book with one call, after reading what people typed into the previous one:
    written = write_workbook(path, records, examples, summary, run_info, BookOptions(seed=42, pairwise=("steered", "large")))
    export_judgments(written.judgments, out_dir / "ratings.jsonl")

Export what reviewers typed since, without re-running the evaluation (other tools then need no openpyxl):
    python workbook.py --workbook outputs/evaluation/eval_examples.xlsx        # -> outputs/evaluation/ratings.jsonl

Sheets, in order:
  Review     one row per example: the reviews once, the reference, then each system's output under a blind
             label (A, B, ... shuffled per example by random.Random(f"{seed}:{example_id}")), each with a rating
             dropdown (1-5) and a comment cell.
  Pairwise   (two systems named by --pairwise) one row per example: outputs A and B in a seeded random order,
             a choice dropdown (A / B / tie) and a comment.
  Summary    one row per system: model, scores, live mean rating and win rate (formulas over the Key), and a
             ROUGE chart below the table; with evaluation.py --decision_classifier, the decision_consistency column's
             ceiling and floor under the table (from run_info["decision_consistency"]).
  Scores     the analysis table: one row per (example, system) with every score and the live rating.
  Intervals  system, metric, mean, ci_low, ci_high: bootstrap intervals of the scores, ratings and win rates.
  Run        what was evaluated, how, and when (key/value), the review seed included.
  Kept ratings  judgments of pairs that are not in this run, or of outputs that changed since they were judged.
  Key        hidden and protected: (sheet, example_id, label) -> system, and each judgment as a number.
Every formula is stored with the value it has at write time, so pandas and openpyxl(data_only=True) read numbers.

Judgments are matched by (example_id, system) -- for pairwise choices by (example_id, both systems) -- through
the Key, never by row or letter, so they survive a new seed, a new set of systems and rows sorted by hand. A rating
typed over the Scores sheet's live one counts too. Columns and sheets a reviewer adds are carried over.
An old book (one 'Examples' sheet with a row per (example, system), written before the Review layout) is read too.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from openpyxl import Workbook, load_workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.chart import BarChart, Reference
from openpyxl.styles import Alignment, Border, Font, PatternFill, Side
from openpyxl.utils import get_column_letter, quote_sheetname
from openpyxl.worksheet.datavalidation import DataValidation
from openpyxl.worksheet.page import PageMargins

from common import UsageError, first_line, run_cli, setup_logging

logger = logging.getLogger("workbook")

REVIEW, PAIRWISE, SUMMARY, SCORES, INTERVALS, RUN, KEPT, KEY = (
    "Review", "Pairwise", "Summary", "Scores", "Intervals", "Run", "Kept ratings", "Key")
OLD_EXAMPLES = "Examples"  # the one sheet of rows the previous layout had
GENERATED_SHEETS = (REVIEW, PAIRWISE, SUMMARY, SCORES, INTERVALS, RUN, KEPT, KEY, OLD_EXAMPLES)

# The fields of evaluation.py's records shown per (example, system); the Summary shows whatever summarize() gave.
SCORE_COLUMNS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "words", "repetition", "ended_with_eos", "new_tokens",
                 "perplexity")
RATINGS = (1, 2, 3, 4, 5)
TIE = "tie"
LABELED = re.compile(r"^([A-Z]{1,2}) (output|rating|comment)$")  # Review headers: "A output", "A rating", ...

REVIEW_FIXED = ("#", "reviews", "reference")
REVIEW_TAIL = ("note", "example_id")
PAIRWISE_COLUMNS = ("#", "reviews", "reference", "A output", "B output", "choice", "comment", "note", "example_id")
SCORES_FIXED = ("example_no", "example_id", "system", "rating", *SCORE_COLUMNS, "prompt_truncated")
KEPT_FIXED = ("sheet", "example_id", "system", "other_system", "rating", "choice", "comment")
KEPT_TAIL = ("reason", "output", "other_output")
KEY_COLUMNS = ("sheet", "example_no", "example_id", "label", "system", "score", "model")
# The previous layout's generated columns; anything else in its Examples sheet was added by a reviewer.
OLD_EXAMPLE_COLUMNS = ("example_no", "example_id", "system", "reviews", "reference", "output", "rating", "comment",
                       *SCORE_COLUMNS, "note")

EXCEL_CELL_LIMIT = 32_767
MAX_ROW_HEIGHT = 409  # points: Excel's largest row; a longer text scrolls inside its cell
# Arial (Liberation Sans in LibreOffice: the same metrics) prints alike everywhere; Calibri is not installed with
# LibreOffice on Linux and its substitute is wider, which would make the fitted row heights wrong.
FONT, HEADER_FONT, ID_FONT = Font(name="Arial", size=10), Font(name="Arial", size=10, bold=True), \
    Font(name="Arial", size=8, color="666666")
# One line of Arial 10, and prose characters per column-width unit (wrapping included): LibreOffice fits 1.4-1.45 per
# unit (measured on its PDF export), in lines of ~11.5 pt; 1.35 and 12.75 pt (Excel's line) leave room for Excel.
LINE_PT, CHARS_PER_UNIT = 12.75, 1.35
HEADER_FILL, INPUT_FILL = PatternFill("solid", fgColor="DDEBF7"), PatternFill("solid", fgColor="FFF2CC")
EDGE = Side(style="thin", color="BFBFBF")
BORDER = Border(left=EDGE, right=EDGE, top=EDGE, bottom=EDGE)
# (least, most) width of a column kind, in characters; a column fits its longest line within these.
WIDTHS = {"#": (4, 4), "example_id": (17, 17), "reviews": (30, 56), "reference": (20, 30), "output": (20, 30),
          "rating": (6, 6), "choice": (8, 8), "comment": (12, 12), "note": (14, 24), "system": (12, 14),
          "model": (20, 40), "reason": (20, 30), "sheet": (9, 9), "label": (6, 6), "method": (20, 60)}
TEXT_KINDS = {"reviews", "reference", "output", "comment", "note", "model", "reason", "value"}


# ---------------------------------------------------------------------------------------------
# What a person typed
# ---------------------------------------------------------------------------------------------
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


@dataclass
class BookOptions:
    review_chars: int = 2000  # reviews are cut to this many characters
    seed: int = 0  # of the blind labels and of the bootstrap of ratings and win rates
    pairwise: tuple[str, str] | None = None  # the two systems of the Pairwise sheet
    bootstrap_samples: int = 1000
    confidence: float = 0.95
    cached_values: bool = True  # False leaves formulas without values (tests let LibreOffice compute them)


@dataclass
class WrittenBook:
    judgments: Judgments  # as the new book holds them
    human: dict[str, dict[str, Any]]  # system -> {"rating": interval, "win_rate": interval} (None where none)


# ---------------------------------------------------------------------------------------------
# Reading a book back
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Placing judgments in the new book
# ---------------------------------------------------------------------------------------------
def blind_labels(systems: list[str], example_id: str, seed: int) -> dict[str, str]:
    """{system: label} for one example: the systems in a random order named A, B, C, ...

    Seeded by (seed, example_id) alone, so an example's labels do not depend on which other examples are in the run:
    `blind_labels(["large", "steered"], "ex1", 0)` is the same in every run with seed 0.
    """
    order = list(systems)
    random.Random(f"{seed}:{example_id}").shuffle(order)
    return {system: label_name(i) for i, system in enumerate(order)}


def pair_labels(pair: tuple[str, str], example_id: str, seed: int) -> dict[str, str]:
    """{system: "A" or "B"}: a coin flip per example, independent of the Review sheet's shuffle."""
    first, second = pair if random.Random(f"{seed}:pairwise:{example_id}").random() < 0.5 else pair[::-1]
    return {first: "A", second: "B"}


def label_name(i: int) -> str:
    """0 -> 'A', 25 -> 'Z', 26 -> 'AA'."""
    return chr(65 + i) if i < 26 else label_name(i // 26 - 1) + chr(65 + i % 26)


def carry(slots: dict[tuple, dict[str, Any]], found: Judgments, run_date: str) -> tuple[dict, list[Judgment]]:
    """Put earlier judgments into this run's slots ({key: outputs now}); return (placed, kept).

    Judgments whose (sheet, example, systems) is not in this run are kept aside, and come back when it returns;
    a judgment of an output that changed is carried onto the new output, and the old one is kept with its output.
    """
    kept = list(found.kept)
    returning: dict[tuple, Judgment] = {}
    for j in found.kept:
        if str(j.reason).startswith("not in run"):
            returning.setdefault(j.key, j)
    placed = {}
    for key, outputs in slots.items():
        j = found.current.get(key) or returning.get(key)
        if j is None:
            continue
        if j in kept:
            kept.remove(j)
        placed[key] = replace(j, outputs=dict(outputs), reason=None)
        changed = [s for s, text in j.outputs.items() if not is_empty(text) and text != outputs.get(s)]
        if changed:
            kept.append(replace(j, reason=f"output changed since judged (run of {run_date})"))
    for key, j in found.current.items():
        if key not in slots:
            kept.append(replace(j, reason=f"not in run of {run_date}"))
    return placed, kept


# ---------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------
@dataclass
class Formula:
    """A formula and the value it has now; both are written (see add_cached_values)."""

    text: str
    value: Any


def cell_text(value: Any, limit: int = EXCEL_CELL_LIMIT) -> Any:
    """Values Excel accepts: control characters removed, text cut at the cell limit."""
    if not isinstance(value, str):
        return value
    value = ILLEGAL_CHARACTERS_RE.sub("", value)
    if len(value) > limit:
        marker = f" [... {len(value) - limit} more characters]"
        value = value[: max(0, limit - len(marker))] + marker
    return value


def kind_of(column: str) -> str:
    m = LABELED.match(column)
    if m:
        return m.group(2)
    return column if column in WIDTHS or column in TEXT_KINDS else "other"


def write_table(ws, header: list[str], rows: list[dict], cached: dict, *, text_limits: dict[str, int] | None = None,
                keep_formulas: set[str] = frozenset(), inputs: set[str] = frozenset()) -> None:
    """Header + rows: bold tinted header, borders, wrapped text, widths and row heights that fit the content
    (up to a cap), an autofilter, and print setup (landscape, fit to width, header repeated on every page).

    Generated text that starts with '=' stays text; values in `keep_formulas` columns (typed by a reviewer) stay
    formulas. A Formula value is written with its current value (into `cached`). `inputs` columns are tinted.
    """
    ws.append(header)
    for cell in ws[1]:
        cell.font, cell.fill, cell.border = HEADER_FONT, HEADER_FILL, BORDER
        cell.alignment = Alignment(wrap_text=True, vertical="top")
    shown = []  # what each cell shows: the text as cut, a formula's value
    for row in rows:
        shown.append({h: v if isinstance(v, Formula) else cell_text(v, (text_limits or {}).get(h, EXCEL_CELL_LIMIT))
                      for h in header for v in [row.get(h)]})
        ws.append([v.text if isinstance(v, Formula) else v for v in shown[-1].values()])
        for cell, h in zip(ws[ws.max_row], header):
            v = shown[-1][h]
            if isinstance(v, Formula):
                cached[(ws.title, cell.coordinate)] = v.value
            elif isinstance(cell.value, str) and cell.value.startswith("=") and h not in keep_formulas:
                cell.data_type = "s"
            kind = kind_of(h)
            cell.font = ID_FONT if h == "example_id" else FONT
            cell.border = BORDER
            cell.alignment = Alignment(wrap_text=kind in TEXT_KINDS or kind == "other", vertical="top")
            if h in inputs:
                cell.fill = INPUT_FILL
    widths = {}
    for j, h in enumerate(header, 1):
        low, high = WIDTHS.get(kind_of(h), (8, 24))
        longest = max([len(part) for r in shown for part in display(r[h]).split("\n")] + [len(w) for w in h.split()])
        widths[h] = max(low, min(high, longest + 2))
        ws.column_dimensions[get_column_letter(j)].width = widths[h]
    fit_row_heights(ws, header, shown, widths, MAX_ROW_HEIGHT)
    ws.auto_filter.ref = f"A1:{get_column_letter(len(header))}{max(ws.max_row, 2)}"
    set_print(ws)


def display(value: Any) -> str:
    if isinstance(value, Formula):
        value = value.value
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_lines(text: str, width: float) -> int:
    """Lines a wrapped cell needs: `text_lines("a" * 30, 10)` -> 3 (13 characters a line at 1.35 per width unit)."""
    per_line = max(1, int(width * CHARS_PER_UNIT))
    return sum(max(1, math.ceil(len(part) / per_line)) for part in text.split("\n"))


def fit_row_heights(ws, header: list[str], rows: list[dict], widths: dict[str, float], cap: float) -> None:
    """Rows as tall as their longest wrapped cell, up to `cap` points (a longer text scrolls inside its cell).
    A formula's height is its value's, not its text's."""
    grid = [{h: h for h in header}, *rows]
    for r, row in enumerate(grid, 1):
        lines = max([text_lines(display(row.get(h)), widths[h]) for h in header] or [1])
        ws.row_dimensions[r].height = min(cap, lines * LINE_PT + 4)


def set_print(ws, *, one_page: bool = False, landscape: bool = True) -> None:
    """Landscape, fit to the page width (and to one page with `one_page`), header row on every page."""
    ws.page_setup.orientation = "landscape" if landscape else "portrait"
    ws.sheet_properties.pageSetUpPr.fitToPage = True
    ws.page_setup.fitToWidth = 1
    ws.page_setup.fitToHeight = 1 if one_page else 0  # 0: as many pages tall as needed
    if not one_page and ws.max_row > 1:
        ws.print_title_rows = "1:1"
    ws.page_margins = PageMargins(left=0.4, right=0.4, top=0.6, bottom=0.6, header=0.3, footer=0.3)
    ws.oddHeader.left.text = "&F"
    ws.oddHeader.right.text = "&A"
    ws.oddFooter.center.text = "page &P of &N"


def add_list_rule(ws, header: list[str], columns: list[str], choices: tuple, title: str, help_text: str) -> None:
    """A dropdown of `choices` in every row of `columns`; anything else is refused."""
    cols = [get_column_letter(header.index(c) + 1) for c in columns if c in header]
    if not cols:
        return
    last = max(ws.max_row, 2)
    rule = DataValidation(type="list", formula1='"' + ",".join(map(str, choices)) + '"', allow_blank=True,
                          showErrorMessage=True, errorTitle=title, error=f"Pick one of {', '.join(map(str, choices))}.",
                          showInputMessage=True, promptTitle=title, prompt=help_text)
    for col in cols:
        rule.add(f"{col}2:{col}{last}")
    ws.add_data_validation(rule)


# ---------------------------------------------------------------------------------------------
# Sheets
# ---------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Where everything goes: the examples in order, each one's outputs and labels, and the Key's rows."""

    examples: list[dict]
    systems: list[str]
    outputs: dict[str, dict[str, str]]  # example_id -> system -> output (as the cell will hold it)
    labels: dict[str, dict[str, str]]  # example_id -> system -> Review label
    pair: tuple[str, str] | None
    pair_labels: dict[str, dict[str, str]]  # example_id -> system -> "A"/"B"
    key_rows: list[dict] = field(default_factory=list)


def plan_book(records: list[dict], examples: list[dict], systems: list[str], options: BookOptions) -> Plan:
    outputs: dict[str, dict[str, str]] = {e["example_id"]: {} for e in examples}
    for rec in records:
        outputs[rec["example_id"]][rec["system"]] = cell_text(rec["prediction"])
    labels = {eid: blind_labels([s for s in systems if s in outs], eid, options.seed) for eid, outs in outputs.items()}
    pair = options.pairwise
    pairs = {eid: pair_labels(pair, eid, options.seed) for eid, outs in outputs.items()
             if pair and all(s in outs for s in pair)} if pair else {}
    return Plan(examples, systems, outputs, labels, pair, pairs)


def slots_of(plan: Plan) -> dict[tuple, dict[str, Any]]:
    """Every place a judgment can be typed in the new book: {key: outputs shown beside it}."""
    slots: dict[tuple, dict[str, Any]] = {}
    for e in plan.examples:
        eid = e["example_id"]
        slots[(REVIEW, eid, ())] = {}
        for system, text in plan.outputs[eid].items():
            slots[(REVIEW, eid, (system,))] = {system: text}
            slots[(SCORES, eid, (system,))] = {}
        if eid in plan.pair_labels:
            slots[(PAIRWISE, eid, tuple(sorted(plan.pair)))] = {s: plan.outputs[eid][s] for s in plan.pair}
    return slots


def added_columns(sheet: str, found: Judgments, placed: dict, fixed: tuple) -> list[str]:
    """Columns a reviewer added to `sheet`, plus those that judgments coming back from 'Kept ratings' need."""
    out = list(found.added_columns.get(sheet, []))
    for j in placed.values():
        if j.sheet == sheet:
            out += [c for c in j.values if c not in out and c not in fixed and (sheet != REVIEW or not j.systems)]
    return out


def write_review(ws, plan: Plan, placed: dict, kept_keys: set, added: list[str], cached: dict,
                 options: BookOptions) -> None:
    n_labels = max([len(v) for v in plan.labels.values()] or [0])
    labels = [label_name(i) for i in range(n_labels)]
    per_label = [f"{L} {part}" for L in labels for part in ("output", "rating", "comment")]
    rows, notes = [], False
    for e in plan.examples:
        eid = e["example_id"]
        row: dict[str, Any] = {"#": e["position"] + 1, "example_id": eid, "reviews": e["input"],
                               "reference": e["reference"]}
        note = []
        for system, label in sorted(plan.labels[eid].items(), key=lambda kv: kv[1]):
            row[f"{label} output"] = plan.outputs[eid][system]
            j = placed.get((REVIEW, eid, (system,)))
            if j:
                row[f"{label} rating"], row[f"{label} comment"] = j.values.get("rating"), j.values.get("comment")
            if (REVIEW, eid, (system,)) in kept_keys:
                note.append(f"{label}: another rating of this output is in '{KEPT}'")
        if (PAIRWISE, eid, tuple(sorted(plan.pair or ()))) in kept_keys:
            note.append(f"another pairwise choice is in '{KEPT}'")
        if note:
            row["note"], notes = "; ".join(note), True
        j = placed.get((REVIEW, eid, ()))
        if j:
            row.update(j.values)
        rows.append(row)
    header = [*REVIEW_FIXED, *per_label, *(["note"] if notes else []), "example_id", *added]
    inputs = {h for h in per_label if not h.endswith("output")} | set(added)
    write_table(ws, header, rows, cached, text_limits={"reviews": options.review_chars}, keep_formulas=inputs,
                inputs=inputs)
    add_list_rule(ws, header, [f"{L} rating" for L in labels], RATINGS, "Rating",
                  "1 (poor) to 5 (excellent): how well the output summarizes the reviews")
    ws.freeze_panes = "C2"  # the header row, '#' and the reviews stay in view while scrolling through outputs


def write_pairwise(ws, plan: Plan, placed: dict, kept_keys: set, added: list[str], cached: dict,
                   options: BookOptions) -> None:
    key_systems = tuple(sorted(plan.pair))
    rows = []
    for e in plan.examples:
        eid = e["example_id"]
        if eid not in plan.pair_labels:
            continue
        by_label = {label: system for system, label in plan.pair_labels[eid].items()}
        row: dict[str, Any] = {"#": e["position"] + 1, "example_id": eid, "reviews": e["input"],
                               "reference": e["reference"], "A output": plan.outputs[eid][by_label["A"]],
                               "B output": plan.outputs[eid][by_label["B"]]}
        j = placed.get((PAIRWISE, eid, key_systems))
        if j:
            row.update(j.values)
            choice = j.values.get("choice")
            row["choice"] = plan.pair_labels[eid].get(choice, choice)  # the system's letter here, "tie" or as typed
        if (PAIRWISE, eid, key_systems) in kept_keys:
            row["note"] = f"another choice of this pair is in '{KEPT}'"
        rows.append(row)
    header = [c for c in PAIRWISE_COLUMNS if c != "note" or any("note" in r for r in rows)] + added
    inputs = {"choice", "comment", *added}
    write_table(ws, header, rows, cached, text_limits={"reviews": options.review_chars}, keep_formulas=inputs,
                inputs=inputs)
    add_list_rule(ws, header, ["choice"], ("A", "B", TIE), "Better output",
                  "A or B: the better meta-review of these reviews; tie if neither is")
    ws.freeze_panes = "C2"


def write_key(ws, plan: Plan, placed: dict, run_info: dict, review_header: list[str], pairwise_header: list[str],
              cached: dict) -> None:
    """(sheet, example, label) -> system, and a `score` formula that reads the judgment through the label: the
    rating, or 1 / 0.5 / 0 for a pairwise win / tie / loss. Summary and Scores count these, so they stay live."""
    n_review = len(plan.examples)
    n_pair = len(plan.pair_labels)

    def col(header, name, sheet, n):
        c = get_column_letter(header.index(name) + 1)
        return f"{quote_sheetname(sheet)}!${c}$2:${c}${n + 1}"

    eid_ref, label_ref = (f"${get_column_letter(KEY_COLUMNS.index(c) + 1)}{{r}}" for c in ("example_id", "label"))

    models = {s: run_info["systems"][s].get("model") for s in plan.systems}
    rows = []
    for e in plan.examples:
        eid = e["example_id"]
        for system in plan.systems:
            if system not in plan.labels[eid]:
                continue
            label = plan.labels[eid][system]
            j = placed.get((REVIEW, eid, (system,)))
            rating = j.values.get("rating") if j else None
            ratings = col(review_header, f"{label} rating", REVIEW, n_review)
            m = f"MATCH({eid_ref},{col(review_header, 'example_id', REVIEW, n_review)},0)"
            text = f'=IFERROR(IF(ISNUMBER(INDEX({ratings},{m})),INDEX({ratings},{m}),""),"")'
            rows.append({"sheet": REVIEW, "example_no": e["position"] + 1, "example_id": eid, "label": label,
                         "system": system, "score": (text, rating if is_number(rating) else ""),
                         "model": models[system]})
    for e in plan.examples:
        eid = e["example_id"]
        if eid not in plan.pair_labels:
            continue
        j = placed.get((PAIRWISE, eid, tuple(sorted(plan.pair))))
        for system in plan.pair:
            label = plan.pair_labels[eid][system]
            c = (f"INDEX({col(pairwise_header, 'choice', PAIRWISE, n_pair)},"
                 f"MATCH({eid_ref},{col(pairwise_header, 'example_id', PAIRWISE, n_pair)},0))")
            text = f'=IFERROR(IF({c}={label_ref},1,IF({c}="{TIE}",0.5,IF(OR({c}="A",{c}="B"),0,""))),"")'
            rows.append({"sheet": PAIRWISE, "example_no": e["position"] + 1, "example_id": eid, "label": label,
                         "system": system, "score": (text, pair_score(j, system) if j else ""), "model": models[system]})
    for r, row in enumerate(rows, 2):
        text, value = row["score"]
        row["score"] = Formula(text.replace("{r}", str(r)), value)
    plan.key_rows = rows
    write_table(ws, list(KEY_COLUMNS), rows, cached)
    ws.freeze_panes = "A2"
    ws.sheet_state = "hidden"
    ws.protection.sheet = True  # against slips, not a secret: Format > Sheet > Unhide / Unprotect shows it


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))


def pair_score(j: Judgment, system: str) -> float | str:
    """1 if `system` was chosen, 0.5 for a tie, 0 if the other one was, "" if no choice was made."""
    choice = j.values.get("choice")
    if choice == system:
        return 1
    if choice == TIE:
        return 0.5
    return 0 if choice in j.systems else ""


def key_range(plan: Plan, column: str) -> str:
    c = get_column_letter(KEY_COLUMNS.index(column) + 1)
    return f"{quote_sheetname(KEY)}!${c}$2:${c}${len(plan.key_rows) + 1}"


def write_summary(ws, plan: Plan, summary: dict, run_info: dict, human: dict, cached: dict) -> None:
    """One row per system (scores, live mean rating and win rate), then the ROUGE chart on the same page."""
    metrics = metrics_of(summary)
    sheet, system_col, score = key_range(plan, "sheet"), key_range(plan, "system"), key_range(plan, "score")
    header = ["system", "model", "n", *metrics, "n_rated", "mean_rating"]
    if plan.pair:
        header += ["n_pairs", "win_rate"]
    rows = []
    for r, (system, s) in enumerate(summary.items(), 2):
        row = {"system": system, "model": run_info["systems"][system].get("model"), "n": s["n"],
               **{m: round(s[m]["mean"], 4) for m in metrics if m in s}}
        for kind, n_col, mean_col in ((REVIEW, "n_rated", "mean_rating"), (PAIRWISE, "n_pairs", "win_rate")):
            if kind == PAIRWISE and system not in (plan.pair or ()):
                continue
            stats = human[system]["rating" if kind == REVIEW else "win_rate"]
            n_ref = f"${get_column_letter(header.index(n_col) + 1)}{r}"
            row[n_col] = Formula(f'=SUMPRODUCT(({sheet}="{kind}")*({system_col}=$A{r})*ISNUMBER({score}))',
                                 stats["n"] if stats else 0)
            row[mean_col] = Formula(f'=IF({n_ref}=0,"",SUMIFS({score},{sheet},"{kind}",{system_col},$A{r})/{n_ref})',
                                    stats["mean"] if stats else "")
        rows.append(row)
    write_table(ws, header, rows, cached)
    set_print(ws, one_page=True)
    ws.freeze_panes = "B2"
    below = len(rows) + 3
    decision = run_info.get("decision_consistency")
    if decision:  # evaluation.py --decision_classifier: the column's bounds, under the table
        column = header.index("decision_consistency") + 1 if "decision_consistency" in header else 4
        for k, (name, d) in enumerate((("ceiling (classifier on the reference meta-reviews)", decision["ceiling"]),
                                       (f"floor (majority class '{decision['floor']['class']}')", decision["floor"])),
                                      below):
            ws.cell(k, 1, f"decision_consistency {name}")
            ws.cell(k, header.index("n") + 1, decision["n_labelled"])
            ws.cell(k, column, round(d["mean"], 4))  # under the systems' column; the interval beside it
            ws.cell(k, column + 1, f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]")
        ws.cell(below + 2, 1, f"papers with a decision: {decision['n_labelled']}; without (left out): "
                              f"{decision['n_unlabelled']}; classifier {decision['classifier']}")
        below += 4

    chart = BarChart()
    chart.type = "col"
    chart.title = "ROUGE F1 (x100) per system"
    chart.y_axis.title = "F1 x 100"
    chart.x_axis.title = "system"
    rouge = [header.index(m) + 1 for m in metrics if m.startswith("rouge")]  # adjacent columns
    chart.add_data(Reference(ws, min_col=rouge[0], max_col=rouge[-1], min_row=1, max_row=1 + len(rows)),
                   titles_from_data=True)
    chart.set_categories(Reference(ws, min_col=1, min_row=2, max_row=1 + len(rows)))
    chart.width, chart.height = 18, 9  # cm: with the table, one landscape page
    ws.add_chart(chart, f"A{below}")


def metrics_of(summary: dict) -> list[str]:
    """The metrics (entries with a mean) of evaluation.summarize's result, in its order:
    {"large": {"n": 3, "rouge1": {"mean": 9.5, ...}}} -> ["rouge1"]."""
    out: list[str] = []
    for s in summary.values():
        out += [m for m, v in s.items() if isinstance(v, dict) and "mean" in v and m not in out]
    return out


def write_scores(ws, plan: Plan, records: list[dict], placed: dict, added: list[str], compute_perplexity: bool,
                 cached: dict) -> None:
    """The analysis table: one row per (example, system), every score, the live rating; no output text (that
    would let a reviewer find which label is which system: outputs are in predictions.jsonl)."""
    sheet, ex, system_col, score = (key_range(plan, c) for c in ("sheet", "example_id", "system", "score"))
    truncated = {e["example_id"]: e.get("prompt_truncated") for e in plan.examples}
    position = {e["example_id"]: e["position"] for e in plan.examples}
    header = [c for c in SCORES_FIXED if c != "perplexity" or compute_perplexity] + added
    rows = []
    for r, rec in enumerate(records, 2):
        eid, system = rec["example_id"], rec["system"]
        review = placed.get((REVIEW, eid, (system,)))
        rating = review.values.get("rating") if review else None
        where = f'{sheet},"{REVIEW}",{ex},$B{r},{system_col},$C{r}'
        row = {"example_no": position[eid] + 1, "example_id": eid, "system": system,
               "rating": Formula(f'=IF(SUMPRODUCT(({sheet}="{REVIEW}")*({ex}=$B{r})*({system_col}=$C{r})'
                                 f'*ISNUMBER({score}))=0,"",SUMIFS({score},{where}))',
                                 rating if is_number(rating) else ""),
               "prompt_truncated": truncated.get(eid)}
        for c in SCORE_COLUMNS:
            v = rec.get(c)
            row[c] = round(v, 4) if isinstance(v, float) else v
        j = placed.get((SCORES, eid, (system,)))
        if j:
            row.update(j.values)
        rows.append(row)
    write_table(ws, header, rows, cached, keep_formulas=set(added), inputs=set(added))
    ws.freeze_panes = "D2"


def write_intervals(ws, summary: dict, human: dict, run_info: dict, cached: dict) -> None:
    """A long table: percentile bootstrap intervals (at the run's confidence) of every score, and of the ratings and
    win rates as typed when the book was written (re-run evaluation.py to update them)."""
    rows = []
    methods = {"scores": f"paired bootstrap over the {run_info['n_examples']} examples",
               "human": f"bootstrap over the judged examples, as typed on {run_info['date'][:10]}"}
    for system, s in summary.items():
        for m in metrics_of(summary):
            if m in s:
                rows.append({"system": system, "metric": m, **{k: round(s[m][k], 4) for k in ("mean", "ci_low", "ci_high")},
                             "n": s["n"], "method": methods["scores"]})
        for m in ("rating", "win_rate"):
            stats = human.get(system, {}).get(m)
            if stats:
                rows.append({"system": system, "metric": m, **{k: round(stats[k], 4) for k in ("mean", "ci_low", "ci_high")},
                             "n": stats["n"], "method": methods["human"]})
    write_table(ws, ["system", "metric", "mean", "ci_low", "ci_high", "n", "method"], rows, cached)
    ws.freeze_panes = "A2"


def write_run(ws, run_info: dict, options: BookOptions, cached: dict) -> None:
    """Key/value rows: what was evaluated, how, and when; the blind labels' seed and the pairwise systems."""
    review = {"seed": options.seed, "labels": "per example, random.Random(f'{seed}:{example_id}').shuffle(systems)",
              "pairwise": " vs ".join(options.pairwise) if options.pairwise else None}
    rows = [{"key": k, "value": v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)}
            for k, v in flatten({**run_info, "review": review})]
    write_table(ws, ["key", "value"], rows, cached)
    ws.column_dimensions["A"].width, ws.column_dimensions["B"].width = 40, 90
    fit_row_heights(ws, ["key", "value"], rows, {"key": 40, "value": 90}, MAX_ROW_HEIGHT)
    set_print(ws, landscape=False)
    ws.freeze_panes = "A2"


def write_kept(ws, kept: list[Judgment], cached: dict) -> None:
    added = []
    for j in kept:
        added += [c for c in j.values if c not in KEPT_FIXED and c not in added]
    rows = []
    for j in kept:
        systems = list(j.systems) + [None, None]
        rows.append({"sheet": j.sheet, "example_id": j.example_id, "system": systems[0], "other_system": systems[1],
                     **j.values, "reason": j.reason, "output": j.outputs.get(systems[0]),
                     "other_output": j.outputs.get(systems[1])})
    header = [*KEPT_FIXED, *added, *KEPT_TAIL]
    inputs = {"rating", "choice", "comment", *added}
    write_table(ws, header, rows, cached, keep_formulas=inputs, inputs=inputs)
    add_list_rule(ws, header, ["rating"], RATINGS, "Rating", "1 (poor) to 5 (excellent)")
    ws.freeze_panes = "D2"


def flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """`flatten({"a": {"b": 1}, "c": 2})` -> [('a.b', 1), ('c', 2)]."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


# ---------------------------------------------------------------------------------------------
# Human judgments in numbers
# ---------------------------------------------------------------------------------------------
def bootstrap_mean(values: list[float], samples: int, confidence: float, seed: int) -> dict[str, float] | None:
    """{mean, ci_low, ci_high, n}: percentile bootstrap of the mean (None for no values)."""
    import numpy as np

    if not values:
        return None
    x = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))  # (S, N)
    boot = x[idx].mean(-1)
    lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    return {"mean": float(x.mean()), "ci_low": float(np.percentile(boot, lo)), "ci_high": float(np.percentile(boot, hi)),
            "n": len(x)}


def summarize_judgments(placed: dict, systems: list[str], pair: tuple[str, str] | None,
                        options: BookOptions) -> dict[str, dict[str, Any]]:
    """{system: {"rating": mean rating with interval, "win_rate": share of pairwise wins (ties count half)}}.

    These are what the Summary's formulas show when the book is written (the judgments in the Review and Pairwise
    sheets, not those kept aside)."""
    out = {}
    for system in systems:
        ratings = [j.values["rating"] for j in placed.values()
                   if j.sheet == REVIEW and j.systems == (system,) and is_number(j.values.get("rating"))]
        wins = []
        if pair and system in pair:
            wins = [s for j in placed.values() if j.sheet == PAIRWISE and j.systems == tuple(sorted(pair))
                    for s in [pair_score(j, system)] if s != ""]
        out[system] = {"rating": bootstrap_mean(ratings, options.bootstrap_samples, options.confidence, options.seed),
                       "win_rate": bootstrap_mean(wins, options.bootstrap_samples, options.confidence, options.seed)}
    return out


# ---------------------------------------------------------------------------------------------
# Writing the file
# ---------------------------------------------------------------------------------------------
def build_workbook(records: list[dict], examples: list[dict], summary: dict, run_info: dict, found: Judgments,
                   options: BookOptions) -> tuple[Workbook, dict, Judgments, dict]:
    """The whole book in memory; returns (workbook, cached formula values, judgments it holds, human summary)."""
    systems = [s for s in run_info["systems"] if any(r["system"] == s for r in records)] or list(run_info["systems"])
    plan = plan_book(records, examples, systems, options)
    placed, kept = carry(slots_of(plan), found, run_info["date"])
    kept_keys = {j.key for j in kept}
    human = summarize_judgments(placed, systems, plan.pair, options)
    cached: dict[tuple[str, str], Any] = {}

    wb = Workbook()
    review = wb.active
    review.title = REVIEW
    review_added = added_columns(REVIEW, found, placed, ())
    write_review(review, plan, placed, kept_keys, review_added, cached, options)
    review_header = [c.value for c in review[1]]
    pairwise_header = list(PAIRWISE_COLUMNS)
    if plan.pair:
        ws = wb.create_sheet(PAIRWISE)
        write_pairwise(ws, plan, placed, kept_keys, added_columns(PAIRWISE, found, placed, PAIRWISE_COLUMNS), cached,
                       options)
        pairwise_header = [c.value for c in ws[1]]
    summary_ws, scores_ws = wb.create_sheet(SUMMARY), wb.create_sheet(SCORES)
    write_intervals(wb.create_sheet(INTERVALS), summary, human, run_info, cached)
    write_run(wb.create_sheet(RUN), run_info, options, cached)
    if kept:
        write_kept(wb.create_sheet(KEPT), kept, cached)
    for name, grid in found.added_sheets.items():
        extra = wb.create_sheet(name)
        for r in grid:
            extra.append([cell_text(v) for v in r])
    write_key(wb.create_sheet(KEY), plan, placed, run_info, review_header, pairwise_header, cached)
    write_summary(summary_ws, plan, summary, run_info, human, cached)
    write_scores(scores_ws, plan, records, placed, added_columns(SCORES, found, placed, SCORES_FIXED),
                 run_info.get("compute_perplexity", True), cached)
    wb.active = 0
    judgments = Judgments(current=placed, kept=kept)
    return wb, (cached if options.cached_values else {}), judgments, human


def add_cached_values(data: bytes, cached: dict[tuple[str, str], Any]) -> bytes:
    """Store each formula's current value beside it: openpyxl writes formulas with an empty <v/>, which tools
    without a formula engine (pandas, openpyxl data_only) read as empty.

    `cached` maps (sheet title, "B2") to a number, text, bool or "" (blank).
    """
    by_sheet: dict[str, dict[str, Any]] = {}
    for (sheet, coord), value in cached.items():
        by_sheet.setdefault(sheet, {})[coord] = value
    src = zipfile.ZipFile(io.BytesIO(data))
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
          "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
          "p": "http://schemas.openxmlformats.org/package/2006/relationships"}
    targets = {rel.get("Id"): rel.get("Target").lstrip("/")
               for rel in ET.fromstring(src.read("xl/_rels/workbook.xml.rels")).findall("p:Relationship", ns)}
    parts = {}
    for sheet in ET.fromstring(src.read("xl/workbook.xml")).find("m:sheets", ns):
        target = targets[sheet.get(f"{{{ns['r']}}}id")]
        parts[target if target.startswith("xl/") else f"xl/{target}"] = by_sheet.get(sheet.get("name"), {})
    cell = re.compile(rb'<c r="([A-Z]+[0-9]+)"([^>]*)><f>(.*?)</f><v\s*/></c>', re.S)

    def with_value(values: dict[str, Any]):
        def sub(m: re.Match) -> bytes:
            coord = m.group(1).decode()
            if coord not in values:
                return m.group(0)
            v = values[coord]
            if isinstance(v, bool):
                t, text = ' t="b"', str(int(v))
            elif is_number(v):
                t, text = "", repr(float(v)) if isinstance(v, float) else str(v)
            else:
                t, text = ' t="str"', "" if v is None else str(v)
            text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            return b'<c r="%s"%s%s><f>%s</f><v>%s</v></c>' % (m.group(1), m.group(2), t.encode(), m.group(3),
                                                               text.encode())
        return sub

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            member = src.read(info.filename)
            if parts.get(info.filename):
                member = cell.sub(with_value(parts[info.filename]), member)
            dst.writestr(info, member)
    return out.getvalue()


def write_xlsx(wb: Workbook, f, cached: dict) -> None:
    """Serialize `wb` with its formulas' values into the open binary file `f`."""
    buffer = io.BytesIO()
    wb.save(buffer)
    f.write(add_cached_values(buffer.getvalue(), cached) if cached else buffer.getvalue())


def save_atomically(wb: Workbook, cached: dict, path: Path, expected: tuple[int, int] | None) -> bool:
    """Write to a temporary file beside `path`, fsync, then os.replace: a crash leaves the old file whole.

    Returns False (replacing nothing) if `path` changed since it was read (`expected` signature), so the caller
    can re-read what was typed meanwhile.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp makes the file private; give it the old file's mode, or the usual one for a new file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write_xlsx(wb, f, cached)
            f.flush()
            os.fsync(f.fileno())
        locks = lock_files(path)
        if locks:
            raise UsageError(f"workbook {path} was opened in another program during the run (lock file "
                             f"{locks[0].name}); it was left untouched: close it and re-run")
        if file_signature(path) != expected:
            tmp.unlink()
            return False
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return True


def write_workbook(path: Path, records: list[dict], examples: list[dict], summary: dict, run_info: dict,
                   options: BookOptions) -> WrittenBook:
    """Read what people typed into the book at `path`, build the new book around it, replace the old one atomically.

    records: one per (example, system) with example_id, system, prediction and the scores (SCORE_COLUMNS);
    examples: example_id, position (0-based), input (the reviews), reference, prompt_truncated;
    summary: evaluation.summarize's {system: {metric: {mean, ci_low, ci_high}, "n": n}};
    run_info: the Run sheet's content; needs date, systems ({system: {"model": description}}), confidence,
    bootstrap_samples, n_examples. If the file changes while the book is rebuilt, it is read again.
    """
    path = Path(path)
    # Half-written copies left by a run killed mid-save (save_atomically's names) hold nothing to keep.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    for _ in range(5):
        found = read_judgments(path)
        wb, cached, judgments, human = build_workbook(records, examples, summary, run_info, found, options)
        try:
            if save_atomically(wb, cached, path, found.signature):
                return WrittenBook(judgments, human)
        except OSError as err:
            raise UsageError(f"cannot write workbook {path}: {err.strerror or first_line(err)}; "
                             "the previous workbook is untouched") from None
        logger.info("%s changed while it was being rebuilt; reading it again", path)
    raise UsageError(f"workbook {path} keeps changing; close the program writing it and re-run")


# ---------------------------------------------------------------------------------------------
# ratings.jsonl: every judgment, readable without openpyxl
# ---------------------------------------------------------------------------------------------
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
                "winner": winner, "loser": loser, "comment": j.values.get("comment"), "outputs": dict(sorted(j.outputs.items())),
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


@dataclass
class ExportArguments:
    workbook: str = field(metadata={"help": "A workbook written by evaluation.py (eval_examples.xlsx)."})
    output: str | None = field(default=None, metadata={"help": "The JSONL file. Default: ratings.jsonl beside the book."})


def main(args: ExportArguments) -> int:
    """Export a book's judgments to JSONL; returns the number of judgments."""
    setup_logging()
    path = Path(args.workbook)
    if not path.is_file():
        raise UsageError(f"--workbook {path} does not exist; pass the eval_examples.xlsx written by evaluation.py")
    out = Path(args.output) if args.output else path.with_name("ratings.jsonl")
    n = export_judgments(read_judgments(path), out)
    logger.info("wrote %d judgments of %s to %s", n, path, out)
    return n


if __name__ == "__main__":
    run_cli(main, (ExportArguments,), __doc__)
