"""The trainers as rl_tune.py runs them (TRL's DPO, GRPO and RLOO; our PPO): data, rewards, setup, the before/after
measures, model card, saving."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from trl import DPOTrainer, GRPOTrainer, RLOOTrainer

from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import write_error
from proxytune.preference.arguments import REWARD_METHODS, RUN_CONFIG, RLArguments, RLModelArguments
from proxytune.preference.pairs import build_file_pairs, build_workbook_pairs, split_pairs
from proxytune.preference.policy import (
    build_prompts,
    eval_samples,
    evaluate_policy,
    evaluate_rewards,
    flat_metrics,
    margin_summary,
    pair_margins,
)
from proxytune.preference.ppo_trainer import PPOTrainer
from proxytune.preference.rewards import make_reward_functions, parse_length_range, parse_reward_spec
from proxytune.task.papers import load_papers, select_examples
from proxytune.task.prompts import PromptTemplate, choose_template, read_template
from proxytune.training.classifier_scores import load_reward_model
from proxytune.training.data import PreparedData
from proxytune.training.final import generate_samples, model_card, save_final
from proxytune.training.model import count_parameters
from proxytune.training.text_prompts import length_summary, load_prompt_texts, parse_token_range, text_prompt_rows
from proxytune.training.trainer import CheckpointReloadMixin, show_progress_as_lines

logger = logging.getLogger(__name__)


class RLDPOTrainer(CheckpointReloadMixin, DPOTrainer):
    """DPOTrainer on pairs this script tokenized. TRL's own tokenization appends an EOS to every chosen and rejected
    text that lacks one, which would erase the difference between an output that stopped and one cut off at
    max_new_tokens, the very thing reviewers rate; here a completion has an EOS only if the model wrote one."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset.filter(lambda row: len(row["prompt_ids"]) < args.max_length)


class DrawnLengthMixin:
    """Each completion cut to its row's `completion_length` (--text_dataset's draw from --completion_length): TRL
    samples up to --max_completion_length for the whole batch, and the first n tokens of a sample are a sample of n
    tokens, so cutting afterwards draws the same distribution. Completions are cut before TRL decodes, scores and
    masks them, so the reward and the loss see exactly the cut completion."""

    def _generate_and_score_completions(self, inputs):
        self._drawn_lengths = [x.get("completion_length") for x in inputs]
        return super()._generate_and_score_completions(inputs)

    def _generate_single_turn(self, *args, **kwargs):
        out = super()._generate_single_turn(*args, **kwargs)
        ids, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        limits = getattr(self, "_drawn_lengths", None)
        if limits and len(limits) == len(ids) and all(limits):
            ids = [c[:n] for c, n in zip(ids, limits)]
            if rest and rest[0] is not None:  # GRPO's sampling log-probs (vLLM), cut alike
                rest = (([lp[:n] for lp, n in zip(rest[0], limits)]), *rest[1:])
        return (ids, *rest) if rest is not None else ids


class RLGRPOTrainer(CheckpointReloadMixin, DrawnLengthMixin, GRPOTrainer):
    """GRPOTrainer with fine_tune.py's checkpoint reloading and drawn completion lengths."""


class RLRLOOTrainer(CheckpointReloadMixin, DrawnLengthMixin, RLOOTrainer):
    """RLOOTrainer with fine_tune.py's checkpoint reloading and drawn completion lengths."""


def build_trainer(args: RLArguments, model, tokenizer, training_args, train_rows: list[dict], rewards):
    import datasets

    if args.method == "dpo":
        columns = ("prompt_ids", "chosen_ids", "rejected_ids")
        train = datasets.Dataset.from_dict({k: [r[k] for r in train_rows] for k in columns})
        return show_progress_as_lines(RLDPOTrainer(model=model, args=training_args, train_dataset=train,
                                                   processing_class=tokenizer))
    functions, _ = rewards
    if args.method == "ppo":
        return PPOTrainer(model, tokenizer, training_args, train_rows, functions, training_args.reward_weights)
    trainer_class = RLGRPOTrainer if args.method == "grpo" else RLRLOOTrainer
    return show_progress_as_lines(trainer_class(
        model=model, args=training_args, reward_funcs=functions, train_dataset=datasets.Dataset.from_list(train_rows),
        processing_class=tokenizer))


