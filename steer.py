"""Steer a large base model with a small fine-tuned one at decoding time (proxy-tuning / EFT up-scaling).

Generate (OUT/final is fine_tune.py's result: a model directory or a LoRA adapter directory):
    python steer.py --large_model EleutherAI/pythia-410m --small_base_model EleutherAI/pythia-70m \
        --small_tuned_model OUT/final --alpha 1.0 --prompt "The paper proposes ..." --max_new_tokens 128

Tune the blend on validation papers (writes blend.json, tune_report.json): a perplexity search, then the candidates
(proxy-tuning at a few alphas, the perplexity-best blends) are decoded on held-out papers and the best ROUGE-L wins:
    python steer.py --large_model EleutherAI/pythia-410m --small_base_model EleutherAI/pythia-70m \
        --small_tuned_model OUT/final --tune --validation_data outputs/meta_review --output_dir outputs/steer

Generate for many reviews (JSONL with an `Input` column) with the tuned blend; blend.json records the models it was
tuned with, so no model flag is needed (a flag given explicitly wins, with a warning if it differs):
    python steer.py --blend outputs/steer/blend.json \
        --prompts_file ../shared/data/meta_review/mred_val_longest.jsonl --output_dir outputs/steer_generations

Each model may sit on its own device and dtype (--large_device cuda:0 --small_base_device cuda:1 --large_dtype
bfloat16 ...) and be loaded in 4 or 8 bits (--large_load_in_4bit, bitsandbytes; README "Quantised models"); the
arithmetic runs on L's device, on float32 log-probs.

The next-token distribution is, normalised over the whole vocabulary,

    log p~(x) = w_L * log p_L(x; T_L) + w_tuned * log p_S_tuned(x; T_S) - w_base * log p_S(x; T_S) - log Z

w_L = 1, w_tuned = w_base = alpha is proxy-tuning (Liu et al. 2024, arXiv:2401.08565) and EFT up-scaling
(Mitchell et al. 2023). The three models must share one tokenizer; each keeps its own KV cache, so after the
prompt every step costs one token per model.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from common import (
    DEFAULT_MODELS,
    DTYPES,
    SEED_MAX,
    QuantizationArguments,
    quantization_flags_last,
    UsageError,
    atomic_directory,
    build_prompt,
    check_output_dir,
    check_same_vocab,
    decoding_problems,
    is_missing_local_path,
    load_causal_lm,
    load_tokenizer,
    number_problem,
    number_problems,
    raise_problems,
    read_data_text,
    run_cli,
    setup_logging,
    split_compression,
    to_jsonable,
    vocab_size_of,
    write_json,
)
from processing_meta_review import clean_text, extract_reviews, load_saved_split, tokenize_example

logger = logging.getLogger("steer")

# Model roles: the keys of the `models` dicts passed around, of score_targets' results and of blend.json's record.
LARGE, SMALL_BASE, SMALL_TUNED, LARGE_TUNED = "large", "small_base", "small_tuned", "large_tuned"
MODEL_ROLES = (LARGE, SMALL_BASE, SMALL_TUNED, LARGE_TUNED)
CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Search ranges for --tune. A weight is an inverse temperature (see Blend), so [1/3, 3] for the temperature
# searches maps onto the weight range and every baseline's optimum is a point of the free search.
WEIGHT_RANGE = (0.0, 3.0)
BASE_WEIGHT_RANGE = (-1.0, 3.0)  # negative: S is added rather than subtracted
TEMPERATURE_RANGE = (1 / 3, 3.0)
GOLDEN_SECTION_STEPS = 18  # each step shrinks the interval by 0.618: [0, 3] -> 0.0005 wide
CANDIDATE_ALPHAS = (0.5, 1.0, 1.5, 2.0)  # proxy-tuning strengths --tune decodes besides the perplexity-best blends
# Generation selection keeps plain proxy-tuning (alpha = 1, the method's own setting) unless a candidate's ROUGE-L gain
# over it on the same papers is clear: the lower end of a one-sided 95% paired bootstrap interval above 0. The best of
# several noisy means is biased upwards (the winner's curse): in the lab, alpha = 1.5 led alpha = 1 by 1.3 ROUGE-L on
# the 16 held-out papers (interval -1.5 to +4.3), trailed it by 0.1 on all 64 validation papers and by 1.2 on the
# 99 test papers (bench/RESULTS.md). Greedy outputs of small models differ a lot from paper to paper.
REFERENCE_CANDIDATE = "proxy-tuning, alpha=1"
SELECTION_CONFIDENCE = 0.95
BOOTSTRAP_SAMPLES = 2000
DEFAULT_TUNE_DIR = "outputs/steer"
# A model whose coefficient is under this share of the largest one is left out when describe_blend names what a
# blend is. Each coefficient multiplies a log-prob vector of similar spread (next-token log-probs span some 10
# nats), so a 5% term moves the blended log-probs about 5% as much as the main term: it can reorder near-ties only,
# and the blend decodes (nearly) as the other models would. The --tune run that chose w_L = 0, w_tuned = 2.24,
# w_base = 0 was S_tuned alone, and its outputs were S_tuned's to the token.
NEGLIGIBLE_SHARE = 0.05
# Keys of blend.json that are not Blend fields: written by --tune for people and for evaluation.py.
BLEND_FILE_EXTRAS = ("report", "models", "system")


# ---------------------------------------------------------------------------------------------
# The blend: what --tune writes and --blend reads
# ---------------------------------------------------------------------------------------------
@dataclass
class Blend:
    """Weights and temperatures of the steered distribution; the file --tune writes and --blend reads.

    Temperatures and weights overlap: w * log_softmax(z / T) = (w / T) * log_softmax(z) + const, and the
    constant vanishes when the blend is normalised, so only w / T matters for the distribution. The
    temperatures are kept because they are how people think about single models ("L at T = 0.8") and because
    L's plausibility filter looks at L's tempered distribution.
    """

    large_weight: float = 1.0  # w_L
    tuned_weight: float = 1.0  # weight on log p_S_tuned
    base_weight: float = 1.0  # weight subtracted on log p_S (proxy-tuning: tuned_weight == base_weight == alpha)
    large_temperature: float = 1.0
    small_temperature: float = 1.0  # shared by S_tuned and S so that their difference stays a clean delta
    # Restrict the blend to L's nucleus (DExperts) and/or to tokens with p_L >= ratio * max p_L (contrastive
    # decoding), so the delta cannot promote a token L finds implausible. None = no restriction.
    plausibility_top_p: float | None = None
    plausibility_min_ratio: float | None = None

    def __post_init__(self):
        # number_problem also refuses NaN and values beyond float32, which the arithmetic runs in.
        weight = ("[0, inf)", "a negative weight inverts the model")
        problems = number_problems(self, {
            "large_weight": weight, "tuned_weight": weight, "base_weight": "(-inf, inf)",
            "large_temperature": ("(0, inf)", "1.0 leaves the model as it is"),
            "small_temperature": ("(0, inf)", "1.0 leaves the model as it is"),
            "plausibility_top_p": ("(0, 1]", "or None for no limit"),
            "plausibility_min_ratio": ("(0, 1]", "or None for no limit")}, prefix="")
        if problems:
            raise UsageError("blend: " + "; ".join(problems))

    @classmethod
    def from_alpha(cls, alpha: float, **kw) -> Blend:
        """Proxy-tuning: `Blend.from_alpha(0.5)` -> w_L = 1, w_tuned = w_base = 0.5."""
        raise_problems([p for p in [number_problem("--alpha", alpha, "[0, inf)",
                                                   "0 = the large model alone, 1 = proxy-tuning")] if p])
        return cls(tuned_weight=alpha, base_weight=alpha, **kw)

    @property
    def has_plausibility_limit(self) -> bool:
        return self.plausibility_top_p is not None or self.plausibility_min_ratio is not None

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(c_L, c_tuned, c_base): the multipliers of each model's log-softmax, temperatures folded in."""
        return (
            self.large_weight / self.large_temperature,
            self.tuned_weight / self.small_temperature,
            -self.base_weight / self.small_temperature,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        text = (f"w_L={self.large_weight:.3g} w_tuned={self.tuned_weight:.3g} w_base={self.base_weight:.3g} "
                f"T_L={self.large_temperature:.3g} T_S={self.small_temperature:.3g}")
        if self.plausibility_top_p is not None:
            text += f" top_p(L)={self.plausibility_top_p:.3g}"
        if self.plausibility_min_ratio is not None:
            text += f" min_ratio(L)={self.plausibility_min_ratio:.3g}"
        return text

    def save(self, path: str | Path, report: dict | None = None, models: dict[str, dict] | None = None) -> None:
        """Write the blend as JSON, with what it really is ('system', see describe_blend), the `models` it was tuned
        with (role -> model_record) and `report` (tuning numbers): extra keys that load() skips."""
        extras = {"system": describe_blend(self), **({"models": models} if models else {}),
                  **({"report": report} if report else {})}
        write_json(path, {**self.to_dict(), **extras})

    @classmethod
    def load(cls, path: str | Path) -> Blend:
        """Read a blend JSON: the fields above (plus the extras --tune writes: 'system', 'models', 'report'), or
        {"alpha": a, ...}."""
        path = Path(path)
        data = {k: v for k, v in read_blend_file(path).items() if k not in BLEND_FILE_EXTRAS}
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names and k != "alpha"]
        if unknown:
            close = difflib.get_close_matches(unknown[0], [*names, "alpha"], n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}, alpha"
            raise UsageError(f"blend file {path}: unknown key '{unknown[0]}'; {hint}")
        for key, value in data.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UsageError(f"blend file {path}: '{key}' is {value!r}, expected a number")
        if "alpha" in data:
            alpha = data.pop("alpha")
            if "tuned_weight" in data or "base_weight" in data:
                raise UsageError(f"blend file {path}: give either 'alpha' or 'tuned_weight'/'base_weight', not both")
            return cls.from_alpha(float(alpha), **data)
        return cls(**data)


