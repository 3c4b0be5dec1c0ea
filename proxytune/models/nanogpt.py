"""nanoGPT checkpoints (karpathy/nanoGPT's `train.py` writes `ckpt.pt`) as Hugging Face GPT2LMHeadModel directories.

nanoGPT's `model.py` is GPT-2 (learned positions, pre-LayerNorm blocks, tied embeddings) written with nn.Linear,
so a checkpoint maps onto transformers' GPT-2 with these differences, each handled here:
- `ckpt.pt` is a pickle: {"model": state_dict, "model_args": {n_layer, n_head, n_embd, block_size, bias,
  vocab_size, dropout}, "config", "iter_num", "best_val_loss", "optimizer"}. It is read with
  torch.load(weights_only=True), which builds tensors and plain containers only and refuses any other object: a
  pickle can run code, and a checkpoint that needs more is refused in one line.
- torch.compile prefixes every key with `_orig_mod.`; it is dropped.
- nn.Linear stores W as (out, in), GPT-2's Conv1D as (in, out): c_attn, c_proj and c_fc weights are transposed.
- `bias=False` (nanoGPT's default) drops every Linear and LayerNorm bias; GPT-2 always has them, so they are set
  to zero: x·W + 0 and LayerNorm(x)·g + 0 compute what nanoGPT computes.
- nanoGPT's MLP uses nn.GELU() (the exact erf form), GPT-2's `gelu_new` the tanh approximation: the converted
  config says `activation_function="gelu"` so the logits are nanoGPT's.
- lm_head is tied to wte (nanoGPT's weight tying); an untied checkpoint keeps its own lm_head.
- `attn.bias` (the causal mask buffer of nanoGPT's non-flash attention) is not a weight and is dropped.
The tokenizer is not in the checkpoint: GPT-2's BPE for nanoGPT's default data (`gpt2` on the Hub), or whatever
tokenizer the data was encoded with; it must fit in vocab_size (nanoGPT pads GPT-2's 50,257 to 50,304).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from proxytune.foundation.errors import UsageError, first_line
from proxytune.foundation.outputs import atomic_directory

# model_args keys of nanoGPT's GPTConfig; a checkpoint with others comes from a variant this conversion does not know.
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
COMPILED_PREFIX = "_orig_mod."
SOURCE_RECORD = "nanogpt_source.json"


def is_nanogpt_checkpoint(name_or_path: str) -> bool:
    """A `.pt` file: nanoGPT's `ckpt.pt` (a Hugging Face model is a directory or a Hub id)."""
    path = Path(name_or_path).expanduser()
    return path.suffix == ".pt" and path.is_file()


def read_nanogpt_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, loaded with weights_only=True; its `model` keys without torch.compile's prefix."""
    import torch

    path = Path(path).expanduser()
    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as err:
        raise UsageError(
            f"{path} is not loaded: it holds more than tensors and plain containers, and a pickle can run code "
            f"({first_line(err)[:160]}); where you trust it, re-save its 'model' state dict and 'model_args' dict "
            "with torch.save") from None
    except (OSError, EOFError) as err:
        raise UsageError(f"cannot read {path}: {first_line(err)}") from None
    if not isinstance(checkpoint, dict) or not {"model", "model_args"} <= checkpoint.keys():
        raise UsageError(f"{path} is not a nanoGPT checkpoint: it needs the keys 'model' and 'model_args' (as "
                         "nanoGPT's train.py writes them)")
    unknown = sorted(set(checkpoint["model_args"]) - set(MODEL_ARGS))
    if unknown:
        raise UsageError(f"{path}: model_args {', '.join(unknown)} are not nanoGPT's GPTConfig fields; this "
                         "checkpoint comes from a variant whose layers GPT-2 may not compute")
    checkpoint["model"] = {k.removeprefix(COMPILED_PREFIX): v for k, v in checkpoint["model"].items()}
    return checkpoint


