"""Writing the blind review workbook: the Review, Pairwise, Summary, Scores, Intervals, Run, Kept and Key sheets."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from xlsxwriter import Workbook
from xlsxwriter.exceptions import XlsxWriterException
from xlsxwriter.format import Format
from xlsxwriter.utility import quote_sheetname, xl_col_to_name, xl_range
from xlsxwriter.worksheet import Worksheet

from proxytune.foundation.errors import UsageError, first_line
from proxytune.workbook.judgments import Judgment, Judgments, file_signature, is_empty, lock_files, read_judgments
from proxytune.workbook.sheets import (
    BORDER,
    CHARS_PER_UNIT,
    EXCEL_CELL_LIMIT,
    FONT,
    HEADER_FILL,
    HEADER_FONT,
    ID_FONT,
    INPUT_FILL,
    INTERVALS,
    KEPT,
    KEPT_FIXED,
    KEPT_TAIL,
    KEY,
    KEY_COLUMNS,
    LABELED,
    LINE_PT,
    MAX_ROW_HEIGHT,
    PAIRWISE,
    PAIRWISE_COLUMNS,
    RATINGS,
    REVIEW,
    REVIEW_FIXED,
    RUN,
    SCORE_COLUMNS,
    SCORES,
    SCORES_FIXED,
    SUMMARY,
    TEXT_KINDS,
    TIE,
    WIDTHS,
)

logger = logging.getLogger(__name__)


@dataclass
class BookOptions:
    review_chars: int = 2000  # reviews are cut to this many characters
    seed: int = 0  # of the blind labels and of the bootstrap of ratings and win rates
    pairwise: tuple[str, str] | None = None  # the two systems of the Pairwise sheet
    bootstrap_samples: int = 1000
    confidence: float = 0.95


@dataclass
class WrittenBook:
    judgments: Judgments  # as the new book holds them
    human: dict[str, dict[str, Any]]  # system -> {"rating": interval, "win_rate": interval} (None where none)


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


@dataclass
class Formula:
    """A formula and the value it has now: both are written, so that tools without a formula engine (pandas,
    openpyxl's data_only) read the value; "" is a blank."""

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


def write_cell(ws: Worksheet, row: int, col: int, value: Any, fmt: Format | None = None,
               formulas: bool = False) -> None:
    """One value as Excel holds it: a Formula with its value; text as text, unless `formulas` lets text that starts
    with '=' (typed by a reviewer) stay a formula, computed when the book is opened; numbers, booleans and dates as
    such; an empty cell still gets `fmt` (its border and tint)."""
    if isinstance(value, Formula):
        ws.write_formula(row, col, value.text, fmt, value.value)
    elif isinstance(value, str) and formulas and value.startswith("=") and len(value) > 1:
        ws.write_formula(row, col, value, fmt, "")
    elif isinstance(value, str):
        ws.write_string(row, col, value, fmt)
    else:
        ws.write(row, col, value, fmt)


def write_table(wb: Workbook, ws: Worksheet, header: list[str], rows: list[dict], *,
                text_limits: dict[str, int] | None = None, keep_formulas: set[str] = frozenset(),
                inputs: set[str] = frozenset()) -> None:
    """Header + rows: bold tinted header, borders, wrapped text, widths and row heights that fit the content
    (up to a cap), an autofilter, and print setup (landscape, fit to width, header repeated on every page).

    Generated text that starts with '=' stays text; values in `keep_formulas` columns (typed by a reviewer) stay
    formulas. A Formula value is written with its current value. `inputs` columns are tinted.
    """
    head = wb.add_format({**HEADER_FONT, **HEADER_FILL, **BORDER, "text_wrap": True, "valign": "top"})
    for j, h in enumerate(header):
        ws.write_string(0, j, h, head)
    shown = [{h: v if isinstance(v, Formula) else cell_text(v, (text_limits or {}).get(h, EXCEL_CELL_LIMIT))
              for h in header for v in [row.get(h)]} for row in rows]  # what each cell shows: the text as cut
    widths = {}
    for j, h in enumerate(header):
        kind = kind_of(h)
        font, fill = ID_FONT if h == "example_id" else FONT, INPUT_FILL if h in inputs else {}
        fmt = wb.add_format({**font, **BORDER, **fill, "text_wrap": kind in TEXT_KINDS or kind == "other",
                             "valign": "top"})
        for r, row in enumerate(shown, 1):
            write_cell(ws, r, j, row[h], fmt, formulas=h in keep_formulas)
        low, high = WIDTHS.get(kind, (8, 24))
        longest = max([len(part) for r in shown for part in display(r[h]).split("\n")] + [len(w) for w in h.split()])
        widths[h] = max(low, min(high, longest + 2))
        set_width(ws, j, widths[h])
    fit_row_heights(ws, header, shown, widths, MAX_ROW_HEIGHT)
    ws.autofilter(0, 0, max(len(rows), 1), len(header) - 1)
    set_print(ws, len(rows))


def set_width(ws: Worksheet, col: int, width: float) -> None:
    """Column `col` `width` characters wide as the file stores it (7 pixels a character), the width the row heights
    are fitted to; XlsxWriter's set_column(width) would add Excel's 5 pixels of cell padding."""
    ws.set_column_pixels(col, col, round(width * 7))


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


def fit_row_heights(ws: Worksheet, header: list[str], rows: list[dict], widths: dict[str, float], cap: float) -> None:
    """Rows as tall as their longest wrapped cell, up to `cap` points (a longer text scrolls inside its cell).
    A formula's height is its value's, not its text's."""
    grid = [{h: h for h in header}, *rows]
    for r, row in enumerate(grid):
        lines = max([text_lines(display(row.get(h)), widths[h]) for h in header] or [1])
        ws.set_row(r, min(cap, lines * LINE_PT + 4))


def set_print(ws: Worksheet, rows: int, *, one_page: bool = False, landscape: bool = True) -> None:
    """Landscape, fit to the page width (and to one page with `one_page`), header row on every page of a sheet of
    `rows` rows below it; the file and sheet names (&F, &A) at the top of each page, its number at the bottom."""
    if landscape:
        ws.set_landscape()
    else:
        ws.set_portrait()
    ws.fit_to_pages(1, 1 if one_page else 0)  # 0: as many pages tall as needed
    if not one_page and rows:
        ws.repeat_rows(0)
    ws.set_margins(left=0.4, right=0.4, top=0.6, bottom=0.6)
    ws.set_header("&L&F&R&A", {"margin": 0.3})
    ws.set_footer("&Cpage &P of &N", {"margin": 0.3})


def add_list_rule(ws: Worksheet, header: list[str], rows: int, columns: list[str], choices: tuple, title: str,
                  help_text: str) -> None:
    """A dropdown of `choices` in each of the `rows` rows of `columns` (one rule over them all); anything else is
    refused."""
    cols = [header.index(c) for c in columns if c in header]
    if not cols:
        return
    last = max(rows, 1)
    ws.data_validation(1, cols[0], last, cols[0], {
        "validate": "list", "source": list(choices), "multi_range": " ".join(xl_range(1, c, last, c) for c in cols),
        "error_title": title, "error_message": f"Pick one of {', '.join(map(str, choices))}.",
        "input_title": title, "input_message": help_text})


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


def write_review(wb: Workbook, ws: Worksheet, plan: Plan, placed: dict, kept_keys: set, added: list[str],
                 options: BookOptions) -> list[str]:
    """One row per example: its reviews, reference and each system's output under its blind label; returns the
    header."""
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
    write_table(wb, ws, header, rows, text_limits={"reviews": options.review_chars}, keep_formulas=inputs,
                inputs=inputs)
    add_list_rule(ws, header, len(rows), [f"{L} rating" for L in labels], RATINGS, "Rating",
                  "1 (poor) to 5 (excellent): how well the output summarizes the reviews")
    ws.freeze_panes("C2")  # the header row, '#' and the reviews stay in view while scrolling through outputs
    return header


def write_pairwise(wb: Workbook, ws: Worksheet, plan: Plan, placed: dict, kept_keys: set, added: list[str],
                   options: BookOptions) -> list[str]:
    """One row per example with both systems of the pair: their outputs as A and B (a coin flip each); returns the
    header."""
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
    write_table(wb, ws, header, rows, text_limits={"reviews": options.review_chars}, keep_formulas=inputs,
                inputs=inputs)
    add_list_rule(ws, header, len(rows), ["choice"], ("A", "B", TIE), "Better output",
                  "A or B: the better meta-review of these reviews; tie if neither is")
    ws.freeze_panes("C2")
    return header


def write_key(wb: Workbook, ws: Worksheet, plan: Plan, placed: dict, run_info: dict, review_header: list[str],
              pairwise_header: list[str]) -> None:
    """(sheet, example, label) -> system, and a `score` formula that reads the judgment through the label: the
    rating, or 1 / 0.5 / 0 for a pairwise win / tie / loss. Summary and Scores count these, so they stay live."""
    n_review = len(plan.examples)
    n_pair = len(plan.pair_labels)

    def col(header, name, sheet, n):
        c = xl_col_to_name(header.index(name))
        return f"{quote_sheetname(sheet)}!${c}$2:${c}${n + 1}"

    eid_ref, label_ref = (f"${xl_col_to_name(KEY_COLUMNS.index(c))}{{r}}" for c in ("example_id", "label"))

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
                         "system": system, "score": (text, pair_score(j, system) if j else ""),
                         "model": models[system]})
    for r, row in enumerate(rows, 2):
        text, value = row["score"]
        row["score"] = Formula(text.replace("{r}", str(r)), value)
    plan.key_rows = rows
    write_table(wb, ws, list(KEY_COLUMNS), rows)
    ws.freeze_panes("A2")
    ws.hide()
    ws.protect()  # against slips, not a secret: Format > Sheet > Unhide / Unprotect shows it


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
    c = xl_col_to_name(KEY_COLUMNS.index(column))
    return f"{quote_sheetname(KEY)}!${c}$2:${c}${len(plan.key_rows) + 1}"


