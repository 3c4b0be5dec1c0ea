"""nanoGPT checkpoints (proxytune/models/nanogpt.py, convert_nanogpt.py): a tiny GPT written here with nanoGPT's
parameter names and layout gives the same logits before and after conversion (float64), the conversion loads no
arbitrary pickle, and the converted model fine-tunes."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_rows

import convert_nanogpt
import fine_tune
from proxytune.foundation.errors import UsageError
from proxytune.models.adapters import BOTTLENECK_WEIGHTS
from proxytune.models.loading import load_causal_lm, load_tokenizer
from proxytune.models.nanogpt import nanogpt_to_gpt2, read_nanogpt_checkpoint
from proxytune.training.arguments import parse_args

ARGS = dict(n_layer=2, n_head=4, n_embd=32, block_size=128, vocab_size=320, dropout=0.0)
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])  # (2, 8)


def nanogpt_state_dict(bias: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under nanoGPT's names and shapes (model.py: nn.Linear (out, in), LayerNorm with optional bias,
    lm_head tied to wte, the causal-mask buffer `attn.bias` of its non-flash attention)."""
    g = torch.Generator().manual_seed(seed)
    C, V, T = ARGS["n_embd"], ARGS["vocab_size"], ARGS["block_size"]
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    sd = {"transformer.wte.weight": rand(V, C), "transformer.wpe.weight": rand(T, C)}
    for i in range(ARGS["n_layer"]):
        p = f"transformer.h.{i}."
        sd |= {p + "ln_1.weight": 1 + rand(C), p + "ln_2.weight": 1 + rand(C),
               p + "attn.c_attn.weight": rand(3 * C, C), p + "attn.c_proj.weight": rand(C, C),
               p + "mlp.c_fc.weight": rand(4 * C, C), p + "mlp.c_proj.weight": rand(C, 4 * C),
               p + "attn.bias": torch.tril(torch.ones(T, T)).view(1, 1, T, T)}
        if bias:
            sd |= {p + "ln_1.bias": rand(C), p + "ln_2.bias": rand(C), p + "attn.c_attn.bias": rand(3 * C),
                   p + "attn.c_proj.bias": rand(C), p + "mlp.c_fc.bias": rand(4 * C), p + "mlp.c_proj.bias": rand(C)}
    sd["transformer.ln_f.weight"] = 1 + rand(C)
    if bias:
        sd["transformer.ln_f.bias"] = rand(C)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # weight tying, as nanoGPT's GPT.__init__
    return sd


def nanogpt_forward(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's GPT.forward (model.py), in float64, logits at every position. (B, T) -> (B, T, V)."""
    w = {k: v.double() for k, v in sd.items()}
    H, C = ARGS["n_head"], ARGS["n_embd"]
    B, T = idx.shape

    def layer_norm(x, name):
        return F.layer_norm(x, (C,), w[name + ".weight"], w.get(name + ".bias"), 1e-5)

    def linear(x, name):
        return F.linear(x, w[name + ".weight"], w.get(name + ".bias"))

    x = w["transformer.wte.weight"][idx] + w["transformer.wpe.weight"][torch.arange(T)]  # (B, T, C)
    for i in range(ARGS["n_layer"]):
        p = f"transformer.h.{i}."
        q, k, v = linear(layer_norm(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + linear(y, p + "attn.c_proj")
        x = x + linear(F.gelu(linear(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return F.linear(layer_norm(x, "transformer.ln_f"), w["lm_head.weight"])


def save_checkpoint(path, sd, compiled: bool = False, **extra):
    model = {("_orig_mod." + k if compiled else k): v for k, v in sd.items()}
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []},
                "model_args": {**ARGS, "bias": any(k.endswith("ln_1.bias") for k in sd)}, "iter_num": 7,
                "best_val_loss": torch.tensor(2.5), "config": {"dataset": "shakespeare_char", "compile": compiled},
                **extra}, path)
    return path


class NotATensor:
    """An object a weights_only load must refuse."""


@pytest.mark.parametrize("bias, compiled", [(True, False), (False, True)])
def test_converted_model_gives_nanogpts_logits_in_float64(tmp_path, bias, compiled):
    sd = nanogpt_state_dict(bias)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", sd, compiled=compiled)
    model = nanogpt_to_gpt2(read_nanogpt_checkpoint(ckpt)).double()
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, nanogpt_forward(sd, IDS), rtol=0, atol=1e-10)
    # The same through the loader that every script uses, which converts a .pt on the fly.
    loaded = load_causal_lm(str(ckpt), device="cpu").double()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, nanogpt_forward(sd, IDS), rtol=0, atol=1e-10)


def test_an_untied_lm_head_is_kept(tmp_path):
    sd = nanogpt_state_dict(True)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 0.1
    model = nanogpt_to_gpt2(read_nanogpt_checkpoint(save_checkpoint(tmp_path / "ckpt.pt", sd))).double()
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, nanogpt_forward(sd, IDS), rtol=0, atol=1e-10)


