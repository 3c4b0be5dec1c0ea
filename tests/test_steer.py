"""steer.py: the blend arithmetic, the cached decoding loop and the scorer, checked against references
(HF generate, recomputation from scratch, one-by-one decoding, hand-computed NLL) on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    PYTHIA_TOKENIZER,
    SHARED_DATA,
    add_near_tie,
    assert_clear_lead,
    assert_only_the_built_tie,
    make_tiny_model,
    requires_shared,
    train_tiny_tokenizer,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from proxytune.foundation.cli import cli
from proxytune.foundation.config import parse_config
from proxytune.foundation.hub import hub_revision
from proxytune.steering import tuning
from proxytune.steering.arguments import ModelArguments, SteerArguments, TuneArguments
from proxytune.steering.blend import (
    LARGE,
    SMALL_BASE,
    SMALL_TUNED,
    Blend,
    blend_logprobs,
    describe_blend,
    is_steering,
    nucleus_mask,
    slice_vocab,
)
from proxytune.steering.decoding import left_pad, prefill_rows, prefill_separately, steered_generate
from proxytune.steering.generation import generate_texts, read_prompt_texts
from proxytune.steering.loading import resolve_model_args
from proxytune.steering.records import blend_models
from proxytune.steering.scoring import blend_nll, blend_nll_derivatives, score_targets
from proxytune.steering.search import from_coefficients, line_search, newton_search
from proxytune.steering.tuning import choose_by_generation, generation_figures, warn_if_not_steering
from steer import main

V = 300  # tokenizer size of the in-memory models; their output layer is 12 rows wider, like Pythia's
PAD, EOS = 1, 0


@pytest.fixture(scope="module")
def models():
    """In float64: the decoding paths compared below (HF generate, uncached, one by one) then agree to ~1e-15, so the
    float32 log-probs steered decoding casts to are bit for bit the same, and no near-tie of these random models can
    turn their tokens apart on any CPU (conftest's exactness note)."""
    return {
        LARGE: make_tiny_model(V, seed=2, hidden_size=64, num_layers=3, padded_vocab=V + 12).double(),
        SMALL_BASE: make_tiny_model(V, seed=0, padded_vocab=V + 12).double(),
        SMALL_TUNED: make_tiny_model(V, seed=1, padded_vocab=V + 12).double(),
    }


@pytest.fixture(scope="module")
def batch():
    """Two prompts of different lengths, left-padded."""
    return left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], PAD)


def generate(models, ids, mask, blend, **kw):
    kw = {"max_new_tokens": 8, "eos_token_id": EOS, "pad_token_id": PAD, "vocab_size": V, **kw}
    return steered_generate(models[LARGE], models[SMALL_BASE], models[SMALL_TUNED], ids, mask, blend, **kw)


def reference_blend(z_large, z_tuned, z_base, w_l, w_t, w_b, t_l, t_s):
    """The blend written the textbook way, from raw logits with temperatures applied to the logits."""
    lsm = lambda z, t: torch.log_softmax(z.float() / t, dim=-1)  # noqa: E731
    return torch.log_softmax(w_l * lsm(z_large, t_l) + w_t * lsm(z_tuned, t_s) - w_b * lsm(z_base, t_s), dim=-1)


# --- the arithmetic -------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    weights=st.tuples(st.floats(0, 3), st.floats(0, 3), st.floats(-1, 3)),
    temps=st.tuples(st.floats(0.2, 5), st.floats(0.2, 5)),
    top_p=st.one_of(st.none(), st.floats(0.05, 1.0)),
)
def test_blend_is_a_normalised_distribution_and_alpha0_is_large(seed, weights, temps, top_p):
    g = torch.Generator().manual_seed(seed)
    logps = [torch.log_softmax(torch.randn(3, 4, 50, generator=g) * 4, dim=-1) for _ in range(3)]  # (B, T, V)
    blend = Blend(*weights, large_temperature=temps[0], small_temperature=temps[1], plausibility_top_p=top_p)
    out = blend_logprobs(*logps, blend)
    assert out.shape == (3, 4, 50)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(blend_logprobs(*logps, Blend.from_alpha(0.0)), torch.log_softmax(logps[0], -1))


@torch.inference_mode()
def test_blend_equals_direct_computation_from_model_logits(models):
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    logits = {role: m(input_ids=ids).logits.float() for role, m in models.items()}  # (1, T, V + 12) as decoding casts
    logps = {role: torch.log_softmax(slice_vocab(z, V), -1) for role, z in logits.items()}
    for w_l, w_t, w_b, t_l, t_s in [(1, 1, 1, 1, 1), (1, 0.5, 0.5, 1, 1), (0.8, 1.3, 0.2, 0.7, 1.6),
                                    (1.5, 2, -0.5, 2, 0.5)]:
        blend = Blend(w_l, w_t, w_b, large_temperature=t_l, small_temperature=t_s)
        expected = reference_blend(*(slice_vocab(logits[r], V) for r in (LARGE, SMALL_TUNED, SMALL_BASE)),
                                   w_l, w_t, w_b, t_l, t_s)
        torch.testing.assert_close(blend_logprobs(logps[LARGE], logps[SMALL_TUNED], logps[SMALL_BASE], blend), expected)


def test_plausibility_limit_keeps_the_delta_inside_large_nucleus():
    torch.testing.assert_close(nucleus_mask(torch.tensor([0.5, 0.3, 0.2]).log(), 0.6),
                               torch.tensor([True, True, False]))
    logp_large = torch.tensor([[0.001, 0.6, 0.399]]).log()  # token 0 is implausible for L
    logp_tuned = torch.tensor([[0.98, 0.01, 0.01]]).log()  # ... but the tuned model loves it
    logp_base = torch.tensor([[0.01, 0.495, 0.495]]).log()
    free = blend_logprobs(logp_large, logp_tuned, logp_base, Blend.from_alpha(2.0))
    assert free.argmax() == 0
    for limit in (dict(plausibility_top_p=0.9), dict(plausibility_min_ratio=0.1)):
        limited = blend_logprobs(logp_large, logp_tuned, logp_base, Blend.from_alpha(2.0, **limit))
        assert limited[0, 0] == float("-inf") and limited.argmax() != 0
        torch.testing.assert_close(limited.logsumexp(-1), torch.zeros(1))


