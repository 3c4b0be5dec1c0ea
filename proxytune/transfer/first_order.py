"""The first-order estimate of fine-tuning on a subset, without fine-tuning (Li, Zhang, Wang and Zhang, "Scalable
Fine-tuning from Multiple Data Sources: A First-Order Approximation Approach", EMNLP Findings 2024; code:
VirtuosoResearch/Scalable-finetuning).

1. θ0, the meta-initialisation: a LoRA adapter fine-tuned once on every group (the matrix's `all` cell).
2. For every training example i: its output s_i = f(θ0; x_i), the mean over target tokens of the log-odds of the
   correct token (proxytune/transfer/losses.py), and its gradient g_i = ∇_θ f(θ0; x_i) with respect to the LoRA
   parameters (D of them), projected to d dimensions: z_i = Pᵀ g_i, P a (D, d) matrix of ±1/√d drawn from a seed
   (never stored: regenerated in blocks of BLOCK_ROWS rows). Computed once, stored, reused for every subset.
3. Near θ0, f(θ0 + P w; x_i) ≈ s_i + z_i·w, so fine-tuning on a subset S (raising the probability of its correct
   tokens) is approximated by a logistic regression with the outputs as offset:
       w_S = argmin_w  (1/|S|) Σ_{i∈S} log(1 + exp(-(s_i + z_i·w)))  +  (l2 / 2) ‖w‖²
4. Δ_S = P w_S, rescaled to ‖Δ_S‖ = scale · ‖θ0‖ (the LoRA parameters' norm), as the authors do; θ0 + Δ_S is scored on
   each target group's held-out split with a forward pass only: the estimated loss of fine-tuning on S.
The linearisation is checked on a few examples per subset: s_i + z_i·w (the linear prediction at θ0 + Δ, exact in
the projection since g_i·P w = z_i·w) against f(θ0 + Δ; x_i) from a forward pass.

Layout under --output_dir/estimate:
    gradients/           outputs.npy (N,), projected.npy (N, d), examples.json (each row's group), meta.json
    estimates.json       per subset: the estimated loss on every group, the linearisation error, seconds
    estimates.csv        the estimated matrix (rows: subsets; columns: groups)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import atomic_directory, format_bytes, write_json
from proxytune.foundation.progress import progress_bar
from proxytune.training.data import CausalLMCollator, build_labels
from proxytune.transfer.losses import log_odds_output, target_logits, target_loss
from proxytune.transfer.plans import subset_name

logger = logging.getLogger(__name__)


ESTIMATE_DIR = "estimate"


# P's rows come in blocks of this many, each from its own generator seeded by (seed, block): row r of P is the same
# whatever the number of parameters or the batch it is used in.
BLOCK_ROWS = 1 << 16


# The settings the stored gradients depend on (the rest, scale, l2, ..., only change what is done with them).
GRADIENT_SETTINGS = ("meta_init", "projection_dim", "projection_seed", "gradient_dtype")


def projection_block(seed: int, dim: int, block: int):
    """Rows [block * BLOCK_ROWS, (block + 1) * BLOCK_ROWS) of P: (BLOCK_ROWS, dim) float32, entries ±1/√dim."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + block)
    signs = torch.randint(0, 2, (BLOCK_ROWS, dim), generator=generator, dtype=torch.int8)
    return (signs.float() * 2 - 1) / math.sqrt(dim)


def project(gradients, seed: int, dim: int):
    """Z = G P: (B, D) -> (B, dim), P generated block by block (never held whole)."""
    import torch

    n_params = gradients.shape[1]
    out = torch.zeros(gradients.shape[0], dim, dtype=torch.float32, device=gradients.device)
    for block, start in enumerate(range(0, n_params, BLOCK_ROWS)):
        rows = projection_block(seed, dim, block)[: n_params - start].to(gradients.device)  # (n, dim)
        out += gradients[:, start:start + rows.shape[0]].float() @ rows
    return out


def unproject(w, seed: int, n_params: int):
    """Δ = P w: (dim,) -> (n_params,)."""
    import torch

    w = torch.as_tensor(w, dtype=torch.float32)
    parts = []
    for block, start in enumerate(range(0, n_params, BLOCK_ROWS)):
        rows = projection_block(seed, w.shape[0], block)[: n_params - start]  # (n, dim)
        parts.append(rows @ w)
    return torch.cat(parts)


