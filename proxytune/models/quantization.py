"""4- and 8-bit models (bitsandbytes): the flags, the config, and what is recorded beside a model trained on one."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError, first_line

logger = logging.getLogger(__name__)


# Quantisation (bitsandbytes): 4-bit NF4 with double quantisation (QLoRA, Dettmers et al. 2023, arXiv:2305.14314)
# or LLM.int8 (Dettmers et al. 2022). bitsandbytes >= 0.49 runs both on CPU too; what was measured where is in
# README.md ("Quantised models").
QUANTIZATION_RECORD = "base_quantization.json"  # written beside an adapter trained on a quantised base


QUANTIZABLE_ROLES = ("large", "small_base", "small_tuned", "large_tuned")  # the model roles of steer.py/evaluation.py


def _role_flag(role: str, bits: int) -> dataclasses.Field:
    # None = not given (`--flag` alone is true, `--flag false` false): fill_quantization then takes the role's
    # quantisation from the --blend file's record, as the model paths are filled from it.
    what = {4: "4-bit NF4 with double quantisation, computing in the role's dtype", 8: "8-bit LLM.int8"}[bits]
    return dataclasses.field(default=None, metadata={
        "help": f"Load the {role} model's linear layers in {what} "
                "(bitsandbytes; an adapter stays unmerged on the quantised base). Not given: as the --blend file "
                "records for this role, else unquantised.", "nargs": "?", "const": True})


@dataclasses.dataclass
class QuantizationArguments:
    """--{role}_load_in_4bit / --{role}_load_in_8bit for every model role; steer.py's and evaluation.py's
    ModelArguments inherit them, so one definition serves both scripts."""

    large_load_in_4bit: bool | None = _role_flag("large", 4)
    large_load_in_8bit: bool | None = _role_flag("large", 8)
    small_base_load_in_4bit: bool | None = _role_flag("small_base", 4)
    small_base_load_in_8bit: bool | None = _role_flag("small_base", 8)
    small_tuned_load_in_4bit: bool | None = _role_flag("small_tuned", 4)
    small_tuned_load_in_8bit: bool | None = _role_flag("small_tuned", 8)
    large_tuned_load_in_4bit: bool | None = _role_flag("large_tuned", 4)
    large_tuned_load_in_8bit: bool | None = _role_flag("large_tuned", 8)

    def __post_init__(self):
        for role in QUANTIZABLE_ROLES:
            self.quantization_of(role)

    def quantization_of(self, role: str) -> int | None:
        """4, 8 or None for `role`; both flags of one role -> UsageError."""
        return quantization_bits(getattr(self, f"{role}_load_in_4bit"), getattr(self, f"{role}_load_in_8bit"),
                                 prefix=f"--{role}_")


def quantization_flags_last(cls):
    """Class decorator for a dataclass inheriting QuantizationArguments: dataclass fields put a base class's first,
    so `--help` (HfArgumentParser walks dataclasses.fields) would open with eight quantisation flags; this moves
    them after the class's own fields (the model paths), in the field table both read."""
    own = {name: f for name, f in cls.__dataclass_fields__.items()
           if name not in QuantizationArguments.__dataclass_fields__}
    cls.__dataclass_fields__ = {**own, **{name: f for name, f in cls.__dataclass_fields__.items() if name not in own}}
    return cls


def quantization_bits(load_in_4bit: bool, load_in_8bit: bool, prefix: str = "--") -> int | None:
    """`quantization_bits(True, False)` -> 4; (False, False) -> None; both -> UsageError naming the two flags."""
    if load_in_4bit and load_in_8bit:
        raise UsageError(f"give {prefix}load_in_4bit or {prefix}load_in_8bit, not both")
    return 4 if load_in_4bit else 8 if load_in_8bit else None


def check_bitsandbytes(device: str, flag: str) -> None:
    """Refuse `flag` in one line when bitsandbytes is not installed or has no backend for `device`'s type
    (0.49+ runs on cpu and cuda; older builds need CUDA)."""
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError(f"{flag} needs bitsandbytes, which is not installed; `pip install bitsandbytes` "
                         f"(see requirements.txt) or drop {flag}") from None
    except Exception as err:  # a broken CUDA setup fails inside the import with its own errors
        raise UsageError(f"{flag}: bitsandbytes cannot be imported here ({first_line(err)}); drop {flag}") from None
    kind = str(device).split(":")[0]
    supported = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
    if kind not in supported:
        raise UsageError(f"{flag}: bitsandbytes {bitsandbytes.__version__} cannot run on {kind} (it supports "
                         f"{', '.join(sorted(supported))}); use a device it supports, a newer bitsandbytes (0.49+ "
                         f"runs on CPU), or drop {flag}")


QUANT_TYPE, DOUBLE_QUANT = "nf4", True  # the 4-bit format of steer.py's and evaluation.py's --{role}_load_in_4bit


