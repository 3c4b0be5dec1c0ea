"""Tune the small tuned model on what reviewers and rewards say: DPO from the workbook's ratings, GRPO from rewards.

DPO: preference pairs from the ratings typed into evaluation.py's workbook (same paper: the higher-rated output is
chosen, the lower rejected, ties skipped; pairwise choices as given), the small tuned model as policy and reference:
    python rl_tune.py --method dpo --workbook outputs/evaluation/eval_examples.xlsx \
        --model_name_or_path outputs/pythia-70m-meta-review/final --output_dir outputs/rl-dpo

GRPO: sampled meta-reviews scored by built-in rewards (ROUGE-L against the reference, ending with EOS, length in a
range, repeated n-grams), weighted by flag, plus a learned reward model if you have one:
    python rl_tune.py --method grpo --reward rouge:1,eos:0.5,repetition:1 \
        --model_name_or_path outputs/pythia-70m-meta-review/final --output_dir outputs/rl-grpo
    python rl_tune.py --method grpo --reward rouge:1 --reward_model outputs/reward-model/final ...

Then steer with it: `python evaluation.py --small_tuned_model outputs/rl-grpo/final ...` (or steer.py).

Every TrainingArguments flag works, and the method's TRL config flags (DPOConfig: --beta, --loss_type, ...;
GRPOConfig: --num_generations, --max_completion_length, --temperature, --beta, ...): `--method dpo --help` lists
DPO's. PPO (the tutorial's) is not in TRL 1.16 (neither trl nor trl.experimental ship a PPOTrainer); GRPO takes
its place: the same policy-gradient update with a clipped ratio and a KL term, with the value network replaced by
the mean reward of a group of completions of the same prompt, which suits a 1.8M-parameter CPU run.

Layout of --output_dir: as fine_tune.py's (checkpoint-*/ resumed from the newest complete one, rl_tune_config.json,
final/ written atomically with model or adapter, tokenizer, README.md, metrics.json (before/after: greedy
ROUGE-L, EOS rate, repetition and reference NLL on validation papers; DPO: held-out chosen-over-rejected margins),
trainer_state.json, training_curve.png, samples.jsonl, prompt_template.txt).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

import fine_tune
from common import (
    CONFIG_SUFFIXES,
    DEFAULT_MODELS,
    PROMPT_TEMPLATE,
    UsageError,
    build_prompt,
    cli,
    encode_target,
    first_line,
    is_missing_local_path,
    load_tokenizer,
    number_problems,
    parse_config,
    raise_problems,
    read_config_file,
    setup_logging,
    to_jsonable,
    vocab_size_of,
    write_error,
    write_json,
)

logger = logging.getLogger("rl_tune")

METHODS = ("dpo", "grpo")
RUN_CONFIG = "rl_tune_config.json"
BUILTIN_REWARDS = ("rouge", "eos", "length", "repetition")
DEFAULT_REWARD = "rouge:1,eos:0.5,repetition:1"
SPLITS = ("train", "validation", "test")  # where DPO looks up the workbook's papers


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def _from_fine_tune(name: str, **override):
    """One of fine_tune.ModelArguments' fields (its help and default), so the two scripts' model flags are one."""
    source = fine_tune.ModelArguments.__dataclass_fields__[name]
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
    config_name = None  # fine_tune.load_model's "fresh model" switch: RL starts from a trained model
    # fine_tune.py's QLoRA switches, off: RL here trains a full-precision policy (with or without LoRA).
    load_in_4bit = load_in_8bit = False
    bnb_4bit_compute_dtype, bnb_4bit_quant_type, bnb_4bit_use_double_quant = "auto", "nf4", True
    trust_remote_code = False  # set from the training config in parse_args

    def __post_init__(self):
        fine_tune.ModelArguments.__post_init__(self)


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
                  "(rouge = ROUGE-L F1 vs the reference in [0, 1]; eos = 1 if the completion ended with EOS; length = 1 "
                  "inside --length_range words, falling off outside; repetition = minus the share of repeated "
                  "--repetition_ngram-grams). '' = only --reward_model."})
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
        default=2048, metadata={"help": "Prompt + completion tokens: the reviews are cut (common.build_prompt) so the "
                                "prompt leaves --max_completion_length free."})
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
    raise_problems(fine_tune.training_number_problems(training_args))
    return args, model_args, training_args


# ---------------------------------------------------------------------------------------------
# Rewards (GRPO). TRL calls each as f(prompts=..., completions=..., completion_ids=..., <dataset columns>) with the
# completion text decoded without special tokens, so the EOS is seen in completion_ids: TRL keeps the ids up to and
# including the first EOS (GRPOTrainer._generate), so a completion that stopped ends with an EOS id.
# ---------------------------------------------------------------------------------------------
def parse_reward_spec(spec: str, reward_model: str | None) -> list[tuple[str, float]]:
    """`parse_reward_spec("rouge:1,eos:0.5", None)` -> [('rouge', 1.0), ('eos', 0.5)]; a name alone weighs 1."""
    rewards, problems = [], []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, weight_text = item.partition(":")
        name = name.strip()
        if name not in BUILTIN_REWARDS:
            close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(BUILTIN_REWARDS)}"
            problems.append(f"--reward: unknown reward '{name}'; {hint}")
            continue
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            problems.append(f"--reward: weight '{weight_text}' of '{name}' is not a number; write name:weight, e.g. "
                            f"{name}:0.5")
            continue
        if not math.isfinite(weight) or weight < 0:
            problems.append(f"--reward: weight {weight_text} of '{name}' must be a finite number >= 0")
            continue
        if name in dict(rewards):
            problems.append(f"--reward names '{name}' twice; give each reward once")
            continue
        rewards.append((name, weight))
    raise_problems(problems)
    if not rewards and not reward_model:
        raise UsageError(f"--reward '{spec}' names no reward and there is no --reward_model; pass e.g. --reward "
                         f"{DEFAULT_REWARD}")
    if rewards and not reward_model and not any(w > 0 for _, w in rewards):
        raise UsageError(f"--reward '{spec}' gives every reward weight 0; give at least one a positive weight")
    return rewards


def parse_length_range(text: str) -> tuple[int, int]:
    """`parse_length_range("20,200")` -> (20, 200)."""
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--length_range '{text}' is not two whole numbers of words 'low,high', e.g. 20,200") from None
    if not 0 <= low <= high:
        raise UsageError(f"--length_range {text}: need 0 <= low <= high")
    return low, high


def length_score(words: int, low: int, high: int) -> float:
    """1 inside [low, high], falling linearly to 0 at 0 words and at 2 * high: `length_score(10, 20, 200)` -> 0.5."""
    if words < low:
        return words / low
    if words > high:
        return max(0.0, 1 - (words - high) / max(high, 1))
    return 1.0


def make_reward_functions(rewards: list[tuple[str, float]], eos_ids: Sequence[int], length_range: tuple[int, int],
                          ngram: int) -> list:
    """The built-in rewards as TRL reward functions, named after the reward (TRL logs rewards/<name>/mean)."""
    from evaluation import make_rouge_scorer, repetition_rate, score_rouge

    scorer = make_rouge_scorer()
    eos = set(eos_ids)

    def rouge(completions, reference, **_):
        return [score_rouge(scorer, c, r)["rougeL"] / 100 for c, r in zip(completions, reference)]

    def eos_reward(completions, completion_ids, **_):
        return [float(bool(ids) and ids[-1] in eos) for ids in completion_ids]

    def length(completions, **_):
        return [length_score(len(c.split()), *length_range) for c in completions]

    def repetition(completions, **_):
        return [-repetition_rate(c, ngram) for c in completions]

    eos_reward.__name__ = "eos"
    functions = {"rouge": rouge, "eos": eos_reward, "length": length, "repetition": repetition}
    return [functions[name] for name, _ in rewards]


def load_reward_model(path: str):
    """(model, tokenizer) of a sequence-classification reward model with one output (a regression score)."""
    from transformers import AutoModelForSequenceClassification

    if is_missing_local_path(path):
        raise UsageError(f"--reward_model {path} does not exist; pass a directory with a sequence-classification "
                         "model (num_labels 1)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True)
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot load --reward_model {path}: {first_line(err)}; pass a directory written by "
                         "save_pretrained of an AutoModelForSequenceClassification (num_labels 1)") from None
    if model.config.num_labels != 1:
        raise UsageError(f"--reward_model {path} has {model.config.num_labels} labels; a reward is one score "
                         "(num_labels 1, a regression head)")
    tokenizer = load_tokenizer(path, flag="--reward_model", padding_side="right")
    model.config.pad_token_id = tokenizer.pad_token_id  # the last non-pad token's score is the reward
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
def load_papers(dataset_path: str, split: str) -> list[dict]:
    """Rows of one split as evaluation.load_examples gives them: {example_id, reviews, Output, ...}."""
    from evaluation import DataArguments, load_examples

    return load_examples(DataArguments(dataset_path=dataset_path, split=split))


def load_all_papers(dataset_path: str) -> dict[str, dict]:
    """{example_id: row} over every split the dataset has (a rated paper may come from any of them)."""
    papers: dict[str, dict] = {}
    for split in SPLITS:
        try:
            rows = load_papers(dataset_path, split)
        except UsageError as err:
            if "split" in str(err) or "not in" in str(err):
                continue
            raise
        for row in rows:
            papers.setdefault(row["example_id"], row)
    if not papers:
        raise UsageError(f"--dataset_path {dataset_path} has none of the splits {', '.join(SPLITS)}")
    return papers


def read_ratings(path: Path) -> list[dict]:
    """The judgments of a workbook (.xlsx, through workbook.read_judgments) or of its ratings.jsonl, as the
    records of ratings.jsonl (workbook.judgment_record)."""
    from workbook import judgment_record, read_judgments

    if not path.is_file():
        raise UsageError(f"--workbook {path} does not exist; pass evaluation.py's eval_examples.xlsx or ratings.jsonl")
    if path.suffix.lower() == ".xlsx":
        return [judgment_record(j) for j in read_judgments(path).all()]
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UsageError(f"--workbook {path} line {n} is not JSON ({err.msg}); pass ratings.jsonl as "
                                 "evaluation.py or workbook.py wrote it") from None
    return records


def read_eos_flags(directory: Path) -> dict[tuple[str, str], tuple[str, bool]]:
    """{(example_id, system): (prediction, ended_with_eos)} from predictions.jsonl beside the workbook, if any."""
    path = directory / "predictions.jsonl"
    if not path.is_file():
        return {}
    flags = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            flags[(str(rec["example_id"]), rec["system"])] = (rec.get("prediction", ""), bool(rec.get("ended_with_eos")))
    return flags


def pairs_from_ratings(records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Preference pairs from ratings.jsonl records: for each paper, every two rated outputs with different ratings
    (the higher chosen), and every pairwise choice with a winner. Returns (pairs, counts).

    A pair is {example_id, chosen_system, rejected_system, chosen, rejected}.
    >>> recs = [{"type": "rating", "example_id": "p", "system": "a", "rating": 4, "output": "x"},
    ...         {"type": "rating", "example_id": "p", "system": "b", "rating": 2, "output": "y"}]
    >>> pairs_from_ratings(recs)[0][0]["chosen"]
    'x'
    """
    by_paper: dict[str, list[dict]] = {}
    pairs, counts = [], {"ratings": 0, "choices": 0, "ties": 0}
    for rec in records:
        if rec.get("type") == "rating" and isinstance(rec.get("rating"), (int, float)) and rec.get("output"):
            counts["ratings"] += 1
            by_paper.setdefault(str(rec["example_id"]), []).append(rec)
        elif rec.get("type") == "pairwise" and rec.get("choice") not in (None, ""):
            counts["choices"] += 1
            if not rec.get("winner"):
                counts["ties"] += 1
                continue
            outputs = rec.get("outputs") or {}
            if outputs.get(rec["winner"]) and outputs.get(rec["loser"]):
                pairs.append({"example_id": str(rec["example_id"]), "chosen_system": rec["winner"],
                              "rejected_system": rec["loser"], "chosen": outputs[rec["winner"]],
                              "rejected": outputs[rec["loser"]]})
    for example_id, rated in by_paper.items():
        for i, a in enumerate(rated):
            for b in rated[i + 1:]:
                if a["rating"] == b["rating"]:
                    counts["ties"] += 1
                    continue
                hi, lo = (a, b) if a["rating"] > b["rating"] else (b, a)
                pairs.append({"example_id": example_id, "chosen_system": hi["system"], "rejected_system": lo["system"],
                              "chosen": hi["output"], "rejected": lo["output"]})
    return pairs, counts


