"""The flags of rl_tune.py: the method (DPO, GRPO, RLOO or PPO), the data and rewards, and the trainers' configs
(TRL's, and ours for PPO) with this project's defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from trl import DPOConfig, GRPOConfig, RLOOConfig

from proxytune.foundation.config import CONFIG_SUFFIXES, parse_config, read_config_file
from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.validation import number_problems
from proxytune.models.loading import DEFAULT_MODELS
from proxytune.task.arguments import TEMPLATE_HELP
from proxytune.training.arguments import ModelArguments, training_number_problems
from proxytune.training.classifier_scores import REWARD_INPUTS, REWARD_SCORES

METHODS = ("dpo", "grpo", "rloo", "ppo")


# Methods that learn from rewards (every one but DPO).
REWARD_METHODS = ("grpo", "rloo", "ppo")


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
    method: str = field(default="grpo", metadata={
        "help": "dpo (preference pairs), grpo or rloo (rewards, TRL's trainers), ppo (rewards; value head, GAE, "
                "adaptive KL: proxytune/preference/ppo.py).", "choices": list(METHODS)})
    dataset_path: str = field(
        default="outputs/meta_review",
        metadata={"help": "The papers: processing_meta_review.py's output directory or a raw Input/Output file. GRPO "
                  "samples its prompts from --split; DPO looks the workbook's papers up in every split."})
    split: str = field(default="train", metadata={"help": "GRPO/RLOO/PPO: the split whose papers are the prompts."})
    prompt_template: str | None = field(
        default=None, metadata={"help": TEMPLATE_HELP + " Default: the template --model_name_or_path (fine_tune.py's "
                                "final/) records, else meta_review. Not used with --text_dataset."})
    eval_split: str = field(default="validation",
                            metadata={"help": "Split of the papers scored before and after training (metrics.json)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "GRPO/RLOO/PPO: at most this many prompts (seeded)."})
    num_eval_examples: int = field(
        default=16, metadata={"help": "Papers of --eval_split decoded greedily before and after training (ROUGE-L, "
                              "EOS rate, repetition, reference NLL); with --text_dataset, held-out text prompts "
                              "continued by sampling and scored by the rewards; 0 = none."})
    # Prompts from plain text (the Mini-ChatGPT recipe)
    text_dataset: str | None = field(
        default=None, metadata={"help": "GRPO/RLOO/PPO: prompts from plain text instead of papers: the first "
                                "--prompt_length tokens of each text of a Hub dataset (e.g. stanfordnlp/imdb) or a "
                                "local file (.jsonl[.gz], .csv, .txt, ...); its validation split (else "
                                "--validation_split_percentage of it) is held out for the before/after scores."})
    text_column: str = field(default="text", metadata={"help": "--text_dataset's column of text."})
    prompt_length: str = field(
        default="2,8", metadata={"help": "--text_dataset: a prompt is the first N tokens of a text, N drawn uniformly "
                                 "per text from 'low,high' (the tutorial's 2,8), or a fixed 'N'."})
    completion_length: str | None = field(
        default=None, metadata={"help": "--text_dataset: new tokens per prompt, drawn per prompt from 'low,high' or a "
                                "fixed 'N' (default 4,16, the tutorial's); the trainer's --max_completion_length "
                                "becomes the high end."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "--text_dataset without a validation or test split: share held out."})
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
    # Rewards (GRPO, RLOO, PPO)
    reward: str | None = field(
        default=None,
        metadata={"help": f"Built-in rewards name:weight, comma-separated, of {', '.join(BUILTIN_REWARDS)} "
                  "(rouge = ROUGE-L F1 vs the reference in [0, 1]; eos = 1 if the completion ended with EOS; "
                  "length = 1 inside --length_range words, falling off outside; repetition = minus the share of "
                  f"repeated --repetition_ngram-grams). '' = only --reward_model. Default: {DEFAULT_REWARD} on "
                  "papers, '' with --text_dataset (which has no references)."})
    reward_model: str | None = field(
        default=None, metadata={"help": "A sequence classifier whose score is one more reward: fine_tune.py --task "
                                "classification's final/ (read through its classifier.json template), any Hub or "
                                "local AutoModelForSequenceClassification (e.g. a sentiment model), or a one-output "
                                "reward model (TRL's RewardTrainer's)."})
    reward_label: str | None = field(
        default=None, metadata={"help": "The class --reward_model rewards: a label name of its config.id2label "
                                "(e.g. POSITIVE; any case) or an index. Required when it has 2+ classes."})
    reward_score: str = field(
        default="logit", metadata={"help": "How --reward_label's output becomes the reward: logit (the class's raw "
                                   "logit, the tutorial's), log_odds (log p / (1 - p)), probability.",
                                   "choices": list(REWARD_SCORES)})
    reward_input: str = field(
        default="auto", metadata={"help": "What --reward_model reads: full (prompt + completion), completion, or "
                                  "auto (the completion for a fine_tune.py classifier of meta-reviews "
                                  "(--classification_input meta_review), else prompt + completion).",
                                  "choices": list(REWARD_INPUTS)})
    reward_model_weight: float = field(default=1.0, metadata={"help": "Weight of --reward_model's score."})
    length_range: str = field(default="20,200", metadata={"help": "The 'length' reward's range, in words."})
    repetition_ngram: int = field(default=3, metadata={"help": "n of the 'repetition' reward's n-grams."})
    # Outputs
    num_samples: int = field(default=4, metadata={"help": "Validation papers to generate from into samples.jsonl."})
    max_new_tokens: int = field(default=128, metadata={"help": "Length limit of the greedy evaluation and samples."})

    def __post_init__(self):
        raise_problems(number_problems(self, {
            "max_train_samples": "[1, inf)", "num_eval_examples": "[0, inf)", "min_pairs": "[1, inf)",
            "eval_pairs_percentage": "[0, 100)", "reward_model_weight": "[0, inf)", "repetition_ngram": "[1, inf)",
            "num_samples": "[0, inf)", "max_new_tokens": "[1, inf)", "validation_split_percentage": "[0, 100)"}))
        if self.reward is None:
            self.reward = "" if self.text_dataset else DEFAULT_REWARD
        if self.text_dataset and self.completion_length is None:
            self.completion_length = "4,16"


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


@dataclass
class RLOOArguments(RLOOConfig):
    """RLOOConfig with this project's defaults: fp32 on CPU, no gradient checkpointing, 4 completions per prompt (the
    leave-one-out baseline of each is the mean reward of the other 3), completions of 128 tokens (with
    --text_dataset, the high end of --completion_length), KL beta 0.05 (TRL's), checkpoints every 50 steps."""

    output_dir: str | None = _retuned(RLOOConfig, "output_dir", "outputs/rl-rloo")
    learning_rate: float = _retuned(RLOOConfig, "learning_rate", 1e-5)
    bf16: bool | None = _retuned(RLOOConfig, "bf16", False)
    gradient_checkpointing: bool = _retuned(RLOOConfig, "gradient_checkpointing", False)
    num_generations: int | None = _retuned(RLOOConfig, "num_generations", 4)
    max_completion_length: int | None = _retuned(RLOOConfig, "max_completion_length", 128)
    logging_steps: float = _retuned(RLOOConfig, "logging_steps", 5)
    save_steps: float = _retuned(RLOOConfig, "save_steps", 50)
    save_total_limit: int | None = _retuned(RLOOConfig, "save_total_limit", 2)
    max_length: int = field(
        default=2048, metadata={"help": "Prompt + completion tokens: a paper's reviews are cut so the prompt leaves "
                                "--max_completion_length free."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over: delete this script's checkpoints and result in --output_dir."})


# TrainingArguments flags --method ppo refuses (PPOArguments.__post_init__); the rest it honours: output_dir, seed,
# learning_rate, adam_*, weight_decay, max_grad_norm, lr_scheduler_type, warmup_steps, max_steps, num_train_epochs,
# per_device_train_batch_size, logging_steps, save_steps, save_total_limit, resume_from_checkpoint, use_cpu.
PPO_UNSUPPORTED = ("gradient_accumulation_steps", "fp16", "bf16", "gradient_checkpointing", "deepspeed", "fsdp",
                   "torch_compile", "eval_strategy", "load_best_model_at_end", "push_to_hub", "use_liger_kernel",
                   "neftune_noise_alpha", "label_smoothing_factor", "optim_target_modules")


@dataclass
class PPOArguments(TrainingArguments):
    """TrainingArguments (optimiser, schedule, seed, checkpoints, logging) and PPO's own settings; the defaults are the
    Mini-ChatGPT tutorial's (trl 0.x PPOConfig: lr 1.41e-5, init_kl_coef 0.2, adaptive KL to target 6, 4 PPO epochs,
    clip 0.2, gamma 1, lambda 0.95, vf_coef 0.1, pure sampling), with 16 prompts per rollout batch for a CPU.
    One training step = one rollout batch of --per_device_train_batch_size prompts and its PPO epochs. The optimiser is
    AdamW (--optim is not read); the TrainingArguments flags in PPO_UNSUPPORTED are refused."""

    output_dir: str | None = field(default="outputs/rl-ppo", metadata=TrainingArguments.__dataclass_fields__[
        "output_dir"].metadata)
    learning_rate: float = field(default=1.41e-5, metadata={"help": "AdamW's learning rate (policy and value head)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Prompts per rollout batch."})
    lr_scheduler_type: str = field(default="constant", metadata={
        "help": "The learning-rate schedule over the steps (transformers' names: constant, linear, cosine, ...)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every this many rollout batches."})
    save_steps: float = field(default=50, metadata={"help": "Write checkpoint-N every this many rollout batches."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    max_length: int = field(default=2048, metadata={"help": "Prompt + completion tokens: a paper's reviews are cut "
                                                    "so the prompt leaves --max_completion_length free."})
    max_completion_length: int = field(
        default=128, metadata={"help": "New tokens per completion (with --text_dataset, the high end of "
                               "--completion_length)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts (no top-k/top-p: "
                                                      "PPO's ratios are of the model's own distribution)."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "Optimisation epochs over each rollout batch."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per PPO epoch (each one optimiser step)."})
    cliprange: float = field(default=0.2, metadata={"help": "epsilon of the clipped policy ratio, 1 +- epsilon."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update around the "
                                                          "rollout's values."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount of GAE."})
    lam: float = field(default=0.95, metadata={"help": "lambda of GAE (1 = Monte-Carlo returns, 0 = one-step TD)."})
    init_kl_coef: float = field(default=0.2, metadata={"help": "KL penalty coefficient beta at the start."})
    adaptive_kl: bool = field(default=True, metadata={"help": "Adapt beta so the KL to the reference tracks "
                                                      "--target_kl (Ziegler et al. 2019); off: beta stays fixed."})
    target_kl: float = field(default=6.0, metadata={"help": "Adaptive KL: the target KL per completion (nats)."})
    kl_horizon: float = field(default=10000, metadata={"help": "Adaptive KL: horizon (in completions) of beta's "
                                                       "proportional control."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages to mean 0, std 1 per "
                                                            "rollout batch."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over: delete this script's checkpoints and result in --output_dir."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})

    def __post_init__(self):
        # TrainingArguments' flags that PPO's own loop (proxytune/preference/ppo_trainer.py) does not implement:
        # refused when set, so that --help's list never promises what the run would silently skip.
        defaults = TrainingArguments.__dataclass_fields__
        unused = [n for n in PPO_UNSUPPORTED if getattr(self, n) and getattr(self, n) != defaults[n].default]
        if unused:
            raise UsageError(f"--method ppo does not implement --{', --'.join(unused)} (its loop is "
                             "proxytune/preference/ppo_trainer.py: one process, fp32 or the model's dtype, a "
                             "checkpoint every --save_steps); drop them, or use --method rloo on TRL")
        super().__post_init__()  # (it turns some of them into other values: checked before)
        raise_problems(number_problems(self, {
            "max_completion_length": "[1, inf)", "temperature": "(0, inf)", "num_ppo_epochs": "[1, inf)",
            "num_mini_batches": "[1, inf)", "cliprange": "(0, inf)", "cliprange_value": "(0, inf)",
            "vf_coef": "[0, inf)", "gamma": "[0, 1]", "lam": "[0, 1]", "init_kl_coef": "[0, inf)",
            "target_kl": "(0, inf)", "kl_horizon": "(0, inf)", "max_length": "[2, inf)"}))
        if self.per_device_train_batch_size % self.num_mini_batches:
            raise UsageError(f"--per_device_train_batch_size {self.per_device_train_batch_size} does not split into "
                             f"--num_mini_batches {self.num_mini_batches}; pick a divisor")


CONFIGS = {"dpo": DPOArguments, "grpo": GRPOArguments, "rloo": RLOOArguments, "ppo": PPOArguments}


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
    """`[CONFIG ...] [--flag ...]` -> (RLArguments, RLModelArguments, one of CONFIGS' argument classes)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config = CONFIGS.get(peek_method(argv), GRPOArguments)  # an unknown --method is refused by its choices
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
