"""Quantised models (bitsandbytes): QLoRA in fine_tune.py, a 4-/8-bit model of any role in steer.py and evaluation.py.

bitsandbytes 0.49+ runs 4-bit NF4 and LLM.int8 on CPU, so everything here runs on CPU; the CUDA variants run where a
GPU is present and are skipped (needs CUDA) elsewhere. The steering equivalences of tests/test_steer.py are checked
again with a quantised L: quantisation changes L, never the arithmetic around it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

import pytest
import torch
from conftest import add_near_tie, assert_clear_lead, make_tiny_model
from test_steer import check_zero_delta_decodes_large_through_a_near_tie

import fine_tune
from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_causal_lm
from proxytune.models.quantization import (
    QUANTIZATION_RECORD,
    QuantizationArguments,
    check_bitsandbytes,
    quantization_bits,
)
from proxytune.steering.blend import Blend, slice_vocab
from proxytune.steering.decoding import left_pad, steered_generate
from proxytune.training.arguments import parse_args

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
requires_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install bitsandbytes)")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
PAD, EOS = 1, 0
QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0"]


def linear_types(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__}


@pytest.fixture(scope="module")
def vocab(tiny_tokenizer) -> int:
    return len(tiny_tokenizer)


def generate(large, small_base, small_tuned, ids, mask, blend, vocab, **kw):
    kw = {"max_new_tokens": 8, "eos_token_id": EOS, "pad_token_id": PAD, "vocab_size": vocab, **kw}
    return steered_generate(large, small_base, small_tuned, ids, mask, blend, **kw)


# --- loading ----------------------------------------------------------------------------------------
@requires_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_load_replaces_the_linear_layers_and_keeps_the_output_layer(tiny_model_dirs, bits):
    full = load_causal_lm(str(tiny_model_dirs["large"]), device="cpu")
    quant = load_causal_lm(str(tiny_model_dirs["large"]), device="cpu", quantize=bits)
    assert linear_types(quant) >= {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    # The output layer stays in float32: the logits, and so the log-probs, keep their precision.
    assert quant.get_output_embeddings().weight.dtype == torch.float32
    assert quant.get_memory_footprint() < full.get_memory_footprint()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        a, b = full(ids).logits, quant(ids).logits
    assert not torch.equal(a, b)  # really quantised ...
    # ... and still the same model: logits correlate (random tiny model: 0.988 at 4 bits, 0.9999 at 8 bits).
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > (0.95 if bits == 4 else 0.99)


# --- steering with a quantised L ---------------------------------------------------------------------
@pytest.fixture(scope="module", params=[4, 8])
def quantised_models(request, tiny_model_dirs, vocab):
    """A quantised L (float32 compute) and the small pair in float64 with a 10x output layer: their delta spreads the
    blend's top two apart (leads of 9e-3 and more instead of down to 1e-4), and their float32 log-probs are the same
    on every path, so the float32 rounding of L's paths (~1e-6) cannot turn a greedy comparison (conftest's note)."""
    if not HAS_BNB:
        pytest.skip("bitsandbytes not installed (pip install bitsandbytes)")
    large = load_causal_lm(str(tiny_model_dirs["large"]), device="cpu", quantize=request.param)
    small_base = make_tiny_model(vocab, seed=0, padded_vocab=vocab + 12, output_scale=10.0).double()
    small_tuned = make_tiny_model(vocab, seed=1, padded_vocab=vocab + 12, output_scale=10.0).double()
    return large, small_base, small_tuned


@pytest.mark.exactness
def test_alpha0_with_a_quantised_large_model_is_its_own_greedy_output(quantised_models, vocab):
    from transformers import GenerationConfig

    large, small_base, small_tuned = quantised_models
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], PAD)
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                              suppress_tokens=list(range(vocab, vocab + 12)),  # the padded rows steer.py slices off
                              output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        out = large.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    hf = out.sequences[:, ids.shape[1]:]
    assert_clear_lead(slice_vocab(torch.stack(out.logits, 1), vocab))  # L alone: its own leads (8.8e-4 at 4 bits)
    tokens, _ = generate(large, small_base, small_tuned, ids, mask, Blend.from_alpha(0.0), vocab)
    assert torch.equal(tokens[:, :hf.shape[1]], hf)
    # The full three-model path with a zero delta (S_tuned == S) too.
    tokens, _ = generate(large, small_base, small_base, ids, mask, Blend.from_alpha(1.0), vocab)
    assert torch.equal(tokens[:, :hf.shape[1]], hf)


@pytest.mark.exactness
def test_cached_equals_uncached_with_a_quantised_large_model(quantised_models, vocab):
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], PAD)
    blend = Blend.from_alpha(1.5)
    cached = generate(*quantised_models, ids, mask, blend, vocab, max_new_tokens=10, return_logprobs=True)
    assert_clear_lead(cached[2])
    fresh = generate(*quantised_models, ids, mask, blend, vocab, max_new_tokens=10, return_logprobs=True,
                     use_cache=False)
    assert torch.equal(cached[0], fresh[0])
    torch.testing.assert_close(cached[2], fresh[2], atol=1e-4, rtol=1e-4)
    assert cached[2].dtype == torch.float32  # the arithmetic runs on float32 log-probs whatever L stores


@pytest.mark.exactness
def test_batched_equals_one_by_one_with_a_quantised_large_model(quantised_models, vocab):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    blend = Blend.from_alpha(1.0)
    tokens, _, logps = generate(*quantised_models, *left_pad(prompts, PAD), blend, vocab, return_logprobs=True)
    assert_clear_lead(logps)
    for row, prompt in enumerate(prompts):
        alone, _, alone_logps = generate(*quantised_models, *left_pad([prompt], PAD), blend, vocab,
                                         return_logprobs=True)
        assert torch.equal(tokens[row, :alone.shape[1]], alone[0])
        torch.testing.assert_close(logps[row, :alone.shape[1]], alone_logps[0], atol=1e-4, rtol=1e-4)


@requires_bnb
@pytest.mark.exactness
@pytest.mark.parametrize("bits", [4, 8])
def test_a_zero_delta_decodes_a_quantised_large_models_output_through_a_built_near_tie(tmp_path, vocab, bits):
    """test_steer's near-tie test with L quantised: the built tie lives in the final layer norm and the output layer,
    which stay float32, so L's two tokens are still one ulp apart; steering with S_tuned == S must take L's token."""
    add_near_tie(make_tiny_model(vocab, seed=2, hidden_size=64, num_layers=3, padded_vocab=vocab + 12)) \
        .save_pretrained(tmp_path / "large")
    large = load_causal_lm(str(tmp_path / "large"), device="cpu", quantize=bits)
    check_zero_delta_decodes_large_through_a_near_tie(large, make_tiny_model(vocab, seed=0, padded_vocab=vocab + 12),
                                                      vocab)


@requires_bnb
@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_compute_still_blends_float32_logprobs(tiny_model_dirs, vocab, device):
    large = load_causal_lm(str(tiny_model_dirs["large"]), dtype="bfloat16", device=device, quantize=4)
    small = load_causal_lm(str(tiny_model_dirs["small_base"]), device=device)
    tuned = load_causal_lm(str(tiny_model_dirs["small_tuned"]), device=device)
    ids, mask = left_pad([[5, 6, 7, 8], [12, 13]], PAD)
    tokens, _, logps = generate(large, small, tuned, ids, mask, Blend.from_alpha(1.0), vocab, return_logprobs=True)
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()
    torch.testing.assert_close(logps.exp().sum(-1), torch.ones(logps.shape[:2], device=logps.device))


# --- QLoRA in fine_tune.py ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qlora_base_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny GPT-NeoX base of hidden size 64: the smallest whose 4-bit layers take bitsandbytes' CPU kernel."""
    path = tmp_path_factory.mktemp("qlora_base")
    model = make_tiny_model(len(tiny_tokenizer), seed=4, hidden_size=64, padded_vocab=len(tiny_tokenizer) + 12)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def run_fine_tune(*flags: str) -> dict:
    return fine_tune.main(*parse_args([*QUIET, *flags]))


