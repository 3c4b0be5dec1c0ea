"""Fine-tune a causal LM (default Pythia-70m) to write a meta-review from peer reviews, and to stop.

Fine-tune on the dataset that processing_meta_review.py wrote (or a raw Input/Output file, processed on the fly):
    python fine_tune.py --dataset_path outputs/meta_review --output_dir outputs/pythia-70m-meta-review

LoRA, merged into the weights at the end (leave out --merge_lora to save an adapter directory instead):
    python fine_tune.py --dataset_path ../shared/data/meta_review/mred_val_longest.jsonl \
        --use_lora --merge_lora --learning_rate 5e-4 --output_dir outputs/pythia-70m-lora
(QLoRA: --use_lora --load_in_4bit, without --merge_lora; README "Quantised models".)

Classify instead (a GPTNeoXForSequenceClassification head; classify.py has the details and more commands): the paper's
decision from its meta-review, or `--task regression --label_column avg_rating` from the reviews:
    python fine_tune.py --task classification --label_column decision --classification_input meta_review \
        --dataset_path outputs/meta_review --output_dir outputs/decision-classifier

Train a fresh GPT-NeoX from a size preset on plain text (loss on every token, texts packed into blocks):
    python fine_tune.py --config_name pythia-14m --tokenizer_name ../shared/tokenizers/pythia \
        --dataset_path ../shared/data/imdb/imdb_partial.jsonl.gz --text_column text --max_length 128 \
        --max_train_samples 4000 --output_dir outputs/pythia-14m-imdb

Every TrainingArguments flag works (`--help` lists them); defaults suited to this task are set below
(`FineTuneTrainingArguments`). Multi-GPU: `torchrun --nproc_per_node N fine_tune.py ...` (DDP); precision: `--bf16`.
Hyperparameter search over these flags (a grid or ranges, Optuna, one worker or many): `--hp_search space.yaml`,
see hp_search.py; then `python fine_tune.py OUTPUT_DIR/best.yaml` trains the winner.

Layout of --output_dir:
    checkpoint-*/            Trainer checkpoints; re-running the same command resumes from the newest complete one
    fine_tune_config.json    the resolved arguments of the run (tokens redacted)
    runs/                    TensorBoard logs (with --report_to tensorboard)
    final/                   the result, written atomically (temporary directory, then rename): model or LoRA
                             adapter + tokenizer (safetensors), README.md (model card), fine_tune_config.json,
                             metrics.json, trainer_state.json, training_curve.png, samples.jsonl and (meta-review
                             mode) prompt_template.txt
Pass `--output_dir .../final` to steer.py and evaluation.py (common.load_causal_lm loads models and adapters).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SaveStrategy, SchedulerType

from common import (
    DTYPES,
    PROMPT_TEMPLATE,
    QUANTIZATION_RECORD,
    SEED_MAX,
    UsageError,
    atomic_directory,
    check_hub_for_push,
    check_output_dir,
    cli,
    default_device,
    first_line,
    format_bytes,
    free_bytes,
    hub_offline_reason,
    is_disk_full,
    load_causal_lm,
    load_tokenizer,
    not_cached_error,
    number_problems,
    parse_config,
    prepare_quantized_for_lora,
    quantization_bits,
    quantization_record,
    raise_problems,
    resolve_dtype,
    setup_logging,
    split_compression,
    to_jsonable,
    write_error,
    write_json,
)

logger = logging.getLogger("fine_tune")

DEFAULT_MODEL = "EleutherAI/pythia-70m"
IGNORE_INDEX = -100  # the label value torch's cross-entropy (and every HF model) skips
FINAL_DIR = "final"
RUN_CONFIG = "fine_tune_config.json"
CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# GPT-NeoX's linear layers: attention in/out projections and the two MLP matrices.
GPT_NEOX_LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
# Plain-text mode: sample generations continue the first tokens of a validation text.
TEXT_SAMPLE_PROMPT_TOKENS = 32
# Pythia shapes (the EleutherAI/pythia-* configs) as GPTNeoXConfig fields; "tiny" is for tests and smoke runs.
# vocab_size is filled in from the tokenizer, rounded up to a multiple of 128 as Pythia's 50,277 -> 50,304.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "pythia-14m": dict(hidden_size=128, num_hidden_layers=6, num_attention_heads=4, intermediate_size=512),
    "pythia-31m": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024),
    "pythia-70m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
    "pythia-160m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
VOCAB_MULTIPLE = 128
TEXT_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Model to fine-tune: Hub id, save_pretrained directory, or a LoRA adapter directory."},
    )
    config_name: str | None = field(
        default=None,
        metadata={"help": f"Train a fresh model instead: a size preset ({', '.join(PRESETS)}), a config.json "
                  "file, or a directory holding one. Needs a tokenizer (--tokenizer_name)."},
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Change fields of the fresh model's config, e.g. 'hidden_size=64,num_hidden_layers=4'."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (Hub id or local dir). Default: --model_name_or_path."}
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype at load. Pythia checkpoints declare float16, but training wants float32 "
                  "master weights; use --bf16/--fp16 for mixed precision on a GPU. 'bfloat16' (or 'auto': float32 on "
                  "CPU, bfloat16 on a GPU that has it) suits a frozen LoRA base.", "choices": list(DTYPES)},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow Hub models/tokenizers to run their own code."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter (peft) instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(GPT_NEOX_LORA_TARGETS),
        metadata={"help": "Module names LoRA wraps (GPT-NeoX: query_key_value dense dense_h_to_4h dense_4h_to_h), "
                  "or 'all-linear'."},
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Merge the adapter into the weights and save a plain model (else an adapter)."}
    )
    # QLoRA (Dettmers et al. 2023): the frozen base in 4 (or 8) bits, the LoRA adapter trained in full precision.
    load_in_4bit: bool = field(default=False, metadata={
        "help": "QLoRA: load the base model's linear layers in 4 bits (bitsandbytes NF4; with --use_lora)."})
    load_in_8bit: bool = field(default=False, metadata={
        "help": "Load the base model's linear layers in 8 bits (bitsandbytes LLM.int8; with --use_lora)."})
    bnb_4bit_compute_dtype: str = field(default="auto", metadata={
        "help": "dtype the 4-bit layers compute in ('auto': bfloat16 on a GPU that has it, else float32).",
        "choices": list(DTYPES)})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit data type.", "choices": ["nf4", "fp4"]})
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantise the 4-bit quantisation constants too (~0.4 bit per weight saved)."})

    def __post_init__(self):
        problems = number_problems(self, {"lora_r": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)"})
        if self.merge_lora and not self.use_lora:
            problems.append("--merge_lora needs --use_lora")
        if self.use_lora and self.config_name:
            problems.append("--use_lora adapts a pretrained model; drop it or drop --config_name")
        bits = quantization_bits(self.load_in_4bit, self.load_in_8bit)
        if bits and not self.use_lora:
            problems.append(f"--load_in_{bits}bit trains a LoRA adapter on the frozen quantised base (quantised weights "
                            "cannot be trained); add --use_lora")
        if bits and (Path(self.model_name_or_path).expanduser() / "adapter_config.json").is_file():
            problems.append(f"--load_in_{bits}bit quantises a base model, but --model_name_or_path "
                            f"{self.model_name_or_path} is a LoRA adapter; pass its base model")
        if bits and self.merge_lora:
            problems.append(f"--merge_lora with --load_in_{bits}bit would round the update into the {bits}-bit weights; "
                            f"drop --merge_lora and load the adapter with steer.py/evaluation.py "
                            f"(--large_load_in_{bits}bit, or unquantised: merged into the full-precision base)")
        if self.dtype == "float16" and not self.use_lora:
            problems.append("--dtype float16 weights cannot be trained directly (fp16 gradients overflow and cannot "
                            "be unscaled); keep --dtype float32 and pass --fp16 for mixed precision")
        raise_problems(problems)


@dataclass
class DataArguments:
    dataset_path: str = field(
        default="outputs/meta_review",
        metadata={"help": "The directory processing_meta_review.py wrote; or a raw Input/Output source (.jsonl/.json/"
                  ".csv, also .gz/.bz2/.xz/.zst-compressed, or .parquet; a directory of such files; a saved dataset; "
                  "a Hub id) processed on the fly; or, with --text_column, plain text (.txt, .jsonl[.gz], ...)."},
    )
    text_column: str | None = field(
        default=None,
        metadata={"help": "Plain-text mode: train a language model on this column (no prompt, loss on every token)."},
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Plain-text mode: concatenate texts (EOS between them) and cut --max_length blocks, as "
                  "run_clm.py does. False: one example per row, ending in EOS unless it had to be cut."},
    )
    input_column: str = field(default="Input", metadata={"help": "Raw meta-review data: column with the reviews."})
    output_column: str = field(
        default="Output", metadata={"help": "Raw meta-review data: column with the meta-review."}
    )
    max_length: int = field(
        default=2048,
        metadata={"help": "Tokens per example (prompt + meta-review; or block size in plain-text mode). Pythia: 2048."},
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Share of rows held out for validation when the source has no such split."}
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use at most this many training examples, a seeded sample (plain-text mode: rows, "
                          "taken before packing)."},
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use at most this many validation examples, a seeded sample (plain-text mode: "
                                  "rows)."}
    )
    num_samples: int = field(
        default=4, metadata={"help": "Validation examples to generate from after training (samples.jsonl); 0 = none."}
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Length limit of the sample generations."})
    # The task: language modelling (this script's own), or a classifier of a label column (classify.py).
    task: str = field(
        default="language_modeling",
        metadata={"help": "language_modeling (write the meta-review), or classification / regression of "
                  "--label_column with a sequence-classification head (classify.py).", "choices": [
                      "language_modeling", "classification", "regression"]},
    )
    label_column: str | None = field(
        default=None, metadata={"help": "classification/regression: the label column (decision, avg_rating). "
                                "Default: decision for classification, avg_rating for regression."}
    )
    classification_input: str = field(
        default="reviews", metadata={"help": "classification/regression: what the model reads, the reviews (predict "
                                     "the decision) or the meta-review (which decision does it state?).",
                                     "choices": ["reviews", "meta_review"]}
    )
    class_weights: str = field(
        default="none", metadata={"help": "classification: 'balanced' weighs each class's loss by n / (k * n_class), "
                                  "for imbalanced labels; 'none' = plain cross-entropy.",
                                  "choices": ["none", "balanced"]}
    )
    # Hyperparameter search (hp_search.py): --output_dir then holds trial-<n>/ runs, the study's reports and best.yaml.
    hp_search: str | None = field(
        default=None, metadata={"help": "Search hyperparameters over this space file (YAML/JSON: a list = values to "
                                "try, {low, high, log} = a range, a scalar = fixed); see README 'Hyperparameter search'."}
    )
    hp_trials: int | None = field(
        default=None, metadata={"help": "Trials in the whole study, all workers together. Default: every point of a "
                                "grid; a space with ranges needs it."}
    )
    hp_storage: str | None = field(
        default=None, metadata={"help": "Optuna storage shared by the workers: sqlite:///study.db or "
                                "postgresql://user@host/db. Default: sqlite in --output_dir (hp_search.db)."}
    )
    hp_study_name: str | None = field(
        default=None, metadata={"help": "Study name in --hp_storage (workers of one search give the same). Default: "
                                "the name of --output_dir."}
    )
    hp_objective: str = field(
        default="eval_loss", metadata={"help": "Validation metric to optimize (eval_loss, eval_perplexity, ...)."}
    )
    hp_direction: str = field(
        default="minimize", metadata={"help": "Whether --hp_objective is minimized or maximized.",
                                      "choices": ["minimize", "maximize"]}
    )
    hp_pruner_startup_trials: int = field(
        default=2, metadata={"help": "Finished trials before the median pruner stops trials that fall behind; "
                             "-1 = no pruning."}
    )

    def __post_init__(self):
        # Meta-review mode: the lowest --max_length depends on the tokenizer (processing_meta_review.check_max_length,
        # once it is loaded). Plain text needs two tokens: an input and the label it predicts.
        ranges = {"validation_split_percentage": "[0, 100)", "max_train_samples": "[1, inf)",
                  "max_eval_samples": "[1, inf)", "num_samples": "[0, inf)", "max_new_tokens": "[1, inf)"}
        if self.text_column:
            ranges["max_length"] = ("[2, inf)", "a block needs an input token and a label")
        problems = number_problems(self, ranges)
        if self.task != "language_modeling":
            self.label_column = self.label_column or ("decision" if self.task == "classification" else "avg_rating")
            if self.text_column:
                problems.append(f"--task {self.task} reads Input/Output rows; drop --text_column")
        if self.class_weights != "none" and self.task != "classification":
            problems.append(f"--class_weights {self.class_weights} needs --task classification")
        raise_problems(problems)


def _retuned(name: str, default: Any):
    """A TrainingArguments field with this task's default; its help text is kept."""
    return field(default=default, metadata=TrainingArguments.__dataclass_fields__[name].metadata)


