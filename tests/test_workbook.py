"""workbook.py with records built in memory: the blind Review and Pairwise sheets, judgments typed under letters
landing on the right (example, system) after a new seed and a new set of systems, dropdowns, numbers that pandas
reads, ratings.jsonl, the old layout, refusals, print setup; and, where LibreOffice is installed, the book as
LibreOffice computes, saves and prints it."""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import META, REVIEWS, ROOT

import workbook as W
from proxytune.evaluation.arguments import OutputArguments
from proxytune.evaluation.outputs import resolve_pairwise
from proxytune.foundation.errors import UsageError
from proxytune.workbook.judgments import export_judgments, read_judgments
from proxytune.workbook.sheets import LINE_PT, MAX_ROW_HEIGHT
from proxytune.workbook.writer import (
    BookOptions,
    WrittenBook,
    blind_labels,
    cell_text,
    label_name,
    pair_labels,
    text_lines,
    write_table,
    write_workbook,
)

SYSTEMS = ["small_base", "small_tuned", "large", "steered"]
ADJECTIVES = ["sound", "incremental", "novel", "unclear", "thorough", "limited"]
DATE = "2026-01-02T03:04:05+00:00"

requires_libreoffice = pytest.mark.skipif(
    shutil.which("soffice") is None or shutil.which("pdftotext") is None or shutil.which("pdftoppm") is None,
    reason="LibreOffice (soffice) and poppler (pdftotext, pdftoppm) are needed to render the workbook")


def make_run(n_examples: int = 5, systems=SYSTEMS, outputs_version: int = 0) -> tuple[list, list, dict, dict]:
    """(records, examples, summary, run_info) as write_outputs passes them. Outputs never name their
    system, so the Review sheet can be searched for system names; each (example, system) has its own text."""
    examples = [{"example_id": f"{i:04x}beefcafe{i:04x}", "position": i,
                 "input": f"{REVIEWS[i % 6]}\n{REVIEWS[(i + 1) % 6]}", "reference": META[i % 6],
                 "prompt_truncated": i == 1} for i in range(n_examples)]
    records = []
    for e in examples:
        for system in systems:
            k = SYSTEMS.index(system)
            records.append({"example_id": e["example_id"], "system": system,
                            "prediction": f"Draft {e['position']}.{k}.{outputs_version}: the reviewers find the method "
                                          f"{ADJECTIVES[k]}. " * (1 + k),
                            "rouge1": 10.0 + k + e["position"], "rouge2": 2.5 * k, "rougeL": 8.0 + k,
                            "rougeLsum": 8.25 + k, "words": 9 * (1 + k), "repetition": 0.125 * k,
                            "ended_with_eos": k % 2 == 0, "new_tokens": 12 + k, "perplexity": 30.5 + k})
    summary = {s: {"n": n_examples, **{m: {"mean": 10.0 + i, "ci_low": 9.0 + i, "ci_high": 11.0 + i}
                                       for m in ("rouge1", "rouge2", "rougeL", "rougeLsum", "words", "repetition",
                                                 "eos_share", "perplexity")}}
               for i, s in enumerate(systems)}
    run_info = {"date": DATE, "dataset_path": "papers.jsonl", "n_examples": n_examples, "seed": 7,
                "systems": {s: {"model": f"models/{s}"} for s in systems}, "confidence": 0.95,
                "bootstrap_samples": 50, "compute_perplexity": True,
                "prompt_template": "=not a formula\n{reviews}"}
    return records, examples, summary, run_info


def write(path: Path, *, seed: int = 1, systems=SYSTEMS, pairwise=("steered", "large"), n_examples: int = 5,
          outputs_version: int = 0) -> WrittenBook:
    records, examples, summary, run_info = make_run(n_examples, systems, outputs_version)
    options = BookOptions(seed=seed, pairwise=pairwise, bootstrap_samples=50)
    return write_workbook(path, records, examples, summary, run_info, options)


def key_of(wb) -> dict[tuple[str, str, str], str]:
    """{(sheet, example_id, system): label} from the hidden Key sheet."""
    rows = list(wb["Key"].iter_rows(values_only=True))
    header = rows[0]
    return {(r["sheet"], r["example_id"], r["system"]): r["label"]
            for r in (dict(zip(header, row)) for row in rows[1:])}


