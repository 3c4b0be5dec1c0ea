"""Bottleneck adapters (proxytune/models/adapters.py): the zero start, training only the adapters, the file round
trip, resuming, and the adapter directory as S_tuned in steer.py, on tiny GPT-NeoX models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_rows, make_tiny_model
from safetensors.torch import load_file

import evaluation
import fine_tune
import rl_tune
from proxytune.evaluation.arguments import ARGUMENT_TYPES
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.models.adapters import (
    BOTTLENECK_CONFIG,
    BOTTLENECK_WEIGHTS,
    BottleneckConfig,
    add_bottleneck_adapters,
    save_bottleneck_adapters,
)
from proxytune.models.loading import load_causal_lm
from proxytune.preference.arguments import parse_args as rl_parse_args
from proxytune.steering.arguments import ModelArguments as SteerModelArguments
from proxytune.steering.arguments import SteerArguments, TuneArguments
from proxytune.steering.blend import SMALL_BASE, SMALL_TUNED
from proxytune.steering.loading import load_models
from proxytune.training.arguments import parse_args
from proxytune.training.checkpoints import find_resume_checkpoint
from steer import main as steer_main

QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0"]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])  # (2, 8)


def run_fine_tune(*flags: str) -> dict:
    return fine_tune.main(*parse_args([*QUIET, *flags]))


def adapted(model, reduction_factor: int = 4, non_linearity: str = "relu", random_up: bool = False):
    """`model` with bottleneck adapters; `random_up` gives the up-projections weights, as training would."""
    add_bottleneck_adapters(model, BottleneckConfig("base", reduction_factor, non_linearity))
    if random_up:
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "_adapter.up." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random tiny GPT-NeoX whose output layer is scaled up: frozen, the default one could move the logits by about
    +-0.5 only (conftest's make_tiny_model), too little for the adapters' effect on the loss to show."""
    path = tmp_path_factory.mktemp("base")
    make_tiny_model(len(tiny_tokenizer), padded_vocab=len(tiny_tokenizer) + 12, output_scale=20.0).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24)), encoding="utf-8")
    return path


def flags(base_dir: Path, data_file: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(base_dir), "--dataset_path", str(data_file), "--max_length", "128",
            "--adapter", "bottleneck", "--reduction_factor", "4", "--per_device_train_batch_size", "4",
            "--learning_rate", "3e-2", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--num_samples", "0",
            *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dir, data_file) -> dict:
    out = tmp_path_factory.mktemp("bottleneck") / "run"
    return run_fine_tune(*flags(base_dir, data_file, "--max_steps", "12", "--save_steps", "6", "--output_dir",
                                str(out)))


@pytest.mark.exactness
@pytest.mark.parametrize("non_linearity", ["relu", "swish"])
def test_zero_initialised_adapters_leave_the_model_exactly_the_base(non_linearity):
    """W_up = 0, b_up = 0: a(h) = h + 0 exactly, so the logits are the base model's bit for bit."""
    base = make_tiny_model(300, seed=3)
    model = adapted(make_tiny_model(300, seed=3), non_linearity=non_linearity)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, base(IDS).logits)
    # ... and the adapters are in the forward pass: with weights, the logits move.
    model = adapted(make_tiny_model(300, seed=3), non_linearity=non_linearity, random_up=True)
    with torch.no_grad():
        assert (model(IDS).logits - base(IDS).logits).abs().max() > 1e-3


def test_only_the_adapters_train_and_the_sizes_follow_the_reduction_factor():
    model = adapted(make_tiny_model(300, hidden_size=32, num_layers=2), reduction_factor=4)
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("mh_adapter" in n) or ("output_adapter" in n) for n in trainable)
    # per adapter: down 32 -> 8 (+ bias), up 8 -> 32 (+ bias); two per layer, two layers
    assert sum(trainable.values()) == 2 * 2 * (32 * 8 + 8 + 8 * 32 + 32)
    assert model.bottleneck_config.bottleneck_size == 8 and model.bottleneck_config.hidden_size == 32