def fit_logistic(features, offset, l2: float, labels=None, tol: float = 1e-10, max_iter: int = 100):
    """Regularised logistic regression with a fixed offset, by Newton's method with a backtracking line search
    (convex; d is a few hundred, so the (d, d) Hessian is cheap):

        w = argmin_w  (1/n) Σ_i [log(1 + e^{m_i}) − y_i m_i]  +  (l2/2) ‖w‖²,   m_i = offset_i + x_i·w
        gradient  (1/n) Xᵀ(σ(m) − y) + l2 w;   Hessian  (1/n) Xᵀ diag(σ(m)(1 − σ(m))) X + l2 I

    y_i = 1 for every example when `labels` is None (the estimate's case: s_i is the log-odds of the correct token).
    With offset 0 this is scikit-learn's LogisticRegression(fit_intercept=False, C=1/(n·l2)). -> w (d,) float64."""
    import numpy as np
    from scipy.special import expit

    x = np.asarray(features, dtype=np.float64)  # (n, d)
    off = np.asarray(offset, dtype=np.float64)  # (n,)
    y = np.ones(len(x)) if labels is None else np.asarray(labels, dtype=np.float64)
    n, d = x.shape
    if l2 <= 0:
        raise UsageError(f"--l2 {l2} must be > 0 (the fit has no optimum without it when the data are separable)")

    def objective(w):
        m = off + x @ w
        return float((np.logaddexp(0.0, m) - y * m).mean() + 0.5 * l2 * w @ w)

    w = np.zeros(d)
    for _ in range(max_iter):
        m = off + x @ w
        p = expit(m)
        grad = x.T @ (p - y) / n + l2 * w
        if np.linalg.norm(grad) < tol:
            break
        hessian = (x.T * (p * (1 - p))) @ x / n + l2 * np.eye(d)
        step = np.linalg.solve(hessian, grad)
        value, t = objective(w), 1.0
        while objective(w - t * step) > value - 0.25 * t * grad @ step and t > 1e-10:
            t /= 2
        w = w - t * step
    return w


def lora_parameters(model, where: str) -> list:
    """The LoRA parameters (lora_A / lora_B of every adapted layer), in the model's order; refuses a model without."""
    params = [p for name, p in model.named_parameters() if "lora_" in name]
    if not params:
        raise UsageError(f"{where} has no LoRA parameters: the estimate needs θ0 as a LoRA adapter (fine-tune the "
                         "`all` cell with use_lora and without merge_lora)")
    return params


def flat_parameters(params):
    import torch

    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def set_parameters(params, flat) -> None:
    """Write the flat vector (D,) into the parameters, in order."""
    import torch

    start = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()


def example_batch(rows: Sequence[dict], pad_token_id: int, device):
    """One right-padded batch of processed rows with the prompt masked out of the labels."""
    collate = CausalLMCollator(pad_token_id)
    batch = collate([{"input_ids": r["input_ids"], "labels": build_labels(r["input_ids"], r["prompt_length"])}
                     for r in rows])
    return {k: v.to(device) for k, v in batch.items()}


def outputs_of(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 8):
    """s_i = f(θ; x_i) for the rows at the model's current parameters: (N,) float64 numpy."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = example_batch(rows[start:start + batch_size], pad_token_id, device)
            out.append(log_odds_output(*target_logits(model, batch)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def outputs_and_projected_gradients(model, params, rows: Sequence[dict], pad_token_id: int, seed: int, dim: int,
                                    batch_size: int = 16):
    """(s (N,) float64, Z (N, dim) float32) numpy: every row's output and its projected LoRA gradient, one row at a
    time (no padding enters a gradient), projected `batch_size` rows at a time."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    outputs, projected = [], []
    bar = progress_bar(total=len(rows), desc="per-example gradients", disable=len(rows) < 50)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        grads = torch.zeros(len(chunk), n_params, dtype=torch.float32, device=device)  # (B, D)
        for j, row in enumerate(chunk):
            batch = example_batch([row], pad_token_id, device)
            s = log_odds_output(*target_logits(model, batch))[0]
            g = torch.autograd.grad(s, params)
            grads[j] = torch.cat([x.reshape(-1) for x in g]).float()
            outputs.append(float(s.detach()))
            bar.update(1)
        projected.append(project(grads, seed, dim).cpu().numpy())
    bar.close()
    for p in params:
        p.requires_grad_(False)
    return np.asarray(outputs, dtype=np.float64), np.concatenate(projected).astype(np.float32)