def header_of(ws) -> dict[str, int]:
    return {c.value: c.column for c in ws[1]}


def row_of(ws, example_id: str) -> int:
    col = header_of(ws)["example_id"]
    return next(r for r in range(2, ws.max_row + 1) if ws.cell(r, col).value == example_id)


def type_judgments(path: Path, ratings: dict, choices: dict) -> None:
    """Type ratings {(example_id, system): (rating, comment)} and choices {example_id: system or 'tie'} the way a
    reviewer does: under the letter the book shows for that output."""
    from openpyxl import load_workbook

    wb = load_workbook(path)
    key = key_of(wb)
    ws = wb["Review"]
    col = header_of(ws)
    for (eid, system), (rating, comment) in ratings.items():
        label = key[("Review", eid, system)]
        ws.cell(row_of(ws, eid), col[f"{label} rating"], rating)
        if comment is not None:
            ws.cell(row_of(ws, eid), col[f"{label} comment"], comment)
    ws = wb["Pairwise"]
    col = header_of(ws)
    for eid, choice in choices.items():
        ws.cell(row_of(ws, eid), col["choice"], choice if choice == "tie" else key[("Pairwise", eid, choice)])
    wb.save(path)


def ratings_by_output(path: Path) -> dict[tuple[str, str], tuple]:
    """{(example_id, output text): (rating, comment)} read from the Review sheet without the Key: the rating beside
    each output, wherever its letter moved."""
    from openpyxl import load_workbook

    ws = load_workbook(path)["Review"]
    col = header_of(ws)
    out = {}
    for r in range(2, ws.max_row + 1):
        eid = ws.cell(r, col["example_id"]).value
        for name in col:
            if name.endswith(" output"):
                label = name.split()[0]
                rating, comment = ws.cell(r, col[f"{label} rating"]).value, ws.cell(r, col[f"{label} comment"]).value
                if rating is not None or comment is not None:
                    out[(eid, ws.cell(r, col[name]).value)] = (rating, comment)
    return out


def prediction(eid: str, system: str, outputs_version: int = 0, n_examples: int = 5) -> str:
    records, *_ = make_run(n_examples, SYSTEMS, outputs_version)
    return next(r["prediction"] for r in records if r["example_id"] == eid and r["system"] == system)


EIDS = [e["example_id"] for e in make_run()[1]]
TYPED = {(EIDS[0], "steered"): (5, "faithful"), (EIDS[0], "small_base"): (1, "=echoes the reviews"),
         (EIDS[1], "large"): (3, None), (EIDS[2], "small_base"): (2, "loops"), (EIDS[3], "steered"): (4, None)}