def test_models_with_different_vocabularies_are_refused(models, batch):
    a, b = torch.zeros(2, V), torch.zeros(2, V + 5)
    with pytest.raises(ValueError, match="shapes differ"):
        blend_logprobs(a, b, a, Blend())
    with pytest.raises(ValueError, match="another vocabulary"):
        slice_vocab(torch.zeros(2, V - 1), V)
    narrow = make_tiny_model(V - 20, seed=3)  # fewer output rows than the tokenizer has tokens
    with pytest.raises(ValueError, match="another vocabulary"):
        steered_generate(models[LARGE], models[SMALL_BASE], narrow, *batch, Blend(), max_new_tokens=2,
                         eos_token_id=EOS, pad_token_id=PAD, vocab_size=V)


# --- decoding equivalences ---------------------------------------------------------------------
def hf_greedy(model, ids, mask, n):
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                              suppress_tokens=list(range(V, V + 12)),  # the padded rows steer.py slices off
                              output_logits=True, return_dict_in_generate=True)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    logps = torch.log_softmax(slice_vocab(torch.stack(out.logits, 1), V).float(), -1)  # (B, N, V)
    return out.sequences[:, ids.shape[1]:], logps


@pytest.mark.exactness
def test_alpha0_equals_large_models_own_greedy_generate(models, batch):
    hf_tokens, hf_logps = hf_greedy(models[LARGE], *batch, 8)
    # HF picks from float32 logits, steered decoding from float32 log-probs: they can merge a gap under ~5e-7 only.
    assert_clear_lead(hf_logps)
    tokens, _, logps = generate(models, *batch, Blend.from_alpha(0.0), return_logprobs=True)
    assert torch.equal(tokens, hf_tokens)
    torch.testing.assert_close(logps, hf_logps)
    # The full three-model path with a delta that is exactly zero (S_tuned == S) must give L's output too.
    same = dict(models, **{SMALL_TUNED: models[SMALL_BASE]})
    tokens, _, logps = generate(same, *batch, Blend.from_alpha(1.0), return_logprobs=True)
    assert torch.equal(tokens, hf_tokens)
    torch.testing.assert_close(logps, hf_logps)
    # With alpha = 0 the small models are not even needed.
    tokens, _ = steered_generate(models[LARGE], None, None, *batch, Blend.from_alpha(0.0), max_new_tokens=8,
                                 eos_token_id=EOS, pad_token_id=PAD, vocab_size=V)
    assert torch.equal(tokens, hf_tokens)


@pytest.mark.exactness
@pytest.mark.parametrize("blend", [Blend.from_alpha(1.5), Blend(0.8, 1.2, 0.3, 0.9, 1.1, plausibility_top_p=0.9)])
def test_cached_decoding_equals_recomputing_from_scratch(models, batch, blend):
    cached = generate(models, *batch, blend, max_new_tokens=10, return_logprobs=True)
    fresh = generate(models, *batch, blend, max_new_tokens=10, return_logprobs=True, use_cache=False)
    assert torch.equal(cached[0], fresh[0])
    torch.testing.assert_close(cached[2], fresh[2])
    sample = dict(do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=10)
    a = generate(models, *batch, blend, generator=torch.Generator().manual_seed(7), **sample)
    b = generate(models, *batch, blend, generator=torch.Generator().manual_seed(7), use_cache=False, **sample)
    assert torch.equal(a[0], b[0])


@torch.inference_mode()
def test_step_logprobs_equal_the_blend_of_the_models_on_the_full_sequence(models, batch):
    blend = Blend(1.0, 1.5, 1.0, large_temperature=0.9)
    tokens, _, logps = generate(models, *batch, blend, return_logprobs=True)  # (B, N), (B, N, V)
    row_ids = batch[0][1, batch[1][1].bool()]  # the second prompt without its padding
    full = torch.cat([row_ids, tokens[1]])[None]  # (1, T + N)
    z = {r: slice_vocab(m(input_ids=full).logits, V)[:, len(row_ids) - 1:-1] for r, m in models.items()}  # (1, N, V)
    expected = reference_blend(z[LARGE], z[SMALL_TUNED], z[SMALL_BASE], 1.0, 1.5, 1.0, 0.9, 1.0)
    torch.testing.assert_close(logps[1:], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.exactness
def test_batched_decoding_equals_one_by_one(models):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]
    blend = Blend.from_alpha(1.0)
    tokens, _, logps = generate(models, *left_pad(prompts, PAD), blend, return_logprobs=True)
    for row, prompt in enumerate(prompts):
        alone, _, alone_logps = generate(models, *left_pad([prompt], PAD), blend, return_logprobs=True)
        assert torch.equal(tokens[row, :alone.shape[1]], alone[0])
        torch.testing.assert_close(logps[row, :alone.shape[1]], alone_logps[0], atol=1e-5, rtol=1e-5)


