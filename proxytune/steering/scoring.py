"""Teacher-forced scoring of targets under a blend, and the blend's NLL from cached log-probs (what --tune
minimises)."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import torch

from proxytune.foundation.progress import progress_bar
from proxytune.steering.blend import LARGE, SMALL_BASE, SMALL_TUNED, Blend, blend_logprobs, mix_logprobs, slice_vocab
from proxytune.steering.decoding import left_pad, model_context, positions_from_mask
from proxytune.steering.shared_base import forward_kwargs, pair_names, paired, paired_adapter, split_pair

CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        raise ValueError(f"need as many targets as prompts, at least one: "
                         f"got {n} prompts and {len(target_ids)} targets")
    context = model_context(models)
    for i, (p, t) in enumerate(zip(prompt_ids, target_ids)):
        if not p or not t:
            raise ValueError(f"example {i}: the prompt ({len(p)} tokens) and the target ({len(t)}) must not be empty")
        if len(p) + len(t) > context:
            raise ValueError(f"example {i}: prompt + target = {len(p)} + {len(t)} tokens "
                             f"exceeds the context ({context})")
    if blend is not None and not {LARGE, SMALL_TUNED, SMALL_BASE} <= set(models):
        raise ValueError(f"scoring a blend needs models {LARGE}, {SMALL_TUNED}, {SMALL_BASE}; got {sorted(models)}")
    cache_device = torch.device(cache_device or next(iter(models.values())).device)
    # S_tuned a LoRA adapter on S's weights: one forward of 2B rows serves both (steering/shared_base.py).
    adapter = paired_adapter(models.get(SMALL_BASE), models.get(SMALL_TUNED))

    result = {name: torch.zeros(n, dtype=torch.float64) for name in [*models, *(["blend"] if blend else [])]}
    result["n_tokens"] = torch.tensor([len(t) for t in target_ids], dtype=torch.long)
    rows = {name: [] for name in keep_logprobs}
    row_targets, row_examples = [], []
    # Longest first, so batches hold similar lengths and the first batch shows whether memory suffices.
    order = sorted(range(n), key=lambda i: -(len(prompt_ids[i]) + len(target_ids[i])))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    for idx in progress_bar(batches, desc="scoring", unit="batch", disable=not show_progress):
        # Left padding puts every target at the right edge, so only the last (t_max + 1) positions need logits.
        ids, mask = left_pad([prompt_ids[i] + target_ids[i] for i in idx], pad_token_id)  # (B, L)
        positions = positions_from_mask(mask)
        t_len = torch.tensor([len(target_ids[i]) for i in idx])
        t_max = int(t_len.max())
        targets = ids[:, -t_max:].to(cache_device)  # (B, t_max) right-aligned target tokens
        valid = (torch.arange(t_max) >= t_max - t_len[:, None]).to(cache_device)  # (B, t_max) False left of a target
        logps = {}
        for name, model in models.items():
            if name == SMALL_BASE and adapter:
                continue  # computed with S_tuned's rows
            dev = model.device
            pair = adapter is not None and name == SMALL_TUNED
            twice = paired if pair else (lambda t: t)  # S_tuned on S's weights: S's rows, then S_tuned's
            logits = model(input_ids=twice(ids).to(dev), attention_mask=twice(mask).to(dev),
                           position_ids=twice(positions).to(dev), use_cache=False, logits_to_keep=t_max + 1,
                           **forward_kwargs(pair_names(adapter, len(idx)) if pair else None)
                           ).logits  # (B, t_max + 1, V_model), or (2B, ...) paired
            # position j predicts token j + 1: drop the last position, which predicts past the target
            logp = torch.log_softmax(slice_vocab(logits[:, :-1], vocab_size).float(), dim=-1).to(cache_device)
            if pair:
                logps[SMALL_BASE], logps[SMALL_TUNED] = split_pair(logp)  # (B, t_max, V) each
            else:
                logps[name] = logp  # (B, t_max, V)
        logps = {name: logps[name] for name in models}  # the models' order
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
    """blend_nll through blend_logprobs itself: the normalised (r, V) blend per chunk of rows, then the target's
    entry."""
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
        NLL(c) = mean_r [log Z_r(c) - c . x_r(y_r)],
        gradient = mean_r [E_p[x_r] - x_r(y_r)],
        Hessian = mean_r Cov_p[x_r].
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
