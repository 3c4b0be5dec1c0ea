"""A sequence classifier read at one named class: its score of a text (the class's logit, log-odds or probability, or
a one-output head's value) and whether the class is its top one. rl_tune.py rewards with it (--reward_model
--reward_label); evaluation.py --text_dataset reports its positive rate and mean score, and a judge classifier's
positive rate."""

from __future__ import annotations

from pathlib import Path

from proxytune.foundation.errors import UsageError, first_line
from proxytune.foundation.hub import is_missing_local_path
from proxytune.models.loading import load_tokenizer
from proxytune.training.classification import CLASSIFIER_INFO, encode_input, load_classifier, template_of

# How a classifier's output becomes a score (ClassifierReward.scores).
REWARD_SCORES = ("logit", "log_odds", "probability")


# What the classifier reads: auto = the completion for a fine_tune.py classifier of meta-reviews (the prompt, the
# reviews' template, is not one), else prompt + completion (a whole review continued; TRL's reward-model convention).
REWARD_INPUTS = ("auto", "full", "completion")


def resolve_label(id2label: dict, num_labels: int, wanted: str | None, path: str, flag: str = "--reward_model",
                  label_flag: str = "--reward_label") -> int | None:
    """The class index `label_flag` names, by config.id2label's name (any case) or by index; None for a one-output
    head (its value is the score). `flag` and `label_flag` name the classifier's flags in the errors.

    `resolve_label({0: "NEGATIVE", 1: "POSITIVE"}, 2, "positive", "m")` -> 1."""
    names = [str(id2label.get(i, id2label.get(str(i), i))) for i in range(num_labels)]
    listing = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    if num_labels == 1:
        if wanted not in (None, "0", names[0]):
            raise UsageError(f"{flag} {path} has one output (a score), not classes; drop {label_flag} {wanted}")
        return None
    if wanted is None:
        raise UsageError(f"{flag} {path} has {num_labels} classes ({listing}); pass {label_flag} with the one to "
                         f"read, e.g. {label_flag} {names[-1]}")
    by_name = {n.lower(): i for i, n in enumerate(names)}
    if wanted.lower() in by_name:
        return by_name[wanted.lower()]
    if wanted.isdigit() and int(wanted) < num_labels:
        return int(wanted)
    raise UsageError(f"{flag} {path} has no label '{wanted}' (labels {listing}); pass one of these names or indices "
                     f"as {label_flag}")


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
        return self.score_logits(self.logits(texts))

    def score_logits(self, z) -> list[float]:
        """The score of each row of logits `z` (N, K)."""
        import torch

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


def load_reward_model(path: str, label: str | None, score: str, reads: str, device=None, flag: str = "--reward_model",
                      label_flag: str = "--reward_label") -> ClassifierReward:
    """A classifier (`flag`, read at the class `label_flag` names; their names are in the errors) as a
    ClassifierReward: fine_tune.py --task classification's final/ (its classifier.json gives the labels and the input
    template), or any AutoModelForSequenceClassification with its own tokenizer. `reads` "auto": the completion for a
    fine_tune.py classifier of meta-reviews, else prompt + completion."""
    from transformers import AutoModelForSequenceClassification

    if is_missing_local_path(path):
        raise UsageError(f"{flag} {path} does not exist; pass a sequence-classification model directory or Hub id")
    name = Path(path).name or path
    if (Path(path).expanduser() / CLASSIFIER_INFO).is_file():
        model, tokenizer, info = load_classifier(path, device=device, flag=flag)
        if info["task"] != "classification":
            raise UsageError(f"{flag} {path} is a {info['task']} model; pass a classifier "
                             "(fine_tune.py --task classification)")
        if reads == "auto" and info["classification_input"] == "meta_review":
            reads = "completion"  # trained on meta-reviews alone: the prompt (the reviews' template) is not one
        encode = lambda text: encode_input(text, tokenizer, info["max_length"],  # noqa: E731
                                           template_of(info))  # the template it was trained with
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load {flag} {path}: {first_line(err)}; pass a directory or Hub id of "
                             "an AutoModelForSequenceClassification") from None
        tokenizer = load_tokenizer(path, flag=flag, padding_side="right")
        model.config.pad_token_id = tokenizer.pad_token_id  # a decoder's head pools the last non-pad token
        limit = min(getattr(tokenizer, "model_max_length", 512) or 512, 4096)
        # the checkpoint's own special tokens ([CLS] ... [SEP] for BERT-like models), cut to its context
        encode = lambda text: tokenizer(text, truncation=True, max_length=limit)["input_ids"]  # noqa: E731
        if device is not None:
            model.to(device)
    target = resolve_label(model.config.id2label, model.config.num_labels, label, path, flag, label_flag)
    reads = "full" if reads == "auto" else reads  # TRL's convention: a reward model scores prompt + completion
    model.eval()
    return ClassifierReward(model, tokenizer, encode, target, score, reads, name)
