"""The steering arithmetic: the Blend (weights, temperatures) and the blended log-probs of L, S_tuned and S."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.foundation.outputs import write_json
from proxytune.foundation.validation import number_problem, number_problems

# Model roles: the keys of the `models` dicts passed around, of score_targets' results and of blend.json's record.
LARGE, SMALL_BASE, SMALL_TUNED, LARGE_TUNED = "large", "small_base", "small_tuned", "large_tuned"


MODEL_ROLES = (LARGE, SMALL_BASE, SMALL_TUNED, LARGE_TUNED)


# A model whose coefficient is under this share of the largest one is left out when describe_blend names what a
# blend is. Each coefficient multiplies a log-prob vector of similar spread (next-token log-probs span some 10
# nats), so a 5% term moves the blended log-probs about 5% as much as the main term: it can reorder near-ties only,
# and the blend decodes (nearly) as the other models would. The --tune run that chose w_L = 0, w_tuned = 2.24,
# w_base = 0 was S_tuned alone, and its outputs were S_tuned's to the token.
NEGLIGIBLE_SHARE = 0.05


# Keys of blend.json that are not Blend fields: written by --tune for people and for evaluation.py.
BLEND_FILE_EXTRAS = ("report", "models", "system", "prompt_template")


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

    def save(self, path: str | Path, report: dict | None = None, models: dict[str, dict] | None = None,
             system: str | None = None, prompt_template: dict | None = None) -> None:
        """Write the blend as JSON, with what it really is ('system': `system`, else describe_blend), the `models` it
        was tuned with (role -> model_record), the `prompt_template` it was tuned with (PromptTemplate.record) and
        `report` (tuning numbers): extra keys that load() skips."""
        extras = {"system": system or describe_blend(self), **({"models": models} if models else {}),
                  **({"prompt_template": prompt_template} if prompt_template else {}),
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


def describe_blend(blend: Blend, bits: dict[str, int] | None = None) -> str:
    """What a blend is, by the models it really uses (blend_terms):
    "large + small_tuned - small_base" for a real steer, "small_tuned alone", "large alone",
    "large x small_tuned (no S term)", and so on. `describe_blend(Blend(0.0, 2.24, 0.0))` -> 'small_tuned alone'.
    `bits` ({role: 4 or 8}, quantization.loaded_bits) marks the quantised models:
    `describe_blend(Blend.from_alpha(1.0), {"large": 4})` -> 'large (4-bit) + small_tuned - small_base'."""
    terms = blend_terms(blend)
    name = {role: f"{role} ({(bits or {})[role]}-bit)" if (bits or {}).get(role) else role for role in MODEL_ROLES}
    limit = " within large's plausible tokens" if blend.has_plausibility_limit and LARGE not in terms else ""
    if not terms:
        return "uniform (every weight 0)"
    if len(terms) == 1:
        (role, c), = terms.items()
        return f"{name[role]} alone{limit}" if c > 0 else f"{name[role]} inverted{limit}"
    if terms.keys() == {LARGE, SMALL_TUNED} and terms[SMALL_TUNED] > 0:
        return f"{name[LARGE]} x {name[SMALL_TUNED]} (no S term)"  # a product of experts: the tune report's name
    text = ""
    for role, c in terms.items():
        text += (("" if c > 0 else "-") if not text else (" + " if c > 0 else " - ")) + name[role]
    missing = [{LARGE: "L", SMALL_TUNED: "S_tuned", SMALL_BASE: "S"}[r] for r in (LARGE, SMALL_TUNED, SMALL_BASE)
               if r not in terms]
    added = " (S added, not subtracted)" if terms.get(SMALL_BASE, 0) > 0 else ""
    return text + (f" (no {missing[0]} term)" if missing else "") + added + limit


def is_steering(blend: Blend) -> bool:
    """Whether the blend is L pushed by the small pair's difference: all three models, S subtracted."""
    terms = blend_terms(blend)
    return terms.keys() == {LARGE, SMALL_TUNED, SMALL_BASE} and terms[SMALL_BASE] < 0 < terms[SMALL_TUNED]


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
