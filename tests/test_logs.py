"""Logs that read as logs: with stderr a file (CI, nohup, `> log 2>&1`), progress is whole plain lines.

The scripts run as `python SCRIPT ...` would, with stdout and stderr written to files (forks of one server that
imported torch & co. once: tests/cli_forkserver.py); nothing they write may hold a '\\r' redraw or an escape
sequence, and the bars' final counts and the Trainer's log lines must still be there. LineBar itself is checked
on a fake clock.
"""

from __future__ import annotations

import io
import os
import re
import sys
from weakref import WeakSet

import pytest
import tqdm.auto
from cli_forkserver import ForkServer

from proxytune.foundation import progress
from proxytune.foundation.progress import LINE_INTERVAL, LineBar, configure_progress, progress_as_lines, progress_bar


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg",
           "HF_HOME": str(tmp_path_factory.mktemp("hf_home"))}
    for name in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_DATASETS_DISABLE_PROGRESS_BARS",
                 "HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE", "TQDM_MININTERVAL"):
        env.pop(name, None)  # the scripts must tame the bars themselves
    srv = ForkServer(env, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.close()


def steer_flags(models, data, out):
    return ["--large_model", models["large"], "--small_base_model", models["small_base"], "--small_tuned_model",
            models["small_tuned"], "--large_device", "cpu", "--prompts_file", data, "--batch_size", "4",
            "--max_new_tokens", "4", "--output_dir", out]


def fine_tune_flags(models, data, out):
    return ["--model_name_or_path", models["small_base"], "--dataset_path", data, "--max_length", "128",
            "--max_steps", "2", "--logging_steps", "1", "--report_to", "none", "--num_samples", "1",
            "--max_new_tokens", "3", "--dataloader_num_workers", "0", "--output_dir", out]


def evaluation_flags(models, data, out):
    return ["--dataset_path", data, "--num_examples", "2", "--max_new_tokens", "3", "--bootstrap_samples", "10",
            "--large_model", models["large"], "--small_base_model", models["small_base"], "--output_dir", out]


# script, its flags, and the lines that must be there: each bar's final line, the Trainer's log lines (stdout)
RUNS = {
    "steer.py": (steer_flags, [r"^Loading weights: 100%\|#+\| \d+/\d+ \[", r"^generating: 100%\|#+\| 6/6 \["], []),
    "fine_tune.py": (fine_tune_flags, [r"^Loading weights: 100%\|#+\|", r"^train: 100%\|#+\| 2/2 \["],
                     [r"^\{'loss': .*'epoch'", r"^\{'eval_loss': "]),
    "evaluation.py": (evaluation_flags, [r"^generate: 100%\|#+\| 4/4 \[", r"^scoring: 100%\|#+\| 1/1 \["], []),
}


@pytest.mark.parametrize("script", list(RUNS))
def test_a_script_writing_to_a_file_shows_progress_as_plain_lines(script, server, tiny_model_dirs, jsonl_file,
                                                                  tmp_path):
    flags, err_lines, out_lines = RUNS[script]
    res = server.run(script, flags(tiny_model_dirs, jsonl_file, tmp_path / "out"), tmp_path / "logs")
    assert res.returncode == 0 and not res.timed_out, res.stderr[-3000:]
    for name, text in (("stderr", res.stderr), ("stdout", res.stdout)):
        assert "\x1b[" not in text, f"an escape sequence on {name}:\n{text[-3000:]}"
        assert "\r" not in text, f"a carriage-return redraw on {name}:\n{text[-3000:]}"
    for pattern in err_lines:
        assert re.search(pattern, res.stderr, re.MULTILINE), (pattern, res.stderr[-3000:])
    for pattern in out_lines:
        assert re.search(pattern, res.stdout, re.MULTILINE), (pattern, res.stdout[-3000:])


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock, moved by hand; LineBars counted apart from any other bar of this process."""
    now = [1000.0]
    monkeypatch.setattr("tqdm.std.time", lambda: now[0])
    monkeypatch.setattr(LineBar, "_instances", WeakSet())
    return now


def test_a_line_bar_writes_a_line_per_interval_and_the_final_count(clock):
    log = io.StringIO()
    bar = LineBar(total=100, desc="work", unit="step", file=log)
    bar.update(1)
    clock[0] += LINE_INTERVAL - 1
    bar.update(1)
    assert log.getvalue() == ""  # nothing at the start, nothing before the interval
    clock[0] += 2
    bar.update(1)
    clock[0] += 1
    bar.update(1)
    LineBar.write("a message", file=log)  # as the Trainer prints its logs: the bar is not redrawn after it
    clock[0] += 1
    bar.close()
    lines = log.getvalue().splitlines()
    assert lines == [
        "work:   3%|3         | 3/100 [00:11<05:55,  3.67s/step]",  # 3 steps in 11 s: the first line
        "a message",
        "work:   4%|4         | 4/100 [00:13<05:12,  3.25s/step]",  # closed: the final count, the overall rate
    ]
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_nested_line_bars_collapse_to_the_outer_one(clock):
    log = io.StringIO()
    with LineBar(total=2, desc="outer", file=log, leave=False) as outer:
        for _ in range(2):
            for _ in LineBar(range(3), desc="inner", file=log, position=1, leave=False):
                clock[0] += LINE_INTERVAL
            outer.update(1)
    assert log.getvalue().splitlines() == [
        "outer:  50%|#####     | 1/2 [00:30<00:30, 30.00s/it]",
        "outer: 100%|##########| 2/2 [01:00<00:00, 30.00s/it]",  # kept, though leave=False; close adds no copy
    ]
    with LineBar(total=1, desc="after", file=log) as after:  # no bar open any more: this one shows
        after.update(1)
    assert log.getvalue().splitlines()[-1].startswith("after: 100%|##########| 1/1")


def test_progress_bar_is_tqdms_own_on_a_terminal_and_a_line_bar_on_a_log(monkeypatch, clock):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress, "_as_lines", False)
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert configure_progress() is False and not progress_as_lines()  # on a terminal: nothing changes
    with progress_bar(range(2), file=io.StringIO()) as bar:
        assert type(bar) is tqdm.auto.tqdm
    monkeypatch.setattr(progress, "_as_lines", True)
    with progress_bar(range(2), file=io.StringIO()) as bar:
        assert type(bar) is LineBar
