"""The flags of fine_tune.py: model, data and training arguments (TrainingArguments with our defaults)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.validation import SEED_MAX, number_problems
from proxytune.models.adapters import NON_LINEARITIES, is_bottleneck_dir
from proxytune.models.loading import DTYPES
from proxytune.models.quantization import quantization_bits
from proxytune.task.arguments import TEMPLATE_HELP

DEFAULT_MODEL = "EleutherAI/pythia-70m"


ADAPTERS = ("lora", "bottleneck")


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


# GPT-NeoX's linear layers: attention in/out projections and the two MLP matrices.
GPT_NEOX_LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Model to fine-tune: Hub id, save_pretrained directory, a LoRA or bottleneck adapter "
                  "directory, or a nanoGPT ckpt.pt (with --tokenizer_name)."},
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
    # Bottleneck adapters (proxytune/models/adapters.py): the peer of LoRA; --adapter lora is --use_lora.
    adapter: str | None = field(
        default=None, metadata={"help": "Train an adapter instead of all weights: lora (= --use_lora), or bottleneck "
                                "(down-projection, non-linearity, up-projection after each attention block and MLP; "
                                "cannot be merged).", "choices": list(ADAPTERS)})
    reduction_factor: int = field(
        default=16, metadata={"help": "--adapter bottleneck: hidden size / bottleneck size (16 on pythia-70m: 32 "
                              "units, about the trained parameters of LoRA r=8 on all four linear layers)."})
    adapter_non_linearity: str = field(
        default="relu", metadata={"help": "--adapter bottleneck: the non-linearity between the projections.",
                                  "choices": list(NON_LINEARITIES)})
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
        adapter = getattr(self, "adapter", None)  # rl_tune.py's model flags share these checks without the field
        if adapter == "lora":
            self.use_lora = True
        if adapter == "bottleneck":
            problems += number_problems(self, {"reduction_factor": "[1, inf)"})
            if self.merge_lora:
                problems.append("--merge_lora: a bottleneck adapter cannot be merged into the weights (its "
                                "non-linearity is not a weight update); drop --merge_lora: steer.py, evaluation.py and "
                                "rl_tune.py load the adapter directory")
            if self.use_lora:
                problems.append("--use_lora and --adapter bottleneck are two adapters; choose one")
            if self.config_name:
                problems.append("--adapter bottleneck adapts a pretrained model; drop it or drop --config_name")
        if is_bottleneck_dir(self.model_name_or_path) and (self.use_lora or adapter == "bottleneck"):
            problems.append(f"--model_name_or_path {self.model_name_or_path} is a bottleneck adapter, which trains "
                            "its own adapters; drop --use_lora/--adapter, or pass its base model")
        if self.merge_lora and not self.use_lora and adapter != "bottleneck":
            problems.append("--merge_lora needs --use_lora")
        if self.use_lora and self.config_name:
            problems.append("--use_lora adapts a pretrained model; drop it or drop --config_name")
        bits = quantization_bits(self.load_in_4bit, self.load_in_8bit)
        if bits and adapter == "bottleneck":
            problems.append(f"--load_in_{bits}bit with --adapter bottleneck is not supported yet (bottleneck adapters "
                            "train on a full-precision base); drop it, or use --use_lora for QLoRA")
        elif bits and not self.use_lora:
            problems.append(f"--load_in_{bits}bit trains a LoRA adapter on the frozen quantised base "
                            "(quantised weights cannot be trained); add --use_lora")
        if bits and (Path(self.model_name_or_path).expanduser() / "adapter_config.json").is_file():
            problems.append(f"--load_in_{bits}bit quantises a base model, but --model_name_or_path "
                            f"{self.model_name_or_path} is a LoRA adapter; pass its base model")
        if bits and self.merge_lora:
            problems.append(f"--merge_lora with --load_in_{bits}bit would round the update into the {bits}-bit "
                            f"weights; drop --merge_lora and load the adapter with steer.py/evaluation.py "
                            f"(--large_load_in_{bits}bit, or unquantised: merged into the full-precision base)")
        if self.dtype == "float16" and not self.use_lora and adapter != "bottleneck":
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
        metadata={"help": "Plain-text mode: train a language model on this column (no prompt, loss on every token). "
                  "With --classification_input text: the column the classifier reads (default: text)."},
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
    prompt_template: str | None = field(
        default=None, metadata={"help": TEMPLATE_HELP + " Default: the template the processed --dataset_path records "
                                "(processing_meta_review.py --prompt_template), else meta_review."})
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
    # The task: language modelling (this script's own), or a classifier of a label column (training/classification.py).
    task: str = field(
        default="language_modeling",
        metadata={"help": "language_modeling (write the meta-review), or classification / regression of "
                  "--label_column with a sequence-classification head (proxytune/training/classification.py).",
                  "choices": [
                      "language_modeling", "classification", "regression"]},
    )
    label_column: str | None = field(
        default=None, metadata={"help": "classification/regression: the label column (decision, avg_rating). "
                                "Default: decision for classification, avg_rating for regression; label with "
                                "--classification_input text."}
    )
    classification_input: str = field(
        default="reviews", metadata={"help": "classification/regression: what the model reads, the reviews (predict "
                                     "the decision), the meta-review (which decision does it state?), or text: "
                                     "plain labelled rows of --dataset_path (a .jsonl[.gz]/.csv/.parquet file, a "
                                     "saved dataset or a Hub id), --text_column read, --label_column predicted "
                                     "(e.g. IMDB sentiment).",
                                     "choices": ["reviews", "meta_review", "text"]}
    )
    label_map: str | None = field(
        default=None, metadata={"help": "classification: names for the label column's values, 'value=name,...' in "
                                "class order, e.g. 0=negative,1=positive (the Hub's IMDB) or neg=negative,"
                                "pos=positive; the names become id2label (rl_tune.py --reward_label positive). A "
                                "value it does not name is an error. Default: the values as they are, sorted."}
    )
    class_weights: str = field(
        default="none", metadata={"help": "classification: 'balanced' weighs each class's loss by n / (k * n_class), "
                                  "for imbalanced labels; 'none' = plain cross-entropy.",
                                  "choices": ["none", "balanced"]}
    )
    # Hyperparameter search (training/hp_search.py): --output_dir then holds trial-<n>/ runs, the study's reports and
    # best.yaml.
    hp_search: str | None = field(
        default=None, metadata={"help": "Search hyperparameters over this space file (YAML/JSON: a list = values to "
                                "try, {low, high, log} = a range, a scalar = fixed); "
                                "see README 'Hyperparameter search'."}
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
    hp_no_wait: bool = field(
        default=False, metadata={"help": "When this worker has no trial left to run but other live workers still "
                                 "run some, write the reports and leave instead of waiting for them (the reports "
                                 "then say how many grid points are missing)."}
    )

    def __post_init__(self):
        # Meta-review mode: the lowest --max_length depends on the tokenizer
        # (proxytune.task.processing.check_max_length, once it is loaded). Plain text needs two tokens: an input and
        # the label it predicts.
        ranges = {"validation_split_percentage": "[0, 100)", "max_train_samples": "[1, inf)",
                  "max_eval_samples": "[1, inf)", "num_samples": "[0, inf)", "max_new_tokens": "[1, inf)"}
        if self.text_column:
            ranges["max_length"] = ("[2, inf)", "a block needs an input token and a label")
        problems = number_problems(self, ranges)
        if self.task != "language_modeling":
            text_input = self.classification_input == "text"
            default_label = "decision" if self.task == "classification" else "avg_rating"
            self.label_column = self.label_column or ("label" if text_input else default_label)
            if text_input:
                self.text_column = self.text_column or "text"
            elif self.text_column:
                problems.append(f"--task {self.task} --classification_input {self.classification_input} reads "
                                "Input/Output rows; drop --text_column, or pass --classification_input text")
        if self.label_map is not None and self.task != "classification":
            problems.append(f"--label_map names classes; it needs --task classification (not {self.task})")
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
