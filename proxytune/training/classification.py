"""Sequence classification and regression with fine_tune.py: a paper's decision (or average rating) from its reviews,
the decision a meta-review states, or the label of plain text (e.g. IMDB sentiment). fine_tune.py dispatches here on
--task; evaluation.py uses the trained classifier to ask whether a generated meta-review reaches the paper's real
decision (--decision_classifier), and rl_tune.py and evaluation.py --text_dataset read a text classifier at a named
class (proxytune.training.classifier_scores).

Meta-review -> decision (the classifier evaluation.py --decision_classifier wants), a fresh tiny model on a split
stratified by decision (processing_meta_review.py --stratify_by_column decision; a raw file works too):
    python fine_tune.py --task classification --label_column decision --classification_input meta_review \
        --config_name tiny --tokenizer_name ../shared/tokenizers/pythia --dataset_path outputs/meta_review_strat \
        --max_length 384 --num_train_epochs 2 --learning_rate 1e-3 --class_weights balanced \
        --eval_strategy epoch --save_strategy epoch --do_predict --output_dir outputs/decision-classifier

Reviews -> average rating (regression; class weights do not apply):
    python fine_tune.py --task regression --label_column avg_rating --config_name tiny \
        --tokenizer_name ../shared/tokenizers/pythia --dataset_path outputs/meta_review_strat --max_length 512 \
        --num_train_epochs 1 --eval_strategy epoch --save_strategy epoch --output_dir outputs/rating-regressor

From the lab's pretrained L, on the lab's split, with the lab's systems read by it: `python bench/bench_decision.py`.

Plain labelled text -> its label, e.g. a sentiment classifier for rl_tune.py's reward (IMDB's neg/pos named so that
`--reward_label positive` reads it; a file without splits holds out --validation_split_percentage):
    python fine_tune.py --task classification --classification_input text --text_column text \
        --label_column label --label_map neg=negative,pos=positive --model_name_or_path outputs/lab/small/final \
        --dataset_path ../shared/data/imdb/imdb_partial.jsonl.gz --max_length 64 --max_train_samples 4000 \
        --eval_strategy epoch --save_strategy epoch --output_dir outputs/sentiment-classifier

The model is GPTNeoXForSequenceClassification (AutoModelForSequenceClassification): a linear `score` head on the
hidden state of the LAST REAL token. transformers 5.24 finds that token as the rightmost one whose id is not
config.pad_token_id, whichever side the padding is on; so the pad id must never be a real last token. Pythia's
tokenizer has `<|padding|>` (id 1), distinct from EOS (id 0), and the input always ends with the cue below (never EOS),
so pad = eos (proxytune.models.loading.load_tokenizer's fallback) would be safe too.

Input: `{header}{text}{cue}`, the text cut token-wise (its head kept) so the whole fits --max_length; the cue is the
last token the head reads. The template, labels and settings are saved in final/classifier.json, and whoever reads
the classifier encodes with the template recorded there (template_of).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_causal_lm, load_tokenizer
from proxytune.task.reviews import normalise_label
from proxytune.training.data import PreparedData, limit, load_meta_review_dataset, load_text_dataset
from proxytune.training.trainer import LMTrainer

logger = logging.getLogger(__name__)


TASKS = ("language_modeling", "classification", "regression")


INPUTS = ("reviews", "meta_review", "text")


# (header, cue) around the text; one template per input, shared by training and evaluation.py. Plain text has no
# header (a review is read as it is) and a cue that names no task, since its labels can be anything.
INPUT_TEMPLATES = {"reviews": ("Peer reviews of a paper:\n\n", "\n\nVerdict:"),
                   "meta_review": ("Meta-review of a paper:\n\n", "\n\nVerdict:"),
                   "text": ("", "\n\nLabel:")}


# Where the text comes from in a processed row (processing_meta_review.py's columns).
INPUT_COLUMNS = {"reviews": "Input", "meta_review": "Output"}


CLASSIFIER_INFO = "classifier.json"


CLASS_WEIGHTS = ("none", "balanced")


def template_of(info: dict) -> tuple[str, str]:
    """The (header, cue) a trained classifier was trained with: its classifier.json's `template`, else (older files)
    the template of its `classification_input`."""
    template = info.get("template")
    return tuple(template) if template else INPUT_TEMPLATES[info["classification_input"]]


def encode_input(text: str, tokenizer, max_length: int, source: str | tuple[str, str]) -> list[int]:
    """The ids of `{header}{text}{cue}` with at most `max_length` tokens; only the text's tail is ever cut. `source`
    is an input name (INPUT_TEMPLATES) or a (header, cue) template.

    `encode_input("Accept.", tok, 64, "meta_review")` -> ids of 'Meta-review of a paper:\\n\\nAccept.\\n\\nVerdict:'.
    """
    header, cue = INPUT_TEMPLATES[source] if isinstance(source, str) else source
    head_ids = tokenizer(header, add_special_tokens=False)["input_ids"]
    cue_ids = tokenizer(cue, add_special_tokens=False)["input_ids"]
    budget = max_length - len(head_ids) - len(cue_ids)
    if budget < 1:
        raise UsageError(f"--max_length {max_length} leaves no room for the text: the classification template alone "
                         f"takes {len(head_ids) + len(cue_ids)} tokens; raise --max_length")
    body = tokenizer(text, add_special_tokens=False)["input_ids"][:budget]
    return head_ids + body + cue_ids


@dataclass
class ClassificationCollator:
    """Pad {input_ids, labels} rows to the longest in the batch, on `padding_side`. Labels are one per row:
    class ids (long) or targets (float, regression). The pad id is the config's, which is how the model finds the
    last real token (the rightmost non-pad), so left and right padding pool the same token."""

    pad_token_id: int
    regression: bool = False
    padding_side: str = "right"

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # (B, T)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            cols = slice(longest - n, longest) if self.padding_side == "left" else slice(0, n)
            input_ids[i, cols] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            attention_mask[i, cols] = 1
        labels = torch.tensor([f["labels"] for f in features],
                              dtype=torch.float32 if self.regression else torch.long)  # (B,)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def label_of(value: Any, task: str, column: str, split: str) -> Any:
    """A cell as a training label: text for classification (decisions are normalised), a float for regression.
    A non-numeric regression value is one error naming it."""

    if task == "classification":
        value = normalise_label(column, value)
        return None if value is None else str(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"--task regression needs numbers in --label_column {column}, but split '{split}' holds "
                         f"{value!r}; pass a numeric column (e.g. avg_rating), or --task classification") from None
    if not math.isfinite(number):
        raise UsageError(f"--task regression: --label_column {column} holds {value!r} in split '{split}'; fix or drop "
                         "that row")
    return number


def check_label_column(dataset, column: str, source: str) -> None:
    columns = dataset["train"].column_names
    if column not in columns:
        raise UsageError(f"--label_column {column} is not a column of {source} (columns: {', '.join(columns)}); "
                         "pass one of its label columns (processing_meta_review.py keeps decision and avg_rating), or "
                         "re-run processing_meta_review.py on a source that has it")


def parse_label_map(text: str) -> dict[str, str]:
    """--label_map as {value: class name}, in class order: `parse_label_map("neg=negative,pos=positive")` ->
    {"neg": "negative", "pos": "positive"}."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        value, sep, name = (x.strip() for x in item.partition("="))
        if not sep or not value or not name:
            raise UsageError(f"--label_map '{text}': '{item}' is not value=name; write e.g. 0=negative,1=positive")
        if value in pairs:
            raise UsageError(f"--label_map '{text}' names the value '{value}' twice; give each value one name")
        pairs[value] = name
    if len(set(pairs.values())) < 2:
        raise UsageError(f"--label_map '{text}' gives fewer than two class names; classification needs two or more")
    return pairs