@dataclass
class FineTuneTrainingArguments(TrainingArguments):
    """TrainingArguments with defaults for this task (as TRL's SFTConfig does): evaluate and save every 100 steps,
    keep the best checkpoint by validation loss, length-grouped batches, cosine schedule with 5% warm-up."""

    output_dir: str | None = _retuned("output_dir", "outputs/pythia-70m-meta-review")
    learning_rate: float = _retuned("learning_rate", 1e-4)
    lr_scheduler_type: SchedulerType | str = _retuned("lr_scheduler_type", "cosine")
    warmup_steps: float = _retuned("warmup_steps", 0.05)
    logging_steps: float = _retuned("logging_steps", 10)
    logging_first_step: bool = _retuned("logging_first_step", True)
    eval_strategy: IntervalStrategy | str = _retuned("eval_strategy", "steps")
    save_strategy: SaveStrategy | str = _retuned("save_strategy", "steps")
    save_steps: float = _retuned("save_steps", 100)
    eval_steps: float | None = field(
        default=None, metadata={"help": "Update steps between evaluations. Default: --save_steps, so every "
                                "checkpoint has a validation loss to pick the best by."}
    )
    save_total_limit: int | None = _retuned("save_total_limit", 2)
    load_best_model_at_end: bool | None = field(
        default=None, metadata={"help": "Finish with the checkpoint of lowest validation loss. Default: on when "
                                "evaluating (--eval_strategy other than 'no')."}
    )
    metric_for_best_model: str | None = _retuned("metric_for_best_model", "eval_loss")
    # Batches of similar lengths with dynamic padding: far less padding than a fixed 2048.
    train_sampling_strategy: str = _retuned("train_sampling_strategy", "group_by_length")
    # The collator picks input_ids/labels itself; keeping the other columns keeps `length` for the sampler.
    remove_unused_columns: bool = _retuned("remove_unused_columns", False)
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over: delete this script's checkpoints and result in --output_dir."}
    )
    early_stopping_patience: int | None = field(
        default=3, metadata={"help": "Stop after this many evaluations without a better validation loss; 0 = never."}
    )
    # GPT-NeoX uses every parameter in every step; searching for unused ones costs an extra graph traversal.
    ddp_find_unused_parameters: bool | None = _retuned("ddp_find_unused_parameters", False)
    # A resumed run must stop where the uninterrupted one would: keep early stopping's patience counter (and a
    # stop already decided) from the checkpoint instead of starting them afresh.
    restore_callback_states_from_checkpoint: bool = _retuned("restore_callback_states_from_checkpoint", True)

    def __post_init__(self):
        import torch

        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.use_cpu = True  # torchrun on a CPU-only machine: DDP over gloo instead of separate runs
        if self.eval_steps is None:
            self.eval_steps = self.save_steps
        best_by_default = self.load_best_model_at_end is None
        if best_by_default:
            self.load_best_model_at_end = IntervalStrategy(self.eval_strategy) != IntervalStrategy.NO
        # The Trainer leaves these to torch (the optimizer raises at its first step) or converts them with int(),
        # which fails on NaN without naming the flag; and its own messages would blame flags the user never set.
        raise_problems(training_number_problems(self))
        check_best_model_schedule(self, best_by_default)
        super().__post_init__()
        if self.device.type == "cpu":
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns


def training_number_problems(args: FineTuneTrainingArguments) -> list[str]:
    """Every float flag finite, and the numbers the Trainer passes on unchecked in range."""
    steps = "(0, inf)", "a number of steps, or below 1 a share of all steps"
    ranges: dict[str, str | tuple[str, str]] = {
        "learning_rate": ("(0, inf)", "e.g. 1e-4"), "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)",
        "adam_beta2": "[0, 1)", "adam_epsilon": "[0, inf)", "max_grad_norm": ("[0, inf)", "0 turns clipping off"),
        "label_smoothing_factor": "[0, 1)", "num_train_epochs": "(0, inf)",
        "warmup_steps": ("[0, inf)", "below 1: a share of all steps"), "eval_delay": "[0, inf)",
        "neftune_noise_alpha": "(0, inf)", "per_device_train_batch_size": "[1, inf)",
        "per_device_eval_batch_size": "[1, inf)", "gradient_accumulation_steps": "[1, inf)",
        "eval_accumulation_steps": "[1, inf)", "save_total_limit": "[0, inf)", "seed": f"[0, {SEED_MAX}]",
        "data_seed": f"[0, {SEED_MAX}]", "dataloader_num_workers": "[0, inf)", "dataloader_prefetch_factor": "[1, inf)",
        "early_stopping_patience": ("[0, inf)", "0 = never stop early"), "ddp_timeout": "(0, inf)",
    }
    for name, strategy in (("logging_steps", args.logging_strategy), ("eval_steps", args.eval_strategy),
                           ("save_steps", args.save_strategy)):
        if str(getattr(strategy, "value", strategy)) == "steps":
            ranges[name] = steps
    problems = number_problems(args, ranges)
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(f"--max_steps {args.max_steps} must be >= 1, or -1 to train for --num_train_epochs")
    return problems


def check_best_model_schedule(args: FineTuneTrainingArguments, by_default: bool) -> None:
    """--load_best_model_at_end needs a checkpoint at every evaluation; say so in this script's words (it is our
    default, which the Trainer's own message would not tell)."""
    save, evaluate = SaveStrategy(args.save_strategy), IntervalStrategy(args.eval_strategy)
    if not args.load_best_model_at_end or save == SaveStrategy.BEST:
        return
    flag = "--load_best_model_at_end" + (" (on by default in this script, to finish with the checkpoint of lowest "
                                         "validation loss)" if by_default else "")
    off = "--load_best_model_at_end false"
    if save.value != evaluate.value:
        raise UsageError(f"{flag} needs --eval_strategy and --save_strategy to match, but they are {evaluate.value} "
                         f"and {save.value}; pass --eval_strategy {save.value}, or {off}")
    if evaluate != IntervalStrategy.STEPS:
        return
    s, e = args.save_steps, args.eval_steps
    if (s < 1) != (e < 1) or round(s * 1_000_000) % round(e * 1_000_000):
        raise UsageError(f"{flag} needs a checkpoint at every evaluation, but --save_steps {s:g} is not a multiple of "
                         f"--eval_steps {e:g}; pass --eval_steps {s:g} (or a divisor of it), or {off}")


def parse_args(argv: Sequence[str] | None = None):
    """`[CONFIG.yaml ...] [--flag value ...]` -> (ModelArguments, DataArguments, FineTuneTrainingArguments).

    TrainingArguments rejects bad combinations with ValueError deep in its __post_init__; those become UsageError.
    """
    try:
        return parse_config(
            [ModelArguments, DataArguments, FineTuneTrainingArguments], argv, description=__doc__.split("\n\n")[0]
        )
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(" ".join(str(err).split())) from None


# ---------------------------------------------------------------------------------------------
# Data: labels and batches
# ---------------------------------------------------------------------------------------------
def build_labels(input_ids: Sequence[int], prompt_length: int) -> list[int]:
    """Labels for loss on the meta-review only: the prompt's positions become -100, the target keeps its ids.

    Masking is by POSITION, never by token id: with pad = eos, masking by id would also hide the target's
    final EOS and the model would never learn to stop. `build_labels([5, 6, 7, 0], 2)` -> [-100, -100, 7, 0].
    """
    return [IGNORE_INDEX] * prompt_length + list(input_ids[prompt_length:])


