"""steer.py: the blend arithmetic, the cached decoding loop and the scorer, checked against references
(HF generate, recomputation from scratch, one-by-one decoding, hand-computed NLL) on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import PYTHIA_TOKENIZER, SHARED_DATA, make_tiny_model, requires_shared, train_tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig

from common import cli, parse_config
from steer import (
    LARGE,
    SMALL_BASE,
    SMALL_TUNED,
    Blend,
    ModelArguments,
    SteerArguments,
    TuneArguments,
    blend_logprobs,
    blend_nll,
    left_pad,
    main,
    nucleus_mask,
    prefill_rows,
    prefill_separately,
    score_targets,
    slice_vocab,
    steered_generate,
)

V = 300  # tokenizer size of the in-memory models; their output layer is 12 rows wider, like Pythia's
PAD, EOS = 1, 0


@pytest.fixture(scope="module")
def models():
    return {
        LARGE: make_tiny_model(V, seed=2, hidden_size=64, num_layers=3, padded_vocab=V + 12),
        SMALL_BASE: make_tiny_model(V, seed=0, padded_vocab=V + 12),
        SMALL_TUNED: make_tiny_model(V, seed=1, padded_vocab=V + 12),
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
    logits = {role: m(input_ids=ids).logits for role, m in models.items()}  # (1, T, V + 12)
    logps = {role: torch.log_softmax(slice_vocab(z, V), -1) for role, z in logits.items()}
    for w_l, w_t, w_b, t_l, t_s in [(1, 1, 1, 1, 1), (1, 0.5, 0.5, 1, 1), (0.8, 1.3, 0.2, 0.7, 1.6), (1.5, 2, -0.5, 2, 0.5)]:
        blend = Blend(w_l, w_t, w_b, large_temperature=t_l, small_temperature=t_s)
        expected = reference_blend(*(slice_vocab(logits[r], V) for r in (LARGE, SMALL_TUNED, SMALL_BASE)),
                                   w_l, w_t, w_b, t_l, t_s)
        torch.testing.assert_close(blend_logprobs(logps[LARGE], logps[SMALL_TUNED], logps[SMALL_BASE], blend), expected)


def test_plausibility_limit_keeps_the_delta_inside_large_nucleus():
    torch.testing.assert_close(nucleus_mask(torch.tensor([0.5, 0.3, 0.2]).log(), 0.6), torch.tensor([True, True, False]))
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


def test_alpha0_equals_large_models_own_greedy_generate(models, batch):
    hf_tokens, hf_logps = hf_greedy(models[LARGE], *batch, 8)
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

    from steer import positions_from_mask

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


def test_cli_tune_writes_a_blend_that_beats_its_baselines(tiny_model_dirs, jsonl_file, tmp_path, capsys):
    out = tmp_path / "tune"
    report = run_main([*model_flags(tiny_model_dirs), "--large_tuned_model", str(tiny_model_dirs["small_tuned"]),
                      "--tune", "--validation_data", str(jsonl_file), "--n_examples", "8", "--n_trials", "8",
                      "--max_target_tokens", "12", "--output_dir", str(out)])
    assert "free blend" in capsys.readouterr().out
    saved = json.loads((out / "tune_report.json").read_text())
    assert saved["n_examples"] == {"tune": 6, "holdout": 2} and saved["n_trials"] == 8
    entries = saved["entries"]
    assert {"large (T=1)", "small_tuned (T=1)", "large_tuned (T=1)", "large, tuned temperature",
            "small_tuned, tuned temperature", "large x small_tuned (no S term)", "free blend"} <= set(entries)
    chosen = entries["free blend"]["tune_nll"]
    assert all(chosen <= e["tune_nll"] + 1e-9 for name, e in entries.items() if name != "large_tuned (T=1)")
    assert entries["large, tuned temperature"]["tune_nll"] <= entries["large (T=1)"]["tune_nll"] + 1e-9
    assert Blend.load(out / "blend.json") == Blend(**report["blend"])
    assert json.loads((out / "blend.json").read_text())["report"]["tune_ppl"] == pytest.approx(math.exp(chosen))


def test_cli_tune_reads_a_processed_dataset_directory(tiny_model_dirs, tiny_tokenizer, tmp_path):
    import datasets

    prompt_ids = tiny_tokenizer("Peer reviews of a paper:\n\nGood.\n\nMeta-review:")["input_ids"]
    target_ids = tiny_tokenizer(" Accept.")["input_ids"] + [tiny_tokenizer.eos_token_id]
    rows = {"input_ids": [prompt_ids + target_ids] * 3, "prompt_length": [len(prompt_ids)] * 3}
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(rows)}).save_to_disk(str(tmp_path / "data"))
    report = run_main([*model_flags(tiny_model_dirs), "--tune", "--validation_data", str(tmp_path / "data"),
                      "--n_trials", "3", "--holdout_fraction", "0", "--output_dir", str(tmp_path / "tune")])
    assert report["n_target_tokens"] == {"tune": 3 * len(target_ids)}


@requires_shared
def test_cli_tune_on_shared_data_with_the_pythia_tokenizer(tmp_path):
    from common import load_tokenizer

    tokenizer = load_tokenizer(str(PYTHIA_TOKENIZER))
    dirs = {}
    for seed, role in enumerate(["small_base", "small_tuned", "large"]):
        model = make_tiny_model(len(tokenizer), seed=seed, padded_vocab=50304)
        dirs[role] = tmp_path / role
        model.save_pretrained(dirs[role])
        tokenizer.save_pretrained(dirs[role])
    out = tmp_path / "tune"
    report = run_main([*model_flags(dirs), "--tune", "--validation_data", str(SHARED_DATA / "mred_val_longest.jsonl"),
                      "--n_examples", "4", "--max_target_tokens", "16", "--n_trials", "3", "--output_dir", str(out)])
    assert report["normalisation"] == "full vocabulary (50277 tokens)"
    assert report["n_target_tokens"] == {"tune": 48, "holdout": 16}
    assert math.isfinite(Blend.load(out / "blend.json").large_weight)


@pytest.fixture(scope="module")
def other_vocab_model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("other_vocab")
    tok_dir = train_tiny_tokenizer(root / "tok", vocab_size=280)
    from common import load_tokenizer

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
    """As `python steer.py` runs (common.run_cli): argument errors too end in one line and exit 2."""
    return cli(lambda: main(*parse_config([ModelArguments, SteerArguments, TuneArguments], argv)))()