def label_key(value: Any) -> str | None:
    """A label cell as --label_map writes values: `label_key(1)` and `label_key(1.0)` -> '1', text stripped, a blank
    or missing cell None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip() or None


def mapped_labels(values: list[Any], label_map: dict[str, str], column: str, split: str) -> list[str | None]:
    """The class names --label_map gives the cells (None for a blank one); a value it does not name is one error."""
    keys = [label_key(v) for v in values]
    unnamed = sorted({k for k in keys if k is not None and k not in label_map})
    if unnamed:
        raise UsageError(f"--label_column {column} holds {unnamed[:5]} in split '{split}', which --label_map does not "
                         f"name (it names {', '.join(label_map)}); add them, e.g. {unnamed[0]}=<name>")
    return [None if k is None else label_map[k] for k in keys]


def class_names(train_labels: list[str], splits: dict[str, list[str]], column: str,
                order: list[str] | None = None) -> list[str]:
    """The classes, sorted, from the training labels (or in `order`, --label_map's names, each of which the
    training split must show); one class, or a class the training split never shows in another split, is one
    error."""
    names = sorted(set(train_labels))
    if order:
        absent = [n for n in order if n not in names]
        if absent:
            raise UsageError(f"--label_map names {absent}, which no training row of --label_column {column} has; "
                             "drop them from --label_map, or use a training split that has them")
        names = list(order)
    if len(names) < 2:
        raise UsageError(f"--label_column {column} has a single class in the training split "
                         f"({names[0] if names else 'no labels'!r}); classification needs at least two")
    for split, labels in splits.items():
        unseen = sorted(set(labels) - set(names))
        if unseen:
            raise UsageError(f"split '{split}' has --label_column {column} values {unseen} that the training split "
                             f"lacks (classes: {', '.join(names)}); split with processing_meta_review.py "
                             f"--stratify_by_column {column}, or merge those classes")
    return names


def balanced_weights(counts: dict[str, int], names: list[str]) -> list[float]:
    """sklearn's 'balanced' class weights, n / (k * n_c): `balanced_weights({"a": 3, "b": 1}, ["a", "b"])` ->
    [0.667, 2.0]. Their count-weighted mean is 1, so the loss keeps its scale."""
    total = sum(counts.values())
    return [total / (len(names) * counts[name]) for name in names]


def prepare_classification_data(data_args, tokenizer, tokenizer_name: str, seed: int):
    """PreparedData (proxytune.training.data) for --task classification/regression: the rows of the processed dataset
    (or a raw file, processed on the fly) that have a label, encoded by encode_input, with the label map in
    `label_info`."""
    import datasets

    task, column, source = data_args.task, data_args.label_column, data_args.classification_input
    if source == "text":  # plain labelled rows: the text column is renamed 'text'
        dataset = load_text_dataset(data_args, seed, keep=[column])
        text_column = "text"
    else:
        dataset = load_meta_review_dataset(data_args, tokenizer, tokenizer_name, tokenize=False)
        check_label_column(dataset, column, data_args.dataset_path)
        text_column = INPUT_COLUMNS[source]
    label_map = parse_label_map(data_args.label_map) if data_args.label_map else None
    texts: dict[str, list[str]] = {}
    labels: dict[str, list[Any]] = {}
    unlabelled = {}
    for name, split in dataset.items():
        cells = list(split[column]) if column in split.column_names else [None] * len(split)
        named = mapped_labels(cells, label_map, column, name) if label_map else \
            [label_of(v, task, column, name) for v in cells]
        rows = list(zip(split[text_column], named))
        kept = [(t, y) for t, y in rows if y is not None and isinstance(t, str) and t.strip()]
        unlabelled[name] = len(rows) - len(kept)
        # --max_train_samples / --max_eval_samples: the same seeded sample as the language-modelling task
        cap = data_args.max_train_samples if name == "train" else data_args.max_eval_samples
        kept = limit(datasets.Dataset.from_dict({"text": [t for t, _ in kept], "label": [y for _, y in kept]}),
                     cap, seed)
        texts[name], labels[name] = list(kept["text"]), list(kept["label"])
    if any(unlabelled.values()):
        logger.warning("left out rows without a %s label: %s", column, unlabelled)
    if not labels["train"]:
        raise UsageError(f"no training rows of {data_args.dataset_path} have a {column} label; check --label_column")
    info: dict[str, Any] = {"task": task, "label_column": column, "classification_input": source,
                            "max_length": data_args.max_length, "template": list(INPUT_TEMPLATES[source]),
                            "class_weights": data_args.class_weights, "unlabelled_rows": unlabelled}
    if source == "text":
        info["text_column"] = data_args.text_column
    if label_map:
        info["label_map"] = label_map
    if task == "classification":
        names = class_names(labels["train"], {k: v for k, v in labels.items() if k != "train"}, column,
                            order=list(dict.fromkeys(label_map.values())) if label_map else None)
        label2id = {name: i for i, name in enumerate(names)}
        counts = {name: labels["train"].count(name) for name in names}
        info.update(labels=names, train_label_counts=counts,
                    head={"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": label2id,
                          "problem_type": "single_label_classification"})
        if data_args.class_weights == "balanced":
            info["weights"] = balanced_weights(counts, names)
        labels = {k: [label2id[y] for y in v] for k, v in labels.items()}
    else:
        values = labels["train"]
        if len(set(values)) < 2:
            raise UsageError(f"--label_column {column} has a single value in the training split; regression needs "
                             "targets that vary")
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        # The head has no bias and starts near 0: it learns standardised targets, and every prediction, metric and
        # plot is mapped back to the column's units (to_units).
        info.update(labels=None, train_mean=mean, train_std=std, head={"num_labels": 1, "problem_type": "regression"})
        labels = {k: [(y - mean) / std for y in v] for k, v in labels.items()}

    def encoded(name: str):
        ids = [encode_input(t, tokenizer, data_args.max_length, source) for t in texts[name]]
        return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels[name], "length": [len(x) for x in ids]})

    splits = {name: encoded(name) for name in dataset}
    train, validation, test = splits["train"], splits["validation"], splits.get("test")
    what = "classes " + ", ".join(f"{k} {v}" for k, v in info.get("train_label_counts", {}).items()) \
        if task == "classification" else f"targets with mean {info['train_mean']:.3g}"
    info["summary"] = f"{column}: {what}"
    loss = f"class weights {data_args.class_weights}" if task == "classification" else \
        "MSE loss on standardised targets"
    description = f"{task} of '{column}' from the {source.replace('_', '-')} (last-token pooling, {loss})"
    return PreparedData(train, validation, [], task, description, test, label_info=info)


def classification_metrics(predictions, labels, majority: int | None = None) -> dict[str, float]:
    """accuracy and macro-F1 (over the classes in labels or predictions, sklearn's default), and with `majority`
    the rate of always predicting that class. `classification_metrics([0, 1, 1], [0, 1, 0])` -> accuracy 2/3,
    macro_f1 (2/3 + 2/3) / 2."""
    import numpy as np

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out = {"accuracy": float((predictions == labels).mean())}
    f1s = []
    for c in np.union1d(predictions, labels):
        tp = int(((predictions == c) & (labels == c)).sum())
        fp = int(((predictions == c) & (labels != c)).sum())
        fn = int(((predictions != c) & (labels == c)).sum())
        f1s.append(2 * tp / (2 * tp + fp + fn))
    out["macro_f1"] = float(np.mean(f1s))
    if majority is not None:
        out["majority_rate"] = float((labels == majority).mean())
    return out


def regression_metrics(predictions, targets) -> dict[str, float | None]:
    """mse and Spearman's rank correlation (None when either side is constant)."""
    import numpy as np
    from scipy.stats import spearmanr

    predictions, targets = np.asarray(predictions, dtype=float).reshape(-1), np.asarray(targets, dtype=float)
    out: dict[str, float | None] = {"mse": float(((predictions - targets) ** 2).mean())}
    rho = spearmanr(predictions, targets).statistic if len(set(predictions)) > 1 and len(set(targets)) > 1 else None
    out["spearman"] = None if rho is None or math.isnan(rho) else float(rho)
    return out


def confusion_matrix(predictions, labels, n_classes: int) -> list[list[int]]:
    """counts[true][predicted]: `confusion_matrix([0, 1, 1], [0, 1, 0], 2)` -> [[1, 1], [0, 1]]."""
    counts = [[0] * n_classes for _ in range(n_classes)]
    for p, y in zip(predictions, labels):
        counts[int(y)][int(p)] += 1
    return counts


def to_units(values, info: dict):
    """Regression outputs and labels in the label column's units (the model learns standardised targets)."""
    import numpy as np

    return np.asarray(values, dtype=float).reshape(-1) * info["train_std"] + info["train_mean"]


def make_compute_metrics(info: dict):
    """The Trainer's compute_metrics for this task."""
    majority = None
    if info["task"] == "classification":
        counts = info["train_label_counts"]
        majority = info["labels"].index(max(counts, key=counts.get))

    def compute_metrics(eval_pred) -> dict:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if info["task"] == "classification":
            return classification_metrics(logits.argmax(-1), labels, majority)
        return regression_metrics(to_units(logits, info), to_units(labels, info))

    return compute_metrics


def _classifier_trainer_class():
    from transformers import Trainer

    class ClassifierTrainer(LMTrainer):
        """LMTrainer (proxytune.training.trainer: checkpoint reloading, seeded length-grouped batches, resume at the
        end) with the loss of a classifier: cross-entropy, class-weighted with --class_weights balanced, or MSE for
        regression.

        The loss is a sum over the batch divided by the examples of the whole accumulated batch (num_items_in_batch,
        which the Trainer counts from the labels), so it is already scaled for gradient accumulation."""

        loss_is_scaled_for_ga = True

        def __init__(self, *args, class_weights: list[float] | None = None, regression: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.class_weights, self.regression = class_weights, regression

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch
            import torch.nn.functional as F

            labels = inputs["labels"]  # (B,)
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            logits = outputs.logits  # (B, K); K = 1 for regression
            if self.regression:
                per_example = (logits.squeeze(-1).float() - labels.float()) ** 2
            else:
                per_example = F.cross_entropy(logits.float(), labels, reduction="none")
                if self.class_weights is not None:
                    per_example = per_example * torch.tensor(self.class_weights, device=logits.device)[labels]
            if num_items_in_batch is not None:
                loss = per_example.sum() / num_items_in_batch
                if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                    loss = loss * self.accelerator.num_processes  # the count is global, DDP averages the gradients
            else:
                steps = self.current_gradient_accumulation_steps if model.training else 1
                loss = per_example.sum() / (len(labels) * steps)
            return (loss, {"logits": logits}) if return_outputs else loss

        def evaluation_loop(self, *args, **kwargs):
            return Trainer.evaluation_loop(self, *args, **kwargs)  # no perplexity: the loss is not per token

    return ClassifierTrainer


def build_classifier_trainer(model, tokenizer, data, training_args, callbacks):
    info = data.label_info
    evaluating = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy)) != "no"
    return _classifier_trainer_class()(
        model=model, args=training_args, train_dataset=data.train,
        eval_dataset=data.validation if evaluating else None,
        data_collator=ClassificationCollator(tokenizer.pad_token_id, regression=info["task"] == "regression"),
        processing_class=tokenizer, callbacks=list(callbacks), compute_metrics=make_compute_metrics(info),
        class_weights=info.get("weights"), regression=info["task"] == "regression")


