"""The rewards of GRPO, RLOO and PPO: built-in (ROUGE, EOS, length, repetition) and a sequence classifier's score of
one named class (or a one-output reward model), weighted."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from pathlib import Path

from proxytune.foundation.errors import UsageError, first_line, raise_problems
from proxytune.foundation.hub import is_missing_local_path
from proxytune.models.loading import load_tokenizer
from proxytune.preference.arguments import BUILTIN_REWARDS, DEFAULT_REWARD
from proxytune.task.text_metrics import make_rouge_scorer, repetition_rate, score_rouge
from proxytune.training.classification import CLASSIFIER_INFO, encode_input, load_classifier


# Rewards. TRL (and proxytune.preference.ppo_trainer) calls each as f(prompts=..., completions=...,
# completion_ids=..., <dataset columns>) with the completion text decoded without special tokens, so the EOS is seen
# in completion_ids: TRL keeps the ids up to and including the first EOS (GRPOTrainer._generate), so a completion that
# stopped ends with an EOS id.
def parse_reward_spec(spec: str, reward_model: str | None) -> list[tuple[str, float]]:
    """`parse_reward_spec("rouge:1,eos:0.5", None)` -> [('rouge', 1.0), ('eos', 0.5)]; a name alone weighs 1."""
    rewards, problems = [], []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, weight_text = item.partition(":")
        name = name.strip()
        if name not in BUILTIN_REWARDS:
            close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(BUILTIN_REWARDS)}"
            problems.append(f"--reward: unknown reward '{name}'; {hint}")
            continue
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            problems.append(f"--reward: weight '{weight_text}' of '{name}' is not a number; write name:weight, e.g. "
                            f"{name}:0.5")
            continue
        if not math.isfinite(weight) or weight < 0:
            problems.append(f"--reward: weight {weight_text} of '{name}' must be a finite number >= 0")
            continue
        if name in dict(rewards):
            problems.append(f"--reward names '{name}' twice; give each reward once")
            continue
        rewards.append((name, weight))
    raise_problems(problems)
    if not rewards and not reward_model:
        raise UsageError(f"--reward '{spec}' names no reward and there is no --reward_model; pass e.g. --reward "
                         f"{DEFAULT_REWARD}")
    if rewards and not reward_model and not any(w > 0 for _, w in rewards):
        raise UsageError(f"--reward '{spec}' gives every reward weight 0; give at least one a positive weight")
    return rewards


def parse_length_range(text: str) -> tuple[int, int]:
    """`parse_length_range("20,200")` -> (20, 200)."""
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--length_range '{text}' is not two whole numbers of words 'low,high', e.g. 20,200") from None
    if not 0 <= low <= high:
        raise UsageError(f"--length_range {text}: need 0 <= low <= high")
    return low, high


def length_score(words: int, low: int, high: int) -> float:
    """1 inside [low, high], falling linearly to 0 at 0 words and at 2 * high: `length_score(10, 20, 200)` -> 0.5."""
    if words < low:
        return words / low
    if words > high:
        return max(0.0, 1 - (words - high) / max(high, 1))
    return 1.0


def make_reward_functions(rewards: list[tuple[str, float]], eos_ids: Sequence[int], length_range: tuple[int, int],
                          ngram: int) -> list:
    """The built-in rewards as TRL reward functions, named after the reward (TRL logs rewards/<name>/mean)."""

    scorer = make_rouge_scorer()
    eos = set(eos_ids)

    def rouge(completions, reference, **_):
        return [score_rouge(scorer, c, r)["rougeL"] / 100 for c, r in zip(completions, reference)]

    def eos_reward(completions, completion_ids, **_):
        return [float(bool(ids) and ids[-1] in eos) for ids in completion_ids]

    def length(completions, **_):
        return [length_score(len(c.split()), *length_range) for c in completions]

    def repetition(completions, **_):
        return [-repetition_rate(c, ngram) for c in completions]

    eos_reward.__name__ = "eos"
    functions = {"rouge": rouge, "eos": eos_reward, "length": length, "repetition": repetition}
    return [functions[name] for name, _ in rewards]


def resolve_label(id2label: dict, num_labels: int, wanted: str | None, path: str) -> int | None:
    """The class index --reward_label names, by config.id2label's name (any case) or by index; None for a one-output
    head (its value is the score).

    `resolve_label({0: "NEGATIVE", 1: "POSITIVE"}, 2, "positive", "m")` -> 1."""
    names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(num_labels)]
    listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    if num_labels == 1:
        if wanted not in (None, "0", names[0]):
            raise UsageError(f"--reward_model {path} has one output (a score), not classes; drop --reward_label "
                             f"{wanted}")
        return None
    if wanted is None:
        raise UsageError(f"--reward_model {path} has {num_labels} classes ({listing}); pass --reward_label with the "
                         f"one to reward, e.g. --reward_label {names[-1]}")
    by_name = {n.lower(): i for i, n in enumerate(names)}
    if wanted.lower() in by_name:
        return by_name[wanted.lower()]
    if wanted.isdigit() and int(wanted) < num_labels:
        return int(wanted)
    raise UsageError(f"--reward_model {path} has no label '{wanted}' (labels {listing}); pass one of these names "
                     "or indices as --reward_label")


class ClassifierReward:
    """A sequence classifier as a reward function of TRL's signature, f(prompts, completions, **columns) -> floats:
    the score of one class (`label`) of the text it reads.

    Why not hand TRL the model itself: TRL loads a reward *path* with num_labels=1 and reads `logits[:, 0]`, which for
    a two-class sentiment model is a size error or the NEGATIVE class's logit. Here the class is named, and the text
    is encoded as the classifier was trained (fine_tune.py's template, or the checkpoint's own tokenizer).

    score, with z the logits (K classes) and c the class: logit = z_c; log_odds = log p_c - log(1 - p_c)
    = z_c - logsumexp_{k != c} z_k; probability = softmax(z)_c. A one-output head: score = z_0.
    """

    def __init__(self, model, tokenizer, encode, label: int | None, score: str, reads: str, name: str,
                 batch_size: int = 16):
        self.model, self.tokenizer, self.encode = model, tokenizer, encode
        self.label, self.score, self.reads, self.batch_size = label, score, reads, batch_size
        self.__name__ = name  # TRL logs rewards/<name>/mean

    def logits(self, texts: list[str]):
        """(N, K) float32 logits of `texts`, right-padded batches (the head pools the last non-pad token)."""
        import torch

        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids = [self.encode(t) or [pad] for t in texts[start:start + self.batch_size]]
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=device)  # (B, T)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            with torch.no_grad():
                out.append(self.model(input_ids=input_ids, attention_mask=mask).logits.float())  # (B, K)
        return torch.cat(out) if out else torch.zeros(0, self.model.config.num_labels)

    def scores(self, texts: list[str]) -> list[float]:
        import torch

        z = self.logits(texts)  # (N, K)
        if self.label is None:
            return z[:, 0].tolist()
        c = self.label
        if self.score == "logit":
            return z[:, c].tolist()
        if self.score == "probability":
            return torch.softmax(z, -1)[:, c].tolist()
        others = torch.cat([z[:, :c], z[:, c + 1:]], dim=1)  # (N, K-1)
        return (z[:, c] - torch.logsumexp(others, dim=1)).tolist()

    def is_label(self, texts: list[str]) -> list[bool]:
        """Whether the classifier's top class is `label` (the positive rate's numerator)."""
        return (self.logits(texts).argmax(-1) == self.label).tolist() if self.label is not None else []

    def texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        return [p + c for p, c in zip(prompts, completions)] if self.reads == "full" else list(completions)

    def __call__(self, prompts, completions, **_) -> list[float]:
        return self.scores(self.texts(prompts, completions))


def load_reward_model(path: str, label: str | None, score: str, reads: str, device=None) -> ClassifierReward:
    """--reward_model as a ClassifierReward: fine_tune.py --task classification's final/ (its classifier.json gives
    the labels and the input template), or any AutoModelForSequenceClassification with its own tokenizer. `reads`
    "auto": the completion for a fine_tune.py classifier of meta-reviews, else prompt + completion."""
    from transformers import AutoModelForSequenceClassification

    if is_missing_local_path(path):
        raise UsageError(f"--reward_model {path} does not exist; pass a sequence-classification model directory or "
                         "Hub id")
    name = Path(path).name or path
    if (Path(path).expanduser() / CLASSIFIER_INFO).is_file():
        model, tokenizer, info = load_classifier(path, device=device, flag="--reward_model")
        if info["task"] != "classification":
            raise UsageError(f"--reward_model {path} is a {info['task']} model; pass a classifier "
                             "(fine_tune.py --task classification)")
        if reads == "auto" and info["classification_input"] == "meta_review":
            reads = "completion"  # trained on meta-reviews alone: the prompt (the reviews' template) is not one
        encode = lambda text: encode_input(text, tokenizer, info["max_length"],  # noqa: E731
                                           info["classification_input"])
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load --reward_model {path}: {first_line(err)}; pass a directory or Hub id of "
                             "an AutoModelForSequenceClassification") from None
        tokenizer = load_tokenizer(path, flag="--reward_model", padding_side="right")
        model.config.pad_token_id = tokenizer.pad_token_id  # a decoder's head pools the last non-pad token
        limit = min(getattr(tokenizer, "model_max_length", 512) or 512, 4096)
        # the checkpoint's own special tokens ([CLS] ... [SEP] for BERT-like models), cut to its context
        encode = lambda text: tokenizer(text, truncation=True, max_length=limit)["input_ids"]  # noqa: E731
        if device is not None:
            model.to(device)
    target = resolve_label(model.config.id2label, model.config.num_labels, label, path)
    reads = "full" if reads == "auto" else reads  # TRL's convention: a reward model scores prompt + completion
    model.eval()
    return ClassifierReward(model, tokenizer, encode, target, score, reads, name)