def completion_ids(text: str, ended_with_eos: bool, tokenizer, cap: int) -> list[int]:
    """A rated output as the model wrote it: " " + text (encode_target's rule), with the EOS id only if it ended
    with one; cut to `cap` tokens (a cut output loses its EOS, as a truncated generation has none)."""
    ids = encode_target(text.strip(), tokenizer)
    ids = ids if ended_with_eos else ids[:-1]
    return ids[:cap]


def build_workbook_pairs(args: RLArguments, tokenizer, max_length: int) -> list[dict]:
    """Tokenized pairs {example_id, prompt_ids, chosen_ids, rejected_ids} from --workbook, prompts from the papers."""
    path = Path(args.workbook)
    records = read_ratings(path)
    pairs, counts = pairs_from_ratings(records)
    if counts["ratings"] == 0 and counts["choices"] == 0:
        raise UsageError(f"--workbook {path} holds no ratings or pairwise choices; rate outputs in its Review sheet "
                         "(1-5) or choose in its Pairwise sheet, save it and run again")
    if not pairs:
        raise UsageError(f"--workbook {path}: all {counts['ties']} rated pairs are ties ({counts['ratings']} ratings, "
                         f"{counts['choices']} choices), so nothing is preferred; rate outputs of a paper differently")
    papers = load_all_papers(args.dataset_path)
    missing = sorted({p["example_id"] for p in pairs} - papers.keys())
    if missing:
        raise UsageError(f"--workbook {path} rates {len(missing)} papers that --dataset_path {args.dataset_path} does "
                         f"not have (e.g. example_id {missing[0]}); pass the dataset the workbook was made from")
    eos_flags = read_eos_flags(path.parent)
    if not eos_flags:
        logger.warning("no predictions.jsonl beside %s: whether each output ended with EOS is unknown, so no EOS is "
                       "trained on", path)
    cap = max_length // 2

    def ids_of(pair: dict, which: str) -> list[int]:
        text = pair[which]
        known = eos_flags.get((pair["example_id"], pair[f"{which}_system"]))
        ended = bool(known and known[1] and known[0].strip() == text.strip())
        return completion_ids(text, ended, tokenizer, cap)

    out = []
    for pair in pairs:
        chosen, rejected = ids_of(pair, "chosen"), ids_of(pair, "rejected")
        prompt, _ = build_prompt(papers[pair["example_id"]]["reviews"], tokenizer,
                                 max_length - max(len(chosen), len(rejected)))
        out.append({"example_id": pair["example_id"], "prompt_ids": tokenizer(prompt, add_special_tokens=False)[
            "input_ids"], "chosen_ids": chosen, "rejected_ids": rejected})
    logger.info("%s: %d ratings and %d pairwise choices -> %d preference pairs over %d papers (%d ties skipped)", path,
                counts["ratings"], counts["choices"], len(out), len({p["example_id"] for p in out}), counts["ties"])
    return out