@dataclass
class CausalLMCollator:
    """Pad a list of {input_ids, labels} to the longest in the batch (dynamic padding, right side).

    Padding gets pad_token_id in input_ids, 0 in attention_mask and -100 in labels, by position, so a pad id
    equal to EOS cannot hide a real EOS label. Other keys (e.g. `length`) are ignored.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((batch, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)  # (B, T)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def to_training_features(split, mode: str):
    """Keep only what the Trainer needs: input_ids, labels (prompt masked in meta-review mode) and length."""

    def add_labels(row):
        if mode == "meta_review":
            labels = build_labels(row["input_ids"], row["prompt_length"])
        else:
            labels = list(row["input_ids"])
        return {"input_ids": row["input_ids"], "labels": labels, "length": len(row["input_ids"])}

    return split.map(add_labels, remove_columns=split.column_names, keep_in_memory=True, desc="adding labels")


# ---------------------------------------------------------------------------------------------
# Data: meta-review mode
# ---------------------------------------------------------------------------------------------
def is_processed_dir(path: Path) -> bool:
    return path.is_dir() and (path / "processing_config.json").is_file()


def same_tokenization(split, tokenizer, n: int = 3) -> bool:
    """Whether `tokenizer` reproduces the stored ids of the first rows (a different tokenizer would not)."""
    for row in split.select(range(min(n, len(split)))):
        ids = (tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
               + tokenizer(" " + row["Output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        if ids != list(row["input_ids"]):
            return False
    return True


def retokenize(dataset, tokenizer, max_length: int):
    """Cut and tokenize the rows again for another max_length or tokenizer (processing_meta_review's code).

    Returns (DatasetDict, {split: examples dropped because the meta-review alone leaves no room at max_length})."""
    import datasets
    from processing_meta_review import _features, tokenize_example

    out, dropped = {}, {}
    first = next(iter(dataset.values()))
    # Label columns (decision, avg_rating) ride along unchanged.
    features = _features({k: f.dtype for k, f in first.features.items() if k not in _features()})
    for name, split in dataset.items():
        rows = [example for row in split.to_list() if (example := tokenize_example(row, tokenizer, max_length))]
        dropped[name] = len(split) - len(rows)
        # from_dict, not from_list: an empty list carries no keys, and from_list([]) then fails ("Keys mismatch").
        out[name] = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)
    if any(dropped.values()):
        logger.warning("dropped %d examples whose meta-review alone exceeds --max_length %d", sum(dropped.values()),
                       max_length)
    return datasets.DatasetDict(out), dropped


def check_splits_not_emptied(dataset, dropped: dict[str, int], max_length: int, source: str) -> None:
    """A train or validation split that --max_length emptied (every meta-review too long for it) is one error with
    the fix, in both paths: a processed directory re-cut here, and a raw file processed on the fly."""
    for name in ("train", "validation"):
        if name in dataset and len(dataset[name]) == 0 and dropped.get(name):
            raise UsageError(f"--max_length {max_length} leaves no {name} examples from {source}: their meta-reviews "
                             f"are too long to fit with a prompt ({dropped[name]} examples dropped); raise --max_length")


def load_meta_review_dataset(data_args: DataArguments, tokenizer, tokenizer_name: str, tokenize: bool = True):
    """The processed DatasetDict (train/validation[/test]) for `tokenizer` and --max_length.

    A directory from processing_meta_review.py is read as is, or re-tokenized when it was made for another
    max_length or tokenizer; anything else goes through processing_meta_review.process(). `tokenize=False`
    (classification, which encodes its own inputs) keeps every row: nothing is re-cut or dropped for --max_length.
    """
    import datasets
    from processing_meta_review import ProcessingArguments, process

    path = Path(data_args.dataset_path).expanduser()
    if is_processed_dir(path):
        try:
            dataset = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"{path} is not a dataset saved by processing_meta_review.py: {first_line(err)}") from None
        needed = {"reviews", "Output", "prompt", "input_ids", "prompt_length"}
        for name in ("train", "validation"):
            if name not in dataset:
                raise UsageError(f"{path} has no '{name}' split (splits: {', '.join(dataset)}); re-run "
                                 "processing_meta_review.py")
            missing = sorted(needed - set(dataset[name].column_names))
            if missing:
                raise UsageError(f"{path} split '{name}' lacks columns {missing}; re-run processing_meta_review.py "
                                 "or pass --text_column for plain text")
        made_with = json.loads((path / "processing_config.json").read_text(encoding="utf-8"))
        if not tokenize:
            return dataset
        if made_with.get("max_length") != data_args.max_length or not same_tokenization(dataset["train"], tokenizer):
            logger.info("re-tokenizing %s (made with max_length=%s, tokenizer %s) for max_length=%d, tokenizer %s",
                        path, made_with.get("max_length"), made_with.get("tokenizer_name"), data_args.max_length,
                        tokenizer_name)
            dataset, dropped = retokenize(dataset, tokenizer, data_args.max_length)
            check_splits_not_emptied(dataset, dropped, data_args.max_length, str(path))
        return dataset
    logger.info("processing %s on the fly with processing_meta_review.process()", data_args.dataset_path)
    pargs = ProcessingArguments(
        dataset_name=data_args.dataset_path,
        input_column=data_args.input_column,
        output_column=data_args.output_column,
        tokenizer_name=tokenizer_name,
        max_length=data_args.max_length if tokenize else 10**9,  # classification: no row dropped for its length
        validation_split_percentage=data_args.validation_split_percentage,
    )
    dataset, stats = process(pargs, tokenizer, flag="--dataset_path")
    logger.info("processed: kept %s, dropped %s", stats["rows_kept"], stats["dropped"] or "none")
    check_splits_not_emptied(dataset, stats["exceeding_max_length"], data_args.max_length, data_args.dataset_path)
    return dataset


# ---------------------------------------------------------------------------------------------
# Data: plain-text mode
# ---------------------------------------------------------------------------------------------
def text_format(path: Path) -> str | None:
    """`text_format(Path("imdb.jsonl.gz"))` -> 'json'; the datasets library decompresses by itself."""
    return TEXT_FORMATS.get(split_compression(path)[0])


def load_text_dataset(data_args: DataArguments, seed: int):
    """Rows of plain text as a DatasetDict(train, validation) with one column, --text_column."""
    import datasets

    name = data_args.dataset_path
    path = Path(name).expanduser()
    column = data_args.text_column
    offline = None
    try:
        if path.is_dir():
            raw = datasets.load_from_disk(str(path))
        elif path.is_file():
            fmt = text_format(path)
            if fmt is None:
                raise UsageError(f"data file {path} has an unknown extension; use one of {sorted(TEXT_FORMATS)} "
                                 "(optionally .gz, .bz2, .xz or .zst)")
            raw = datasets.load_dataset(fmt, data_files={"train": str(path)})
        else:
            offline = hub_offline_reason()
            raw = datasets.load_dataset(name)
    except UsageError:
        raise
    except Exception as err:  # the datasets library wraps parser and Hub errors in many types
        if offline:
            raise not_cached_error("dataset", name, "--dataset_path", offline) from None
        raise UsageError(f"cannot read {name}: {first_line(err)}; check --dataset_path") from None
    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    if path.is_file() and text_format(path) == "text":
        column = "text"  # the text builder reads one line per row into a column named 'text'
    if "train" not in raw:
        raise UsageError(f"{name} has no train split (splits: {', '.join(raw)})")
    if column not in raw["train"].column_names:
        raise UsageError(f"column '{column}' not found in {name} (columns: {', '.join(raw['train'].column_names)}); "
                         "pass --text_column")
    keep = lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch[column]]  # noqa: E731
    val_name = next((s for s in ("validation", "valid", "val", "dev") if s in raw), None)
    train = raw["train"].select_columns([column]).filter(keep, batched=True, keep_in_memory=True)
    if val_name:
        validation = raw[val_name].select_columns([column]).filter(keep, batched=True, keep_in_memory=True)
    elif data_args.validation_split_percentage > 0 and len(train) > 1:
        import numpy as np

        order = np.random.default_rng(seed).permutation(len(train))
        n_val = max(1, round(len(train) * data_args.validation_split_percentage / 100))
        validation = train.select(sorted(order[:n_val]), keep_in_memory=True)
        train = train.select(sorted(order[n_val:]), keep_in_memory=True)
    else:
        validation = train.select([])
    if column != "text":
        train, validation = train.rename_column(column, "text"), validation.rename_column(column, "text")
    train = limit(train, data_args.max_train_samples, seed)
    validation = limit(validation, data_args.max_eval_samples, seed)
    return datasets.DatasetDict({"train": train, "validation": validation})


def limit(split, n: int | None, seed: int):
    """At most n rows: a seeded sample kept in file order (the first n rows of a file sorted by label or by
    date would be one class or one period)."""
    if n is None or len(split) <= n:
        return split
    import numpy as np

    return split.select(sorted(np.random.default_rng(seed).permutation(len(split))[:n].tolist()))


def tokenize_texts(split, tokenizer, max_length: int, packing: bool):
    """Texts -> input_ids. Packed: texts + EOS concatenated and cut into max_length blocks (the remainder of
    each 1,000-text batch is dropped, as in run_clm.py). Unpacked: one example per text, EOS-terminated."""
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        if not packing:
            # A text cut at max_length gets no EOS: the model must not learn to stop mid-text.
            return {"input_ids": [(x + [eos]) if len(x) < max_length else x[:max_length] for x in ids]}
        stream = [tok for x in ids for tok in x + [eos]]
        usable = len(stream) // max_length * max_length
        return {"input_ids": [stream[i:i + max_length] for i in range(0, usable, max_length)]}

    return split.map(encode, batched=True, batch_size=1000, remove_columns=split.column_names, keep_in_memory=True,
                     desc="tokenizing")


# ---------------------------------------------------------------------------------------------
# Data: both modes
# ---------------------------------------------------------------------------------------------
@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids, labels, length
    validation: Any
    samples: list[dict]  # {"id", "prompt_ids", "prompt", "reference"} for the sample generations
    mode: str  # "meta_review" or "text"
    description: str
    test: Any = None  # meta-review mode: the test split, evaluated with --do_predict
    label_info: dict | None = None  # classification/regression (classify.py): label map, template, head config


def check_dataset_path(name: str) -> None:
    """A local-looking --dataset_path must exist (anything else is taken for a Hub dataset id)."""
    path = Path(name).expanduser()
    if (path.suffix or name.startswith((".", "/", "~"))) and not path.exists():
        raise UsageError(f"--dataset_path {name} does not exist; pass the directory processing_meta_review.py wrote, "
                         "a data file, or a Hub dataset id")


def prepare_data(data_args: DataArguments, tokenizer, tokenizer_name: str, seed: int) -> PreparedData:
    """Load, tokenize and label the train/validation examples, and pick the prompts of the sample generations."""
    check_dataset_path(data_args.dataset_path)
    if data_args.task != "language_modeling":
        from classify import prepare_classification_data

        return prepare_classification_data(data_args, tokenizer, tokenizer_name, seed)
    mode = "text" if data_args.text_column else "meta_review"
    if mode == "meta_review":
        from processing_meta_review import check_max_length

        check_max_length(tokenizer, data_args.max_length)
        dataset = load_meta_review_dataset(data_args, tokenizer, tokenizer_name)
        train = limit(dataset["train"], data_args.max_train_samples, seed)
        validation = limit(dataset["validation"], data_args.max_eval_samples, seed)
        test = limit(dataset["test"], data_args.max_eval_samples, seed) if "test" in dataset else None
        samples = [
            {"id": row["example_id"], "prompt_ids": list(row["input_ids"][: row["prompt_length"]]),
             "prompt": row["prompt"], "reference": row["Output"]}
            for row in validation.select(range(min(data_args.num_samples, len(validation))))
        ]
        description = "meta-reviews (prompt masked, loss on meta-review + EOS)"
    else:
        raw = load_text_dataset(data_args, seed)
        train = tokenize_texts(raw["train"], tokenizer, data_args.max_length, data_args.packing)
        validation = tokenize_texts(raw["validation"], tokenizer, data_args.max_length, data_args.packing)
        test = None
        samples = []
        for i, row in enumerate(validation.select(range(min(data_args.num_samples, len(validation))))):
            n = min(TEXT_SAMPLE_PROMPT_TOKENS, len(row["input_ids"]) // 2)
            samples.append({"id": str(i), "prompt_ids": list(row["input_ids"][:n]),
                            "prompt": tokenizer.decode(row["input_ids"][:n]),
                            "reference": tokenizer.decode(row["input_ids"][n:])})
        layout = "packed into blocks" if data_args.packing else "one example per row"
        description = f"plain text, column '{data_args.text_column}', {layout}, loss on all tokens"
    if len(train) == 0:
        raise UsageError(f"no training examples from {data_args.dataset_path} at --max_length {data_args.max_length}; "
                         "check the data, or lower --max_length in plain-text mode")
    return PreparedData(to_training_features(train, mode), to_training_features(validation, mode), samples, mode,
                        description, to_training_features(test, mode) if test is not None else None)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def parse_overrides(text: str | None) -> dict[str, Any]:
    """`parse_overrides("hidden_size=64,hidden_act=relu")` -> {'hidden_size': 64, 'hidden_act': 'relu'}."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--config_overrides item '{item}' is not key=value (e.g. 'hidden_size=64')")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def check_config_keys(config, keys, source: str) -> None:
    """Model configs accept unknown keys silently; a typo would train a model other than the one asked for."""
    import difflib

    known = set(type(config)().to_dict())
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
            raise UsageError(f"{source}: '{key}' is not a field of {type(config).__name__}; {hint}")


