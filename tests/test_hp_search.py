"""Tests for proxytune/training/hp_search.py through fine_tune.py --hp_search: real tiny fine-tunes as trials
(fresh tiny GPT-NeoX, the tiny tokenizer), best.yaml re-run, two worker processes on one SQLite study, pruning, and
bad spaces."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import ROOT, make_rows

import fine_tune
from proxytune.foundation.errors import UsageError
from proxytune.training import hp_search
from proxytune.training.arguments import DataArguments, FineTuneTrainingArguments, ModelArguments, parse_args

QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(16)), encoding="utf-8")
    return path


def base_flags(data_file: Path, tokenizer_dir: Path) -> list[str]:
    """A fresh tiny GPT-NeoX on 16 fixture meta-reviews: 4 steps, evaluated and saved every 2."""
    return [*QUIET, "--config_name", "tiny", "--tokenizer_name", str(tokenizer_dir), "--dataset_path", str(data_file),
            "--max_length", "128", "--validation_split_percentage", "25", "--max_steps", "4", "--save_steps", "2",
            "--per_device_train_batch_size", "2", "--num_samples", "0", "--warmup_steps", "0", "--seed", "5"]


def write_space(path: Path, parameters: dict) -> Path:
    path.write_text(yaml.safe_dump({"parameters": parameters}), encoding="utf-8")
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_grid_runs_every_point_and_best_yaml_reproduces_the_best_trial(tmp_path, data_file, tiny_tokenizer_dir):
    space = write_space(tmp_path / "space.yaml", {"learning_rate": ["3e-3", "1e-4"], "batch_size": [2, 4],
                                                  "epochs": 1})
    out = tmp_path / "search"
    flags = [*base_flags(data_file, tiny_tokenizer_dir), "--hp_search", str(space), "--hp_pruner_startup_trials", "-1",
             "--output_dir", str(out)]
    result = fine_tune.main(*parse_args(flags))
    summary = json.loads((out / "hp_search.json").read_text())
    assert summary["sampler"] == "grid" and summary["grid_points"] == 4 and summary["counts"]["COMPLETE"] == 4
    points = {(t["params"]["learning_rate"], t["params"]["per_device_train_batch_size"]) for t in summary["trials"]}
    assert points == {(3e-3, 2), (3e-3, 4), (1e-4, 2), (1e-4, 4)}
    # Each trial is a normal run: its own directory, final/ with a validation loss equal to the objective.
    for t in summary["trials"]:
        run_dir = out / f"trial-{t['number']}"
        metrics = json.loads((run_dir / "final" / "metrics.json").read_text())
        assert metrics["eval_loss"] == pytest.approx(t["objective"])
        assert (out / f"trial-{t['number']}.yaml").is_file()
    rows = read_csv(out / "trials.csv")
    assert len(rows) == 4 and {r["state"] for r in rows} == {"COMPLETE"} and "learning_rate" in rows[0]
    assert (out / "hp_search.png").stat().st_size > 0
    best = result["best"]
    assert best["objective"] == min(t["objective"] for t in summary["trials"])

    # best.yaml: the base flags + the winner's parameters, no hp_* flags; it trains the winner again.
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert not any(k.startswith("hp_") for k in config)
    assert config["learning_rate"] == best["params"]["learning_rate"] and config["num_train_epochs"] == 1
    rerun = fine_tune.main(*parse_args([str(out / "best.yaml"), *QUIET]))
    assert rerun["status"] == "trained" and Path(rerun["final_dir"]).parent == out / "best"
    assert rerun["metrics"]["eval_loss"] == pytest.approx(best["objective"], rel=1e-5)

    # The same command again finds the study finished: no new trials.
    again = fine_tune.main(*parse_args(flags))
    assert len(again["summary"]["trials"]) == 4


def test_two_workers_share_one_sqlite_study(tmp_path, data_file, tiny_tokenizer_dir):
    space = write_space(tmp_path / "space.yaml", {"learning_rate": [3e-3, 1e-3], "warmup_steps": [0.0, 0.5]})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    flags = [*base_flags(data_file, tiny_tokenizer_dir), "--max_steps", "2", "--hp_search", str(space),
             "--hp_storage", storage, "--hp_study_name", "shared", "--output_dir", str(tmp_path / "search")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    workers = [subprocess.Popen([sys.executable, str(ROOT / "fine_tune.py"), *flags], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(log[-3000:] for log in logs)

    import optuna

    study = optuna.load_study(study_name="shared", storage=storage)
    # A worker that asked for a trial as the other took the last point records it as skipped, untrained.
    trials = [t for t in study.trials if not t.user_attrs.get("skipped")]
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == len(trials)  # nothing failed, nothing left running
    points = [(t.params["learning_rate"], t.params["warmup_steps"]) for t in finished]
    assert len(points) == 4 and len(set(points)) == 4  # the whole grid, no point trained twice
    # Both workers trained: each logged trials of its own.
    trained_by = [{int(n) for n in __import__("re").findall(r"trial (\d+)(?: \(retry of \d+\))?: \{", log)}
                  for log in logs]
    assert all(trained_by) and not (trained_by[0] & trained_by[1])


def test_a_trial_behind_the_median_is_recorded_as_pruned(tmp_path, data_file, tiny_tokenizer_dir):
    import optuna

    space = write_space(tmp_path / "space.yaml", {"learning_rate": {"low": 1e-5, "high": 1e-4, "log": True}})
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # A finished trial whose validation loss was 0 at every evaluation: any real trial falls behind it.
    study = optuna.create_study(study_name="prune", storage=storage, direction="minimize")
    study.add_trial(optuna.trial.create_trial(
        params={"learning_rate": 5e-5}, distributions={"learning_rate": optuna.distributions.FloatDistribution(
            1e-5, 1e-4, log=True)}, value=0.0, intermediate_values={2: 0.0, 4: 0.0}))
    out = tmp_path / "search"
    result = fine_tune.main(*parse_args([*base_flags(data_file, tiny_tokenizer_dir), "--hp_search",
                                                   str(space), "--hp_trials", "2", "--hp_storage", storage,
                                                   "--hp_study_name", "prune", "--hp_pruner_startup_trials", "1",
                                                   "--output_dir", str(out)]))
    states = {t["number"]: t["state"] for t in result["summary"]["trials"]}
    assert states == {0: "COMPLETE", 1: "PRUNED"}
    assert [r["state"] for r in read_csv(out / "trials.csv")] == ["COMPLETE", "PRUNED"]
    run_dir = out / "trial-1"
    assert not (run_dir / "final").exists()  # stopped at its first evaluation (step 2)...
    # pruned at its first evaluation, before that save
    assert (out / "trial-1.yaml").is_file() and (run_dir / "checkpoint-2").is_dir() is False


def test_a_failed_trial_stays_failed_and_its_point_is_retried_in_its_directory(tmp_path, data_file,
                                                                              tiny_tokenizer_dir, monkeypatch):
    """A worker dies in trial 0 after its first checkpoint: the trial is recorded as failed, never as done; the next
    run retries that grid point in trial-0/, resuming from the checkpoint."""
    import optuna
    from transformers import TrainerCallback

    class Die(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise RuntimeError("worker killed")

    real_main = fine_tune.main
    monkeypatch.setattr(fine_tune, "main", lambda *a, callbacks=(): real_main(*a, callbacks=[*callbacks, Die()]))
    space = write_space(tmp_path / "space.yaml", {"learning_rate": [3e-3, 1e-3]})
    out = tmp_path / "search"
    flags = [*base_flags(data_file, tiny_tokenizer_dir), "--hp_search", str(space), "--hp_pruner_startup_trials", "-1",
             "--output_dir", str(out)]
    with pytest.raises(RuntimeError, match="worker killed"):
        hp_search.run_search(*parse_args(flags), train=fine_tune.main)
    assert (out / "trial-0" / "checkpoint-2").is_dir() and not (out / "trial-0" / "final").exists()
    saved = (out / "trial-0" / "checkpoint-2" / "optimizer.pt").stat().st_mtime_ns
    monkeypatch.setattr(fine_tune, "main", real_main)

    result = hp_search.run_search(*parse_args(flags), train=fine_tune.main)
    rows = {r["number"]: r for r in result["summary"]["trials"]}
    assert rows[0]["state"] == "FAIL"
    complete = [r for r in rows.values() if r["state"] == "COMPLETE"]
    assert sorted(r["params"]["learning_rate"] for r in complete) == [1e-3, 3e-3]
    retry = next(r for r in complete if r["retry_of"] == 0)
    assert retry["run_dir"] == str(out / "trial-0") and retry["params"] == rows[0]["params"]
    state = json.loads((out / "trial-0" / "final" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and not (out / f"trial-{retry['number']}").exists()
    # Resumed, not trained again from step 0 (which would have rewritten checkpoint-2).
    assert (out / "trial-0" / "checkpoint-2" / "optimizer.pt").stat().st_mtime_ns == saved
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'hp_search.db'}")
    assert sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials) == 1


def test_model_and_data_flags_are_searched_too(tmp_path, tiny_model_dirs, tiny_tokenizer_dir):
    """LoRA on plain text, a grid over lora_r (a ModelArguments field, which Trainer.hyperparameter_search would
    skip): each trial's adapter has its own rank."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(make_rows(1)[0]["Input"] + f" {i}" for i in range(40)), encoding="utf-8")
    space = write_space(tmp_path / "space.yaml", {"lora_r": [2, 4]})
    out = tmp_path / "search"
    fine_tune.main(*parse_args([
        *QUIET, "--model_name_or_path", str(tiny_model_dirs["small_base"]), "--use_lora", "--dataset_path", str(text),
        "--text_column", "text", "--max_length", "32", "--max_steps", "2", "--save_steps", "2", "--num_samples", "0",
        "--learning_rate", "1e-3", "--hp_search", str(space), "--hp_pruner_startup_trials", "-1",
        "--output_dir", str(out)]))
    summary = json.loads((out / "hp_search.json").read_text())
    ranks = {}
    for t in summary["trials"]:
        adapter = json.loads((out / f"trial-{t['number']}" / "final" / "adapter_config.json").read_text())
        ranks[t["params"]["lora_r"]] = adapter["r"]
    assert ranks == {2: 2, 4: 4}
    assert yaml.safe_load((out / "best.yaml").read_text())["use_lora"] is True