def test_a_pickle_with_other_objects_is_refused_in_one_line(tmp_path):
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", nanogpt_state_dict(True), config=NotATensor())
    with pytest.raises(UsageError) as info:
        read_nanogpt_checkpoint(ckpt)
    assert "a pickle can run code" in str(info.value) and "\n" not in str(info.value)


def test_other_checkpoints_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="needs the keys 'model' and 'model_args'"):
        read_nanogpt_checkpoint(tmp_path / "other.pt")
    variant = save_checkpoint(tmp_path / "variant.pt", nanogpt_state_dict(True))
    checkpoint = torch.load(variant, weights_only=True)
    checkpoint["model_args"]["use_rmsnorm"] = True
    torch.save(checkpoint, variant)
    with pytest.raises(UsageError, match="use_rmsnorm"):
        read_nanogpt_checkpoint(variant)


def test_convert_script_writes_a_model_directory_with_its_tokenizer(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    sd = nanogpt_state_dict(False)
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", sd)
    out = convert_nanogpt.main(convert_nanogpt.ConvertArguments(str(ckpt), str(tmp_path / "gpt2"),
                                                                str(tiny_tokenizer_dir)))
    assert {"model.safetensors", "config.json", "tokenizer.json", "nanogpt_source.json"} <= {p.name for p in
                                                                                             out.iterdir()}
    assert json.loads((out / "nanogpt_source.json").read_text())["iter_num"] == 7
    assert load_tokenizer(str(out)).get_vocab() == tiny_tokenizer.get_vocab()
    model = load_causal_lm(str(out), device="cpu").double()
    assert model.config.eos_token_id == tiny_tokenizer.eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, nanogpt_forward(sd, IDS), rtol=0, atol=1e-10)
    with pytest.raises(UsageError, match="already exists"):  # never replaced without --overwrite_output_dir
        convert_nanogpt.main(convert_nanogpt.ConvertArguments(str(ckpt), str(out), str(tiny_tokenizer_dir)))
    with pytest.raises(UsageError, match="holds no tokenizer; pass --tokenizer_name"):
        load_tokenizer(str(ckpt))
    # A tokenizer with more tokens than the checkpoint has rows is refused.
    small = save_checkpoint(tmp_path / "small.pt", sd, model_args={**ARGS, "bias": False, "vocab_size": 100})
    small_state = torch.load(small, weights_only=True)
    small_state["model"]["transformer.wte.weight"] = small_state["model"]["transformer.wte.weight"][:100]
    small_state["model"]["lm_head.weight"] = small_state["model"]["transformer.wte.weight"]
    torch.save(small_state, small)
    with pytest.raises(UsageError, match="embedding rows"):
        convert_nanogpt.main(convert_nanogpt.ConvertArguments(str(small), str(tmp_path / "small"),
                                                              str(tiny_tokenizer_dir)))


def test_a_checkpoint_fine_tunes_directly_and_with_bottleneck_adapters(tmp_path, tiny_tokenizer_dir):
    """fine_tune.py takes the .pt with --tokenizer_name: a full fine-tune writes a GPT-2 directory, and bottleneck
    adapters attach to GPT-2's blocks too."""
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", nanogpt_state_dict(True))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(16)), encoding="utf-8")
    common = ["--disable_tqdm", "true", "--report_to", "none", "--dataloader_num_workers", "0",
              "--model_name_or_path", str(ckpt), "--tokenizer_name", str(tiny_tokenizer_dir), "--dataset_path",
              str(data), "--max_length", "128", "--max_steps", "2", "--save_steps", "2", "--num_samples", "0",
              "--per_device_train_batch_size", "4", "--learning_rate", "1e-3"]
    full = fine_tune.main(*parse_args([*common, "--output_dir", str(tmp_path / "full")]))["final_dir"]
    tuned = load_causal_lm(str(full), device="cpu")
    assert type(tuned).__name__ == "GPT2LMHeadModel"
    adapters = fine_tune.main(*parse_args([*common, "--adapter", "bottleneck", "--reduction_factor", "8",
                                           "--output_dir", str(tmp_path / "adapter")]))["final_dir"]
    assert (adapters / BOTTLENECK_WEIGHTS).is_file()
    assert load_causal_lm(str(adapters), device="cpu").bottleneck_config.model_type == "gpt2"