def test_fine_tune_trains_the_adapters_alone_and_saves_them_alone(trained, base_dir):
    final = trained["final_dir"]
    assert (final / BOTTLENECK_WEIGHTS).is_file() and (final / BOTTLENECK_CONFIG).is_file()
    assert not (final / "model.safetensors").exists()  # the base is not copied
    config = json.loads((final / BOTTLENECK_CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert config["reduction_factor"] == 4 and config["non_linearity"] == "relu"
    history = json.loads((final / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]
    weights = load_file(str(final / BOTTLENECK_WEIGHTS))
    assert all("_adapter." in k for k in weights)
    assert any(k.endswith("up.weight") and v.abs().max() > 0 for k, v in weights.items())  # trained away from 0
    # The base weights are untouched: the adapted model's base parameters equal the base directory's.
    tuned, base = load_causal_lm(str(final), device="cpu"), load_causal_lm(str(base_dir), device="cpu")
    base_state = base.state_dict()
    for name, tensor in tuned.state_dict().items():
        if "_adapter." not in name:
            assert torch.equal(tensor, base_state[name]), name
    # Checkpoints hold the adapters too, not a copy of the base.
    checkpoint = trained["final_dir"].parent / "checkpoint-12"
    assert (checkpoint / BOTTLENECK_WEIGHTS).is_file() and not (checkpoint / "model.safetensors").exists()


@pytest.mark.exactness
def test_save_and_load_give_identical_logits_in_float64(tmp_path, base_dir):
    model = adapted(load_causal_lm(str(base_dir), device="cpu"), random_up=True)
    model.bottleneck_config.base_model_name_or_path = str(base_dir)
    save_bottleneck_adapters(model, tmp_path / "adapter")
    loaded = load_causal_lm(str(tmp_path / "adapter"), device="cpu")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded.double()(IDS).logits, model.double()(IDS).logits)


@pytest.mark.exactness
def test_resume_continues_from_the_last_complete_checkpoint(tmp_path, base_dir, data_file):
    """The newest checkpoint half written: the same command resumes from the previous one and ends with the
    uninterrupted run's adapters."""
    run = flags(base_dir, data_file, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_fine_tune(*run, "--output_dir", str(whole))
    shutil.copytree(whole, broken)
    shutil.rmtree(broken / "final")
    (broken / "checkpoint-4" / "trainer_state.json").unlink()
    assert find_resume_checkpoint(broken)[0] == broken / "checkpoint-2"
    result = run_fine_tune(*run, "--output_dir", str(broken))
    assert result["resumed_from"] == broken / "checkpoint-2" and result["metrics"]["global_step"] == 4
    expected = load_file(str(whole / "final" / BOTTLENECK_WEIGHTS))
    resumed = load_file(str(broken / "final" / BOTTLENECK_WEIGHTS))
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)


def test_the_steering_loader_and_steer_py_take_an_adapter_directory(trained, tiny_model_dirs, tmp_path):
    final = trained["final_dir"]
    # The adapter was trained on base_dir; steering pairs it with a small base of the same tokenizer.
    args = SteerModelArguments(large_model=str(tiny_model_dirs["large"]), small_base_model=str(trained_base(final)),
                               small_tuned_model=str(final), large_device="cpu")
    models, _ = load_models(args)
    assert models[SMALL_TUNED].bottleneck_config.reduction_factor == 4
    with torch.no_grad():
        assert not torch.allclose(models[SMALL_TUNED](IDS).logits, models[SMALL_BASE](IDS).logits)
    out = tmp_path / "steered"
    steer_main(*parse_config([SteerModelArguments, SteerArguments, TuneArguments], [
        "--large_model", str(tiny_model_dirs["large"]), "--small_base_model", str(trained_base(final)),
        "--small_tuned_model", str(final), "--large_device", "cpu", "--prompt", "Good paper. Weak baselines.",
        "--max_new_tokens", "5", "--output_dir", str(out)]))
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["n_new_tokens"] <= 5


def trained_base(final: Path) -> Path:
    return Path(json.loads((final / BOTTLENECK_CONFIG).read_text())["base_model_name_or_path"])


@pytest.mark.parametrize("extra, message", [
    (["--merge_lora"], "cannot be merged"),
    (["--use_lora"], "choose one"),
    (["--reduction_factor", "0"], "reduction_factor"),
    (["--adapter_non_linearity", "tanh"], "tanh"),
    (["--load_in_4bit"], "not supported yet"),
])
def test_bad_adapter_flags_are_one_line_errors(extra, message, tmp_path):
    with pytest.raises(UsageError) as info:
        parse_args([*QUIET, "--adapter", "bottleneck", *extra, "--output_dir", str(tmp_path)])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_reduction_factor_above_the_hidden_size_is_refused():
    with pytest.raises(UsageError, match="reduction_factor 64 must be in"):
        adapted(make_tiny_model(300, hidden_size=32), reduction_factor=64)


def test_adapter_lora_is_use_lora(tmp_path):
    model_args = parse_args([*QUIET, "--adapter", "lora", "--output_dir", str(tmp_path)])[0]
    assert model_args.use_lora


def test_rl_tune_trains_the_adapters_of_an_adapter_policy_and_evaluation_loads_the_result(trained, jsonl_file,
                                                                                          tmp_path):
    """rl_tune.py with a bottleneck directory as the policy: the adapters train (the base stays frozen), final/ is an
    adapter directory again, and evaluation.py takes it as --small_tuned_model."""
    start = trained["final_dir"]
    out = tmp_path / "grpo"
    rl_tune.main(*rl_parse_args([str(a) for a in [
        "--method", "grpo", "--reward", "eos:1", "--dataset_path", jsonl_file, "--model_name_or_path", start,
        "--max_length", 256, "--max_completion_length", 4, "--num_generations", 4, "--per_device_train_batch_size", 4,
        "--max_steps", 2, "--learning_rate", 1e-2, "--num_eval_examples", 0, "--num_samples", 0, "--report_to", "none",
        "--output_dir", out]]))
    final = out / "final"
    assert (final / BOTTLENECK_WEIGHTS).is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / BOTTLENECK_CONFIG).read_text())["base_model_name_or_path"] == str(trained_base(start))
    before, after = load_file(str(start / BOTTLENECK_WEIGHTS)), load_file(str(final / BOTTLENECK_WEIGHTS))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    metrics = evaluation.main(*parse_config(ARGUMENT_TYPES, [
        "--dataset_path", str(jsonl_file), "--num_examples", "2", "--max_new_tokens", "3", "--bootstrap_samples", "20",
        "--small_tuned_model", str(final), "--systems", "small_tuned", "--output_dir", str(tmp_path / "eval")]))
    assert metrics is not None and (tmp_path / "eval" / "metrics.json").is_file()
