"""Generate meta-reviews with every system you name, score them, and write a workbook for human review.

After processing_meta_review.py, fine_tune.py and steer.py --tune at their defaults, with no flag: 20 examples of
outputs/meta_review's test split, small_base, small_tuned, large and steered with outputs/steer/blend.json, whose
record names the models it was tuned with (--all_examples for the whole split):
    python evaluation.py

The same with every flag written out (a model flag given explicitly wins over the blend's record):
    python evaluation.py --dataset_path outputs/meta_review --split test --num_examples 20 \
        --small_base_model EleutherAI/pythia-70m --small_tuned_model outputs/pythia-70m-meta-review/final \
        --large_model EleutherAI/pythia-410m --blend outputs/steer/blend.json --output_dir outputs/evaluation

A raw JSONL/JSON/CSV file with Input/Output columns works too, and config files cascade:
    python evaluation.py eval.yaml --dataset_path ../shared/data/meta_review/mred_val_longest.jsonl --alpha 1.0

Sharded over processes (each generates its share; rank 0 merges and writes everything):
    torchrun --nproc_per_node 4 evaluation.py eval.yaml
    # or by hand: --shard_index K --num_shards N for each K, then the same command with --merge_only

Systems: small_base, small_tuned, large, large_tuned, steered (a system runs when its models are given;
--systems picks a subset). Every system gets the same prompts (the template of common.py, re-cut to fit
min(model context, --max_length) - max_new_tokens) and the same decoding settings unless
--decoding_overrides changes them for one system.

Writes to --output_dir: eval_examples.xlsx (workbook.py: a blind Review sheet with rating dropdowns, a
Pairwise sheet for --pairwise, Summary with a chart, Scores, Intervals, Run; judgments already typed into
an existing workbook are carried over, never dropped), ratings.jsonl (every judgment), metrics.json,
predictions.jsonl, prompt_template.txt and rouge_by_system.png.

Decision consistency (does the generated meta-review reach the paper's real decision?), with a classifier from
`fine_tune.py --task classification --label_column decision --classification_input meta_review` (classify.py):
    python evaluation.py --decision_classifier outputs/decision-classifier/final

ROUGE-Lsum needs one sentence per line; nltk's punkt data cannot be downloaded here, so sentences are
split with a regular expression (`split_sentences`) instead. Scores are F1 x 100, with percentile
bootstrap confidence intervals over examples (the same resamples for every system, so they are paired).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    DEFAULT_MODELS,
    DTYPES,
    PROMPT_TEMPLATE,
    REVIEW_JOINER,
    SEED_MAX,
    QuantizationArguments,
    quantization_flags_last,
    UsageError,
    build_prompt,
    check_output_dir,
    check_same_vocab,
    decoding_problems,
    default_device,
    encode_target,
    load_causal_lm,
    load_tokenizer,
    number_problems,
    raise_problems,
    read_config_file,
    run_cli,
    setup_logging,
    vocab_size_of,
    write_json,
)
from workbook import BookOptions, export_judgments, read_judgments, write_workbook

logger = logging.getLogger("evaluation")

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
# `python evaluation.py` evaluates them; the models are common.DEFAULT_MODELS.
DEFAULT_BLEND = "outputs/steer/blend.json"
DEFAULT_DATASET = "outputs/meta_review"  # processing_meta_review.py's output_dir
DEFAULT_NUM_EXAMPLES = 20
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DECODING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size")

SUMMARY_METRICS = (*ROUGE_TYPES, "words", "repetition", "eos_share", "perplexity", "decision_consistency")
SHARD_FORMAT = "evaluation-shard-v1"


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
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
        metadata={"help": f"Run only these systems (of {', '.join(SYSTEMS)}). Default: every system whose models are given."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer. Default: the large model's, else the first model given."}
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype ('auto': float32 on CPU).", "choices": list(DTYPES)})
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
class DataArguments:
    dataset_path: str = field(
        default=DEFAULT_DATASET,
        metadata={"help": "A dataset dir from processing_meta_review.py (default: its output_dir), or a "
                  "JSONL/JSON/CSV file with Input/Output."},
    )
    split: str = field(default="test", metadata={"help": "Split of a processed dataset (a raw file is one split)."})
    num_examples: int | None = field(
        default=DEFAULT_NUM_EXAMPLES,
        metadata={"help": "Evaluate this many examples (seeded sample): the default takes minutes on a CPU with "
                  "pythia-410m; --all_examples for the whole split."})
    all_examples: bool = field(default=False, metadata={"help": "Evaluate every example of the split."})
    seed: int = field(default=42, metadata={"help": "Seed of the example sample, of sampling and of the bootstrap."})
    max_length: int = field(
        default=2048, metadata={"help": "Prompt + generated tokens; capped by the models' context (Pythia: 2048)."}
    )
    decision_column: str = field(
        default="decision", metadata={"help": "With --decision_classifier: the column with the paper's real decision "
                                      "(normalised as processing_meta_review.normalise_decision does)."})

    def __post_init__(self):
        # --max_length's lower bound depends on the tokenizer: checked once it is loaded (check_max_length).
        raise_problems(number_problems(self, {
            "num_examples": ("[1, inf)", "--all_examples for all examples"), "seed": f"[0, {SEED_MAX}]",
            "max_length": "[1, inf)"}))
        if self.all_examples:
            self.num_examples = None


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
                                "output, same sampling distribution; speculative.py); false = the plain loop."})

    def __post_init__(self):
        raise_problems(decoding_problems(dataclasses.asdict(self), "--")
                       + number_problems(self, {"batch_size": "[1, inf)"}))


@dataclass
class OutputArguments:
    output_dir: str = field(default="outputs/evaluation", metadata={"help": "Where metrics, predictions and plots go."})
    output_xlsx: str | None = field(default=None, metadata={"help": "The workbook. Default: OUTPUT_DIR/eval_examples.xlsx."})
    compute_perplexity: bool = field(
        default=True, metadata={"help": "Also score the references: perplexity of each system (steered: of the blend)."}
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap resamples for confidence intervals."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence level of the intervals."})
    repetition_ngram: int = field(default=3, metadata={"help": "n of the repeated-n-gram share (words)."})
    review_chars: int = field(default=2000, metadata={"help": "Reviews are cut to this many characters in the workbook."})
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
        default=None, metadata={"help": "Seed of the blind labels' shuffle in the workbook (recorded in its Run sheet). "
                                "Default: --seed."},
    )
    shard_index: int | None = field(default=None, metadata={"help": "This process's shard (default: $RANK, else 0)."})
    num_shards: int | None = field(default=None, metadata={"help": "Number of shards (default: $WORLD_SIZE, else 1)."})
    merge_only: bool = field(default=False, metadata={"help": "Only merge OUTPUT_DIR/shards/*.json and write the outputs."})
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


ARGUMENT_TYPES = (ModelArguments, DataArguments, GenerationArguments, OutputArguments)


# ---------------------------------------------------------------------------------------------
# Which systems run, with which settings
# ---------------------------------------------------------------------------------------------
def resolve_models(model_args: ModelArguments) -> ModelArguments:
    """Fill the model flags left out from the blend's record of the models it was tuned with.

    With no model, blend, alpha or systems flag at all, this is the pipeline's last step: the blend at
    DEFAULT_BLEND (if steer.py --tune wrote one) and its models, else DEFAULT_MODELS. A model flag given
    explicitly wins over the blend's record; a difference is warned about (steer.fill_models).
    """
    from steer import fill_models

    given = model_args.model_paths()
    bare = not given and model_args.blend is None and model_args.alpha is None and model_args.systems is None
    if bare:
        blend = DEFAULT_BLEND if Path(DEFAULT_BLEND).is_file() else None
        if blend is None:
            logger.info("no --blend and no %s: evaluating the pipeline's default models without 'steered' "
                        "(run steer.py --tune first, or pass --blend/--alpha)", DEFAULT_BLEND)
        model_args = dataclasses.replace(model_args, blend=blend)
    blend_file = model_args.blend if model_args.blend is not None and Path(model_args.blend).is_file() else None
    filled = fill_models({role: getattr(model_args, f"{role}_model") for role in SYSTEMS if role != "steered"},
                         blend_file, DEFAULT_MODELS if bare else {})
    return dataclasses.replace(model_args, **{f"{role}_model": model for role, model in filled.items()})


def resolve_systems(model_args: ModelArguments) -> list[str]:
    """The systems to run, in the canonical order; every problem is reported at once."""
    given = model_args.model_paths()
    steering = model_args.blend is not None or model_args.alpha is not None
    problems = []
    if model_args.blend is not None and model_args.alpha is not None:
        problems.append("give --blend or --alpha, not both")
    if model_args.systems is not None:
        unknown = [s for s in model_args.systems if s not in SYSTEMS]
        if unknown:
            problems.append(f"unknown system(s) {unknown} in --systems; choose from {list(SYSTEMS)}")
        wanted = [s for s in SYSTEMS if s in model_args.systems]
    else:
        wanted = [s for s in SYSTEMS if all(r in given for r in SYSTEM_ROLES[s]) and (s != "steered" or steering)]
    if steering and "steered" not in wanted and model_args.systems is None:
        missing = ", ".join(f"--{r}_model" for r in SYSTEM_ROLES["steered"] if r not in given)
        problems.append(f"--blend/--alpha need the steered system's models; {missing} missing")
    for system in wanted:
        missing = [r for r in SYSTEM_ROLES[system] if r not in given]
        if missing:
            problems.append(f"system '{system}' needs --{missing[0]}_model")
        if system == "steered" and not steering:
            problems.append("system 'steered' needs --blend BLEND.json (from steer.py) or --alpha")
    if model_args.blend is not None and not Path(model_args.blend).is_file():
        problems.append(f"--blend {model_args.blend} is not a file; pass the blend JSON written by steer.py")
    if not wanted and not problems:
        problems.append("no system to evaluate: give at least one of --small_base_model, --small_tuned_model, "
                        "--large_model, --large_tuned_model")
    if problems:
        raise UsageError("; ".join(problems))
    if "steered" not in wanted and all(r in given for r in SYSTEM_ROLES["steered"]) and not steering:
        logger.info("large, small_base and small_tuned are given: add --blend or --alpha to evaluate 'steered' too")
    return wanted


def resolve_decoding(gen_args: GenerationArguments, systems: list[str]) -> dict[str, dict[str, Any]]:
    """{system: decoding settings}: the shared flags, changed per system by --decoding_overrides."""
    base = {k: getattr(gen_args, k) for k in DECODING_FIELDS}
    overrides = parse_overrides(gen_args.decoding_overrides)
    problems = [f"--decoding_overrides names system '{s}', which is not evaluated ({', '.join(systems)})"
                for s in overrides if s not in systems]
    out = {}
    for system in systems:
        settings = dict(base)
        for key, value in overrides.get(system, {}).items():
            if key not in DECODING_FIELDS:
                problems.append(f"--decoding_overrides: unknown setting '{key}' for {system}; use {list(DECODING_FIELDS)}")
                continue
            if not is_setting_type(value, base[key]):
                problems.append(f"--decoding_overrides: {system}.{key} = {value!r} is not a {type(base[key]).__name__}")
                continue
            settings[key] = type(base[key])(value)
        problems += decoding_problems(settings, f"--decoding_overrides {system}.") if system in overrides else []
        out[system] = settings
    if problems:
        raise UsageError("; ".join(problems))
    return out


def is_setting_type(value: Any, like: Any) -> bool:
    """An override has its flag's type: a bool for do_sample, an int for the token counts, a number otherwise
    (`is_setting_type(1, 1.0)` -> True; `is_setting_type(2.5, 128)` and `is_setting_type(1, False)` -> False)."""
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(like, bool) and isinstance(value, bool)
    if isinstance(like, int):
        return isinstance(value, int)
    return isinstance(value, (int, float))


def parse_overrides(text: str | None) -> dict[str, dict[str, Any]]:
    """JSON text or a .json/.yaml file -> {system: {setting: value}}."""
    if not text:
        return {}
    if text.strip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--decoding_overrides is not valid JSON: {err}") from None
    else:
        data = read_config_file(text)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError("--decoding_overrides must map system names to settings, "
                         "e.g. '{\"steered\": {\"temperature\": 0.7}}'")
    return data


def describe_system(system: str, paths: dict[str, str], blend) -> str:
    """What a system runs, for the workbook and metrics.json: its model, or for 'steered' the models the blend
    really uses (steer.describe_blend says when a tuned blend leaves out L or the S term)."""
    if system != "steered":
        return paths[system]
    models = " + ".join(f"{r}={paths[r]}" for r in SYSTEM_ROLES[system])
    if blend is None:
        return models
    from steer import describe_blend

    return f"{describe_blend(blend)} ({models})"


def load_blend(model_args: ModelArguments):
    """The steer.Blend to evaluate, from --blend or --alpha."""
    import steer

    if model_args.alpha is not None:
        return steer.Blend.from_alpha(model_args.alpha)
    return steer.Blend.load(model_args.blend)  # names the file and the bad key in a UsageError


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_examples(data_args: DataArguments) -> list[dict[str, Any]]:
    """Rows of the chosen split as {example_id, index, reviews, Input, Output}.

    A processed dataset keeps its example_id and reviews columns; a raw file (or a dataset without them)
    is cleaned like processing_meta_review.py does and gets the same content hash as example_id, so the
    workbook matches rows across runs either way.
    """
    from processing_meta_review import ProcessingArguments, clean_text, example_id, load_raw_dataset, load_saved_split
    from steer import reviews_of

    path = Path(data_args.dataset_path).expanduser()
    if not path.exists():
        hint = " (processing_meta_review.py's default output_dir: run it first)" \
            if data_args.dataset_path == DEFAULT_DATASET else ""
        raise UsageError(f"--dataset_path {path} does not exist{hint}; pass a dataset dir from "
                         "processing_meta_review.py or a JSONL/JSON/CSV/Parquet file (compressed or not)")
    saved = path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json"))
    if saved:  # processing_meta_review.py's output (save_to_disk)
        table = load_saved_split(path, data_args.split, "--dataset_path")
    else:  # a data file, or a directory of data files named by split
        raw = load_raw_dataset(ProcessingArguments(dataset_name=str(path)), flag="--dataset_path")
        if len(raw) == 1:
            (table,) = raw.values()
            logger.info("%s is one table; --split %s only labels it", path, data_args.split)
        elif data_args.split in raw:
            table = raw[data_args.split]
        else:
            raise UsageError(f"--split {data_args.split} is not in {path} (splits: {', '.join(raw)}); pass one of them")
    missing = [c for c in ("Input", "Output") if c not in table.column_names]
    if missing:
        raise UsageError(f"{path} has no column '{missing[0]}' (columns: {', '.join(table.column_names)}); "
                         "evaluation needs Input (reviews) and Output (meta-review)")
    from processing_meta_review import normalise_decision

    rows, skipped = [], 0
    for index, row in enumerate(table.to_list()):
        reviews = reviews_of(row.get("reviews") or row["Input"])
        meta = clean_text(row["Output"], "whitespace") if isinstance(row["Output"], str) else ""
        if not reviews or not meta:
            skipped += 1
            continue
        eid = row.get("example_id") or example_id(reviews, meta)
        rows.append({"example_id": str(eid), "index": index, "reviews": reviews,
                     "Input": REVIEW_JOINER.join(reviews), "Output": meta,
                     "decision": normalise_decision(row.get(data_args.decision_column))})
    if skipped:
        logger.warning("skipped %d rows with empty Input or Output", skipped)
    if not rows:
        raise UsageError(f"{path} (split {data_args.split}) has no rows with both Input and Output")
    make_ids_unique(rows)
    return rows


def make_ids_unique(rows: list[dict]) -> None:
    """Duplicate rows share a content hash; '#2', '#3' ... keep workbook keys unique and stable."""
    seen: dict[str, int] = {}
    for row in rows:
        n = seen.get(row["example_id"], 0) + 1
        seen[row["example_id"]] = n
        if n > 1:
            row["example_id"] = f"{row['example_id']}#{n}"


def select_examples(n_rows: int, num_examples: int | None, seed: int) -> list[int]:
    """A seeded sample of row positions, kept in dataset order: `select_examples(5, 2, 0)` -> [3, 4];
    all rows when `num_examples` is None or not smaller than `n_rows`."""
    if num_examples is None or num_examples >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), num_examples))


def build_inputs(examples: list[dict], tokenizer, prompt_budget: int, context: int) -> None:
    """Add the generation prompt (cut to `prompt_budget` by common.build_prompt) and the inputs for scoring.

    The reference is " " + meta-review + EOS, exactly the training target, scored whole: its prompt gets its own
    budget (reviews cut so that prompt + reference fit the context, processing_meta_review.tokenize_example's rule,
    as in training), not the generation prompt's, which leaves only max_new_tokens for the reference. Only a
    reference that alone (nearly) fills the context is cut, after the generation prompt; `reference_cut` says so.
    """
    from processing_meta_review import tokenize_example

    for ex in examples:
        prompt, truncated = build_prompt(ex["reviews"], tokenizer, prompt_budget)
        ex["prompt_ids"] = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ex["prompt_truncated"] = truncated
        scored = tokenize_example({"reviews": ex["reviews"], "Output": ex["Output"]}, tokenizer, context)
        if scored is not None:
            n_prompt = scored["prompt_length"]
            ex["score_prompt_ids"], ex["target_ids"] = scored["input_ids"][:n_prompt], scored["input_ids"][n_prompt:]
            ex["reference_cut"] = False
        else:
            target = encode_target(ex["Output"], tokenizer)
            ex["score_prompt_ids"], ex["target_ids"] = ex["prompt_ids"], target[: context - len(ex["prompt_ids"])]
            ex["reference_cut"] = True


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def load_models(model_args: ModelArguments, systems: list[str], device: str) -> tuple[Any, dict[str, Any]]:
    """(tokenizer, {role: model}) with each distinct model path loaded once."""
    from steer import check_model_path

    paths = {role: path for role, path in model_args.model_paths().items()
             if any(role in SYSTEM_ROLES[s] for s in systems)}
    for role, path in paths.items():
        check_model_path(path, f"{role}_model")
    tok_role = "tokenizer_name" if model_args.tokenizer_name else "large" if "large" in paths else next(iter(paths))
    tok_name = model_args.tokenizer_name or paths[tok_role]
    tok_flag = f"--{tok_role}" if tok_role == "tokenizer_name" else f"--{tok_role}_model"
    tokenizer = load_tokenizer(tok_name, trust_remote_code=model_args.trust_remote_code, padding_side="left",
                               flag=tok_flag)
    # Long reviews are measured whole before build_prompt cuts them; silence "longer than the model".
    tokenizer.model_max_length = int(1e30)
    tokenizers = {f"the tokenizer of {tok_flag} ({tok_name})": tokenizer}
    for role, path in paths.items():
        if path != tok_name and not any(label.endswith(f"({path})") for label in tokenizers):
            try:
                tokenizers[f"{role} ({path})"] = load_tokenizer(path, trust_remote_code=model_args.trust_remote_code,
                                                                flag=f"--{role}_model")
            except UsageError:
                logger.warning("no tokenizer beside %s (%s); its vocabulary is not checked", role, path)
    check_same_vocab(tokenizers)
    by_path: dict[tuple[str, int | None], Any] = {}
    models = {}
    for role, path in paths.items():
        key = (path, model_args.quantization_of(role))
        if key not in by_path:
            logger.info("loading %s from %s%s", role, path, f" ({key[1]}-bit)" if key[1] else "")
            by_path[key] = load_causal_lm(path, dtype=model_args.dtype, device=device,
                                          trust_remote_code=model_args.trust_remote_code, flag=f"--{role}_model",
                                          quantize=key[1], quantize_prefix=f"--{role}_")
        models[role] = by_path[key]
        rows = models[role].get_output_embeddings().weight.shape[0]
        if rows < vocab_size_of(tokenizer):
            raise UsageError(f"{role} model {path} has {rows} output rows but the tokenizer has "
                             f"{vocab_size_of(tokenizer)} tokens; pass --tokenizer_name of that model family")
    return tokenizer, models


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def cut_at_eos(tokens: list[int], eos_id: int) -> tuple[list[int], bool]:
    """`cut_at_eos([5, 6, 0, 1, 1], 0)` -> ([5, 6], True): tokens before the first EOS, and whether there was one."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id)], True
    return tokens, False