@pytest.mark.parametrize("parameters, trials, message", [
    ({}, None, "searches nothing"),
    ({"epochs": 2}, None, "searches nothing"),
    ({"learning_rate": [1e-4]}, None, "lists 1 value(s); a search needs at least 2"),
    ({"learning_rate": {"low": 1e-3, "high": 1e-4}}, 3, "low 0.001 > high 0.0001"),
    ({"learning_rate": [1e-3, 1e-4], "batch_size": [2, 4]}, 3, "which has 4 points"),
    ({"learnin_rate": [1e-3, 1e-4]}, None, "unknown key 'learnin_rate' in space file"),
    ({"learning_rate": {"low": 1e-5, "high": 1e-3}}, None, "pass --hp_trials N"),
    ({"learning_rate": [1e-3, -1.0]}, None, "'learning_rate' value -1.0"),
])
def test_bad_spaces_are_refused_before_any_training(tmp_path, data_file, tiny_tokenizer_dir, parameters, trials,
                                                    message):
    space = write_space(tmp_path / "space.yaml", parameters)
    flags = [*base_flags(data_file, tiny_tokenizer_dir), "--hp_search", str(space), "--output_dir",
             str(tmp_path / "search")]
    if trials is not None:
        flags += ["--hp_trials", str(trials)]
    with pytest.raises(UsageError) as err:
        fine_tune.main(*parse_args(flags))
    assert message in str(err.value)
    if "space file" in message or "points" in message:
        assert str(space) in str(err.value)
    assert not (tmp_path / "search" / "trial-0").exists()


