"""The flags of steer.py: the models, decoding, and the blend search (--tune)."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.validation import SEED_MAX, number_problem, number_problems
from proxytune.models.loading import DEFAULT_MODELS, DTYPES
from proxytune.models.quantization import QuantizationArguments, quantization_flags_last
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED
from proxytune.steering.scoring import CACHE_DTYPES
from proxytune.steering.shared_base import PAIR_SMALL_MODELS_HELP
from proxytune.task.arguments import TEMPLATE_HELP

# Search ranges for --tune. A weight is an inverse temperature (see Blend), so [1/3, 3] for the temperature
# searches maps onto the weight range and every baseline's optimum is a point of the free search.
WEIGHT_RANGE = (0.0, 3.0)


BASE_WEIGHT_RANGE = (-1.0, 3.0)  # negative: S is added rather than subtracted


TEMPERATURE_RANGE = (1 / 3, 3.0)


CANDIDATE_ALPHAS = (0.5, 1.0, 1.5, 2.0)  # proxy-tuning strengths --tune decodes besides the perplexity-best blends


DEFAULT_TUNE_DIR = "outputs/steer"


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
    large_device: str | None = field(
        default=None, metadata={"help": "Device of L (default: cuda if available, else cpu)."})
    small_base_device: str | None = field(default=None, metadata={"help": "Device of S (default as L)."})
    small_tuned_device: str | None = field(default=None, metadata={"help": "Device of S_tuned (default as L)."})
    large_tuned_device: str | None = field(default=None, metadata={"help": "Device of L_tuned (default as L)."})
    large_dtype: str = field(default="auto", metadata={"help": "auto = float32 on CPU, bfloat16 on GPU.",
                                                      "choices": list(DTYPES)})
    small_base_dtype: str = field(default="auto", metadata={"help": "dtype of S.", "choices": list(DTYPES)})
    small_tuned_dtype: str = field(default="auto", metadata={"help": "dtype of S_tuned.", "choices": list(DTYPES)})
    large_tuned_dtype: str = field(default="auto", metadata={"help": "dtype of L_tuned.", "choices": list(DTYPES)})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub models/tokenizers to run their code."})
    pair_small_models: bool = field(default=False, metadata={"help": PAIR_SMALL_MODELS_HELP})


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
        default=True,
        metadata={"help": "Wrap the text in the prompt template; false = use the text as the prompt."})
    prompt_template: str | None = field(
        default=None, metadata={"help": TEMPLATE_HELP + " Default: the template the --small_tuned_model directory "
                                "(fine_tune.py's final/) or the --blend file records, else meta_review. --prompt (or "
                                "a --prompts_file row) is the reviews, or the instruction; a --prompts_file of Alpaca "
                                "rows gives instruction and input."})
    max_new_tokens: int = field(
        default=128, metadata={"help": "Tokens to generate at most (the prompt gets the rest)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (true) or decode greedily (false)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the blended distribution."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling nucleus of the blended distribution."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 lowers tokens already in the row."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Never repeat an n-gram of this size (0 = off)."})
    speculative: bool = field(
        default=True, metadata={"help": "Decode speculatively, S_tuned drafting and L and S checking its drafts "
                                "(proxytune/steering/speculative.py: greedy output unchanged, sampling distribution "
                                "unchanged, fewer L steps; batches too); false = the plain loop."})
    draft_tokens: int = field(
        default=0, metadata={"help": "Tokens S_tuned drafts per speculative round. 0 = adaptive: each round's "
                             "length follows S_tuned's measured agreement with the blend and the measured time "
                             "of rounds, down to plain steered steps where drafts do not pay (so never much "
                             "slower than --speculative false; seeded sampling then varies between runs, as the "
                             "times do). K > 0: K every round (seeded sampling repeats)."})
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