def generate_batch(system: str, models: dict[str, Any], blend, input_ids, attention_mask, settings: dict,
                   tokenizer, generator, speculative: bool = True) -> Any:
    """New tokens (B, <= max_new_tokens) for one left-padded batch."""
    import torch

    vocab = vocab_size_of(tokenizer)
    if system == "steered":
        from speculative import decode_steered

        new_tokens, _ = decode_steered(
            models["large"], models["small_base"], models["small_tuned"], input_ids, attention_mask, blend,
            speculative=speculative,
            max_new_tokens=settings["max_new_tokens"], eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=vocab, do_sample=settings["do_sample"],
            temperature=settings["temperature"], top_p=settings["top_p"],
            repetition_penalty=settings["repetition_penalty"],
            no_repeat_ngram_size=settings["no_repeat_ngram_size"], generator=generator,
        )
        return new_tokens
    from transformers import GenerationConfig

    from steer import prefill_rows, prefill_separately

    model = models[system]
    rows = model.get_output_embeddings().weight.shape[0]
    sampling = dict(temperature=settings["temperature"], top_p=settings["top_p"]) if settings["do_sample"] else {}
    # On CPU the prompts' pass runs one row at a time into one batched cache; generate() then runs the last
    # column and the decoding steps batched (steer.prefill_rows says why; bench/bench_evaluation.py).
    cache = None
    if prefill_separately(model, input_ids):
        cache = prefill_rows(model, input_ids, attention_mask, input_ids.shape[1] + settings["max_new_tokens"])
    config = GenerationConfig(
        do_sample=settings["do_sample"], max_new_tokens=settings["max_new_tokens"],
        repetition_penalty=settings["repetition_penalty"], no_repeat_ngram_size=settings["no_repeat_ngram_size"],
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        # Pythia's output matrix is wider than its tokenizer; the padding rows are not tokens.
        suppress_tokens=list(range(vocab, rows)) or None, **sampling,
        # A KV cache allocated once for prompt + new tokens: the default cache concatenates every layer's keys and
        # values at each step, which at batch 8 with ~1,000-token prompts was up to 3x the step's time on CPU
        # (bench/bench_evaluation.py). Same outputs. No auto torch.compile (it would recompile per prompt width).
        cache_implementation=None if cache is not None else "static", disable_compile=True,
    )
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             generation_config=config)
    return out[:, input_ids.shape[1]:]  # (B, <= max_new_tokens)


