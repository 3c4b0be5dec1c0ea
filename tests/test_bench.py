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


@requires_shared
def test_bench_process_ci(tmp_path):
    """Whole steer.py processes (default, plain loop) beside L alone's, on models saved with the real tokenizer."""
    out = run_bench_ci("bench_process.py", tmp_path)
    assert "steer.py (default: adaptive speculative)" in out and "L alone" in out


@pytest.mark.parametrize("part", ["--fallback", "--pair"])
def test_bench_speculative_fallback_and_pair_ci(tmp_path, part):
    """Parts 4 and 5 (issue 29): the adaptive default next to k = 2, the plain loop and L alone; a LoRA S_tuned
    paired with S next to two forwards."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_speculative.py"), part, "--ci", "--no_record"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert RATIO.search(res.stdout), res.stdout
    expected = "default (adaptive)" if part == "--fallback" else "one paired forward"
    assert expected in res.stdout and "plain steered loop" in res.stdout


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


# bench/RESULTS.md keeps the latest records, one `## <script>` section each: record() replaces what a run measures
# again and keeps everything else. Fast: no models, machine()/versions() stubbed, a tmp RESULTS.md.

def load_bench_util():
    spec = importlib.util.spec_from_file_location("bench_util_for_tests", ROOT / "bench" / "_util.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def util(tmp_path, monkeypatch):
    module = load_bench_util()
    monkeypatch.setattr(module, "RESULTS", tmp_path / "RESULTS.md")
    monkeypatch.setattr(module, "machine", lambda: "test machine")
    monkeypatch.setattr(module, "versions", lambda: "test versions")
    return module


HEADER = ("what", "value")


def sections(text: str) -> list[str]:
    return [line[3:] for line in text.splitlines() if line.startswith("## ")]


def records(text: str) -> list[str]:
    return [line[4:] for line in text.splitlines() if line.startswith("### ")]


def test_record_creates_the_file_with_the_preamble_and_a_section(util):
    text = util.record("Cost at 410m", [("batch 1", "**1.17**")], HEADER, notes="Some notes.", bench="bench_steering")
    content = util.RESULTS.read_text()
    assert content.startswith(util.PREAMBLE)
    assert "git log -p bench/RESULTS.md" in content
    assert sections(content) == ["bench_steering"]
    assert text.startswith("### Cost at 410m — ") and text in content
    assert "| batch 1 | **1.17** |" in content and content.endswith("Some notes.\n")
    assert [p.name for p in util.RESULTS.parent.iterdir()] == ["RESULTS.md"]  # no temporary file left behind


def test_record_replaces_its_own_record_and_keeps_the_rest(util):
    util.record("Cost", [("batch 1", "1.0")], HEADER, bench="bench_steering")
    util.record("Acceptance", [("K = 2", "0.69")], HEADER, bench="bench_speculative")
    other = util.RESULTS.read_text().split("\n## bench_speculative\n")[1]
    util.record("Cost", [("batch 1", "2.0")], HEADER, bench="bench_steering")
    util.record("Cost", [("batch 1", "3.0")], HEADER, bench="bench_steering")
    content = util.RESULTS.read_text()
    assert sections(content) == ["bench_steering", "bench_speculative"]
    assert records(content.split("\n## bench_speculative\n")[0]) and len(records(content)) == 2
    assert "| batch 1 | 3.0 |" in content and "| batch 1 | 1.0 |" not in content and "| batch 1 | 2.0 |" not in content
    assert content.split("\n## bench_speculative\n")[1] == other  # another script's section is untouched, byte for byte


def test_records_of_other_configurations_or_fewer_rows_are_kept(util):
    def put(title, rows):
        util.record(title, [(r, "x") for r in rows], HEADER, bench="bench_speculative")

    put("Cost at 410m/70m", ["410m batch 1", "410m batch 8"])
    put("Cost at 1.4b/70m", ["1.4b batch 8"])  # another shape: another record
    put("Cost at 410m/70m", ["410m batch 1"])  # fewer rows: does not replace the full record
    titles = [t.rsplit(" — ", 1)[0] for t in records(util.RESULTS.read_text())]
    assert titles == ["Cost at 410m/70m", "Cost at 1.4b/70m", "Cost at 410m/70m"]
    put("Cost at 410m/70m", ["410m batch 1", "410m batch 8", "410m batch 16"])  # covers both 410m records
    content = util.RESULTS.read_text()
    titles = [t.rsplit(" — ", 1)[0] for t in records(content)]
    assert titles == ["Cost at 410m/70m", "Cost at 1.4b/70m"]  # in the place of the first one it replaced
    assert "| 410m batch 16 | x |" in content and sections(content) == ["bench_speculative"]


def test_sections_follow_the_fixed_order_and_unknown_sections_are_kept(util):
    util.RESULTS.write_text(util.PREAMBLE + "\n## someone_elses_notes\n\nKept as it is.\n")
    util.record("RL", [("S_grpo", "1")], HEADER, bench="rl_lab")
    util.record("Steering", [("batch 1", "1")], HEADER, bench="bench_steering")
    util.record("Lab", [("S", "1")], HEADER, bench="steering_lab")
    util.record("New", [("a", "1")], HEADER, bench="bench_not_listed")
    content = util.RESULTS.read_text()
    assert sections(content) == ["bench_steering", "steering_lab", "rl_lab", "someone_elses_notes", "bench_not_listed"]
    assert "## someone_elses_notes\n\nKept as it is.\n" in content
    order = util.BENCH_ORDER
    assert order.index("bench_steering") < order.index("steering_lab") < order.index("rl_lab")


def test_section_intro_and_code_blocks_survive_a_replacement(util):
    notes = "Blends:\n\n```text\n## not a heading\n### nor this\n```\n\nEnd."
    util.record("Lab", [("S", "1")], HEADER, notes=notes, bench="steering_lab")
    content = util.RESULTS.read_text().replace("`bench/steering_lab.py`.", "`bench/steering_lab.py`: the lab.")
    util.RESULTS.write_text(content)
    util.record("Lab", [("S", "2")], HEADER, notes=notes, bench="steering_lab")
    content = util.RESULTS.read_text()
    assert [part[0] for part in util._split_results(content)[1]] == ["## steering_lab\n"]  # fenced lines are text
    assert content.count("### Lab — ") == 1 and "| S | 2 |" in content and "| S | 1 |" not in content
    assert "`bench/steering_lab.py`: the lab." in content and content.count("```text\n## not a heading\n") == 1


def test_record_names_the_section_after_the_calling_script_and_keeps_the_old_signature(util, tmp_path):
    results = tmp_path / "elsewhere" / "RESULTS.md"  # the `results=` argument, as steering_lab passes it
    util.record("Positional", [("row", 1)], ("what", "n"), "notes", results)
    assert sections(results.read_text()) == ["test_bench"]  # this file's stem
    assert not util.RESULTS.exists()


def test_record_keeps_the_file_permissions(util):
    util.record("A", [("r", 1)], HEADER, bench="bench_steering")
    util.RESULTS.chmod(0o640)
    util.record("A", [("r", 2)], HEADER, bench="bench_steering")
    assert util.RESULTS.stat().st_mode & 0o777 == 0o640


def test_results_md_has_one_section_per_script_in_the_fixed_order():
    util = load_bench_util()
    content = (ROOT / "bench" / "RESULTS.md").read_text(encoding="utf-8")
    names = sections(content)
    assert content.startswith("# Benchmark results\n") and "git log -p bench/RESULTS.md" in content.split("\n## ")[0]
    assert len(names) == len(set(names)) and names
    assert names == [n for n in util.BENCH_ORDER if n in names]  # every section is a listed script, in order
    assert all((ROOT / "bench" / f"{n}.py").is_file() for n in util.BENCH_ORDER)
    assert all(" — " in r for r in records(content))
    # Replacing one record leaves every other line of the file as it is.
    lab = next(p for p in util._split_results(content)[1] if p[0] == "## steering_lab\n")
    recs = util._split_section(lab)[1]
    again = util.place_record(content, "steering_lab", "".join(recs[-1]))
    assert again == content


@requires_shared
def test_bench_server_ci(tmp_path):
    out = run_bench_ci("bench_server.py", tmp_path)
    assert "8 clients: total throughput" in out and "rows per decoded batch" in out


def test_a_run_at_another_thread_count_is_another_record(util, monkeypatch):
    for threads, value in ((1, "a"), (2, "b"), (1, "c")):
        monkeypatch.setattr(util, "machine", lambda threads=threads: f"2 CPU cores, {threads} threads")
        util.record("Cost", [("batch 1", value)], HEADER, bench="bench_steering")
    content = util.RESULTS.read_text()
    assert len(records(content)) == 2  # the 1-thread record replaced, the 2-thread one kept
    assert "| batch 1 | c |" in content and "| batch 1 | b |" in content and "| batch 1 | a |" not in content


def test_gpu_check_runs_on_cpu_in_ci_mode_and_speculation_keeps_the_greedy_tokens(tmp_path):
    """bench/gpu_check.py is for a GPU; --ci runs its code path on CPU in float32, where the tokens must be equal."""
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--ci"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("batch ")]
    assert len(lines) == 2 and all("greedy tokens equal: True" in line for line in lines), res.stdout
