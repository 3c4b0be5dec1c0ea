"""The Trainer subclass: label-only logits, an epoch-seeded sampler, checkpoints reloaded exactly."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from transformers import ProgressCallback, Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import has_length

from proxytune.foundation.outputs import format_bytes, free_bytes
from proxytune.foundation.progress import LineBar, progress_as_lines
from proxytune.models.adapters import has_bottleneck_adapters, save_bottleneck_adapters
from proxytune.training.checkpoints import RunPlan, reload_weights
from proxytune.training.data import IGNORE_INDEX, PreparedData
from proxytune.training.disk import DiskNeeds
from proxytune.training.model import count_parameters

logger = logging.getLogger(__name__)


def trim_to_label_logits(inputs: dict[str, Any]) -> dict[str, Any]:
    """Ask the model for logits only from the first position that predicts a label.

    In meta-review mode the prompt (~85% of the tokens) carries no loss, yet the (B, T, 50,304) logits are the
    largest tensor of a training step. Position t predicts label t + 1, so the logits from `first - 1` on suffice,
    where `first` is the earliest labelled position in the batch; the labels are cut to match
    (`logits_to_keep` keeps the last positions). The loss is unchanged: only masked positions are dropped.
    """
    labels = inputs.get("labels")
    if labels is None:
        return inputs
    length = labels.shape[1]
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()  # (n, 1) positions with a label in some row
    if len(labelled) == 0:
        return inputs
    keep = length - int(labelled[0, 0]) + 1
    if keep >= length:
        return inputs
    return {**inputs, "labels": labels[:, length - keep:], "logits_to_keep": keep}


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """group_by_length batches whose order depends only on (seed, epoch).

    The Trainer's LengthGroupedSampler draws each epoch's order from the global RNG as it stands when the epoch
    starts. A run resumed mid-epoch rebuilds that epoch's iterator from a freshly seeded RNG, so the batches it
    skips and the ones it then trains on are not those of the interrupted run. Seeding from (seed, epoch) makes
    the resumed run see the same batches (the Trainer calls set_epoch before every epoch, on every rank).
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=list(lengths))
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class CheckpointReloadMixin:
    """For any Trainer subclass (this script's, and TRL's in rl_tune.py): checkpoints reloaded with their weight
    names converted (reload_weights), and a resume from the checkpoint a run ended at trains nothing."""

    def _plain_model(self, model) -> bool:
        from transformers import PreTrainedModel

        # PEFT adapters, DeepSpeed and FSDP have loaders of their own, which the Trainer uses.
        return isinstance(model, PreTrainedModel) and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = model if model is not None else self.model
        if not self._plain_model(model):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("loading weights from %s", resume_from_checkpoint)
        reload_weights(model, resume_from_checkpoint)

    def _load_best_model(self):
        if not self._plain_model(self.model):
            return super()._load_best_model()
        logger.info("loading the best model, %s (%s %.4f)", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        reload_weights(self.model, self.state.best_model_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """A model with bottleneck adapters is checkpointed as its adapters (as the Trainer does for PEFT): the
        frozen base never changes, and save_pretrained would write a full model whose adapter weights no loader
        reads."""
        import torch
        from transformers.trainer import TRAINING_ARGS_NAME

        if not has_bottleneck_adapters(self.model):
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_bottleneck_adapters(self.model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, Path(output_dir) / TRAINING_ARGS_NAME)
        return None

    def _run_epoch(self, *, epoch, epochs_trained, resume_from_checkpoint, **kwargs):
        """The Trainer's epoch, except that a resume from a checkpoint whose run had already ended trains nothing.

        transformers 5.24 checks for the end only after a step (`_run_epoch`): resumed from checkpoint-N of a
        run that stopped at N (N = max_steps not at an epoch boundary, or an early stop), it skips N batches and
        trains step N + 1 anyway, and on_train_begin has cleared the stop saved in the checkpoint.
        """
        if (resume_from_checkpoint is not None and epoch == epochs_trained
                and self._run_ended_at(resume_from_checkpoint)):
            logger.info("%s is the end of the run; nothing left to train", Path(resume_from_checkpoint).name)
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(epoch=epoch, epochs_trained=epochs_trained,
                                  resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _run_ended_at(self, checkpoint: str | Path) -> bool:
        """Whether the run had stopped at `checkpoint`: max_steps reached, or a stop decided there (early stopping)
        and kept by restore_callback_states_from_checkpoint. A stop for an older, smaller max_steps is not kept."""
        if self.state.global_step >= self.state.max_steps:
            return True
        if not self.args.restore_callback_states_from_checkpoint:
            return False
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        control = saved.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
        return bool(control.get("should_training_stop")) and saved["global_step"] < saved.get("max_steps", 0)


class LogProgressCallback(ProgressCallback):
    """The Trainer's progress bar when stderr is a log (foundation.progress): a line every few seconds with the
    step, the elapsed time and the ETA instead of a redraw per step, and no evaluation bar under the training bar
    (LineBar). The `logging_steps` lines are printed as ProgressCallback prints them."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.training_bar = LineBar(total=state.max_steps, desc="train", unit="step")
        self.current_step = 0

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = LineBar(total=len(eval_dataloader), desc="evaluate", unit="batch")
            self.prediction_bar.update(1)


def show_progress_as_lines(trainer: Trainer) -> Trainer:
    """When progress shows as lines (stderr is not a terminal), the Trainer's bar becomes LogProgressCallback's.
    On a terminal, or with --disable_tqdm (the Trainer then prints its logs bare), nothing changes."""
    if progress_as_lines() and trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(LogProgressCallback())
    return trainer


class LMTrainer(CheckpointReloadMixin, Trainer):
    """The Trainer, with logits only where there is a loss (trim_to_label_logits), perplexity = exp(loss) next
    to every evaluation loss, and checkpoints reloaded with their weight names converted (CheckpointReloadMixin)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, trim_to_label_logits(inputs), return_outputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "length" not in train_dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        return EpochSeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                               lengths=train_dataset["length"], seed=self.args.seed)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(loss) if loss < 700 else float("inf")
        return output


def log_startup(model_args, data_args, training_args, data: PreparedData, model, plan: RunPlan,
                needs: DiskNeeds | None = None) -> None:
    """One block with what will happen: data, batch, steps, device, dtype, parameters, disk."""
    total, trainable = count_parameters(model)
    world = max(1, training_args.world_size)
    effective = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world
    if training_args.max_steps > 0:
        steps = training_args.max_steps
    else:
        per_epoch = max(1, math.ceil(len(data.train) / (training_args.per_device_train_batch_size * world))
                        // training_args.gradient_accumulation_steps)
        steps = math.ceil(per_epoch * training_args.num_train_epochs)
    source = f"fresh {model_args.config_name}" if model_args.config_name else model_args.model_name_or_path
    precision = "bf16 mixed" if training_args.bf16 else "fp16 mixed" if training_args.fp16 else "none"
    labelled = data.label_info["summary"] if data.label_info else \
        f"{sum(sum(1 for x in labels if x != IGNORE_INDEX) for labels in data.train['labels']):,} label tokens"
    lines = [
        f"model: {source} ({type(model).__name__}); parameters {total:,}, trainable {trainable:,} "
        f"({100 * trainable / max(total, 1):.2f}%)" + (f"; LoRA r={model_args.lora_r}" if model_args.use_lora else "")
        + (f"; bottleneck adapters, reduction factor {model.bottleneck_config.reduction_factor}, "
           f"{model.bottleneck_config.non_linearity}" if has_bottleneck_adapters(model) else ""),
        f"device: {training_args.device} x {world} process(es); weights {next(model.parameters()).dtype}; "
        f"mixed precision: {precision}",
        f"data: {data_args.dataset_path}: {data.description}",
        f"examples: train {len(data.train):,} ({labelled}), validation {len(data.validation):,}; "
        f"max_length {data_args.max_length}; sampler {training_args.train_sampling_strategy}, dynamic padding",
        f"batch: {training_args.per_device_train_batch_size} per device x {training_args.gradient_accumulation_steps} "
        f"accumulation x {world} = {effective}; ~{steps} optimizer steps; lr {training_args.learning_rate:g} "
        f"({training_args.lr_scheduler_type.value})",
        f"evaluate/save every {training_args.eval_steps}/{training_args.save_steps} steps; best by "
        f"{training_args.metric_for_best_model}; early stopping patience {training_args.early_stopping_patience}",
        f"output: {training_args.output_dir} ("
        + (f"resuming from {plan.resume_from.name}" if plan.resume_from else "fresh start") + ")",
    ]
    if needs is not None:
        free = free_bytes(training_args.output_dir)
        lines.append(f"disk: a checkpoint ~{format_bytes(needs.checkpoint)}, final/ ~{format_bytes(needs.final)}, "
                     f"up to {format_bytes(needs.peak)} at once; "
                     + (f"{format_bytes(free)} free" if free is not None else "free space unknown"))
    logger.info("fine_tune.py\n  %s", "\n  ".join(lines))


def finish_distributed() -> None:
    """Under torchrun, every rank waits here until rank 0 has written final/, then leaves the process group.

    A rank that simply exits while the others still use the group aborts inside gloo/NCCL ("terminate called
    without an active exception"), and torchrun then kills rank 0 before final/ is written.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
