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
from conftest import make_tiny_model

import fine_tune
from common import (
    QUANTIZATION_RECORD,
    QuantizationArguments,
    UsageError,
    check_bitsandbytes,
    load_causal_lm,
    quantization_bits,
)
from steer import Blend, left_pad, steered_generate

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
    if not HAS_BNB:
        pytest.skip("bitsandbytes not installed (pip install bitsandbytes)")
    large = load_causal_lm(str(tiny_model_dirs["large"]), device="cpu", quantize=request.param)
    small_base = make_tiny_model(vocab, seed=0, padded_vocab=vocab + 12)
    small_tuned = make_tiny_model(vocab, seed=1, padded_vocab=vocab + 12)
    return large, small_base, small_tuned


def test_alpha0_with_a_quantised_large_model_is_its_own_greedy_output(quantised_models, vocab):
    from transformers import GenerationConfig

    large, small_base, small_tuned = quantised_models
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], PAD)
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                              suppress_tokens=list(range(vocab, vocab + 12)))  # the padded rows steer.py slices off
    with torch.inference_mode():
        hf = large.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    tokens, _ = generate(large, small_base, small_tuned, ids, mask, Blend.from_alpha(0.0), vocab)
    assert torch.equal(tokens[:, :hf.shape[1]], hf)
    # The full three-model path with a zero delta (S_tuned == S) too.
    tokens, _ = generate(large, small_base, small_base, ids, mask, Blend.from_alpha(1.0), vocab)
    assert torch.equal(tokens[:, :hf.shape[1]], hf)


def test_cached_equals_uncached_with_a_quantised_large_model(quantised_models, vocab):
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], PAD)
    blend = Blend.from_alpha(1.5)
    cached = generate(*quantised_models, ids, mask, blend, vocab, max_new_tokens=10, return_logprobs=True)
    fresh = generate(*quantised_models, ids, mask, blend, vocab, max_new_tokens=10, return_logprobs=True,
                     use_cache=False)
    assert torch.equal(cached[0], fresh[0])
    torch.testing.assert_close(cached[2], fresh[2], atol=1e-4, rtol=1e-4)
    assert cached[2].dtype == torch.float32  # the arithmetic runs on float32 log-probs whatever L stores


def test_batched_equals_one_by_one_with_a_quantised_large_model(quantised_models, vocab):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    blend = Blend.from_alpha(1.0)
    tokens, _, logps = generate(*quantised_models, *left_pad(prompts, PAD), blend, vocab, return_logprobs=True)
    for row, prompt in enumerate(prompts):
        alone, _, alone_logps = generate(*quantised_models, *left_pad([prompt], PAD), blend, vocab,
                                         return_logprobs=True)
        assert torch.equal(tokens[row, :alone.shape[1]], alone[0])
        torch.testing.assert_close(logps[row, :alone.shape[1]], alone_logps[0], atol=1e-4, rtol=1e-4)


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