def evaluate_split(trainer, split, prefix: str, info: dict) -> dict:
    """The split's metrics (loss, accuracy, macro-F1 or MSE in the label's units and Spearman; a regression's loss is
    the MSE of the standardised targets) and, for classification, its confusion
    matrix (`{prefix}_confusion_matrix`, rows = true class); regression keeps the predictions for the plot in
    info["predictions"][prefix]."""
    output = trainer.predict(split, metric_key_prefix=prefix)
    metrics = dict(output.metrics)
    if info["task"] == "classification":
        metrics[f"{prefix}_confusion_matrix"] = confusion_matrix(output.predictions.argmax(-1), output.label_ids,
                                                                 len(info["labels"]))
    else:
        info.setdefault("predictions", {})[prefix] = (to_units(output.predictions, info).tolist(),
                                                      to_units(output.label_ids, info).tolist())
    return metrics


def plot_confusion(counts: list[list[int]], names: list[str], title: str, path: Path) -> None:
    """The confusion matrix as a PNG (rows: true class, columns: predicted), counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 + 1.1 * len(names)), 1.6 + 1.0 * len(names)), dpi=120)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    top = max(max(row) for row in counts) or 1
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_regression(predictions: list[float], targets: list[float], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    ax.scatter(targets, predictions, s=10, alpha=0.6)
    low, high = min(targets + predictions), max(targets + predictions)
    ax.plot([low, high], [low, high], color="grey", lw=1)
    ax.set_xlabel("true")
    ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_classifier_files(tmp: Path, data, metrics: dict) -> None:
    """final/'s classifier.json (task, label map, template, settings: what evaluation.py reads) and the confusion
    matrix PNG of the test split (with --do_predict) or the validation split; regression: a scatter plot."""
    info = {k: v for k, v in data.label_info.items() if k not in ("head", "summary", "predictions")}
    (tmp / CLASSIFIER_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    prefix = "test" if "test_loss" in metrics else "eval"
    predictions = data.label_info.get("predictions", {})
    split = {"test": "test", "eval": "validation"}[prefix]
    if f"{prefix}_confusion_matrix" in metrics:
        m = metrics
        title = (f"{info['label_column']}, {split} split\naccuracy {m[f'{prefix}_accuracy']:.3f}, macro-F1 "
                 f"{m[f'{prefix}_macro_f1']:.3f} (majority {m[f'{prefix}_majority_rate']:.3f})")
        plot_confusion(metrics[f"{prefix}_confusion_matrix"], info["labels"], title, tmp / "confusion_matrix.png")
    elif prefix in predictions:
        rho = metrics.get(f"{prefix}_spearman")
        title = f"{info['label_column']}, {split} split\nMSE {metrics[f'{prefix}_mse']:.3f}, Spearman " + \
            (f"{rho:.3f}" if rho is not None else "n/a")
        plot_regression(*predictions[prefix], title, tmp / "predictions.png")


def card_lines(data) -> list[str]:
    """The model card's section on the task, labels and pooling."""
    info = data.label_info
    lines = ["## Task", "", f"- {data.description}",
             f"- input: `{info['template'][0]!r}` + the {info['classification_input'].replace('_', '-')} + "
             f"`{info['template'][1]!r}`, cut to {info['max_length']} tokens",
             "- pooling: the hidden state of the last token that is not the pad token (the cue), then a linear head"]
    if info["task"] == "classification":
        lines += ["- labels (id: name, training examples): " + ", ".join(
            f"{i}: {n} ({info['train_label_counts'][n]})" for i, n in enumerate(info["labels"])),
            "", "![confusion matrix](confusion_matrix.png)"]
    lines += ["", "## Use", "", "```python", "from proxytune.training.classification import load_classifier, predict",
              "model, tokenizer, info = load_classifier(\"<this directory>\")",
              "predict(model, tokenizer, info, [\"The reviewers agree ... Accept.\"])", "```", ""]
    return lines


