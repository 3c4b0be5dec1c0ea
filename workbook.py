"""The evaluation workbook: blind side-by-side review, pairwise choices, scores, and every judgment read back.

evaluation.py writes the book with one call, after reading what people typed into the previous one:
    written = write_workbook(path, records, examples, summary, run_info,
                             BookOptions(seed=42, pairwise=("steered", "large")))
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

import logging
from dataclasses import dataclass, field
from pathlib import Path

from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.errors import UsageError
from proxytune.workbook.judgments import export_judgments, read_judgments

logger = logging.getLogger("workbook")


@dataclass
class ExportArguments:
    workbook: str = field(metadata={"help": "A workbook written by evaluation.py (eval_examples.xlsx)."})
    output: str | None = field(
        default=None, metadata={"help": "The JSONL file. Default: ratings.jsonl beside the book."})


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