@dataclass
class GradientStore:
    """Every training example's output and projected gradient at θ0, and its group."""

    outputs: Any  # (N,) float64
    projected: Any  # (N, d) float16 or float32
    groups: list[str]
    meta: dict[str, Any]

    def rows_of(self, subset: Sequence[str]):
        import numpy as np

        wanted = set(subset)
        return np.array([i for i, g in enumerate(self.groups) if g in wanted], dtype=np.int64)


def load_store(path: Path, meta: dict[str, Any]) -> GradientStore | None:
    """The stored gradients if they were made with exactly these settings (`meta`), else None."""
    import numpy as np

    try:
        old = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        same = {k: old.get(k) for k in meta} == meta
        if not same:
            logger.warning("the gradients in %s were made with other settings; computing them again", path)
            return None
        groups = json.loads((path / "examples.json").read_text(encoding="utf-8"))["groups"]
        return GradientStore(np.load(path / "outputs.npy"), np.load(path / "projected.npy"), groups, old)
    except (OSError, ValueError, KeyError):
        return None


def save_store(path: Path, store: GradientStore) -> None:
    import numpy as np

    with atomic_directory(path, overwrite=True) as tmp:
        np.save(tmp / "outputs.npy", store.outputs)
        np.save(tmp / "projected.npy", store.projected)
        write_json(tmp / "examples.json", {"groups": store.groups})
        write_json(tmp / "meta.json", store.meta)


def fingerprint(directory: str) -> dict[str, Any]:
    """Which θ0 a store was made from: the adapter's path and its weights' size and modification time."""
    path = Path(directory).resolve()
    files = sorted(path.glob("*.safetensors"))
    return {"path": str(path), "weights": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]}


def gradient_store(out: Path, model, params, train: dict[str, Any], pad_token_id: int, settings: dict[str, Any]
                   ) -> GradientStore:
    """Compute (or reuse) every training example's output and projected gradient. `train`: {group: split}."""
    import numpy as np

    path = out / ESTIMATE_DIR / "gradients"
    meta = {**{k: settings[k] for k in GRADIENT_SETTINGS}, "groups": {g: len(s) for g, s in train.items()}}
    store = load_store(path, meta)
    if store is not None:
        logger.info("reusing the stored gradients in %s", path)
        return store
    rows, groups = [], []
    for g, split in train.items():
        rows += split.to_list()
        groups += [g] * len(split)
    dim, dtype = settings["projection_dim"], np.dtype(settings["gradient_dtype"])
    n_params = sum(p.numel() for p in params)
    logger.info("gradients of %d examples over %d LoRA parameters, projected to %d dimensions: %s stored as %s; P "
                "(never stored) is made in blocks of %s", len(rows), n_params, dim,
                format_bytes(len(rows) * dim * dtype.itemsize), dtype.name, format_bytes(BLOCK_ROWS * dim * 4))
    start = time.perf_counter()
    outputs, projected = outputs_and_projected_gradients(model, params, rows, pad_token_id,
                                                         settings["projection_seed"], dim)
    meta = {**meta, "n_params": n_params, "seconds": round(time.perf_counter() - start, 2),
            "bytes": int(projected.size * dtype.itemsize)}
    store = GradientStore(outputs, projected.astype(dtype), groups, meta)
    save_store(path, store)
    return store


