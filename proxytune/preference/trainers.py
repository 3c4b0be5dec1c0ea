"""TRL's DPO and GRPO trainers as rl_tune.py runs them: setup, model card, saving."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from trl import DPOTrainer, GRPOTrainer

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import write_error
from proxytune.preference.arguments import RUN_CONFIG, RLArguments, RLModelArguments
from proxytune.preference.pairs import build_file_pairs, build_workbook_pairs, split_pairs
from proxytune.preference.policy import build_prompts, flat_metrics
from proxytune.preference.rewards import load_reward_model, make_reward_functions, parse_length_range, parse_reward_spec
from proxytune.task.papers import load_papers, select_examples
from proxytune.training.data import PreparedData
from proxytune.training.final import model_card, save_final
from proxytune.training.model import count_parameters
from proxytune.training.trainer import CheckpointReloadMixin, show_progress_as_lines

logger = logging.getLogger(__name__)


class RLDPOTrainer(CheckpointReloadMixin, DPOTrainer):
    """DPOTrainer on pairs this script tokenized. TRL's own tokenization appends an EOS to every chosen and rejected
    text that lacks one, which would erase the difference between an output that stopped and one cut off at
    max_new_tokens, the very thing reviewers rate; here a completion has an EOS only if the model wrote one."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)


class RLGRPOTrainer(CheckpointReloadMixin, GRPOTrainer):
    """GRPOTrainer with fine_tune.py's checkpoint reloading."""


def build_trainer(args: RLArguments, model, tokenizer, training_args, train_rows: list[dict], rewards):
    import datasets

    if args.method == "dpo":
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        train = datasets.Dataset.from_dict({k: [r[k] for r in train_rows] for k in columns})
        return show_progress_as_lines(RLDPOTrainer(model=model, args=training_args, train_dataset=train,
                                                   processing_class=tokenizer))
    functions, processing = rewards
    return show_progress_as_lines(RLGRPOTrainer(
        model=model, args=training_args, reward_funcs=functions, train_dataset=datasets.Dataset.from_list(train_rows),
        processing_class=tokenizer, reward_processing_classes=processing))


def rl_card_section(args: RLArguments, training_args, metrics: dict) -> str:
    """The model card's RL part: method, signal, and the before/after table."""
    if args.method == "dpo":
        signal = (f"preference pairs from `{args.workbook or args.pairs_file}` (DPO, beta {training_args.beta}, "
                  f"loss {','.join(training_args.loss_type)}); reference = the starting model")
    else:
        signal = (f"GRPO with rewards `{args.reward}`" + (f" + `{args.reward_model}` x {args.reward_model_weight}"
                                                            if args.reward_model else "")
                  + f"; {training_args.num_generations} completions per prompt, beta {training_args.beta}")
    lines = ["## Preference / reward tuning (rl_tune.py)", "", f"- {signal}", ""]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    if before:
        lines += [f"Greedy outputs on {before['examples']} papers of `{args.eval_split}`:", "",
                  "| measure | before | after |", "| --- | --- | --- |",
                  *[f"| {k} | {before[k]:.4g} | {after.get(k, float('nan')):.4g} |" for k in before if k != "examples"],
                  ""]
    for name, label in (("heldout_margin", "held-out margin"), ("train_margin", "training margin")):
        if metrics.get(name, {}).get("before"):
            b, a = metrics[name]["before"], metrics[name]["after"]
            lines += [f"- {label} (log p chosen - log p rejected, {b['pairs']} pairs): "
                      f"{b['mean_margin']:.3f} -> {a['mean_margin']:.3f}; accuracy {b['accuracy']:.2f} -> "
                      f"{a['accuracy']:.2f}"]
    return "\n".join(lines) + "\n"


def check_inputs(args: RLArguments) -> None:
    """The flags that belong to one method, and exactly one DPO source."""
    if args.method == "dpo":
        if bool(args.workbook) == bool(args.pairs_file):
            raise UsageError("--method dpo needs exactly one of --workbook (eval_examples.xlsx or ratings.jsonl) and "
                             "--pairs_file (JSONL of prompt, chosen, rejected)")
        if args.reward_model:
            raise UsageError("--reward_model is for --method grpo; DPO learns from --workbook/--pairs_file")
    else:
        if args.workbook or args.pairs_file:
            raise UsageError("--workbook/--pairs_file are for --method dpo; GRPO learns from --reward")
        parse_reward_spec(args.reward, args.reward_model)  # a typo in --reward stops before any loading
        parse_length_range(args.length_range)


