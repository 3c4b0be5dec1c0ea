"""Hyperparameter search for fine_tune.py: a grid or ranges over its own flags, run by Optuna, on one machine or many.

A 3 x 3 grid over the learning rate and batch size (every point once), the rest from a base config:
    python fine_tune.py base.yaml --hp_search space.yaml --output_dir outputs/hp-lr-bs

Several workers pulling trials from one study (a Slurm array does the same with a PostgreSQL URL):
    for i in 1 2; do python fine_tune.py base.yaml --hp_search space.yaml --hp_storage sqlite:///study.db \
        --hp_study_name lr-bs --output_dir outputs/hp-lr-bs & done; wait

Train the winner again (a cascading config like any other):
    python fine_tune.py outputs/hp-lr-bs/best.yaml

The space file takes the grid shape of the IPA-GPT library (a list = values to try, a scalar = fixed), and ranges:
    parameters:
      learning_rate: [1.0e-3, 5.0e-4, 1.0e-4]      # searched (a grid when every searched key is a list)
      batch_size: [16, 32]                           # alias of per_device_train_batch_size
      warmup_steps: {low: 0.0, high: 0.2}            # a range (then TPE samples; log: true for a log scale)
      epochs: 3                                      # fixed (alias of num_train_epochs)

Why not Trainer.hyperparameter_search: it sets only TrainingArguments fields on one shared Trainer (a searched
max_length or lora_r is skipped with a warning), writes run-<n>/checkpoint-* with none of fine_tune.py's resume
checks or final/, and creates the study itself. Here each trial is a normal fine_tune.main run in
--output_dir/trial-<n>/ (resumable, with final/), inside study.optimize, and a callback reports every evaluation
to Optuna for pruning, as the Trainer's own _report_to_hp_search does.

Layout of --output_dir:
    trial-<n>/               trial n's run (fine_tune.py's usual layout; re-running resumes it)
    trial-<n>.yaml           trial n's whole config: `python fine_tune.py trial-<n>.yaml` runs (or resumes) it
    hp_search.db             the study (when no --hp_storage is given); re-running the command continues it
    hp_search.json           the search: space, sampler, objective, best trial, every trial, points missing
    trials.csv               one row per trial: number, state, objective, parameters, start, seconds, run dir
    hp_search.png            objective by trial (and parameter importances where Optuna can compute them)
    best.yaml                the base config + the winning parameters: `python fine_tune.py best.yaml`

The reports are written when this worker has nothing left to run and no other live worker runs a trial (it waits
for them; --hp_no_wait leaves at once), over the finished trials; they say how many points have none yet.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import itertools
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml
from transformers import TrainerCallback

from proxytune.foundation.cli import setup_logging
from proxytune.foundation.config import read_config_file, to_jsonable
from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.outputs import write_json
from proxytune.training.arguments import DataArguments, FineTuneTrainingArguments, ModelArguments, parse_args

logger = logging.getLogger(__name__)


ALIASES = {"batch_size": "per_device_train_batch_size", "epochs": "num_train_epochs"}


TRIAL_DIR = "trial-{number}"


TRIAL_CONFIG = "trial-{number}.yaml"  # beside trial-<n>/, which fine_tune.py wants empty or its own


BEST_CONFIG = "best.yaml"


DEFAULT_DB = "hp_search.db"


# Settings never copied into a trial's or the winner's config: where it writes, and the search itself.
NOT_COPIED = {"output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir"}


# A worker that stops sending heartbeats for GRACE_S seconds is dead: its trial is marked failed and retried (at most
# MAX_RETRY times) in the same run directory, so the retry resumes from the dead worker's last checkpoint.
HEARTBEAT_S = 30


GRACE_S = 120


MAX_RETRY = 2


# A trial also records its worker (host, pid namespace, pid, process start time): a worker of this host that finds
# a running trial whose process is gone fails and retries it at once instead of waiting GRACE_S for the heartbeat.
# A trial of a live worker is waited for, polling every POLL_S seconds (or left running with --hp_no_wait).
POLL_S = 10.0


# Process start times read from /proc can differ by a clock tick between reads; a recycled pid starts seconds later.
START_TOLERANCE_S = 1.0


@dataclass
class Space:
    """A parsed space file: `grid` (key -> values), `ranges` (key -> {low, high, log}), `fixed` (key -> value)."""

    path: str
    grid: dict[str, list]
    ranges: dict[str, dict]
    fixed: dict[str, Any]

    @property
    def is_grid(self) -> bool:
        return not self.ranges

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid.values())

    def suggest(self, trial) -> dict[str, Any]:
        """The trial's values of every searched key (Optuna records them as trial.params)."""
        params = {k: trial.suggest_categorical(k, v) for k, v in self.grid.items()}
        for k, r in self.ranges.items():
            integer = isinstance(r["low"], int) and isinstance(r["high"], int) and not r["log"]
            suggest = trial.suggest_int if integer else trial.suggest_float
            params[k] = suggest(k, r["low"], r["high"], log=r["log"])
        return params