def estimate_subset(model, params, theta0, store: GradientStore, subset: Sequence[str], held_out: dict[str, Any],
                    rows: Sequence[dict], pad_token_id: int, settings: dict[str, Any], batch_size: int = 8
                    ) -> dict[str, Any]:
    """The estimated held-out loss of fine-tuning on `subset`, with the linearisation check; θ0 is restored after."""
    import numpy as np

    start = time.perf_counter()
    idx = store.rows_of(subset)
    z = store.projected[idx].astype(np.float64)  # (n, d)
    w = fit_logistic(z, store.outputs[idx], settings["l2"])
    n_params = theta0.numel()
    delta = unproject(w, settings["projection_seed"], n_params).to(theta0.device)  # (D,)
    norm = float(delta.norm())
    factor = settings["scale"] * float(theta0.norm()) / norm if norm > 0 else 0.0
    set_parameters(params, theta0 + factor * delta)
    try:
        losses = {g: target_loss(model, split, pad_token_id, batch_size) for g, split in held_out.items()}
        check = linearization_check(model, store, idx, w * factor, rows, pad_token_id, settings)
    finally:
        set_parameters(params, theta0)
    return {"subset": list(subset), "loss": losses, "linearization": check, "delta_norm": norm * factor,
            "train_examples": len(idx), "seconds": round(time.perf_counter() - start, 3)}


def linearization_check(model, store: GradientStore, idx, w_scaled, rows: Sequence[dict], pad_token_id: int,
                        settings: dict[str, Any]) -> dict[str, float]:
    """On up to `check_examples` of the subset's examples (seeded): the linear prediction s_i + z_i·w against the
    output f(θ0 + Δ; x_i). Reports Σ(f − lin)² / Σ f² (the paper's relative error) and Σ(f − lin)² / Σ(f − s)² (the
    error relative to the change the step made, which the first hides when outputs are large). `rows`: the training
    examples in the store's order."""
    import numpy as np

    n = min(settings["check_examples"], len(idx))
    if n == 0:
        return {}
    pick = np.sort(np.random.default_rng(settings["projection_seed"]).choice(idx, n, replace=False))
    actual = outputs_of(model, [rows[i] for i in pick], pad_token_id)
    before = store.outputs[pick]
    linear = before + store.projected[pick].astype(np.float64) @ w_scaled
    err = float(((actual - linear) ** 2).sum())
    return {"examples": int(n), "relative_error": err / max(float((actual ** 2).sum()), 1e-30),
            "error_over_change": err / max(float(((actual - before) ** 2).sum()), 1e-30),
            "mean_output_change": float((actual - before).mean())}


def run_estimates(out: Path, model, subsets: Sequence[tuple[str, ...]], held_out: dict[str, Any],
                  train: dict[str, Any], pad_token_id: int, settings: dict[str, Any], batch_size: int = 8
                  ) -> dict[str, Any]:
    """Estimate every subset (those already in estimates.json with the same settings are kept); writes
    estimates.json after each subset and estimates.csv at the end. `model`: θ0, a peft model (unmerged)."""
    params = lora_parameters(model, settings["meta_init"]["path"])
    model.eval()
    theta0 = flat_parameters(params)
    store = gradient_store(out, model, params, train, pad_token_id, settings)
    rows = [row for split in train.values() for row in split.to_list()]  # the store's order
    path = out / ESTIMATE_DIR / "estimates.json"
    record: dict[str, Any] = {}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("settings") == settings:
            record = old
    if not record:
        start = time.perf_counter()
        theta0_loss = {g: target_loss(model, split, pad_token_id, batch_size) for g, split in held_out.items()}
        record = {"settings": settings, "theta0_loss": theta0_loss, "gradient_seconds": store.meta.get("seconds"),
                  "theta0_seconds": round(time.perf_counter() - start, 3), "estimates": {}}
    for subset in progress_bar(subsets, desc="estimating subsets", disable=len(subsets) < 4):
        name = subset_name(subset)
        if name in record["estimates"]:
            continue
        record["estimates"][name] = estimate_subset(model, params, theta0, store, subset, held_out, rows,
                                                    pad_token_id, settings, batch_size)
        write_json(path, record)
    groups = list(held_out)
    record["best_by_estimate"] = {g: min(record["estimates"], key=lambda s: record["estimates"][s]["loss"][g])
                                  for g in groups} if record["estimates"] else {}
    write_json(path, record)
    tmp = path.with_name(".estimates.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["train_subset", *groups, "linearization_relative_error", "seconds"])
        writer.writerow(["(theta0)", *[f"{record['theta0_loss'][g]:.6f}" for g in groups], "", ""])
        for name, e in record["estimates"].items():
            writer.writerow([name, *[f"{e['loss'][g]:.6f}" for g in groups],
                             f"{e['linearization'].get('relative_error', float('nan')):.3g}", e["seconds"]])
    os.replace(tmp, path.with_name("estimates.csv"))
    return record
