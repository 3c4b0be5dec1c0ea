"""The transfer matrix by real fine-tunes: one fine_tune.py run per training subset (a cell's row), each scored on
every group's held-out split (the columns): the loss of A+B -> A, A -> B, ...

Each subset's run is a normal fine_tune.py run (resumable from its checkpoints, `final/` at the end) on
subsets/<subset>/, configured by cells/<subset>.yaml (the fine-tune config files given to transfer.py, plus the
subset's data and its output directory): `python fine_tune.py cells/A+B.yaml` runs or resumes it by hand.

Layout under --output_dir (beside groups/ and subsets/, proxytune/transfer/splits.py):
    cells/<subset>.yaml          the cell's fine_tune.py config
    cells/<subset>/              its fine_tune.py run (final/ = the fine-tuned model)
    cells/<subset>.scores.json   its held-out loss on every group, and what the run cost
    base_scores.json             the base model's held-out loss on every group (no fine-tuning), for reference
    matrix.json, matrix.csv      loss[subset][group] (nats per target token), with the cells still missing
    matrix.png                   the heatmap
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from proxytune.foundation.config import read_config_file
from proxytune.foundation.outputs import write_json
from proxytune.models.loading import load_causal_lm
from proxytune.training.arguments import parse_args
from proxytune.training.hp_search import NOT_COPIED, write_config
from proxytune.transfer.losses import target_loss
from proxytune.transfer.plans import subset_name
from proxytune.transfer.splits import subset_dir, write_subset

logger = logging.getLogger(__name__)


CELLS_DIR = "cells"


# What a cell's config never takes from the fine-tune config files: where the cell's data and outputs are.
CELL_OWN = NOT_COPIED | {"dataset_path", "hp_search"}


def base_settings(config_files: Sequence[str]) -> dict[str, Any]:
    """The fine-tune config files merged (later files override earlier ones), without the keys every cell sets."""
    merged: dict[str, Any] = {}
    for path in config_files:
        merged.update(read_config_file(path))
    return {k: v for k, v in merged.items() if k not in CELL_OWN}


def cell_paths(out: Path, subset: Sequence[str]) -> tuple[Path, Path, Path]:
    """(config, run directory, scores) of a subset's cell."""
    name = subset_name(subset)
    cells = out / CELLS_DIR
    return cells / f"{name}.yaml", cells / name, cells / f"{name}.scores.json"


def write_cell_config(out: Path, subset: Sequence[str], base: dict[str, Any]) -> Path:
    config, run_dir, _ = cell_paths(out, subset)
    config.parent.mkdir(parents=True, exist_ok=True)
    settings = {**base, "dataset_path": str(subset_dir(out, subset)), "output_dir": str(run_dir)}
    write_config(config, settings, f"transfer cell {subset_name(subset)}: python fine_tune.py {config}")
    return config


def my_cells(subsets: Sequence[tuple[str, ...]], worker: int, num_workers: int) -> list[tuple[str, ...]]:
    """Worker K's share of the plan: cells K, K + N, K + 2N, ... (N workers)."""
    return [s for i, s in enumerate(subsets) if i % num_workers == worker]


def score_model(model_dir: str, held_out: dict[str, Any], pad_token_id: int, device: str | None,
                batch_size: int) -> dict[str, float]:
    model = load_causal_lm(model_dir, dtype="float32", device=device, flag="a cell's final model")
    return {g: target_loss(model, split, pad_token_id, batch_size) for g, split in held_out.items()}