CHOSEN = {EIDS[0]: "steered", EIDS[1]: "tie", EIDS[2]: "large"}


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
def test_review_sheet_is_blind_one_row_per_example_with_dropdowns(tmp_path):
    from openpyxl import load_workbook

    path = tmp_path / "book.xlsx"
    write(path)
    wb = load_workbook(path)
    assert wb.sheetnames[:2] == ["Review", "Pairwise"] and wb.active.title == "Review"
    assert [wb[n].sheet_state for n in wb.sheetnames if n != "Key"] == ["visible"] * (len(wb.sheetnames) - 1)
    assert wb["Key"].sheet_state == "hidden" and wb["Key"].protection.sheet
    ws = wb["Review"]
    header = [c.value for c in ws[1]]
    assert header == ["#", "reviews", "reference",
                      *[f"{L} {part}" for L in "ABCD" for part in ("output", "rating", "comment")], "example_id"]
    assert ws.max_row == 1 + 5  # one row per example: its reviews appear once
    texts = [str(c.value) for row in ws.iter_rows() for c in row if c.value is not None]
    for pw in wb["Pairwise"].iter_rows():
        texts += [str(c.value) for c in pw if c.value is not None]
    assert not [t for t in texts for s in SYSTEMS if s in t or f"models/{s}" in t]  # blind: no system named

    key = key_of(wb)
    col = header_of(ws)
    for eid in EIDS:  # every letter shows the output of the system the Key says
        for system in SYSTEMS:
            cell = ws.cell(row_of(ws, eid), col[f"{key[('Review', eid, system)]} output"])
            assert cell.value == prediction(eid, system)
    pw = wb["Pairwise"]
    pcol = header_of(pw)
    for eid in EIDS:
        for system in ("steered", "large"):
            cell = pw.cell(row_of(pw, eid), pcol[f"{key[('Pairwise', eid, system)]} output"])
            assert cell.value == prediction(eid, system)
    orders = {tuple(sorted(SYSTEMS, key=lambda s: key[("Review", eid, s)])) for eid in EIDS}
    assert len(orders) > 1  # shuffled per example, not one fixed order

    (rule,) = ws.data_validations.dataValidation
    assert (rule.type, rule.formula1, rule.showErrorMessage) == ("list", '"1,2,3,4,5"', True)  # a dropdown
    assert not rule.showDropDown  # (in the file format, showDropDown=True would *hide* the arrow)
    rating_cols = {ws.cell(1, c).column_letter for c in col.values() if ws.cell(1, c).value.endswith(" rating")}
    assert {str(r) for r in rule.sqref.ranges} == {f"{c}2:{c}6" for c in rating_cols}
    (choice,) = pw.data_validations.dataValidation
    assert (choice.type, choice.formula1) == ("list", '"A,B,tie"')
    choice_column = pw.cell(1, pcol["choice"]).column_letter
    assert str(choice.sqref) == f"{choice_column}2:{choice_column}6"
    assert ws.freeze_panes == "C2"


def test_labels_are_seeded_per_example():
    a = blind_labels(SYSTEMS, "ex1", 0)
    assert sorted(a.values()) == ["A", "B", "C", "D"] and a == blind_labels(SYSTEMS, "ex1", 0)
    assert any(blind_labels(SYSTEMS, "ex1", seed) != a for seed in range(1, 6))
    assert {tuple(pair_labels(("steered", "large"), f"ex{i}", 0).items()) for i in range(20)} == {
        (("steered", "A"), ("large", "B")), (("large", "A"), ("steered", "B"))}
    assert [label_name(i) for i in (0, 25, 26, 27)] == ["A", "Z", "AA", "AB"]


def test_print_setup_and_sizes_fit_the_content(tmp_path):
    from openpyxl import load_workbook

    path = tmp_path / "book.xlsx"
    write(path)
    wb = load_workbook(path)
    for ws in (wb[n] for n in wb.sheetnames if n != "Key"):
        # pages wide and tall to fit to (0: as many as needed); a count of 1, the format's default, is left out
        fit = [1 if n is None else n for n in (ws.page_setup.fitToWidth, ws.page_setup.fitToHeight)]
        assert ws.sheet_properties.pageSetUpPr.fitToPage and fit[0] == 1, ws.title
        if ws.title == "Summary":  # table and chart on one page
            assert fit[1] == 1 and ws._charts[0].anchor._from.row >= ws.max_row
        else:
            assert fit[1] == 0 and ws.print_title_rows == "$1:$1", ws.title
        assert ws.page_setup.orientation == ("portrait" if ws.title == "Run" else "landscape"), ws.title
        for c in ws[1]:  # no header is clipped: every word fits its column
            assert max(len(w) for w in str(c.value).split()) <= ws.column_dimensions[c.column_letter].width, c.value
    ws = wb["Review"]
    col = header_of(ws)
    reviews = ws.column_dimensions[ws.cell(1, col["reviews"]).column_letter].width
    for r in range(2, ws.max_row + 1):
        height = ws.row_dimensions[r].height
        text = ws.cell(r, col["reviews"]).value
        assert MAX_ROW_HEIGHT >= height >= text_lines(text, reviews) * LINE_PT  # the reviews are not cut off
        assert height < 20 * LINE_PT  # and the row is not a fixed tall block
        assert ws.cell(r, col["A output"]).alignment.wrap_text
    long = tmp_path / "long.xlsx"
    records, examples, summary, run_info = make_run(2)
    examples[0]["input"] = "A long review sentence. " * 400
    write_workbook(long, records, examples, summary, run_info, BookOptions(review_chars=5000))
    ws = load_workbook(long)["Review"]
    assert len(ws["B2"].value) == 5000 and ws.row_dimensions[2].height == MAX_ROW_HEIGHT  # capped