def read_blend_file(path: str | Path) -> dict:
    """A blend file's JSON object, or a UsageError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"blend file {path} does not exist; write one with `python steer.py ... --tune`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"blend file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"blend file {path} must hold a JSON object, not {type(data).__name__}")
    return data


def blend_terms(blend: Blend) -> dict[str, float]:
    """The models a blend really uses -> their coefficients (Blend.coefficients), leaving out any under
    NEGLIGIBLE_SHARE of the largest: `blend_terms(Blend(0.0, 2.24, 0.0))` -> {'small_tuned': 2.24}."""
    coefficients = dict(zip((LARGE, SMALL_TUNED, SMALL_BASE), blend.coefficients))
    biggest = max(abs(c) for c in coefficients.values())
    return {role: c for role, c in coefficients.items() if biggest > 0 and abs(c) >= NEGLIGIBLE_SHARE * biggest}


def describe_blend(blend: Blend) -> str:
    """What a blend is, by the models it really uses (blend_terms):
    "large + small_tuned - small_base" for a real steer, "small_tuned alone", "large alone",
    "large x small_tuned (no S term)", and so on. `describe_blend(Blend(0.0, 2.24, 0.0))` -> 'small_tuned alone'."""
    terms = blend_terms(blend)
    limit = " within large's plausible tokens" if blend.has_plausibility_limit and LARGE not in terms else ""
    if not terms:
        return "uniform (every weight 0)"
    if len(terms) == 1:
        (role, c), = terms.items()
        return f"{role} alone{limit}" if c > 0 else f"{role} inverted{limit}"
    if terms.keys() == {LARGE, SMALL_TUNED} and terms[SMALL_TUNED] > 0:
        return "large x small_tuned (no S term)"  # a product of experts: the name the tune report uses
    text = ""
    for role, c in terms.items():
        text += (role if c > 0 else f"-{role}") if not text else (f" + {role}" if c > 0 else f" - {role}")
    missing = [{LARGE: "L", SMALL_TUNED: "S_tuned", SMALL_BASE: "S"}[r] for r in (LARGE, SMALL_TUNED, SMALL_BASE)
               if r not in terms]
    added = " (S added, not subtracted)" if terms.get(SMALL_BASE, 0) > 0 else ""
    return text + (f" (no {missing[0]} term)" if missing else "") + added + limit


def is_steering(blend: Blend) -> bool:
    """Whether the blend is L pushed by the small pair's difference: all three models, S subtracted."""
    terms = blend_terms(blend)
    return terms.keys() == {LARGE, SMALL_TUNED, SMALL_BASE} and terms[SMALL_BASE] < 0 < terms[SMALL_TUNED]


# ---------------------------------------------------------------------------------------------
# The models a blend was tuned with
# ---------------------------------------------------------------------------------------------
def hub_revision(repo_id: str, cache_dir: str | Path | None = None) -> str | None:
    """The commit of `repo_id` in the local Hub cache (the snapshot from_pretrained loads), or None when the model
    is not cached from the Hub. transformers 5 no longer keeps the commit on the config (`_commit_hash` is gone)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # not a valid repo id: a path, a typo; the loader reports those
        return None
    return Path(cached).parent.name if isinstance(cached, str) else None  # .../snapshots/<commit>/config.json


def model_record(name_or_path: str) -> dict[str, str | None]:
    """How blend.json records a model: the name as given, the absolute path of a local directory (so the record
    works from another directory), and the Hub commit of a Hub model (None where unknown)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        return {"name_or_path": name_or_path, "path": str(local.resolve()), "revision": None}
    return {"name_or_path": name_or_path, "path": None, "revision": hub_revision(name_or_path)}


def blend_models(path: str | Path) -> dict[str, dict]:
    """The models a blend file records (role -> model_record), {} for a file without a record ({"alpha": 1})."""
    models = read_blend_file(path).get("models") or {}
    if not isinstance(models, dict) or not all(isinstance(e, dict) and e.get("name_or_path") for e in models.values()):
        raise UsageError(f"blend file {path}: 'models' must map roles to records with a 'name_or_path'")
    return models


def recorded_model(entry: dict) -> str:
    """What to load for a blend_models record: the name as given, or the recorded absolute path when the given
    (relative) path does not exist from the current directory."""
    given, local = entry["name_or_path"], entry.get("path")
    if local and not Path(given).expanduser().exists() and Path(local).exists():
        return local
    return given


def same_model(a: str, b: str) -> bool:
    """Two model names mean the same model: equal as Hub ids, or the same directory on disk."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


# ---------------------------------------------------------------------------------------------
# Command-line arguments
# ---------------------------------------------------------------------------------------------
@quantization_flags_last
@dataclass
class ModelArguments(QuantizationArguments):
    # None = not given: resolve_model_args fills it from the --blend file's record, else from DEFAULT_MODELS.
    large_model: str | None = field(
        default=None, metadata={"help": "L, the large base model: Hub id, local dir or LoRA adapter dir. None: the "
                                f"model the --blend file records, else {DEFAULT_MODELS[LARGE]}."})
    small_base_model: str | None = field(
        default=None, metadata={"help": "S, the small base model the tuned one started from. None: the --blend "
                                f"file's record, else {DEFAULT_MODELS[SMALL_BASE]}."})
    small_tuned_model: str | None = field(
        default=None, metadata={"help": "S_tuned: fine_tune.py's result, its --output_dir/final, a model or a LoRA "
                                f"adapter. None: the --blend file's record, else {DEFAULT_MODELS[SMALL_TUNED]}."})
    large_tuned_model: str | None = field(
        default=None, metadata={"help": "L_tuned, only scored by --tune as the reference the blend tries to reach."})
    large_device: str | None = field(default=None, metadata={"help": "Device of L (default: cuda if available, else cpu)."})
    small_base_device: str | None = field(default=None, metadata={"help": "Device of S (default as L)."})
    small_tuned_device: str | None = field(default=None, metadata={"help": "Device of S_tuned (default as L)."})
    large_tuned_device: str | None = field(default=None, metadata={"help": "Device of L_tuned (default as L)."})
    large_dtype: str = field(default="auto", metadata={"help": "auto = float32 on CPU, bfloat16 on GPU.",
                                                      "choices": list(DTYPES)})
    small_base_dtype: str = field(default="auto", metadata={"help": "dtype of S.", "choices": list(DTYPES)})
    small_tuned_dtype: str = field(default="auto", metadata={"help": "dtype of S_tuned.", "choices": list(DTYPES)})
    large_tuned_dtype: str = field(default="auto", metadata={"help": "dtype of L_tuned.", "choices": list(DTYPES)})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub models/tokenizers to run their code."})


@dataclass
class SteerArguments:
    alpha: float | None = field(
        default=None, metadata={"help": "Proxy-tuning strength: w_L = 1, w_tuned = w_base = alpha (default 1.0)."})
    blend: str | None = field(default=None, metadata={"help": "A blend JSON (from --tune); excludes --alpha."})
    plausibility_top_p: float | None = field(
        default=None, metadata={"help": "Keep only tokens in L's top-p nucleus (overrides the blend file's value)."})
    prompt: str | None = field(default=None, metadata={"help": "Reviews text (put into the prompt template)."})
    prompts_file: str | None = field(
        default=None, metadata={"help": "JSONL with a column of reviews (--input_column), or .txt with one per line."})
    input_column: str = field(default="Input", metadata={"help": "Reviews column of --prompts_file."})
    use_template: bool = field(
        default=True, metadata={"help": "Wrap the text in the meta-review template; false = use the text as the prompt."})
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens to generate at most (the prompt gets the rest)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (true) or decode greedily (false)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the blended distribution."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling nucleus of the blended distribution."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 lowers tokens already in the row."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Never repeat an n-gram of this size (0 = off)."})
    speculative: bool = field(
        default=True, metadata={"help": "Decode speculatively, S_tuned drafting and L and S checking its drafts "
                                "(speculative.py: greedy output unchanged, sampling distribution unchanged, fewer L "
                                "steps; batches too); false = the plain loop."})
    draft_tokens: int = field(
        default=2, metadata={"help": "Tokens S_tuned drafts per speculative round (0 = adaptive, as HF assisted "
                             "generation)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts decoded together (also the --tune scoring batch)."})
    seed: int = field(default=42, metadata={"help": "Seed of sampling and of the --tune example draw and search."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Write generations.jsonl + config.json here (default: print them); with "
                                "--tune, blend.json + tune_report.json (default: outputs/steer)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing --output_dir."})

    def __post_init__(self):
        problems = number_problems(self, {"batch_size": "[1, inf)", "seed": f"[0, {SEED_MAX}]",
                                          "alpha": ("[0, inf)", "0 = the large model alone, 1 = proxy-tuning"),
                                          "plausibility_top_p": "(0, 1]",
                                          "draft_tokens": ("[0, inf)", "0 = adaptive")})
        if self.alpha is not None and self.blend is not None:
            problems.append("give either --alpha or --blend, not both")
        if self.prompt is not None and self.prompts_file is not None:
            problems.append("give either --prompt or --prompts_file, not both")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class TuneArguments:
    tune: bool = field(default=False, metadata={
        "help": "Tune the blend instead of generating: search on validation perplexity, then pick by ROUGE-L of "
                "generations (--select_by)."})
    validation_data: str = field(
        default="outputs/meta_review",
        metadata={"help": "processing_meta_review.py's output directory, or a JSONL with Input/Output columns."})
    validation_split: str = field(default="validation", metadata={"help": "Split of a DatasetDict directory."})
    n_examples: int = field(default=64, metadata={"help": "Validation examples drawn (seeded) for tuning and holdout."})
    holdout_fraction: float = field(
        default=0.25, metadata={"help": "Share of the examples not tuned on, reported as the honest score (0 = none)."})
    max_target_tokens: int = field(
        default=128, metadata={"help": "Score at most this many tokens of each meta-review (bounds the cache)."})
    n_trials: int = field(default=20, metadata={
        "help": "Newton steps at most in each 2-D/3-D search (L x S_tuned, the free blend; each usually converges in "
                "under 10); the 1-D searches (temperatures, alpha) are golden-section searches."})
    select_by: str = field(default="generation", metadata={
        "help": "generation: decode the candidates (proxy-tuning at --candidate_alphas, the perplexity-best alpha and "
                "free blend) greedily on held-out papers and keep the best ROUGE-L; perplexity: keep the free blend "
                "with the lowest validation perplexity, decoding nothing.",
        "choices": ["generation", "perplexity"]})
    generation_examples: int = field(default=16, metadata={
        "help": "Held-out validation papers each candidate is decoded on (--max_new_tokens each)."})
    candidate_alphas: list[float] = field(default_factory=lambda: list(CANDIDATE_ALPHAS), metadata={
        "help": "Proxy-tuning alphas decoded as candidates besides the perplexity-best blends."})
    cache_dtype: str = field(default="float32", metadata={"help": "dtype of the cached log-prob rows.",
                                                          "choices": list(CACHE_DTYPES)})
    max_cache_gb: float = field(default=8.0, metadata={"help": "Refuse to cache more log-prob rows than this."})

    def __post_init__(self):
        problems = number_problems(self, {
            "n_examples": "[1, inf)", "holdout_fraction": "[0, 1)", "max_target_tokens": "[1, inf)",
            "n_trials": "[1, inf)", "generation_examples": "[1, inf)", "max_cache_gb": "(0, inf)"})
        bad = [p for p in (number_problem("--candidate_alphas", a, "[0, inf)") for a in self.candidate_alphas) if p]
        raise_problems(problems + bad[:1])


# ---------------------------------------------------------------------------------------------
# The steering arithmetic
# ---------------------------------------------------------------------------------------------
def slice_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Drop the padded rows past the tokenizer (Pythia: 50,304 logits for 50,277 tokens). Those ids are never
    produced by the tokenizer, and keeping them would let the blend put mass on tokens that decode to nothing."""
    if logits.shape[-1] < vocab_size:
        raise ValueError(
            f"the model has {logits.shape[-1]} output logits but the tokenizer has {vocab_size} tokens; "
            "it was trained with another vocabulary and cannot be combined with these models"
        )
    return logits[..., :vocab_size]