@torch.inference_mode()
def test_row_by_row_prefill_equals_a_batched_prompt_pass(models):
    """prefill_rows (the CPU path of every batched prompt pass) holds, at each row's real positions, the keys and
    values a left-padded batched pass computes; padding columns stay empty; generate() will feed the last column."""
    from transformers import DynamicCache

    from proxytune.steering.decoding import positions_from_mask

    model = models[LARGE]
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]], PAD)  # (3, 7)
    cache = prefill_rows(model, ids, mask, max_cache_len=ids.shape[1] + 4)
    batched = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions_from_mask(mask)[:, :-1],
                    cache=DynamicCache(), use_cache=True).cache
    assert cache.get_seq_length() == ids.shape[1] - 1
    real = mask[:, :-1].bool()  # (3, 6) the positions the cache must hold
    for mine, theirs in zip(cache.layers, batched.layers):
        assert mine.keys.shape[2] == ids.shape[1] + 4  # preallocated for the new tokens too
        for row in range(3):
            torch.testing.assert_close(mine.keys[row][:, :6][:, real[row]], theirs.keys[row][:, real[row]])
            torch.testing.assert_close(mine.values[row][:, :6][:, real[row]], theirs.values[row][:, real[row]])
            assert not mine.keys[row][:, :6][:, ~real[row]].any()
    assert prefill_separately(model, ids) and not prefill_separately(model, ids[:1])
    assert prefill_rows(model, ids[:, -1:], mask[:, -1:], 4) is None  # one column: nothing to prefill


def test_sampling_is_deterministic_under_a_seed(models, batch):
    kw = dict(do_sample=True, temperature=1.2, top_p=0.9, max_new_tokens=12)
    a = generate(models, *batch, Blend.from_alpha(1.0), generator=torch.Generator().manual_seed(3), **kw)[0]
    b = generate(models, *batch, Blend.from_alpha(1.0), generator=torch.Generator().manual_seed(3), **kw)[0]
    assert torch.equal(a, b)


def test_each_row_stops_at_its_own_eos(models, batch):
    blend = Blend.from_alpha(1.0)
    free, ended = generate(models, *batch, blend, max_new_tokens=8, eos_token_id=V + 100)  # an EOS never produced
    assert not ended.any() and free.shape == (2, 8)
    eos = int(free[0, 2])  # make row 0's third token the EOS
    tokens, ended = generate(models, *batch, blend, max_new_tokens=8, eos_token_id=eos)
    assert ended[0] and tokens[0, 2] == eos and (tokens[0, 3:] == PAD).all()
    assert torch.equal(tokens[0, :3], free[0, :3])
    stop = (free[1] == eos).nonzero()
    n = int(stop[0]) + 1 if len(stop) else 8
    assert torch.equal(tokens[1, :n], free[1, :n]) and bool(ended[1]) == bool(len(stop))


def test_repetition_penalty_and_no_repeat_ngram(models, batch):
    blend = Blend.from_alpha(1.0)
    tokens, _ = generate(models, *batch, blend, max_new_tokens=20, repetition_penalty=1000.0)
    for row in range(2):
        prompt = batch[0][row, batch[1][row].bool()].tolist()
        new = tokens[row].tolist()
        assert len(set(new)) == len(new) and not set(new) & set(prompt)
    tokens, _ = generate(models, *batch, blend, max_new_tokens=30, no_repeat_ngram_size=2)
    for row in range(2):
        seq = batch[0][row, batch[1][row].bool()].tolist() + tokens[row].tolist()
        bigrams = list(zip(seq, seq[1:]))
        assert len(bigrams) == len(set(bigrams))


def test_decoding_arguments_out_of_range_are_refused(models, batch):
    for bad in (dict(temperature=0.0), dict(top_p=1.5), dict(max_new_tokens=0), dict(repetition_penalty=-1.0)):
        with pytest.raises(ValueError):
            generate(models, *batch, Blend(), **bad)
    with pytest.raises(ValueError, match="exceeds the models' context"):
        generate(models, *batch, Blend(), max_new_tokens=510)  # tiny models: 512 positions, prompts up to 7 tokens
    with pytest.raises(ValueError, match="needs the small_base model"):
        steered_generate(models[LARGE], None, models[SMALL_TUNED], *batch, Blend(), max_new_tokens=2,
                         eos_token_id=EOS, pad_token_id=PAD, vocab_size=V)
    with pytest.raises(ValueError, match="LEFT"):
        generate(models, torch.tensor([[5, 6], [7, PAD]]), torch.tensor([[1, 1], [1, 0]]), Blend())  # right-padded


# --- scoring -------------------------------------------------------------------------------------
@torch.inference_mode()
def test_score_targets_matches_a_hand_computation(models):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    targets = [[20, 21, 22], [23, 24, 25, 26, 27], [28]]
    blend = Blend(1.0, 1.2, 0.7, large_temperature=1.1)
    scores = score_targets(models, prompts, targets, vocab_size=V, batch_size=2, blend=blend,
                           keep_logprobs=(LARGE, SMALL_TUNED, SMALL_BASE), show_progress=False)
    assert scores["n_tokens"].tolist() == [3, 5, 1]
    for i, (p, t) in enumerate(zip(prompts, targets)):
        ids = torch.tensor([p + t])
        lp = {r: torch.log_softmax(slice_vocab(m(input_ids=ids).logits[0], V), -1) for r, m in models.items()}
        lp["blend"] = blend_logprobs(lp[LARGE], lp[SMALL_TUNED], lp[SMALL_BASE], blend)
        for name, logp in lp.items():
            hand = -sum(float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(t))
            assert scores[name][i].item() == pytest.approx(hand, rel=1e-5, abs=1e-5), (name, i)
    # The tuner's path (cached rows, no model) agrees with the direct one.
    torch.testing.assert_close(blend_nll(scores, blend), scores["blend"], rtol=1e-6, atol=1e-5)
    ppl = math.exp(scores[LARGE].sum() / scores["n_tokens"].sum())
    assert 1 < ppl < 10 * V  # random models: near-uniform over V tokens


def reference_blend_nll(cached, blend):
    """blend_nll as it was first written: the normalised blend of every cached row (blend_logprobs), then the
    target's entry, summed per example."""
    logps = [cached[f"logprobs/{role}"].float() for role in (LARGE, SMALL_TUNED, SMALL_BASE)]  # each (R, V)
    nll = -blend_logprobs(*logps, blend).gather(-1, cached["targets"][:, None])[:, 0]  # (R,)
    out = torch.zeros(len(cached["n_tokens"]), dtype=torch.float64)  # (N,)
    return out.index_add_(0, cached["example_index"], nll.double())