def write_summary(wb: Workbook, ws: Worksheet, plan: Plan, summary: dict, run_info: dict, human: dict) -> None:
    """One row per system (scores, live mean rating and win rate), then the ROUGE chart (if any) on the same page."""
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
            n_ref = f"${xl_col_to_name(header.index(n_col))}{r}"
            row[n_col] = Formula(f'=SUMPRODUCT(({sheet}="{kind}")*({system_col}=$A{r})*ISNUMBER({score}))',
                                 stats["n"] if stats else 0)
            row[mean_col] = Formula(f'=IF({n_ref}=0,"",SUMIFS({score},{sheet},"{kind}",{system_col},$A{r})/{n_ref})',
                                    stats["mean"] if stats else "")
        rows.append(row)
    write_table(wb, ws, header, rows)
    set_print(ws, len(rows), one_page=True)
    ws.freeze_panes("B2")
    below = len(rows) + 2  # (0-based) a blank row under the table
    decision = run_info.get("decision_consistency")
    if decision:  # evaluation.py --decision_classifier: the column's bounds, under the table
        column = header.index("decision_consistency") if "decision_consistency" in header else 3
        for k, (name, d) in enumerate((("ceiling (classifier on the reference meta-reviews)", decision["ceiling"]),
                                       (f"floor (majority class '{decision['floor']['class']}')", decision["floor"])),
                                      below):
            write_cell(ws, k, 0, f"decision_consistency {name}")
            write_cell(ws, k, header.index("n"), decision["n_labelled"])
            write_cell(ws, k, column, round(d["mean"], 4))  # under the systems' column; the interval beside it
            write_cell(ws, k, column + 1, f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]")
        write_cell(ws, below + 2, 0, f"papers with a decision: {decision['n_labelled']}; without (left out): "
                                     f"{decision['n_unlabelled']}; classifier {decision['classifier']}")
        below += 4

    rouge = [header.index(m) for m in metrics if m.startswith("rouge")]
    if not rouge:  # evaluation.py --text_dataset: continuations without references have no ROUGE to chart
        return
    chart = wb.add_chart({"type": "column"})
    for c in rouge:
        chart.add_series({"name": [ws.name, 0, c], "categories": [ws.name, 1, 0, len(rows), 0],
                          "values": [ws.name, 1, c, len(rows), c]})
    chart.set_title({"name": "ROUGE F1 (x100) per system"})
    chart.set_y_axis({"name": "F1 x 100"})
    chart.set_x_axis({"name": "system"})
    chart.set_size({"width": 680, "height": 340})  # 18 x 9 cm: with the table, one landscape page
    ws.insert_chart(below, 0, chart)


