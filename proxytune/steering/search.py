"""The blend search on cached log-probs: golden-section line searches, then Newton's method on the convex NLL."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from proxytune.steering.arguments import BASE_WEIGHT_RANGE, TEMPERATURE_RANGE, WEIGHT_RANGE
from proxytune.steering.blend import Blend, describe_blend
from proxytune.steering.scoring import blend_nll, blend_nll_derivatives, per_token_nll

logger = logging.getLogger(__name__)


GOLDEN_SECTION_STEPS = 18  # each step shrinks the interval by 0.618: [0, 3] -> 0.0005 wide


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
