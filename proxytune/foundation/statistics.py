"""Bootstrap confidence intervals over examples."""

from __future__ import annotations


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