def build_file_pairs(path: Path, tokenizer, max_length: int) -> list[dict]:
    """Tokenized pairs from a JSONL of {prompt, chosen, rejected}; the prompt is used as written."""
    if not path.is_file():
        raise UsageError(f"--pairs_file {path} does not exist; pass a JSONL of {{prompt, chosen, rejected}}")
    eos = tokenizer.eos_token
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"--pairs_file {path} line {n} is not JSON ({err.msg})") from None
        texts = [rec.get(k) if isinstance(rec, dict) else None for k in ("prompt", "chosen", "rejected")]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise UsageError(f"--pairs_file {path} line {n} needs non-empty text fields prompt, chosen and rejected")
        prompt, chosen, rejected = texts
        ids = [completion_ids(t.removesuffix(eos), t.rstrip().endswith(eos), tokenizer, max_length // 2)
               for t in (chosen, rejected)]
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - max(map(len, ids)))):]  # keep the cue at the end
        out.append({"example_id": str(rec.get("example_id", f"line-{n}")), "prompt_ids": prompt_ids,
                    "chosen_ids": ids[0], "rejected_ids": ids[1]})
    same = sum(p["chosen_ids"] == p["rejected_ids"] for p in out)
    out = [p for p in out if p["chosen_ids"] != p["rejected_ids"]]
    if same:
        logger.warning("%s: skipped %d pairs whose chosen and rejected texts are the same", path, same)
    return out