@pytest.fixture(scope="module")
def cached_rows(models):
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]
    targets = [[20, 21, 22], [23, 24, 25, 26, 27], [28], list(range(30, 70))]
    return score_targets(models, prompts, targets, vocab_size=V, batch_size=3,
                         keep_logprobs=(LARGE, SMALL_TUNED, SMALL_BASE), show_progress=False)


@settings(max_examples=40, deadline=None)
@given(weights=st.tuples(st.sampled_from([0.0, 0.3, 1.0, 2.9]), st.floats(0, 3),
                         st.sampled_from([0.0, -1.0, 0.7, 3.0])),
       temps=st.tuples(st.floats(0.34, 3), st.floats(0.34, 3)), chunk_rows=st.sampled_from([1, 7, 32, 1000]))
def test_fast_blend_nll_equals_the_reference(cached_rows, weights, temps, chunk_rows):
    """blend_nll (log Z over the full vocabulary minus the target's blended score, chunked) is the same number as
    normalising the whole blend and reading the target's entry, zero weights and every chunking included."""
    blend = Blend(*weights, large_temperature=temps[0], small_temperature=temps[1])
    # float32 rows: the two orders of summation differ by float32 rounding (~1e-6 relative); a wrong formula is off
    # by far more than 1e-5.
    torch.testing.assert_close(blend_nll(cached_rows, blend, chunk_rows), reference_blend_nll(cached_rows, blend),
                               rtol=1e-5, atol=1e-5)


def test_fast_blend_nll_with_a_bfloat16_cache_and_the_edge_blends(models, cached_rows):
    for blend in (Blend(0.0, 0.0, 0.0), Blend(0.0, 2.24, 0.0), Blend.from_alpha(1.0, plausibility_top_p=0.8)):
        torch.testing.assert_close(blend_nll(cached_rows, blend), reference_blend_nll(cached_rows, blend),
                                   rtol=1e-6, atol=1e-6)
    uniform = blend_nll(cached_rows, Blend(0.0, 0.0, 0.0))
    torch.testing.assert_close(uniform, cached_rows["n_tokens"].double() * math.log(V))
    half = {k: (v.bfloat16() if k.startswith("logprobs/") else v) for k, v in cached_rows.items()}
    blend = Blend(0.8, 1.3, 0.9)
    torch.testing.assert_close(blend_nll(half, blend), reference_blend_nll(half, blend), rtol=1e-6, atol=1e-6)


def per_token(cached, c):
    return float(blend_nll(cached, from_coefficients(c)).sum() / cached["n_tokens"].sum())


def test_nll_derivatives_equal_finite_differences(cached_rows):
    c = torch.tensor([0.8, 1.3, -0.6], dtype=torch.float64)
    value, grad, hess = blend_nll_derivatives(cached_rows, c.tolist(), chunk_rows=5)
    assert value == pytest.approx(per_token(cached_rows, c), rel=1e-6)
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = 1e-3
        fd = (per_token(cached_rows, c + e) - per_token(cached_rows, c - e)) / 2e-3
        assert float(grad[i]) == pytest.approx(fd, rel=1e-3, abs=1e-4)
        e[i] = 1e-2  # the gradient is float32 arithmetic: a wider step keeps its rounding out of the difference
        fd = (blend_nll_derivatives(cached_rows, (c + e).tolist())[1]
              - blend_nll_derivatives(cached_rows, (c - e).tolist())[1]) / 2e-2
        torch.testing.assert_close(hess[i], fd, rtol=1e-2, atol=5e-5)
    assert torch.linalg.eigvalsh(hess).min() >= -1e-9  # a covariance: the NLL is convex in the coefficients


def test_newton_search_finds_the_best_blend_in_the_box(cached_rows):
    """The free blend's optimum: no point of a grid over the box, nor any start, is better; with c_base fixed at 0
    (the product search) the result has no S term."""
    bounds = ((0.0, 3.0), (0.0, 3.0), (-3.0, 1.0))
    starts = [Blend(1.0, 0.0, 0.0), Blend.from_alpha(1.0)]
    blend, n_evals = newton_search(cached_rows, starts, bounds, max_steps=20)
    best = per_token(cached_rows, blend.coefficients)
    grid = [(a, b, c) for a in torch.linspace(0, 3, 7).tolist() for b in torch.linspace(0, 3, 7).tolist()
            for c in torch.linspace(-3, 1, 9).tolist()]
    assert all(best <= per_token(cached_rows, c) + 1e-9 for c in grid + [s.coefficients for s in starts])
    assert n_evals < 40
    product, _ = newton_search(cached_rows, starts, ((0.0, 3.0), (0.0, 3.0), (0.0, 0.0)), max_steps=20)
    assert product.base_weight == 0 and per_token(cached_rows, product.coefficients) >= best - 1e-9


def test_line_search_finds_the_minimum_of_a_convex_function():
    x, value, n = line_search(lambda a: (a - 1.3) ** 2, 0.0, 3.0, starts=[0.0, 1.0])
    assert x == pytest.approx(1.3, abs=5e-4) and value < 1e-6 and n == 2 + 2 + 18
    x, _, _ = line_search(lambda t: (math.log(t) - math.log(0.5)) ** 2, 1 / 3, 3.0, starts=[1.0], log=True)
    assert x == pytest.approx(0.5, rel=1e-3)
    assert line_search(lambda a: a, 0.0, 3.0, starts=[0.0])[0] == 0.0  # a start at the boundary is kept


