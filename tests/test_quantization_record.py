"""blend.json and evaluation.py's run info record how each model was quantised, and a blend is reloaded so.

A blend tuned on a 4-bit L records it (blend.json's `models`, its `system`, the tune report); `steer.py --blend` and
evaluation.py load L in 4 bits again unless a --{role}_load_in_* flag says otherwise; a blend.json written before
the record existed loads unquantised, as it always did. bitsandbytes 0.49+ runs 4-bit on CPU (tests/test_quantized.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging

import pytest
from conftest import make_rows

import evaluation
from proxytune.evaluation.arguments import ARGUMENT_TYPES
from proxytune.evaluation.systems import describe_system, resolve_models
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_causal_lm
from proxytune.models.quantization import describe_quantization, loaded_bits, loaded_quantization
from proxytune.steering.arguments import ModelArguments, SteerArguments, TuneArguments
from proxytune.steering.blend import Blend, describe_blend
from proxytune.steering.loading import resolve_model_args
from steer import main as steer_main

requires_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                  reason="bitsandbytes not installed (pip install bitsandbytes)")
ROLES = ("large", "small_base", "small_tuned", "large_tuned")
FOUR_BIT_CPU = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def steer_args(argv: list[str]):
    return parse_config([ModelArguments, SteerArguments, TuneArguments], argv)


def quantisation_flags(args) -> dict[str, int | None]:
    return {role: args.quantization_of(role) for role in ROLES}


def model_flags(dirs) -> list[str]:
    return [flag for role in ("large", "small_base", "small_tuned") for flag in (f"--{role}_model", str(dirs[role]))]


@pytest.fixture
def logs(caplog):
    """steer.main's setup_logging replaces the root's handlers: listen on the library's and the script's loggers."""
    loggers = [logging.getLogger(name) for name in ("proxytune", "steer")]
    levels = [logger.level for logger in loggers]
    caplog.handler.setLevel(logging.INFO)
    for logger in loggers:
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.INFO)
    yield caplog
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)
        logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def tuned_4bit(tiny_model_dirs, tmp_path_factory):
    """steer.py --tune with a 4-bit L (perplexity selection: nothing decoded) -> (output dir, report, printed)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed (pip install bitsandbytes)")
    out = tmp_path_factory.mktemp("tuned_4bit")
    data = out / "validation.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_rows(8)), encoding="utf-8")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = steer_main(*steer_args([
            *model_flags(tiny_model_dirs), "--large_load_in_4bit", "--tune", "--select_by", "perplexity",
            "--validation_data", str(data), "--n_examples", "4", "--n_trials", "2", "--max_target_tokens", "8",
            "--output_dir", str(out / "steer")]))
    return out / "steer", report, printed.getvalue()


# --- the record -----------------------------------------------------------------------------------------------
def test_a_blend_tuned_on_a_4bit_large_model_records_it_wherever_it_is_shown(tuned_4bit):
    out, report, printed = tuned_4bit
    written = json.loads((out / "blend.json").read_text())
    models = written["models"]
    assert models["large"]["quantization"] == FOUR_BIT_CPU  # read from the loaded model's bitsandbytes config
    assert models["small_base"]["quantization"] is None and models["small_tuned"]["quantization"] is None
    # The chosen blend of random tiny models may leave L out; 'system' names L as 4-bit wherever the blend uses it.
    assert written["system"] == describe_blend(Blend(**report["blend"]), {"large": 4}) == report["system"]
    assert describe_blend(Blend.from_alpha(1.0), {"large": 4}) == "large (4-bit) + small_tuned - small_base"
    saved = json.loads((out / "tune_report.json").read_text())
    assert saved["system"] == written["system"] and saved["quantization"]["large"] == FOUR_BIT_CPU
    assert saved["quantization"]["small_tuned"] is None
    assert f"= {written['system']} (" in printed  # format_report's 'chosen:' line
    assert "tuned on quantised models: large 4-bit NF4, double quant, computing in float32" in printed
    assert Blend.load(out / "blend.json") == Blend(**report["blend"])  # load() still reads the blend itself