def known_keys(dataclass_types) -> set[str]:
    """fine_tune.py's flags that a trial may set: all but the search's own and where it writes."""
    names = {f.name for t in dataclass_types for f in dataclasses.fields(t) if f.init}
    return {n for n in names if not n.startswith("hp_") and n not in NOT_COPIED}


def as_number(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; `as_number("1e-3")` -> 0.001, `as_number("cosine")` -> 'cosine'."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_space(path: str | Path, dataclass_types, check_value=None) -> Space:
    """Read a space file; every problem (unknown key, one-value list, low > high, ...) is raised at once.

    `parse_space("space.yaml", ...)` with `{parameters: {learning_rate: [1e-3, 1e-4], epochs: 3}}` ->
    Space(grid={'learning_rate': [0.001, 0.0001]}, ranges={}, fixed={'num_train_epochs': 3}).
    `check_value(key, value)` returns a problem or None (fine_tune.py's own parsing and checks of one value).
    """
    raw = read_config_file(path)
    raw = raw["parameters"] if "parameters" in raw else raw  # IPA-GPT's {"parameters": {...}}, or the mapping itself
    if not isinstance(raw, dict):
        raise UsageError(f"space file {path}: 'parameters' must be a mapping of flag names to values")
    known = known_keys(dataclass_types)
    problems: list[str] = []
    grid, ranges, fixed = {}, {}, {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known | set(ALIASES)), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "keys are fine_tune.py's flags (see --help)"
            problems.append(f"unknown key '{key}' in space file {path}; {hint}")
            continue
        if name in grid or name in ranges or name in fixed:
            problems.append(f"space file {path}: '{key}' is given twice (directly and as an alias)")
            continue
        if isinstance(value, list):
            value = [as_number(v) for v in value]
            if len(value) < 2:
                problems.append(f"space file {path}: '{key}' lists {len(value)} value(s); a search needs at least 2 "
                                f"(write '{key}: {value[0] if value else '...'}' to fix it)")
            elif len(set(map(repr, value))) < len(value):
                problems.append(f"space file {path}: '{key}' lists a value twice: {value}")
            else:
                grid[name] = value
            candidates = value
        elif isinstance(value, dict):
            extra = set(value) - {"low", "high", "log"}
            low, high, log = as_number(value.get("low")), as_number(value.get("high")), bool(value.get("log", False))
            if extra or low is None or high is None:
                problems.append(f"space file {path}: '{key}' range must be {{low, high[, log]}}, got {value}")
                continue
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                problems.append(f"space file {path}: '{key}' range bounds must be numbers, got {value}")
                continue
            if low > high:
                problems.append(f"space file {path}: '{key}' range has low {low} > high {high}; swap them")
            elif low == high:
                problems.append(f"space file {path}: '{key}' range has low = high = {low}; write '{key}: {low}'")
            elif log and low <= 0:
                problems.append(f"space file {path}: '{key}' log range needs low > 0, got {low}")
            else:
                ranges[name] = {"low": low, "high": high, "log": log}
            candidates = [low, high]
        else:
            fixed[name] = value = as_number(value)
            candidates = [value]
        if check_value is not None:
            for v in candidates:
                problem = check_value(name, v)
                if problem:
                    problems.append(f"space file {path}: '{key}' value {v!r}: {problem}")
                    break
    if not problems and not grid and not ranges:
        problems.append(f"space file {path} searches nothing: give a key a list of values ([1e-4, 3e-4]) or a range "
                        "({low: 1e-5, high: 1e-3, log: true})")
    raise_problems(problems)
    return Space(str(path), grid, ranges, fixed)


def base_settings(model_args, data_args, training_args) -> dict[str, Any]:
    """The settings of this run that differ from fine_tune.py's defaults, without the search's own flags."""

    defaults = to_jsonable(*parse_args([]))
    given = to_jsonable(model_args, data_args, training_args)
    return {k: v for k, v in given.items()
            if defaults.get(k) != v and k not in NOT_COPIED and not k.startswith("hp_") and v != "<redacted>"}


def write_config(path: Path, settings: dict[str, Any], comment: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(f"# {comment}\n" + yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


class OptunaPruningCallback(TrainerCallback):
    """Report every evaluation's objective to the trial; stop the trial when the pruner says it falls behind.

    The exception leaves Trainer.train as Trainer._report_to_hp_search's does; the checkpoints written so far stay.
    """

    def __init__(self, trial, objective: str):
        self.trial, self.objective, self.reported = trial, objective, set()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import optuna

        # evaluate_final (proxytune.training.tasks) evaluates the best model once more at the last step: one value per
        # step.
        if not metrics or self.objective not in metrics or state.global_step in self.reported:
            return
        self.reported.add(state.global_step)
        self.trial.report(float(metrics[self.objective]), state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"{self.objective} {metrics[self.objective]:.4f} at step {state.global_step} "
                                     "is behind the median of earlier trials")


def open_study(data_args, space: Space, out: Path, seed: int):
    """Create or load the study in its RDB storage (sqlite file or server), with the sampler and pruner."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # Heartbeats and their retry callback are "experimental" since Optuna 2.8; they are what marks a dead worker's
    # trial.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = data_args.hp_storage or f"sqlite:///{(out / DEFAULT_DB).resolve()}"
    for attempt in range(3):
        try:
            storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                 heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
                                 engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None)
            break
        except Exception as err:  # sqlalchemy: bad URL, missing driver, unreachable server, a race creating tables
            # Two workers started together both create the schema: the loser sees "table ... already exists" or,
            # when both insert the schema's version row, "UNIQUE constraint failed: alembic_version...".
            racing = "already exists" in str(err) or "UNIQUE constraint failed: alembic_version" in str(err)
            if attempt == 2 or not racing:
                raise UsageError(f"--hp_storage {redact_url(url)}: cannot open it ({' '.join(str(err).split())[:200]});"
                                 " use sqlite:///path/study.db or postgresql://user:password@host/db") from None
            time.sleep(1 + attempt)  # the winner has finished the schema by then
    # Every worker samples with the same seed: the grid's order is then the same everywhere (Optuna's advice), and
    # trial n takes grid point n, so no two workers train the same point.
    sampler = (optuna.samplers.GridSampler(space.grid, seed=seed) if space.is_grid
               else optuna.samplers.TPESampler(seed=seed))
    pruner = (optuna.pruners.NopPruner() if data_args.hp_pruner_startup_trials < 0
              else optuna.pruners.MedianPruner(n_startup_trials=data_args.hp_pruner_startup_trials))
    name = data_args.hp_study_name or out.resolve().name
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, pruner=pruner,
                                    direction=data_args.hp_direction, load_if_exists=True)
    except ValueError as err:
        raise UsageError(f"study '{name}' in {url}: {err}") from None
    if study.direction.name.lower() != data_args.hp_direction:
        raise UsageError(f"study '{name}' in {url} was created to {study.direction.name.lower()}; pass "
                         f"--hp_direction {study.direction.name.lower()} or another --hp_study_name")
    return study, url


def make_objective(space: Space, base: dict[str, Any], out: Path, objective: str, train: Callable[..., dict]):
    """The function study.optimize calls: write trial-<n>.yaml, run `train` (fine_tune.py's main) on it (in
    trial-<n>/), return the objective of its final (best-checkpoint) model."""
    import optuna


    def run_trial(trial) -> float:
        # First, so that a worker of this host finding the trial running can tell whether this process still lives.
        trial.set_user_attr("worker", {**this_worker(), "trial": trial.number})
        # RetryHeartbeatStaleTrialCallback marks a retry with the number of the trial it retries: the retry resumes
        # in that trial's run directory, from the dead worker's last complete checkpoint.
        # So does a point re-queued after a failure (requeue_failed_points).
        frozen = trial.study._storage.get_trial(trial._trial_id)
        retry = frozen.system_attrs.get("failed_trial")
        params = space.suggest(trial)
        if space.is_grid and taken_by_another(trial, params, retry is not None):
            # GridSampler hands out a point still running elsewhere once none is left unstarted; never train it twice.
            trial.set_user_attr("skipped", "grid point taken by another trial")
            raise optuna.TrialPruned("this grid point is taken by another trial")
        number = retry if retry is not None else trial.number
        run_dir = out / TRIAL_DIR.format(number=number)
        config = out / TRIAL_CONFIG.format(number=number)
        settings = {**base, **space.fixed, **params, "output_dir": str(run_dir)}
        write_config(config, settings, f"hp_search trial {trial.number} of study '{trial.study.study_name}': "
                     f"python fine_tune.py {config}")
        trial.set_user_attr("run_dir", str(run_dir))
        logger.info("trial %d%s: %s -> %s", trial.number, f" (retry of {retry})" if retry is not None else "",
                    params, run_dir)
        result = train(*parse_args([str(config)]), callbacks=[OptunaPruningCallback(trial, objective)])
        metrics = result["metrics"]
        if objective not in metrics:
            names = sorted(k for k in metrics if k.startswith("eval_"))
            raise UsageError(f"--hp_objective {objective} is not among the validation metrics ({', '.join(names)})")
        return float(metrics[objective])

    return run_trial


def taken_by_another(trial, params: dict, is_retry: bool) -> bool:
    """Whether another trial has these parameters: finished, running (and older than this one), or queued (a retry,
    which is the one to run them)."""
    import optuna

    state = optuna.trial.TrialState
    for t in trial.study.get_trials(deepcopy=False):
        if t.number == trial.number or t.user_attrs.get("skipped") or t.params != params:
            continue
        if t.state in (state.COMPLETE, state.PRUNED) or (t.state == state.RUNNING and t.number < trial.number):
            return True
        if t.state == state.WAITING and not is_retry:
            return True
    return False


def stop_at_finished(n_trials: int):
    """Optuna's MaxTrialsCallback, without the trials run_trial skipped (they are recorded as pruned)."""
    import optuna

    def callback(study, trial) -> None:
        finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                            optuna.trial.TrialState.PRUNED))
        if sum(1 for t in finished if not t.user_attrs.get("skipped")) >= n_trials:
            study.stop()

    return callback


def stop_when_grid_taken(grid_size: int):
    """A study.optimize callback: stop this worker once every grid point has a trial (finished or running).

    GridSampler.after_trial keeps a worker going while another still runs the last points, and its next trial would
    train one of them again; two workers finishing at the same instant can still both ask, and run_trial then
    records the extra trial as skipped (taken_by_another) instead of training it.
    """
    import optuna

    def callback(study, trial) -> None:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
        # A point by its parameters, or by its grid id while its trial has not asked for them yet.
        taken = {json.dumps(t.params, sort_keys=True) if t.params else f"grid {t.system_attrs.get('grid_id')}"
                 for t in study.get_trials(deepcopy=False, states=states) if not t.user_attrs.get("skipped")}
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if len(taken - {"grid None"}) >= grid_size and not waiting:
            study.stop()

    return callback


def requeue_failed_points(study, space: Space) -> list[int]:
    """Grid points whose every trial failed (an error, a dead worker past its retries) go back in the queue, to run
    in the directory of their first trial (resuming its checkpoints); GridSampler alone counts them as done.
    Returns the numbers of the trials re-queued."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    state = optuna.trial.TrialState
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("skipped")]
    alive = {json.dumps(t.params, sort_keys=True) for t in trials if t.state != state.FAIL}
    requeued = []
    for t in trials:
        key = json.dumps(t.params, sort_keys=True)
        if t.state == state.FAIL and t.params and key not in alive:
            # The retry Optuna queues for a dead worker's trial: a waiting copy with the grid point and the number of
            # the first trial ("failed_trial"), whose directory it resumes in.
            RetryHeartbeatStaleTrialCallback()(study, t)
            alive.add(key)
            requeued.append(t.number)
    return requeued


def this_worker() -> dict[str, Any]:
    """This process, as a trial records its worker: host name, pid namespace, pid, and the process's start time
    (so that a later process given the same pid is not taken for it)."""
    proc = psutil.Process()
    return {"host": socket.gethostname(), "pid_namespace": pid_namespace(), "pid": proc.pid,
            "started": proc.create_time()}


def pid_namespace() -> str | None:
    """'pid:[4026531836]' on Linux: two containers of one machine may share a host name and pids, never this."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def worker_gone(worker: dict[str, Any] | None) -> bool:
    """Whether a trial's recorded worker is provably gone: it ran here (same host name and pid namespace) and no
    process with its pid and start time lives (no such pid, a zombie, or a recycled pid started at another time).
    A worker of another host is never provably gone from here; its heartbeat tells (GRACE_S)."""
    here = this_worker()
    if not worker or any(worker.get(key) != here[key] for key in ("host", "pid_namespace")):
        return False
    try:
        proc = psutil.Process(worker["pid"])
        if proc.status() == psutil.STATUS_ZOMBIE:  # killed, not reaped yet by its parent
            return True
        return abs(proc.create_time() - worker["started"]) > START_TOLERANCE_S
    except psutil.NoSuchProcess:
        return True
    except (psutil.AccessDenied, KeyError, TypeError, ValueError):  # cannot tell: a record of another form, hidden
        return False


def fail_orphaned_trials(study) -> list[int]:
    """Running trials whose worker is provably gone (worker_gone) are failed and retried now, as Optuna's heartbeat
    check would only after GRACE_S: the retry (RetryHeartbeatStaleTrialCallback) resumes in the trial's directory.
    Returns their numbers."""
    import optuna

    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker")
        # A retry starts with the attributes of the trial it retries, its worker too: only a trial's own record counts.
        if not worker or worker.get("trial") != t.number or not worker_gone(worker):
            continue
        try:
            if not study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first, or it has just ended
            continue
        failed.append(t.number)
        skipped = t.user_attrs.get("skipped")
        logger.warning("trial %d was left running by process %d of this host, which is gone: marked it failed%s",
                       t.number, worker["pid"], "" if skipped else "; its point is retried now")
        retry = study._storage.get_heartbeat_stale_trial_callback()
        if retry is not None and not skipped:
            retry(study, study._storage.get_trial(t._trial_id))
    return failed


def grid_keys(space: Space) -> dict[str, dict[str, Any]]:
    """Every point of the grid, by its key in trials' params: {'{"learning_rate": 0.001}': {'learning_rate': 0.001}}."""
    points = (dict(zip(space.grid, values)) for values in itertools.product(*space.grid.values()))
    return {json.dumps(p, sort_keys=True): p for p in points}


def open_work(study, space: Space, n_trials: int) -> bool:
    """Whether this worker has a trial to run: a queued one (a retry), a grid point no trial has taken, or (ranges)
    fewer trials finished and running than the study's count."""
    import optuna

    state = optuna.trial.TrialState
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("skipped")]
    if any(t.state == state.WAITING for t in trials):
        return True
    taken = [t for t in trials if t.state in (state.COMPLETE, state.PRUNED, state.RUNNING)]
    if not space.is_grid:
        return len(taken) < n_trials
    keys = {json.dumps(t.params, sort_keys=True) for t in taken if t.params}
    asking = sum(1 for t in taken if not t.params)  # running, its point not asked for yet
    return len(set(grid_keys(space)) - keys) > asking


