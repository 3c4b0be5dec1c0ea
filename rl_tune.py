"""Tune the small tuned model on what reviewers and rewards say: DPO from the workbook's ratings; GRPO, RLOO or PPO
from rewards (built-in ones, or a classifier's score of a named class).

DPO: preference pairs from the ratings typed into evaluation.py's workbook (same paper: the higher-rated output is
chosen, the lower rejected, ties skipped; pairwise choices as given), the small tuned model as policy and reference:
    python rl_tune.py --method dpo --workbook outputs/evaluation/eval_examples.xlsx \
        --model_name_or_path outputs/pythia-70m-meta-review/final --output_dir outputs/rl-dpo

GRPO: sampled meta-reviews scored by built-in rewards (ROUGE-L against the reference, ending with EOS, length in a
range, repeated n-grams), weighted by flag, plus a learned reward model if you have one:
    python rl_tune.py --method grpo --reward rouge:1,eos:0.5,repetition:1 \
        --model_name_or_path outputs/pythia-70m-meta-review/final --output_dir outputs/rl-grpo
    python rl_tune.py --method grpo --reward rouge:1 --reward_model outputs/reward-model/final ...

Then steer with it: `python evaluation.py --small_tuned_model outputs/rl-grpo/final ...` (or steer.py).

RL from a classifier, the Mini-ChatGPT recipe: prompts are the first 2-8 tokens of IMDB reviews, the policy writes
4-16 tokens, and a sentiment classifier's POSITIVE logit is the reward (RLOO on TRL; PPO written here, with a value
head, GAE and the adaptive KL penalty: proxytune/preference/ppo.py):
    python rl_tune.py --method rloo --text_dataset stanfordnlp/imdb --reward_model lvwerra/distilbert-imdb \
        --reward_label POSITIVE --model_name_or_path EleutherAI/pythia-70m --output_dir outputs/rl-rloo-imdb
    python rl_tune.py --method ppo --text_dataset ../shared/data/imdb/imdb_partial.jsonl.gz \
        --reward_model path/to/sentiment-classifier --reward_label positive ... --output_dir outputs/rl-ppo-imdb

Every TrainingArguments flag works (PPO: those its own loop implements; it refuses the others, e.g.
--gradient_accumulation_steps), and the method's config flags (DPOConfig: --beta, --loss_type, ...; GRPOConfig and
RLOOConfig: --num_generations, --max_completion_length, --temperature, --beta, ...; PPO: --num_ppo_epochs, --cliprange,
--init_kl_coef, --target_kl, ...): `--method ppo --help` lists PPO's. TRL 1.16 has no PPO trainer (neither trl nor
trl.experimental); --method ppo is this project's, small and tested (docs/rl-from-a-reward.md says when to pick PPO,
RLOO or GRPO).

Layout of --output_dir: as fine_tune.py's (checkpoint-*/ resumed from the newest complete one, rl_tune_config.json,
final/ written atomically with model or adapter, tokenizer, README.md, metrics.json (before/after: greedy
ROUGE-L, EOS rate, repetition and reference NLL on validation papers; with --text_dataset, held-out prompts' mean
reward, positive rate, distinct-1/2 and length, and the prompt/completion lengths drawn; DPO: held-out
chosen-over-rejected margins),
trainer_state.json, training_curve.png, samples.jsonl, prompt_template.txt).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from proxytune.foundation.cli import cli, setup_logging
from proxytune.foundation.config import to_jsonable
from proxytune.foundation.outputs import write_error, write_json
from proxytune.models.loading import load_tokenizer
from proxytune.preference.arguments import RUN_CONFIG, RLArguments, RLModelArguments, parse_args
from proxytune.preference.trainers import (
    build_trainer,
    check_inputs,
    load_rewards,
    log_startup,
    measure,
    paper_template,
    prepare,
    prompt_lengths,
    samples_of,
    save,
)
from proxytune.training.checkpoints import FINAL_DIR, plan_run, warn_config_changes
from proxytune.training.model import apply_lora, load_model

logger = logging.getLogger("rl_tune")


def main(args: RLArguments, model_args: RLModelArguments, training_args) -> dict:
    """Train and write output_dir/final.

    Returns {"status": "trained"|"done", "final_dir", "metrics", "resumed_from"}."""
    from transformers import set_seed

    setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    check_inputs(args)
    out = Path(training_args.output_dir)
    plan = plan_run(training_args, RUN_CONFIG)
    if plan.done:
        logger.info("%s already holds a finished run (%s); pass --overwrite_output_dir to train again", out,
                    out / FINAL_DIR)
        metrics_path = out / FINAL_DIR / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        return {"status": "done", "final_dir": out / FINAL_DIR, "metrics": metrics, "resumed_from": None}

    set_seed(training_args.seed)
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=model_args.trust_remote_code, padding_side="left",
                               flag="--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    template = paper_template(args, model_args)
    train_rows, heldout, eval_items, rewards = prepare(args, model_args, training_args, tokenizer, template)
    model = load_model(model_args, tokenizer, training_args.max_length, training_args.seed)
    reward_setup = load_rewards(args, rewards, tokenizer, training_args) if rewards is not None else None

    metrics: dict[str, Any] = {"method": args.method, "train_rows": len(train_rows), "heldout_pairs": len(heldout),
                               **({"prompt_lengths": prompt_lengths(args, tokenizer, train_rows)}
                                  if args.text_dataset else {})}
    before = measure(args, model, tokenizer, training_args, eval_items, reward_setup, heldout, train_rows, template)
    if model_args.use_lora:
        model = apply_lora(model, model_args)
    log_startup(args, model_args, training_args, model, train_rows, heldout, plan)

    trainer = build_trainer(args, model, tokenizer, training_args, train_rows, reward_setup)
    run_config = to_jsonable(args, model_args, training_args)
    if training_args.should_save:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if plan.resume_from:
                warn_config_changes(out, run_config, RUN_CONFIG)
            write_json(out / RUN_CONFIG, run_config)
        except OSError as err:
            raise write_error(out, err) from None
    train_result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    metrics.update(train_result.metrics)
    metrics["global_step"] = trainer.state.global_step
    policy = trainer.model
    after = measure(args, policy, tokenizer, training_args, eval_items, reward_setup, heldout, train_rows, template)
    for name in ("heldout_margin", "train_margin"):  # DPO: {"before": ..., "after": ...}
        if name in before:
            metrics[name] = {"before": before.pop(name), "after": after.pop(name)}
    metrics["before"], metrics["after"] = before, after
    samples = samples_of(args, policy, tokenizer, training_args, eval_items, reward_setup, template)
    logger.info("before -> after: %s", {k: (metrics["before"].get(k), v) for k, v in metrics["after"].items()})
    final = save(trainer, tokenizer, args, model_args, training_args, metrics, samples, train_rows, heldout, template)
    logger.info("wrote %s: %s", final, ", ".join(sorted(p.name for p in final.iterdir())))
    return {"status": "trained", "final_dir": final, "metrics": metrics, "resumed_from": plan.resume_from}


if __name__ == "__main__":
    cli(lambda: main(*parse_args()))()