def rl_card_section(args: RLArguments, training_args, metrics: dict) -> str:
    """The model card's RL part: method, signal, and the before/after table."""
    if args.method == "dpo":
        signal = (f"preference pairs from `{args.workbook or args.pairs_file}` (DPO, beta {training_args.beta}, "
                  f"loss {','.join(training_args.loss_type)}); reference = the starting model")
    else:
        rewards = (f"`{args.reward}`" if args.reward else "") + (
            f"{' + ' if args.reward else ''}`{args.reward_model}`"
            + (f" class `{args.reward_label}` ({args.reward_score})" if args.reward_label else "")
            + f" x {args.reward_model_weight}" if args.reward_model else "")
        if args.method == "ppo":
            how = (f"{training_args.num_ppo_epochs} PPO epochs per batch of "
                   f"{training_args.per_device_train_batch_size} rollouts, KL beta {training_args.init_kl_coef}"
                   + (f" adaptive to target {training_args.target_kl}" if training_args.adaptive_kl else " fixed"))
        else:
            how = f"{training_args.num_generations} completions per prompt, beta {training_args.beta}"
        prompts = (f"prompts: the first {args.prompt_length} tokens of `{args.text_dataset}`, continued by "
                   f"{args.completion_length} tokens" if args.text_dataset else f"prompts: papers of `{args.split}`")
        signal = f"{args.method.upper()} with rewards {rewards}; {how}; {prompts}"
    lines = ["## Preference / reward tuning (rl_tune.py)", "", f"- {signal}", ""]
    before, after = metrics.get("before", {}), metrics.get("after", {})
    if before:
        what = (f"Sampled continuations of {before['examples']} held-out prompts" if args.text_dataset
                else f"Greedy outputs on {before['examples']} papers of `{args.eval_split}`")
        lines += [f"{what}:", "",
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
        if args.reward_model or args.text_dataset:
            raise UsageError("--reward_model/--text_dataset are for --method grpo, rloo or ppo; DPO learns from "
                             "--workbook/--pairs_file")
    else:
        if args.workbook or args.pairs_file:
            raise UsageError(f"--workbook/--pairs_file are for --method dpo; {args.method.upper()} learns from "
                             "--reward/--reward_model")
        rewards = parse_reward_spec(args.reward, args.reward_model)  # a typo in --reward stops before any loading
        parse_length_range(args.length_range)
        if args.reward_label and not args.reward_model:
            raise UsageError(f"--reward_label {args.reward_label} names a class of --reward_model; pass --reward_model")
        if args.text_dataset:
            parse_token_range(args.prompt_length, "--prompt_length")
            parse_token_range(args.completion_length, "--completion_length")
            if "rouge" in dict(rewards):
                raise UsageError("--reward rouge compares with a reference, and --text_dataset prompts have none; "
                                 "drop it (e.g. --reward '' with --reward_model)")


def paper_template(args: RLArguments, model_args: RLModelArguments) -> PromptTemplate | None:
    """The papers' prompt template: --prompt_template, else the one the policy's directory records (fine_tune.py's
    final/), else meta_review; a record that differs from the flag is warned about. None with --text_dataset."""
    if args.text_dataset:
        return None
    path = model_args.model_name_or_path
    return choose_template(args.prompt_template, [(f"--model_name_or_path {path}", read_template(path))])


def prepare(args: RLArguments, model_args: RLModelArguments, training_args, tokenizer,
            template: PromptTemplate | None = None):
    """Everything from the data before a model is loaded: (train rows, held-out pairs, eval items, reward spec).
    Eval items are papers (prompted with `template`), or with --text_dataset held-out text prompts."""
    rewards = None
    if args.method in REWARD_METHODS:
        rewards = parse_reward_spec(args.reward, args.reward_model)
        parse_length_range(args.length_range)
        if args.text_dataset:
            prompt_range = parse_token_range(args.prompt_length, "--prompt_length")
            completion_range = parse_token_range(args.completion_length, "--completion_length")
            training_args.max_completion_length = completion_range[1]  # each completion is cut to its draw
            # the longest prompt + completion (the model's context is checked against it, not the papers' 2048)
            training_args.max_length = min(training_args.max_length, prompt_range[1] + completion_range[1])
            train_texts, heldout_texts = load_prompt_texts(args, training_args.seed)
            train_rows = text_prompt_rows(train_texts, tokenizer, prompt_range, completion_range, training_args.seed)
            eval_rows = text_prompt_rows(heldout_texts[:max(args.num_eval_examples, args.num_samples)], tokenizer,
                                         prompt_range, completion_range, training_args.seed + 1, "heldout-")
            if not train_rows:
                raise UsageError(f"--text_dataset {args.text_dataset} has no text of at least {prompt_range[0]} "
                                 "tokens; check --text_column")
            return train_rows, [], eval_rows, rewards
        budget = training_args.max_length - training_args.max_completion_length
        papers = load_papers(args.dataset_path, args.split)
        papers = [papers[i] for i in select_examples(len(papers), args.max_train_samples, training_args.seed)]
        train_rows, heldout = build_prompts(papers, tokenizer, budget, template), []
    else:
        if args.workbook:
            pairs = build_workbook_pairs(args, tokenizer, training_args.max_length, template)
            source = f"--workbook {args.workbook}"
        else:
            pairs = build_file_pairs(Path(args.pairs_file), tokenizer, training_args.max_length)
            source = f"--pairs_file {args.pairs_file}"
        train_rows, heldout = split_pairs(pairs, args.eval_pairs_percentage, args.min_pairs, training_args.seed,
                                          source)
    n_eval = max(args.num_eval_examples, args.num_samples)
    eval_papers = load_papers(args.dataset_path, args.eval_split)[:n_eval] if n_eval else []
    return train_rows, heldout, eval_papers, rewards


def load_rewards(args: RLArguments, rewards: list[tuple[str, float]], tokenizer, training_args):
    """(reward functions, the classifier's ClassifierReward or None) and, in training_args.reward_weights, their
    weights. The classifier is wrapped as a function (proxytune.training.classifier_scores.ClassifierReward) for every
    method: it reads the named class, which TRL's own loading of a reward path does not."""
    eos_ids = [tokenizer.eos_token_id]
    functions = make_reward_functions(rewards, eos_ids, parse_length_range(args.length_range), args.repetition_ngram)
    weights = [w for _, w in rewards]
    classifier = None
    if args.reward_model:
        classifier = load_reward_model(args.reward_model, args.reward_label, args.reward_score, args.reward_input,
                                       device=training_args.device)
        functions.append(classifier)
        weights.append(args.reward_model_weight)
    training_args.reward_weights = weights
    return functions, classifier


def measure(args: RLArguments, model, tokenizer, training_args, eval_items: list[dict], reward_setup,
            heldout: list[dict], train_rows: list[dict], template: PromptTemplate | None = None) -> dict:
    """The before/after measures: papers decoded greedily and scored as evaluation.py does (with --text_dataset:
    held-out prompts continued by sampling and scored by the rewards), and DPO's pair margins."""
    out: dict = {}
    if args.text_dataset:
        functions, classifier = reward_setup
        out.update(evaluate_rewards(model, tokenizer, eval_items[:args.num_eval_examples], functions,
                                    training_args.reward_weights, classifier, training_args.seed)[0])
    else:
        out.update(evaluate_policy(model, tokenizer, eval_items[:args.num_eval_examples], training_args.max_length,
                                   args.max_new_tokens, template=template))
    if args.method == "dpo":
        out["heldout_margin"] = margin_summary(pair_margins(model, tokenizer, heldout))
        out["train_margin"] = margin_summary(pair_margins(model, tokenizer, train_rows))
    return out


def samples_of(args: RLArguments, model, tokenizer, training_args, eval_items: list[dict], reward_setup,
               template: PromptTemplate | None = None) -> list[dict]:
    """samples.jsonl: greedy meta-reviews of the first --num_samples papers, or sampled continuations of as many
    held-out text prompts with their reward."""
    if not args.num_samples:
        return []
    if args.text_dataset:
        functions, classifier = reward_setup
        return evaluate_rewards(model, tokenizer, eval_items[:args.num_samples], functions,
                                training_args.reward_weights, classifier, training_args.seed)[1]
    return generate_samples(model, tokenizer, eval_samples(eval_items[:args.num_samples], tokenizer,
                                                           training_args.max_length - args.max_new_tokens, template),
                            args.max_new_tokens)


def prompt_lengths(args: RLArguments, tokenizer, train_rows: list[dict]) -> dict:
    """--text_dataset: the prompt and completion lengths drawn (metrics.json's prompt_lengths)."""
    return length_summary(train_rows, tokenizer) if args.text_dataset else {}


def log_startup(args, model_args, training_args, model, train_rows, heldout, plan) -> None:
    total, trainable = count_parameters(model)
    if args.method == "dpo":
        what = f"DPO on {len(train_rows)} preference pairs ({len(heldout)} held out), beta {training_args.beta}"
    else:
        source = (f"text prompts of {args.text_dataset} ({args.prompt_length} tokens, continued by "
                  f"{args.completion_length})" if args.text_dataset else f"prompts of '{args.split}'")
        each = (f"{training_args.num_ppo_epochs} PPO epochs per batch, KL beta {training_args.init_kl_coef}"
                if args.method == "ppo" else f"{training_args.num_generations} completions each, beta "
                f"{training_args.beta}")
        what = (f"{args.method.upper()} on {len(train_rows)} {source}, <= {training_args.max_completion_length} "
                f"new tokens, {each}; rewards " + ", ".join(
                    [*(args.reward.split(",") if args.reward else []),
                     *([f"{args.reward_model}" + (f" class {args.reward_label}" if args.reward_label else "")
                        + f":{args.reward_model_weight}"] if args.reward_model else [])]))
    logger.info("rl_tune.py\n  %s", "\n  ".join([
        f"policy = reference: {model_args.model_name_or_path}; parameters {total:,}, trainable {trainable:,}"
        + (f" (LoRA r={model_args.lora_r})" if model_args.use_lora else ""),
        what,
        f"batch {training_args.per_device_train_batch_size} x {training_args.gradient_accumulation_steps}; lr "
        f"{training_args.learning_rate:g}; max_steps {training_args.max_steps}, "
        f"epochs {training_args.num_train_epochs}",
        f"output: {training_args.output_dir} (" + (f"resuming from {plan.resume_from.name}" if plan.resume_from
                                                   else "fresh start") + ")"]))


def save(trainer, tokenizer, args, model_args, training_args, metrics, samples, train_rows, heldout,
         template: PromptTemplate | None = None) -> Path:
    """final/ through save_final, with this script's card and config name (and the papers' prompt template)."""
    if args.method == "dpo":
        description = f"{len(train_rows)} preference pairs ({len(heldout)} held out)"
    elif args.text_dataset:
        description = f"{len(train_rows)} text prompts of {args.text_dataset} ({args.method.upper()})"
    else:
        description = f"{len(train_rows)} prompts of split '{args.split}' ({args.method.upper()})"
    data = PreparedData(train=train_rows, validation=heldout, samples=[],
                        mode="text" if args.text_dataset else "meta_review", description=description,
                        template=template)
    data_args = SimpleNamespace(dataset_path=args.workbook or args.pairs_file or args.text_dataset or args.dataset_path,
                                max_length=training_args.max_length)
    # the generic card shows a greedy meta-review sample; text prompts' sampled continuations go in the RL section
    card = model_card(model_args, data_args, training_args, data, flat_metrics(metrics),
                      [] if args.text_dataset else samples, script="rl_tune.py")
    card += "\n" + rl_card_section(args, training_args, metrics)
    if args.text_dataset and samples:
        card += "\n## Samples (held-out prompts, sampled)\n\n" + "".join(
            f"- `{s['prompt']}` -> `{s['completion']}` (reward {s['reward']:.3g})\n" for s in samples[:3])
    curve = ["rewards/margins"] if args.method == "dpo" else ["reward"]
    try:
        return save_final(trainer, tokenizer, model_args, args, training_args, data, metrics, samples,
                          run_config=RUN_CONFIG, card=card, curve_keys=curve)
    except OSError as err:
        raise write_error(Path(training_args.output_dir), err) from None