def split_pairs(pairs: list[dict], percentage: float, min_pairs: int, seed: int, source: str):
    """(train, held out): the pairs of a seeded `percentage` of the papers are held out (whole papers, so a held-out
    margin is measured on papers the policy was not trained on). Refuses fewer than `min_pairs` training pairs."""
    papers = sorted({p["example_id"] for p in pairs})
    n_held = int(len(papers) * percentage / 100)
    held = set(random.Random(seed).sample(papers, n_held)) if n_held else set()
    train = [p for p in pairs if p["example_id"] not in held]
    heldout = [p for p in pairs if p["example_id"] in held]
    if len(train) < min_pairs:
        raise UsageError(f"{source} gives {len(train)} training preference pairs ({len(heldout)} more held out), fewer "
                         f"than --min_pairs {min_pairs}; rate more outputs, or lower --min_pairs")
    return train, heldout


def build_prompts(papers: list[dict], tokenizer, budget: int) -> list[dict]:
    """GRPO's rows: {prompt (the template, reviews cut to `budget` tokens), reference, example_id}."""
    rows = []
    for paper in papers:
        prompt, _ = build_prompt(paper["reviews"], tokenizer, budget)
        rows.append({"prompt": prompt, "reference": paper["Output"], "example_id": paper["example_id"]})
    return rows


