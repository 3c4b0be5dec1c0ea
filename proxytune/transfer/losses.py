"""What a model scores on meta-review examples: the loss on the target tokens, and the per-example output the
first-order estimate linearises (the log-odds of the correct token).

Every example is a row of a processed split: input_ids (prompt + meta-review + EOS) and prompt_length. Only the
target positions count: the meta-review and its EOS, as in fine_tune.py's training loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from proxytune.training.data import CausalLMCollator, build_labels


def batches(split, batch_size: int, pad_token_id: int, device) -> Iterator[dict[str, Any]]:
    """(input_ids, attention_mask, labels) batches, right-padded, with the prompt masked out of the labels."""
    collate = CausalLMCollator(pad_token_id)
    rows = split if isinstance(split, list) else split.to_list()
    for start in range(0, len(rows), batch_size):
        chunk = [{"input_ids": r["input_ids"], "labels": build_labels(r["input_ids"], r["prompt_length"])}
                 for r in rows[start:start + batch_size]]
        yield {k: v.to(device) for k, v in collate(chunk).items()}


def at_least_float32(x):
    """bfloat16/float16 -> float32 for the softmax; float32 and float64 as they are."""
    import torch

    return x.to(torch.promote_types(x.dtype, torch.float32))


def target_logits(model, batch: dict[str, Any]):
    """The model's logits from the first position that predicts a target token on, and the labels aligned with
    them -> ((B, K, V), (B, K)), K = T - (the batch's first target position - 1). The prompt positions before are not
    put through the output layer (a vocabulary-sized matrix product per position: on the labs' small S most of a
    forward's time, and a prompt is most of a row). Pass both to token_nll or log_odds_output."""
    labels = batch["labels"]  # (B, T)
    width = labels.shape[1]
    targets = labels != -100
    first = int(targets.int().argmax(-1)[targets.any(-1)].min()) if bool(targets.any()) else width
    keep = width - max(first - 1, 0)  # >= 1 (0 would mean every position to transformers)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return logits, labels[:, width - keep:]


def token_nll(logits, labels):
    """(B, T, V) logits, (B, T) labels -> (B, T-1) negative log-likelihood of each next token; 0 where the label is
    -100. Position t predicts the label at t + 1."""
    import torch

    logits, labels = at_least_float32(logits[:, :-1]), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1),
                                            reduction="none").view(labels.shape)  # rows of V: no transposed copy
    return nll * mask, mask


def target_loss(model, split, pad_token_id: int, batch_size: int = 8) -> float:
    """Mean NLL per target token (nats) of `model` on the split's meta-reviews + EOS, all tokens weighted alike (so
    it is comparable to fine_tune.py's eval_loss on one batch of everything)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(split, batch_size, pad_token_id, device):
            nll, mask = token_nll(*target_logits(model, batch))
            total += float(nll.double().sum())
            count += int(mask.sum())
    return total / max(count, 1)


def log_odds_output(logits, labels):
    """The first-order method's output s_i of each example: the mean over its target tokens of the log-odds of the
    correct token, log p_c - log(1 - p_c) = z_c - logsumexp_{v != c} z_v (z the logits; this form stays finite where
    p_c rounds to 1). (B, T, V), (B, T) -> (B,)."""

    logits, labels = at_least_float32(logits[:, :-1]), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    mask = labels != -100
    index = labels.clamp(min=0).unsqueeze(-1)  # (B, T-1, 1)
    correct = logits.gather(-1, index).squeeze(-1)  # (B, T-1)
    others = logits.scatter(-1, index, float("-inf")).logsumexp(-1)  # (B, T-1)
    per_token = (correct - others) * mask
    return per_token.sum(-1) / mask.sum(-1).clamp(min=1)
