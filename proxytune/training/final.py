"""The final model: samples, the training curve, the model card, saving it whole and pushing it to the Hub."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from proxytune.foundation.config import to_jsonable
from proxytune.foundation.errors import UsageError, first_line
from proxytune.foundation.outputs import atomic_directory, write_json
from proxytune.models.adapters import has_bottleneck_adapters, save_bottleneck_adapters
from proxytune.models.quantization import QUANTIZATION_RECORD, quantization_bits, quantization_record
from proxytune.task.prompts import DEFAULT_TEMPLATE, write_template
from proxytune.training.arguments import FineTuneTrainingArguments
from proxytune.training.checkpoints import FINAL_DIR, RUN_CONFIG
from proxytune.training.classification import card_lines, write_classifier_files
from proxytune.training.data import PreparedData

logger = logging.getLogger(__name__)


def generate_samples(model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int = 4) -> list[dict]:
    """Greedy continuations of the sample prompts, with whether each ended in EOS.

    Prompts are padded on the LEFT: generation appends at the last column, so right padding would put pad
    tokens between a prompt and its continuation.
    """
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        width = max(len(s["prompt_ids"]) for s in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # (B, T)
        for i, s in enumerate(chunk):
            n = len(s["prompt_ids"])
            input_ids[i, width - n:] = torch.as_tensor(s["prompt_ids"])
            attention_mask[i, width - n:] = 1
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       generation_config=config)  # (B, T + new)
        for s, row in zip(chunk, generated[:, width:].tolist()):
            stopped = tokenizer.eos_token_id in row
            new = row[: row.index(tokenizer.eos_token_id)] if stopped else row
            out.append({"id": s["id"], "prompt": s["prompt"], "reference": s["reference"],
                        "generation": tokenizer.decode(new, skip_special_tokens=True), "stopped_with_eos": stopped,
                        "new_tokens": len(new) + stopped})
    model.train(was_training)
    return out


def plot_training_curve(log_history: list[dict], path: Path, title: str = "fine_tune.py training curve",
                        extra_keys: Sequence[str] = ()) -> None:
    """Train and validation loss against optimizer step (PNG, matplotlib's Agg backend: no display needed); the
    logged values named in `extra_keys` (e.g. rl_tune.py's reward) on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" if extra_keys else "cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend(loc="upper left")
    extra = [(key, [(h["step"], h[key]) for h in log_history if key in h]) for key in extra_keys]
    if any(points for _, points in extra):
        right = ax.twinx()
        for (key, points), color in zip(extra, ("tab:green", "tab:red", "tab:purple", "tab:brown")):
            if points:
                right.plot(*zip(*points), color=color, linestyle="--", label=key)
        right.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(model_args, data_args, training_args, data: PreparedData, metrics: dict, samples: list[dict],
               script: str = "fine_tune.py") -> str:
    """README.md for final/: base model, data, hyperparameters, results, prompt, one sample."""
    base = None if model_args.config_name else model_args.model_name_or_path
    library = "peft" if model_args.use_lora and not model_args.merge_lora else "transformers"
    if getattr(model_args, "adapter", None) == "bottleneck":  # bottleneck_config.json: proxytune/models/adapters.py
        library = "proxytune"
    classifier = data.label_info is not None
    front = ["---", f"library_name: {library}",
             f"pipeline_tag: {'text-classification' if classifier else 'text-generation'}",
             f"tags: [meta-review, proxy-tuning, {script}]"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    origin = (f"fine-tuned from `{base}`" + (f" with LoRA (r={model_args.lora_r}, alpha={model_args.lora_alpha}, "
              f"{'merged' if model_args.merge_lora else 'adapter'})" if model_args.use_lora else "")
              if base else f"trained from scratch (config `{model_args.config_name}`)")
    if getattr(model_args, "adapter", None) == "bottleneck":
        origin += (f" with bottleneck adapters (reduction factor {model_args.reduction_factor}, "
                   f"{model_args.adapter_non_linearity}; not mergeable)")
    hyper = {
        "learning_rate": training_args.learning_rate, "lr_scheduler": training_args.lr_scheduler_type.value,
        "warmup_steps": training_args.warmup_steps, "epochs": training_args.num_train_epochs,
        "max_steps": training_args.max_steps, "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": training_args.world_size, "weight_decay": training_args.weight_decay,
        "max_length": data_args.max_length, "seed": training_args.seed,
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
    }
    results = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines = [*front, "", f"# {Path(training_args.output_dir).name}", "",
             f"A {'sequence classifier (GPTNeoXForSequenceClassification)' if classifier else 'causal LM'} {origin}, "
             f"written by `{script}`.", "", "## Data", "",
             f"- source: `{data_args.dataset_path}`", f"- {data.description}",
             f"- examples: train {len(data.train)}, validation {len(data.validation)}", "",
             "## Training hyperparameters", "", "| name | value |", "| --- | --- |",
             *[f"| {k} | {v} |" for k, v in hyper.items()], "", "## Results", "", "| metric | value |",
             "| --- | --- |", *[f"| {k} | {v:.4g} |" for k, v in results.items()], "",
             "![training curve](training_curve.png)", ""]
    if classifier:
        return "\n".join(lines + card_lines(data))
    if data.mode == "meta_review":
        template = data.template or DEFAULT_TEMPLATE
        target = "meta-review" if template.same_as(DEFAULT_TEMPLATE) else "response"
        lines += ["## Prompt", "", f"The target is ` <{target}><|endoftext|>`; the prompt is:", "", "```text",
                  template.describe(), "```", ""]
    lines += ["## Use", "", "```python", "from proxytune.models.loading import load_causal_lm, load_tokenizer",
              "model = load_causal_lm(\"<this directory>\")", "tokenizer = load_tokenizer(\"<this directory>\")",
              "```", ""]
    if samples:
        s = samples[0]
        lines += ["## A sample (greedy, validation set)", "", "```text", s["generation"].strip(), "```",
                  f"(ended with EOS: {s['stopped_with_eos']})", ""]
    return "\n".join(lines)


def save_final(trainer, tokenizer, model_args, data_args, training_args, data: PreparedData, metrics: dict,
               samples: list[dict], run_config: str = RUN_CONFIG, card: str | None = None,
               curve_keys: Sequence[str] = ()) -> Path:
    """Write output_dir/final atomically: a temporary directory beside it, renamed when complete. `card` replaces
    the model card, `curve_keys` go on the training curve (rl_tune.py's rewards)."""
    final = Path(training_args.output_dir) / FINAL_DIR
    model = trainer.model
    if model_args.use_lora and model_args.merge_lora:
        model = model.merge_and_unload()
    with atomic_directory(final, overwrite=True) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is meant to be shared
        if has_bottleneck_adapters(model):  # the adapters and their config only; the base is loaded from its own path
            save_bottleneck_adapters(model, tmp)
        else:  # safetensors; a peft model writes adapter_config.json + adapter_model.safetensors
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / run_config, to_jsonable(model_args, data_args, training_args))
        write_json(tmp / "metrics.json", metrics)
        trainer.state.save_to_json(str(tmp / "trainer_state.json"))
        script = run_config.removesuffix("_config.json") + ".py"
        plot_training_curve(trainer.state.log_history, tmp / "training_curve.png", f"{script} training curve",
                            curve_keys)
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
        bits = quantization_bits(model_args.load_in_4bit, model_args.load_in_8bit)
        if bits:  # load_causal_lm warns when the adapter is loaded otherwise
            write_json(tmp / QUANTIZATION_RECORD, quantization_record(bits, model_args.bnb_4bit_compute_dtype,
                                                                     model_args.bnb_4bit_use_double_quant,
                                                                     model_args.bnb_4bit_quant_type))
        if data.mode == "meta_review":
            write_template(tmp, data.template or DEFAULT_TEMPLATE)
        if data.label_info is not None:
            write_classifier_files(tmp, data, metrics)
        # After save_pretrained: peft writes a README.md of its own that this card replaces.
        card = card if card is not None else model_card(model_args, data_args, training_args, data, metrics, samples)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        for file in tmp.iterdir():
            file.chmod(0o644)  # some writers create private files; the result is meant to be shared
    return final


def push_final(final: Path, training_args: FineTuneTrainingArguments, hub_token: str | None = None) -> None:
    """Upload final/ (model, tokenizer, card, metrics). Trainer.push_to_hub is not used: it re-saves the model
    into output_dir and replaces the card with its own. The token comes from --hub_token, HF_TOKEN or
    `hf auth login`, and is never logged."""
    from huggingface_hub import HfApi

    api = HfApi(token=hub_token or training_args.hub_token)  # main() passes the token it took off training_args
    repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
    try:
        repo = api.create_repo(repo_id, private=training_args.hub_private_repo, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=str(final), commit_message="End of training",
                          revision=training_args.hub_revision)
    except Exception as err:  # network and auth failures come in many types
        raise UsageError(
            f"push to {repo_id} failed: {first_line(err)}; check `hf auth login` and --hub_model_id"
        ) from None
    logger.info("pushed %s to https://huggingface.co/%s", final, repo.repo_id)