# --- the blend file --------------------------------------------------------------------------------
def test_blend_file_round_trip_and_errors(tmp_path):
    blend = Blend(0.9, 1.4, 0.2, large_temperature=1.1, plausibility_top_p=0.95)
    blend.save(tmp_path / "b.json", report={"tune_ppl": 12.3})
    assert Blend.load(tmp_path / "b.json") == blend
    (tmp_path / "a.json").write_text(json.dumps({"alpha": 0.5}))
    assert Blend.load(tmp_path / "a.json") == Blend.from_alpha(0.5)
    for content, message in [({"alpah": 1}, "did you mean 'alpha'"), ({"large_weight": "x"}, "expected a number"),
                             ({"large_temperature": 0}, "large_temperature"), ("[1]", "JSON object")]:
        (tmp_path / "bad.json").write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError, match=message):
            Blend.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="alpha"):
        Blend.from_alpha(-1.0)
    assert blend_models(tmp_path / "a.json") == {}  # a blend written by hand records no models


@pytest.mark.parametrize("blend, system", [
    (Blend.from_alpha(1.0), "large + small_tuned - small_base"),
    (Blend(0.0, 2.24, 0.0), "small_tuned alone"),  # the run in issue 12: S_tuned alone, called steering
    (Blend(0.01, 2.24, 0.02), "small_tuned alone"),  # under 5% of the largest weight counts as 0
    (Blend(1.0, 1.1, 0.0), "large x small_tuned (no S term)"),
    (Blend.from_alpha(0.02), "large alone"),
    (Blend(0.0, 1.0, 1.0), "small_tuned - small_base (no L term)"),
    (Blend(1.0, 1.0, -0.5), "large + small_tuned + small_base (S added, not subtracted)"),
    (Blend(0.0, 1.0, 0.0, plausibility_top_p=0.9), "small_tuned alone within large's plausible tokens"),
    (Blend(0.0, 0.0, 0.0), "uniform (every weight 0)"),
])
def test_describe_blend_names_what_a_blend_really_is(blend, system, caplog):
    assert describe_blend(blend) == system
    assert is_steering(blend) == (system == "large + small_tuned - small_base")
    with caplog.at_level("WARNING"):
        message = warn_if_not_steering("tuned blend", blend)
    assert (message is None) == is_steering(blend)
    if message:
        assert f"not steering: it is {system}" in caplog.text