def build_config(model_args: ModelArguments, tokenizer):
    """The config of a fresh model: a preset (vocab padded to a multiple of 128), or a config file/directory."""
    from transformers import AutoConfig, GPTNeoXConfig

    name = model_args.config_name
    if name in PRESETS:
        vocab = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        config = GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=2048, **PRESETS[name])
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise UsageError(f"--config_name {name} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                             "config file or directory")
        try:
            if path.is_file():
                config_dict = json.loads(path.read_text(encoding="utf-8"))
                config = AutoConfig.for_model(**config_dict)
            else:
                config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"cannot read model config {path}: {first_line(err)}") from None
        check_config_keys(config, config.to_dict(), f"model config {path}")
    overrides = parse_overrides(model_args.config_overrides)
    check_config_keys(config, overrides, "--config_overrides")
    for key, value in overrides.items():
        setattr(config, key, value)
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def load_model(model_args: ModelArguments, tokenizer, max_length: int, seed: int, head: dict | None = None):
    """A pretrained model (float32 by default) or a fresh one from --config_name, with special ids aligned.
    `head` (classify.py's num_labels, id2label, ...): a sequence-classification head instead of the LM head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    if model_args.config_name:
        config = build_config(model_args, tokenizer)
        config.update(head or {})
        set_seed(seed)  # the same seed gives the same initial weights
        auto = AutoModelForSequenceClassification if head else AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32, trust_remote_code=model_args.trust_remote_code)
    else:
        # Loaded on CPU; the Trainer moves it to this process's device (one per rank under torchrun).
        dtype = model_args.dtype
        if dtype == "auto":
            dtype = str(resolve_dtype("auto", default_device())).removeprefix("torch.")
        bits = quantization_bits(model_args.load_in_4bit, model_args.load_in_8bit)
        device = "cpu"
        if bits and default_device() == "cuda":  # quantised weights are placed at load; the Trainer cannot move them
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        model = load_causal_lm(model_args.model_name_or_path, dtype=dtype, device=device,
                               trust_remote_code=model_args.trust_remote_code, flag="--model_name_or_path", head=head,
                               quantize=bits, quantize_options=dict(
                                   compute_dtype=model_args.bnb_4bit_compute_dtype,
                                   quant_type=model_args.bnb_4bit_quant_type,
                                   double_quant=model_args.bnb_4bit_use_double_quant))
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise UsageError(f"the model has {rows} embedding rows but the tokenizer {len(tokenizer)} tokens; pass the "
                         "tokenizer the model was trained with (--tokenizer_name)")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise UsageError(f"--max_length {max_length} exceeds the model's context ({positions} positions); lower it")
    # Pythia's config says eos=0 but names no pad; generation and the saved config must know both (a classifier
    # finds its last real token by the pad id).
    for key in ("eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tokenizer, key))
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, getattr(tokenizer, key))
    model.train()
    return model


def apply_lora(model, model_args: ModelArguments, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a LoRA adapter; task_type SEQ_CLS (a classifier) also trains and saves the new `score` head."""
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules
    config = LoraConfig(
        task_type=task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
    )
    # The adapter records its base; an absolute path keeps it loadable from any working directory.
    base = Path(model_args.model_name_or_path).expanduser()
    config.base_model_name_or_path = str(base.resolve()) if base.is_dir() else model_args.model_name_or_path
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UsageError(f"LoRA: {first_line(err)}; check --lora_target_modules") from None