def running_elsewhere(study) -> list:
    """The study's running trials (while this worker runs none: other workers'), without skipped ones."""
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if not t.user_attrs.get("skipped")]


def count_unskipped(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("skipped"))


def describe_workers(trials) -> str:
    """'1 (pid 4242 on node-3), 4 (pid 17 on node-5)'."""
    parts = []
    for t in trials:
        worker = t.user_attrs.get("worker") or {}
        own = worker.get("trial") == t.number and "pid" in worker
        parts.append(f"{t.number} (pid {worker['pid']} on {worker.get('host')})" if own else str(t.number))
    return ", ".join(parts)


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("skipped"):
            continue
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start \
            else None
        rows.append({"number": t.number, "state": t.state.name, "objective": t.value, "params": dict(t.params),
                     "start": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                     "seconds": round(seconds, 1) if seconds is not None else None,
                     "retry_of": t.system_attrs.get("failed_trial"), "run_dir": t.user_attrs.get("run_dir")})
    return rows


def write_trials_csv(rows: list[dict], path: Path) -> None:
    keys = sorted({k for r in rows for k in r["params"]})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "objective", *keys, "start", "seconds", "retry_of", "run_dir"])
        for r in rows:
            writer.writerow([r["number"], r["state"], r["objective"], *[r["params"].get(k) for k in keys], r["start"],
                             r["seconds"], r["retry_of"], r["run_dir"]])
    os.replace(tmp, path)