def generate(system: str, examples: list[dict], models: dict[str, Any], blend, settings: dict, tokenizer,
             batch_size: int, seed: int, progress=None, speculative: bool = True) -> list[dict]:
    """Generate for every example; returns one record per example, in the order given. `progress` (a tqdm bar)
    advances by one per example."""
    import torch

    from steer import left_pad

    torch.manual_seed(seed)
    device = models[SYSTEM_ROLES[system][0]].device
    generator = torch.Generator(device=device).manual_seed(seed)
    # Longest prompts first: similar lengths share a batch (less padding) and memory trouble shows at once.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["prompt_ids"]))
    records: list[dict | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([examples[i]["prompt_ids"] for i in batch], tokenizer.pad_token_id)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)  # (B, T) each
        new_tokens = generate_batch(system, models, blend, input_ids, attention_mask, settings, tokenizer, generator,
                                    speculative)
        for i, row in zip(batch, new_tokens.tolist()):
            tokens, ended = cut_at_eos(row, tokenizer.eos_token_id)
            records[i] = {
                "example_id": examples[i]["example_id"], "system": system,
                "prediction": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                "new_tokens": len(tokens), "ended_with_eos": ended,
                "prompt_tokens": len(examples[i]["prompt_ids"]), "prompt_truncated": examples[i]["prompt_truncated"],
            }
        if progress is not None:
            progress.update(len(batch))
    return records