# ---------------------------------------------------------------------------------------------
# Judgments survive re-runs
# ---------------------------------------------------------------------------------------------
def test_judgments_land_on_their_example_and_system_across_seeds_and_systems(tmp_path):
    path = tmp_path / "book.xlsx"
    write(path, seed=1)
    type_judgments(path, TYPED, CHOSEN)
    expected_by_output = {(eid, prediction(eid, s)): v for (eid, s), v in TYPED.items()}

    def judged(p=path):
        found = read_judgments(p)
        ratings = {(j.example_id, j.systems[0]): (j.values.get("rating"), j.values.get("comment"))
                   for j in found.current.values() if j.sheet == "Review" and j.systems}
        choices = {j.example_id: j.values["choice"] for j in found.current.values() if j.sheet == "Pairwise"}
        return ratings, choices, found

    assert judged()[:2] == (TYPED, CHOSEN)
    write(path, seed=2)  # every letter reshuffled
    assert judged()[:2] == (TYPED, CHOSEN)
    assert ratings_by_output(path) == expected_by_output  # checked beside the outputs themselves, without the Key

    # small_base left out (and the pairwise pair changed): its ratings and the choices are kept aside, not lost.
    write(path, seed=3, systems=["small_tuned", "large", "steered"], pairwise=("steered", "small_tuned"))
    ratings, choices, found = judged()
    assert ratings == {k: v for k, v in TYPED.items() if k[1] != "small_base"} and choices == {}
    kept = {(j.sheet, j.example_id, j.systems): j for j in found.kept}
    assert {k[1:] for k in kept if k[0] == "Review"} == {(e, ("small_base",)) for e, s in TYPED if s == "small_base"}
    assert {k[1] for k in kept if k[0] == "Pairwise"} == set(CHOSEN)
    assert all(j.reason == f"not in run of {DATE}" for j in kept.values())
    assert kept[("Pairwise", EIDS[0], ("large", "steered"))].values["choice"] == "steered"

    write(path, seed=4)  # everything back: restored in place, 'Kept ratings' gone
    ratings, choices, found = judged()
    assert (ratings, choices, found.kept) == (TYPED, CHOSEN, [])
    from openpyxl import load_workbook

    assert "Kept ratings" not in load_workbook(path).sheetnames
    assert ratings_by_output(path) == expected_by_output


def test_changed_output_carries_the_rating_and_keeps_the_rated_output(tmp_path):
    from openpyxl import load_workbook

    path = tmp_path / "book.xlsx"
    write(path)
    type_judgments(path, {(EIDS[0], "steered"): (4, "ok")}, {EIDS[0]: "large"})
    write(path, outputs_version=1)  # new outputs for every system
    found = read_judgments(path)
    assert found.current[("Review", EIDS[0], ("steered",))].values == {"rating": 4, "comment": "ok"}
    kept = {j.sheet: j for j in found.kept}
    assert kept["Review"].outputs == {"steered": prediction(EIDS[0], "steered")}  # the output that was rated
    assert kept["Review"].reason.startswith("output changed since judged")
    assert kept["Pairwise"].values["choice"] == "large"
    assert kept["Pairwise"].outputs["large"] == prediction(EIDS[0], "large")
    ws = load_workbook(path)["Review"]
    note = ws.cell(row_of(ws, EIDS[0]), header_of(ws)["note"]).value
    assert "another rating of this output is in 'Kept ratings'" in note and "steered" not in note
    write(path, outputs_version=1)  # the same outputs again: nothing more is kept
    assert len(read_judgments(path).kept) == 2