def read_classifier_info(path: str | Path, flag: str = "--decision_classifier") -> dict:
    """final/classifier.json of a `fine_tune.py --task classification` run, or one error naming `flag`."""
    file = Path(path).expanduser() / CLASSIFIER_INFO
    if not file.is_file():
        raise UsageError(f"{flag} {path} holds no {CLASSIFIER_INFO}; pass the final/ directory of a `fine_tune.py "
                         "--task classification` run")
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"{flag} {path}: {CLASSIFIER_INFO} is unreadable ({err}); "
                         "train the classifier again") from None
    return info


def load_classifier(path: str | Path, device: str | None = None, flag: str = "--decision_classifier"):
    """(model, tokenizer, info) of a trained classifier (a plain model, or a LoRA adapter on its base)."""

    info = read_classifier_info(path, flag)
    if info["task"] == "classification":
        names = info["labels"]
        head = {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {n: i for i, n in enumerate(names)}}
    else:
        head = {"num_labels": 1, "problem_type": "regression"}
    tokenizer = load_tokenizer(str(path), flag=flag)
    model = load_causal_lm(str(path), dtype="float32", device=device, flag=flag, head=head)
    if model.config.pad_token_id != tokenizer.pad_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id  # pooling finds the last token by this id
    return model, tokenizer, info


def predict(model, tokenizer, info: dict, texts: list[str], batch_size: int = 16) -> list[Any]:
    """The label (classification: its name) the classifier gives each text, encoded as in training."""
    import torch

    collator = ClassificationCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    out: list[Any] = []
    for start in range(0, len(texts), batch_size):
        rows = [{"input_ids": encode_input(t, tokenizer, info["max_length"], template_of(info)),
                 "labels": 0} for t in texts[start:start + batch_size]]
        batch = collator(rows)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits  # (B, K)
        if info["task"] == "classification":
            out += [info["labels"][i] for i in logits.argmax(-1).tolist()]
        else:
            out += to_units(logits.squeeze(-1).tolist(), info).tolist()
    return out