def run_cells(out: Path, subsets: Sequence[tuple[str, ...]], base: dict[str, Any], held_out: dict[str, Any],
              train: Callable[..., dict], pad_token_id: int, worker: int = 0, num_workers: int = 1,
              device: str | None = None, batch_size: int = 8) -> list[str]:
    """Train and score this worker's cells in turn; a cell already scored is skipped, a cell whose run was
    interrupted resumes (fine_tune.py's own resume). `train(model_args, data_args, training_args)` is fine_tune.py's
    main. Returns the names of the cells this call trained or scored."""
    done = []
    mine = my_cells(subsets, worker, num_workers)
    for i, subset in enumerate(mine, 1):
        config, run_dir, scores = cell_paths(out, subset)
        if scores.is_file():
            continue
        logger.info("cell %d/%d of worker %d: fine-tuning on %s", i, len(mine), worker, subset_name(subset))
        write_subset(out, subset)
        write_cell_config(out, subset, base)
        start = time.perf_counter()
        result = train(*parse_args([str(config)]))
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        losses = score_model(str(result["final_dir"]), held_out, pad_token_id, device, batch_size)
        metrics = result.get("metrics") or {}
        write_json(scores, {"subset": list(subset), "loss": losses, "final_dir": str(result["final_dir"]),
                            "status": result["status"],
                            "resumed_from": str(result["resumed_from"]) if result.get("resumed_from") else None,
                            "train_runtime": metrics.get("train_runtime"),
                            "wall_seconds_this_call": round(train_seconds, 2),
                            "score_seconds": round(time.perf_counter() - start, 2)})
        logger.info("cell %s: %s", subset_name(subset), {g: round(v, 4) for g, v in losses.items()})
        done.append(subset_name(subset))
    return done


def base_scores(out: Path, model_name: str, held_out: dict[str, Any], pad_token_id: int, device: str | None,
                batch_size: int) -> dict[str, float]:
    """The base model's held-out losses (computed once, then read from base_scores.json)."""
    path = out / "base_scores.json"
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("model") == model_name and set(record["loss"]) == set(held_out):
            return record["loss"]
    losses = score_model(model_name, held_out, pad_token_id, device, batch_size)
    write_json(path, {"model": model_name, "loss": losses})
    return losses


def collect_matrix(out: Path, subsets: Sequence[tuple[str, ...]], groups: Sequence[str],
                   base: dict[str, float] | None = None) -> dict[str, Any]:
    """matrix.json / matrix.csv / matrix.png from the cells scored so far (all workers'); missing cells are listed."""
    loss: dict[str, dict[str, float]] = {}
    cost: dict[str, float | None] = {}
    missing = []
    for subset in subsets:
        _, _, scores = cell_paths(out, subset)
        if scores.is_file():
            record = json.loads(scores.read_text(encoding="utf-8"))
            loss[subset_name(subset)] = {g: record["loss"][g] for g in groups}
            cost[subset_name(subset)] = record.get("train_runtime")
        else:
            missing.append(subset_name(subset))
    matrix = {"groups": list(groups), "subsets": [subset_name(s) for s in subsets], "loss": loss,
              "base_loss": base, "train_runtime": cost, "missing": missing,
              "unit": "mean NLL per target token (nats) on each group's held-out split"}
    write_json(out / "matrix.json", matrix)
    tmp = out / ".matrix.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["train_subset", *groups])
        if base:
            writer.writerow(["(base model)", *[f"{base[g]:.6f}" for g in groups]])
        for name, row in loss.items():
            writer.writerow([name, *[f"{row[g]:.6f}" for g in groups]])
    os.replace(tmp, out / "matrix.csv")
    if loss:
        plot_matrix(matrix, out / "matrix.png")
    return matrix


def plot_matrix(matrix: dict[str, Any], path: Path, title: str = "transfer matrix (held-out loss, nats/token)"
                ) -> None:
    """Heatmap: a row per training subset (the base model first, when known), a column per evaluated group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = matrix["groups"]
    rows = ([("(base model)", matrix["base_loss"])] if matrix.get("base_loss") else []) + list(matrix["loss"].items())
    values = np.array([[row[g] for g in groups] for _, row in rows])  # (subsets, groups)
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(groups), 1.2 + 0.4 * len(rows)), dpi=120)
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlabel("evaluated on (held-out split)")
    ax.set_ylabel("fine-tuned on")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(image, ax=ax, label="loss (lower is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