def nucleus_mask(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """(..., V) normalised log-probs -> (..., V) bool: the smallest set of most likely tokens holding at least
    `top_p` of the mass (the most likely token is always in). `nucleus_mask(log([.5, .3, .2]), .6)` -> [T, T, F]."""
    sorted_logp, order = logp.sort(dim=-1, descending=True)  # (..., V)
    probs = sorted_logp.exp()
    mass_before = probs.cumsum(dim=-1) - probs  # (..., V) mass of strictly more likely tokens
    keep_sorted = mass_before < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def plausible_mask(logp_large: torch.Tensor, blend: Blend) -> torch.Tensor:
    """(..., V) log p_L -> (..., V) bool: the tokens L finds plausible under the blend's limits."""
    keep = torch.ones_like(logp_large, dtype=torch.bool)
    if blend.plausibility_top_p is not None and blend.plausibility_top_p < 1:
        tempered = logp_large if blend.large_temperature == 1 else torch.log_softmax(
            logp_large / blend.large_temperature, dim=-1)
        keep &= nucleus_mask(tempered, blend.plausibility_top_p)
    if blend.plausibility_min_ratio is not None:
        # p_L(x; T) >= r * max p_L(.; T)  <=>  (log p_L(x) - max log p_L) / T >= log r
        top = logp_large.max(dim=-1, keepdim=True).values
        keep &= (logp_large - top) / blend.large_temperature >= math.log(blend.plausibility_min_ratio)
    return keep


def blend_logprobs(
    logp_large: torch.Tensor | None,
    logp_tuned: torch.Tensor | None,
    logp_base: torch.Tensor | None,
    blend: Blend,
) -> torch.Tensor:
    """The steering arithmetic, on log-softmaxed logits of shape (B, V) or (B, T, V) -> blended log-probs, same shape.

        log p~ = log_softmax( c_L * log p_L + c_tuned * log p_S_tuned + c_base * log p_S ),  c = Blend.coefficients

    with the sum formed by mix_logprobs (the small pair's difference first, so that a zero delta is exactly zero).

    An input may be None when its coefficient is 0 (the model need not run). With blend = Blend.from_alpha(0)
    the result is log_softmax(logp_large), i.e. L itself.
    """
    shapes = {name: tuple(t.shape) for name, t in
              (("logp_large", logp_large), ("logp_tuned", logp_tuned), ("logp_base", logp_base)) if t is not None}
    if not shapes:
        raise ValueError("blend_logprobs needs at least one model's log-probs")
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"log-prob shapes differ: {shapes}; slice every model's logits to len(tokenizer) (slice_vocab) and "
            "use models that share one tokenizer"
        )
    mixed = mix_logprobs(logp_large, logp_tuned, logp_base, blend.coefficients)  # (..., V)
    if mixed is None:  # every weight 0: the uniform distribution
        mixed = torch.zeros_like(next(t for t in (logp_large, logp_tuned, logp_base) if t is not None))
    if blend.has_plausibility_limit:
        if logp_large is None:
            raise ValueError("the blend's plausibility limit needs logp_large")
        mixed = mixed.masked_fill(~plausible_mask(logp_large, blend), float("-inf"))
    return torch.log_softmax(mixed, dim=-1)


