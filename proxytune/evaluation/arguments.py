"""The flags of evaluation.py: models and systems, decoding, outputs, and continuations of text prompts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.validation import SEED_MAX, decoding_problems, number_problems
from proxytune.models.loading import DEFAULT_MODELS, DTYPES
from proxytune.models.quantization import QuantizationArguments, quantization_flags_last
from proxytune.steering.shared_base import PAIR_SMALL_MODELS_HELP
from proxytune.task.papers import DataArguments
from proxytune.training.classifier_scores import REWARD_INPUTS, REWARD_SCORES
from proxytune.training.text_prompts import parse_token_range

SYSTEMS = ("small_base", "small_tuned", "large", "large_tuned", "steered")


# The model roles each system needs; the steered system is the large model pushed by (tuned - base).
SYSTEM_ROLES = {
    "small_base": ("small_base",),
    "small_tuned": ("small_tuned",),
    "large": ("large",),
    "large_tuned": ("large_tuned",),
    "steered": ("large", "small_base", "small_tuned"),
}


# What the pipeline's earlier steps make by default (steer.py --tune's output_dir, processing's), so that a bare
# `python evaluation.py` evaluates them; the models are proxytune.models.loading.DEFAULT_MODELS.
DEFAULT_BLEND = "outputs/steer/blend.json"


DECODING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size")


@quantization_flags_last
@dataclass
class ModelArguments(QuantizationArguments):
    small_base_model: str | None = field(
        default=None, metadata={"help": "Small base model (Hub id or dir). With no model flag at all: the blend's "
                                f"record, else {DEFAULT_MODELS['small_base']}."})
    small_tuned_model: str | None = field(
        default=None, metadata={"help": "Small fine-tuned model: a dir from fine_tune.py (full or LoRA adapter). With "
                                f"no model flag at all: the blend's record, else {DEFAULT_MODELS['small_tuned']}."}
    )
    large_model: str | None = field(
        default=None, metadata={"help": "Large base model (Hub id or dir). With no model flag at all: the blend's "
                                f"record, else {DEFAULT_MODELS['large']}."})
    large_tuned_model: str | None = field(default=None, metadata={"help": "Large fine-tuned model, if you have one."})
    blend: str | None = field(
        default=None, metadata={"help": "Blend JSON from steer.py --tune; adds the 'steered' system, and the models "
                                "it records are used where no model flag is given. With no model flag at all: "
                                f"{DEFAULT_BLEND} when it exists."}
    )
    alpha: float | None = field(
        default=None, metadata={"help": "Instead of --blend: steer with Blend.from_alpha(alpha) (1.0 = proxy-tuning)."}
    )
    systems: list[str] | None = field(
        default=None,
        metadata={"help": f"Run only these systems (of {', '.join(SYSTEMS)}). "
                          "Default: every system whose models are given."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer. Default: the large model's, else the first model given."}
    )
    dtype: str = field(
        default="auto", metadata={"help": "Weights dtype ('auto': float32 on CPU).", "choices": list(DTYPES)}
    )
    pair_small_models: bool = field(default=False, metadata={"help": PAIR_SMALL_MODELS_HELP})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... Default: cuda if available."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub models to run their own code."})

    def __post_init__(self):
        super().__post_init__()  # --{role}_load_in_4bit / _8bit
        raise_problems(number_problems(self, {"alpha": ("[0, inf)", "0 = the large model alone, 1 = proxy-tuning")}))

    def model_paths(self) -> dict[str, str]:
        """{role: path} for the models given."""
        roles = {"small_base": self.small_base_model, "small_tuned": self.small_tuned_model,
                 "large": self.large_model, "large_tuned": self.large_tuned_model}
        return {role: path for role, path in roles.items() if path}


@dataclass
class GenerationArguments:
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated at most per example."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (with --do_sample)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL repetition penalty (1.0 = off)."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Forbid repeating n-grams of this size (0 = off)."})
    decoding_overrides: str | None = field(
        default=None,
        metadata={"help": "Per-system changes, JSON text or a .json/.yaml file: "
                  "'{\"steered\": {\"temperature\": 0.7, \"do_sample\": true}}'."},
    )
    batch_size: int = field(default=8, metadata={"help": "Examples per generation batch."})
    speculative: bool = field(
        default=True, metadata={"help": "steered system: decode speculatively with S_tuned drafting (same greedy "
                                "output, same sampling distribution; proxytune/steering/speculative.py); "
                                "false = the plain loop."})

    def __post_init__(self):
        raise_problems(decoding_problems(dataclasses.asdict(self), "--")
                       + number_problems(self, {"batch_size": "[1, inf)"}))


@dataclass
class OutputArguments:
    output_dir: str = field(default="outputs/evaluation", metadata={"help": "Where metrics, predictions and plots go."})
    output_xlsx: str | None = field(
        default=None, metadata={"help": "The workbook. Default: OUTPUT_DIR/eval_examples.xlsx."}
    )
    compute_perplexity: bool = field(
        default=True, metadata={"help": "Also score the references: perplexity of each system (steered: of the blend)."}
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap resamples for confidence intervals."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the intervals."})
    repetition_ngram: int = field(default=3, metadata={"help": "n of the repeated-n-gram share (words)."})
    review_chars: int = field(
        default=2000, metadata={"help": "Reviews are cut to this many characters in the workbook."}
    )
    pairwise: str = field(
        default="auto",
        metadata={"help": "Two systems for the workbook's blind Pairwise sheet (pick the better of A/B), e.g. "
                  "'steered,large'; 'auto': steered,large when both are evaluated; 'none': no Pairwise sheet."},
    )
    decision_classifier: str | None = field(
        default=None, metadata={"help": "A meta-review -> decision classifier (final/ of fine_tune.py --task "
                                "classification --classification_input meta_review): adds decision_consistency, the "
                                "share of each system's meta-reviews whose predicted decision is the paper's real one, "
                                "with the classifier's accuracy on the references (ceiling) and the majority class's "
                                "rate (floor). Papers without a decision are left out of all three."})
    review_seed: int | None = field(
        default=None, metadata={"help": "Seed of the blind labels' shuffle in the workbook (recorded in its Run "
                                "sheet). Default: --seed."},
    )
    shard_index: int | None = field(default=None, metadata={"help": "This process's shard (default: $RANK, else 0)."})
    num_shards: int | None = field(default=None, metadata={"help": "Number of shards (default: $WORLD_SIZE, else 1)."})
    merge_only: bool = field(
        default=False, metadata={"help": "Only merge OUTPUT_DIR/shards/*.json and write the outputs."}
    )
    shard_timeout: float = field(default=10800, metadata={"help": "Seconds rank 0 waits for the other ranks."})

    def __post_init__(self):
        problems = number_problems(self, {
            "bootstrap_samples": "[1, inf)", "confidence": ("(0, 1)", "e.g. 0.95"), "repetition_ngram": "[1, inf)",
            "review_chars": "[1, inf)", "review_seed": f"[0, {SEED_MAX}]", "num_shards": "[1, inf)",
            "shard_timeout": ("(0, inf)", "seconds")})
        if self.pairwise not in ("auto", "none"):
            pair = [s.strip() for s in self.pairwise.split(",")]
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(SYSTEMS):
                problems.append(f"--pairwise {self.pairwise} must name two different systems of {', '.join(SYSTEMS)} "
                                "(e.g. steered,large), or be auto or none")
        if self.shard_index is not None and not 0 <= self.shard_index < (self.num_shards or 1):
            problems.append(f"--shard_index {self.shard_index} must be in [0, --num_shards)")
        raise_problems(problems)

    @property
    def workbook_path(self) -> Path:
        return Path(self.output_xlsx) if self.output_xlsx else Path(self.output_dir) / "eval_examples.xlsx"


@dataclass
class ContinuationArguments:
    """--text_dataset: continuations of plain-text prompts, scored without references
    (proxytune/evaluation/continuations.py)."""

    text_dataset: str | None = field(
        default=None,
        metadata={"help": "Evaluate continuations of text prompts instead of meta-reviews: a Hub dataset (e.g. "
                  "stanfordnlp/imdb) or a local .jsonl[.gz]/.csv/.parquet/.txt file. The prompts are the first "
                  "--prompt_length tokens of --num_examples of its held-out texts (a seeded sample of its validation "
                  "split, else of the --validation_split_percentage that rl_tune.py holds out with the same --seed). "
                  "There is no reference, so no ROUGE and no reference perplexity; one process only (no shards)."})
    text_column: str = field(default="text", metadata={"help": "--text_dataset's column of text."})
    prompt_length: str = field(
        default="2,8",
        metadata={"help": "--text_dataset: a prompt is the first N tokens of a text (the systems' tokenizer), N drawn "
                  "per text from 'low,high' or fixed 'N'; texts shorter than the low end are skipped."})
    completion_length: str | None = field(
        default=None,
        metadata={"help": "--text_dataset: new tokens per prompt, drawn per prompt from 'low,high' or fixed 'N' "
                  "(rl_tune.py's default is 4,16); each system generates up to the high end and each continuation is "
                  "cut at its draw. Default: --max_new_tokens (per system, as --decoding_overrides sets it)."})
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "--text_dataset without a validation split: the share of it held out, whose texts give the "
                  "prompts (rl_tune.py's flag: the same --seed holds out the same texts)."})
    reward_model: str | None = field(
        default=None,
        metadata={"help": "--text_dataset: a sequence classifier (fine_tune.py --task classification's final/, or any "
                  "AutoModelForSequenceClassification directory or Hub id) read at --reward_label as rl_tune.py reads "
                  "its reward: per system, reward_positive_rate (the share of continuations whose top class is that "
                  "label) and reward_score (the mean --reward_score)."})
    reward_label: str | None = field(
        default=None,
        metadata={"help": "The class --reward_model is read at, by its id2label name (any case) or index, e.g. "
                  "positive; needed when it has two or more classes."})
    reward_score: str = field(
        default="logit",
        metadata={"help": "How --reward_label's output becomes reward_score: logit (its raw logit), log_odds "
                  "(log p / (1 - p)) or probability.", "choices": list(REWARD_SCORES)})
    reward_input: str = field(
        default="auto",
        metadata={"help": "What --reward_model and --judge_classifier read: full (prompt + continuation), completion "
                  "(the continuation alone), auto (the continuation for a fine_tune.py classifier of meta-reviews, "
                  "else full).", "choices": list(REWARD_INPUTS)})
    judge_classifier: str | None = field(
        default=None,
        metadata={"help": "--text_dataset: a second classifier, independent of the reward (e.g. trained on other "
                  "texts), so that a gain only the reward model sees shows: per system, judge_positive_rate, the share "
                  "of continuations whose top class is --judge_label."})
    judge_label: str | None = field(
        default=None, metadata={"help": "--judge_classifier's class, by name or index. Default: --reward_label."})
    fluency_model: str | None = field(
        default=None,
        metadata={"help": "--text_dataset: a causal LM (Hub id or directory) that scores fluency: fluency_perplexity, "
                  "exp of the mean NLL of the continuation's tokens given the prompt, both in this model's own "
                  "tokenization (EOS not scored); per system it is corpus-level (total NLL / total tokens)."})

    def __post_init__(self):
        problems = number_problems(self, {"validation_split_percentage": "[0, 100)"})
        for name in ("prompt_length", "completion_length"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_token_range(value, f"--{name}")
                except UsageError as err:
                    problems.append(str(err))
        given = [f"--{name}" for name in ("completion_length", "reward_model", "judge_classifier", "fluency_model")
                 if getattr(self, name) is not None]
        if given and not self.text_dataset:
            problems.append(f"{', '.join(given)} score continuations of text prompts; pass --text_dataset (or drop "
                            "them)")
        for label, model in (("reward_label", "reward_model"), ("judge_label", "judge_classifier")):
            if getattr(self, label) is not None and getattr(self, model) is None:
                problems.append(f"--{label} {getattr(self, label)} names a class of --{model}; pass --{model}")
        raise_problems(problems)


ARGUMENT_TYPES = (ModelArguments, DataArguments, GenerationArguments, OutputArguments, ContinuationArguments)