def bnb_config(bits: int, compute_dtype, double_quant: bool = DOUBLE_QUANT, quant_type: str = QUANT_TYPE):
    """transformers' BitsAndBytesConfig: 4-bit NF4 with double quantisation (the quantisation constants quantised
    too, ~0.4 bit per parameter saved) computing in `compute_dtype`, or 8-bit LLM.int8. The output layer
    (embed_out) and the embeddings stay unquantised (transformers skips them), so logits keep their precision."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UsageError(f"quantisation to {bits} bits is not supported; use 4 or 8")


def quantization_record(bits: int, compute_dtype: str, double_quant: bool, quant_type: str) -> dict[str, Any]:
    """What QUANTIZATION_RECORD holds: how the base was quantised while the adapter beside it was trained."""
    return {"bits": bits, **({"quant_type": quant_type, "double_quant": double_quant, "compute_dtype": compute_dtype}
                             if bits == 4 else {})}


def loaded_quantization(model) -> dict[str, Any] | None:
    """How `model`'s weights were loaded, read from its bitsandbytes config (an adapter unmerged on a quantised base
    passes its base's config through): quantization_record(...), or None for unquantised weights. What blend.json's
    `models` and evaluation.py's run info record: `{"bits": 4, "quant_type": "nf4", "double_quant": True,
    "compute_dtype": "float32"}`."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    data = config if isinstance(config, dict) else config.to_dict()
    bits = 4 if data.get("load_in_4bit") else 8 if data.get("load_in_8bit") else None
    if bits is None:
        return None
    compute = str(data.get("bnb_4bit_compute_dtype")).removeprefix("torch.")
    return quantization_record(bits, compute, bool(data.get("bnb_4bit_use_double_quant")),
                               data.get("bnb_4bit_quant_type"))


def loaded_bits(models: dict[str, Any]) -> dict[str, int]:
    """{role: 4 or 8} for the quantised models of `models` ({role: model}); unquantised roles are left out."""
    return {role: record["bits"] for role, model in models.items() if (record := loaded_quantization(model))}


def describe_quantization(record: dict[str, Any] | None) -> str:
    """One line for a quantization_record: `describe_quantization({"bits": 4, "quant_type": "nf4", "double_quant":
    True, "compute_dtype": "float32"})` -> '4-bit NF4, double quant, computing in float32'; None -> 'unquantised'."""
    if not record:
        return "unquantised"
    if record["bits"] != 4:
        return f"{record['bits']}-bit"
    double = ", double quant" if record.get("double_quant") else ""
    return f"4-bit {str(record.get('quant_type')).upper()}{double}, computing in {record.get('compute_dtype')}"


def linear_4bit_layers(model) -> list:
    """The bitsandbytes 4-bit linear layers of `model`; none (and no bitsandbytes import) unless it loaded in 4 bits."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return []
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def fit_cpu_inference_kernel(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit layer, on its first inference call on a CPU with AVX512-BF16, for a fused
    bfloat16 kernel; the repacking needs in_features to be a multiple of the block size (64) and out_features of 32,
    and fails with a reshape error otherwise (tiny models). Such layers keep the general path (dequantise, then a
    matmul in the compute dtype). Every Pythia size fits."""
    for layer in linear_4bit_layers(model):
        blocksize = getattr(layer.weight.quant_state, "blocksize", 64)
        if layer.in_features % blocksize or layer.out_features % 32:
            layer.support_avx512bf16_for_cpu = False


def prepare_quantized_for_lora(model, gradient_checkpointing: bool):
    """peft's prepare_model_for_kbit_training (freeze the base, unquantised parameters to float32, grad-requiring
    inputs for checkpointing) for a model that will be trained and also evaluated in between: bitsandbytes' CPU
    inference repacking (fit_cpu_inference_kernel) is one-way and a later training step then fails, so it is
    switched off on every 4-bit layer of a model that trains."""
    from peft import prepare_model_for_kbit_training

    for layer in linear_4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def warn_if_trained_quantized(name_or_path: str, bits: int | None, flag: str, quantize_prefix: str = "--") -> None:
    """An adapter fine_tune.py trained on a quantised base records it (QUANTIZATION_RECORD). Loaded on the
    full-precision base (and merged into it) the adapter sees weights a little different from those it was trained
    on; loaded with the other bit width, too. Either works, but say so once."""
    record = Path(name_or_path).expanduser() / QUANTIZATION_RECORD
    if not record.is_file():
        return
    try:
        trained = int(json.loads(record.read_text(encoding="utf-8")).get("bits"))
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if trained != bits:
        now = f"{bits}-bit" if bits else "unquantised (the adapter merged into the full-precision base)"
        logger.warning("%s %s: this adapter was trained on a %d-bit base and is loaded %s; pass %sload_in_%dbit "
                       "to load it as it was trained", flag, name_or_path, trained, now, quantize_prefix, trained)
