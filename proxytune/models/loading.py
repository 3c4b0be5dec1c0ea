"""Loading tokenizers and causal LMs from the Hub or a local path: dtype, device, vocabulary checks."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError, first_line
from proxytune.foundation.hub import hub_model_of, hub_offline_reason, is_missing_local_path, not_cached_error
from proxytune.models.adapters import attach_saved_adapters, is_bottleneck_dir, read_bottleneck_config
from proxytune.models.nanogpt import convert_nanogpt, is_nanogpt_checkpoint
from proxytune.models.quantization import (
    bnb_config,
    check_bitsandbytes,
    fit_cpu_inference_kernel,
    warn_if_trained_quantized,
)

# The models the README's pipeline uses when no flag names one (fine_tune.py's default output_dir for the tuned
# one); steer.py and evaluation.py fill missing model flags from these, after a blend file's record.
DEFAULT_MODELS = {"large": "EleutherAI/pythia-410m", "small_base": "EleutherAI/pythia-70m",
                  "small_tuned": "outputs/pythia-70m-meta-review/final"}


DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right",
                   flag: str = "--tokenizer_name"):
    """Load a tokenizer and make sure it can pad without touching EOS.

    Pythia's tokenizer has `<|padding|>` (id 1) in its vocabulary but older configs do not name it
    as the pad token; pad = eos would make masking by id hide the real EOS, so we use `<|padding|>`
    when it exists and fall back to EOS only for tokenizers that have no other choice (labels are
    masked by position, not by id, so that is still safe).
    """
    from transformers import AutoTokenizer

    if is_nanogpt_checkpoint(name_or_path):
        raise UsageError(f"{flag} {name_or_path} is a nanoGPT checkpoint, which holds no tokenizer; pass "
                         "--tokenizer_name (GPT-2's BPE, `gpt2`, for nanoGPT's default data), or convert it once with "
                         "its tokenizer and pass the directory: python convert_nanogpt.py --checkpoint CKPT.pt "
                         "--tokenizer_name TOKENIZER --output_dir DIR")
    if is_missing_local_path(name_or_path):
        raise UsageError(f"cannot load tokenizer '{name_or_path}': no such directory; pass a Hub id "
                         "(e.g. EleutherAI/pythia-70m) or a local directory with tokenizer.json")
    offline = None if Path(name_or_path).expanduser().exists() else hub_offline_reason()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if offline:
            raise not_cached_error("tokenizer", name_or_path, flag, offline) from None
        raise UsageError(
            f"cannot load tokenizer '{name_or_path}': {first_line(err)}; pass a Hub id or a local directory "
            "with tokenizer.json"
        ) from None
    if tokenizer.pad_token is None:
        if "<|padding|>" in tokenizer.get_vocab():
            tokenizer.pad_token = "<|padding|>"
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise UsageError(f"tokenizer '{name_or_path}' has no EOS token; the target must end with one")
    tokenizer.padding_side = padding_side
    return tokenizer


def resolve_dtype(dtype: str, device: str):
    """Pythia checkpoints declare float16; on CPU that is slow and lossy, so 'auto' means float32
    on CPU and bfloat16 on a GPU that supports it (float16 otherwise)."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"dtype '{dtype}' is not one of {DTYPES}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(
    name_or_path: str,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
    flag: str = "--model_name_or_path",
    quantize: int | None = None,
    quantize_prefix: str = "--",
    quantize_options: dict[str, Any] | None = None,
    head: dict | None = None,
):
    """Load a causal LM from a Hub id, a local directory, or a LoRA adapter directory from fine_tune.py.

    Weights load from safetensors only (no pickle). An adapter directory (adapter_config.json) is
    loaded on its base model and, by default, merged so decoding pays nothing for it. Errors name `flag`.
    `quantize` = 4 or 8 loads the linear layers of the (base) model with bitsandbytes (quantization_config); `dtype`
    is then the compute dtype and that of the layers left unquantised (`quantize_options`: bnb_config's
    compute_dtype, a DTYPES name, double_quant, quant_type). An adapter on a quantised base stays unmerged
    (merging would round its update into the 4-/8-bit grid); errors name the flag `{quantize_prefix}load_in_4bit`.
    `head` (config fields: num_labels, id2label, ...) loads a sequence classifier instead
    (proxytune/training/classification.py).
    A nanoGPT `ckpt.pt` is converted to GPT-2 on the fly (proxytune/models/nanogpt.py; torch.load with
    weights_only=True only). A bottleneck adapter directory (bottleneck_config.json, proxytune/models/adapters.py) is
    loaded on its base model with the same arguments and stays separate (`merge_adapter` does not apply: it is
    non-linear).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if is_nanogpt_checkpoint(name_or_path):  # converted on the fly; convert_nanogpt.py writes it once, with a tokenizer
        with tempfile.TemporaryDirectory() as tmp:
            converted = convert_nanogpt(name_or_path, Path(tmp) / "gpt2")
            return load_causal_lm(str(converted), dtype, device, trust_remote_code, merge_adapter, flag, quantize,
                                  quantize_prefix, quantize_options, head)
    if is_bottleneck_dir(name_or_path):
        base = load_causal_lm(read_bottleneck_config(name_or_path).base_model_name_or_path, dtype, device,
                              trust_remote_code, merge_adapter, flag, quantize, quantize_prefix, quantize_options, head)
        return attach_saved_adapters(base, name_or_path, dtype=torch_dtype).eval()
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **(head or {}))
    if quantize:
        check_bitsandbytes(device, f"{quantize_prefix}load_in_{quantize}bit")
        # Quantised weights cannot be moved after loading (.to() refuses), so they are placed at load.
        options = dict(quantize_options or {})
        compute = resolve_dtype(options.pop("compute_dtype", None) or dtype, device)
        kwargs.update(quantization_config=bnb_config(quantize, compute, **options), device_map={"": device})
        merge_adapter = False
    auto = AutoModelForCausalLM if head is None else AutoModelForSequenceClassification
    path = Path(name_or_path)
    if is_missing_local_path(name_or_path):
        raise UsageError(f"cannot load model '{name_or_path}': no such directory; pass a Hub id "
                         "(e.g. EleutherAI/pythia-70m) or a directory written by save_pretrained / fine_tune.py")
    hub_name = hub_model_of(name_or_path)
    offline = hub_offline_reason() if hub_name else None
    try:
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

            peft_auto = AutoPeftModelForCausalLM if head is None else AutoPeftModelForSequenceClassification
            model = peft_auto.from_pretrained(name_or_path, **kwargs)
            if merge_adapter:
                model = model.merge_and_unload()
        else:
            model = auto.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        if path.is_dir() and not list(path.glob("*.safetensors")) and list(path.glob("*.bin")):
            raise UsageError(
                f"model directory {name_or_path} holds only pickle weights (*.bin), which are not loaded (a pickle can "
                "run code); convert it once, from a source you trust: AutoModelForCausalLM.from_pretrained(DIR, "
                "use_safetensors=False).save_pretrained(DIR)"
            ) from None
        if offline:
            what = "model" if hub_name == name_or_path else "the adapter's base model"
            raise not_cached_error(what, hub_name, flag, offline) from None
        raise UsageError(
            f"cannot load model '{name_or_path}': {first_line(err)}; pass a Hub id (e.g. EleutherAI/pythia-70m), "
            "a directory written by save_pretrained, or a LoRA adapter directory from fine_tune.py"
        ) from None
    if quantize:
        fit_cpu_inference_kernel(model)
    warn_if_trained_quantized(name_or_path, quantize, flag, quantize_prefix)
    if not quantize:
        model.to(device)
    model.eval()
    return model


def vocab_size_of(tokenizer) -> int:
    """Number of real tokens (Pythia: 50,277, while its embedding matrix has 50,304 padded rows)."""
    return len(tokenizer)


def check_same_vocab(tokenizers: dict[str, Any]) -> None:
    """Refuse to combine models whose tokenizers map text to different ids."""
    items = list(tokenizers.items())
    name0, tok0 = items[0]
    vocab0 = tok0.get_vocab()
    differ = [name for name, tok in items[1:] if tok.get_vocab() != vocab0]
    if differ:
        # Every model's size, not only the first pair's: with three models, the odd one out must be visible.
        sizes = ", ".join(f"{name} {len(tok)} tokens" for name, tok in items)
        raise UsageError(
            f"tokenizers of {name0} and {', '.join(differ)} differ ({sizes}); steering needs models that share "
            "one tokenizer (e.g. all Pythia): pass models of one family, each with the tokenizer it was trained with"
        )
