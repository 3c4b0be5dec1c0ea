"""Building the model to train: config overrides, from scratch or pretrained, LoRA or bottleneck adapters."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError, first_line
from proxytune.models.adapters import BottleneckConfig, add_bottleneck_adapters
from proxytune.models.loading import default_device, load_causal_lm, resolve_dtype
from proxytune.models.quantization import quantization_bits
from proxytune.training.arguments import PRESETS, ModelArguments

VOCAB_MULTIPLE = 128


def parse_overrides(text: str | None) -> dict[str, Any]:
    """`parse_overrides("hidden_size=64,hidden_act=relu")` -> {'hidden_size': 64, 'hidden_act': 'relu'}."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--config_overrides item '{item}' is not key=value (e.g. 'hidden_size=64')")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def check_config_keys(config, keys, source: str) -> None:
    """Model configs accept unknown keys silently; a typo would train a model other than the one asked for."""
    import difflib

    known = set(type(config)().to_dict())
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(known))}"
            raise UsageError(f"{source}: '{key}' is not a field of {type(config).__name__}; {hint}")


def build_config(model_args: ModelArguments, tokenizer):
    """The config of a fresh model: a preset (vocab padded to a multiple of 128), or a config file/directory."""
    from transformers import AutoConfig, GPTNeoXConfig

    name = model_args.config_name
    if name in PRESETS:
        vocab = math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        config = GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=2048, **PRESETS[name])
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise UsageError(f"--config_name {name} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                             "config file or directory")
        try:
            if path.is_file():
                config_dict = json.loads(path.read_text(encoding="utf-8"))
                config = AutoConfig.for_model(**config_dict)
            else:
                config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_args.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"cannot read model config {path}: {first_line(err)}") from None
        check_config_keys(config, config.to_dict(), f"model config {path}")
    overrides = parse_overrides(model_args.config_overrides)
    check_config_keys(config, overrides, "--config_overrides")
    for key, value in overrides.items():
        setattr(config, key, value)
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def load_model(model_args: ModelArguments, tokenizer, max_length: int, seed: int, head: dict | None = None):
    """A pretrained model (float32 by default) or a fresh one from --config_name, with special ids aligned.
    `head` (training/classification.py's num_labels, id2label, ...): a sequence-classification head instead of the LM
    head."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    if model_args.config_name:
        config = build_config(model_args, tokenizer)
        config.update(head or {})
        set_seed(seed)  # the same seed gives the same initial weights
        auto = AutoModelForSequenceClassification if head else AutoModelForCausalLM
        model = auto.from_config(config, dtype=torch.float32, trust_remote_code=model_args.trust_remote_code)
    else:
        # Loaded on CPU; the Trainer moves it to this process's device (one per rank under torchrun).
        dtype = model_args.dtype
        if dtype == "auto":
            dtype = str(resolve_dtype("auto", default_device())).removeprefix("torch.")
        bits = quantization_bits(model_args.load_in_4bit, model_args.load_in_8bit)
        device = "cpu"
        if bits and default_device() == "cuda":  # quantised weights are placed at load; the Trainer cannot move them
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        model = load_causal_lm(model_args.model_name_or_path, dtype=dtype, device=device,
                               trust_remote_code=model_args.trust_remote_code, flag="--model_name_or_path", head=head,
                               quantize=bits, quantize_options=dict(
                                   compute_dtype=model_args.bnb_4bit_compute_dtype,
                                   quant_type=model_args.bnb_4bit_quant_type,
                                   double_quant=model_args.bnb_4bit_use_double_quant))
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise UsageError(f"the model has {rows} embedding rows but the tokenizer {len(tokenizer)} tokens; pass the "
                         "tokenizer the model was trained with (--tokenizer_name)")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise UsageError(f"--max_length {max_length} exceeds the model's context ({positions} positions); lower it")
    # Pythia's config says eos=0 but names no pad; generation and the saved config must know both (a classifier
    # finds its last real token by the pad id).
    for key in ("eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tokenizer, key))
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, key, getattr(tokenizer, key))
    model.train()
    return model


def apply_lora(model, model_args: ModelArguments, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a LoRA adapter; task_type SEQ_CLS (a classifier) also trains and saves the new `score` head."""
    from peft import LoraConfig, get_peft_model

    targets = model_args.lora_target_modules
    config = LoraConfig(
        task_type=task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
    )
    # The adapter records its base; an absolute path keeps it loadable from any working directory.
    base = Path(model_args.model_name_or_path).expanduser()
    config.base_model_name_or_path = str(base.resolve()) if base.is_dir() else model_args.model_name_or_path
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UsageError(f"LoRA: {first_line(err)}; check --lora_target_modules") from None


def apply_bottleneck(model, model_args: ModelArguments, task_type: str = "CAUSAL_LM"):
    """Add bottleneck adapters (proxytune/models/adapters.py) after every attention block and MLP, the rest frozen."""
    if task_type != "CAUSAL_LM":
        raise UsageError("--adapter bottleneck trains a causal LM's adapters only, and a classifier's new head would "
                         "stay untrained; use --use_lora (or no adapter) with --task classification/regression")
    # The adapter records its base; an absolute path keeps it loadable from any working directory.
    base = Path(model_args.model_name_or_path).expanduser()
    config = BottleneckConfig(str(base.resolve()) if base.is_dir() else model_args.model_name_or_path,
                              reduction_factor=model_args.reduction_factor,
                              non_linearity=model_args.adapter_non_linearity)
    return add_bottleneck_adapters(model, config)


def count_parameters(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
