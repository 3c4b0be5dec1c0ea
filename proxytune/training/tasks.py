"""The three training tasks (language modelling, classification, regression): their data, trainer and final
evaluation."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import TrainerCallback
from transformers.trainer_utils import IntervalStrategy

from proxytune.foundation.errors import UsageError
from proxytune.task.processing import check_max_length
from proxytune.task.prompts import DEFAULT_TEMPLATE
from proxytune.training.arguments import DataArguments, FineTuneTrainingArguments
from proxytune.training.classification import build_classifier_trainer, evaluate_split, prepare_classification_data
from proxytune.training.data import (
    TEXT_SAMPLE_PROMPT_TOKENS,
    CausalLMCollator,
    PreparedData,
    check_dataset_path,
    dataset_template,
    limit,
    load_meta_review_dataset,
    load_text_dataset,
    to_training_features,
    tokenize_texts,
)
from proxytune.training.trainer import LMTrainer, show_progress_as_lines


def prepare_data(data_args: DataArguments, tokenizer, tokenizer_name: str, seed: int) -> PreparedData:
    """Load, tokenize and label the train/validation examples, and pick the prompts of the sample generations."""
    check_dataset_path(data_args.dataset_path)
    if data_args.task != "language_modeling":
        return prepare_classification_data(data_args, tokenizer, tokenizer_name, seed)
    mode = "text" if data_args.text_column else "meta_review"
    template = None
    if mode == "meta_review":
        template = dataset_template(data_args)
        check_max_length(tokenizer, data_args.max_length, template=template)
        dataset = load_meta_review_dataset(data_args, tokenizer, tokenizer_name, template=template)
        train = limit(dataset["train"], data_args.max_train_samples, seed)
        validation = limit(dataset["validation"], data_args.max_eval_samples, seed)
        test = limit(dataset["test"], data_args.max_eval_samples, seed) if "test" in dataset else None
        samples = [
            {"id": row["example_id"], "prompt_ids": list(row["input_ids"][: row["prompt_length"]]),
             "prompt": row["prompt"], "reference": row["Output"]}
            for row in validation.select(range(min(data_args.num_samples, len(validation))))
        ]
        description = ("meta-reviews (prompt masked, loss on meta-review + EOS)" if template.same_as(DEFAULT_TEMPLATE)
                       else f"prompt template {template.name} (prompt masked, loss on the response + EOS)")
    else:
        raw = load_text_dataset(data_args, seed)
        train = tokenize_texts(raw["train"], tokenizer, data_args.max_length, data_args.packing)
        validation = tokenize_texts(raw["validation"], tokenizer, data_args.max_length, data_args.packing)
        test = None
        samples = []
        for i, row in enumerate(validation.select(range(min(data_args.num_samples, len(validation))))):
            n = min(TEXT_SAMPLE_PROMPT_TOKENS, len(row["input_ids"]) // 2)
            samples.append({"id": str(i), "prompt_ids": list(row["input_ids"][:n]),
                            "prompt": tokenizer.decode(row["input_ids"][:n]),
                            "reference": tokenizer.decode(row["input_ids"][n:])})
        layout = "packed into blocks" if data_args.packing else "one example per row"
        description = f"plain text, column '{data_args.text_column}', {layout}, loss on all tokens"
    if len(train) == 0:
        raise UsageError(f"no training examples from {data_args.dataset_path} at --max_length {data_args.max_length}; "
                         "check the data, or lower --max_length in plain-text mode")
    return PreparedData(to_training_features(train, mode), to_training_features(validation, mode), samples, mode,
                        description, to_training_features(test, mode) if test is not None else None,
                        template=template)


def build_trainer(model, tokenizer, data: PreparedData, training_args: FineTuneTrainingArguments,
                  extra_callbacks: Sequence[TrainerCallback] = ()) -> LMTrainer:
    from transformers import EarlyStoppingCallback

    evaluating = training_args.eval_strategy != IntervalStrategy.NO
    if evaluating and len(data.validation) == 0:
        raise UsageError("the validation split is empty; raise --validation_split_percentage or pass "
                         "--eval_strategy no")
    callbacks: list[TrainerCallback] = list(extra_callbacks)
    if evaluating and training_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    if data.label_info is not None:
        return show_progress_as_lines(build_classifier_trainer(model, tokenizer, data, training_args, callbacks))
    # Tensor cores want sequence lengths in multiples of 8; on CPU that would only add padding.
    pad_multiple = 8 if (training_args.bf16 or training_args.fp16) else None
    return show_progress_as_lines(LMTrainer(
        model=model,
        args=training_args,
        data_collator=CausalLMCollator(tokenizer.pad_token_id, pad_multiple),
        train_dataset=data.train,
        eval_dataset=data.validation if evaluating else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    ))


def evaluate_final(trainer, data: PreparedData, train_metrics: dict, training_args) -> dict:
    """Training metrics plus the final model's validation loss/perplexity (the best checkpoint's, with
    load_best_model_at_end) and, with --do_predict, the test split's."""
    metrics = {**train_metrics, "train_examples": len(data.train), "validation_examples": len(data.validation),
               "global_step": trainer.state.global_step, "best_checkpoint": trainer.state.best_model_checkpoint}
    if data.label_info is not None:  # the same metrics, with the confusion matrix (evaluate_split)
        evaluate = lambda split, metric_key_prefix="eval": evaluate_split(  # noqa: E731
            trainer, split, metric_key_prefix, data.label_info)
    else:
        evaluate = lambda split=None, metric_key_prefix="eval": trainer.evaluate(  # noqa: E731
            split, metric_key_prefix=metric_key_prefix)
    if trainer.eval_dataset is not None:
        metrics.update(evaluate(trainer.eval_dataset))
    if training_args.do_predict and data.test is not None and len(data.test):
        metrics.update(evaluate(data.test, metric_key_prefix="test"))
        metrics["test_examples"] = len(data.test)
    return metrics
