"""The k-means shortcut of the sources file: groups as clusters of the base model's mean hidden state over the
prompt, for data that has no column to group by.

Each row's prompt (the reviews in the task's template, cut to `max_prompt_tokens`) goes through the base model; the
last layer's hidden states are averaged over the prompt's tokens (B, T, H) -> (B, H), and scikit-learn's KMeans
(k-means++, 10 restarts, seeded) splits the rows into `clusters` groups named cluster-0, cluster-1, ...
"""

from __future__ import annotations

import logging
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.foundation.progress import progress_bar
from proxytune.models.loading import load_causal_lm
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_prompt
from proxytune.task.reviews import reviews_of
from proxytune.transfer.sources import Sources, as_meta_review_rows, make_group, read_rows

logger = logging.getLogger(__name__)


def mean_prompt_states(model, tokenizer, rows: list[dict[str, Any]], max_prompt_tokens: int,
                       batch_size: int = 8, template: PromptTemplate = DEFAULT_TEMPLATE):
    """(N, H) float32 numpy: each row's last-layer hidden state averaged over its prompt tokens (padding left out);
    the prompts are `template`'s, the fine-tune's."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    prompts = [build_prompt(reviews_of(r["Input"]) or [""], tokenizer, max_prompt_tokens, template)[0] for r in rows]
    out = []
    for start in progress_bar(range(0, len(prompts), batch_size), desc="embedding prompts",
                              disable=len(prompts) < 200):
        enc = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True,
                        return_tensors="pt").to(device)
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()  # (B, T, H)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().numpy())  # (B, H)
    return np.concatenate(out)


def kmeans_labels(features, clusters: int, seed: int):
    """Cluster labels (N,) of the rows' features (N, H)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=clusters, random_state=seed, n_init=10).fit_predict(features)


def cluster_groups(sources: Sources, tokenizer, default_model: str, device: str | None = None,
                   template: PromptTemplate = DEFAULT_TEMPLATE) -> dict[str, list[dict[str, Any]]]:
    """The kmeans shortcut's groups: {cluster-k: rows}. `default_model` (the fine-tune's base) unless the file names
    `kmeans.model`; the prompts are `template`'s (the fine-tune's)."""
    spec = sources.kmeans or {}
    where = f"sources file {sources.path}: kmeans"
    base = make_group("all", sources.defaults)
    rows = as_meta_review_rows(read_rows(base.dataset, base.split, where), base, where)
    if spec.get("max_examples"):
        rows = rows[: int(spec["max_examples"])]
    k = int(spec["clusters"])
    if len(rows) < 2 * k:
        raise UsageError(f"{where}: {len(rows)} rows cannot make {k} clusters with two rows or more each; lower "
                         "'clusters'")
    model = load_causal_lm(spec.get("model") or default_model, dtype="float32", device=device,
                           flag=f"{where}: model")
    features = mean_prompt_states(model, tokenizer, rows, int(spec.get("max_prompt_tokens", 512)), template=template)
    labels = kmeans_labels(features, k, int(spec.get("seed", 0)))
    groups: dict[str, list[dict[str, Any]]] = {f"cluster-{c}": [] for c in range(k)}
    for row, label in zip(rows, labels):
        groups[f"cluster-{label}"].append(row)
    logger.info("k-means over %d prompts: %s", len(rows), {g: len(r) for g, r in groups.items()})
    return groups