# ---------------------------------------------------------------------------------------------
# Measuring a policy: greedy outputs on held-out papers, reference NLL, preference margins
# ---------------------------------------------------------------------------------------------
def eval_samples(papers: list[dict], tokenizer, prompt_budget: int) -> list[dict]:
    """fine_tune.generate_samples' inputs for `papers`."""
    out = []
    for paper in papers:
        prompt, _ = build_prompt(paper["reviews"], tokenizer, prompt_budget)
        out.append({"id": paper["example_id"], "prompt": prompt, "reference": paper["Output"],
                    "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"]})
    return out


def evaluate_policy(model, tokenizer, papers: list[dict], max_length: int, max_new_tokens: int,
                    batch_size: int = 8) -> dict[str, float]:
    """Greedy outputs of `papers` (ROUGE-L F1 x 100, share ending with EOS, share of repeated 3-grams: evaluation.py's
    measures) and the reference's NLL per token (the training target, scored as evaluation.py does)."""
    import torch

    from evaluation import make_rouge_scorer, repetition_rate, score_rouge
    from processing_meta_review import tokenize_example
    from steer import score_targets

    if not papers:
        return {}
    generated = fine_tune.generate_samples(model, tokenizer, eval_samples(papers, tokenizer, max_length - max_new_tokens),
                                           max_new_tokens, batch_size)
    scorer = make_rouge_scorer()
    scored = [ex for p in papers if (ex := tokenize_example({"reviews": p["reviews"], "Output": p["Output"]},
                                                           tokenizer, max_length))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        nll = score_targets({"policy": model}, [ex["input_ids"][:ex["prompt_length"]] for ex in scored],
                            [ex["input_ids"][ex["prompt_length"]:] for ex in scored], vocab_size=vocab_size_of(tokenizer),
                            batch_size=batch_size, pad_token_id=tokenizer.pad_token_id, show_progress=False)
    model.train(was_training)
    n = len(generated)
    return {"examples": n,
            "rougeL": sum(score_rouge(scorer, g["generation"], g["reference"])["rougeL"] for g in generated) / n,
            "eos_rate": sum(g["stopped_with_eos"] for g in generated) / n,
            "repetition": sum(repetition_rate(g["generation"], 3) for g in generated) / n,
            "words": sum(len(g["generation"].split()) for g in generated) / n,
            "distinct_outputs": len({g["generation"] for g in generated}) / n,
            "reference_nll": float(nll["policy"].sum() / nll["n_tokens"].sum()) if scored else float("nan")}


def pair_margins(model, tokenizer, pairs: list[dict], batch_size: int = 8) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) under `model`, per pair (summed over tokens)."""
    import torch

    from steer import score_targets

    if not pairs:
        return []
    prompts = [p["prompt_ids"] for p in pairs]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        kw = dict(vocab_size=vocab_size_of(tokenizer), batch_size=batch_size, pad_token_id=tokenizer.pad_token_id,
                  show_progress=False)
        chosen = score_targets({"m": model}, prompts, [p["chosen_ids"] for p in pairs], **kw)["m"]
        rejected = score_targets({"m": model}, prompts, [p["rejected_ids"] for p in pairs], **kw)["m"]
    model.train(was_training)
    return (rejected - chosen).tolist()  # NLLs: rejected's minus chosen's is chosen's log-prob minus rejected's


def margin_summary(margins: list[float]) -> dict[str, float]:
    if not margins:
        return {}
    return {"pairs": len(margins), "mean_margin": sum(margins) / len(margins),
            "accuracy": sum(m > 0 for m in margins) / len(margins)}


# ---------------------------------------------------------------------------------------------
# Trainers: TRL's, with fine_tune.py's checkpoint reloading (weight names converted, a finished run not extended)
# ---------------------------------------------------------------------------------------------
class RLDPOTrainer(fine_tune.CheckpointReloadMixin, DPOTrainer):
    """DPOTrainer on pairs this script tokenized. TRL's own tokenization appends an EOS to every chosen and rejected
    text that lacks one, which would erase the difference between an output that stopped and one cut off at
    max_new_tokens, the very thing reviewers rate; here a completion has an EOS only if the model wrote one."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)