def test_reviewer_columns_sheets_and_formulas_are_kept(tmp_path):
    from openpyxl import load_workbook

    path = tmp_path / "book.xlsx"
    write(path)
    wb = load_workbook(path)
    ws = wb["Review"]
    ws.cell(1, ws.max_column + 1, "overall")
    ws.cell(row_of(ws, EIDS[1]), ws.max_column, "=1+1")  # a reviewer's formula stays a formula
    ws.cell(row_of(ws, EIDS[2]), ws.max_column + 2, "typed without a header")
    scores = wb["Scores"]
    scores.cell(1, scores.max_column + 1, "flag")
    scores.cell(3, scores.max_column, "check")
    flagged = (scores.cell(3, 2).value, scores.cell(3, 3).value)
    over = (scores.cell(4, 2).value, scores.cell(4, 3).value)
    scores.cell(4, header_of(scores)["rating"], 3)  # typed over the analysis table's live rating
    pw = wb["Pairwise"]
    pw.cell(1, pw.max_column + 1, "confidence")
    pw.cell(row_of(pw, EIDS[0]), pw.max_column, "high")
    wb.create_sheet("My notes").append(["to discuss", 42])
    wb.save(path)
    write(path, seed=9, n_examples=5)

    wb = load_workbook(path)
    ws = wb["Review"]
    col = header_of(ws)
    assert ws.cell(row_of(ws, EIDS[1]), col["overall"]).value == "=1+1"
    assert ws.cell(row_of(ws, EIDS[1]), col["overall"]).data_type == "f"
    unnamed = [h for h in col if str(h).startswith("column ")]
    assert len(unnamed) == 1 and ws.cell(row_of(ws, EIDS[2]), col[unnamed[0]]).value == "typed without a header"
    scores = wb["Scores"]
    rows = list(scores.iter_rows(min_row=2, values_only=True))
    fcol = header_of(scores)["flag"] - 1
    assert [(r[1], r[2]) for r in rows if r[fcol] == "check"] == [flagged]
    assert read_judgments(path).current[("Review", over[0], (over[1],))].values == {"rating": 3}  # a rating now
    assert ratings_by_output(path)[(over[0], prediction(*over))] == (3, None)
    pw = wb["Pairwise"]
    assert pw.cell(row_of(pw, EIDS[0]), header_of(pw)["confidence"]).value == "high"
    assert [list(r) for r in wb["My notes"].iter_rows(values_only=True)] == [["to discuss", 42]]
    run = {r[0]: r[1] for r in wb["Run"].iter_rows(min_row=2, values_only=True)}
    assert run["prompt_template"] == "=not a formula\n{reviews}" and run["review.seed"] == 9
    assert run["review.pairwise"] == "steered vs large"


def test_text_that_looks_like_a_formula_stays_text(tmp_path):
    from openpyxl import load_workbook
    from xlsxwriter import Workbook

    with Workbook(tmp_path / "t.xlsx") as wb:
        write_table(wb, wb.add_worksheet(), ["output", "rating"], [{"output": "=1+1 \x07bell", "rating": "=2+2"}],
                    keep_formulas={"rating"})
    ws = load_workbook(tmp_path / "t.xlsx").active
    assert (ws["A2"].value, ws["A2"].data_type) == ("=1+1 bell", "s")
    assert (ws["B2"].value, ws["B2"].data_type) == ("=2+2", "f")
    assert load_workbook(tmp_path / "t.xlsx", data_only=True).active["B2"].value is None  # computed when opened
    assert cell_text("x" * 40_000).endswith("[... 7233 more characters]") and len(cell_text("x" * 40_000)) == 32_767


def test_old_layout_workbook_is_carried_over(tmp_path):
    """A book of the previous version (one 'Examples' row per (example, system), 'Kept ratings' without a sheet
    column): its ratings land in the Review sheet under the right letters, its added columns in Scores."""
    from openpyxl import Workbook

    path = tmp_path / "book.xlsx"
    wb = Workbook()
    ws = wb.active
    ws.title = "Examples"
    ws.append(["example_no", "example_id", "system", "reviews", "reference", "output", "rating", "comment",
               "rouge1", "note", "second_opinion"])
    ws.append([1, EIDS[0], "steered", "r", "m", prediction(EIDS[0], "steered"), 4, "clear", 10.0, None, "agree"])
    ws.append([1, EIDS[0], "large", "r", "m", prediction(EIDS[0], "large"), None, None, 9.0, None, "later"])
    ws.append([2, EIDS[1], "small_base", "r", "m", "an older output", 2, None, 8.0, None, None])
    wb.create_sheet("Summary")
    kept = wb.create_sheet("Kept ratings")
    kept.append(["example_id", "system", "rating", "comment", "second_opinion", "reason", "output"])
    kept.append(["gone", "large", 5, "best", None, "not in run of 2025-01-01", "old text"])
    wb.save(path)

    write(path)
    found = read_judgments(path)
    assert found.current[("Review", EIDS[0], ("steered",))].values == {"rating": 4, "comment": "clear"}
    assert found.current[("Review", EIDS[1], ("small_base",))].values == {"rating": 2}
    assert found.current[("Scores", EIDS[0], ("large",))].values == {"second_opinion": "later"}
    reasons = sorted((j.example_id, j.reason.split(" (")[0]) for j in found.kept)
    assert reasons == [(EIDS[1], "output changed since judged"), ("gone", "not in run of 2025-01-01")]
    assert ratings_by_output(path)[(EIDS[0], prediction(EIDS[0], "steered"))] == (4, "clear")