def test_hub_revision_reads_the_commit_of_the_cached_snapshot(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--EleutherAI--pythia-70m"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert hub_revision("EleutherAI/pythia-70m", cache_dir=tmp_path) == commit
    assert hub_revision("EleutherAI/pythia-160m", cache_dir=tmp_path) is None  # not downloaded
    assert hub_revision("./not/a/repo id", cache_dir=tmp_path) is None


def test_model_flags_default_from_the_blend_record_then_the_pipeline(tmp_path, monkeypatch, caplog):
    blend_file = tmp_path / "blend.json"
    records = {"large": {"name_or_path": "EleutherAI/pythia-1b", "path": None, "revision": "old"},
               "small_tuned": {"name_or_path": "gone/relative", "path": str(tmp_path), "revision": None}}
    Blend.from_alpha(1.0).save(blend_file, models=records)
    monkeypatch.setattr("proxytune.steering.loading.hub_revision", lambda name, cache_dir=None: "new")
    with caplog.at_level("WARNING"):
        args = resolve_model_args(ModelArguments(small_base_model="mine"), str(blend_file))
    assert args.large_model == "EleutherAI/pythia-1b"  # from the record
    assert args.small_tuned_model == str(tmp_path)  # the recorded absolute path: the relative one is not here
    assert args.small_base_model == "mine" and args.large_tuned_model is None  # given; neither given nor recorded
    assert "revision new of EleutherAI/pythia-1b" in caplog.text and "revision old" in caplog.text
    assert resolve_model_args(ModelArguments()).large_model == "EleutherAI/pythia-410m"  # no blend: the defaults


# --- the CLI -----------------------------------------------------------------------------------------
def run_main(argv):
    return main(*parse_config([ModelArguments, SteerArguments, TuneArguments], argv))


def model_flags(dirs):
    return ["--large_model", str(dirs["large"]), "--small_base_model", str(dirs["small_base"]),
            "--small_tuned_model", str(dirs["small_tuned"]), "--large_device", "cpu"]


def test_help_exits_zero():
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--help"])
    assert exit_info.value.code == 0


def test_cli_generates_from_a_prompt_and_a_prompts_file(tiny_model_dirs, jsonl_file, tmp_path, capsys):
    rows = run_main([*model_flags(tiny_model_dirs), "--alpha", "0.5", "--prompt", "Good paper. Weak baselines.",
                    "--max_new_tokens", "6"])
    assert len(rows) == 1 and rows[0]["n_new_tokens"] <= 6
    assert "=== 0:" in capsys.readouterr().out
    blend_file = tmp_path / "blend.json"
    Blend(1.0, 1.3, 0.4).save(blend_file)
    out = tmp_path / "gen"
    run_main([*model_flags(tiny_model_dirs), "--blend", str(blend_file), "--prompts_file", str(jsonl_file),
             "--max_new_tokens", "5", "--batch_size", "5", "--do_sample", "true", "--output_dir", str(out)])
    written = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(written) == 24 and all({"prompt", "generation", "reference"} <= set(r) for r in written)
    assert written[0]["prompt"].startswith("Peer reviews of a paper:") and written[0]["prompt"].endswith("Meta-review:")
    assert json.loads((out / "config.json").read_text())["resolved_blend"]["tuned_weight"] == 1.3


def tune_flags(dirs, jsonl_file, out, *extra):
    return [*model_flags(dirs), "--large_tuned_model", str(dirs["small_tuned"]), "--tune", "--validation_data",
            str(jsonl_file), "--n_examples", "8", "--n_trials", "8", "--max_target_tokens", "12", "--max_new_tokens",
            "6", "--output_dir", str(out), *extra]


def test_cli_tune_select_by_perplexity_keeps_the_perplexity_best_free_blend(tiny_model_dirs, jsonl_file, tmp_path,
                                                                            capsys):
    out = tmp_path / "tune"
    report = run_main(tune_flags(tiny_model_dirs, jsonl_file, out, "--select_by", "perplexity"))
    assert "free blend" in capsys.readouterr().out
    saved = json.loads((out / "tune_report.json").read_text())
    assert saved["n_examples"] == {"tune": 6, "holdout": 2} and saved["n_trials"] == 8
    assert saved["chosen"] == "free blend" and saved["candidates"] == [] and saved["generation"] is None
    assert not (out / "candidate_generations.jsonl").exists()  # nothing decoded
    entries = saved["entries"]
    assert {"large (T=1)", "small_tuned (T=1)", "large_tuned (T=1)", "large, tuned temperature",
            "small_tuned, tuned temperature", "large x small_tuned (no S term)", "proxy-tuning, tuned alpha",
            "free blend"} <= set(entries)
    chosen = entries["free blend"]["tune_nll"]
    assert all(chosen <= e["tune_nll"] + 1e-9 for name, e in entries.items() if name != "large_tuned (T=1)")
    assert entries["large, tuned temperature"]["tune_nll"] <= entries["large (T=1)"]["tune_nll"] + 1e-9
    assert entries["proxy-tuning, tuned alpha"]["tune_nll"] <= entries["proxy-tuning, alpha=1"]["tune_nll"] + 1e-9
    assert Blend.load(out / "blend.json") == Blend(**report["blend"])
    written = json.loads((out / "blend.json").read_text())
    assert written["report"]["tune_ppl"] == pytest.approx(math.exp(chosen))
    assert written["system"] == describe_blend(Blend(**report["blend"])) == saved["system"]
    assert all(e["system"] == describe_blend(Blend(**e["blend"])) for e in entries.values() if e["blend"])


def test_cli_default_tune_chooses_the_candidate_whose_generations_score_best(tiny_model_dirs, jsonl_file, rows,
                                                                             tmp_path, capsys):
    from proxytune.task.text_metrics import make_rouge_scorer, score_rouge

    out = tmp_path / "tune"
    report = run_main(tune_flags(tiny_model_dirs, jsonl_file, out))
    saved = json.loads((out / "tune_report.json").read_text())
    assert saved["selected_by"] == "generation" and saved["generation"]["n_examples"] == 2  # the held-out papers
    names = saved["candidates"]
    assert {"proxy-tuning, alpha=0.5", "proxy-tuning, alpha=1", "proxy-tuning, alpha=1.5"} <= set(names)
    generations = [json.loads(line) for line in (out / "candidate_generations.jsonl").read_text().splitlines()]
    assert len(generations) == 2 * len(names)
    # Each candidate's ROUGE-L is its outputs' mean ROUGE-L against the meta-reviews, computed here directly.
    references = {row["Input"]: row["Output"] for row in rows}
    scorer = make_rouge_scorer()
    for name in names:
        mine = [g for g in generations if g["candidate"] == name]
        direct = []
        for g in mine:
            paper = next(r for r in rows if r["Input"].split(" <sep> ")[0] in g["prompt"])
            direct.append(score_rouge(scorer, g["generation"], references[paper["Input"]])["rougeL"])
        assert saved["entries"][name]["generation"]["rougeL"] == pytest.approx(sum(direct) / len(direct))
        assert saved["entries"][name]["generation"]["n_examples"] == 2
        ref = [g["rougeL"] for g in generations if g["candidate"] == "proxy-tuning, alpha=1"]
        gain = saved["entries"][name]["generation"]["gain"]
        assert gain == pytest.approx(sum(a - b for a, b in zip([g["rougeL"] for g in mine], ref)) / len(ref))
    clear = [n for n in names if saved["entries"][n]["generation"]["clearly_better"]]
    best = max(clear, key=lambda n: saved["entries"][n]["generation"]["rougeL"]) if clear else "proxy-tuning, alpha=1"
    assert saved["entries"][saved["chosen"]]["generation"]["rougeL"] == saved["entries"][best]["generation"]["rougeL"]
    chosen = Blend(**saved["entries"][saved["chosen"]]["blend"])
    assert Blend.load(out / "blend.json") == chosen == Blend(**report["blend"])
    assert "ROUGE-L" in capsys.readouterr().out


def test_cli_tune_picks_a_candidate_that_writes_the_reference(tiny_model_dirs, jsonl_file, rows, tmp_path,
                                                              monkeypatch):
    """A candidate whose outputs are the meta-reviews themselves (ROUGE-L 100) must be chosen, whatever its
    perplexity: the generation stage decides."""
    generate = generate_texts

    def perfect_for_alpha_2(models, tokenizer, prompts, blend, args, desc="generating"):
        results = generate(models, tokenizer, prompts, blend, args, desc)
        if blend == Blend.from_alpha(2.0):
            for result, prompt in zip(results, prompts):
                result["generation"] = next(r["Output"] for r in rows if r["Input"].split(" <sep> ")[0] in prompt)
        return results

    monkeypatch.setattr(tuning, "generate_texts", perfect_for_alpha_2)
    report = run_main(tune_flags(tiny_model_dirs, jsonl_file, tmp_path / "tune"))
    assert report["chosen"] == "proxy-tuning, alpha=2" and report["system"] == "large + small_tuned - small_base"
    assert report["entries"]["proxy-tuning, alpha=2"]["generation"]["rougeL"] == pytest.approx(100.0)


def test_generation_selection_keeps_alpha_1_unless_a_candidate_is_clearly_better():
    ref = [10.0, 30.0, 20.0, 15.0, 25.0, 12.0, 18.0, 22.0]  # ROUGE-L of alpha = 1 on 8 papers
    scores = {"proxy-tuning, alpha=1": ref,
              "noisy": [r + d for r, d in zip(ref, [9, -8, 7, -6, 8, -7, 6, -1])],  # +1 on average, either way
              "steady": [r + 2 for r in ref],  # +2 on every paper
              "steadier": [r + 1 for r in ref]}
    rows = [{"candidate": name, "ended_with_eos": False, "n_new_tokens": 5} for name in scores for _ in ref]
    figures = generation_figures(scores, rows, seed=0)
    assert figures["noisy"]["gain"] == pytest.approx(1.0) and figures["noisy"]["gain_low"] < 0
    assert not figures["noisy"]["clearly_better"] and not figures["proxy-tuning, alpha=1"]["clearly_better"]
    assert figures["steady"]["gain_low"] == pytest.approx(2.0) and figures["steady"]["clearly_better"]
    entries = {name: {"generation": figures[name], "tune_nll": 5.0} for name in scores}
    assert choose_by_generation(entries) == "steady"  # of the clearly better, the best ROUGE-L
    entries["steadier"]["generation"] |= {"rougeL": figures["steady"]["rougeL"]}
    entries["steadier"]["tune_nll"] = 4.0
    assert choose_by_generation(entries) == "steadier"  # a tie: the lower perplexity
    del entries["steady"], entries["steadier"]
    entries["noisy"]["tune_nll"] = 1.0
    assert choose_by_generation(entries) == "proxy-tuning, alpha=1"  # the best mean, but not clearly: alpha = 1


def test_blend_file_alone_is_enough_and_an_explicit_model_flag_wins(tiny_model_dirs, jsonl_file, tmp_path,
                                                                     monkeypatch, caplog):
    """blend.json records the models it was tuned with; `--blend FILE` then needs no model flag, also from another
    directory (the record keeps absolute paths), and a flag naming another model wins with a warning."""
    monkeypatch.setattr("steer.setup_logging", lambda: None)  # its basicConfig(force=True) would drop caplog's handler
    monkeypatch.chdir(tiny_model_dirs["large"].parent)
    dirs = {role: path.name for role, path in tiny_model_dirs.items()}  # relative paths, as a user types them
    out = tmp_path / "tune"
    run_main(tune_flags(dirs, jsonl_file, out, "--select_by", "perplexity"))
    record = blend_models(out / "blend.json")
    assert set(record) == {"large", "small_base", "small_tuned", "large_tuned"}
    assert record["large"] == {"name_or_path": "large", "path": str(tiny_model_dirs["large"].resolve()),
                               "revision": None, "quantization": None}
    monkeypatch.chdir(tmp_path)
    prompt = ["--prompt", "Good paper. Weak baselines.", "--max_new_tokens", "5", "--large_device", "cpu"]
    with caplog.at_level("INFO"):
        alone = run_main(["--blend", str(out / "blend.json"), *prompt])
    assert f"small_tuned={tiny_model_dirs['small_tuned'].resolve()} (from {out / 'blend.json'})" in caplog.text
    explicit = run_main([*model_flags(tiny_model_dirs), "--blend", str(out / "blend.json"), *prompt])
    assert alone == explicit
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_main(["--blend", str(out / "blend.json"), "--small_tuned_model", str(tiny_model_dirs["small_base"]),
                  *prompt])
    assert f"--small_tuned_model {tiny_model_dirs['small_base']} is not small_tuned" in caplog.text


def test_cli_tune_reads_a_processed_dataset_directory(tiny_model_dirs, tiny_tokenizer, tmp_path, monkeypatch, caplog):
    import datasets

    monkeypatch.setattr("steer.setup_logging", lambda: None)  # keep caplog's handler

    prompt_ids = tiny_tokenizer("Peer reviews of a paper:\n\nGood.\n\nMeta-review:")["input_ids"]
    target_ids = tiny_tokenizer(" Accept.")["input_ids"] + [tiny_tokenizer.eos_token_id]
    rows = {"input_ids": [prompt_ids + target_ids] * 3, "prompt_length": [len(prompt_ids)] * 3}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "ids_only"))
    flags = [*model_flags(tiny_model_dirs), "--tune", "--n_trials", "3", "--holdout_fraction", "0",
             "--max_new_tokens", "4"]
    report = run_main([*flags, "--validation_data", str(tmp_path / "ids_only"), "--select_by", "perplexity",
                       "--output_dir", str(tmp_path / "tune")])
    assert report["n_target_tokens"] == {"tune": 3 * len(target_ids)}
    with pytest.raises(ValueError, match="no reviews/Output columns"):  # generation needs the texts
        run_main([*flags, "--validation_data", str(tmp_path / "ids_only"), "--output_dir", str(tmp_path / "t2")])
    rows |= {"reviews": [["Good."]] * 3, "Output": ["Accept."] * 3}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "data"))
    with caplog.at_level("WARNING"):
        report = run_main([*flags, "--validation_data", str(tmp_path / "data"), "--output_dir", str(tmp_path / "t3")])
    assert report["generation"]["examples"] == "tune" and "papers the perplexity search tuned on" in caplog.text