def test_space_parsing_keeps_grid_ranges_and_fixed_apart(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"parameters": {"learning_rate": [1e-3, 5e-4, 1e-4], "batch_size": [16, 32, 64],
                                               "warmup_ratio_is_not_a_flag": 1}}))
    with pytest.raises(UsageError, match="unknown key 'warmup_ratio_is_not_a_flag'"):
        hp_search.parse_space(path, [ModelArguments, DataArguments,
                                     FineTuneTrainingArguments])
    path.write_text(json.dumps({"learning_rate": {"low": "1e-5", "high": 1e-3, "log": True}, "epochs": 3,
                                "lora_r": [8, 16]}))
    space = hp_search.parse_space(path, [ModelArguments, DataArguments,
                                         FineTuneTrainingArguments])
    assert space.grid == {"lora_r": [8, 16]} and space.fixed == {"num_train_epochs": 3}
    assert space.ranges == {"learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}} and not space.is_grid
    assert hp_search.redact_url("postgresql://me:secret@db.host/optuna") == "postgresql://me:***@db.host/optuna"


def test_a_worker_that_loses_the_schema_race_retries(tmp_path, monkeypatch):
    """Two workers creating one sqlite study at once: the loser's INSERT of the schema version fails (sqlite:
    UNIQUE constraint on alembic_version); it must retry and open the study, not stop with an error."""
    import types

    import optuna.storages

    from proxytune.training import hp_search

    real, calls = optuna.storages.RDBStorage, []

    class racing_storage(real):  # a subclass: optuna checks isinstance(storage, RDBStorage)
        def __init__(self, url, **kw):
            calls.append(url)
            if len(calls) == 1:
                raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: alembic_version.version_num")
            super().__init__(url, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing_storage)
    monkeypatch.setattr(hp_search.time, "sleep", lambda s: None)
    space = hp_search.Space("space.yaml", grid={"learning_rate": [1e-3, 3e-3]}, ranges={}, fixed={})
    args = types.SimpleNamespace(hp_storage=f"sqlite:///{tmp_path / 'study.db'}", hp_pruner_startup_trials=-1,
                                 hp_study_name="raced", hp_direction="minimize")
    study, _ = hp_search.open_study(args, space, tmp_path, seed=0)
    assert len(calls) == 2 and study.study_name == "raced"


# ---------------------------------------------------------------------------------------------
# A worker killed mid-trial, and workers still running: the reports cover the finished trials, and say what is missing
# ---------------------------------------------------------------------------------------------
class LogLines(logging.Handler):
    """The library's log records (run_search's setup_logging replaces the root handlers, caplog's among them)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def hp_log():
    handler, logger = LogLines(), logging.getLogger("proxytune")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


# `python fine_tune.py ARGS` with a tests/cli_forkserver.py hook: it stops (sleeps) at the hooked call, to be killed.
HOOKED = ("import json, runpy, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
          "from cli_forkserver import install_hook; install_hook(json.loads(sys.argv[3])); "
          "sys.argv = sys.argv[4:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_worker_gone_means_a_dead_process_of_this_host_only():
    here = hp_search.this_worker()
    assert not hp_search.worker_gone(here) and not hp_search.worker_gone(None)
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    zombie = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(alive.pid).create_time()
        assert hp_search.worker_gone({**here, "pid": ended.pid})
        assert not hp_search.worker_gone({**here, "pid": alive.pid, "started": started})
        # The pid of a live process that started at another time: the recorded worker's pid, recycled.
        assert hp_search.worker_gone({**here, "pid": alive.pid, "started": started - 60})
        # Killed, not yet reaped by its parent.
        zombie.kill()
        deadline = time.monotonic() + 30
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert hp_search.worker_gone({**here, "pid": zombie.pid, "started": psutil.Process(zombie.pid).create_time()})
        # Another host, or another pid namespace (a container), can never be proved gone from here.
        assert not hp_search.worker_gone({**here, "pid": ended.pid, "host": here["host"] + "-other"})
        assert not hp_search.worker_gone({**here, "pid": ended.pid, "pid_namespace": "pid:[1]"})
        assert not hp_search.worker_gone({"host": here["host"], "pid_namespace": here["pid_namespace"]})
    finally:
        for proc in (alive, zombie):
            proc.kill()
            proc.wait()


def test_a_search_killed_and_rerun_at_once_finishes_its_grid_with_one_rerun(tmp_path, data_file, tiny_tokenizer_dir,
                                                                           hp_log):
    """SIGKILL in trial 1 of a 3-point grid (trial 0 done; trial 1's checkpoint-2 written, checkpoint-4 being
    written), then the same command at once, well within the heartbeat's GRACE_S: that one run retries trial 1 in
    trial-1/ from checkpoint-2, trains the third point, and best.yaml covers 3 of 3 points."""
    import optuna

    space = write_space(tmp_path / "space.yaml", {"learning_rate": [3e-3, 1e-3, 1e-4]})
    out, marker = tmp_path / "search", tmp_path / "marker"
    flags = [*base_flags(data_file, tiny_tokenizer_dir), "--hp_search", str(space), "--hp_pruner_startup_trials",
             "-1", "--output_dir", str(out)]
    hook = {"kind": "pause", "target": "torch:save", "match": "trial-1/checkpoint-4", "marker": str(marker)}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    worker = subprocess.Popen([sys.executable, "-c", HOOKED, str(ROOT), str(ROOT / "tests"), json.dumps(hook),
                               str(ROOT / "fine_tune.py"), *flags], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=(tmp_path / "worker.log").open("w"))
    deadline = time.monotonic() + 400
    try:
        while not marker.exists():
            assert worker.poll() is None and time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.01)
    finally:
        worker.send_signal(signal.SIGKILL)  # also when the wait failed: no paused process is left behind
        worker.wait()
    assert worker.returncode == -signal.SIGKILL
    saved = (out / "trial-1" / "checkpoint-2" / "optimizer.pt").stat().st_mtime_ns
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'hp_search.db'}")
    # Trial 1 stays RUNNING: Optuna's heartbeat check would fail it only after GRACE_S of silence.
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]

    result = fine_tune.main(*parse_args(flags))
    assert any(line.startswith(f"trial 1 was left running by process {worker.pid} of this host, which is gone")
               for line in hp_log), hp_log
    assert any("resuming from checkpoint-2" in line for line in hp_log), hp_log
    assert not any("MISSING" in line or line.startswith("waiting for") for line in hp_log), hp_log
    summary = json.loads((out / "hp_search.json").read_text())
    assert summary == json.loads(json.dumps(result["summary"]))
    assert summary["missing_points"] == 0 and summary["finished_points"] == 3 and summary["missing"] == []
    rows = {r["number"]: r for r in summary["trials"]}
    assert rows[1]["state"] == "FAIL" and summary["counts"]["RUNNING"] == 0 and summary["counts"]["WAITING"] == 0
    complete = [r for r in rows.values() if r["state"] == "COMPLETE"]
    assert sorted(r["params"]["learning_rate"] for r in complete) == [1e-4, 1e-3, 3e-3]
    retry = next(r for r in complete if r["retry_of"] == 1)
    assert retry["run_dir"] == str(out / "trial-1") and retry["params"] == rows[1]["params"]
    # Resumed from checkpoint-2 (not trained again from step 0, which would have rewritten it).
    assert (out / "trial-1" / "checkpoint-2" / "optimizer.pt").stat().st_mtime_ns == saved
    assert json.loads((out / "trial-1" / "final" / "trainer_state.json").read_text())["global_step"] == 4
    assert "RUNNING" not in {r["state"] for r in read_csv(out / "trials.csv")}
    header = (out / "best.yaml").read_text().splitlines()[0]
    assert "over 3 of 3 grid points:" in header and "MISSING" not in header
    assert summary["best"]["objective"] == min(r["objective"] for r in complete)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_live_workers_trial_is_waited_for_or_left_with_hp_no_wait(tmp_path, data_file, tiny_tokenizer_dir,
                                                                     monkeypatch, hp_log):
    """Another worker of this host (a live process) runs trial 0 of a 3-point grid. With --hp_no_wait a worker trains
    the two other points and leaves: hp_search.json, best.yaml and the log say 1 point is missing. Without it, the
    next worker waits (saying for which trial) until trial 0 finishes, then reports 3 of 3."""
    import optuna

    space_file = write_space(tmp_path / "space.yaml", {"learning_rate": [3e-3, 1e-3, 1e-4]})
    out = tmp_path / "search"
    out.mkdir()
    flags = [*base_flags(data_file, tiny_tokenizer_dir), "--hp_search", str(space_file),
             "--hp_pruner_startup_trials", "-1", "--output_dir", str(out)]
    space = hp_search.parse_space(space_file, [ModelArguments, DataArguments, FineTuneTrainingArguments])
    args = types.SimpleNamespace(hp_storage=None, hp_pruner_startup_trials=-1, hp_study_name=None,
                                 hp_direction="minimize")
    study, _ = hp_search.open_study(args, space, out, seed=5)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        trial = study.ask()
        point = space.suggest(trial)
        trial.set_user_attr("worker", {**hp_search.this_worker(), "pid": other.pid, "trial": trial.number,
                                       "started": psutil.Process(other.pid).create_time()})

        # 1. --hp_no_wait: the two other points, then the reports over them, saying what is missing.
        result = fine_tune.main(*parse_args([*flags, "--hp_no_wait", "true"]))
        summary = json.loads((out / "hp_search.json").read_text())
        assert summary == json.loads(json.dumps(result["summary"]))
        assert summary["counts"] == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 0, "RUNNING": 1, "WAITING": 0}
        assert summary["missing_points"] == 1 and summary["finished_points"] == 2 and summary["missing"] == [point]
        assert summary["best"]["number"] != 0 and summary["best"]["params"] != point
        header = (out / "best.yaml").read_text().splitlines()[0]
        assert "over 2 of 3 grid points, 1 MISSING" in header
        assert any(line.startswith(f"leaving trial(s) 0 (pid {other.pid} on ") for line in hp_log), hp_log
        assert any("cover 2 of the 3 grid points: 1 MISSING" in line for line in hp_log), hp_log
        assert study.trials[0].state == optuna.trial.TrialState.RUNNING  # a live worker's trial is never taken

        # 2. Without the flag: nothing left to train, so it waits; the other worker finishes trial 0 meanwhile.
        hp_log.clear()
        polls = []

        def poll(seconds):
            assert not any("cover" in line for line in hp_log)  # no report before the wait ends
            polls.append(seconds)
            # The other worker's own Study object (a GridSampler's stops the optimize loop it is told in).
            optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'hp_search.db'}").tell(
                trial.number, 0.0)  # better than any real trial: trial 0 becomes the best

        monkeypatch.setattr(hp_search, "time", types.SimpleNamespace(sleep=poll))
        result = fine_tune.main(*parse_args(flags))
    finally:
        other.kill()
        other.wait()
    summary = result["summary"]
    assert polls == [hp_search.POLL_S]
    assert any(line.startswith(f"waiting for trial(s) 0 (pid {other.pid} on ") for line in hp_log), hp_log
    assert summary["counts"]["COMPLETE"] == 3 and len(summary["trials"]) == 3  # nothing trained twice
    assert summary["missing_points"] == 0 and summary["missing"] == [] and summary["best"]["number"] == 0
    assert not any("MISSING" in line for line in hp_log)
    header = (out / "best.yaml").read_text().splitlines()[0]
    assert "over 3 of 3 grid points:" in header and "MISSING" not in header
    assert yaml.safe_load((out / "best.yaml").read_text())["learning_rate"] == point["learning_rate"]
