"""The flags of rl_tune.py: the method (DPO or GRPO), the data and rewards, and TRL's configs with our defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trl import DPOConfig, GRPOConfig

from proxytune.foundation.config import CONFIG_SUFFIXES, parse_config, read_config_file
from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.validation import number_problems
from proxytune.models.loading import DEFAULT_MODELS
from proxytune.training.arguments import ModelArguments, training_number_problems

METHODS = ("dpo", "grpo")


RUN_CONFIG = "rl_tune_config.json"


BUILTIN_REWARDS = ("rouge", "eos", "length", "repetition")


DEFAULT_REWARD = "rouge:1,eos:0.5,repetition:1"




def _from_fine_tune(name: str, **override):
    """One of ModelArguments' fields (its help and default), so the two scripts' model flags are one."""
    source = ModelArguments.__dataclass_fields__[name]
    kwargs = {"metadata": {**source.metadata, **override.pop("metadata", {})}}
    if "default" in override:
        kwargs["default"] = override["default"]
    elif source.default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = source.default_factory
    else:
        kwargs["default"] = source.default
    return field(**kwargs)


@dataclass
class RLModelArguments:
    """fine_tune.py's model and LoRA flags. trust_remote_code is the TRL config's flag (one flag for both)."""

    model_name_or_path: str = _from_fine_tune(
        "model_name_or_path", default=DEFAULT_MODELS["small_tuned"],
        metadata={"help": "The policy, which is also the reference: the small tuned model (fine_tune.py's final/), "
                  "a Hub id, or a LoRA adapter directory."})
    tokenizer_name: str | None = _from_fine_tune("tokenizer_name")
    dtype: str = _from_fine_tune("dtype")
    use_lora: bool = _from_fine_tune("use_lora")
    lora_r: int = _from_fine_tune("lora_r")
    lora_alpha: int = _from_fine_tune("lora_alpha")
    lora_dropout: float = _from_fine_tune("lora_dropout")
    lora_target_modules: list[str] = _from_fine_tune("lora_target_modules")
    merge_lora: bool = _from_fine_tune("merge_lora")
    config_name = None  # load_model's "fresh model" switch: RL starts from a trained model
    # fine_tune.py's QLoRA switches, off: RL here trains a full-precision policy (with or without LoRA).
    load_in_4bit = load_in_8bit = False
    bnb_4bit_compute_dtype, bnb_4bit_quant_type, bnb_4bit_use_double_quant = "auto", "nf4", True
    trust_remote_code = False  # set from the training config in parse_args

    def __post_init__(self):
        ModelArguments.__post_init__(self)


@dataclass
class RLArguments:
    method: str = field(default="grpo", metadata={"help": "dpo (preference pairs) or grpo (rewards).",
                                                  "choices": list(METHODS)})
    dataset_path: str = field(
        default="outputs/meta_review",
        metadata={"help": "The papers: processing_meta_review.py's output directory or a raw Input/Output file. GRPO "
                  "samples its prompts from --split; DPO looks the workbook's papers up in every split."})
    split: str = field(default="train", metadata={"help": "GRPO: the split whose papers are the prompts."})
    eval_split: str = field(default="validation",
                            metadata={"help": "Split of the papers scored before and after training (metrics.json)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "GRPO: at most this many prompts (seeded)."})
    num_eval_examples: int = field(
        default=16, metadata={"help": "Papers of --eval_split decoded greedily before and after training (ROUGE-L, "
                              "EOS rate, repetition, reference NLL); 0 = none."})
    # DPO
    workbook: str | None = field(
        default=None, metadata={"help": "DPO: evaluation.py's eval_examples.xlsx, or the ratings.jsonl it (or "
                                "workbook.py) exported. predictions.jsonl beside it tells which outputs ended in EOS."})
    pairs_file: str | None = field(
        default=None, metadata={"help": "DPO: a JSONL of {prompt, chosen, rejected} texts instead of a workbook (a "
                                "completion that ends with the EOS token text is trained with its EOS)."})
    min_pairs: int = field(default=8, metadata={"help": "DPO: refuse to train on fewer preference pairs."})
    eval_pairs_percentage: float = field(
        default=10.0, metadata={"help": "DPO: share of the papers whose pairs are held out to measure the margin."})
    # GRPO
    reward: str = field(
        default=DEFAULT_REWARD,
        metadata={"help": f"GRPO: built-in rewards name:weight, comma-separated, of {', '.join(BUILTIN_REWARDS)} "
                  "(rouge = ROUGE-L F1 vs the reference in [0, 1]; eos = 1 if the completion ended with EOS; "
                  "length = 1 inside --length_range words, falling off outside; repetition = minus the share of "
                  "repeated --repetition_ngram-grams). '' = only --reward_model."})
    reward_model: str | None = field(
        default=None, metadata={"help": "GRPO: a sequence-classification directory with num_labels 1 (e.g. TRL's "
                                "RewardTrainer's); its score of prompt + completion is one more reward."})
    reward_model_weight: float = field(default=1.0, metadata={"help": "GRPO: weight of --reward_model's score."})
    length_range: str = field(default="20,200", metadata={"help": "GRPO: the 'length' reward's range, in words."})
    repetition_ngram: int = field(default=3, metadata={"help": "GRPO: n of the 'repetition' reward's n-grams."})
    # Outputs
    num_samples: int = field(default=4, metadata={"help": "Validation papers to generate from into samples.jsonl."})
    max_new_tokens: int = field(default=128, metadata={"help": "Length limit of the greedy evaluation and samples."})

    def __post_init__(self):
        raise_problems(number_problems(self, {
            "max_train_samples": "[1, inf)", "num_eval_examples": "[0, inf)", "min_pairs": "[1, inf)",
            "eval_pairs_percentage": "[0, 100)", "reward_model_weight": "[0, inf)", "repetition_ngram": "[1, inf)",
            "num_samples": "[0, inf)", "max_new_tokens": "[1, inf)"}))


def _retuned(config: type, name: str, default: Any):
    """A TRL config field with this project's default; its help text is kept."""
    return field(default=default, metadata=config.__dataclass_fields__[name].metadata)


