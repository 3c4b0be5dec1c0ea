"""The systems evaluation.py compares: their models, decoding settings and descriptions."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from proxytune.evaluation.arguments import (
    DECODING_FIELDS,
    DEFAULT_BLEND,
    SYSTEM_ROLES,
    SYSTEMS,
    GenerationArguments,
    ModelArguments,
)
from proxytune.foundation.config import read_config_file
from proxytune.foundation.errors import UsageError
from proxytune.foundation.validation import decoding_problems
from proxytune.models.loading import DEFAULT_MODELS, check_same_vocab, load_causal_lm, load_tokenizer, vocab_size_of
from proxytune.steering.blend import Blend, describe_blend
from proxytune.steering.loading import check_model_path, fill_models, fill_quantization
from proxytune.steering.shared_base import share_or_merge

logger = logging.getLogger(__name__)


def resolve_models(model_args: ModelArguments) -> ModelArguments:
    """Fill the model flags left out from the blend's record of the models it was tuned with.

    With no model, blend, alpha or systems flag at all, this is the pipeline's last step: the blend at
    DEFAULT_BLEND (if steer.py --tune wrote one) and its models, else DEFAULT_MODELS. A model flag given
    explicitly wins over the blend's record; a difference is warned about (proxytune.steering.loading.fill_models).
    The quantisation flags left out are filled from the record too (fill_quantization): a blend tuned on a 4-bit L
    loads L in 4 bits.
    """

    given = model_args.model_paths()
    bare = not given and model_args.blend is None and model_args.alpha is None and model_args.systems is None
    if bare:
        blend = DEFAULT_BLEND if Path(DEFAULT_BLEND).is_file() else None
        if blend is None:
            logger.info("no --blend and no %s: evaluating the pipeline's default models without 'steered' "
                        "(run steer.py --tune first, or pass --blend/--alpha)", DEFAULT_BLEND)
        model_args = dataclasses.replace(model_args, blend=blend)
    blend_file = model_args.blend if model_args.blend is not None and Path(model_args.blend).is_file() else None
    roles = [role for role in SYSTEMS if role != "steered"]
    filled = fill_models({role: getattr(model_args, f"{role}_model") for role in roles},
                         blend_file, DEFAULT_MODELS if bare else {})
    return dataclasses.replace(model_args, **{f"{role}_model": model for role, model in filled.items()},
                               **fill_quantization(model_args, roles, blend_file))


def resolve_systems(model_args: ModelArguments) -> list[str]:
    """The systems to run, in the canonical order; every problem is reported at once."""
    given = model_args.model_paths()
    steering = model_args.blend is not None or model_args.alpha is not None
    problems = []
    if model_args.blend is not None and model_args.alpha is not None:
        problems.append("give --blend or --alpha, not both")
    if model_args.systems is not None:
        unknown = [s for s in model_args.systems if s not in SYSTEMS]
        if unknown:
            problems.append(f"unknown system(s) {unknown} in --systems; choose from {list(SYSTEMS)}")
        wanted = [s for s in SYSTEMS if s in model_args.systems]
    else:
        wanted = [s for s in SYSTEMS if all(r in given for r in SYSTEM_ROLES[s]) and (s != "steered" or steering)]
    if steering and "steered" not in wanted and model_args.systems is None:
        missing = ", ".join(f"--{r}_model" for r in SYSTEM_ROLES["steered"] if r not in given)
        problems.append(f"--blend/--alpha need the steered system's models; {missing} missing")
    for system in wanted:
        missing = [r for r in SYSTEM_ROLES[system] if r not in given]
        if missing:
            problems.append(f"system '{system}' needs --{missing[0]}_model")
        if system == "steered" and not steering:
            problems.append("system 'steered' needs --blend BLEND.json (from steer.py) or --alpha")
    if model_args.blend is not None and not Path(model_args.blend).is_file():
        problems.append(f"--blend {model_args.blend} is not a file; pass the blend JSON written by steer.py")
    if not wanted and not problems:
        problems.append("no system to evaluate: give at least one of --small_base_model, --small_tuned_model, "
                        "--large_model, --large_tuned_model")
    if problems:
        raise UsageError("; ".join(problems))
    if "steered" not in wanted and all(r in given for r in SYSTEM_ROLES["steered"]) and not steering:
        logger.info("large, small_base and small_tuned are given: add --blend or --alpha to evaluate 'steered' too")
    return wanted


def resolve_decoding(gen_args: GenerationArguments, systems: list[str]) -> dict[str, dict[str, Any]]:
    """{system: decoding settings}: the shared flags, changed per system by --decoding_overrides."""
    base = {k: getattr(gen_args, k) for k in DECODING_FIELDS}
    overrides = parse_overrides(gen_args.decoding_overrides)
    problems = [f"--decoding_overrides names system '{s}', which is not evaluated ({', '.join(systems)})"
                for s in overrides if s not in systems]
    out = {}
    for system in systems:
        settings = dict(base)
        for key, value in overrides.get(system, {}).items():
            if key not in DECODING_FIELDS:
                problems.append(f"--decoding_overrides: unknown setting '{key}' for {system}; "
                                f"use {list(DECODING_FIELDS)}")
                continue
            if not is_setting_type(value, base[key]):
                problems.append(f"--decoding_overrides: {system}.{key} = {value!r} is not a {type(base[key]).__name__}")
                continue
            settings[key] = type(base[key])(value)
        problems += decoding_problems(settings, f"--decoding_overrides {system}.") if system in overrides else []
        out[system] = settings
    if problems:
        raise UsageError("; ".join(problems))
    return out


def is_setting_type(value: Any, like: Any) -> bool:
    """An override has its flag's type: a bool for do_sample, an int for the token counts, a number otherwise
    (`is_setting_type(1, 1.0)` -> True; `is_setting_type(2.5, 128)` and `is_setting_type(1, False)` -> False)."""
    if isinstance(like, bool) or isinstance(value, bool):
        return isinstance(like, bool) and isinstance(value, bool)
    if isinstance(like, int):
        return isinstance(value, int)
    return isinstance(value, (int, float))


def parse_overrides(text: str | None) -> dict[str, dict[str, Any]]:
    """JSON text or a .json/.yaml file -> {system: {setting: value}}."""
    if not text:
        return {}
    if text.strip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--decoding_overrides is not valid JSON: {err}") from None
    else:
        data = read_config_file(text)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise UsageError("--decoding_overrides must map system names to settings, "
                         "e.g. '{\"steered\": {\"temperature\": 0.7}}'")
    return data


def describe_system(system: str, paths: dict[str, str], blend, bits: dict[str, int] | None = None) -> str:
    """What a system runs, for the workbook and metrics.json: its model, or for 'steered' the models the blend
    really uses (proxytune.steering.blend.describe_blend says when a tuned blend leaves out L or the S term);
    `bits` ({role: 4 or 8}, loaded_bits) marks the quantised models: 'path (4-bit)'."""
    def model(role: str) -> str:
        return f"{paths[role]} ({bits[role]}-bit)" if (bits or {}).get(role) else paths[role]

    if system != "steered":
        return model(system)
    models = " + ".join(f"{r}={model(r)}" for r in SYSTEM_ROLES[system])
    if blend is None:
        return models

    return f"{describe_blend(blend, bits)} ({models})"


def load_blend(model_args: ModelArguments):
    """The Blend to evaluate, from --blend or --alpha."""

    if model_args.alpha is not None:
        return Blend.from_alpha(model_args.alpha)
    return Blend.load(model_args.blend)  # names the file and the bad key in a UsageError


def load_models(model_args: ModelArguments, systems: list[str], device: str) -> tuple[Any, dict[str, Any]]:
    """(tokenizer, {role: model}) with each distinct model path loaded once."""

    paths = {role: path for role, path in model_args.model_paths().items()
             if any(role in SYSTEM_ROLES[s] for s in systems)}
    for role, path in paths.items():
        check_model_path(path, f"{role}_model")
    tok_role = "tokenizer_name" if model_args.tokenizer_name else "large" if "large" in paths else next(iter(paths))
    tok_name = model_args.tokenizer_name or paths[tok_role]
    tok_flag = f"--{tok_role}" if tok_role == "tokenizer_name" else f"--{tok_role}_model"
    tokenizer = load_tokenizer(tok_name, trust_remote_code=model_args.trust_remote_code, padding_side="left",
                               flag=tok_flag)
    # Long reviews are measured whole before build_prompt cuts them; silence "longer than the model".
    tokenizer.model_max_length = int(1e30)
    tokenizers = {f"the tokenizer of {tok_flag} ({tok_name})": tokenizer}
    for role, path in paths.items():
        if path != tok_name and not any(label.endswith(f"({path})") for label in tokenizers):
            try:
                tokenizers[f"{role} ({path})"] = load_tokenizer(path, trust_remote_code=model_args.trust_remote_code,
                                                                flag=f"--{role}_model")
            except UsageError:
                logger.warning("no tokenizer beside %s (%s); its vocabulary is not checked", role, path)
    check_same_vocab(tokenizers)
    by_path: dict[tuple[str, int | None], Any] = {}
    models = {}
    for role, path in paths.items():
        key = (path, model_args.quantization_of(role))
        if key not in by_path:
            logger.info("loading %s from %s%s", role, path, f" ({key[1]}-bit)" if key[1] else "")
            # A LoRA S_tuned loads unmerged: paired with S (one forward for both, steering/shared_base.py) when
            # --pair_small_models and its base weights are S's, merged otherwise; a bottleneck S_tuned alike,
            # never merged.
            alone = role == "small_tuned" and list(paths.values()).count(path) == 1
            by_path[key] = load_causal_lm(path, dtype=model_args.dtype, device=device,
                                          trust_remote_code=model_args.trust_remote_code, flag=f"--{role}_model",
                                          quantize=key[1], quantize_prefix=f"--{role}_", merge_adapter=not alone)
            if alone:
                by_path[key] = share_or_merge(models.get("small_base"), by_path[key], merge=not key[1],
                                              pair=model_args.pair_small_models)
        models[role] = by_path[key]
        rows = models[role].get_output_embeddings().weight.shape[0]
        if rows < vocab_size_of(tokenizer):
            raise UsageError(f"{role} model {path} has {rows} output rows but the tokenizer has "
                             f"{vocab_size_of(tokenizer)} tokens; pass --tokenizer_name of that model family")
    return tokenizer, models