def metrics_of(summary: dict) -> list[str]:
    """The metrics (entries with a mean) of proxytune.evaluation.scores.summarize's result, in its order:
    {"large": {"n": 3, "rouge1": {"mean": 9.5, ...}}} -> ["rouge1"]."""
    out: list[str] = []
    for s in summary.values():
        out += [m for m, v in s.items() if isinstance(v, dict) and "mean" in v and m not in out]
    return out


def write_scores(wb: Workbook, ws: Worksheet, plan: Plan, records: list[dict], placed: dict, added: list[str],
                 compute_perplexity: bool) -> None:
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
    write_table(wb, ws, header, rows, keep_formulas=set(added), inputs=set(added))
    ws.freeze_panes("D2")


def write_intervals(wb: Workbook, ws: Worksheet, summary: dict, human: dict, run_info: dict) -> None:
    """A long table: percentile bootstrap intervals (at the run's confidence) of every score, and of the ratings and
    win rates as typed when the book was written (re-run evaluation.py to update them)."""
    rows = []
    methods = {"scores": f"paired bootstrap over the {run_info['n_examples']} examples",
               "human": f"bootstrap over the judged examples, as typed on {run_info['date'][:10]}"}
    for system, s in summary.items():
        for m in metrics_of(summary):
            if m in s:
                rows.append({"system": system, "metric": m,
                             **{k: round(s[m][k], 4) for k in ("mean", "ci_low", "ci_high")},
                             "n": s["n"], "method": methods["scores"]})
        for m in ("rating", "win_rate"):
            stats = human.get(system, {}).get(m)
            if stats:
                rows.append({"system": system, "metric": m,
                             **{k: round(stats[k], 4) for k in ("mean", "ci_low", "ci_high")},
                             "n": stats["n"], "method": methods["human"]})
    write_table(wb, ws, ["system", "metric", "mean", "ci_low", "ci_high", "n", "method"], rows)
    ws.freeze_panes("A2")


