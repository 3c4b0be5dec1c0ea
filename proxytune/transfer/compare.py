"""The estimates against the real fine-tunes: on the (subset, group) cells both have, the paper's error
mean((real − est)² / real²), the Spearman correlation of their rankings (over all cells, and over the subsets for
each evaluated group), and what each cost.

Writes comparison.json and comparison.png (estimate against real loss, one point per cell) into --output_dir.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import write_json


def relative_squared_error(real, estimate) -> float:
    """mean((real − est)² / real²): `relative_squared_error([2.0, 4.0], [2.2, 4.0])` -> 0.005."""
    import numpy as np

    real, estimate = np.asarray(real, dtype=np.float64), np.asarray(estimate, dtype=np.float64)
    return float(np.mean((real - estimate) ** 2 / real ** 2))


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (scipy), None when undefined (fewer than 3 points, or a constant side)."""
    import numpy as np
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    value = float(spearmanr(a, b).statistic)
    return None if math.isnan(value) else value


def compare(matrix: dict[str, Any], estimates: dict[str, Any], out: Path) -> dict[str, Any]:
    """Compare the real matrix (matrix.json's content) with the estimates (estimates.json's)."""
    groups = matrix["groups"]
    common = [s for s in matrix["loss"] if s in estimates["estimates"]]
    if not common:
        raise UsageError("no training subset has both a real fine-tune and an estimate yet; run --step real and "
                         "--step estimate with the same --plan first")
    cells = [(s, g, matrix["loss"][s][g], estimates["estimates"][s]["loss"][g]) for s in common for g in groups]
    real = [c[2] for c in cells]
    est = [c[3] for c in cells]
    per_group = {}
    for g in groups:
        r = [matrix["loss"][s][g] for s in common]
        e = [estimates["estimates"][s]["loss"][g] for s in common]
        best_real, best_est = common[r.index(min(r))], common[e.index(min(e))]
        per_group[g] = {"spearman": spearman(r, e), "relative_squared_error": relative_squared_error(r, e),
                        "best_by_real": best_real, "best_by_estimate": best_est,
                        "real_loss_of_estimated_best": matrix["loss"][best_est][g],
                        "real_loss_of_real_best": matrix["loss"][best_real][g]}
    lin = [estimates["estimates"][s]["linearization"].get("relative_error") for s in common]
    lin = [x for x in lin if x is not None]
    real_seconds = [matrix["train_runtime"].get(s) for s in common]
    estimate_seconds = sum(estimates["estimates"][s]["seconds"] for s in common) + (
        estimates.get("gradient_seconds") or 0) + (estimates.get("theta0_seconds") or 0)
    known = [x for x in real_seconds if x is not None]
    result = {
        "subsets": common, "cells": len(cells),
        "relative_squared_error": relative_squared_error(real, est), "spearman": spearman(real, est),
        "per_group": per_group,
        "linearization_relative_error_mean": sum(lin) / len(lin) if lin else None,
        "real_train_seconds": sum(known) if len(known) == len(common) else None,
        "estimate_seconds": estimate_seconds,
        "speedup": (sum(known) / estimate_seconds) if len(known) == len(common) and estimate_seconds > 0 else None,
        "note": "estimate_seconds includes the per-example gradients (once) and theta0's own scoring; "
                "real_train_seconds is the Trainer's train_runtime of each subset's run, not counting the meta-"
                "initialisation the estimate starts from",
    }
    write_json(out / "comparison.json", result)
    plot_comparison(cells, out / "comparison.png", result)
    return result


def plot_comparison(cells: list[tuple[str, str, float, float]], path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=120)
    groups = sorted({c[1] for c in cells})
    for g in groups:
        points = [(c[2], c[3]) for c in cells if c[1] == g]
        ax.scatter(*zip(*points), label=f"on {g}", s=18)
    values = [c[2] for c in cells] + [c[3] for c in cells]
    low, high = min(values), max(values)
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--", label="estimate = real")
    ax.set_xlabel("real fine-tune: held-out loss (nats/token)")
    ax.set_ylabel("first-order estimate: held-out loss")
    # The per-target Spearman before the one over all cells: it is the ranking a user acts on; the one over all cells
    # also ranks the targets' loss levels, so it is high even when the subsets' order within a target is not.
    rho = result["spearman"]
    per_target = [v["spearman"] for v in result["per_group"].values() if v["spearman"] is not None]
    ranks = ([f"Spearman per target (mean) {sum(per_target) / len(per_target):.2f}"] if per_target else []) + (
        [f"over all cells {rho:.2f}"] if rho is not None else [])
    ax.set_title(f"{len({c[0] for c in cells})} subsets; rel. sq. error {100 * result['relative_squared_error']:.3g}%"
                 + ("\n" + "; ".join(ranks) if ranks else ""), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
