"""Resuming: which checkpoint is whole, what the run plan is, and what changed since the last run."""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import check_output_dir
from proxytune.models.adapters import is_bottleneck_dir, load_bottleneck_weights

logger = logging.getLogger(__name__)


FINAL_DIR = "final"


RUN_CONFIG = "fine_tune_config.json"


CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_problems(path: Path, need_optimizer: bool = True) -> list[str]:
    """What makes a checkpoint unusable for resuming; [] means complete.

    transformers 5.23's Trainer._save_checkpoint writes into checkpoint-N directly (not atomically): weights,
    then optimizer/scheduler/RNG state, then trainer_state.json. A run killed mid-save leaves a directory
    without some of these, or with a truncated file; both are detected here.
    """
    from safetensors import safe_open

    problems = []
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        if "global_step" not in state:
            problems.append("trainer_state.json has no global_step")
    except (OSError, json.JSONDecodeError):
        problems.append("trainer_state.json missing or unreadable")
    weights = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            problems += [f"weight shard {s} missing" for s in sorted(shards) if not (path / s).is_file()]
        except (OSError, json.JSONDecodeError, KeyError):
            problems.append("model.safetensors.index.json unreadable")
    if not weights:
        problems.append("no *.safetensors weights")
    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as f:  # reads the header; a truncated file fails here
                f.keys()
        except Exception:  # safetensors raises its own error types for corrupt files
            problems.append(f"{file.name} is truncated or corrupt")
    if need_optimizer:
        for name in ("optimizer.pt", "scheduler.pt"):
            try:
                with zipfile.ZipFile(path / name):  # torch.save writes a zip; its directory is written last
                    pass
            except (OSError, zipfile.BadZipFile):
                problems.append(f"{name} missing or truncated")
        if not list(path.glob("rng_state*.pth")):
            problems.append("no rng_state*.pth")
    return problems


def list_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N directories, newest (highest N) first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(output_dir: Path, need_optimizer: bool = True) -> tuple[Path | None, list[Path]]:
    """(newest complete checkpoint or None, the incomplete ones newer than it)."""
    incomplete = []
    for path in list_checkpoints(output_dir):
        problems = checkpoint_problems(path, need_optimizer)
        if not problems:
            return path, incomplete
        logger.warning("skipping incomplete checkpoint %s: %s", path.name, "; ".join(problems))
        incomplete.append(path)
    return None, incomplete


@dataclass
class RunPlan:
    done: bool = False  # output_dir/final exists: nothing to train
    resume_from: Path | None = None


def plan_run(training_args, run_config: str = RUN_CONFIG) -> RunPlan:
    """Decide between start, resume and done, and tidy --output_dir (main process only) accordingly.

    - --overwrite_output_dir: delete this script's checkpoints, result and run config, start over.
    - final/ exists: the run is done (say so; nothing is destroyed).
    - otherwise resume from --resume_from_checkpoint, or from the newest complete checkpoint-N; incomplete
      newer ones are deleted, since the Trainer would write the same step into them again.
    """
    out = Path(training_args.output_dir)
    main_process = training_args.should_save
    need_optimizer = not training_args.save_only_model
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} is a file; choose a directory")
    check_output_dir(out)
    ours = [out / FINAL_DIR, out / run_config, *list_checkpoints(out)]
    if main_process and out.is_dir():
        # Leftovers of a final/ write that was killed before its rename
        # (proxytune.foundation.outputs.atomic_directory's names).
        for leftover in [*out.glob(f".{FINAL_DIR}.tmp-*"), *out.glob(f".{FINAL_DIR}.old-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    if training_args.overwrite_output_dir:
        if main_process:
            for path in ours:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        return RunPlan()
    if out.is_dir() and any(out.iterdir()) and not any(p.exists() for p in ours):
        raise UsageError(f"--output_dir {out} is not empty and holds no fine_tune.py run; choose another directory "
                         "or pass --overwrite_output_dir")
    if training_args.resume_from_checkpoint:
        path = Path(training_args.resume_from_checkpoint).expanduser()
        problems = checkpoint_problems(path, need_optimizer) if path.is_dir() else ["not a directory"]
        if problems:
            raise UsageError(f"--resume_from_checkpoint {path} is not a complete checkpoint ({'; '.join(problems)})")
        return RunPlan(resume_from=path)
    if (out / FINAL_DIR).is_dir():
        return RunPlan(done=True)
    resume_from, incomplete = find_resume_checkpoint(out, need_optimizer)
    if main_process:
        for path in incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return RunPlan(resume_from=resume_from)


def warn_config_changes(out: Path, new_config: dict, run_config: str = RUN_CONFIG) -> None:
    """On resume, name the settings that differ from the interrupted run's."""
    old_path = out / run_config
    if not old_path.is_file():
        return
    old = json.loads(old_path.read_text(encoding="utf-8"))
    volatile = {"resume_from_checkpoint", "overwrite_output_dir", "logging_dir", "local_rank"}
    changed = sorted(k for k in new_config.keys() | old.keys() if k not in volatile and old.get(k) != new_config.get(k))
    if changed:
        logger.warning("resuming with settings that differ from the interrupted run: %s", ", ".join(changed))


def reload_weights(model, checkpoint_dir: str | Path) -> None:
    """Load a checkpoint's weights into `model` in place, through from_pretrained's key renaming.

    transformers 5.23 saves GPT-NeoX's `lm_head` under its Hub name `embed_out`, but the Trainer reloads
    checkpoints (resume, load_best_model_at_end) with a raw `load_state_dict(strict=False)` that skips it
    with only a warning: a resumed or "best" model would keep a stale output layer
    (huggingface/transformers#48805). from_pretrained applies the renaming; strict loading proves it.
    A bottleneck-adapter checkpoint holds the adapters only (CheckpointReloadMixin._save); they are loaded strictly.
    """
    if is_bottleneck_dir(checkpoint_dir):
        load_bottleneck_weights(model, checkpoint_dir)
        return
    fresh = type(model).from_pretrained(str(checkpoint_dir), dtype=model.dtype, use_safetensors=True)
    model.load_state_dict(fresh.state_dict(), strict=True)