@dataclass
class DPOArguments(DPOConfig):
    """DPOConfig with this project's defaults: fp32 on CPU, no gradient checkpointing (small models), prompt +
    completion up to Pythia's 2048 tokens, checkpoints every 50 steps."""

    output_dir: str | None = _retuned(DPOConfig, "output_dir", "outputs/rl-dpo")
    learning_rate: float = _retuned(DPOConfig, "learning_rate", 1e-5)
    bf16: bool | None = _retuned(DPOConfig, "bf16", False)
    gradient_checkpointing: bool = _retuned(DPOConfig, "gradient_checkpointing", False)
    max_length: int | None = _retuned(DPOConfig, "max_length", 2048)
    logging_steps: float = _retuned(DPOConfig, "logging_steps", 5)
    save_steps: float = _retuned(DPOConfig, "save_steps", 50)
    save_total_limit: int | None = _retuned(DPOConfig, "save_total_limit", 2)
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over: delete this script's checkpoints and result in --output_dir."})


@dataclass
class GRPOArguments(GRPOConfig):
    """GRPOConfig with this project's defaults: fp32 on CPU, no gradient checkpointing, completions of 128 tokens
    (evaluation.py's max_new_tokens), a KL term (beta 0.04) that keeps the policy near the reference."""

    output_dir: str | None = _retuned(GRPOConfig, "output_dir", "outputs/rl-grpo")
    learning_rate: float = _retuned(GRPOConfig, "learning_rate", 1e-5)
    bf16: bool | None = _retuned(GRPOConfig, "bf16", False)
    gradient_checkpointing: bool = _retuned(GRPOConfig, "gradient_checkpointing", False)
    max_completion_length: int | None = _retuned(GRPOConfig, "max_completion_length", 128)
    beta: float = _retuned(GRPOConfig, "beta", 0.04)
    logging_steps: float = _retuned(GRPOConfig, "logging_steps", 5)
    save_steps: float = _retuned(GRPOConfig, "save_steps", 50)
    save_total_limit: int | None = _retuned(GRPOConfig, "save_total_limit", 2)
    max_length: int = field(
        default=2048, metadata={"help": "Prompt + completion tokens: the reviews are cut "
                                "(proxytune.task.prompts.build_prompt) so the prompt leaves --max_completion_length "
                                "free."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over: delete this script's checkpoints and result in --output_dir."})


def peek_method(argv: Sequence[str]) -> str:
    """The --method of `[CONFIG ...] [--flag ...]` (flags win over files), which picks the TRL config to parse."""
    method = "grpo"
    args = list(argv)
    while args and not args[0].startswith("-") and args[0].endswith(CONFIG_SUFFIXES):
        method = str(read_config_file(args.pop(0)).get("method", method))
    for i, arg in enumerate(args):
        if arg == "--method" and i + 1 < len(args):
            method = args[i + 1]
        elif arg.startswith("--method="):
            method = arg.split("=", 1)[1]
    return method


def parse_args(argv: Sequence[str] | None = None):
    """`[CONFIG ...] [--flag ...]` -> (RLArguments, RLModelArguments, DPOArguments | GRPOArguments)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config = DPOArguments if peek_method(argv) == "dpo" else GRPOArguments
    try:
        args, model_args, training_args = parse_config([RLArguments, RLModelArguments, config], argv,
                                                       description=__doc__.split("\n\n")[0])
    except UsageError:
        raise
    except ValueError as err:  # TrainingArguments/TRL configs refuse combinations deep in __post_init__
        raise UsageError(" ".join(str(err).split())) from None
    model_args.trust_remote_code = training_args.trust_remote_code
    raise_problems(training_number_problems(training_args))
    return args, model_args, training_args
