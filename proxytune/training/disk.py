"""Disk space a run needs (checkpoints, final model) and a full disk as a clear error."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import format_bytes, free_bytes, is_disk_full, write_error
from proxytune.models.adapters import has_bottleneck_adapters
from proxytune.training.arguments import FineTuneTrainingArguments, ModelArguments
from proxytune.training.checkpoints import find_resume_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class DiskNeeds:
    checkpoint: int  # bytes of one checkpoint-N: saved weights (+ optimizer state unless --save_only_model)
    final: int  # bytes of final/'s weights
    peak: int  # the most this run's new files hold at once (checkpoints kept + the one being written, or final/)


def estimate_disk_needs(model, model_args: ModelArguments, training_args: FineTuneTrainingArguments,
                        existing: int) -> DiskNeeds:
    """What the checkpoints and final/ will take, from the parameters (AdamW keeps two float32 moments per trained
    parameter). `existing` checkpoints are already on disk and count toward the limit."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trained = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    # The Trainer saves a LoRA or bottleneck model's adapter, not the frozen base.
    adapter_only = model_args.use_lora or has_bottleneck_adapters(model)
    saved = trained if adapter_only else weights
    optimizer = 0 if training_args.save_only_model else 2 * 4 * sum(p.numel() for p in params if p.requires_grad)
    checkpoint = saved + optimizer
    final = trained if adapter_only and not model_args.merge_lora else weights
    if training_args.save_total_limit:  # rotation keeps this many, and writes the next one before deleting
        kept = training_args.save_total_limit
    elif training_args.max_steps > 0:  # 0 or None: every checkpoint stays
        kept = max(1, training_args.max_steps // max(1, int(training_args.save_steps)))
    else:
        kept = 1  # an epoch-based run without a limit: the count is not known yet
    new = max(1, kept - existing)
    return DiskNeeds(checkpoint, final, max((new + 1) * checkpoint, new * checkpoint + final))


def check_disk_space(out: Path, needs: DiskNeeds) -> None:
    """Refuse before training when --output_dir cannot hold one checkpoint and final/; warn when it cannot hold what
    the checkpoints kept will take."""
    free = free_bytes(out)
    if free is None:
        return
    if free < needs.checkpoint + needs.final:
        raise UsageError(f"--output_dir {out} has {format_bytes(free)} free, but one checkpoint needs about "
                         f"{format_bytes(needs.checkpoint)} (weights and optimizer state) and final/ "
                         f"{format_bytes(needs.final)}; free some space or choose another --output_dir")
    if free < needs.peak:
        logger.warning("--output_dir %s has %s free; the checkpoints kept (--save_total_limit) and final/ may need up "
                       "to %s", out, format_bytes(free), format_bytes(needs.peak))


def disk_filled(err: BaseException, out: Path, needs: DiskNeeds) -> bool:
    """Whether a failure while training or saving came from a full disk: said so in the error, or (torch.save's
    "unexpected pos 305152 vs 305044" after a short write says nothing) less room left than a checkpoint takes."""
    if is_disk_full(err):
        return True
    free = free_bytes(out)
    return isinstance(err, (OSError, RuntimeError)) and free is not None and free < needs.checkpoint


def output_failure(out: Path, err: BaseException, needs: DiskNeeds, main_process: bool) -> UsageError | None:
    """The one-line error for a failure to write into --output_dir midway (a full disk; a directory made read-only
    or taken away), or None when `err` is something else."""
    import errno

    if disk_filled(err, out, needs):
        return disk_full_error(out, err, needs, main_process)
    inside = isinstance(err, OSError) and err.filename and Path(err.filename).absolute().is_relative_to(out.absolute())
    if inside and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
        return write_error(out, err, "--output_dir")
    return None


def disk_full_error(out: Path, err: BaseException, needs: DiskNeeds, main_process: bool) -> UsageError:
    """The one line for a write that filled the disk during training; the partial checkpoint is removed at once
    (the next run would skip and remove it, as after a kill), so that the same command resumes."""
    resume_from, incomplete = find_resume_checkpoint(out)
    if main_process:
        for path in incomplete:
            shutil.rmtree(path, ignore_errors=True)
    free = free_bytes(out)
    where = f"{format_bytes(free)} free; " if free is not None else ""
    resume = f"it resumes from {resume_from.name}" if resume_from else "it starts again"
    return UsageError(f"no space left on the device of --output_dir {out} ({where}a checkpoint needs about "
                      f"{format_bytes(needs.checkpoint)}, final/ {format_bytes(needs.final)}); the partial files were "
                      f"removed: free some space or pass another --output_dir, "
                      f"then run the same command again ({resume})")