def plot_search(study, rows: list[dict], objective: str, path: Path) -> None:
    """Objective by trial (pruned trials at their last reported value), and parameter importances when Optuna can
    compute them (two finished trials at least, more than one value of a parameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import optuna

    importances = {}
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    try:
        importances = optuna.importance.get_param_importances(study) if len(complete) >= 2 else {}
    except Exception:  # e.g. a single distinct value per parameter among the finished trials
        importances = {}
    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(11 if importances else 6, 4), dpi=120, squeeze=False)
    ax = axes[0][0]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for state, marker in (("COMPLETE", "o"), ("PRUNED", "x"), ("FAIL", "v")):
        points = []
        for r in rows:
            t = by_number[r["number"]]
            value = r["objective"] if r["objective"] is not None else (
                t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
            if r["state"] == state and value is not None:
                points.append((r["number"], value))
        if points:
            ax.scatter(*zip(*points), marker=marker, label=state.lower())
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(objective)
    ax.set_title("hp_search.py: objective by trial")
    ax.grid(alpha=0.3)
    ax.legend()
    if importances:
        names = list(importances)[::-1]
        axes[0][1].barh(names, [importances[n] for n in names])
        axes[0][1].set_xlabel("importance (optuna.importance default evaluator)")
        axes[0][1].set_title("parameter importances")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(study, space: Space, base: dict[str, Any], out: Path, data_args, url: str,
                  n_trials: int) -> dict[str, Any]:
    """hp_search.json, trials.csv, hp_search.png and best.yaml, from every trial of the study (all workers'): the best
    among the finished ones, with how many of the grid's points (ranges: of the n_trials trials) are not finished."""
    rows = trial_rows(study)
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    best = None
    if complete:
        pick = min if data_args.hp_direction == "minimize" else max
        best = pick(complete, key=lambda r: r["objective"])
    finished = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED")]
    if space.is_grid:  # a point is done once a trial of it finished (pruned: the pruner decided it)
        points = grid_keys(space)
        done = {json.dumps(r["params"], sort_keys=True) for r in finished}
        missing = [p for key, p in points.items() if key not in done]
        total = len(points)
    else:
        total = n_trials
        missing = None
    n_missing = len(missing) if missing is not None else max(0, total - len(finished))
    summary = {
        "study_name": study.study_name, "storage": redact_url(url), "space_file": space.path,
        "sampler": "grid" if space.is_grid else "tpe", "grid_points": space.grid_size if space.is_grid else None,
        "space": {"grid": space.grid, "ranges": space.ranges, "fixed": space.fixed},
        "objective": data_args.hp_objective, "direction": data_args.hp_direction,
        "counts": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")},
        "finished_points": total - n_missing, "missing_points": n_missing, "missing": missing,
        "best": best, "best_config": str(out / BEST_CONFIG) if best else None, "trials": rows,
    }
    write_json(out / "hp_search.json", summary)
    write_trials_csv(rows, out / "trials.csv")
    plot_search(study, rows, data_args.hp_objective, out / "hp_search.png")
    if best:
        settings = {**base, **space.fixed, **best["params"], "output_dir": str(out / "best")}
        over = f"{total - n_missing} of {total} {'grid points' if space.is_grid else 'trials'}" + (
            f", {n_missing} MISSING (see hp_search.json)" if n_missing else "")
        write_config(out / BEST_CONFIG, settings, f"hp_search best trial {best['number']} of study "
                     f"'{study.study_name}' ({data_args.hp_objective} {best['objective']:.6g}) over {over}: python "
                     f"fine_tune.py {out / BEST_CONFIG}")
    return summary


def redact_url(url: str) -> str:
    """`postgresql://user:secret@host/db` -> `postgresql://user:***@host/db`."""
    head, sep, tail = url.partition("@")
    if sep and ":" in head.split("//", 1)[-1]:
        scheme_user = head.rsplit(":", 1)[0]
        return f"{scheme_user}:***@{tail}"
    return url


def check_search_args(data_args, training_args, space: Space) -> int:
    """The number of trials of the whole study; refuses a count the space cannot use."""
    problems = []
    n = data_args.hp_trials
    if n is not None and n < 1:
        problems.append(f"--hp_trials {n} must be >= 1")
    elif space.is_grid and n is not None and n < space.grid_size:
        problems.append(f"--hp_trials {n} is smaller than the grid of {space.path}, which has {space.grid_size} points "
                        f"({' x '.join(str(len(v)) for v in space.grid.values())}); pass --hp_trials "
                        f"{space.grid_size} or leave it out")
    elif not space.is_grid and n is None:
        problems.append(f"{space.path} has ranges ({', '.join(space.ranges)}), which have no end: pass --hp_trials N")
    if str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) == "no":
        problems.append("--hp_search compares validation metrics; --eval_strategy no leaves none (use steps or epoch)")
    if data_args.hp_pruner_startup_trials < -1:
        problems.append(f"--hp_pruner_startup_trials {data_args.hp_pruner_startup_trials} must be >= 0, or -1")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("--hp_search runs each trial in one process; instead of torchrun, start several workers on "
                        "one --hp_storage (README: 'Hyperparameter search')")
    raise_problems(problems)
    return space.grid_size if space.is_grid else n