@requires_shared
def test_cli_tune_on_shared_data_with_the_pythia_tokenizer(tmp_path):
    from proxytune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(PYTHIA_TOKENIZER))
    dirs = {}
    for seed, role in enumerate(["small_base", "small_tuned", "large"]):
        model = make_tiny_model(len(tokenizer), seed=seed, padded_vocab=50304)
        dirs[role] = tmp_path / role
        model.save_pretrained(dirs[role])
        tokenizer.save_pretrained(dirs[role])
    out = tmp_path / "tune"
    report = run_main([*model_flags(dirs), "--tune", "--validation_data", str(SHARED_DATA / "mred_val_longest.jsonl"),
                      "--n_examples", "4", "--max_target_tokens", "16", "--n_trials", "3", "--max_new_tokens", "4",
                      "--output_dir", str(out)])
    assert report["normalisation"] == "full vocabulary (50277 tokens)"
    assert report["n_target_tokens"] == {"tune": 48, "holdout": 16}
    assert math.isfinite(Blend.load(out / "blend.json").large_weight)


@pytest.fixture(scope="module")
def other_vocab_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("other_vocab")
    tok_dir = train_tiny_tokenizer(root / "tok", vocab_size=280)
    from proxytune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tok_dir))
    make_tiny_model(len(tokenizer), padded_vocab=len(tokenizer) + 12).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