def mix_logprobs(
    logp_large: torch.Tensor | None,
    logp_tuned: torch.Tensor | None,
    logp_base: torch.Tensor | None,
    coefficients: Sequence[float],
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The blend before it is normalised, m = c_L * lp_L + c_tuned * lp_tuned + c_base * lp_base, computed as

        m = c_L * lp_L + c_tuned * (lp_tuned - lp_base) + (c_tuned + c_base) * lp_base

    (inputs of one shape, (..., V); the result has it too; None when every coefficient is 0). The order matters in
    floating point: summed term by term, a delta that is zero in exact arithmetic (S_tuned == S) comes out as +-1 ulp
    of lp_S, and a near-tie in L's row then flips on one CPU and not on another. Taking the small pair's difference
    first makes a zero delta exactly zero, and the last term vanishes for every alpha-blend (c_base = -c_tuned), so
    steering with S_tuned == S gives L's log-probs bit for bit. Every path that blends (decoding, speculative
    decoding, scoring, --tune's cached rows) comes through here. A zero term is skipped, so that its model need not
    run and a -inf in its log-probs cannot turn into NaN (0 * -inf). `out`: a buffer of the result's shape to write
    into.
    """
    c_large, c_tuned, c_base = (float(c) for c in coefficients)
    for name, c, logp in (("logp_large", c_large, logp_large), ("logp_tuned", c_tuned, logp_tuned),
                          ("logp_base", c_base, logp_base)):
        if c != 0 and logp is None:
            raise ValueError(f"{name} is None but its coefficient in the blend is {c}")
    if c_tuned != 0 and c_base != 0:  # the small pair's difference first (see above)
        terms = [(c_large, logp_large), (c_tuned, logp_tuned - logp_base), (c_tuned + c_base, logp_base)]
    else:
        terms = [(c_large, logp_large), (c_tuned, logp_tuned), (c_base, logp_base)]
    mixed = None
    for c, logp in terms:
        if c == 0:
            continue
        if mixed is None:
            mixed = c * logp if out is None else torch.mul(logp, c, out=out)
        else:
            mixed.add_(logp, alpha=c)
    return mixed


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) left-padded mask -> (B, T) position ids counting real tokens only, 0 on padding (as generate() does);
    without this a left-padded row would start at position = number of pads and differ from the same row alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(seqs: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`left_pad([[5, 6], [7]], 1)` -> ids [[5, 6], [1, 7]], mask [[1, 1], [0, 1]]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


@torch.no_grad()
def prefill_rows(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_cache_len: int):
    """A StaticCache holding a LEFT-padded batch's prompts minus each row's last token, computed one row at a time.

    On CPU a batched prompt pass is slower than the same rows one at a time: padding is computed too, attention
    grows with the square of the padded width, and big activations spill the CPU caches (bench/RESULTS.md,
    evaluation generation: the batched prompt pass took 1.8x the one-at-a-time time; this way, 1.0x). Each row's
    keys and values are placed right-aligned, where a batched pass would have put them; the padding columns stay
    zero (the attention mask hides them). The caller feeds the last column next: generate() slices its inputs to
    what the cache has not seen (cache.get_seq_length() == T - 1), and so does ModelStream.
    Writes transformers 5's StaticLayer fields directly (keys, values, cumulative_length); tests/test_steer.py
    checks the result against a batched pass, so a library change shows there.
    -> the cache, or None when there is nothing to prefill (T == 1).
    """
    from transformers import DynamicCache, StaticCache

    batch, width = input_ids.shape
    if width < 2:
        return None
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    for row in range(batch):
        prompt = input_ids[row, attention_mask[row].bool()][None, :-1]  # (1, t) the row's real tokens but the last
        if prompt.shape[1] == 0:
            continue
        # logits_to_keep=1: the output matrix sees one position (the logits are not used; the LM head is kept
        # in the call so that any wrapper, e.g. a PEFT model, runs as it would in generate()).
        out = model(input_ids=prompt, cache=DynamicCache(), use_cache=True, logits_to_keep=1)
        end, t = width - 1, prompt.shape[1]
        for layer, computed in zip(cache.layers, out.cache.layers):
            keys, values = computed.keys, computed.values  # (1, heads, t, head_dim) each
            if not layer.is_initialized:  # shapes, dtype and device as the model produced them
                layer.lazy_initialization(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1))
            layer.keys[row, :, end - t:end] = keys[0]
            layer.values[row, :, end - t:end] = values[0]
    if not cache.layers[0].is_initialized:
        return None
    for layer in cache.layers:
        layer.cumulative_length.fill_(width - 1)
    return cache


def prefill_separately(model, input_ids: torch.Tensor) -> bool:
    """Whether to build a batch's prompt cache one row at a time (prefill_rows): on CPU, for more than one row.
    A GPU runs a padded batch in parallel, so there the batched pass stays."""
    return input_ids.shape[0] > 1 and model.device.type == "cpu"


def model_context(models: dict[str, Any]) -> int:
    """The shortest context of the models (max_position_embeddings; 2048, Pythia's, where a config has none)."""
    return min(getattr(m.config, "max_position_embeddings", None) or 2048 for m in models.values())


class ModelStream:
    """One model's view of a batch being decoded: its KV cache, attention mask and positions, on its own device."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = True,
                 max_new_tokens: int | None = None):
        self.model, self.use_cache = model, use_cache
        self.mask = attention_mask.to(model.device)  # (B, T) grows by one column per step
        self.positions = positions_from_mask(self.mask)  # (B, T)
        self.ids = input_ids.to(model.device)  # (B, T) the whole sequence without a cache, else the tokens not yet seen
        self.cache = None
        if use_cache and max_new_tokens is not None:
            from transformers import StaticCache

            # Allocated once for prompt + new tokens (as evaluation.py's generate does): HF's default cache
            # concatenates every layer's keys and values at each step, a copy of the whole cache per step and
            # model (bench/bench_evaluation.py: up to 3x a batched CPU step with long prompts). Same outputs.
            max_cache_len = input_ids.shape[1] + max_new_tokens
            if prefill_separately(model, self.ids):
                self.cache = prefill_rows(model, self.ids, self.mask, max_cache_len)
                if self.cache is not None:
                    self.ids = self.ids[:, -1:]  # (B, 1) the only column the cache has not seen
            if self.cache is None:
                self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)

    def next_logprobs(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """Run the model on what it has not seen; -> (B, V) log-softmax of the last position, on `device`."""
        n_new = self.ids.shape[1]
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.positions[:, -n_new:],
            cache=self.cache,
            use_cache=self.use_cache,
            logits_to_keep=1,  # only the last position: skips the (T, V) output matrix of the prompt
        )
        if self.use_cache:
            self.cache = out.cache
        logits = slice_vocab(out.logits[:, -1, :], vocab_size)  # (B, V)
        return torch.log_softmax(logits.float(), dim=-1).to(device, non_blocking=True)

    def append(self, tokens: torch.Tensor) -> None:
        """Feed the step's tokens (B,): with a cache the model sees only them next time."""
        tokens = tokens.to(self.model.device)[:, None]  # (B, 1)
        self.ids = tokens if self.use_cache else torch.cat([self.ids, tokens], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)


class NgramBlocker:
    """no_repeat_ngram_size: ban a token that would complete an n-gram already in the row (prompt included,
    padding not). Kept incrementally, O(1) per row and step, instead of rescanning the sequence."""

    def __init__(self, n: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.n = n
        self.seqs = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())]
        self.seen: list[dict[tuple, set[int]]] = [{} for _ in self.seqs]
        for row, seq in enumerate(self.seqs):
            for end in range(n, len(seq) + 1):
                self._add(row, seq[end - n:end])

    def _add(self, row: int, gram: list[int]) -> None:
        self.seen[row].setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def ban(self, scores: torch.Tensor, active: list[int]) -> torch.Tensor:
        """(B, V) scores -> the same with banned tokens at -inf (rows in `active` only)."""
        rows, cols = [], []
        for row in active:
            prefix = tuple(self.seqs[row][len(self.seqs[row]) - self.n + 1:]) if self.n > 1 else ()
            banned = self.seen[row].get(prefix, ())
            rows += [row] * len(banned)
            cols += list(banned)
        if rows:
            scores[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = float("-inf")
        return scores

    def append(self, tokens: list[int], active: list[int]) -> None:
        for row in active:
            self.seqs[row].append(tokens[row])
            if len(self.seqs[row]) >= self.n:
                self._add(row, self.seqs[row][-self.n:])


def process_scores(logp: torch.Tensor, seen: torch.Tensor | None = None, repetition_penalty: float = 1.0,
                   blocker: NgramBlocker | None = None, active: list[int] | None = None) -> torch.Tensor:
    """(B, V) blended log-probs -> (B, V) the scores a token is picked from: repetition penalty on the tokens
    `seen` (B, V) marks, then the n-gram ban for the rows in `active`. One step's processing, shared by
    steered_generate and speculative.py (which runs it at every drafted position).

    On log-probs (all <= 0) multiplying by the penalty always lowers the token; on raw logits, as in HF's
    processor, the sign decides, and a negative logit would be pushed the wrong way.
    """
    scores = logp
    if seen is not None and repetition_penalty != 1.0:
        scores = torch.where(seen, scores * repetition_penalty, scores)
    if blocker is not None:
        scores = blocker.ban(scores.clone(), active if active is not None else list(range(scores.shape[0])))
    return scores


def warp_scores(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(B, V) processed scores -> (B, V) log-probs of the sampling distribution (temperature, then nucleus), not
    renormalised after the nucleus cut (torch.multinomial normalises). `warp_scores(log([.5, .3, .2]), 1, .6)`
    -> log([.5, .3, 0])."""
    scores = torch.log_softmax(scores / temperature, dim=-1)
    if top_p < 1:
        scores = scores.masked_fill(~nucleus_mask(scores, top_p), float("-inf"))
    return scores


def check_decoding_args(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float,
                        no_repeat_ngram_size: int) -> None:
    raise_problems(decoding_problems(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          repetition_penalty=repetition_penalty,
                                          no_repeat_ngram_size=no_repeat_ngram_size)))


def models_to_run(large, small_base, small_tuned, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  blend: Blend, max_new_tokens: int, with_small_tuned: bool = False) -> dict[str, Any]:
    """The checks every steered decoder makes of its inputs -> {role: model} for the models the blend needs (a
    zero coefficient's model does not run; `with_small_tuned`: S_tuned runs anyway, as speculative.py's draft).
    Raises on a batch that is not (B, T) and LEFT-padded, a needed model that is None, or prompt + max_new_tokens
    past the models' context."""
    if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must both be (batch, length)")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("every row must end with a real token: pad prompts on the LEFT (tokenizer.padding_side='left')")
    c_large, c_tuned, c_base = blend.coefficients
    roles = {LARGE: (large, c_large != 0 or blend.has_plausibility_limit),
             SMALL_TUNED: (small_tuned, c_tuned != 0 or with_small_tuned), SMALL_BASE: (small_base, c_base != 0)}
    missing = [role for role, (model, needed) in roles.items() if needed and model is None]
    if missing:
        raise ValueError(f"the blend ({blend.describe()}) needs the {', '.join(missing)} model, which is None")
    needed = {role: model for role, (model, run) in roles.items() if run}
    context = model_context(needed)
    longest = int(attention_mask.sum(-1).max())
    if longest + max_new_tokens > context:
        raise UsageError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the models' "
                         f"context ({context} tokens); shorten the prompt or lower max_new_tokens")
    return needed


@torch.inference_mode()
def steered_generate(
    large,
    small_base,
    small_tuned,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    blend: Blend,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    vocab_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_logprobs: bool = False,
):
    """Decode from the blend of three models, each with its own KV cache.

    input_ids / attention_mask: (B, T), LEFT-padded, so that every row's next token sits in the last column.
    Returns (new_tokens (B, N) with N <= max_new_tokens, pad_token_id after a row's EOS; ended_with_eos (B,)),
    plus (B, N, V) blended log-probs (before repetition penalties / sampling warps) if `return_logprobs`.
    A model whose coefficient in the blend is 0 is not run at all. The arithmetic happens on large's device;
    `use_cache=False` recomputes every prefix (for tests: it must give the same result).
    """
    check_decoding_args(max_new_tokens, temperature, top_p, repetition_penalty, no_repeat_ngram_size)
    needed = models_to_run(large, small_base, small_tuned, input_ids, attention_mask, blend, max_new_tokens)
    device = large.device
    streams = {role: ModelStream(model, input_ids, attention_mask, use_cache, max_new_tokens)
               for role, model in needed.items()}

    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    batch = input_ids.shape[0]
    new_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ended_with_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    history = []
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, vocab_size, device=device)  # (B, V) > 0 where the row already holds the token
        seen.scatter_add_(1, input_ids, attention_mask.float())
        seen = seen > 0
    blocker = NgramBlocker(no_repeat_ngram_size, input_ids, attention_mask) if no_repeat_ngram_size else None

    n_steps = 0
    for step in range(max_new_tokens):
        logps = {role: stream.next_logprobs(vocab_size, device) for role, stream in streams.items()}  # each (B, V)
        logp = blend_logprobs(logps.get(LARGE), logps.get(SMALL_TUNED), logps.get(SMALL_BASE), blend)  # (B, V)
        if return_logprobs:
            history.append(logp)
        active = (~finished).nonzero().flatten().tolist() if blocker is not None else None
        scores = process_scores(logp, seen, repetition_penalty, blocker, active)  # shared with speculative.py
        if do_sample:
            scores = warp_scores(scores, temperature, top_p)
            next_tokens = torch.multinomial(scores.exp(), 1, generator=generator)[:, 0]  # (B,)
        else:
            next_tokens = scores.argmax(dim=-1)  # (B,)
        next_tokens = next_tokens.masked_fill(finished, pad_token_id)
        new_tokens[:, step] = next_tokens
        n_steps = step + 1
        just_ended = ~finished & (next_tokens == eos_token_id)
        ended_with_eos |= just_ended
        finished |= just_ended
        if seen is not None:
            seen[torch.arange(batch, device=device), next_tokens] = True
        if blocker is not None:
            blocker.append(next_tokens.tolist(), active)
        if bool(finished.all()):
            break
        if step + 1 < max_new_tokens:
            for stream in streams.values():
                stream.append(next_tokens)
    new_tokens = new_tokens[:, :n_steps]
    if return_logprobs:
        return new_tokens, ended_with_eos, torch.stack(history, dim=1)  # (B, N, V)
    return new_tokens, ended_with_eos


# ---------------------------------------------------------------------------------------------
# Scoring (teacher forcing): the metric the blend is tuned on
# ---------------------------------------------------------------------------------------------
@torch.inference_mode()
def score_targets(
    models: dict[str, Any],
    prompt_ids: list[list[int]],
    target_ids: list[list[int]],
    *,
    vocab_size: int,
    batch_size: int = 8,
    blend: Blend | None = None,
    keep_logprobs: Collection[str] = (),
    cache_device: str | torch.device | None = None,
    cache_dtype: torch.dtype = torch.float32,
    pad_token_id: int = 0,
    show_progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Teacher-forced NLL of each target given its prompt, one forward pass per model and batch.

    Returns, for N examples:
      result[name]     (N,) float64: summed NLL of the target tokens under models[name] (log-softmax over the
                       sliced vocabulary), for every name in `models`;
      result["blend"]  (N,) the same under `blend` (needs models 'large', 'small_tuned', 'small_base');
      result["n_tokens"] (N,) long: target lengths, so ppl = exp(result[name].sum() / result["n_tokens"].sum());
    and for the models named in `keep_logprobs`, the rows blend_nll needs to re-score any blend without a model:
      result[f"logprobs/{name}"] (R, V) log-softmax rows at the R target positions (cache_dtype, cache_device),
      result["targets"] (R,), result["example_index"] (R,).
    """
    n = len(prompt_ids)
    if len(target_ids) != n or n == 0:
        raise ValueError(f"need as many targets as prompts, at least one: got {n} prompts and {len(target_ids)} targets")
    context = model_context(models)
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        if not p or not t:
            raise ValueError(f"example {i}: the prompt ({len(p)} tokens) and the target ({len(t)}) must not be empty")
        if len(p) + len(t) > context:
            raise ValueError(f"example {i}: prompt + target = {len(p)} + {len(t)} tokens exceeds the context ({context})")
    if blend is not None and not {LARGE, SMALL_TUNED, SMALL_BASE} <= set(models):
        raise ValueError(f"scoring a blend needs models {LARGE}, {SMALL_TUNED}, {SMALL_BASE}; got {sorted(models)}")
    cache_device = torch.device(cache_device or next(iter(models.values())).device)

    result = {name: torch.zeros(n, dtype=torch.float64) for name in [*models, *(["blend"] if blend else [])]}
    result["n_tokens"] = torch.tensor([len(t) for t in target_ids], dtype=torch.long)
    rows = {name: [] for name in keep_logprobs}
    row_targets, row_examples = [], []
    # Longest first, so batches hold similar lengths and the first batch shows whether memory suffices.
    order = sorted(range(n), key=lambda i: -(len(prompt_ids[i]) + len(target_ids[i])))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    for idx in tqdm(batches, desc="scoring", unit="batch", disable=not show_progress):
        # Left padding puts every target at the right edge, so only the last (t_max + 1) positions need logits.
        ids, mask = left_pad([prompt_ids[i] + target_ids[i] for i in idx], pad_token_id)  # (B, L)
        positions = positions_from_mask(mask)
        t_len = torch.tensor([len(target_ids[i]) for i in idx])
        t_max = int(t_len.max())
        targets = ids[:, -t_max:].to(cache_device)  # (B, t_max) right-aligned target tokens
        valid = (torch.arange(t_max) >= t_max - t_len[:, None]).to(cache_device)  # (B, t_max) False left of a target
        logps = {}
        for name, model in models.items():
            dev = model.device
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                           use_cache=False, logits_to_keep=t_max + 1).logits  # (B, t_max + 1, V_model)
            # position j predicts token j + 1: drop the last position, which predicts past the target
            logp = torch.log_softmax(slice_vocab(logits[:, :-1], vocab_size).float(), dim=-1).to(cache_device)
            logps[name] = logp  # (B, t_max, V)
        if blend is not None:
            logps["blend"] = blend_logprobs(logps[LARGE], logps[SMALL_TUNED], logps[SMALL_BASE], blend)
        for name, logp in logps.items():
            nll = -logp.gather(-1, targets[..., None])[..., 0]  # (B, t_max)
            result[name][idx] = torch.where(valid, nll, 0.0).sum(-1).double().cpu()
            if name in rows:
                rows[name].append(logp[valid].to(cache_dtype))  # (r, V)
        if rows:
            row_targets.append(targets[valid])
            row_examples.append(torch.tensor(idx, device=cache_device)[:, None].expand_as(valid)[valid])
    if rows:
        for name, chunks in rows.items():
            result[f"logprobs/{name}"] = torch.cat(chunks)
        result["targets"] = torch.cat(row_targets)
        result["example_index"] = torch.cat(row_examples)
    return result


def blend_nll(cached: dict[str, torch.Tensor], blend: Blend, chunk_rows: int = 32) -> torch.Tensor:
    """Per-example summed NLL (N,) float64 of `blend`, from score_targets(..., keep_logprobs=(large, small_tuned,
    small_base)) rows: no model runs, so a tuning trial costs only this arithmetic.

    Each row's NLL is log Z - m(y), with m = c_L * lp_L + c_tuned * lp_tuned + c_base * lp_base (blend_logprobs before
    its log_softmax) and log Z = logsumexp of m over the full vocabulary. m(y) needs the R target entries only; log Z
    is the one full-vocabulary pass, done in chunks of rows into one reused buffer, with no normalised (R, V) blend
    and no log_softmax (at the lab's size 2.2x faster per trial than blend_nll_masked). A blend with a plausibility
    limit takes blend_nll_masked's path: its mask needs L's whole row.
    """
    if blend.has_plausibility_limit:
        return blend_nll_masked(cached, blend, chunk_rows)
    targets, examples = cached["targets"], cached["example_index"]  # (R,)
    roles = (LARGE, SMALL_TUNED, SMALL_BASE)
    rows = [cached[f"logprobs/{role}"] if c != 0 else None for role, c in zip(roles, blend.coefficients)]  # (R, V)
    n_rows = targets.shape[0]
    at_target = [r.gather(1, targets[:, None])[:, 0].double() if r is not None else None for r in rows]  # each (R,)
    target_score = mix_logprobs(*at_target, blend.coefficients)  # (R,) m(y), float64
    if target_score is None:  # every weight 0: uniform over the vocabulary
        target_score = torch.zeros(n_rows, dtype=torch.float64, device=targets.device)
        log_z = torch.full((n_rows,), math.log(cached[f"logprobs/{LARGE}"].shape[1]), dtype=torch.float64)
    else:
        width = next(r for r in rows if r is not None).shape[1]
        log_z = torch.empty(n_rows, dtype=torch.float64, device=targets.device)  # (R,)
        mixed = torch.empty(min(chunk_rows, n_rows), width, device=targets.device)  # (r, V) reused
        for start in range(0, n_rows, chunk_rows):
            end = min(start + chunk_rows, n_rows)
            chunk = [r[start:end].float() if r is not None else None for r in rows]  # each (r, V)
            log_z[start:end] = torch.logsumexp(mix_logprobs(*chunk, blend.coefficients, out=mixed[:end - start]), -1)
    out = torch.zeros(cached["n_tokens"].shape[0], dtype=torch.float64, device=targets.device)
    return out.index_add_(0, examples, log_z - target_score).cpu()


def blend_nll_masked(cached: dict[str, torch.Tensor], blend: Blend, chunk_rows: int = 32) -> torch.Tensor:
    """blend_nll through blend_logprobs itself: the normalised (r, V) blend per chunk of rows, then the target's entry."""
    targets, examples = cached["targets"], cached["example_index"]  # (R,)
    out = torch.zeros(cached["n_tokens"].shape[0], dtype=torch.float64, device=targets.device)
    needed = dict(zip((LARGE, SMALL_TUNED, SMALL_BASE), blend.coefficients))
    needed[LARGE] = needed[LARGE] or blend.has_plausibility_limit
    for start in range(0, targets.shape[0], chunk_rows):
        end = start + chunk_rows
        logps = [cached[f"logprobs/{role}"][start:end].float() if needed[role] else None
                 for role in (LARGE, SMALL_TUNED, SMALL_BASE)]  # each (r, V) or None
        logp = blend_logprobs(*logps, blend)  # (r, V)
        nll = -logp.gather(-1, targets[start:end, None])[:, 0]  # (r,)
        out.index_add_(0, examples[start:end], nll.double())
    return out.cpu()


def blend_nll_derivatives(cached: dict[str, torch.Tensor], coefficients: Sequence[float],
                          chunk_rows: int = 32) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Per-token NLL of the blend with c = (c_L, c_tuned, c_base) (Blend.coefficients, no plausibility limit) on
    cached rows, with its gradient (3,) and Hessian (3, 3) in c, all float64.

    With x_r(v) = (lp_L, lp_tuned, lp_base)[r, v] and p_r the blend's distribution at row r,
        NLL(c) = mean_r [log Z_r(c) - c . x_r(y_r)],  gradient = mean_r [E_p[x_r] - x_r(y_r)],  Hessian = mean_r Cov_p[x_r].
    A covariance is positive semi-definite: the NLL is convex in c, so Newton's method finds its minimum. Costs about
    2.5 blend_nll passes (one softmax, then the first and second moments of x under it as batched products).
    Log-softmax rows of finite logits are finite; a -inf in the cache would give NaN here (0 * -inf).
    """
    rows = [cached[f"logprobs/{role}"] for role in (LARGE, SMALL_TUNED, SMALL_BASE)]  # each (R, V)
    targets = cached["targets"]
    c = torch.tensor(list(coefficients), dtype=torch.float64)
    x_target = torch.stack([r.gather(1, targets[:, None])[:, 0] for r in rows], dim=1).double().cpu()  # (R, 3)
    value, grad, hess = -(x_target @ c).sum(), -x_target.sum(0), torch.zeros(3, 3, dtype=torch.float64)
    for start in range(0, targets.shape[0], chunk_rows):
        x = torch.stack([r[start:start + chunk_rows].float() for r in rows], dim=1)  # (r, 3, V)
        m = mix_logprobs(*x.unbind(1), coefficients)  # (r, V) the blend before normalising
        m = torch.zeros_like(x[:, 0]) if m is None else m  # every coefficient 0: uniform
        log_z = torch.logsumexp(m, dim=-1)  # (r,)
        p = m.sub_(log_z[:, None]).exp_()  # (r, V) the blend's distribution
        mean = torch.bmm(x, p[:, :, None])[..., 0]  # (r, 3) E_p[x]
        second = torch.bmm(x * p[:, None, :], x.transpose(1, 2))  # (r, 3, 3) E_p[x x^T]
        value += log_z.double().sum().cpu()
        grad += mean.double().sum(0).cpu()
        hess += (second - mean[:, :, None] * mean[:, None, :]).double().sum(0).cpu()
    n = targets.shape[0]
    return float(value) / n, grad / n, hess / n


def per_token_nll(nll: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """Corpus-level NLL per token (the log of the perplexity) from per-example sums and counts."""
    return float(nll.sum() / n_tokens.sum())


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def check_model_path(name_or_path: str, flag: str) -> None:
    """A path that cannot be a Hub id ('org/name') and does not exist is a typo: say so before loading anything."""
    if is_missing_local_path(name_or_path):
        raise UsageError(f"--{flag} {name_or_path} does not exist; pass a Hub id (e.g. EleutherAI/pythia-70m) or a "
                         "directory written by fine_tune.py / save_pretrained")


def resolve_model_args(args: ModelArguments, blend_file: str | None = None) -> ModelArguments:
    """Fill the model flags left out: from the models the --blend file records, else DEFAULT_MODELS (fill_models)."""
    filled = fill_models({role: getattr(args, f"{role}_model") for role in MODEL_ROLES}, blend_file, DEFAULT_MODELS)
    return dataclasses.replace(args, **{f"{role}_model": model for role, model in filled.items()})


def fill_models(given: dict[str, str | None], blend_file: str | None, defaults: dict[str, str]) -> dict[str, str]:
    """{role: model} for the roles of `given` left out (None): the model the blend file records (blend_models),
    else `defaults`. Used by steer.py and evaluation.py.

    A flag given explicitly wins; when it names another model than the record, or the Hub cache now holds another
    revision of a recorded Hub model, that is logged as a warning (the blend was tuned for the recorded models).
    """
    record = blend_models(blend_file) if blend_file else {}
    filled, sources = {}, []
    for role, flag in given.items():
        entry = record.get(role)
        if flag is not None and entry and not same_model(flag, recorded_model(entry)):
            logger.warning("--%s_model %s is not %s, which the blend %s was tuned with; using %s", role, flag,
                           entry["name_or_path"], blend_file, flag)
        elif flag is None and entry:
            filled[role] = recorded_model(entry)
            sources.append(f"{role}={filled[role]} (from {blend_file})")
        elif flag is None and role in defaults:
            filled[role] = defaults[role]
            sources.append(f"{role}={defaults[role]} (default)")
        name = filled.get(role, flag)
        if entry and entry.get("revision") and same_model(name, recorded_model(entry)):
            now = hub_revision(name)
            if now and now != entry["revision"]:
                logger.warning("%s: the Hub cache holds revision %s of %s, the blend %s was tuned with revision %s",
                               role, now, name, blend_file, entry["revision"])
    if sources:
        logger.info("models not given as flags: %s", ", ".join(sources))
    return filled


def model_records(args: ModelArguments) -> dict[str, dict]:
    """blend.json's record of the models a blend was tuned with: role -> model_record."""
    return {role: model_record(getattr(args, f"{role}_model")) for role in MODEL_ROLES
            if getattr(args, f"{role}_model") is not None}


def load_models(args: ModelArguments, with_large_tuned: bool = False) -> tuple[dict[str, Any], Any]:
    """Load the models once, each on its own device/dtype, and refuse a set that does not share one tokenizer."""
    paths = {LARGE: args.large_model, SMALL_BASE: args.small_base_model, SMALL_TUNED: args.small_tuned_model}
    if with_large_tuned and args.large_tuned_model:
        paths[LARGE_TUNED] = args.large_tuned_model
    for role, path in paths.items():
        check_model_path(path, f"{role}_model")
    tokenizers = {}
    for role, path in paths.items():
        try:
            tokenizers[f"--{role}_model {path}"] = load_tokenizer(path, args.trust_remote_code, padding_side="left",
                                                                  flag=f"--{role}_model")
        except UsageError as err:
            raise UsageError(f"--{role}_model {path}: {err}; steering checks that all models share one tokenizer, "
                             "so keep the tokenizer beside every model (fine_tune.py saves it)") from None
    check_same_vocab(tokenizers)
    tokenizer = next(iter(tokenizers.values()))
    # Reviews are measured whole before build_prompt cuts them; silence "longer than the model" warnings.
    tokenizer.model_max_length = int(1e30)
    vocab_size = vocab_size_of(tokenizer)
    large_device = args.large_device
    models, loaded = {}, {}
    for role, path in paths.items():
        key = (path, getattr(args, f"{role}_device") or large_device, getattr(args, f"{role}_dtype"),
               args.quantization_of(role))
        if key not in loaded:  # a path given for two roles (same device, dtype, quantisation) loads once
            loaded[key] = load_causal_lm(path, dtype=key[2], device=key[1], trust_remote_code=args.trust_remote_code,
                                         flag=f"--{role}_model", quantize=key[3], quantize_prefix=f"--{role}_")
        models[role] = loaded[key]
        large_device = large_device or str(models[LARGE].device)
        width = models[role].get_output_embeddings().weight.shape[0]
        if width < vocab_size:
            raise UsageError(f"--{role}_model {path} has {width} output rows but the tokenizer has {vocab_size} "
                             "tokens; steering needs models that share one vocabulary")
        logger.info("%s: %s (%.0fM parameters, %s, %s%s)", role, path, models[role].num_parameters() / 1e6,
                    models[role].device, models[role].dtype, f", {key[3]}-bit weights" if key[3] else "")
    return models, tokenizer


def reviews_of(value: Any) -> list[str]:
    """A row's reviews, cleaned as processing_meta_review.py cleans them (MReD <sep> markers become line breaks)."""
    return [r for r in (clean_text(r, "whitespace") for r in extract_reviews(value, None)) if r]


def read_prompt_texts(args: SteerArguments) -> list[tuple[Any, dict]]:
    """-> [(reviews value, source row)] from --prompt or --prompts_file."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise UsageError("--prompt is empty; pass the reviews text to steer on")
        return [(args.prompt, {})]
    if args.prompts_file is None:
        raise UsageError("nothing to generate from: pass --prompt TEXT or --prompts_file FILE (or --tune)")
    path = Path(args.prompts_file)
    if not path.is_file():
        raise UsageError(f"--prompts_file {path} does not exist")
    text = read_data_text(path, "--prompts_file")
    kind, _ = split_compression(path)  # 'x.jsonl.gz' -> '.jsonl'
    if kind not in (".jsonl", ".json"):
        items = [(line, {}) for line in text.splitlines() if line.strip()]
    else:
        try:
            rows = json.loads(text) if kind == ".json" else [json.loads(line) for line in text.splitlines()
                                                             if line.strip()]
        except json.JSONDecodeError as err:
            raise UsageError(f"--prompts_file {path} is not valid {kind[1:].upper()}: {err}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) and args.input_column in r for r in rows):
            raise UsageError(f"--prompts_file {path}: every record needs an '{args.input_column}' column; "
                             "set --input_column")
        items = [(row[args.input_column], row) for row in rows]
    if not items:
        raise UsageError(f"--prompts_file {path} holds no prompts")
    return items


def build_prompts(items: list[tuple[Any, dict]], tokenizer, budget: int, use_template: bool) -> list[str]:
    """Reviews -> prompt texts of at most `budget` tokens (reviews cut fairly, as in training)."""
    prompts, n_truncated = [], 0
    for i, (value, _) in enumerate(items):
        if use_template:
            reviews = reviews_of(value)
            if not reviews:
                raise UsageError(f"prompt {i} has no review text; every prompt needs the reviews to summarise")
            prompt, truncated = build_prompt(reviews, tokenizer, budget)
            n_truncated += truncated
        else:
            prompt = value if isinstance(value, str) else "\n\n".join(map(str, value))
            if not prompt.strip():
                raise UsageError(f"prompt {i} is empty")
            n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n > budget:
                raise UsageError(f"prompt {i} has {n} tokens but the context leaves {budget} after --max_new_tokens; "
                                 "shorten it, lower --max_new_tokens, or use the template (which cuts reviews)")
        prompts.append(prompt)
    if n_truncated:
        logger.info("%d of %d prompts had their reviews cut to fit %d tokens", n_truncated, len(prompts), budget)
    return prompts


def resolve_blend(args: SteerArguments) -> Blend:
    blend = Blend.load(args.blend) if args.blend else Blend.from_alpha(1.0 if args.alpha is None else args.alpha)
    if args.plausibility_top_p is not None:
        blend = dataclasses.replace(blend, plausibility_top_p=args.plausibility_top_p)
    return blend


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def generate_texts(models: dict[str, Any], tokenizer, prompts: list[str], blend: Blend, args: SteerArguments,
                   desc: str = "generating") -> list[dict]:
    """Decode every prompt in batches (longest first, so rows of a batch have similar lengths)."""
    from speculative import decode_steered  # imported here: speculative.py imports this module

    large = models[LARGE]
    generator = torch.Generator(device=large.device).manual_seed(args.seed)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results: list[dict] = [{} for _ in prompts]
    for start in tqdm(range(0, len(order), args.batch_size), desc=desc, unit="batch"):
        idx = order[start:start + args.batch_size]
        ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
        tokens, ended = decode_steered(
            large, models[SMALL_BASE], models[SMALL_TUNED], ids.to(large.device), mask.to(large.device), blend,
            max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size_of(tokenizer), do_sample=args.do_sample,
            temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size, generator=generator,
            speculative=args.speculative, draft_tokens=args.draft_tokens or None)
        for row, i in enumerate(idx):
            row_tokens = tokens[row].tolist()
            if ended[row]:
                row_tokens = row_tokens[:row_tokens.index(tokenizer.eos_token_id)]
            results[i] = {"generation": tokenizer.decode(row_tokens, skip_special_tokens=True).strip(),
                          "ended_with_eos": bool(ended[row]), "n_new_tokens": len(row_tokens),
                          "n_prompt_tokens": len(encoded[i])}
    return results


def write_generations(items, prompts, results, blend, config: dict, output_dir: str | None, overwrite: bool) -> None:
    rows = []
    for (value, source), prompt, result in zip(items, prompts, results):
        row = {"prompt": prompt, **result}
        if "Output" in source:
            row["reference"] = source["Output"]
        rows.append(row)
    if output_dir is None:
        for i, row in enumerate(rows):
            print(f"=== {i}: {row['n_prompt_tokens']} prompt tokens, {row['n_new_tokens']} new"
                  f"{', ended with EOS' if row['ended_with_eos'] else ''}\n{row['generation']}\n")
        return
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        with open(tmp / "generations.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_json(tmp / "config.json", {**config, "resolved_blend": blend.to_dict(), "system": describe_blend(blend)})
    logger.info("wrote %d generations to %s", len(rows), Path(output_dir) / "generations.jsonl")


# ---------------------------------------------------------------------------------------------
# Tuning
# ---------------------------------------------------------------------------------------------
def load_validation_examples(args: TuneArguments, tokenizer, context: int, seed: int) -> list[dict]:
    """Validation examples drawn with `seed`, each {prompt_ids, target_ids, reviews, reference}.

    The ids (for scoring) come from processing_meta_review.py's saved dataset (its input_ids / prompt_length, so the
    tokens are exactly those fine-tuning saw) or from a raw Input/Output JSONL, prompted with the same code; targets
    are cut to --max_target_tokens, prompts to fit the context. `reviews` and `reference` (the meta-review text) are
    what the generation stage prompts with and scores against; None where a saved dataset lacks those columns.
    """
    path = Path(args.validation_data)
    if not path.exists():
        raise UsageError(f"--validation_data {path} does not exist; pass processing_meta_review.py's output_dir "
                         "or a JSONL with Input/Output columns")
    if path.is_dir():
        data = load_saved_split(path, args.validation_split, "--validation_data", "--validation_split")
        missing = {"input_ids", "prompt_length"} - set(data.column_names)
        if missing:
            raise UsageError(f"--validation_data {path} lacks columns {sorted(missing)}; run processing_meta_review.py")
        text_columns = [c for c in ("reviews", "Output") if c in data.column_names]
        rows = list(data.select_columns(["input_ids", "prompt_length", *text_columns]))
    else:
        rows = []
        for number, line in enumerate(read_data_text(path, "--validation_data").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"--validation_data {path} line {number} is not JSON: {err}") from None
            if not isinstance(row, dict) or "Input" not in row or "Output" not in row:
                raise UsageError(f"--validation_data {path} line {number} needs Input and Output columns")
            rows.append(row)
    if not rows:
        raise UsageError(f"--validation_data {path} holds no examples")
    import random

    picked = sorted(random.Random(seed).sample(range(len(rows)), min(args.n_examples, len(rows))))
    examples, n_cut = [], 0
    for i in picked:
        row = rows[i]
        if "input_ids" not in row:
            meta = clean_text(row["Output"], "whitespace") if isinstance(row["Output"], str) else ""
            reviews = reviews_of(row["Input"])
            if not meta or not reviews:
                continue
            tokenized = tokenize_example({"reviews": reviews, "Output": meta}, tokenizer, context)
            if tokenized is None:  # the meta-review alone fills the context
                continue
            row = {**tokenized, "reviews": reviews, "Output": meta}
        ids, n_prompt = list(row["input_ids"]), int(row["prompt_length"])
        prompt, target = ids[:n_prompt], ids[n_prompt:][:args.max_target_tokens]
        if len(prompt) + len(target) > context:
            prompt, n_cut = prompt[len(prompt) + len(target) - context:], n_cut + 1
        if prompt and target:
            examples.append({"prompt_ids": prompt, "target_ids": target, "reviews": row.get("reviews"),
                             "reference": row.get("Output")})
    if n_cut:
        logger.warning("%d prompts were longer than the context (%d) and lost their first tokens", n_cut, context)
    if not examples:
        raise UsageError(f"--validation_data {path}: no usable example (empty reviews or meta-reviews)")
    return examples


# The one-parameter searches: name -> (the blend at x, the range of x, search log x, the x tried first). The NLL is
# convex in the blend's coefficients (log Z is a log-partition function of them and the target's term is linear), so
# along alpha, or a temperature (the inverse of a coefficient), it has a single minimum, which golden-section search
# finds in ~20 evaluations (TPE spent 100). Each search tries its plain points first (T = 1; alpha = 0 and 1), so a
# tuned baseline is never worse than them.
LINE_SEARCHES = {
    "large, tuned temperature": (lambda t: Blend(1.0, 0.0, 0.0, large_temperature=t), TEMPERATURE_RANGE, True, [1.0]),
    "small_tuned, tuned temperature": (lambda t: Blend(0.0, 1.0, 0.0, small_temperature=t), TEMPERATURE_RANGE, True,
                                       [1.0]),
    "proxy-tuning, tuned alpha": (Blend.from_alpha, WEIGHT_RANGE, False, [0.0, 1.0]),
}
# The two- and three-parameter searches: name -> the coefficients (c_L, c_tuned, c_base) it may move, each within
# [lower, upper] (Blend.coefficients: c_base = -w_base). Newton's method (newton_search) runs after the line searches,
# from the best of their optima and the plain blends below. Temperatures are searched only for the single-model
# baselines: in a blend they are redundant with the weights (see Blend).
COEFFICIENT_BOUNDS = (WEIGHT_RANGE, WEIGHT_RANGE, (-BASE_WEIGHT_RANGE[1], -BASE_WEIGHT_RANGE[0]))
NEWTON_SEARCHES = {
    "large x small_tuned (no S term)": (COEFFICIENT_BOUNDS[0], COEFFICIENT_BOUNDS[1], (0.0, 0.0)),
    "free blend": COEFFICIENT_BOUNDS,
}
# The single models and plain proxy-tuning as blends.
PLAIN_BLENDS = [Blend(1.0, 0.0, 0.0), Blend(0.0, 1.0, 0.0), Blend(0.0, 0.0, -1.0), Blend.from_alpha(1.0)]


def from_coefficients(c: Sequence[float]) -> Blend:
    """The blend (temperatures 1) with coefficients c = (c_L, c_tuned, c_base): `from_coefficients((1, 2, -2))` is
    Blend.from_alpha(2)."""
    return Blend(float(c[0]), float(c[1]), -float(c[2]))


def cached_nll(cache: dict, blend: Blend) -> float:
    """Per-token NLL of `blend` on cached rows; inf where the blend is not finite (the search moves away)."""
    value = per_token_nll(blend_nll(cache, blend), cache["n_tokens"])
    return value if math.isfinite(value) else float("inf")


def line_search(objective, lo: float, hi: float, starts: Sequence[float] = (), log: bool = False,
                steps: int = GOLDEN_SECTION_STEPS) -> tuple[float, float, int]:
    """Minimise a function of one variable with a single minimum on [lo, hi] by golden-section search, trying
    `starts` too (searching log x when `log`). -> (best x, its value, evaluations).
    `line_search(lambda x: (x - 1) ** 2, 0.0, 3.0)[0]` -> 1.000 (within 3 * 0.618**18 = 0.0005)."""
    tried: dict[float, float] = {}

    def f(u: float) -> float:
        x = math.exp(u) if log else u
        tried[x] = objective(x)
        return tried[x]

    for x in dict.fromkeys(starts):
        f(math.log(x) if log else x)
    a, b = (math.log(lo), math.log(hi)) if log else (lo, hi)
    ratio = (math.sqrt(5) - 1) / 2  # 0.618: the kept point is where the next step needs one
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc <= fd:  # the minimum is in [a, d]
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    best = min(tried, key=tried.get)
    return best, tried[best], len(tried)


def newton_search(cache: dict, starts: Sequence[Blend], bounds: Sequence[tuple[float, float]],
                  max_steps: int) -> tuple[Blend, int]:
    """Minimise the (convex) per-token NLL over the coefficients c, each within its bounds (lower == upper fixes it),
    by Newton's method from the best of `starts`. A coefficient at a bound that the gradient pushes outward is held
    there for the step (projected Newton); each step is a backtracking line search, so the NLL never rises.
    Stops when the Newton decrement says the optimum is within 1e-9 nats per token, or after `max_steps` steps.
    -> (the best blend, NLL evaluations)."""
    lower, upper = (torch.tensor(b, dtype=torch.float64) for b in zip(*bounds))
    starts = [torch.tensor(b.coefficients, dtype=torch.float64).clamp(lower, upper) for b in starts]
    values = [cached_nll(cache, from_coefficients(c)) for c in starts]
    c = starts[min(range(len(starts)), key=values.__getitem__)]
    value, grad, hess = blend_nll_derivatives(cache, c)
    n_evals = len(starts) + 1
    for _ in range(max_steps):
        moving = (lower < upper) & ~((c <= lower) & (grad > 0)) & ~((c >= upper) & (grad < 0))
        if not moving.any():
            break
        step = torch.zeros(3, dtype=torch.float64)
        h = hess[moving][:, moving]
        step[moving] = -torch.linalg.solve(h + 1e-9 * torch.eye(len(h), dtype=torch.float64), grad[moving])
        decrement = float(-(grad @ step))  # predicted NLL decrease of the full step, times 2
        if decrement < 2e-9:
            break
        t, improved = 1.0, None
        while t >= 1e-3:
            trial = (c + t * step).clamp(lower, upper)
            trial_value = cached_nll(cache, from_coefficients(trial))
            n_evals += 1
            if trial_value < value - 1e-4 * t * decrement:
                improved = trial
                break
            t /= 2
        if improved is None:
            break
        c = improved
        value, grad, hess = blend_nll_derivatives(cache, c)
        n_evals += 1
    return from_coefficients(c), n_evals


def score_entry(caches: dict[str, dict], blend: Blend | None = None, model: str | None = None,
                n_trials: int = 0) -> dict:
    """A report entry: the blend (or a single model, by role) with its NLL and perplexity on each cached split."""
    entry: dict[str, Any] = {"blend": blend.to_dict() if blend else None, "n_trials": n_trials}
    if blend is not None:
        entry["system"] = describe_blend(blend)
    for part, cache in caches.items():
        nll = cache[model] if model else blend_nll(cache, blend)
        entry[f"{part}_nll"] = per_token_nll(nll, cache["n_tokens"])
        entry[f"{part}_ppl"] = math.exp(entry[f"{part}_nll"])
    return entry


def search_blends(caches: dict[str, dict], max_steps: int,
                  alphas: Sequence[float] = ()) -> tuple[dict[str, dict], dict[str, Blend]]:
    """Stage 1: every baseline's and the free blend's perplexity optimum on the tuning rows; the alpha search also
    tries `alphas` (the generation candidates), so the tuned alpha is never worse than any of them.
    -> (report entries by name, best blend by search name)."""
    best: dict[str, Blend] = {}
    entries: dict[str, dict] = {}
    for name, (make_blend, (lo, hi), log, starts) in LINE_SEARCHES.items():
        starts = [*starts, *alphas] if name == "proxy-tuning, tuned alpha" else starts
        x, _, n_evals = line_search(lambda v: cached_nll(caches["tune"], make_blend(v)), lo, hi, starts, log)
        best[name] = make_blend(x)
        entries[name] = score_entry(caches, best[name], n_trials=n_evals)
        logger.info("search: %s -> %s (%d evaluations)", name, best[name].describe(), n_evals)
    for name, bounds in NEWTON_SEARCHES.items():
        # Every plain blend and every earlier optimum is a start, and the search never rises from the best of them,
        # so its result is never worse on the tuning split than anything it is compared with (L_tuned aside).
        best[name], n_evals = newton_search(caches["tune"], [*PLAIN_BLENDS, *best.values()], bounds, max_steps)
        entries[name] = score_entry(caches, best[name], n_trials=n_evals)
        logger.info("search: %s -> %s (%d evaluations)", name, best[name].describe(), n_evals)
    return entries, best


def candidate_blends(best: dict[str, Blend], alphas: Sequence[float]) -> dict[str, Blend]:
    """What the generation stage decodes: proxy-tuning at alpha = 1 (the reference) and each of `alphas`, then the
    perplexity-best alpha and free blend. A blend whose coefficients all lie within 1e-3 of an earlier candidate's
    is decoded once, under the earlier name."""
    candidates = {f"proxy-tuning, alpha={a:g}": Blend.from_alpha(a) for a in dict.fromkeys([1.0, *alphas])}
    candidates |= {name: best[name] for name in ("proxy-tuning, tuned alpha", "free blend")}
    kept: dict[str, Blend] = {}
    for name, blend in candidates.items():
        same = [k for k, other in kept.items()
                if all(abs(x - y) <= 1e-3 for x, y in zip(blend.coefficients, other.coefficients))]
        if same:
            logger.info("candidate %s is %s's blend; decoded once", name, same[0])
        else:
            kept[name] = blend
    return kept


def decode_candidates(models: dict[str, Any], tokenizer, candidates: dict[str, Blend], examples: list[dict],
                      steer_args: SteerArguments) -> tuple[dict[str, list[float]], list[dict]]:
    """Stage 2: decode every candidate on `examples` (steer_args' decoding: greedy by default) and score each output
    by ROUGE-L F1 (x 100, stemmed: evaluation.py's scorer) against the meta-review.
    -> ({candidate: ROUGE-L per example}, one row per candidate and example: prompt, output, ROUGE-L, ...)."""
    from evaluation import make_rouge_scorer, score_rouge  # here: evaluation.py imports this module

    budget = model_context(models) - steer_args.max_new_tokens
    if budget < 1:
        raise UsageError(f"--max_new_tokens {steer_args.max_new_tokens} leaves no room for the prompt in the "
                         f"{model_context(models)}-token context; lower it")
    prompts = build_prompts([(ex["reviews"], {}) for ex in examples], tokenizer, budget, use_template=True)
    scorer = make_rouge_scorer()
    scores, rows = {}, []
    for i, (name, blend) in enumerate(candidates.items(), start=1):
        started = time.perf_counter()
        results = generate_texts(models, tokenizer, prompts, blend, steer_args,
                                 desc=f"candidate {i}/{len(candidates)}: {name}")
        scores[name] = [score_rouge(scorer, r["generation"], ex["reference"])["rougeL"]
                        for r, ex in zip(results, examples)]
        rows += [{"candidate": name, "example": j, "rougeL": score, "prompt": prompt, **r, "reference": ex["reference"]}
                 for j, (prompt, r, score, ex) in enumerate(zip(prompts, results, scores[name], examples))]
        logger.info("candidate %s (%s): ROUGE-L %.2f, EOS %.2f, %.1f s", name, describe_blend(blend),
                    sum(scores[name]) / len(results), sum(r["ended_with_eos"] for r in results) / len(results),
                    time.perf_counter() - started)
    return scores, rows


def generation_figures(scores: dict[str, list[float]], rows: list[dict], seed: int) -> dict[str, dict]:
    """Each candidate's mean ROUGE-L, EOS share and mean new tokens, and its ROUGE-L gain over the reference
    (REFERENCE_CANDIDATE) on the same papers with a paired bootstrap interval ([low, high]: the 5% and 95% points).
    `clearly_better`: low > 0, the bar a candidate must clear to replace the reference (see SELECTION_CONFIDENCE)."""
    reference = torch.tensor(scores[REFERENCE_CANDIDATE], dtype=torch.float64)  # (n,)
    n = reference.shape[0]
    resamples = torch.randint(n, (BOOTSTRAP_SAMPLES, n), generator=torch.Generator().manual_seed(seed))  # (B, n)
    figures = {}
    for name, values in scores.items():
        mine = [r for r in rows if r["candidate"] == name]
        diff = torch.tensor(values, dtype=torch.float64) - reference  # (n,) paired by paper
        means = diff[resamples].mean(dim=1)  # (B,)
        low, high = (float(q) for q in torch.quantile(means, torch.tensor(
            [1 - SELECTION_CONFIDENCE, SELECTION_CONFIDENCE], dtype=torch.float64)))
        figures[name] = {"rougeL": sum(values) / n, "gain": float(diff.mean()), "gain_low": low, "gain_high": high,
                         "clearly_better": name != REFERENCE_CANDIDATE and low > 0,
                         "eos_rate": sum(r["ended_with_eos"] for r in mine) / n,
                         "new_tokens": sum(r["n_new_tokens"] for r in mine) / n, "n_examples": n}
    return figures


def choose_by_generation(entries: dict[str, dict]) -> str:
    """The reference (plain proxy-tuning) unless some candidate generates clearly better (generation_figures); then,
    of those, the best mean ROUGE-L, and on a tie the lower tuning perplexity.
    `choose_by_generation({"proxy-tuning, alpha=1": {...}, "b": {"generation": {"clearly_better": True, ...}}})` -> 'b'."""
    better = [name for name, e in entries.items() if e["generation"]["clearly_better"]]
    if not better:
        return REFERENCE_CANDIDATE
    return min(better, key=lambda name: (-round(entries[name]["generation"]["rougeL"], 9), entries[name]["tune_nll"]))


def warn_if_not_steering(name: str, blend: Blend) -> str | None:
    """Log (and return) a warning when a tuned blend is not L steered by the small pair (describe_blend)."""
    if is_steering(blend):
        return None
    message = (f"the {name} is not steering: it is {describe_blend(blend)} ({blend.describe()}); "
               f"a weight under {NEGLIGIBLE_SHARE:.0%} of the largest counts as 0")
    logger.warning(message)
    return message


def tune(models: dict[str, Any], tokenizer, args: TuneArguments, steer_args: SteerArguments) -> tuple[dict, list]:
    """Choose the blend. Stage 1: score every validation example once per model, then search blends on the cached
    rows by perplexity. Stage 2 (--select_by generation): decode the candidates on held-out papers, keep the best
    ROUGE-L. -> (report dict, the candidates' generations)."""
    context = model_context(models)
    examples = load_validation_examples(args, tokenizer, context, steer_args.seed)
    n = len(examples)
    n_holdout = min(round(n * args.holdout_fraction), n - 1)  # at least one example to tune on
    split = {"tune": examples[:n - n_holdout], "holdout": examples[n - n_holdout:]}
    vocab_size = vocab_size_of(tokenizer)
    n_rows = sum(len(ex["target_ids"]) for ex in examples)
    cache_gb = n_rows * vocab_size * 3 * CACHE_DTYPES[args.cache_dtype].itemsize / 1e9
    logger.info("tuning on %d examples, holding out %d; %d target tokens -> %.2f GB of cached log-prob rows",
                n - n_holdout, n_holdout, n_rows, cache_gb)
    if cache_gb > args.max_cache_gb:
        raise UsageError(f"the log-prob cache would take {cache_gb:.1f} GB > --max_cache_gb {args.max_cache_gb}; "
                         "lower --n_examples or --max_target_tokens, or use --cache_dtype bfloat16")
    generation_examples = []
    if args.select_by == "generation":
        generation_examples = (split["holdout"] or split["tune"])[:args.generation_examples]
        if not split["holdout"]:
            logger.warning("no held-out examples (--holdout_fraction 0): the candidates are decoded on papers the "
                           "perplexity search tuned on")
        if any(ex["reviews"] is None or ex["reference"] is None for ex in generation_examples):
            raise UsageError(f"--validation_data {args.validation_data} has no reviews/Output columns to prompt with "
                             "and score against; write it with processing_meta_review.py, or pass --select_by perplexity")

    seconds = {}
    started = time.perf_counter()
    caches = {}
    for part, exs in split.items():
        if exs:
            caches[part] = score_targets(
                models, [ex["prompt_ids"] for ex in exs], [ex["target_ids"] for ex in exs], vocab_size=vocab_size,
                batch_size=steer_args.batch_size, keep_logprobs=(LARGE, SMALL_TUNED, SMALL_BASE),
                cache_dtype=CACHE_DTYPES[args.cache_dtype], pad_token_id=tokenizer.pad_token_id)
    seconds["scoring"] = time.perf_counter() - started
    logger.info("scored in %.1f s", seconds["scoring"])

    started = time.perf_counter()
    entries = {f"{role} (T=1)": score_entry(caches, model=role) for role in models}
    entries["proxy-tuning, alpha=1"] = score_entry(caches, Blend.from_alpha(1.0))
    searched, best = search_blends(caches, args.n_trials, args.candidate_alphas)
    entries |= searched
    seconds["search"] = time.perf_counter() - started
    logger.info("searched in %.1f s", seconds["search"])

    candidates, rows, generation = {}, [], None
    if args.select_by == "generation":
        candidates = candidate_blends(best, args.candidate_alphas)
        for name, blend in candidates.items():
            entries.setdefault(name, score_entry(caches, blend))
        n_tokens = len(candidates) * len(generation_examples) * steer_args.max_new_tokens
        logger.info("stage 2: %d candidates x %d held-out papers x up to %d new tokens = %d steered tokens (%s)",
                    len(candidates), len(generation_examples), steer_args.max_new_tokens, n_tokens,
                    "sampled" if steer_args.do_sample else "greedy")
        started = time.perf_counter()
        scores, rows = decode_candidates(models, tokenizer, candidates, generation_examples, steer_args)
        seconds["generation"] = time.perf_counter() - started
        for name, figures in generation_figures(scores, rows, steer_args.seed).items():
            entries[name]["generation"] = figures
        chosen = choose_by_generation({name: entries[name] for name in candidates})
        generation = {"n_examples": len(generation_examples), "examples": "holdout" if split["holdout"] else "tune",
                      "max_new_tokens": steer_args.max_new_tokens, "do_sample": steer_args.do_sample,
                      "metric": "ROUGE-L F1 x 100 (stemmed) against the meta-review, mean over papers",
                      "rule": f"{REFERENCE_CANDIDATE} unless a candidate's paired ROUGE-L gain over it has the lower "
                              f"end of its one-sided {SELECTION_CONFIDENCE:.0%} bootstrap interval above 0; then the "
                              "best of those"}
    else:
        chosen = "free blend"
    chosen_blend = Blend(**entries[chosen]["blend"])
    warnings = [w for w in (warn_if_not_steering(f"chosen blend ({chosen})", chosen_blend),
                            chosen != "free blend" and warn_if_not_steering("perplexity-best free blend",
                                                                            best["free blend"]))
                if w]
    report = {
        "chosen": chosen,
        "selected_by": args.select_by,
        "blend": chosen_blend.to_dict(),
        "system": describe_blend(chosen_blend),
        "steering": is_steering(chosen_blend),
        "warnings": warnings,
        "candidates": list(candidates),
        "generation": generation,
        "entries": entries,
        "n_examples": {part: len(exs) for part, exs in split.items()},
        "n_target_tokens": {part: int(c["n_tokens"].sum()) for part, c in caches.items()},
        "n_trials": args.n_trials,
        "seconds": seconds,
        "normalisation": f"full vocabulary ({vocab_size} tokens)",
        "validation_data": str(args.validation_data),
    }
    return report, rows


def format_report(report: dict) -> str:
    """The tuning report as a small fixed-width table; * marks the chosen blend."""
    entries = report["entries"].values()
    has_holdout = any("holdout_ppl" in e for e in entries)
    has_generation = any("generation" in e for e in entries)
    header = f"{'model / blend':36} {'w_L':>6} {'w_tuned':>7} {'w_base':>6} {'T_L':>5} {'T_S':>5} {'tune ppl':>9}"
    header += f" {'holdout ppl':>11}" if has_holdout else ""
    header += f" {'ROUGE-L':>7} {'EOS':>4}  {'vs alpha=1 [90% CI]':<20}" if has_generation else ""
    lines = [header.rstrip(), "-" * len(header.rstrip())]
    for name, e in report["entries"].items():
        b = e["blend"]
        cells = ("{:>6.3g} {:>7.3g} {:>6.3g} {:>5.3g} {:>5.3g}".format(
            b["large_weight"], b["tuned_weight"], b["base_weight"], b["large_temperature"], b["small_temperature"])
            if b else f"{'':>6} {'':>7} {'':>6} {'':>5} {'':>5}")
        mark = "*" if name == report.get("chosen") else " "
        line = f"{mark}{name:35} {cells} {e['tune_ppl']:>9.3f}"
        line += f" {e['holdout_ppl']:>11.3f}" if has_holdout else ""
        if "generation" in e:
            g = e["generation"]
            line += f" {g['rougeL']:>7.2f} {g['eos_rate']:>4.2f}  {g['gain']:+.2f} [{g['gain_low']:+.2f}, {g['gain_high']:+.2f}]"
        lines.append(line.rstrip())
    generation = report.get("generation")
    papers = f"{generation['n_examples']} {generation['examples']} papers" if generation else ""
    how = ("the lowest tuning perplexity" if not generation
           else f"no candidate's ROUGE-L gain over it is clear on {papers}" if report["chosen"] == REFERENCE_CANDIDATE
           else f"the best ROUGE-L of the candidates clearly better than alpha=1 on {papers}")
    lines.append(f"chosen: {report['chosen']} = {report.get('system', '?')} ({how})")
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def write_tune_outputs(report: dict, rows: list[dict], config: dict, output_dir: str, overwrite: bool) -> None:
    """blend.json (the chosen blend, the models it was tuned with, a summary), tune_report.json (every entry) and,
    with generation selection, candidate_generations.jsonl (every candidate's outputs and ROUGE-L)."""
    chosen = report["entries"][report["chosen"]]
    summary = {k: v for k, v in chosen.items() if k not in ("blend", "system")} | {
        k: report[k] for k in ("chosen", "selected_by", "warnings", "n_examples", "validation_data")}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        Blend(**report["blend"]).save(tmp / "blend.json", report=summary, models=report.get("models"))
        write_json(tmp / "tune_report.json", {**report, "config": config})
        if rows:
            with open(tmp / "candidate_generations.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    logger.info("wrote %s and %s", Path(output_dir) / "blend.json", Path(output_dir) / "tune_report.json")


# ---------------------------------------------------------------------------------------------
def main(model_args: ModelArguments, steer_args: SteerArguments, tune_args: TuneArguments) -> Any:
    """Generate with the steered blend, or (--tune) choose the blend. Returns the rows / the report."""
    setup_logging()
    if tune_args.tune and steer_args.output_dir is None:
        steer_args = dataclasses.replace(steer_args, output_dir=DEFAULT_TUNE_DIR)
    check_decoding_args(steer_args.max_new_tokens, steer_args.temperature, steer_args.top_p,
                        steer_args.repetition_penalty, steer_args.no_repeat_ngram_size)
    out = Path(steer_args.output_dir) if steer_args.output_dir else None
    if out:
        check_output_dir(out)
    if out and out.is_dir() and any(out.iterdir()) and not steer_args.overwrite_output_dir:
        raise UsageError(f"output directory {out} already exists and is not empty; use --overwrite_output_dir")
    if not tune_args.tune:
        blend = resolve_blend(steer_args)  # a bad blend file fails before the models load
        items = read_prompt_texts(steer_args)
    model_args = resolve_model_args(model_args, steer_args.blend)
    config = to_jsonable(model_args, steer_args, tune_args)
    logger.info("config: %s", json.dumps(config))
    torch.manual_seed(steer_args.seed)
    models, tokenizer = load_models(model_args, with_large_tuned=tune_args.tune)

    if tune_args.tune:
        report, rows = tune(models, tokenizer, tune_args, steer_args)
        report["models"] = model_records(model_args)
        print(format_report(report))
        write_tune_outputs(report, rows, config, steer_args.output_dir, steer_args.overwrite_output_dir)
        return report

    context = model_context(models)
    budget = context - steer_args.max_new_tokens
    if budget < 1:
        raise UsageError(f"--max_new_tokens {steer_args.max_new_tokens} leaves no room for the prompt in the "
                         f"{context}-token context; lower it")
    prompts = build_prompts(items, tokenizer, budget, steer_args.use_template)
    logger.info("%d prompts, blend %s (%s), %s decoding, max_new_tokens=%d", len(prompts), blend.describe(),
                describe_blend(blend), "sampled" if steer_args.do_sample else "greedy", steer_args.max_new_tokens)
    warn_if_not_steering("blend", blend)
    results = generate_texts(models, tokenizer, prompts, blend, steer_args)
    write_generations(items, prompts, results, blend, config, steer_args.output_dir, steer_args.overwrite_output_dir)
    return results


if __name__ == "__main__":
    run_cli(main, [ModelArguments, SteerArguments, TuneArguments], __doc__)