# ---------------------------------------------------------------------------------------------
# Numbers for tools without a formula engine, and ratings.jsonl
# ---------------------------------------------------------------------------------------------
def test_formulas_are_written_with_their_values(tmp_path):
    import pandas as pd
    from openpyxl import load_workbook

    path = tmp_path / "book.xlsx"
    write(path)
    type_judgments(path, TYPED, CHOSEN)
    written = write(path)
    summary = pd.read_excel(path, sheet_name="Summary").set_index("system")
    assert list(summary.index) == SYSTEMS
    assert summary.loc["large", "rouge1"] == 12.0 and summary.loc["steered", "model"] == "models/steered"
    for system in SYSTEMS:
        typed = [r for (_, s), (r, _) in TYPED.items() if s == system]
        assert summary.loc[system, "n_rated"] == len(typed)
        if typed:
            assert summary.loc[system, "mean_rating"] == pytest.approx(sum(typed) / len(typed))
            assert written.human[system]["rating"]["mean"] == pytest.approx(sum(typed) / len(typed))
        else:  # small_tuned: not rated yet
            assert pd.isna(summary.loc[system, "mean_rating"]) and written.human[system]["rating"] is None
    # steered: a win and a tie of 2 judged pairs; large: a loss, a tie and a win of 3.
    assert summary.loc["steered", "win_rate"] == pytest.approx(1.5 / 3)
    assert summary.loc["large", "win_rate"] == pytest.approx(1.5 / 3) and summary.loc["large", "n_pairs"] == 3
    assert pd.isna(summary.loc["small_base", "win_rate"])

    scores = pd.read_excel(path, sheet_name="Scores")
    assert len(scores) == 5 * len(SYSTEMS)
    assert str(scores["rating"].dtype) == "float64" and str(scores["ended_with_eos"].dtype) == "bool"
    assert str(scores["rouge2"].dtype) == "float64" and scores["prompt_truncated"].sum() == len(SYSTEMS)
    rated = scores.dropna(subset=["rating"])
    assert {(r.example_id, r.system): r.rating for r in rated.itertuples()} == {k: v[0] for k, v in TYPED.items()}
    assert "output" not in scores.columns  # outputs would un-blind the letters (they are in predictions.jsonl)

    intervals = pd.read_excel(path, sheet_name="Intervals")
    assert list(intervals.columns) == ["system", "metric", "mean", "ci_low", "ci_high", "n", "method"]
    win = intervals[(intervals.system == "large") & (intervals.metric == "win_rate")].iloc[0]
    assert win["n"] == 3 and 0 <= win["ci_low"] <= win["mean"] <= win["ci_high"] <= 1

    # openpyxl without a formula engine reads the same: every live cell has its value, blank only where none typed.
    data, formulas = load_workbook(path, data_only=True), load_workbook(path)
    blank = {}
    for name in ("Summary", "Scores"):
        cells = [(f, v) for row_f, row_v in zip(formulas[name].iter_rows(), data[name].iter_rows())
                 for f, v in zip(row_f, row_v) if f.data_type == "f"]
        assert cells, name
        blank[name] = sum(v.value is None for _, v in cells)
    assert blank == {"Summary": 1, "Scores": 5 * len(SYSTEMS) - len(TYPED)}  # small_tuned has no rating yet
    col = header_of(formulas["Summary"])["n_rated"]
    assert formulas["Summary"].cell(2, col).value.startswith("=SUMPRODUCT(") and data["Summary"].cell(2, col).value == 2


