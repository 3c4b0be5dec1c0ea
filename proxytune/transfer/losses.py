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


def token_nll(logits, labels):
    """(B, T, V) logits, (B, T) labels -> (B, T) negative log-likelihood of each next token; 0 where the label is
    -100. Position t predicts the label at t + 1."""
    import torch

    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    mask = labels != -100
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return nll * mask, mask


def target_loss(model, split, pad_token_id: int, batch_size: int = 8) -> float:
    """Mean NLL per target token (nats) of `model` on the split's meta-reviews + EOS, all tokens weighted alike (so
    it is comparable to fine_tune.py's eval_loss on one batch of everything)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(split, batch_size, pad_token_id, device):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            nll, mask = token_nll(logits, batch["labels"])
            total += float(nll.double().sum())
            count += int(mask.sum())
    return total / max(count, 1)


def log_odds_output(logits, labels):
    """The first-order method's output s_i of each example: the mean over its target tokens of the log-odds of the
    correct token, log p_c - log(1 - p_c) = z_c - logsumexp_{v != c} z_v (z the logits; this form stays finite where
    p_c rounds to 1). (B, T, V), (B, T) -> (B,)."""

    logits, labels = logits[:, :-1].float(), labels[:, 1:]  # (B, T-1, V), (B, T-1)
    mask = labels != -100
    index = labels.clamp(min=0).unsqueeze(-1)  # (B, T-1, 1)
    correct = logits.gather(-1, index).squeeze(-1)  # (B, T-1)
    others = logits.scatter(-1, index, float("-inf")).logsumexp(-1)  # (B, T-1)
    per_token = (correct - others) * mask
    return per_token.sum(-1) / mask.sum(-1).clamp(min=1)
