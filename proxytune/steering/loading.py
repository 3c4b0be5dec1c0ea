"""The models steer.py runs: filling model paths from a blend file or defaults, loading them, recording them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from proxytune.foundation.errors import UsageError
from proxytune.foundation.hub import hub_revision, is_missing_local_path
from proxytune.models.loading import DEFAULT_MODELS, check_same_vocab, load_causal_lm, load_tokenizer, vocab_size_of
from proxytune.models.quantization import (
    DOUBLE_QUANT,
    QUANT_TYPE,
    QuantizationArguments,
    describe_quantization,
    loaded_quantization,
)
from proxytune.steering.arguments import ModelArguments
from proxytune.steering.blend import LARGE, LARGE_TUNED, MODEL_ROLES, SMALL_BASE, SMALL_TUNED
from proxytune.steering.records import blend_models, model_record, recorded_model, same_model
from proxytune.steering.shared_base import paired_adapter, share_or_merge

logger = logging.getLogger(__name__)


def check_model_path(name_or_path: str, flag: str) -> None:
    """A path that cannot be a Hub id ('org/name') and does not exist is a typo: say so before loading anything."""
    if is_missing_local_path(name_or_path):
        raise UsageError(f"--{flag} {name_or_path} does not exist; pass a Hub id (e.g. EleutherAI/pythia-70m) or a "
                         "directory written by fine_tune.py / save_pretrained")


def resolve_model_args(args: ModelArguments, blend_file: str | None = None) -> ModelArguments:
    """Fill the model flags left out: from the models the --blend file records, else DEFAULT_MODELS (fill_models),
    and each role's quantisation flags left out from the record, else unquantised (fill_quantization)."""
    filled = fill_models({role: getattr(args, f"{role}_model") for role in MODEL_ROLES}, blend_file, DEFAULT_MODELS)
    return dataclasses.replace(args, **{f"{role}_model": model for role, model in filled.items()},
                               **fill_quantization(args, MODEL_ROLES, blend_file))


def fill_models(given: dict[str, str | None], blend_file: str | None, defaults: dict[str, str]) -> dict[str, str]:
    """{role: model} for the roles of `given` left out (None): the model the blend file records (blend_models),
    else `defaults`. Used by steer.py and evaluation.py.

    A flag given explicitly wins; when it names another model than the record, or the Hub cache now holds another
    revision of a recorded Hub model, that is logged as a warning (the blend was tuned for the recorded models).
    """
    record = blend_models(blend_file) if blend_file else {}
    filled, sources = {}, []
    for role, flag in given.items():
        entry = record.get(role)
        if flag is not None and entry and not same_model(flag, recorded_model(entry)):
            logger.warning("--%s_model %s is not %s, which the blend %s was tuned with; using %s", role, flag,
                           entry["name_or_path"], blend_file, flag)
        elif flag is None and entry:
            filled[role] = recorded_model(entry)
            sources.append(f"{role}={filled[role]} (from {blend_file})")
        elif flag is None and role in defaults:
            filled[role] = defaults[role]
            sources.append(f"{role}={defaults[role]} (default)")
        name = filled.get(role, flag)
        if entry and entry.get("revision") and same_model(name, recorded_model(entry)):
            now = hub_revision(name)
            if now and now != entry["revision"]:
                logger.warning("%s: the Hub cache holds revision %s of %s, the blend %s was tuned with revision %s",
                               role, now, name, blend_file, entry["revision"])
    if sources:
        logger.info("models not given as flags: %s", ", ".join(sources))
    return filled


def fill_quantization(args: QuantizationArguments, roles: Sequence[str], blend_file: str | None) -> dict[str, bool]:
    """The --{role}_load_in_4bit / _8bit values of `roles`, for dataclasses.replace: a role with either flag given
    keeps its flags (the other False); a role with neither is loaded as the blend file records it (model_record's
    `quantization`), else unquantised, which is how a blend file without the record always loaded. Used by steer.py
    and evaluation.py.

    A flag given explicitly wins; when it loads a recorded role otherwise than the blend was tuned with, that is
    logged as a warning. The compute dtype is the role's dtype flag's (auto: by device), the record's is logged.
    """
    record = blend_models(blend_file) if blend_file else {}
    flags, sources = {}, []
    for role in roles:
        given = {bits: getattr(args, f"{role}_load_in_{bits}bit") for bits in (4, 8)}
        entry = record.get(role)
        recorded = (entry or {}).get("quantization")
        if all(value is None for value in given.values()):
            bits = recorded["bits"] if recorded else None
            if recorded:
                sources.append(f"{role} {describe_quantization(recorded)}")
        else:
            bits = args.quantization_of(role)
            if entry and "quantization" in entry and bits != (recorded or {}).get("bits"):
                logger.warning("%s loads %s %s; the blend %s was tuned with it %s", " ".join(
                    f"--{role}_load_in_{b}bit {str(v).lower()}" for b, v in given.items() if v is not None), role,
                    f"{bits}-bit" if bits else "unquantised", blend_file, describe_quantization(recorded))
        if bits == 4 and recorded and recorded["bits"] == 4 and (
                recorded.get("quant_type"), recorded.get("double_quant")) != (QUANT_TYPE, DOUBLE_QUANT):
            logger.warning("%s: the blend %s was tuned with it %s; this run loads it 4-bit with quant_type %s, "
                           "double_quant %s", role, blend_file, describe_quantization(recorded), QUANT_TYPE,
                           DOUBLE_QUANT)
        flags |= {f"{role}_load_in_4bit": bits == 4, f"{role}_load_in_8bit": bits == 8}
    if sources:
        logger.info("quantisation not given as flags, as the blend %s records: %s (this run computes in each role's "
                    "dtype)", blend_file, "; ".join(sources))
    return flags