@requires_bnb
@pytest.mark.parametrize("bits, checkpointing", [(4, False), (8, False), (4, True)])
def test_qlora_trains_an_adapter_that_steer_loads_quantised_or_merged(tmp_path, jsonl_file, qlora_base_dir, bits,
                                                                      checkpointing, caplog):
    out = tmp_path / "qlora"
    # Evaluation every 2 steps, between training steps: a 4-bit layer repacked for CPU inference would fail the
    # next training step (proxytune.models.quantization.prepare_quantized_for_lora).
    result = run_fine_tune("--model_name_or_path", str(qlora_base_dir), "--dataset_path", str(jsonl_file),
                           "--max_length", "128", "--use_lora", "--lora_r", "4", f"--load_in_{bits}bit",
                           "--max_steps", "4", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "4",
                           "--learning_rate", "5e-2", "--num_samples", "1", "--max_new_tokens", "4",
                           "--activation_checkpointing", str(checkpointing).lower(), "--output_dir", str(out))
    final = result["final_dir"]
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / QUANTIZATION_RECORD).read_text())["bits"] == bits
    from safetensors.torch import load_file

    adapter = load_file(str(final / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # B starts at 0: it trained
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = load_causal_lm(str(qlora_base_dir), device="cpu", quantize=bits)
    tuned = load_causal_lm(str(final), device="cpu", quantize=bits, quantize_prefix="--large_")
    assert type(tuned).__name__ == "PeftModelForCausalLM"  # unmerged on the quantised base, as it was trained
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, base(ids).logits)
    logging.getLogger("proxytune").addHandler(caplog.handler)  # fine_tune.main's setup_logging replaced the root's
    try:
        merged = load_causal_lm(str(final), device="cpu", flag="--large_model", quantize_prefix="--large_")
    finally:
        logging.getLogger("proxytune").removeHandler(caplog.handler)
    assert type(merged).__name__ == "GPTNeoXForCausalLM"
    assert f"trained on a {bits}-bit base" in caplog.text and f"pass --large_load_in_{bits}bit" in caplog.text


# --- errors ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--load_in_4bit"], "--load_in_4bit trains a LoRA adapter on the frozen quantised base"),
    (["--load_in_8bit", "--use_lora", "--merge_lora"], "--merge_lora with --load_in_8bit would round"),
    (["--load_in_4bit", "--load_in_8bit", "--use_lora"], "give --load_in_4bit or --load_in_8bit, not both"),
])
def test_fine_tune_refuses_quantisation_without_an_adapter(flags, message):
    with pytest.raises(UsageError, match=message):
        parse_args(["--output_dir", "unused", *flags])