def gpt2_config(model_args: dict, tokenizer=None):
    """GPT2Config from nanoGPT's model_args: sizes, exact GELU, LayerNorm eps 1e-5 (nanoGPT's), dropout."""
    from transformers import GPT2Config

    dropout = float(model_args.get("dropout", 0.0))
    # GPT-2's <|endoftext|> (50256) where the vocabulary has it; else no special ids until a tokenizer names them.
    special = {} if model_args["vocab_size"] > 50256 else dict(bos_token_id=None, eos_token_id=None)
    if tokenizer is not None:
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        special = dict(bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return GPT2Config(vocab_size=model_args["vocab_size"], n_positions=model_args["block_size"],
                      n_embd=model_args["n_embd"], n_layer=model_args["n_layer"], n_head=model_args["n_head"],
                      activation_function="gelu", layer_norm_epsilon=1e-5, resid_pdrop=dropout, embd_pdrop=dropout,
                      attn_pdrop=dropout, **special)


def gpt2_state_dict(state: dict, n_layer: int) -> tuple[dict, bool]:
    """nanoGPT's state dict -> (GPT-2's, whether lm_head is tied to wte). Linear weights transposed to Conv1D's
    (in, out); missing biases (bias=False) as zeros; the attention mask buffers dropped."""
    import torch

    out = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}
    for key in list(out):
        if key.endswith(TRANSPOSED):
            out[key] = out[key].t().contiguous()  # (out, in) -> (in, out)
    width = state["transformer.wte.weight"].shape[1]
    zeros = lambda n: torch.zeros(n, dtype=state["transformer.wte.weight"].dtype)  # noqa: E731
    norms = [f"transformer.h.{i}.{ln}" for i in range(n_layer) for ln in ("ln_1", "ln_2")] + ["transformer.ln_f"]
    for name in norms:
        out.setdefault(f"{name}.bias", zeros(width))
    for i in range(n_layer):
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out.setdefault(f"transformer.h.{i}.{name}.bias", zeros(out[f"transformer.h.{i}.{name}.weight"].shape[1]))
    head = out.pop("lm_head.weight", None)
    tied = head is None or torch.equal(head, out["transformer.wte.weight"])
    if not tied:
        out["lm_head.weight"] = head
    return out, tied


def nanogpt_to_gpt2(checkpoint: dict, tokenizer=None):
    """A GPT2LMHeadModel (float32 or the checkpoint's dtype) with the checkpoint's weights, loaded strictly."""
    from transformers import GPT2LMHeadModel

    args = checkpoint["model_args"]
    state, tied = gpt2_state_dict(checkpoint["model"], args["n_layer"])
    config = gpt2_config(args, tokenizer)
    config.tie_word_embeddings = tied
    model = GPT2LMHeadModel(config).to(state["transformer.wte.weight"].dtype)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UsageError(f"the checkpoint's weights do not fit GPT-2 of its model_args (missing: "
                         f"{', '.join(missing[:4]) or 'none'}; unexpected: {', '.join(extra[:4]) or 'none'})")
    model.load_state_dict(state, strict=not tied)  # tied: lm_head.weight is wte's, not in `state`
    return model.eval()


def check_tokenizer_fits(tokenizer, vocab_size: int, flag: str = "--tokenizer_name") -> None:
    if len(tokenizer) > vocab_size:
        raise UsageError(f"{flag}: the tokenizer has {len(tokenizer)} tokens but the checkpoint only {vocab_size} "
                         "embedding rows; pass the tokenizer its training data was encoded with (nanoGPT's default: "
                         "GPT-2's BPE, `gpt2`)")


def convert_nanogpt(checkpoint_path: str | Path, output_dir: str | Path, tokenizer=None,
                    overwrite: bool = False) -> Path:
    """Write `output_dir` (atomically; an existing one only with `overwrite`): GPT-2 weights (safetensors), config,
    the tokenizer when given, and nanogpt_source.json (where it came from, iter_num, best_val_loss)."""
    checkpoint = read_nanogpt_checkpoint(checkpoint_path)
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, checkpoint["model_args"]["vocab_size"])
    model = nanogpt_to_gpt2(checkpoint, tokenizer)
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        best = checkpoint.get("best_val_loss")
        record = {"checkpoint": str(Path(checkpoint_path).expanduser().resolve()),
                  "model_args": checkpoint["model_args"], "iter_num": checkpoint.get("iter_num"),
                  "best_val_loss": float(best) if best is not None else None}
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return Path(output_dir)