def test_ratings_jsonl_matches_the_book(tmp_path):
    path = tmp_path / "book.xlsx"
    write(path)
    type_judgments(path, TYPED, CHOSEN)
    written = write(path, systems=["small_tuned", "large", "steered"])  # small_base's ratings kept aside
    out = tmp_path / "ratings.jsonl"
    n = export_judgments(written.judgments, out)
    again = tmp_path / "again.jsonl"
    export_judgments(read_judgments(path), again)
    assert out.read_text() == again.read_text()  # what was exported is what the book holds
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == len(lines) == len(TYPED) + len(CHOSEN)
    ratings = {(r["example_id"], r["system"]): (r["rating"], r["comment"]) for r in lines if r["type"] == "rating"}
    assert ratings == TYPED
    assert {r["system"] for r in lines if r["type"] == "rating" and r["kept"]} == {"small_base"}
    first = next(r for r in lines if r["type"] == "pairwise" and r["example_id"] == EIDS[0])
    assert (first["winner"], first["loser"], first["systems"]) == ("steered", "large", ["large", "steered"])
    assert first["outputs"] == {s: prediction(EIDS[0], s) for s in ("large", "steered")}
    tie = next(r for r in lines if r["type"] == "pairwise" and r["example_id"] == EIDS[1])
    assert (tie["choice"], tie["winner"]) == ("tie", None)

    assert W.main(W.ExportArguments(workbook=str(path))) == n  # python workbook.py --workbook BOOK
    assert (tmp_path / "ratings.jsonl").read_text() == again.read_text()


# ---------------------------------------------------------------------------------------------
# Refusals: the book is left as it is
# ---------------------------------------------------------------------------------------------
def test_a_book_without_its_key_or_with_an_unmapped_letter_is_refused(tmp_path):
    from openpyxl import load_workbook

    path = tmp_path / "book.xlsx"
    write(path)
    wb = load_workbook(path)
    ws = wb["Review"]
    ws.append([99, "reviews", "reference", "an output", 4])  # a row typed by hand, without an example_id...
    wb.save(path)
    read_judgments(path)  # ...holds no judgment that could be matched, and is not one
    wb = load_workbook(path)
    wb["Review"].cell(wb["Review"].max_row, header_of(wb["Review"])["example_id"], "not-an-example")
    wb.save(path)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="label A for example not-an-example"):
        write(path)
    assert path.read_bytes() == before
    wb = load_workbook(path)
    del wb["Key"]
    wb.save(path)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="lost its hidden 'Key' sheet"):
        write(path)
    assert path.read_bytes() == before


@pytest.mark.filterwarnings("ignore:Title is more than 31 characters")  # openpyxl's, writing and reading it
def test_a_sheet_excel_cannot_hold_is_refused(tmp_path):
    """A sheet added under a name Excel refuses (longer than 31 characters; openpyxl, like LibreOffice, lets it
    through) cannot be written back: a clear error, and the book is left as it is."""
    from openpyxl import load_workbook

    path = tmp_path / "book.xlsx"
    write(path)
    wb = load_workbook(path)
    wb.create_sheet("Notes on the second round of reviews")
    wb.save(path)
    before = path.read_bytes()
    with pytest.raises(UsageError, match="sheet 'Notes on the second round of reviews' .* rename the sheet"):
        write(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".book.xlsx.*"))


def test_pairwise_flag(tmp_path):
    assert resolve_pairwise("auto", ["large", "steered"]) == ("steered", "large")
    assert resolve_pairwise("auto", ["small_base", "large"]) is None
    assert resolve_pairwise("none", ["large", "steered"]) is None
    assert resolve_pairwise("large, small_base", ["small_base", "large"]) == ("large", "small_base")
    assert resolve_pairwise("large,large_tuned", ["large"]) is None  # warned, no Pairwise sheet
    for bad in ("steered", "steered,steered", "steered,huge"):
        with pytest.raises(UsageError, match=f"--pairwise {bad} must name two different systems"):
            OutputArguments(pairwise=bad)
    path = tmp_path / "book.xlsx"
    write(path, pairwise=None)
    from openpyxl import load_workbook

    wb = load_workbook(path)
    assert "Pairwise" not in wb.sheetnames and "win_rate" not in [c.value for c in wb["Summary"][1]]


