"""Lab stages are reused only when made with the same settings: the stage key (bench/_util.py), bench/steering_lab.py's
run_stage on stand-in stages, and bench/rl_lab.py --ci --only dpo run three times on a lab of tiny models (same flags:
everything reused; --dpo_lr: DPO redone, its ratings reused; --dpo_samples: the ratings redone and DPO after them)."""

from __future__ import annotations

import json
import logging
import sys
import time

import pytest
from conftest import ROOT, make_rows

from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError

sys.path.insert(0, str(ROOT / "bench"))
import _util  # noqa: E402
import rl_lab  # noqa: E402
import steering_lab  # noqa: E402


def test_argv_flags_and_setting_changes_name_each_flag_old_to_new():
    assert _util.argv_flags(["--a", "1", "--b", "x", "y", "--c"]) == {"--a": "1", "--b": ["x", "y"], "--c": True}
    old = {"argv": ["--lr", "1e-4", "--seed", "42"], "rows": 200, "upstream": {"grpo": "aaa"}}
    new = {"argv": ["--lr", "3e-4", "--seed", "42", "--ci"], "rows": 200, "upstream": {"grpo": "bbb"}, "k": [1]}
    assert _util.setting_changes(old, new) == ["argv.--ci unset -> true", "argv.--lr 1e-4 -> 3e-4", "k unset -> [1]",
                                               "upstream.grpo aaa -> bbb"]
    assert _util.setting_changes(new, json.loads(json.dumps(new))) == []


def test_prepare_stage_keeps_same_settings_and_redoes_changed_or_unrecorded(tmp_path):
    stage = tmp_path / "work" / "grpo"
    config = {"--learning_rate": "3e-4", "--max_steps": "80", "lab": {}}
    assert _util.prepare_stage(stage, config) is None  # nothing there yet: recorded, nothing to redo
    assert json.loads((tmp_path / "work" / "grpo.stage.json").read_text()) == config
    stage.mkdir()
    (stage / "out.txt").write_text("made with 3e-4")
    assert _util.prepare_stage(stage, dict(config)) is None  # same settings: kept
    assert (stage / "out.txt").is_file()

    changed = {**config, "--learning_rate": "1e-3"}
    assert _util.prepare_stage(stage, changed) == "--learning_rate 3e-4 -> 1e-3"
    assert not stage.exists()  # deleted, to be made again
    assert json.loads(_util.stage_record(stage).read_text()) == changed

    stage.mkdir()
    _util.stage_record(stage).unlink()  # an older version's stage: outputs, no record
    assert "older version" in _util.prepare_stage(stage, changed)
    assert not stage.exists()

    # A stage after it records its digest: changed upstream settings change its own.
    assert _util.stage_digest(config) == _util.stage_digest(json.loads(json.dumps(config)))
    assert _util.stage_digest(config) != _util.stage_digest(changed)


def lab_args(*argv: str) -> steering_lab.LabArguments:
    (args,) = parse_config([steering_lab.LabArguments], list(argv))
    return args


def test_steering_lab_refuses_other_or_unrecorded_settings_and_redoes_a_stage_older_than_its_upstream(tmp_path):
    lab = steering_lab.resolve_lab(lab_args("--smoke", "--work_dir", str(tmp_path / "lab")))
    lab.work.mkdir()
    runs = []

    def make(name: str):
        def fn():
            out = steering_lab.stage_outputs(lab, name)[0]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(name)
            runs.append(name)
        return fn

    def both(seed: int = 42) -> list[bool]:
        return [steering_lab.run_stage(lab, name, {"seed": seed}, make(name))["cached"]
                for name in ("corpus", "tokenizer")]

    assert both() == [False, False] and both() == [True, True]
    with pytest.raises(UsageError, match=r"stage 'corpus' .* other settings \(seed 42 -> 7\); pass --redo corpus"):
        both(seed=7)

    time.sleep(1.05)  # "finished" is recorded to the second
    steering_lab.delete_outputs(lab, "corpus")  # corpus made again: the tokenizer trained on the old one is stale
    runs.clear()
    assert both() == [False, False] and runs == ["corpus", "tokenizer"]
    assert both() == [True, True]

    stages = json.loads(lab.path("stages.json").read_text())
    del stages["tokenizer"]
    lab.path("stages.json").write_text(json.dumps(stages))
    with pytest.raises(UsageError, match="'tokenizer' .* no recorded settings .*; pass --redo tokenizer"):
        both()


@pytest.fixture
def tiny_lab(tmp_path, tiny_model_dirs):
    """What rl_lab.py reads from the steering lab: S, S_tuned and L (tiny random models) and train/validation/test
    papers."""
    lab = tmp_path / "lab"
    for name, model in (("small", "small_base"), ("small_tuned", "small_tuned"), ("large", "large")):
        (lab / name).mkdir(parents=True)
        (lab / name / "final").symlink_to(tiny_model_dirs[model], target_is_directory=True)
    rows = make_rows(24)
    (lab / "data").mkdir()
    for split, part in (("train", rows[:12]), ("validation", rows[12:18]), ("test", rows[18:])):
        (lab / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return lab


def test_rl_lab_rerun_reuses_same_settings_and_redoes_what_a_changed_flag_affects(tmp_path, tiny_lab):
    redone: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: redone.append(r.getMessage())
    logging.getLogger("rl_lab").addHandler(handler)
    work = tmp_path / "rl_lab_ci"  # --ci's work directory, beside --work
    outputs = {"dpo_ratings": work / "dpo_ratings" / "ratings.jsonl", "dpo": work / "dpo" / "final" / "metrics.json"}

    def run(*flags: str) -> dict[str, int]:
        redone.clear()
        rl_lab.main(["--ci", "--only", "dpo", "--lab", str(tiny_lab), "--work", str(tmp_path / "rl_lab"), *flags])
        return {name: path.stat().st_mtime_ns for name, path in outputs.items()}

    try:
        first = run()
        assert redone == []
        assert run() == first and redone == []  # same flags: everything reused

        changed = run("--dpo_lr", "3e-4")
        assert changed["dpo_ratings"] == first["dpo_ratings"] and changed["dpo"] != first["dpo"]
        assert redone == ["stage dpo: made with other settings (--learning_rate 0.0001 -> 0.0003); running it again"]

        upstream = run("--dpo_lr", "3e-4", "--dpo_samples", "1")
        assert upstream["dpo_ratings"] != changed["dpo_ratings"] and upstream["dpo"] != changed["dpo"]
        assert len(redone) == 2 and "--dpo_samples 2 -> 1" in redone[0] and "upstream.dpo_ratings" in redone[1]
    finally:
        logging.getLogger("rl_lab").removeHandler(handler)