def score_references(systems: list[str], examples: list[dict], models: dict[str, Any], blend, tokenizer,
                     batch_size: int) -> dict[str, list[tuple[float, int]]]:
    """{system: [(summed NLL, tokens) per example]} of the reference meta-reviews given the prompts, from
    steer.score_targets: one forward pass per model; the steered system is scored as the blend of them."""
    from steer import score_targets

    roles = sorted({r for s in systems for r in SYSTEM_ROLES[s]})
    scores = score_targets({r: models[r] for r in roles}, [ex["score_prompt_ids"] for ex in examples],
                           [ex["target_ids"] for ex in examples], vocab_size=vocab_size_of(tokenizer),
                           batch_size=batch_size, blend=blend if "steered" in systems else None,
                           pad_token_id=tokenizer.pad_token_id)
    n_tokens = scores["n_tokens"].tolist()
    return {s: list(zip(scores["blend" if s == "steered" else s].tolist(), n_tokens)) for s in systems}


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
SENTENCE_END = re.compile(r"(?<=[.!?][\"')\]])\s+|(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """A stand-in for nltk's punkt (its data cannot be downloaded here): split after . ! ? and at line breaks.
    `split_sentences("Good paper. Weak baselines!\\nAccept")` -> ['Good paper.', 'Weak baselines!', 'Accept']."""
    return [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]


def make_rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def score_rouge(scorer, prediction: str, reference: str) -> dict[str, float]:
    """ROUGE F1 x 100; rougeLsum sees one sentence per line, as rouge-score expects."""
    scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
    return {k: 100 * scores[k].fmeasure for k in ROUGE_TYPES}


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: `repetition_rate("a b a b a b", 2)` -> 0.6."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def score_records(records: list[dict], references: dict[str, str], repetition_ngram: int) -> None:
    """Add rouge*, words and repetition to every record (in place)."""
    scorer = make_rouge_scorer()
    for rec in records:
        rec.update(score_rouge(scorer, rec["prediction"], references[rec["example_id"]]))
        rec["words"] = len(rec["prediction"].split())
        rec["repetition"] = repetition_rate(rec["prediction"], repetition_ngram)


def summarize(records: list[dict], systems: list[str], n_examples: int, samples: int, confidence: float,
              seed: int) -> dict[str, dict[str, Any]]:
    """{system: {metric: {mean, ci_low, ci_high}}} with a percentile bootstrap over examples.

    The same resampled example sets serve every system and metric, so intervals are paired. Perplexity
    is corpus-level: exp(total NLL / total tokens), resampled the same way.
    """
    import numpy as np

    idx = resample_indices(n_examples, samples, seed)
    interval = lambda stat: bootstrap_interval(stat, idx, confidence)  # noqa: E731
    out = {}
    for system in systems:
        recs = [r for r in records if r["system"] == system]
        summary: dict[str, Any] = {"n": len(recs)}
        for metric in (*ROUGE_TYPES, "words", "repetition", "ended_with_eos"):
            values = np.array([float(r[metric]) for r in recs])
            summary["eos_share" if metric == "ended_with_eos" else metric] = interval(lambda ix: values[ix].mean(-1))
        if all(r.get("nll") is not None for r in recs):
            nll = np.array([r["nll"] for r in recs])
            tokens = np.array([r["target_tokens"] for r in recs], dtype=float)
            summary["perplexity"] = interval(lambda ix: np.exp(nll[ix].sum(-1) / tokens[ix].sum(-1)))
            summary["reference_tokens"] = int(tokens.sum())  # every reference token is scored (build_inputs)
        out[system] = summary
    return out


def resample_indices(n_examples: int, samples: int, seed: int):
    """The bootstrap's resampled example sets, (samples, n_examples) positions; one seed gives every metric the same
    sets, so intervals of different metrics and systems are paired."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, n_examples, size=(samples, n_examples))  # (S, N)


def bootstrap_interval(stat, idx, confidence: float) -> dict[str, float]:
    """{mean, ci_low, ci_high}: `stat` (positions (S, N) -> (S,) values) on all examples, and its percentile interval
    over the resamples `idx`. Resamples where the stat is NaN (e.g. no labelled paper drawn) are left out."""
    import numpy as np

    n = idx.shape[1]
    point = float(stat(np.arange(n)[None])[0])
    boot = stat(idx)
    lo, hi = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    return {"mean": point, "ci_low": float(np.nanpercentile(boot, lo)), "ci_high": float(np.nanpercentile(boot, hi))}


# ---------------------------------------------------------------------------------------------
# Decision consistency: does a meta-review reach the paper's real decision? (--decision_classifier)
# ---------------------------------------------------------------------------------------------
def check_decisions(examples: list[dict], info: dict, classifier: str, source: str) -> None:
    """Before generating: the classifier predicts decisions, the papers have some, and none the classifier was not
    trained on (it could never match them)."""
    if info.get("task") != "classification" or info.get("classification_input") != "meta_review":
        raise UsageError(f"--decision_classifier {classifier} is a {info.get('task')} model of the "
                         f"{info.get('classification_input')}; decision consistency needs a classifier of meta-reviews "
                         "(fine_tune.py --task classification --classification_input meta_review)")
    decisions = [ex["decision"] for ex in examples if ex["decision"] is not None]
    if not decisions:
        raise UsageError(f"--decision_classifier needs the papers' decisions, but {source} has none; re-run "
                         "processing_meta_review.py (it keeps decision), pass a file with that column, or set "
                         "--decision_column")
    unseen = sorted(set(decisions) - set(info["labels"]))
    if unseen:
        raise UsageError(f"papers have decisions {unseen} that --decision_classifier {classifier} was not trained on "
                         f"(its labels: {', '.join(info['labels'])}); train it on data with these labels, or evaluate "
                         "papers it knows")


def decision_consistency(predicted: dict[str, list[str]], references: list[str], decisions: list[str | None],
                         info: dict, idx, confidence: float) -> dict[str, Any]:
    """Per system, the share of papers whose generated meta-review the classifier reads as the paper's real decision,
    with bootstrap intervals over the papers (resamples `idx`, shared with the other metrics); beside it the ceiling
    (the classifier's accuracy on the reference meta-reviews) and the floor (the rate of always answering the
    classifier's majority training class). Papers without a decision (None) count in no share.

    `predicted` = {system: [decision per paper]}, `references` = the classifier's decision for each reference,
    `decisions` = the papers' real ones, all in paper order.
    """
    import numpy as np

    known = np.array([d is not None for d in decisions])

    def share_of(labels: list[str]):
        hits = np.array([float(p == d) for p, d in zip(labels, decisions)])
        hits[~known] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample of unlabelled papers only: NaN, left out
            return bootstrap_interval(lambda ix: np.nanmean(hits[ix], -1), idx, confidence)

    counts = info["train_label_counts"]
    majority = max(counts, key=counts.get)
    return {"systems": {s: share_of(labels) for s, labels in predicted.items()},
            "ceiling": share_of(references),
            "floor": {**share_of([majority] * len(decisions)), "class": majority},
            "n_labelled": int(known.sum()), "n_unlabelled": int((~known).sum())}


def score_decisions(records: list[dict], examples: list[dict], systems: list[str], out_args: OutputArguments,
                    summary: dict, seed: int, device: str | None = None) -> dict[str, Any]:
    """Classify every generated and reference meta-review with --decision_classifier; add `predicted_decision` to the
    records and `decision_consistency` to each system's summary. Returns metrics.json's `decision_consistency`."""
    from classify import load_classifier, predict

    model, tokenizer, info = load_classifier(out_args.decision_classifier, device=device)
    order = sorted(examples, key=lambda e: e["position"])
    check_decisions(order, info, out_args.decision_classifier, "the evaluated examples")
    decisions = [e["decision"] for e in order]
    references = predict(model, tokenizer, info, [e["reference"] for e in order])
    by_key = {(r["example_id"], r["system"]): r for r in records}
    predicted = {}
    for system in systems:
        recs = [by_key[(e["example_id"], system)] for e in order]
        predicted[system] = predict(model, tokenizer, info, [r["prediction"] for r in recs])
        for rec, label in zip(recs, predicted[system]):
            rec["predicted_decision"] = label
    idx = resample_indices(len(order), out_args.bootstrap_samples, seed)
    result = decision_consistency(predicted, references, decisions, info, idx, out_args.confidence)
    for system in systems:
        summary[system]["decision_consistency"] = result["systems"][system]
    return {"classifier": out_args.decision_classifier, "label_column": info["label_column"],
            "labels": info["labels"], **result}


# ---------------------------------------------------------------------------------------------
# Sharding: each process generates a share of the examples; rank 0 merges the shard files.
# ---------------------------------------------------------------------------------------------
def resolve_sharding(out_args: OutputArguments) -> tuple[int, int, bool]:
    """(shard_index, num_shards, launched_by_torchrun): flags win, else RANK/WORLD_SIZE, else one process."""
    if out_args.num_shards is not None or out_args.shard_index is not None:
        return out_args.shard_index or 0, out_args.num_shards or 1, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return int(os.environ.get("RANK", "0")), world, True
    return 0, 1, False


def shard_path(output_dir: Path, index: int, num_shards: int) -> Path:
    return output_dir / "shards" / f"shard-{index:05d}-of-{num_shards:05d}.json"


def write_shard(path: Path, shard: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, shard)


def merge_shards(output_dir: Path, num_shards: int | None) -> dict:
    """Read every shard file of one run; refuse missing shards and shards of different runs."""
    files = sorted((output_dir / "shards").glob("shard-*-of-*.json"))
    counts = {int(f.stem.split("-of-")[1]) for f in files}
    if num_shards is None or num_shards == 1:
        if len(counts) != 1:
            raise UsageError(f"{output_dir}/shards holds shards of {sorted(counts) or 'no'} run sizes; "
                             "pass --num_shards N (or re-run the shards)")
        (num_shards,) = counts
    shards = []
    for k in range(num_shards):
        path = shard_path(output_dir, k, num_shards)
        if not path.is_file():
            raise UsageError(f"shard {k} of {num_shards} is missing ({path}); run it with --shard_index {k} "
                             f"--num_shards {num_shards}")
        shards.append(json.loads(path.read_text(encoding="utf-8")))
    if {s["run_key"] for s in shards} != {shards[0]["run_key"]}:
        raise UsageError(f"the shards in {output_dir}/shards come from different runs (models, data or "
                         "settings differ); re-run all shards with the same flags")
    merged = {**shards[0], "examples": [], "records": []}
    for s in shards:
        merged["examples"] += s["examples"]
        merged["records"] += s["records"]
    merged["examples"].sort(key=lambda e: e["position"])
    return merged


def wait_for_ranks(timeout: float) -> bool:
    """Barrier across torchrun/accelerate processes (gloo, so it works on CPU too). Returns True if this
    call set up the process group (and should tear it down)."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise UsageError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or accelerate "
                             "launch, or shard by hand with --shard_index/--num_shards and --merge_only")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
        created = True
    dist.barrier()
    return created


# ---------------------------------------------------------------------------------------------
# The other artifacts
# ---------------------------------------------------------------------------------------------
def write_jsonl_atomically(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def plot_systems(path: Path, summary: dict) -> None:
    """Grouped bars of ROUGE per system with the bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    systems = list(summary)
    x = np.arange(len(systems))
    width = 0.8 / len(ROUGE_TYPES)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(systems), 4))
    for k, metric in enumerate(ROUGE_TYPES):
        means = np.array([summary[s][metric]["mean"] for s in systems])
        err = np.array([[means[i] - summary[s][metric]["ci_low"], summary[s][metric]["ci_high"] - means[i]]
                        for i, s in enumerate(systems)]).T  # (2, n_systems)
        ax.bar(x + (k - (len(ROUGE_TYPES) - 1) / 2) * width, means, width, yerr=err, capsize=3, label=metric)
    ax.set_xticks(x, systems)
    ax.set_ylabel("F1 x 100")
    ax.set_title(f"ROUGE per system (n = {summary[systems[0]]['n']}, bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def resolve_pairwise(spec: str, systems: list[str]) -> tuple[str, str] | None:
    """The two systems of the Pairwise sheet: `resolve_pairwise("auto", ["large", "steered"])` -> ("steered", "large").

    A named system that was not evaluated gives no Pairwise sheet (with a warning) rather than failing after the
    generation: the rest of the outputs are still written."""
    if spec == "none":
        return None
    if spec == "auto":
        return ("steered", "large") if {"steered", "large"} <= set(systems) else None
    pair = tuple(s.strip() for s in spec.split(","))
    missing = [s for s in pair if s not in systems]
    if missing:
        logger.warning("--pairwise %s: %s not evaluated, so the workbook has no Pairwise sheet", spec, ", ".join(missing))
        return None
    return pair


def write_outputs(merged: dict, out_args: OutputArguments) -> dict:
    """Score the merged predictions and write the workbook (first: it is the file that can refuse), ratings.jsonl,
    metrics.json, predictions.jsonl, prompt_template.txt and the PNG. Returns metrics.json's content."""
    run_info = merged["run_info"]
    systems = list(run_info["systems"])
    examples = {e["example_id"]: e for e in merged["examples"]}
    position = {e["example_id"]: e["position"] for e in merged["examples"]}
    records = sorted(merged["records"], key=lambda r: (position[r["example_id"]], systems.index(r["system"])))
    score_records(records, {k: e["reference"] for k, e in examples.items()}, out_args.repetition_ngram)
    for rec in records:
        rec["perplexity"] = math.exp(rec["nll"] / rec["target_tokens"]) if rec.get("nll") is not None else None
    summary = summarize(records, systems, len(examples), out_args.bootstrap_samples, out_args.confidence,
                        run_info["seed"])
    decision = None
    if out_args.decision_classifier:
        decision = score_decisions(records, merged["examples"], systems, out_args, summary, run_info["seed"],
                                   run_info.get("device"))
        run_info = {**run_info, "decision_consistency": {k: decision[k] for k in ("classifier", "ceiling", "floor",
                                                                                    "n_labelled", "n_unlabelled")}}
    out_dir = Path(out_args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = BookOptions(review_chars=out_args.review_chars, pairwise=resolve_pairwise(out_args.pairwise, systems),
                          seed=run_info["seed"] if out_args.review_seed is None else out_args.review_seed,
                          bootstrap_samples=out_args.bootstrap_samples, confidence=out_args.confidence)
    book = write_workbook(out_args.workbook_path, records, merged["examples"], summary, run_info, options)
    export_judgments(book.judgments, out_dir / "ratings.jsonl")
    metrics = {"n_examples": len(examples), "systems": summary, "run": run_info,
               "human": {"review_seed": options.seed, "pairwise": options.pairwise, "systems": book.human,
                         "judgments": len(book.judgments.current), "kept": len(book.judgments.kept)},
               "notes": {"rouge": "F1 x 100, rouge-score with Porter stemming; rougeLsum on sentences split by a "
                         "regex (nltk punkt data is not available offline)",
                         "intervals": f"{out_args.confidence:.0%} percentile bootstrap over examples, "
                         f"{out_args.bootstrap_samples} resamples shared by all systems",
                         "repetition": f"share of repeated word {out_args.repetition_ngram}-grams",
                         "perplexity": "of the reference ' ' + meta-review + EOS given the prompt; corpus-level",
                         "human": "mean rating (1-5) and pairwise win rate (ties count half) from the workbook as "
                         "read at the start of this run, with bootstrap intervals over the judged examples"}}
    if decision is not None:
        metrics["decision_consistency"] = decision
        metrics["notes"]["decision_consistency"] = (
            "share of papers whose generated meta-review --decision_classifier reads as the paper's real decision; "
            "ceiling = its accuracy on the reference meta-reviews, floor = always its majority training class; papers "
            "without a decision are left out of all three (n_unlabelled), and the bootstrap resamples all papers")
    write_json(out_dir / "metrics.json", metrics)
    write_jsonl_atomically(out_dir / "predictions.jsonl",
                           [{**r, "reference": examples[r["example_id"]]["reference"]} for r in records])
    (out_dir / "prompt_template.txt").write_text(PROMPT_TEMPLATE + "\n", encoding="utf-8")
    plot_systems(out_dir / "rouge_by_system.png", summary)
    return metrics


def format_table(summary: dict) -> str:
    """The summary as aligned text for the log."""
    metrics = [m for m in SUMMARY_METRICS if any(m in s for s in summary.values())]
    lines = [f"{'system':<12} " + " ".join(f"{m:>10}" for m in metrics)]
    for system, s in summary.items():
        lines.append(f"{system:<12} " + " ".join(f"{s[m]['mean']:>10.3f}" if m in s else f"{'':>10}" for m in metrics))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def run_key(run_info: dict, example_ids: list[str]) -> str:
    """What must agree between shards of one run (not the date)."""
    keyed = {k: v for k, v in run_info.items() if k not in ("date", "device")}
    return hashlib.sha1(json.dumps([keyed, example_ids], sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_shard(model_args: ModelArguments, data_args: DataArguments, gen_args: GenerationArguments,
                   out_args: OutputArguments, shard_index: int, num_shards: int, device: str) -> dict:
    """Load data and models, generate (and score references) for this process's share of the examples."""
    systems = resolve_systems(model_args)
    decoding = resolve_decoding(gen_args, systems)
    blend = load_blend(model_args) if "steered" in systems else None
    rows = load_examples(data_args)
    positions = select_examples(len(rows), data_args.num_examples, data_args.seed)
    selected = [{**rows[i], "position": p} for p, i in enumerate(positions)]
    if out_args.decision_classifier:  # before an hour of generation
        from classify import read_classifier_info

        check_decisions(selected, read_classifier_info(out_args.decision_classifier), out_args.decision_classifier,
                        f"{data_args.dataset_path} (split {data_args.split}, column '{data_args.decision_column}')")
    tokenizer, models = load_models(model_args, systems, device)
    from processing_meta_review import check_max_length

    check_max_length(tokenizer, data_args.max_length)
    max_new = max(s["max_new_tokens"] for s in decoding.values())
    from steer import is_steering, model_context

    context = min(model_context(models), data_args.max_length)
    prompt_budget = context - max_new
    if prompt_budget < 16:
        raise UsageError(f"only {prompt_budget} prompt tokens are left (context {context} - max_new_tokens "
                         f"{max_new}); raise --max_length or lower --max_new_tokens")
    mine = [ex for ex in selected if ex["position"] % num_shards == shard_index]
    build_inputs(mine, tokenizer, prompt_budget, context)
    paths = model_args.model_paths()
    run_info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset_path": data_args.dataset_path, "split": data_args.split, "n_examples": len(selected),
        "rows_in_split": len(rows), "seed": data_args.seed,
        "systems": {s: {"model": describe_system(s, paths, blend), "decoding": decoding[s]} for s in systems},
        "blend": blend.to_dict() if blend is not None else None,
        "tokenizer": model_args.tokenizer_name or paths.get("large") or next(iter(paths.values())),
        "context": context, "max_length": data_args.max_length, "prompt_token_budget": prompt_budget,
        "prompt_template": PROMPT_TEMPLATE, "dtype": model_args.dtype, "device": device,
        "quantization": {role: f"{bits}-bit" for role in paths if (bits := model_args.quantization_of(role))},
        "compute_perplexity": out_args.compute_perplexity, "bootstrap_samples": out_args.bootstrap_samples,
        "confidence": out_args.confidence, "shards": num_shards, "versions": library_versions(),
    }
    logger.info("evaluating %s on %d of %d examples of %s[%s] (this shard: %d); prompt budget %d tokens, "
                "decoding %s", ", ".join(systems), len(selected), len(rows), data_args.dataset_path,
                data_args.split, len(mine), prompt_budget, json.dumps(decoding))
    n_new = sum(decoding[s]["max_new_tokens"] for s in systems) * len(mine)
    logger.info("work: up to %d new tokens (%d examples x %d systems x up to %d tokens%s); the progress bar's ETA "
                "is the estimate%s", n_new, len(mine), len(systems), max_new,
                "; 'steered' runs three models per token" if "steered" in systems else "",
                "" if data_args.num_examples is None else "; --all_examples evaluates the whole split")
    if "steered" in systems and not is_steering(blend):
        logger.warning("the blend (%s) does not steer the large model with the small pair: 'steered' is %s",
                       blend.describe(), describe_system("steered", paths, blend))
    n_cut = sum(ex["reference_cut"] for ex in mine)
    if n_cut and out_args.compute_perplexity:
        logger.warning("%d references alone fill the %d-token context; they are scored on their first tokens",
                       n_cut, context)
    records = []
    from tqdm.auto import tqdm

    with tqdm(total=len(mine) * len(systems), desc="generate", unit="example") as progress:
        for system in systems:
            progress.set_postfix_str(system)
            records += generate(system, mine, models, blend, decoding[system], tokenizer, gen_args.batch_size,
                                data_args.seed, progress, gen_args.speculative)
    if out_args.compute_perplexity and mine:
        nll = score_references(systems, mine, models, blend, tokenizer, gen_args.batch_size)
        by_id = {ex["example_id"]: k for k, ex in enumerate(mine)}
        for rec in records:
            rec["nll"], rec["target_tokens"] = nll[rec["system"]][by_id[rec["example_id"]]]
    return {
        "format": SHARD_FORMAT, "run_key": run_key(run_info, [ex["example_id"] for ex in selected]),
        "shard_index": shard_index, "num_shards": num_shards, "run_info": run_info,
        "examples": [{"example_id": ex["example_id"], "position": ex["position"], "index": ex["index"],
                      "input": ex["Input"], "reference": ex["Output"], "prompt_truncated": ex["prompt_truncated"],
                      "decision": ex["decision"]}
                     for ex in mine],
        "records": records,
    }


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "rouge-score", "openpyxl")}


def main(model_args: ModelArguments, data_args: DataArguments, gen_args: GenerationArguments,
         out_args: OutputArguments) -> dict | None:
    """Evaluate; returns metrics.json's content (None on ranks other than 0 and on hand-run shards)."""
    setup_logging()
    shard_index, num_shards, launched = resolve_sharding(out_args)
    out_dir = Path(out_args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output_dir {out_dir} is a file; choose a directory")
    check_output_dir(out_dir)  # fail now, not after an hour of generation
    writes_outputs = out_args.merge_only or shard_index == 0 and (num_shards == 1 or launched)
    if writes_outputs:
        check_output_dir(out_args.workbook_path.parent, f"--output_xlsx {out_args.workbook_path}: directory")
        read_judgments(out_args.workbook_path)  # fail now, not after an hour of generation
    if out_args.merge_only:
        merged = merge_shards(out_dir, out_args.num_shards)
    else:
        started = time.perf_counter()
        device = model_args.device or default_device()
        if launched and device.startswith("cuda") and ":" not in device:
            device = f"cuda:{os.environ.get('LOCAL_RANK', shard_index)}"
        model_args = resolve_models(model_args)
        shard = evaluate_shard(model_args, data_args, gen_args, out_args, shard_index, num_shards, device)
        logger.info("loaded, generated and scored in %.1f s", time.perf_counter() - started)
        if num_shards == 1:
            merged = shard
        else:
            write_shard(shard_path(out_dir, shard_index, num_shards), shard)
            if not launched:
                logger.info("wrote shard %d of %d; when all are done, run the same command with --merge_only",
                            shard_index, num_shards)
                return None
            created = wait_for_ranks(out_args.shard_timeout)
            try:
                if shard_index != 0:
                    return None
                merged = merge_shards(out_dir, num_shards)
            finally:
                if created:
                    import torch.distributed as dist

                    dist.destroy_process_group()
    metrics = write_outputs(merged, out_args)
    print(format_table(metrics["systems"]))
    logger.info("wrote %s and metrics/predictions/plot to %s", out_args.workbook_path, out_dir)
    return metrics


if __name__ == "__main__":
    run_cli(main, ARGUMENT_TYPES, __doc__)