# ---------------------------------------------------------------------------------------------
# LibreOffice: what a reviewer's office program computes, saves and prints
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lo_profile(tmp_path_factory) -> Path:
    """One LibreOffice user profile for this module's conversions (the first start creates it, which is slow)."""
    return tmp_path_factory.mktemp("lo-profile")


def render_module():
    sys.path.insert(0, str(ROOT / "bench"))
    import render_workbook

    return render_workbook


@requires_libreoffice
def test_libreoffice_computes_the_stored_values_and_keeps_every_judgment(tmp_path, lo_profile):
    """The book's formulas are stripped of their stored values and LibreOffice computes them: they must equal what
    workbook.py stored. The file LibreOffice saves (as a reviewer's would be) must give back every judgment."""
    from openpyxl import load_workbook

    path = tmp_path / "book.xlsx"
    write(path)
    type_judgments(path, TYPED, CHOSEN)
    write(path)
    stripped = tmp_path / "stripped" / "book.xlsx"
    stripped.parent.mkdir()
    load_workbook(path).save(stripped)  # openpyxl keeps formulas only
    assert load_workbook(stripped, data_only=True)["Summary"]["M2"].value is None
    saved = render_module().soffice_convert(stripped, tmp_path / "lo", "xlsx", profile=lo_profile)
    ours, theirs = load_workbook(path, data_only=True), load_workbook(saved, data_only=True)
    formulas = load_workbook(path)
    checked = 0
    for name in ("Summary", "Scores", "Key"):
        for row_f, row_a, row_b in zip(formulas[name].iter_rows(), ours[name].iter_rows(), theirs[name].iter_rows()):
            for f, a, b in zip(row_f, row_a, row_b):
                if f.data_type == "f":
                    checked += 1
                    expected = None if a.value == "" else a.value
                    got = None if b.value == "" else b.value
                    assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected, \
                        (name, f.coordinate, f.value)
    assert checked > 40
    assert export_judgments(read_judgments(saved), tmp_path / "a.jsonl") == len(TYPED) + len(CHOSEN)
    export_judgments(read_judgments(path), tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()


@requires_libreoffice
def test_libreoffice_prints_landscape_fit_to_width_with_the_header_on_every_page(tmp_path, lo_profile):
    """bench/render_workbook.py's book as LibreOffice exports it to PDF: landscape pages, the Review sheet's header
    on each of its pages, the Summary (table and chart) on one page, and the README's PNG of page 1."""
    import subprocess

    render = render_module()
    book = tmp_path / "eval_examples.xlsx"
    n = 8 if render.DATA.is_file() else 40  # real reviews fill pages faster than the three built-in papers
    render.build_book(book, n)
    pdf = render.soffice_convert(book, tmp_path, "pdf", profile=lo_profile)
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout
    width, height = (float(x) for x in info.split("Page size:")[1].split("pts")[0].split("x"))
    assert width > height  # landscape
    pages = render.pdf_pages(pdf)
    assert all(next(line for line in page.splitlines() if line.strip()).startswith("eval_examples.xlsx")
               for page in pages)  # the running header: file name left, sheet name right
    sheet_of = render.page_sheets(pages)
    review = [p for p, s in zip(pages, sheet_of) if s == "Review"]
    assert 2 <= len(review) < n  # more than one page, not one page per row
    for page in review:  # the header row is repeated, and nothing is cut to a sliver ("examp")
        assert all(h in page for h in ("reviews", "reference", "A output", "A rating", "D comment", "example_id"))
    assert sheet_of.count("Summary") == 1 and "ROUGE F1 (x100) per system" in pages[sheet_of.index("Summary")]
    assert sheet_of[:len(review)] == ["Review"] * len(review)  # the Review sheet prints first
    png = tmp_path / "review.png"
    render.render_page(pdf, 1, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert zipfile.is_zipfile(book)