def prepare(args: RLArguments, model_args: RLModelArguments, training_args, tokenizer):
    """Everything from the data before a model is loaded: (train rows, held-out pairs, eval papers, reward spec)."""
    rewards = None
    if args.method == "grpo":
        rewards = parse_reward_spec(args.reward, args.reward_model)
        parse_length_range(args.length_range)
        budget = training_args.max_length - training_args.max_completion_length

        papers = load_papers(args.dataset_path, args.split)
        papers = [papers[i] for i in select_examples(len(papers), args.max_train_samples, training_args.seed)]
        train_rows, heldout = build_prompts(papers, tokenizer, budget), []
    else:
        if args.workbook:
            pairs = build_workbook_pairs(args, tokenizer, training_args.max_length)
            source = f"--workbook {args.workbook}"
        else:
            pairs = build_file_pairs(Path(args.pairs_file), tokenizer, training_args.max_length)
            source = f"--pairs_file {args.pairs_file}"
        train_rows, heldout = split_pairs(pairs, args.eval_pairs_percentage, args.min_pairs, training_args.seed,
                                          source)
    n_eval = max(args.num_eval_examples, args.num_samples)
    eval_papers = load_papers(args.dataset_path, args.eval_split)[:n_eval] if n_eval else []
    return train_rows, heldout, eval_papers, rewards


def load_rewards(args: RLArguments, rewards: list[tuple[str, float]], tokenizer, model, training_args):
    """(reward functions, their processing classes) and, in training_args.reward_weights, their weights."""
    eos_ids = [tokenizer.eos_token_id]
    functions = make_reward_functions(rewards, eos_ids, parse_length_range(args.length_range), args.repetition_ngram)
    processing = [None] * len(functions)
    weights = [w for _, w in rewards]
    if args.reward_model:
        reward_model, reward_tokenizer = load_reward_model(args.reward_model)
        functions.append(reward_model)
        processing.append(reward_tokenizer)
        weights.append(args.reward_model_weight)
    training_args.reward_weights = weights
    return functions, processing


def log_startup(args, model_args, training_args, model, train_rows, heldout, plan) -> None:
    total, trainable = count_parameters(model)
    if args.method == "dpo":
        what = f"DPO on {len(train_rows)} preference pairs ({len(heldout)} held out), beta {training_args.beta}"
    else:
        what = (f"GRPO on {len(train_rows)} prompts of '{args.split}', {training_args.num_generations} completions of "
                f"<= {training_args.max_completion_length} tokens each, rewards {training_args.reward_weights} "
                f"({args.reward}{', + ' + args.reward_model if args.reward_model else ''}), beta {training_args.beta}")
    logger.info("rl_tune.py\n  %s", "\n  ".join([
        f"policy = reference: {model_args.model_name_or_path}; parameters {total:,}, trainable {trainable:,}"
        + (f" (LoRA r={model_args.lora_r})" if model_args.use_lora else ""),
        what,
        f"batch {training_args.per_device_train_batch_size} x {training_args.gradient_accumulation_steps}; lr "
        f"{training_args.learning_rate:g}; max_steps {training_args.max_steps}, "
        f"epochs {training_args.num_train_epochs}",
        f"output: {training_args.output_dir} (" + (f"resuming from {plan.resume_from.name}" if plan.resume_from
                                                   else "fresh start") + ")"]))


def save(trainer, tokenizer, args, model_args, training_args, metrics, samples, train_rows, heldout) -> Path:
    """final/ through save_final, with this script's card and config name."""
    description = (f"{len(train_rows)} preference pairs ({len(heldout)} held out)" if args.method == "dpo"
                   else f"{len(train_rows)} prompts of split '{args.split}' (GRPO)")
    data = PreparedData(train=train_rows, validation=heldout, samples=[], mode="meta_review",
                                  description=description)
    data_args = SimpleNamespace(dataset_path=args.workbook or args.pairs_file or args.dataset_path,
                                max_length=training_args.max_length)
    card = model_card(model_args, data_args, training_args, data, flat_metrics(metrics), samples,
                                script="rl_tune.py")
    card += "\n" + rl_card_section(args, training_args, metrics)
    curve = ["rewards/margins"] if args.method == "dpo" else ["reward"]
    try:
        return save_final(trainer, tokenizer, model_args, args, training_args, data, metrics, samples,
                                    run_config=RUN_CONFIG, card=card, curve_keys=curve)
    except OSError as err:
        raise write_error(Path(training_args.output_dir), err) from None
