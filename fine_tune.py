"""Fine-tune a causal LM (default Pythia-70m) to write a meta-review from peer reviews, and to stop.

Fine-tune on the dataset that processing_meta_review.py wrote (or a raw Input/Output file, processed on the fly):
    python fine_tune.py --dataset_path outputs/meta_review --output_dir outputs/pythia-70m-meta-review

LoRA, merged into the weights at the end (leave out --merge_lora to save an adapter directory instead):
    python fine_tune.py --dataset_path ../shared/data/meta_review/mred_val_longest.jsonl \
        --use_lora --merge_lora --learning_rate 5e-4 --output_dir outputs/pythia-70m-lora
(QLoRA: --use_lora --load_in_4bit, without --merge_lora; README "Quantised models".)

Bottleneck adapters instead (down-projection, ReLU or swish, up-projection after every attention block and MLP;
not mergeable: final/ holds bottleneck_adapter.safetensors + bottleneck_config.json, loaded on their base):
    python fine_tune.py --adapter bottleneck --reduction_factor 16 --adapter_non_linearity relu \
        --learning_rate 1e-3 --output_dir outputs/pythia-70m-bottleneck

Classify instead (a GPTNeoXForSequenceClassification head; proxytune/training/classification.py has the details and
more commands): the paper's decision from its meta-review, or `--task regression --label_column avg_rating` from the
reviews:
    python fine_tune.py --task classification --label_column decision --classification_input meta_review \
        --dataset_path outputs/meta_review --output_dir outputs/decision-classifier

Train a fresh GPT-NeoX from a size preset on plain text (loss on every token, texts packed into blocks):
    python fine_tune.py --config_name pythia-14m --tokenizer_name ../shared/tokenizers/pythia \
        --dataset_path ../shared/data/imdb/imdb_partial.jsonl.gz --text_column text --max_length 128 \
        --max_train_samples 4000 --output_dir outputs/pythia-14m-imdb

Every TrainingArguments flag works (`--help` lists them); defaults suited to this task are set in
`FineTuneTrainingArguments` (proxytune/training/arguments.py). Multi-GPU: `torchrun --nproc_per_node N fine_tune.py ...`
(DDP); precision: `--bf16`.
Hyperparameter search over these flags (a grid or ranges, Optuna, one worker or many): `--hp_search space.yaml`,
see proxytune/training/hp_search.py; then `python fine_tune.py OUTPUT_DIR/best.yaml` trains the winner.

Layout of --output_dir:
    checkpoint-*/            Trainer checkpoints; re-running the same command resumes from the newest complete one
    fine_tune_config.json    the resolved arguments of the run (tokens redacted)
    runs/                    TensorBoard logs (with --report_to tensorboard)
    final/                   the result, written atomically (temporary directory, then rename): model or LoRA
                             adapter + tokenizer (safetensors), README.md (model card), fine_tune_config.json,
                             metrics.json, trainer_state.json, training_curve.png, samples.jsonl and (meta-review
                             mode) prompt_template.txt/.json (the template the processed data records, or
                             --prompt_template; steer.py, evaluation.py and rl_tune.py read it back)
Pass `--output_dir .../final` to steer.py and evaluation.py (proxytune.models.loading.load_causal_lm loads models,
LoRA and bottleneck adapters).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from proxytune.foundation.cli import cli, setup_logging
from proxytune.foundation.config import to_jsonable
from proxytune.foundation.hub import check_hub_for_push
from proxytune.foundation.outputs import write_error, write_json
from proxytune.models.loading import load_tokenizer
from proxytune.models.quantization import prepare_quantized_for_lora, quantization_bits
from proxytune.training.arguments import DataArguments, FineTuneTrainingArguments, ModelArguments, parse_args
from proxytune.training.checkpoints import FINAL_DIR, RUN_CONFIG, list_checkpoints, plan_run, warn_config_changes
from proxytune.training.disk import check_disk_space, estimate_disk_needs, output_failure
from proxytune.training.final import generate_samples, push_final, save_final
from proxytune.training.hp_search import run_search
from proxytune.training.model import apply_bottleneck, apply_lora, load_model
from proxytune.training.tasks import build_trainer, evaluate_final, prepare_data
from proxytune.training.trainer import finish_distributed, log_startup

logger = logging.getLogger("fine_tune")


def main(model_args: ModelArguments, data_args: DataArguments, training_args: FineTuneTrainingArguments,
         callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train and write output_dir/final. Returns {"status": "trained"|"done", "final_dir", "metrics",
    "resumed_from"}; with --hp_search, run_search's summary instead. `callbacks` go to the Trainer."""
    from transformers import set_seed

    if data_args.hp_search:
        return run_search(model_args, data_args, training_args, train=main)

    setup_logging(logging.INFO if training_args.should_log else logging.WARNING)
    out = Path(training_args.output_dir)
    if training_args.push_to_hub:
        check_hub_for_push()
    with training_args.main_process_first(local=False, desc="inspecting output_dir"):
        plan = plan_run(training_args)
    if plan.done:
        logger.info("%s already holds a finished run (%s); pass --overwrite_output_dir to train again, or "
                    "--resume_from_checkpoint to continue", out, out / FINAL_DIR)
        metrics_path = out / FINAL_DIR / "metrics.json"
        metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
        return {"status": "done", "final_dir": out / FINAL_DIR, "metrics": metrics, "resumed_from": None}

    set_seed(training_args.seed)
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=model_args.trust_remote_code,
                               flag="--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    saved_max_length, tokenizer.model_max_length = tokenizer.model_max_length, int(1e30)  # measure long reviews whole
    data = prepare_data(data_args, tokenizer, tokenizer_name, training_args.seed)
    tokenizer.model_max_length = saved_max_length
    head = data.label_info["head"] if data.label_info else None
    model = load_model(model_args, tokenizer, data_args.max_length, training_args.seed, head)
    if model_args.use_lora:
        if quantization_bits(model_args.load_in_4bit, model_args.load_in_8bit):
            model = prepare_quantized_for_lora(model, training_args.activation_checkpointing)
        model = apply_lora(model, model_args, "SEQ_CLS" if head else "CAUSAL_LM")
    elif model_args.adapter == "bottleneck":
        model = apply_bottleneck(model, model_args, "SEQ_CLS" if head else "CAUSAL_LM")
    if (model_args.use_lora or model_args.adapter == "bottleneck") and training_args.activation_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input with frozen embeddings
    run_config = to_jsonable(model_args, data_args, training_args)
    # The Trainer's own pushes would copy checkpoint files into output_dir and write its own card; final/ is
    # pushed once at the end instead (push_final).
    push, training_args.push_to_hub = training_args.push_to_hub, False
    # The Trainer pickles its arguments into every checkpoint (training_args.bin); the token must not be in them.
    hub_token, training_args.hub_token = training_args.hub_token, None
    needs = estimate_disk_needs(model, model_args, training_args, len(list_checkpoints(out)))
    if training_args.should_save:
        check_disk_space(out, needs)  # before the Trainer, which creates output_dir
    trainer = build_trainer(model, tokenizer, data, training_args, callbacks)
    log_startup(model_args, data_args, training_args, data, model, plan, needs)
    if training_args.should_save:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if plan.resume_from:
                warn_config_changes(out, run_config)
            write_json(out / RUN_CONFIG, run_config)
        except OSError as err:
            raise write_error(out, err, "--output_dir", needs.checkpoint + needs.final) from None

    try:
        train_result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)
    except Exception as err:  # safetensors, torch.save and json each report a full disk in their own way
        failure = output_failure(out, err, needs, training_args.should_save)
        if failure is None:
            raise
        raise failure from None
    metrics = evaluate_final(trainer, data, train_result.metrics, training_args)
    result = {"status": "trained", "final_dir": out / FINAL_DIR, "metrics": metrics, "resumed_from": plan.resume_from}
    if not trainer.is_world_process_zero():
        finish_distributed()
        return result

    samples = generate_samples(trainer.model, tokenizer, data.samples, data_args.max_new_tokens,
                               training_args.per_device_eval_batch_size) if data.samples else []
    if samples:
        metrics["samples_stopped_with_eos"] = sum(s["stopped_with_eos"] for s in samples) / len(samples)
    trainer.log_metrics("final", {k: v for k, v in metrics.items() if v is not None and not isinstance(v, list)})
    try:
        final = save_final(trainer, tokenizer, model_args, data_args, training_args, data, metrics, samples)
    except Exception as err:  # atomic_directory has removed the partial final/
        failure = output_failure(out, err, needs, True)
        if failure is None:
            raise
        raise failure from None
    logger.info("wrote %s: %s", final, ", ".join(sorted(p.name for p in final.iterdir())))
    finish_distributed()
    if push:
        push_final(final, training_args, hub_token)
    return result


if __name__ == "__main__":
    cli(lambda: main(*parse_args()))()
