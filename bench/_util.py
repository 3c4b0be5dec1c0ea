"""Shared bits of the benchmarks: Pythia-shaped random models, timing, and RESULTS.md records.

Shapes follow the published configs (https://huggingface.co/EleutherAI/pythia-70m/blob/main/config.json
and pythia-410m): random weights, real sizes, so timings reflect the real models without a download.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "RESULTS.md"

# name -> (hidden, layers, heads); Pythia: intermediate = 4 * hidden, rotary_pct 0.25, vocab 50,304.
PYTHIA_SHAPES = {
    "pythia-70m": (512, 6, 8),
    "pythia-160m": (768, 12, 12),
    "pythia-410m": (1024, 24, 16),
    "pythia-1b": (2048, 16, 8),
    "pythia-1.4b": (2048, 24, 16),
    "tiny": (64, 2, 4),
    "tiny-large": (128, 3, 4),
}
PYTHIA_VOCAB = 50304
TOKENIZER_VOCAB = 50277


def pythia_config(shape: str, vocab_size: int = PYTHIA_VOCAB):
    from transformers import GPTNeoXConfig

    hidden, layers, heads = PYTHIA_SHAPES[shape]
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False,
    )


def random_model(shape: str, seed: int = 0, vocab_size: int = PYTHIA_VOCAB):
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(pythia_config(shape, vocab_size)).eval()


def timeit(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def versions() -> str:
    import importlib.metadata as md

    names = ["torch", "transformers", "datasets", "trl", "peft"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


def record(title: str, table: list[tuple], header: tuple, notes: str = "", results: Path | None = None) -> str:
    """Append a dated section with a Markdown table to bench/RESULTS.md and return it."""
    lines = [f"\n## {title} — {dt.datetime.now():%Y-%m-%d %H:%M}", "",
             f"Machine: {machine()}. Versions: {versions()}.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in table:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    path = results or RESULTS
    if not path.exists():
        path.write_text("# Benchmark results\n\nWritten by the scripts in `bench/`; never edited by hand.\n")
    with path.open("a") as f:
        f.write(text)
    return text
