"""Render the evaluation workbook the way a person prints it: LibreOffice's PDF export, first page as a PNG.

Builds eval_examples.xlsx through workbook.py from real MReD reviews (../shared/data/meta_review, else three
built-in papers), types a few ratings and pairwise choices into it as a reviewer would, rebuilds it (so they are
carried over), then converts it with `soffice --headless --convert-to pdf` and the Review sheet's first page with
`pdftoppm`. The system outputs are stand-ins cut from real text (the picture is about the layout, not the models).

    python bench/render_workbook.py                       # -> assets/workbook_review.png
    python bench/render_workbook.py --work_dir /tmp/wb    # keep the book and the PDF there to look at every page

Needs LibreOffice (`soffice`) and poppler (`pdftoppm`) on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT  # noqa: E402

from proxytune.evaluation.scores import score_records, summarize
from proxytune.task.reviews import clean_text
from proxytune.workbook.writer import BookOptions, write_workbook

DATA = ROOT.parent / "shared" / "data" / "meta_review" / "mred_val_longest.jsonl"
SYSTEMS = ("small_base", "small_tuned", "large", "steered")
FALLBACK = [
    {"Input": "The paper proposes a new normalization for GAN training. Experiments are solid but baselines are weak."
              " <sep> Well written and clearly motivated. The theory section has a gap in the proof of the main lemma.",
     "Output": "The reviewers agree the paper is well written but the baselines are weak. We recommend rejection."},
    {"Input": "Novel idea with strong results on CIFAR. Ablations are missing and the related work is thin. <sep> "
              "The method is simple and effective. However the evaluation only covers small datasets.",
     "Output": "Strong results but missing ablations. The committee recommends acceptance as a poster."},
    {"Input": "Interesting analysis of graph neural networks for robotics. The writing needs work. <sep> Reviewers "
              "agree the contribution is incremental. The rebuttal addressed some concerns.",
     "Output": "Incremental contribution. Despite the rebuttal, the paper is not ready. Reject."},
]
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def load_papers(n: int) -> list[dict]:
    """n papers with their reviews (MReD's <sep> marks become blank lines, as processing_meta_review.py does)."""

    rows = [json.loads(line) for line in DATA.open(encoding="utf-8")][:n] if DATA.is_file() else \
        [FALLBACK[i % len(FALLBACK)] for i in range(n)]
    return [{"Input": clean_text(r["Input"], "whitespace"), "Output": clean_text(r["Output"], "whitespace")}
            for r in rows]


def stand_in_outputs(papers: list[dict]) -> dict[str, list[str]]:
    """Outputs in the manner of each system, cut from real text: an untuned model echoing a review and looping,
    a tuned small model writing another paper's meta-review, the large model summarizing the first review, and
    the steered model close to the reference."""
    out: dict[str, list[str]] = {s: [] for s in SYSTEMS}
    for i, p in enumerate(papers):
        review = [s for s in SENTENCE.split(p["Input"]) if len(s.split()) >= 6] or [p["Input"]]
        meta = SENTENCE.split(p["Output"])
        other = SENTENCE.split(papers[(i + 1) % len(papers)]["Output"])
        out["small_base"].append(" ".join(review[:1] * 3))
        out["small_tuned"].append(" ".join(other[:3]))
        out["large"].append(" ".join(review[:3]))
        out["steered"].append(" ".join(meta[:3]))
    return out


def build_book(path: Path, n_papers: int, seed: int = 0) -> None:
    """Write the book, type ratings and choices as a reviewer would, and write it again around them."""
    from openpyxl import load_workbook


    papers = load_papers(n_papers)
    outputs = stand_in_outputs(papers)
    examples = [{"example_id": f"paper-{i:03d}", "position": i, "input": p["Input"], "reference": p["Output"],
                 "prompt_truncated": False} for i, p in enumerate(papers)]
    records = [{"example_id": e["example_id"], "system": s, "prediction": outputs[s][i], "ended_with_eos": True,
                "new_tokens": len(outputs[s][i].split()) * 4 // 3} for s in SYSTEMS for i, e in enumerate(examples)]
    score_records(records, {e["example_id"]: e["reference"] for e in examples}, 3)
    summary = summarize(records, list(SYSTEMS), len(examples), 200, 0.95, seed)
    run_info = {"date": "2026-01-01T00:00:00+00:00", "dataset_path": str(DATA if DATA.is_file() else "built-in"),
                "n_examples": len(examples), "seed": seed, "compute_perplexity": False, "confidence": 0.95,
                "bootstrap_samples": 200,
                "systems": {"small_base": {"model": "EleutherAI/pythia-70m"},
                            "small_tuned": {"model": "outputs/pythia-70m-meta-review/final"},
                            "large": {"model": "EleutherAI/pythia-410m"},
                            "steered": {"model": "large=EleutherAI/pythia-410m + small_base=EleutherAI/pythia-70m + "
                                                 "small_tuned=outputs/pythia-70m-meta-review/final"}}}
    options = BookOptions(seed=seed, pairwise=("steered", "large"), bootstrap_samples=200)
    write_workbook(path, records, examples, summary, run_info, options)

    wb = load_workbook(path)
    ws = wb["Review"]
    col = {c.value: c.column for c in ws[1]}
    for r, (a, b, comment) in zip((2, 3), ((4, 2, "echoes review 1"), (5, 3, None))):
        ws.cell(r, col["A rating"], a)
        ws.cell(r, col["B rating"], b)
        if comment:
            ws.cell(r, col["B comment"], comment)
    ws = wb["Pairwise"]
    col = {c.value: c.column for c in ws[1]}
    ws.cell(2, col["choice"], "A")
    wb.save(path)
    write_workbook(path, records, examples, summary, run_info, options)


def soffice_convert(book: Path, out_dir: Path, target: str = "pdf", profile: Path | None = None) -> Path:
    """`soffice --headless --convert-to TARGET`, in its own user profile (so it neither waits for nor disturbs a
    LibreOffice that is already running). Returns the converted file."""
    soffice = shutil.which("soffice") or shutil.which("libreoffice")
    if soffice is None:
        raise RuntimeError("LibreOffice (soffice) is not on PATH; install it (apt-get install libreoffice-calc)")
    with tempfile.TemporaryDirectory() as tmp:
        profile = profile or Path(tmp) / "profile"
        res = subprocess.run([soffice, f"-env:UserInstallation={profile.resolve().as_uri()}", "--headless",
                              "--convert-to", target, "--outdir", str(out_dir), str(book)],
                             capture_output=True, text=True, timeout=180)
    converted = out_dir / f"{book.stem}.{target.split(':')[0]}"
    if res.returncode != 0 or not converted.is_file():
        raise RuntimeError(f"soffice failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return converted


def pdf_pages(pdf: Path) -> list[str]:
    """Each page's text (pdftotext), to see which sheet a page shows."""
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    return text.split("\f")[:-1] if text.endswith("\f") else text.split("\f")


def page_sheets(pages: list[str]) -> list[str]:
    """The sheet each page prints: the right end of its running header (proxytune.workbook.writer.set_print puts
    "&A" there)."""
    return [next((line.split()[-1] for line in page.splitlines() if line.strip()), "") for page in pages]


def render_page(pdf: Path, page: int, png: Path, dpi: int = 90) -> None:
    """One page of the PDF as a PNG (pdftoppm)."""
    if shutil.which("pdftoppm") is None:
        raise RuntimeError("pdftoppm is not on PATH; install poppler-utils")
    subprocess.run(["pdftoppm", "-png", "-r", str(dpi), "-f", str(page), "-l", str(page), "-singlefile", str(pdf),
                    str(png.with_suffix(""))], check=True, capture_output=True)
    from PIL import Image  # (installed with matplotlib)

    with Image.open(png) as im:  # a page is black text on a few tints: 32 colours keep it, at a third of the bytes
        small = im.convert("RGB").quantize(colors=32)
    small.save(png, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--papers", type=int, default=4, help="Examples in the book.")
    parser.add_argument("--work_dir", help="Keep the book and its PDF here (default: a temporary directory).")
    parser.add_argument("--png", default=str(ROOT / "assets" / "workbook_review.png"), help="Where the page goes.")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        book = work / "eval_examples.xlsx"
        book.unlink(missing_ok=True)
        build_book(book, args.papers)
        pdf = soffice_convert(book, work)
        pages = pdf_pages(pdf)
        png = Path(args.png)
        png.parent.mkdir(parents=True, exist_ok=True)
        render_page(pdf, 1, png, args.dpi)
        print(f"{book}: {len(pages)} PDF pages; page 1 (the Review sheet) -> {png} ({os.path.getsize(png)} bytes)")
        sheets: dict[str, list[int]] = {}
        for k, sheet in enumerate(page_sheets(pages), 1):
            sheets.setdefault(sheet, []).append(k)
        for sheet, numbers in sheets.items():
            print(f"  {sheet}: page{'s' if len(numbers) > 1 else ''} {numbers[0]}"
                  + (f"-{numbers[-1]}" if len(numbers) > 1 else ""))


if __name__ == "__main__":
    main()