# --- reloading ------------------------------------------------------------------------------------------------
def test_steer_blend_reloads_the_recorded_quantisation_unless_a_flag_says_otherwise(tuned_4bit, logs):
    blend = str(tuned_4bit[0] / "blend.json")
    args = resolve_model_args(steer_args(["--blend", blend])[0], blend)
    assert quantisation_flags(args) == {"large": 4, "small_base": None, "small_tuned": None, "large_tuned": None}
    assert args.large_load_in_4bit is True and args.large_load_in_8bit is False
    assert args.small_base_load_in_4bit is False and args.small_base_load_in_8bit is False
    assert "as the blend" in logs.text and "large 4-bit NF4, double quant, computing in float32" in logs.text

    logs.clear()
    args = resolve_model_args(steer_args(["--blend", blend, "--large_load_in_4bit", "false"])[0], blend)
    assert quantisation_flags(args)["large"] is None and args.large_load_in_4bit is False  # the explicit flag wins
    assert "--large_load_in_4bit false loads large unquantised; the blend" in logs.text
    assert "was tuned with it 4-bit NF4" in logs.text

    logs.clear()
    args = resolve_model_args(steer_args(["--blend", blend, "--large_load_in_8bit", "--small_base_load_in_4bit"])[0],
                              blend)
    assert quantisation_flags(args) == {"large": 8, "small_base": 4, "small_tuned": None, "large_tuned": None}
    assert "--large_load_in_8bit true loads large 8-bit" in logs.text  # the record says 4-bit ...
    assert "--small_base_load_in_4bit true loads small_base 4-bit" in logs.text  # ... and unquantised


@pytest.fixture(scope="module")
def steering_4bit(tuned_4bit) -> str:
    """Proxy-tuning (alpha = 1, which uses L) with the models record of the 4-bit tune."""
    path = tuned_4bit[0].parent / "alpha1_blend.json"
    Blend.from_alpha(1.0).save(path, models=json.loads((tuned_4bit[0] / "blend.json").read_text())["models"])
    return str(path)


@requires_bnb
def test_steer_main_with_the_blend_alone_loads_large_in_4bits(steering_4bit, tmp_path, logs):
    out = tmp_path / "generations"
    rows = steer_main(*steer_args(["--blend", steering_4bit, "--prompt", "Good paper. Weak baselines.",
                                   "--max_new_tokens", "3", "--output_dir", str(out)]))
    assert len(rows) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["large_load_in_4bit"] is True and config["small_tuned_load_in_4bit"] is False
    assert config["system"] == "large (4-bit) + small_tuned - small_base"
    assert "4-bit weights" in logs.text  # load_models' line for L
    assert "(large (4-bit) + small_tuned - small_base), greedy decoding" in logs.text


@pytest.mark.parametrize("record", ["no models", "models without quantization", "quantization null"])
def test_a_blend_file_without_the_record_loads_unquantised(tmp_path, tiny_model_dirs, logs, record):
    blend = tmp_path / "blend.json"
    models = {role: {"name_or_path": str(tiny_model_dirs[role]), "path": str(tiny_model_dirs[role]),
                     "revision": None} for role in ("large", "small_base", "small_tuned")}
    if record == "quantization null":
        models = {role: {**entry, "quantization": None} for role, entry in models.items()}
    Blend.from_alpha(1.0).save(blend, models=None if record == "no models" else models)
    args = resolve_model_args(steer_args(["--blend", str(blend)])[0], str(blend))
    assert quantisation_flags(args) == dict.fromkeys(ROLES)
    assert all(getattr(args, f"{role}_load_in_{b}bit") is False for role in ROLES for b in (4, 8))
    assert "quantisation not given as flags" not in logs.text
    args = resolve_model_args(steer_args(["--blend", str(blend), "--large_load_in_4bit"])[0], str(blend))
    assert quantisation_flags(args)["large"] == 4
    # Only a record that says 'unquantised' is contradicted; an old file does not say.
    assert ("loads large 4-bit; the blend" in logs.text) == (record == "quantization null")