def count_parameters(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# Disk space
# ---------------------------------------------------------------------------------------------
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
    adapter_only = model_args.use_lora  # the Trainer saves a LoRA model's adapter, not the frozen base
    saved = trained if adapter_only else weights
    optimizer = 0 if training_args.save_only_model else 2 * 4 * sum(p.numel() for p in params if p.requires_grad)
    checkpoint = saved + optimizer
    final = weights if (not model_args.use_lora or model_args.merge_lora) else trained
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
                      f"removed: free some space or pass another --output_dir, then run the same command again ({resume})")


# ---------------------------------------------------------------------------------------------
# Checkpoints and resuming
# ---------------------------------------------------------------------------------------------
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
        # Leftovers of a final/ write that was killed before its rename (common.atomic_directory's names).
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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
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


def reload_weights(model, checkpoint_dir: str | Path) -> None:
    """Load a checkpoint's weights into `model` in place, through from_pretrained's key renaming.

    transformers 5.23 saves GPT-NeoX's `lm_head` under its Hub name `embed_out`, but the Trainer reloads
    checkpoints (resume, load_best_model_at_end) with a raw `load_state_dict(strict=False)` that skips it
    with only a warning: a resumed or "best" model would keep a stale output layer
    (huggingface/transformers#48805). from_pretrained applies the renaming; strict loading proves it.
    """
    fresh = type(model).from_pretrained(str(checkpoint_dir), dtype=model.dtype, use_safetensors=True)
    model.load_state_dict(fresh.state_dict(), strict=True)


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

    def _run_epoch(self, *, epoch, epochs_trained, resume_from_checkpoint, **kwargs):
        """The Trainer's epoch, except that a resume from a checkpoint whose run had already ended trains nothing.

        transformers 5.24 checks for the end only after a step (`_run_epoch`): resumed from checkpoint-N of a
        run that stopped at N (N = max_steps not at an epoch boundary, or an early stop), it skips N batches and
        trains step N + 1 anyway, and on_train_begin has cleared the stop saved in the checkpoint.
        """
        if resume_from_checkpoint is not None and epoch == epochs_trained and self._run_ended_at(resume_from_checkpoint):
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