class RLGRPOTrainer(fine_tune.CheckpointReloadMixin, GRPOTrainer):
    """GRPOTrainer with fine_tune.py's checkpoint reloading."""


def build_trainer(args: RLArguments, model, tokenizer, training_args, train_rows: list[dict], rewards):
    import datasets

    if args.method == "dpo":
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        train = datasets.Dataset.from_dict({k: [r[k] for r in train_rows] for k in columns})
        return RLDPOTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer)
    functions, processing = rewards
    return RLGRPOTrainer(model=model, args=training_args, reward_funcs=functions,
                         train_dataset=datasets.Dataset.from_list(train_rows), processing_class=tokenizer,
                         reward_processing_classes=processing)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def rl_card_section(args: RLArguments, training_args, metrics: dict) -> str:
    """The model card's RL part: method, signal, and the before/after table."""
    if args.method == "dpo":
        signal = (f"preference pairs from `{args.workbook or args.pairs_file}` (DPO, beta {training_args.beta}, "
                  f"loss {','.join(training_args.loss_type)}); reference = the starting model")
    else:
        signal = (f"GRPO with rewards `{args.reward}`" + (f" + `{args.reward_model}` x {args.reward_model_weight}"
                                                            if args.reward_model else "")
                  + f"; {training_args.num_generations} completions per prompt, beta {training_args.beta}")
    lines = ["## Preference / reward tuning (rl_tune.py)", "", f"- {signal}", ""]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    if before:
        lines += [f"Greedy outputs on {before['examples']} papers of `{args.eval_split}`:", "",
                  "| measure | before | after |", "| --- | --- | --- |",
                  *[f"| {k} | {before[k]:.4g} | {after.get(k, float('nan')):.4g} |" for k in before if k != "examples"],
                  ""]
    for name, label in (("heldout_margin", "held-out margin"), ("train_margin", "training margin")):
        if metrics.get(name, {}).get("before"):
            b, a = metrics[name]["before"], metrics[name]["after"]
            lines += [f"- {label} (log p chosen - log p rejected, {b['pairs']} pairs): "
                      f"{b['mean_margin']:.3f} -> {a['mean_margin']:.3f}; accuracy {b['accuracy']:.2f} -> "
                      f"{a['accuracy']:.2f}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def check_inputs(args: RLArguments) -> None:
    """The flags that belong to one method, and exactly one DPO source."""
    if args.method == "dpo":
        if bool(args.workbook) == bool(args.pairs_file):
            raise UsageError("--method dpo needs exactly one of --workbook (eval_examples.xlsx or ratings.jsonl) and "
                             "--pairs_file (JSONL of prompt, chosen, rejected)")
        if args.reward_model:
            raise UsageError("--reward_model is for --method grpo; DPO learns from --workbook/--pairs_file")
    else:
        if args.workbook or args.pairs_file:
            raise UsageError("--workbook/--pairs_file are for --method dpo; GRPO learns from --reward")
        parse_reward_spec(args.reward, args.reward_model)  # a typo in --reward stops before any loading
        parse_length_range(args.length_range)


def prepare(args: RLArguments, model_args: RLModelArguments, training_args, tokenizer):
    """Everything from the data before a model is loaded: (train rows, held-out pairs, eval papers, reward spec)."""
    rewards = None
    if args.method == "grpo":
        rewards = parse_reward_spec(args.reward, args.reward_model)
        parse_length_range(args.length_range)
        budget = training_args.max_length - training_args.max_completion_length
        from evaluation import select_examples

        papers = load_papers(args.dataset_path, args.split)
        papers = [papers[i] for i in select_examples(len(papers), args.max_train_samples, training_args.seed)]
        train_rows, heldout = build_prompts(papers, tokenizer, budget), []
    else:
        if args.workbook:
            pairs = build_workbook_pairs(args, tokenizer, training_args.max_length)
            source = f"--workbook {args.workbook}"
        else:
            pairs = build_file_pairs(Path(args.pairs_file), tokenizer, training_args.max_length)
            source = f"--pairs_file {args.pairs_file}"
        train_rows, heldout = split_pairs(pairs, args.eval_pairs_percentage, args.min_pairs, training_args.seed,
                                          source)
    n_eval = max(args.num_eval_examples, args.num_samples)
    eval_papers = load_papers(args.dataset_path, args.eval_split)[:n_eval] if n_eval else []
    return train_rows, heldout, eval_papers, rewards


def load_rewards(args: RLArguments, rewards: list[tuple[str, float]], tokenizer, model, training_args):
    """(reward functions, their processing classes) and, in training_args.reward_weights, their weights."""
    eos_ids = [tokenizer.eos_token_id]
    functions = make_reward_functions(rewards, eos_ids, parse_length_range(args.length_range), args.repetition_ngram)
    processing = [None] * len(functions)
    weights = [w for _, w in rewards]
    if args.reward_model:
        reward_model, reward_tokenizer = load_reward_model(args.reward_model)
        functions.append(reward_model)
        processing.append(reward_tokenizer)
        weights.append(args.reward_model_weight)
    training_args.reward_weights = weights
    return functions, processing


def main(args: RLArguments, model_args: RLModelArguments, training_args) -> dict:
    """Train and write output_dir/final. Returns {"status": "trained"|"done", "final_dir", "metrics", "resumed_from"}."""
    from transformers import set_seed

    setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    check_inputs(args)
    out = Path(training_args.output_dir)
    plan = fine_tune.plan_run(training_args, RUN_CONFIG)
    if plan.done:
        logger.info("%s already holds a finished run (%s); pass --overwrite_output_dir to train again", out,
                    out / fine_tune.FINAL_DIR)
        metrics_path = out / fine_tune.FINAL_DIR / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        return {"status": "done", "final_dir": out / fine_tune.FINAL_DIR, "metrics": metrics, "resumed_from": None}

    set_seed(training_args.seed)
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=model_args.trust_remote_code, padding_side="left",
                               flag="--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    train_rows, heldout, eval_papers, rewards = prepare(args, model_args, training_args, tokenizer)
    model = fine_tune.load_model(model_args, tokenizer, training_args.max_length, training_args.seed)
    reward_setup = load_rewards(args, rewards, tokenizer, model, training_args) if rewards is not None else None

    metrics: dict[str, Any] = {"method": args.method, "train_rows": len(train_rows), "heldout_pairs": len(heldout)}
    scored = eval_papers[:args.num_eval_examples]
    metrics["before"] = evaluate_policy(model, tokenizer, scored, training_args.max_length, args.max_new_tokens)
    if args.method == "dpo":
        metrics["heldout_margin"] = {"before": margin_summary(pair_margins(model, tokenizer, heldout))}
        metrics["train_margin"] = {"before": margin_summary(pair_margins(model, tokenizer, train_rows))}
    if model_args.use_lora:
        model = fine_tune.apply_lora(model, model_args)
    log_startup(args, model_args, training_args, model, train_rows, heldout, plan)

    trainer = build_trainer(args, model, tokenizer, training_args, train_rows, reward_setup)
    run_config = to_jsonable(args, model_args, training_args)
    if training_args.should_save:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if plan.resume_from:
                fine_tune.warn_config_changes(out, run_config, RUN_CONFIG)
            write_json(out / RUN_CONFIG, run_config)
        except OSError as err:
            raise write_error(out, err) from None
    train_result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    metrics.update(train_result.metrics)
    metrics["global_step"] = trainer.state.global_step
    policy = trainer.model
    metrics["after"] = evaluate_policy(policy, tokenizer, scored, training_args.max_length, args.max_new_tokens)
    if args.method == "dpo":
        metrics["heldout_margin"]["after"] = margin_summary(pair_margins(policy, tokenizer, heldout))
        metrics["train_margin"]["after"] = margin_summary(pair_margins(policy, tokenizer, train_rows))
    samples = fine_tune.generate_samples(policy, tokenizer, eval_samples(eval_papers[:args.num_samples], tokenizer,
                                                                         training_args.max_length - args.max_new_tokens),
                                         args.max_new_tokens) if args.num_samples else []
    logger.info("before -> after: %s", {k: (metrics["before"].get(k), v) for k, v in metrics["after"].items()})
    final = save(trainer, tokenizer, args, model_args, training_args, metrics, samples, train_rows, heldout)
    logger.info("wrote %s: %s", final, ", ".join(sorted(p.name for p in final.iterdir())))
    return {"status": "trained", "final_dir": final, "metrics": metrics, "resumed_from": plan.resume_from}


def log_startup(args, model_args, training_args, model, train_rows, heldout, plan) -> None:
    total, trainable = fine_tune.count_parameters(model)
    if args.method == "dpo":
        what = f"DPO on {len(train_rows)} preference pairs ({len(heldout)} held out), beta {training_args.beta}"
    else:
        what = (f"GRPO on {len(train_rows)} prompts of '{args.split}', {training_args.num_generations} completions of "
                f"<= {training_args.max_completion_length} tokens each, rewards {training_args.reward_weights} "
                f"({args.reward}{', + ' + args.reward_model if args.reward_model else ''}), beta {training_args.beta}")
    logger.info("rl_tune.py\n  %s", "\n  ".join([
        f"policy = reference: {model_args.model_name_or_path}; parameters {total:,}, trainable {trainable:,}"
        + (f" (LoRA r={model_args.lora_r})" if model_args.use_lora else ""),
        what,
        f"batch {training_args.per_device_train_batch_size} x {training_args.gradient_accumulation_steps}; lr "
        f"{training_args.learning_rate:g}; max_steps {training_args.max_steps}, epochs {training_args.num_train_epochs}",
        f"output: {training_args.output_dir} (" + (f"resuming from {plan.resume_from.name}" if plan.resume_from
                                                   else "fresh start") + ")"]))


def save(trainer, tokenizer, args, model_args, training_args, metrics, samples, train_rows, heldout) -> Path:
    """final/ through fine_tune.save_final, with this script's card and config name."""
    description = (f"{len(train_rows)} preference pairs ({len(heldout)} held out)" if args.method == "dpo"
                   else f"{len(train_rows)} prompts of split '{args.split}' (GRPO)")
    data = fine_tune.PreparedData(train=train_rows, validation=heldout, samples=[], mode="meta_review",
                                  description=description)
    data_args = SimpleNamespace(dataset_path=args.workbook or args.pairs_file or args.dataset_path,
                                max_length=training_args.max_length)
    card = fine_tune.model_card(model_args, data_args, training_args, data, flat_metrics(metrics), samples,
                                script="rl_tune.py")
    card += "\n" + rl_card_section(args, training_args, metrics)
    curve = ["rewards/margins"] if args.method == "dpo" else ["reward"]
    try:
        return fine_tune.save_final(trainer, tokenizer, model_args, args, training_args, data, metrics, samples,
                                    run_config=RUN_CONFIG, card=card, curve_keys=curve)
    except OSError as err:
        raise write_error(Path(training_args.output_dir), err) from None


def flat_metrics(metrics: dict) -> dict:
    """{"before": {"eos_rate": 0.1}} -> {"before_eos_rate": 0.1}: the card's results table takes numbers."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in flat_metrics(value).items()})
        else:
            flat[key] = value
    return flat


if __name__ == "__main__":
    cli(lambda: main(*parse_args()))()