@pytest.mark.parametrize("case", ["other_vocab", "missing_model", "negative_alpha", "zero_temperature",
                                  "empty_prompt", "prompt_too_long", "alpha_and_blend", "no_room_for_prompt"])
def test_cli_bad_input_is_one_line_and_exit_2(case, tiny_model_dirs, other_vocab_model_dir, tmp_path, capsys):
    flags = model_flags(tiny_model_dirs)
    extra = {
        "other_vocab": ["--small_tuned_model", str(other_vocab_model_dir), "--prompt", "Good."],
        "missing_model": ["--small_tuned_model", str(tmp_path / "no_such_model"), "--prompt", "Good."],
        "negative_alpha": ["--alpha", "-0.5", "--prompt", "Good."],
        "zero_temperature": ["--do_sample", "true", "--temperature", "0", "--prompt", "Good."],
        "empty_prompt": ["--prompt", "   "],
        "prompt_too_long": ["--use_template", "false", "--prompt", "Good paper. " * 400],
        "alpha_and_blend": ["--alpha", "1", "--blend", str(tmp_path / "b.json"), "--prompt", "Good."],
        "no_room_for_prompt": ["--max_new_tokens", "512", "--prompt", "Good."],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        steer_cli([*flags, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and err.count("error: ") == 1, err
    assert "Traceback" not in err


def steer_cli(argv):
    """As `python steer.py` runs (proxytune.foundation.cli.run_cli): argument errors too end in one line and exit 2."""
    return cli(lambda: main(*parse_config([ModelArguments, SteerArguments, TuneArguments], argv)))()


@pytest.mark.exactness
@pytest.mark.parametrize("seed", range(20))
def test_a_zero_delta_is_exactly_zero_on_a_near_tie(seed):
    """S_tuned == S: the steered log-probs are L's own, bit for bit, even where L's top two differ by one ulp (the
    blend takes the small pair's difference first; summed term by term, +-1 ulp of lp_S flipped the tie on AVX2).
    Only that: L's own renormalised log-probs (`alone`) may round a one-ulp gap away, where the renormalisation
    crosses a power of two (seed 12 under ATEN_CPU_CAPABILITY=default); that the greedy token goes through such a tie
    is the end-to-end test's below, whose tie is built where normalising subtracts exactly."""
    g = torch.Generator().manual_seed(seed)
    logp_large = torch.log_softmax(torch.randn(4, 50, generator=g), -1)  # (B, V)
    top = logp_large.argmax(-1)
    runner_up = (top + 1) % 50
    logp_large[torch.arange(4), runner_up] = torch.nextafter(logp_large[torch.arange(4), top], torch.tensor(-1e9))
    logp_small = torch.log_softmax(torch.randn(4, 50, generator=g) * 5, -1)
    alone = blend_logprobs(logp_large, None, None, Blend.from_alpha(0.0))
    for alpha in (0.5, 1.0, 1.7):
        steered = blend_logprobs(logp_large, logp_small, logp_small, Blend.from_alpha(alpha))
        assert torch.equal(steered, alone)


NEAR_TIE_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24]]


def check_zero_delta_decodes_large_through_a_near_tie(large, small, vocab: int, n: int = 16) -> None:
    """`large` holds conftest.add_near_tie's built tie: steering with S_tuned == S (`small` twice) must decode its
    greedy output (HF generate's, which picks from the logits themselves) and give its own log-probs bit for bit."""
    ids, mask = left_pad(NEAR_TIE_PROMPTS, PAD)
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
                              suppress_tokens=list(range(vocab, vocab + 12)), output_logits=True,
                              return_dict_in_generate=True)
    with torch.inference_mode():
        out = large.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    greedy = out.sequences[:, ids.shape[1]:]  # (B, N)
    assert_only_the_built_tie(slice_vocab(torch.stack(out.logits, 1), vocab))  # (B, N, V) L's float32 logits
    kw = dict(max_new_tokens=n, eos_token_id=EOS, pad_token_id=PAD, vocab_size=vocab, return_logprobs=True)
    alone, _, alone_logps = steered_generate(large, None, None, ids, mask, Blend.from_alpha(0.0), **kw)
    assert torch.equal(alone, greedy)
    for alpha in (0.5, 1.0, 1.7):
        steered, _, logps = steered_generate(large, small, small, ids, mask, Blend.from_alpha(alpha), **kw)
        assert torch.equal(steered, greedy) and torch.equal(logps, alone_logps), alpha


@pytest.mark.exactness
def test_a_zero_delta_decodes_large_greedy_output_through_a_built_near_tie():
    """End to end, float32 L: at the steps where L's two best tokens are one ulp apart (built on purpose), steering with
    S_tuned == S still takes L's token. Summed term by term, the blend rounded the two together or swapped them at such
    steps (this test then fails, on every kernel set of tests/exactness_kernels.sh)."""
    large = add_near_tie(make_tiny_model(V, seed=2, hidden_size=64, num_layers=3, padded_vocab=V + 12))
    check_zero_delta_decodes_large_through_a_near_tie(large, make_tiny_model(V, seed=0, padded_vocab=V + 12), V)


def test_a_jsonl_prompts_file_with_unicode_line_separators_inside_strings_reads_row_by_row(tmp_path):
    """json.dumps(ensure_ascii=False), as this project writes its JSONL, keeps U+2028/U+0085 raw inside strings;
    a reader that splits on str.splitlines() would cut such a row in two."""
    rows = [{"Input": "Review one\u2028continues here."}, {"Input": "Review two\x85also."}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    items = read_prompt_texts(SteerArguments(prompts_file=str(path)))
    assert [item[1]["Input"] for item in items] == [r["Input"] for r in rows]