def value_checker(base: dict[str, Any]):
    """check_value for parse_space: does fine_tune.py accept the base config with key = value?"""
    import tempfile


    def check(key: str, value: Any) -> str | None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "check.yaml"
            path.write_text(yaml.safe_dump({**base, key: value, "output_dir": tmp}), encoding="utf-8")
            try:
                parse_args([str(path)])
            except UsageError as err:
                return str(err).replace(str(path), "the space").split("; see --help")[0]
        return None

    return check


def run_search(model_args, data_args, training_args, train: Callable[..., dict]) -> dict[str, Any]:
    """Run this worker's share of the study, then write the reports from all its trials; `train(model_args,
    data_args, training_args, callbacks=...)` runs one trial (fine_tune.py's main). Returns
    {"status": "searched", "best": {...} | None, "summary": hp_search.json's content}."""
    import optuna


    setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    out = Path(training_args.output_dir)
    base = base_settings(model_args, data_args, training_args)
    space = parse_space(data_args.hp_search, [ModelArguments, DataArguments, FineTuneTrainingArguments],
                        value_checker(base))
    n_trials = check_search_args(data_args, training_args, space)
    objective = (data_args.hp_objective if data_args.hp_objective.startswith("eval_")
                 else f"eval_{data_args.hp_objective}")
    data_args.hp_objective = objective
    out.mkdir(parents=True, exist_ok=True)
    study, url = open_study(data_args, space, out, training_args.seed)
    logger.info("study '%s' in %s; %s; objective %s (%s); %d trials in the study; fixed %s",
                study.study_name, redact_url(url),
                f"grid of {space.grid_size} points over {', '.join(space.grid)}" if space.is_grid
                else f"TPE over {', '.join([*space.grid, *space.ranges])}", objective, data_args.hp_direction,
                n_trials, space.fixed or "nothing")
    waited_for, idle = None, False
    while True:
        # A trial left running by a dead worker of this host is retried now, not after the heartbeat's GRACE_S.
        fail_orphaned_trials(study)
        if space.is_grid:
            requeued = requeue_failed_points(study, space)
            if requeued:
                logger.info("re-queued the grid points of failed trials %s", requeued)
        if open_work(study, space, n_trials) and not idle:
            # No per-worker count: a worker stops when the study has n_trials finished (skipped ones not counted), or
            # every grid point is taken. A failing trial stops its worker (study.optimize re-raises); a round that
            # trains nothing (every point it asked for taken meanwhile) is followed by a wait, so this cannot spin.
            callbacks = [stop_at_finished(n_trials)]
            if space.is_grid:
                callbacks.append(stop_when_grid_taken(space.grid_size))
            before = count_unskipped(study)
            study.optimize(make_objective(space, base, out, objective, train), callbacks=callbacks)
            idle = count_unskipped(study) == before
            continue
        running = running_elsewhere(study)
        if not running:
            break
        numbers = [t.number for t in running]
        if data_args.hp_no_wait:
            logger.warning("leaving trial(s) %s of other workers running (--hp_no_wait): the reports cover the "
                           "finished trials only", describe_workers(running))
            break
        if numbers != waited_for:
            logger.info("waiting for trial(s) %s of other workers to finish before writing the reports (every %g s; "
                        "--hp_no_wait leaves instead)", describe_workers(running), POLL_S)
            waited_for = numbers
        time.sleep(POLL_S)
        idle = False
        optuna.storages.fail_stale_trials(study)  # a worker of another host, silent for GRACE_S: failed and retried
    summary = write_outputs(study, space, base, out, data_args, url, n_trials)
    if summary["best"]:
        logger.info("best trial %d, %s %.6g with %s; wrote %s", summary["best"]["number"], objective,
                    summary["best"]["objective"], summary["best"]["params"], out / BEST_CONFIG)
    if summary["missing_points"]:
        unit = "grid points" if space.is_grid else "trials"
        total = summary["finished_points"] + summary["missing_points"]
        logger.warning("the reports (hp_search.json, best.yaml) cover %d of the %d %s: %d MISSING%s; run the same "
                       "command again to finish them", summary["finished_points"], total, unit,
                       summary["missing_points"], f" ({summary['missing']})" if summary["missing"] else "")
    return {"status": "searched", "best": summary["best"], "summary": summary}
