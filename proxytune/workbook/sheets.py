"""The review workbook's sheets, columns and styles: what both the writer and the reader know."""

from __future__ import annotations

import re

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


# Points: Excel's largest row (409 pt) in whole pixels of 0.75 pt, as row heights are stored; a longer text scrolls
# inside its cell.
MAX_ROW_HEIGHT = 408.75


# Cell styles as XlsxWriter format properties; a cell's format is the union of its styles.
# Arial (Liberation Sans in LibreOffice: the same metrics) prints alike everywhere; Calibri is not installed with
# LibreOffice on Linux and its substitute is wider, which would make the fitted row heights wrong.
FONT = {"font_name": "Arial", "font_size": 10}
HEADER_FONT, ID_FONT = {**FONT, "bold": True}, {"font_name": "Arial", "font_size": 8, "font_color": "#666666"}


# One line of Arial 10, and prose characters per column-width unit (wrapping included): LibreOffice fits 1.4-1.45 per
# unit (measured on its PDF export), in lines of ~11.5 pt; 1.35 and 12.75 pt (Excel's line) leave room for Excel.
LINE_PT, CHARS_PER_UNIT = 12.75, 1.35


HEADER_FILL, INPUT_FILL = {"bg_color": "#DDEBF7"}, {"bg_color": "#FFF2CC"}  # solid fills


BORDER = {"border": 1, "border_color": "#BFBFBF"}  # thin, light grey, on all four sides


# (least, most) width of a column kind, in characters; a column fits its longest line within these.
WIDTHS = {"#": (4, 4), "example_id": (17, 17), "reviews": (30, 56), "reference": (20, 30), "output": (20, 30),
          "rating": (6, 6), "choice": (8, 8), "comment": (12, 12), "note": (14, 24), "system": (12, 14),
          "model": (20, 40), "reason": (20, 30), "sheet": (9, 9), "label": (6, 6), "method": (20, 60)}


TEXT_KINDS = {"reviews", "reference", "output", "comment", "note", "model", "reason", "value"}