@pytest.mark.parametrize("quantization", [4, {"bits": 3}, {"quant_type": "nf4"}])
def test_a_bad_quantisation_record_is_one_clear_error(tmp_path, quantization):
    blend = tmp_path / "blend.json"
    Blend.from_alpha(1.0).save(blend, models={"large": {"name_or_path": "EleutherAI/pythia-410m",
                                                        "quantization": quantization}})
    with pytest.raises(UsageError, match=r"models\.large\.quantization .* must be null \(unquantised\) or a record "
                                         "with 'bits' 4 or 8"):
        resolve_model_args(steer_args(["--blend", str(blend)])[0], str(blend))


# --- evaluation.py ------------------------------------------------------------------------------------------
def test_evaluation_fills_the_quantisation_from_the_blend_record(tuned_4bit):
    blend = str(tuned_4bit[0] / "blend.json")
    model_args = resolve_models(parse_config(ARGUMENT_TYPES, ["--blend", blend])[0])
    assert model_args.quantization_of("large") == 4 and model_args.quantization_of("small_base") is None
    model_args = resolve_models(parse_config(ARGUMENT_TYPES, ["--blend", blend, "--large_load_in_4bit", "false"])[0])
    assert model_args.quantization_of("large") is None


@requires_bnb
def test_evaluation_records_the_quantisation_in_its_run_info_and_run_sheet(steering_4bit, jsonl_file, tmp_path):
    from openpyxl import load_workbook

    out = tmp_path / "evaluation"
    metrics = evaluation.main(*parse_config(ARGUMENT_TYPES, [
        "--blend", steering_4bit, "--systems", "large", "steered", "--dataset_path",
        str(jsonl_file), "--num_examples", "2", "--max_new_tokens", "3", "--compute_perplexity", "false",
        "--bootstrap_samples", "20", "--output_dir", str(out)]))
    run = metrics["run"]
    assert run["quantization"] == {"large": FOUR_BIT_CPU, "small_base": "none", "small_tuned": "none"}
    assert run["systems"]["large"]["model"].endswith("(4-bit)")
    steered = run["systems"]["steered"]["model"]
    assert steered.startswith("large (4-bit) + small_tuned - small_base (large=") and "(4-bit) + small_base=" in steered
    sheet = {key: value for key, value in load_workbook(out / "eval_examples.xlsx")["Run"].iter_rows(
        min_row=2, values_only=True)}
    assert sheet["quantization.large.bits"] == 4 and sheet["quantization.large.quant_type"] == "nf4"
    assert sheet["quantization.large.double_quant"] is True
    assert sheet["quantization.large.compute_dtype"] == "float32" and sheet["quantization.small_base"] == "none"


# --- the pieces -----------------------------------------------------------------------------------------------
@requires_bnb
def test_loaded_quantization_reads_the_model_and_describe_names_it(tiny_model_dirs):
    large = str(tiny_model_dirs["large"])
    four = load_causal_lm(large, dtype="bfloat16", device="cpu", quantize=4)
    eight = load_causal_lm(large, device="cpu", quantize=8)
    full = load_causal_lm(large, device="cpu")
    assert loaded_quantization(four) == {**FOUR_BIT_CPU, "compute_dtype": "bfloat16"}
    assert loaded_quantization(eight) == {"bits": 8} and loaded_quantization(full) is None
    assert loaded_bits({"large": four, "small_base": full, "small_tuned": eight}) == {"large": 4, "small_tuned": 8}
    assert describe_quantization(loaded_quantization(four)) == "4-bit NF4, double quant, computing in bfloat16"
    assert describe_quantization({"bits": 8}) == "8-bit" and describe_quantization(None) == "unquantised"
    paths = {"large": "L", "small_base": "S", "small_tuned": "T"}
    assert describe_system("large", paths, None, {"large": 4}) == "L (4-bit)"
    assert describe_system("steered", paths, Blend.from_alpha(1.0), {"large": 4}) == (
        "large (4-bit) + small_tuned - small_base (large=L (4-bit) + small_base=S + small_tuned=T)")
    assert describe_system("steered", paths, Blend.from_alpha(1.0)) == (
        "large + small_tuned - small_base (large=L + small_base=S + small_tuned=T)")  # unquantised: as before