def build_trainer(model, tokenizer, data: PreparedData, training_args: FineTuneTrainingArguments,
                  extra_callbacks: Sequence[TrainerCallback] = ()) -> LMTrainer:
    from transformers import EarlyStoppingCallback

    evaluating = training_args.eval_strategy != IntervalStrategy.NO
    if evaluating and len(data.validation) == 0:
        raise UsageError("the validation split is empty; raise --validation_split_percentage or pass "
                         "--eval_strategy no")
    callbacks: list[TrainerCallback] = list(extra_callbacks)
    if evaluating and training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    if data.label_info is not None:
        from classify import build_classifier_trainer

        return build_classifier_trainer(model, tokenizer, data, training_args, callbacks)
    # Tensor cores want sequence lengths in multiples of 8; on CPU that would only add padding.
    pad_multiple = 8 if (training_args.bf16 or training_args.fp16) else None
    return LMTrainer(
        model=model,
        args=training_args,
        data_collator=CausalLMCollator(tokenizer.pad_token_id, pad_multiple),
        train_dataset=data.train,
        eval_dataset=data.validation if evaluating else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


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
        f"({100 * trainable / max(total, 1):.2f}%)" + (f"; LoRA r={model_args.lora_r}" if model_args.use_lora else ""),
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
        lines.append(f"disk: a checkpoint ~{format_bytes(needs.checkpoint)}, final/ ~{format_bytes(needs.final)}, up to "
                     f"{format_bytes(needs.peak)} at once; " + (f"{format_bytes(free)} free" if free is not None else
                                                                 "free space unknown"))
    logger.info("fine_tune.py\n  %s", "\n  ".join(lines))


def evaluate_final(trainer, data: PreparedData, train_metrics: dict, training_args) -> dict:
    """Training metrics plus the final model's validation loss/perplexity (the best checkpoint's, with
    load_best_model_at_end) and, with --do_predict, the test split's."""
    metrics = {**train_metrics, "train_examples": len(data.train), "validation_examples": len(data.validation),
               "global_step": trainer.state.global_step, "best_checkpoint": trainer.state.best_model_checkpoint}
    if data.label_info is not None:  # the same metrics, with the confusion matrix (classify.evaluate_split)
        from classify import evaluate_split

        evaluate = lambda split, metric_key_prefix="eval": evaluate_split(  # noqa: E731
            trainer, split, metric_key_prefix, data.label_info)
    else:
        evaluate = lambda split=None, metric_key_prefix="eval": trainer.evaluate(  # noqa: E731
            split, metric_key_prefix=metric_key_prefix)
    if trainer.eval_dataset is not None:
        metrics.update(evaluate(trainer.eval_dataset))
    if training_args.do_predict and data.test is not None and len(data.test):
        metrics.update(evaluate(data.test, metric_key_prefix="test"))
        metrics["test_examples"] = len(data.test)
    return metrics


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def generate_samples(model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int = 4) -> list[dict]:
    """Greedy continuations of the sample prompts, with whether each ended in EOS.

    Prompts are padded on the LEFT: generation appends at the last column, so right padding would put pad
    tokens between a prompt and its continuation.
    """
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        width = max(len(s["prompt_ids"]) for s in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # (B, T)
        for i, s in enumerate(chunk):
            n = len(s["prompt_ids"])
            input_ids[i, width - n:] = torch.as_tensor(s["prompt_ids"])
            attention_mask[i, width - n:] = 1
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       generation_config=config)  # (B, T + new)
        for s, row in zip(chunk, generated[:, width:].tolist()):
            stopped = tokenizer.eos_token_id in row
            new = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            out.append({"id": s["id"], "prompt": s["prompt"], "reference": s["reference"],
                        "generation": tokenizer.decode(new, skip_special_tokens=True), "stopped_with_eos": stopped,
                        "new_tokens": len(new) + stopped})
    model.train(was_training)
    return out


def plot_training_curve(log_history: list[dict], path: Path, title: str = "fine_tune.py training curve",
                        extra_keys: Sequence[str] = ()) -> None:
    """Train and validation loss against optimizer step (PNG, matplotlib's Agg backend: no display needed); the
    logged values named in `extra_keys` (e.g. rl_tune.py's reward) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if extra_keys else "cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(loc="upper left")
    extra = [(key, [(h["step"], h[key]) for h in log_history if key in h]) for key in extra_keys]
    if any(points for _, points in extra):
        right = ax.twinx()
        for (key, points), color in zip(extra, ("tab:green", "tab:red", "tab:purple", "tab:brown")):
            if points:
                right.plot(*zip(*points), color=color, linestyle="--", label=key)
        right.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(model_args, data_args, training_args, data: PreparedData, metrics: dict, samples: list[dict],
               script: str = "fine_tune.py") -> str:
    """README.md for final/: base model, data, hyperparameters, results, prompt, one sample."""
    base = None if model_args.config_name else model_args.model_name_or_path
    library = "peft" if model_args.use_lora and not model_args.merge_lora else "transformers"
    classifier = data.label_info is not None
    front = ["---", f"library_name: {library}", f"pipeline_tag: {'text-classification' if classifier else 'text-generation'}",
             f"tags: [meta-review, proxy-tuning, {script}]"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    origin = (f"fine-tuned from `{base}`" + (f" with LoRA (r={model_args.lora_r}, alpha={model_args.lora_alpha}, "
              f"{'merged' if model_args.merge_lora else 'adapter'})" if model_args.use_lora else "")
              if base else f"trained from scratch (config `{model_args.config_name}`)")
    hyper = {
        "learning_rate": training_args.learning_rate, "lr_scheduler": training_args.lr_scheduler_type.value,
        "warmup_steps": training_args.warmup_steps, "epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps, "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": training_args.world_size, "weight_decay": training_args.weight_decay,
        "max_length": data_args.max_length, "seed": training_args.seed,
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
    }
    results = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines = [*front, "", f"# {Path(training_args.output_dir).name}", "",
             f"A {'sequence classifier (GPTNeoXForSequenceClassification)' if classifier else 'causal LM'} {origin}, "
             f"written by `{script}`.", "", "## Data", "",
             f"- source: `{data_args.dataset_path}`", f"- {data.description}",
             f"- examples: train {len(data.train)}, validation {len(data.validation)}", "",
             "## Training hyperparameters", "", "| name | value |", "| --- | --- |",
             *[f"| {k} | {v} |" for k, v in hyper.items()], "", "## Results", "", "| metric | value |",
             "| --- | --- |", *[f"| {k} | {v:.4g} |" for k, v in results.items()], "",
             "![training curve](training_curve.png)", ""]
    if classifier:
        from classify import card_lines

        return "\n".join(lines + card_lines(data))
    if data.mode == "meta_review":
        lines += ["## Prompt", "", "The target is ` <meta-review><|endoftext|>`; the prompt is:", "", "```text",
                  PROMPT_TEMPLATE, "```", ""]
    lines += ["## Use", "", "```python", "from common import load_causal_lm, load_tokenizer",
              "model = load_causal_lm(\"<this directory>\")", "tokenizer = load_tokenizer(\"<this directory>\")",
              "```", ""]
    if samples:
        s = samples[0]
        lines += ["## A sample (greedy, validation set)", "", "```text", s["generation"].strip(), "```",
                  f"(ended with EOS: {s['stopped_with_eos']})", ""]
    return "\n".join(lines)


def save_final(trainer, tokenizer, model_args, data_args, training_args, data: PreparedData, metrics: dict,
               samples: list[dict], run_config: str = RUN_CONFIG, card: str | None = None,
               curve_keys: Sequence[str] = ()) -> Path:
    """Write output_dir/final atomically: a temporary directory beside it, renamed when complete. `card` replaces
    the model card, `curve_keys` go on the training curve (rl_tune.py's rewards)."""
    final = Path(training_args.output_dir) / FINAL_DIR
    model = trainer.model
    if model_args.use_lora and model_args.merge_lora:
        model = model.merge_and_unload()
    with atomic_directory(final, overwrite=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is meant to be shared
        model.save_pretrained(tmp)  # safetensors; a peft model writes adapter_config.json + adapter_model.safetensors
        tokenizer.save_pretrained(tmp)
        write_json(tmp / run_config, to_jsonable(model_args, data_args, training_args))
        write_json(tmp / "metrics.json", metrics)
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        script = run_config.removesuffix("_config.json") + ".py"
        plot_training_curve(trainer.state.log_history, tmp / "training_curve.png", f"{script} training curve",
                            curve_keys)
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        bits = quantization_bits(model_args.load_in_4bit, model_args.load_in_8bit)
        if bits:  # load_causal_lm warns when the adapter is loaded otherwise
            write_json(tmp / QUANTIZATION_RECORD, quantization_record(bits, model_args.bnb_4bit_compute_dtype,
                                                                     model_args.bnb_4bit_use_double_quant,
                                                                     model_args.bnb_4bit_quant_type))
        if data.mode == "meta_review":
            (tmp / "prompt_template.txt").write_text(PROMPT_TEMPLATE + "\n", encoding="utf-8")
        if data.label_info is not None:
            from classify import write_classifier_files

            write_classifier_files(tmp, data, metrics)
        # After save_pretrained: peft writes a README.md of its own that this card replaces.
        card = card if card is not None else model_card(model_args, data_args, training_args, data, metrics, samples)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        for file in tmp.iterdir():
            file.chmod(0o644)  # some writers create private files; the result is meant to be shared
    return final


def push_final(final: Path, training_args: FineTuneTrainingArguments, hub_token: str | None = None) -> None:
    """Upload final/ (model, tokenizer, card, metrics). Trainer.push_to_hub is not used: it re-saves the model
    into output_dir and replaces the card with its own. The token comes from --hub_token, HF_TOKEN or
    `hf auth login`, and is never logged."""
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token or training_args.hub_token)  # main() passes the token it took off training_args
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    try:
        repo = api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(final), commit_message="End of training",
                          revision=training_args.hub_revision)
    except Exception as err:  # network and auth failures come in many types
        raise UsageError(
            f"push to {repo_id} failed: {first_line(err)}; check `hf auth login` and --hub_model_id"
        ) from None
    logger.info("pushed %s to https://huggingface.co/%s", final, repo.repo_id)


def finish_distributed() -> None:
    """Under torchrun, every rank waits here until rank 0 has written final/, then leaves the process group.

    A rank that simply exits while the others still use the group aborts inside gloo/NCCL ("terminate called
    without an active exception"), and torchrun then kills rank 0 before final/ is written.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(model_args: ModelArguments, data_args: DataArguments, training_args: FineTuneTrainingArguments,
         callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train and write output_dir/final. Returns {"status": "trained"|"done", "final_dir", "metrics",
    "resumed_from"}; with --hp_search, hp_search.run_search's summary instead. `callbacks` go to the Trainer."""
    from transformers import set_seed

    if data_args.hp_search:
        from hp_search import run_search

        return run_search(model_args, data_args, training_args)

    setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    out = Path(training_args.output_dir)
    if training_args.push_to_hub:
        check_hub_for_push()
    with training_args.main_process_first(local=False, desc="inspecting output_dir"):
        plan = plan_run(training_args)
    if plan.done:
        logger.info("%s already holds a finished run (%s); pass --overwrite_output_dir to train again, or "
                    "--resume_from_checkpoint to continue", out, out / FINAL_DIR)
        metrics_path = out / FINAL_DIR / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        return {"status": "done", "final_dir": out / FINAL_DIR, "metrics": metrics, "resumed_from": None}

    set_seed(training_args.seed)
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=model_args.trust_remote_code,
                               flag="--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    saved_max_length, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)  # measure long reviews whole
    data = prepare_data(data_args, tokenizer, tokenizer_name, training_args.seed)
    tokenizer.model_max_length = saved_max_length
    head = data.label_info["head"] if data.label_info else None
    model = load_model(model_args, tokenizer, data_args.max_length, training_args.seed, head)
    if model_args.use_lora:
        if quantization_bits(model_args.load_in_4bit, model_args.load_in_8bit):
            model = prepare_quantized_for_lora(model, training_args.activation_checkpointing)
        model = apply_lora(model, model_args, "SEQ_CLS" if head else "CAUSAL_LM")
        if training_args.activation_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input with frozen embeddings
    run_config = to_jsonable(model_args, data_args, training_args)
    # The Trainer's own pushes would copy checkpoint files into output_dir and write its own card; final/ is
    # pushed once at the end instead (push_final).
    push, training_args.push_to_hub = training_args.push_to_hub, False
    # The Trainer pickles its arguments into every checkpoint (training_args.bin); the token must not be in them.
    hub_token, training_args.hub_token = training_args.hub_token, None
    needs = estimate_disk_needs(model, model_args, training_args, len(list_checkpoints(out)))
    if training_args.should_save:
        check_disk_space(out, needs)  # before the Trainer, which creates output_dir
    trainer = build_trainer(model, tokenizer, data, training_args, callbacks)
    log_startup(model_args, data_args, training_args, data, model, plan, needs)
    if training_args.should_save:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if plan.resume_from:
                warn_config_changes(out, run_config)
            write_json(out / RUN_CONFIG, run_config)
        except OSError as err:
            raise write_error(out, err, "--output_dir", needs.checkpoint + needs.final) from None

    try:
        train_result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    except Exception as err:  # safetensors, torch.save and json each report a full disk in their own way
        failure = output_failure(out, err, needs, training_args.should_save)
        if failure is None:
            raise
        raise failure from None
    metrics = evaluate_final(trainer, data, train_result.metrics, training_args)
    result = {"status": "trained", "final_dir": out / FINAL_DIR, "metrics": metrics, "resumed_from": plan.resume_from}
    if not trainer.is_world_process_zero():
        finish_distributed()
        return result

    samples = generate_samples(trainer.model, tokenizer, data.samples, data_args.max_new_tokens,
                               training_args.per_device_eval_batch_size) if data.samples else []
    if samples:
        metrics["samples_stopped_with_eos"] = sum(s["stopped_with_eos"] for s in samples) / len(samples)
    trainer.log_metrics("final", {k: v for k, v in metrics.items() if v is not None and not isinstance(v, list)})
    try:
        final = save_final(trainer, tokenizer, model_args, data_args, training_args, data, metrics, samples)
    except Exception as err:  # atomic_directory has removed the partial final/
        failure = output_failure(out, err, needs, True)
        if failure is None:
            raise
        raise failure from None
    logger.info("wrote %s: %s", final, ", ".join(sorted(p.name for p in final.iterdir())))
    finish_distributed()
    if push:
        push_final(final, training_args, hub_token)
    return result


if __name__ == "__main__":
    cli(lambda: main(*parse_args()))()
