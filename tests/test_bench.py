"""The benchmarks keep running: each bench script's `--ci --no_record` mode (tiny shapes, seconds) exits 0 and
prints its table rows with the ratio in bold. Timings are not asserted; bench/RESULTS.md holds the real runs."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
from conftest import ROOT, requires_shared

RATIO = re.compile(r"\*\*\d+\.\d+\*\*")  # the bold ratio cell of a bench table row, e.g. **1.42**


def run_bench_ci(script: str, cwd) -> str:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--ci", "--no_record"],
                         capture_output=True, text=True, timeout=300, cwd=cwd)
    assert res.returncode == 0, res.stderr[-3000:]
    assert RATIO.search(res.stdout), f"no ratio line in the output of {script}:\n{res.stdout}"
    return res.stdout


def test_bench_steering_ci(tmp_path):
    run_bench_ci("bench_steering.py", tmp_path)


@requires_shared
def test_bench_evaluation_ci(tmp_path):
    out = run_bench_ci("bench_evaluation.py", tmp_path)
    assert "ratio (examples/s batch 8 / batch 1):" in out
    assert "identical predictions batched vs alone: 4/4" in out  # left padding leaves greedy outputs unchanged


@requires_shared
def test_bench_fine_tune_ci(tmp_path):
    out = run_bench_ci("bench_fine_tune.py", tmp_path)
    # Every trainer (fine_tune.py, padding to max_length, TRL matched and default) trained on the same targets.
    assert "Label tokens counted from the batches each trainer built: the same in every system" in out
    assert out.count("**") == 6  # a bold ratio for each of the three comparisons


def test_bench_speculative_ci(tmp_path):
    out = run_bench_ci("bench_speculative.py", tmp_path)
    assert "t(k) ms" in out and "speculative K = 2" in out


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_bench_quantized_ci(tmp_path):
    out = run_bench_ci("bench_quantized.py", tmp_path)
    assert "4-bit general" in out and "8-bit" in out and "proxy-tuning, alpha=1" in out


@requires_shared
def test_bench_decision_ci(tmp_path):
    """The decision bench's smoke mode (a fresh tiny classifier on 48 real papers) runs and prints its table."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_decision.py"), "--ci", "--no_record"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "accuracy - majority (paired) |" in res.stdout and "majority class '" in res.stdout