def write_run(wb: Workbook, ws: Worksheet, run_info: dict, options: BookOptions) -> None:
    """Key/value rows: what was evaluated, how, and when; the blind labels' seed and the pairwise systems."""
    review = {"seed": options.seed, "labels": "per example, random.Random(f'{seed}:{example_id}').shuffle(systems)",
              "pairwise": " vs ".join(options.pairwise) if options.pairwise else None}
    rows = [{"key": k, "value": v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)}
            for k, v in flatten({**run_info, "review": review})]
    write_table(wb, ws, ["key", "value"], rows)
    set_width(ws, 0, 40)
    set_width(ws, 1, 90)
    fit_row_heights(ws, ["key", "value"], rows, {"key": 40, "value": 90}, MAX_ROW_HEIGHT)
    set_print(ws, len(rows), landscape=False)
    ws.freeze_panes("A2")


def write_kept(wb: Workbook, ws: Worksheet, kept: list[Judgment]) -> None:
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
    write_table(wb, ws, header, rows, keep_formulas=inputs, inputs=inputs)
    add_list_rule(ws, header, len(rows), ["rating"], RATINGS, "Rating", "1 (poor) to 5 (excellent)")
    ws.freeze_panes("D2")


def flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """`flatten({"a": {"b": 1}, "c": 2})` -> [('a.b', 1), ('c', 2)]."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def bootstrap_mean(values: list[float], samples: int, confidence: float, seed: int) -> dict[str, float] | None:
    """{mean, ci_low, ci_high, n}: percentile bootstrap of the mean (None for no values)."""
    import numpy as np

    if not values:
        return None
    x = np.asarray(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(samples, len(x)))  # (S, N)
    boot = x[idx].mean(-1)
    lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    return {"mean": float(x.mean()), "ci_low": float(np.percentile(boot, lo)),
            "ci_high": float(np.percentile(boot, hi)), "n": len(x)}


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


def build_workbook(records: list[dict], examples: list[dict], summary: dict, run_info: dict, found: Judgments,
                   options: BookOptions) -> tuple[Workbook, Judgments, dict]:
    """The whole book in memory, written out by write_xlsx; returns (workbook, judgments it holds, human summary)."""
    systems = [s for s in run_info["systems"] if any(r["system"] == s for r in records)] or list(run_info["systems"])
    plan = plan_book(records, examples, systems, options)
    placed, kept = carry(slots_of(plan), found, run_info["date"])
    kept_keys = {j.key for j in kept}
    human = summarize_judgments(placed, systems, plan.pair, options)

    # NaN/inf scores become #NUM!/#DIV/0! cells; dates in sheets a reviewer added keep a date format.
    wb = Workbook(io.BytesIO(), {"in_memory": True, "nan_inf_to_errors": True,
                                 "default_date_format": "yyyy-mm-dd hh:mm:ss"})
    review_header = write_review(wb, wb.add_worksheet(REVIEW), plan, placed, kept_keys,
                                 added_columns(REVIEW, found, placed, ()), options)
    pairwise_header = list(PAIRWISE_COLUMNS)
    if plan.pair:
        pairwise_header = write_pairwise(wb, wb.add_worksheet(PAIRWISE), plan, placed, kept_keys,
                                         added_columns(PAIRWISE, found, placed, PAIRWISE_COLUMNS), options)
    summary_ws, scores_ws = wb.add_worksheet(SUMMARY), wb.add_worksheet(SCORES)  # filled once the Key is written
    write_intervals(wb, wb.add_worksheet(INTERVALS), summary, human, run_info)
    write_run(wb, wb.add_worksheet(RUN), run_info, options)
    if kept:
        write_kept(wb, wb.add_worksheet(KEPT), kept)
    for name, grid in found.added_sheets.items():
        copy_sheet(wb, name, grid)
    write_key(wb, wb.add_worksheet(KEY), plan, placed, run_info, review_header, pairwise_header)
    write_summary(wb, summary_ws, plan, summary, run_info, human)
    write_scores(wb, scores_ws, plan, records, placed, added_columns(SCORES, found, placed, SCORES_FIXED),
                 run_info.get("compute_perplexity", True))
    return wb, Judgments(current=placed, kept=kept), human


def copy_sheet(wb: Workbook, name: str, grid: list[list[Any]]) -> None:
    """A sheet a reviewer added, value by value (their formulas stay formulas)."""
    try:
        ws = wb.add_worksheet(name)
    except XlsxWriterException as err:  # a name Excel refuses, which another program let through
        raise UsageError(f"the sheet '{name}' added to the workbook cannot be written back ({first_line(err)}); the "
                         "workbook was left untouched: rename the sheet and re-run") from None
    for r, values in enumerate(grid):
        for c, value in enumerate(values):
            write_cell(ws, r, c, cell_text(value), formulas=True)


def write_xlsx(wb: Workbook, f) -> None:
    """Serialize `wb` into the open binary file `f`: XlsxWriter writes the file, formulas with their values, when
    the book is closed (into the buffer build_workbook gave it)."""
    wb.close()
    f.write(wb.filename.getvalue())


def save_atomically(wb: Workbook, path: Path, expected: tuple[int, int] | None) -> bool:
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
            write_xlsx(wb, f)
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
    summary: proxytune.evaluation.scores.summarize's {system: {metric: {mean, ci_low, ci_high}, "n": n}};
    run_info: the Run sheet's content; needs date, systems ({system: {"model": description}}), confidence,
    bootstrap_samples, n_examples. If the file changes while the book is rebuilt, it is read again.
    """
    path = Path(path)
    # Half-written copies left by a run killed mid-save (save_atomically's names) hold nothing to keep.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    for _ in range(5):
        found = read_judgments(path)
        wb, judgments, human = build_workbook(records, examples, summary, run_info, found, options)
        try:
            if save_atomically(wb, path, found.signature):
                return WrittenBook(judgments, human)
        except OSError as err:
            raise UsageError(f"cannot write workbook {path}: {err.strerror or first_line(err)}; "
                             "the previous workbook is untouched") from None
        logger.info("%s changed while it was being rebuilt; reading it again", path)
    raise UsageError(f"workbook {path} keeps changing; close the program writing it and re-run")