def model_records(args: ModelArguments, models: dict[str, Any]) -> dict[str, dict]:
    """blend.json's record of the models a blend was tuned with: role -> model_record, with the quantisation each
    of the loaded `models` ({role: model}) has (loaded_quantization)."""
    return {role: model_record(getattr(args, f"{role}_model"), loaded_quantization(models.get(role)))
            for role in MODEL_ROLES if getattr(args, f"{role}_model") is not None}


def load_models(args: ModelArguments, with_large_tuned: bool = False) -> tuple[dict[str, Any], Any]:
    """Load the models once, each on its own device/dtype, and refuse a set that does not share one tokenizer."""
    paths = {LARGE: args.large_model, SMALL_BASE: args.small_base_model, SMALL_TUNED: args.small_tuned_model}
    if with_large_tuned and args.large_tuned_model:
        paths[LARGE_TUNED] = args.large_tuned_model
    for role, path in paths.items():
        check_model_path(path, f"{role}_model")
    tokenizers = {}
    for role, path in paths.items():
        try:
            tokenizers[f"--{role}_model {path}"] = load_tokenizer(path, args.trust_remote_code, padding_side="left",
                                                                  flag=f"--{role}_model")
        except UsageError as err:
            raise UsageError(f"--{role}_model {path}: {err}; steering checks that all models share one tokenizer, "
                             "so keep the tokenizer beside every model (fine_tune.py saves it)") from None
    check_same_vocab(tokenizers)
    tokenizer = next(iter(tokenizers.values()))
    # Reviews are measured whole before build_prompt cuts them; silence "longer than the model" warnings.
    tokenizer.model_max_length = int(1e30)
    vocab_size = vocab_size_of(tokenizer)
    large_device = args.large_device
    models, loaded = {}, {}
    for role, path in paths.items():
        key = (path, getattr(args, f"{role}_device") or large_device, getattr(args, f"{role}_dtype"),
               args.quantization_of(role))
        if key not in loaded:  # a path given for two roles (same device, dtype, quantisation) loads once
            # A LoRA S_tuned loads unmerged: share_or_merge below pairs it with S (one forward for both) when
            # --pair_small_models and its base weights are S's, and merges it otherwise; a bottleneck S_tuned
            # alike, never merged.
            loaded[key] = load_causal_lm(path, dtype=key[2], device=key[1], trust_remote_code=args.trust_remote_code,
                                         flag=f"--{role}_model", quantize=key[3], quantize_prefix=f"--{role}_",
                                         merge_adapter=role != SMALL_TUNED)
            if role == SMALL_TUNED:
                loaded[key] = share_or_merge(models.get(SMALL_BASE), loaded[key], merge=not key[3],
                                             pair=args.pair_small_models)
                if paired_adapter(models.get(SMALL_BASE), loaded[key]):
                    logger.info("%s is a %s adapter on %s's weights: one forward serves both (mixed-row batches)",
                                role, "LoRA" if hasattr(loaded[key], "peft_config") else "bottleneck", SMALL_BASE)
        models[role] = loaded[key]
        large_device = large_device or str(models[LARGE].device)
        width = models[role].get_output_embeddings().weight.shape[0]
        if width < vocab_size:
            raise UsageError(f"--{role}_model {path} has {width} output rows but the tokenizer has {vocab_size} "
                             "tokens; steering needs models that share one vocabulary")
        logger.info("%s: %s (%.0fM parameters, %s, %s%s)", role, path, models[role].num_parameters() / 1e6,
                    models[role].device, models[role].dtype, f", {key[3]}-bit weights" if key[3] else "")
    return models, tokenizer