def test_fine_tune_refuses_to_quantise_an_adapter_directory(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(UsageError, match="is a LoRA adapter; pass its base model"):
        parse_args(["--output_dir", "unused", "--model_name_or_path", str(tmp_path), "--use_lora",
                              "--load_in_4bit"])


def test_both_widths_for_one_role_are_refused():
    with pytest.raises(UsageError, match="give --large_load_in_4bit or --large_load_in_8bit, not both"):
        QuantizationArguments(large_load_in_4bit=True, large_load_in_8bit=True)
    assert quantization_bits(False, False) is None and QuantizationArguments(small_base_load_in_8bit=True) \
        .quantization_of("small_base") == 8


def test_missing_bitsandbytes_is_one_clear_line(monkeypatch, tiny_model_dirs):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(UsageError, match=r"--large_load_in_4bit needs bitsandbytes, which is not installed; "
                                         r"`pip install bitsandbytes`"):
        load_causal_lm(str(tiny_model_dirs["large"]), device="cpu", quantize=4, quantize_prefix="--large_")


@requires_bnb
def test_a_device_bitsandbytes_cannot_run_on_is_refused(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)  # as builds before 0.49
    with pytest.raises(UsageError, match="--load_in_8bit: bitsandbytes .* cannot run on cpu .*supports cuda"):
        check_bitsandbytes("cpu", "--load_in_8bit")


# --- the scripts' flags ------------------------------------------------------------------------------------
@requires_bnb
def test_steer_cli_with_a_4bit_large_model(tiny_model_dirs, caplog):
    from proxytune.foundation.config import parse_config
    from proxytune.steering.arguments import ModelArguments, SteerArguments, TuneArguments
    from steer import main

    flags = ["--large_model", str(tiny_model_dirs["large"]), "--small_base_model", str(tiny_model_dirs["small_base"]),
             "--small_tuned_model", str(tiny_model_dirs["small_tuned"]), "--large_load_in_4bit",
             "--small_base_load_in_8bit", "--alpha", "1.0", "--prompt", "Good paper. Weak baselines.",
             "--max_new_tokens", "5"]
    logging.getLogger("proxytune").addHandler(caplog.handler)  # main's setup_logging replaces the root's handlers
    try:
        rows = main(*parse_config([ModelArguments, SteerArguments, TuneArguments], flags))
    finally:
        logging.getLogger("proxytune").removeHandler(caplog.handler)
    assert len(rows) == 1 and rows[0]["n_new_tokens"] <= 5
    assert "large: " in caplog.text and "4-bit weights" in caplog.text and "8-bit weights" in caplog.text


@requires_bnb
def test_evaluation_loads_each_role_with_its_own_quantisation(tiny_model_dirs):
    from proxytune.evaluation.arguments import ModelArguments
    from proxytune.evaluation.systems import load_models

    args = ModelArguments(large_model=str(tiny_model_dirs["large"]),
                          small_base_model=str(tiny_model_dirs["small_base"]),
                          small_tuned_model=str(tiny_model_dirs["small_tuned"]),
                          large_tuned_model=str(tiny_model_dirs["large"]),
                          large_load_in_8bit=True)
    _, models = load_models(args, ["large", "large_tuned", "small_base"], "cpu")
    assert "Linear8bitLt" in linear_types(models["large"])
    assert models["large_tuned"] is not models["large"] and "Linear8bitLt" not in linear_types(models["large_tuned"])
    assert linear_types(models["small_base"]) == {"Linear"}


@pytest.mark.exactness
def test_speculative_decoding_with_a_quantised_large_model_equals_the_plain_loop(quantised_models, vocab):
    """steer.py decodes a batch of one speculatively by default: L then scores k drafted tokens in one call, which
    must give the tokens the one-at-a-time loop gives (bitsandbytes' 4-bit CPU kernel and LLM.int8 quantise each row
    of activations on its own, so a row's result does not depend on the others)."""
    from proxytune.steering.speculative import SpeculativeStats, speculative_generate

    mostly_draft = Blend(large_weight=0.2, tuned_weight=1.0, base_weight=0.2)
    for blend in (Blend.from_alpha(1.0), mostly_draft):
        for prompt in ([5, 6, 7, 8, 9, 10, 11], [12, 13, 14]):
            ids, mask = left_pad([prompt], PAD)
            plain = generate(*quantised_models, ids, mask, blend, vocab, max_new_tokens=12, return_logprobs=True)
            assert_clear_lead(plain[2])
            stats = SpeculativeStats()
            spec = speculative_generate(*quantised_models, ids, mask, blend, max_new_tokens=12, eos_token_id=EOS,
                                        pad_token_id=PAD, vocab_size=vocab, draft_tokens=3, stats=stats)
            assert torch.equal(spec[0], plain[0]) and torch.equal(spec[1], plain[1])
            assert stats.accepted > 0 or blend is not mostly_draft  # L's multi-token check really ran on drafts


@pytest.mark.parametrize("script", ["steer", "evaluation"])
def test_help_lists_the_model_paths_before_the_quantisation_flags(script):
    """--help opens with the models to load, not with eight --{role}_load_in_* switches."""
    import dataclasses
    import importlib

    names = [f.name for f in dataclasses.fields(importlib.import_module(script).ModelArguments)]
    assert names.index("large_model") < names.index("large_load_in_4bit")
    assert names.index("small_tuned_model") < names.index("small_base_load_in_8bit")
    assert names[-1].endswith("_load_in_8bit")
