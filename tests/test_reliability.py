"""Reliability across the four scripts: nothing lost, nothing leaked, clear errors, the same commands on 2 processes.

- Bad input: a table of bad inputs run through the real command lines; each must end in exit code 2, one
  `error: ...` line naming the problem (last on stderr), no traceback, and nothing written.
- Crashes: fine_tune.py SIGKILLed mid-checkpoint (between files and inside one), at an arbitrary moment and while
  writing final/, then re-run with the same command, finishes with the uninterrupted run's validation loss;
  evaluation.py SIGKILLed while writing the workbook leaves the previous one intact, and typed ratings survive.
- Security: a pipeline run with fake Hub tokens in the environment, in `hf auth login`'s file and in --hub_token
  writes them nowhere; trust_remote_code is off by default; pickle-only weights are refused.
- Scale-out: `torchrun --nproc_per_node 2` (CPU, gloo) for fine_tune.py and evaluation.py.
- Properties (hypothesis) of the prompt/truncation code and the steering arithmetic.

Commands run in forks of one server that has imported torch/transformers once (tests/cli_forkserver.py): each
is still its own process running the script as `__main__`, but a table of 50 commands takes seconds, not minutes.
torchrun starts its own fresh processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_forkserver import ForkServer, Result, Started
from conftest import ROOT, make_rows, make_tiny_model, train_tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_causal_lm
from proxytune.training.checkpoints import checkpoint_problems, list_checkpoints

ENV_TOKEN = "hf_FAKEtokenDoNotLeak123456"  # HF_TOKEN, HUGGING_FACE_HUB_TOKEN and --hub_token
LOGIN_TOKEN = "hf_FAKEloginTokenDoNotLeak654321"  # what `hf auth login` stores in $HF_HOME/token
SCRIPTS = ("processing_meta_review.py", "fine_tune.py", "steer.py", "evaluation.py", "rl_tune.py")


def quiet_env() -> dict[str, str]:
    """CPU only (results are compared across runs; a 1-GPU machine would also give rank 1 no device), one thread
    (tiny models, shared cores), no Hub access, and the fake tokens where a real user's would be."""
    return {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_TOKEN": ENV_TOKEN, "HUGGING_FACE_HUB_TOKEN": ENV_TOKEN, "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """A Hugging Face home with a login token file, as `hf auth login` leaves it (datasets' cache goes here too)."""
    home = tmp_path_factory.mktemp("hf_home")
    (home / "token").write_text(LOGIN_TOKEN)
    return home


@pytest.fixture(scope="module")
def server(tmp_path_factory, hf_home):
    env = {**os.environ, **quiet_env(), "HF_HOME": str(hf_home)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_DATASETS_CACHE", None)
    srv = ForkServer(env, tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.close()


def assert_clean_failure(res: Result, *needles: str) -> str:
    """Exit code 2, no traceback, and stderr ending in exactly one 'error: ...' line that names the problem."""
    assert not res.timed_out
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), res.stderr[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, res.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def snapshot(root: Path, skip: str = "_logs") -> dict[str, str]:
    """{relative path: content hash (or 'dir')} of everything under root, `skip` aside."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == skip:
            continue
        out[str(rel)] = "dir" if path.is_dir() else hashlib.sha1(path.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------------------------------------
# Inputs shared by the bad-input table (built once)
# ---------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    tok: Path  # the tiny tokenizer
    data: Path  # good Input/Output JSONL
    processed: Path  # processing_meta_review.py's output for `data`
    models: dict[str, Path]  # small_base, small_tuned, large (tiny, shared tokenizer)
    other_vocab: Path  # a model whose tokenizer maps text to other ids
    narrow: Path  # a model with fewer embedding rows than the tokenizer has tokens
    pickle_only: Path  # config + pytorch_model.bin, no safetensors
    files: Path  # a directory of bad files

    def file(self, name: str) -> Path:
        return self.files / name

    def steer_models(self) -> list[str]:
        return ["--large_model", self.models["large"], "--small_base_model", self.models["small_base"],
                "--small_tuned_model", self.models["small_tuned"], "--large_device", "cpu"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_tokenizer_dir, tiny_tokenizer, tiny_model_dirs, server) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    files = root / "files"
    files.mkdir()
    data = write_jsonl(root / "data.jsonl", make_rows(24))
    res = server.run("processing_meta_review.py", ["--dataset_name", data, "--tokenizer_name", tiny_tokenizer_dir,
                                                   "--max_length", "256", "--min_target_words", "3",
                                                   "--output_dir", root / "processed"], root / "_logs")
    assert res.returncode == 0, res.stderr[-2000:]

    other_tok = train_tiny_tokenizer(root / "other_tok", vocab_size=280)
    from proxytune.models.loading import load_tokenizer

    other = load_tokenizer(str(other_tok))
    make_tiny_model(len(other), padded_vocab=len(other) + 12).save_pretrained(root / "other_vocab")
    other.save_pretrained(root / "other_vocab")
    make_tiny_model(200).save_pretrained(root / "narrow")  # 200 rows < 300 tokens
    tiny_tokenizer.save_pretrained(root / "narrow")
    pickle_only = root / "pickle_only"
    pickle_only.mkdir()
    model = make_tiny_model(len(tiny_tokenizer), padded_vocab=len(tiny_tokenizer) + 12)
    model.config.save_pretrained(pickle_only)
    torch.save(model.state_dict(), pickle_only / "pytorch_model.bin")
    tiny_tokenizer.save_pretrained(pickle_only)

    (files / "empty.jsonl").write_text("")
    (files / "latin1.jsonl").write_bytes(b'{"Input": "caf\xe9 review", "Output": "ok"}\n')
    (files / "csv_inside.jsonl").write_text("Input,Output\nsome review,some meta-review\n")
    (files / "fake.parquet").write_text("hello")
    (files / "data.xml").write_text("<rows/>")
    write_jsonl(files / "no_output.jsonl", [{"Input": "a review", "Summary": "b"}] * 3)
    write_jsonl(files / "no_input.jsonl", [{"Reviews": "a review", "Output": "b"}] * 3)
    write_jsonl(files / "null_rows.jsonl", [{"Input": None, "Output": "fine meta review"},
                                            {"Input": "  ", "Output": "x"}, {"Input": "a review", "Output": None},
                                            {"Input": "a review", "Output": ""}])
    write_jsonl(files / "huge_targets.jsonl", [{"Input": f"review {i}", "Output": "the paper is long " * 150}
                                               for i in range(6)])
    write_jsonl(files / "bad_tune.jsonl", [{"Input": "a", "Output": "b"}])
    (files / "bad_tune.jsonl").write_text((files / "bad_tune.jsonl").read_text() + "{not json\n")
    (files / "prompts_latin1.jsonl").write_bytes(b'{"Input": "tr\xe8s bien"}\n')
    write_jsonl(files / "prompts_no_input.jsonl", [{"Reviews": "good paper"}])
    write_jsonl(files / "prompts_null.jsonl", [{"Input": None}])
    (files / "blend_corrupt.json").write_text('{"tuned_weight": 1.0,')
    (files / "blend_typo.json").write_text('{"alpah": 1.0}')
    (files / "typo.yaml").write_text("max_lenght: 128\n")
    (files / "mistyped.yaml").write_text("max_length: long\n")
    (files / "a_file").write_text("not a directory")
    import gzip

    whole = gzip.compress(data.read_bytes())
    (files / "truncated.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    (files / "data.parquet.gz").write_bytes(gzip.compress(b"PAR1 not really parquet PAR1"))
    write_jsonl(files / "numeric_output.jsonl", [{"Input": f"review {i}", "Output": i} for i in range(5)])
    write_jsonl(files / "one_decision.jsonl", [{**r, "decision": "Reject"} for r in make_rows(12)])
    from proxytune.task.papers import load_papers

    paper = load_papers(str(data), "train")[0]["example_id"]
    rate = lambda eid, system, r: {"type": "rating", "example_id": eid, "system": system, "rating": r,  # noqa: E731
                                   "output": f"output {system}"}
    write_jsonl(files / "ratings_none.jsonl", [{**rate(paper, "a", None)}])
    write_jsonl(files / "ratings_ties.jsonl", [rate(paper, "a", 3), rate(paper, "b", 3)])
    write_jsonl(files / "ratings_unknown.jsonl", [rate("not-a-paper", "a", 4), rate("not-a-paper", "b", 1)])
    write_jsonl(files / "ratings_one_pair.jsonl", [rate(paper, "a", 4), rate(paper, "b", 1)])
    (files / "no_data_dir").mkdir()
    (files / "no_data_dir" / "notes.txt").write_text("no data here")
    return Inputs(Path(tiny_tokenizer_dir), data, root / "processed", tiny_model_dirs, root / "other_vocab",
                  root / "narrow", pickle_only, files)


# ---------------------------------------------------------------------------------------------
# The bad-input table: (script, flags given the shared inputs and this case's directory, words in the error)
# ---------------------------------------------------------------------------------------------
@dataclass
class Bad:
    script: str
    argv: Callable[[Inputs, Path], list]
    needles: tuple[str, ...]


def processing(i: Inputs, d: Path, data, *extra) -> list:
    return ["--dataset_name", data, "--tokenizer_name", i.tok, "--max_length", "256", "--output_dir", d / "out", *extra]


def fine_tune(i: Inputs, d: Path, *extra) -> list:
    return ["--model_name_or_path", i.models["small_base"], "--dataset_path", i.data, "--max_length", "128",
            "--max_steps", "2", "--report_to", "none", "--output_dir", d / "out", *extra]


def steer(i: Inputs, d: Path, *extra) -> list:
    return [*i.steer_models(), "--max_new_tokens", "4", *extra]


def evaluation(i: Inputs, d: Path, *extra, models=("large", "small_base")) -> list:
    flags = [x for role in models for x in (f"--{role}_model", i.models[role])]
    return ["--dataset_path", i.data, "--num_examples", "2", "--max_new_tokens", "3", "--bootstrap_samples", "10",
            "--output_dir", d / "out", *flags, *extra]


def rl_tune(i: Inputs, d: Path, *extra) -> list:
    return ["--model_name_or_path", i.models["small_tuned"], "--dataset_path", i.data, "--max_length", "128",
            "--max_steps", "1", "--report_to", "none", "--output_dir", d / "out", *extra]


def dpo(i: Inputs, d: Path, ratings: str, *extra) -> list:
    return rl_tune(i, d, "--method", "dpo", "--workbook", i.file(ratings), *extra)


def foreign_dir(d: Path) -> Path:
    (d / "out").mkdir()
    (d / "out" / "notes.txt").write_text("mine")
    return d / "out"


def corrupt_workbook(d: Path) -> Path:
    (d / "out").mkdir()
    (d / "out" / "eval_examples.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    return d / "out"


def incomplete_checkpoint(d: Path) -> Path:
    ckpt = d / "out" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    return ckpt


BAD_INPUTS: dict[str, Bad] = {
    # processing_meta_review.py: data files, config, numbers, paths
    "processing/missing_data_file": Bad("processing_meta_review.py",
                                        lambda i, d: processing(i, d, i.file("nope.jsonl")),
                                        ("nope.jsonl", "does not exist")),
    "processing/empty_data_file": Bad("processing_meta_review.py", lambda i, d: processing(i, d, i.file("empty.jsonl")),
                                      ("is empty",)),
    "processing/non_utf8_data_file": Bad("processing_meta_review.py",
                                         lambda i, d: processing(i, d, i.file("latin1.jsonl")), ("not UTF-8", "iconv")),
    "processing/misformatted_jsonl": Bad("processing_meta_review.py",
                                         lambda i, d: processing(i, d, i.file("csv_inside.jsonl")),
                                         ("line 1 is not JSON",)),
    "processing/not_parquet": Bad("processing_meta_review.py", lambda i, d: processing(i, d, i.file("fake.parquet")),
                                  ("not a Parquet file",)),
    "processing/unknown_extension": Bad("processing_meta_review.py", lambda i, d: processing(i, d, i.file("data.xml")),
                                        ("unknown extension",)),
    "processing/missing_column": Bad("processing_meta_review.py",
                                     lambda i, d: processing(i, d, i.file("no_output.jsonl")),
                                     ("column 'Output' not found", "--output_column")),
    "processing/only_null_and_empty_rows": Bad("processing_meta_review.py",
                                               lambda i, d: processing(i, d, i.file("null_rows.jsonl")),
                                               ("no training rows left",)),
    "processing/targets_far_beyond_max_length": Bad("processing_meta_review.py",
                                                    lambda i, d: processing(i, d, i.file("huge_targets.jsonl")),
                                                    ("no training rows left", "meta_review_exceeds_max_length")),
    "processing/unknown_config_key": Bad("processing_meta_review.py",
                                         lambda i, d: [i.file("typo.yaml"), *processing(i, d, i.data)],
                                         ("unknown key 'max_lenght'", "did you mean 'max_length'")),
    "processing/mistyped_config_value": Bad("processing_meta_review.py",
                                            lambda i, d: [i.file("mistyped.yaml"), "--output_dir", d / "out"],
                                            ("key 'max_length' has value 'long'",)),
    "processing/unknown_flag": Bad("processing_meta_review.py",
                                   lambda i, d: [*processing(i, d, i.data), "--max_lenght", "9"],
                                   ("--max_lenght", "did you mean '--max_length'")),
    "processing/split_percentage_out_of_range": Bad(
        "processing_meta_review.py", lambda i, d: processing(i, d, i.data, "--validation_split_percentage", "150"),
        ("--validation_split_percentage 150.0 must be in [0, 100)",)),
    "processing/nonexistent_tokenizer": Bad(
        "processing_meta_review.py", lambda i, d: [*processing(i, d, i.data), "--tokenizer_name", d / "no_tokenizer"],
        ("cannot load tokenizer", "no such directory")),
    "processing/unwritable_output_dir": Bad(
        "processing_meta_review.py", lambda i, d: [*processing(i, d, i.data), "--output_dir", i.file("a_file") / "out"],
        ("cannot be created", "a_file is a file")),
    "processing/output_dir_not_empty": Bad(
        "processing_meta_review.py", lambda i, d: [*processing(i, d, i.data), "--output_dir", foreign_dir(d)],
        ("already exists", "--overwrite_output_dir")),
    "processing/truncated_gzip": Bad("processing_meta_review.py",
                                     lambda i, d: processing(i, d, i.file("truncated.jsonl.gz")),
                                     ("truncated.jsonl.gz is not a valid gzip file", "re-compress it")),
    "processing/compressed_parquet": Bad("processing_meta_review.py",
                                         lambda i, d: processing(i, d, i.file("data.parquet.gz")),
                                         ("gzip-compressed Parquet file", "decompress it")),
    "processing/output_column_not_text": Bad("processing_meta_review.py",
                                             lambda i, d: processing(i, d, i.file("numeric_output.jsonl")),
                                             ("column 'Output'", "holds int values, not text", "--output_column")),
    "processing/directory_without_data": Bad("processing_meta_review.py",
                                             lambda i, d: processing(i, d, i.file("no_data_dir")),
                                             ("directory without a dataset", "pass a data file (.jsonl",
                                              "named by split")),
    "processing/nan_split_percentage": Bad(
        "processing_meta_review.py", lambda i, d: processing(i, d, i.data, "--test_split_percentage", "nan"),
        ("--test_split_percentage nan is not a number", "in [0, 100)")),
    "processing/percentage_beyond_float32": Bad(
        "processing_meta_review.py", lambda i, d: processing(i, d, i.data, "--validation_split_percentage", "1e39"),
        ("--validation_split_percentage 1e+39 is not a finite float32 number",)),
    "processing/negative_seed": Bad("processing_meta_review.py", lambda i, d: processing(i, d, i.data, "--seed", "-1"),
                                    ("--seed -1 must be in [0, 4294967295]",)),
    "processing/max_length_below_template": Bad(
        "processing_meta_review.py", lambda i, d: processing(i, d, i.data, "--max_length", "8"),
        ("--max_length 8 leaves no room", "use at least")),
    "processing/hub_dataset_not_in_cache": Bad(
        "processing_meta_review.py", lambda i, d: processing(i, d, "nobody-here/no-such-dataset"),
        ("HF_HUB_OFFLINE is set and dataset 'nobody-here/no-such-dataset' is not in the local cache",
         "pass a local path with --dataset_name")),
    "processing/push_without_hub": Bad(
        "processing_meta_review.py", lambda i, d: processing(i, d, i.data, "--push_to_hub", "--hub_dataset_id", "me/x"),
        ("--push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set",)),
    # fine_tune.py
    "fine_tune/nonexistent_model_path": Bad("fine_tune.py",
                                            lambda i, d: fine_tune(i, d, "--model_name_or_path", d / "no-model"),
                                            ("no-model", "no such directory")),
    "fine_tune/pickle_only_weights": Bad("fine_tune.py",
                                         lambda i, d: fine_tune(i, d, "--model_name_or_path", i.pickle_only),
                                         ("pickle weights", "use_safetensors=False")),
    "fine_tune/model_smaller_than_tokenizer": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--model_name_or_path", i.narrow),
        ("200 embedding rows but the tokenizer 300 tokens", "--tokenizer_name")),
    "fine_tune/unknown_model_config_key": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--config_name", "tiny", "--tokenizer_name", i.tok,
                                               "--config_overrides", "hiden_size=64"),
        ("'hiden_size'", "did you mean 'hidden_size'")),
    "fine_tune/mistyped_flag_value": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--learning_rate", "fast"),
                                         ("--learning_rate", "invalid float value: 'fast'")),
    "fine_tune/max_length_beyond_context": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--max_length", "100000"),
                                               ("exceeds the model's context (512 positions)",)),
    "fine_tune/lora_dropout_out_of_range": Bad("fine_tune.py",
                                               lambda i, d: fine_tune(i, d, "--use_lora", "--lora_dropout", "1.5"),
                                               ("--lora_dropout 1.5 must be in [0, 1)",)),
    "fine_tune/label_column_missing": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--task", "classification"),
                                          ("--label_column decision is not a column",)),
    "fine_tune/single_class_labels": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--task", "classification", "--dataset_path",
                                               i.file("one_decision.jsonl")),
        ("single class in the training split", "at least two")),
    "fine_tune/non_numeric_regression_labels": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--task", "regression", "--label_column", "decision",
                                               "--dataset_path", i.file("one_decision.jsonl")),
        ("--task regression needs numbers in --label_column decision",)),
    "fine_tune/foreign_output_dir": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--output_dir", foreign_dir(d)),
                                        ("holds no fine_tune.py run",)),
    "fine_tune/unwritable_output_dir": Bad("fine_tune.py",
                                           lambda i, d: fine_tune(i, d, "--output_dir", i.file("a_file") / "run"),
                                           ("cannot be created",)),
    "fine_tune/incomplete_resume_checkpoint": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--resume_from_checkpoint", incomplete_checkpoint(d)),
        ("is not a complete checkpoint",)),
    "fine_tune/non_utf8_data_file": Bad("fine_tune.py",
                                        lambda i, d: fine_tune(i, d, "--dataset_path", i.file("latin1.jsonl")),
                                        ("not UTF-8",)),
    "fine_tune/missing_columns": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--dataset_path",
                                                                             i.file("no_input.jsonl")),
                                     ("column 'Input' not found",)),
    "fine_tune/negative_learning_rate": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--learning_rate", "-1"),
                                            ("--learning_rate -1.0 must be > 0",)),
    "fine_tune/nan_learning_rate": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--learning_rate", "nan"),
                                       ("--learning_rate nan is not a number",)),
    "fine_tune/adam_beta_out_of_range": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--adam_beta2", "1.0"),
                                            ("--adam_beta2 1.0 must be in [0, 1)",)),
    "fine_tune/negative_weight_decay": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--weight_decay", "-0.1"),
                                           ("--weight_decay -0.1 must be >= 0",)),
    "fine_tune/nan_max_grad_norm": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--max_grad_norm", "nan"),
                                       ("--max_grad_norm nan is not a number", "0 turns clipping off")),
    "fine_tune/nan_logging_steps": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--logging_steps", "nan"),
                                       ("--logging_steps nan is not a number",)),
    "fine_tune/infinite_epochs": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--max_steps", "-1",
                                                                            "--num_train_epochs", "inf"),
                                     ("--num_train_epochs inf is not a finite float32 number",)),
    "fine_tune/zero_max_steps": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--max_steps", "0"),
                                    ("--max_steps 0 must be >= 1, or -1",)),
    "fine_tune/seed_beyond_numpy": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--seed", str(2**32)),
                                       ("--seed 4294967296 must be in [0, 4294967295]",)),
    "fine_tune/zero_batch_size": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--per_device_train_batch_size", "0"),
                                     ("--per_device_train_batch_size 0 must be >= 1",)),
    "fine_tune/save_steps_not_a_multiple_of_eval_steps": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--save_steps", "5", "--eval_steps", "20"),
        ("--load_best_model_at_end (on by default in this script",
         "--save_steps 5 is not a multiple of --eval_steps 20", "--load_best_model_at_end false")),
    "fine_tune/save_and_eval_strategies_differ": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--save_strategy", "epoch"),
        ("on by default in this script", "--eval_strategy epoch")),
    "fine_tune/recut_processed_dir_to_no_examples": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--dataset_path", i.processed, "--max_length", "44"),
        ("--max_length 44 leaves no train examples", "raise --max_length")),
    "fine_tune/raw_file_cut_to_no_examples": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--max_length", "44"),
        ("--max_length 44 leaves no train examples", "raise --max_length")),
    "fine_tune/truncated_gzip": Bad("fine_tune.py",
                                    lambda i, d: fine_tune(i, d, "--dataset_path", i.file("truncated.jsonl.gz")),
                                    ("is not a valid gzip file",)),
    "fine_tune/output_column_not_text": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--dataset_path", i.file("numeric_output.jsonl")),
        ("column 'Output'", "holds int values")),
    "fine_tune/text_mode_max_length_of_one": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--text_column", "Input", "--max_length", "1"),
        ("--max_length 1 must be >= 2",)),
    "fine_tune/hub_model_not_in_cache": Bad(
        "fine_tune.py", lambda i, d: fine_tune(i, d, "--model_name_or_path", "nobody-here/no-such-model"),
        ("HF_HUB_OFFLINE is set and tokenizer 'nobody-here/no-such-model' is not in the local cache",
         "--model_name_or_path")),
    "fine_tune/push_without_hub": Bad("fine_tune.py", lambda i, d: fine_tune(i, d, "--push_to_hub"),
                                      ("--push_to_hub needs the Hugging Face Hub",)),
    # steer.py
    "steer/models_with_different_vocabularies": Bad(
        "steer.py", lambda i, d: steer(i, d, "--small_tuned_model", i.other_vocab, "--prompt", "Good."), ("differ",)),
    "steer/nonexistent_model_path": Bad("steer.py", lambda i, d: steer(i, d, "--large_model", d / "no-model",
                                                                       "--prompt", "Good."), ("does not exist",)),
    "steer/pickle_only_weights": Bad("steer.py", lambda i, d: steer(i, d, "--large_model", i.pickle_only,
                                                                    "--prompt", "Good."), ("pickle weights",)),
    "steer/negative_alpha": Bad("steer.py", lambda i, d: steer(i, d, "--alpha", "-0.5", "--prompt", "Good."),
                                ("--alpha -0.5",)),
    "steer/corrupt_blend_file": Bad("steer.py", lambda i, d: steer(i, d, "--blend", i.file("blend_corrupt.json"),
                                                                   "--prompt", "Good."), ("not valid JSON",)),
    "steer/mistyped_blend_key": Bad("steer.py", lambda i, d: steer(i, d, "--blend", i.file("blend_typo.json"),
                                                                   "--prompt", "Good."), ("did you mean 'alpha'",)),
    "steer/prompt_far_beyond_context": Bad("steer.py", lambda i, d: steer(i, d, "--use_template", "false",
                                                                          "--prompt", "Good paper. " * 400),
                                           ("tokens but the context leaves",)),
    "steer/non_utf8_prompts_file": Bad("steer.py", lambda i, d: steer(i, d, "--prompts_file",
                                                                      i.file("prompts_latin1.jsonl")),
                                       ("not UTF-8",)),
    "steer/prompts_file_missing_column": Bad("steer.py", lambda i, d: steer(i, d, "--prompts_file",
                                                                            i.file("prompts_no_input.jsonl")),
                                             ("'Input' column", "--input_column")),
    "steer/prompts_file_null_row": Bad("steer.py", lambda i, d: steer(i, d, "--prompts_file",
                                                                      i.file("prompts_null.jsonl")),
                                       ("no review text",)),
    "steer/misformatted_validation_data": Bad(
        "steer.py", lambda i, d: steer(i, d, "--tune", "--validation_data", i.file("bad_tune.jsonl"),
                                       "--output_dir", d / "out"), ("line 2 is not JSON",)),
    "steer/unwritable_output_dir": Bad("steer.py", lambda i, d: steer(i, d, "--prompt", "Good.", "--output_dir",
                                                                      i.file("a_file") / "gen"),
                                       ("cannot be created",)),
    # evaluation.py
    "evaluation/decision_classifier_not_a_classifier": Bad(
        "evaluation.py", lambda i, d: evaluation(i, d, "--decision_classifier", i.models["large"]),
        ("holds no classifier.json", "--task classification")),
    "evaluation/corrupt_workbook": Bad("evaluation.py",
                                       lambda i, d: evaluation(i, d, "--output_dir", corrupt_workbook(d)),
                                       ("cannot be read", "left untouched")),
    "evaluation/workbook_is_a_directory": Bad("evaluation.py",
                                              lambda i, d: evaluation(i, d, "--output_xlsx", i.files),
                                              ("is a directory", "--output_xlsx")),
    "evaluation/missing_output_column": Bad("evaluation.py",
                                            lambda i, d: evaluation(i, d, "--dataset_path", i.file("no_output.jsonl")),
                                            ("no column 'Output'",)),
    "evaluation/only_null_and_empty_rows": Bad(
        "evaluation.py", lambda i, d: evaluation(i, d, "--dataset_path", i.file("null_rows.jsonl")),
        ("no rows with both Input and Output",)),
    "evaluation/non_utf8_data_file": Bad("evaluation.py",
                                         lambda i, d: evaluation(i, d, "--dataset_path", i.file("latin1.jsonl")),
                                         ("not UTF-8",)),
    "evaluation/misformatted_decoding_overrides": Bad(
        "evaluation.py", lambda i, d: evaluation(i, d, "--decoding_overrides", "{large: 1"), ("not valid JSON",)),
    "evaluation/unknown_system": Bad("evaluation.py", lambda i, d: evaluation(i, d, "--systems", "larg"),
                                     ("unknown system",)),
    "evaluation/models_with_different_vocabularies": Bad(
        "evaluation.py", lambda i, d: evaluation(i, d, "--small_base_model", i.other_vocab), ("differ",)),
    "evaluation/pickle_only_weights": Bad("evaluation.py",
                                          lambda i, d: evaluation(i, d, "--large_model", i.pickle_only),
                                          ("pickle weights",)),
    "evaluation/num_examples_out_of_range": Bad("evaluation.py", lambda i, d: evaluation(i, d, "--num_examples", "0"),
                                                ("--num_examples 0 must be >= 1",)),
    "evaluation/max_new_tokens_beyond_context": Bad("evaluation.py",
                                                    lambda i, d: evaluation(i, d, "--max_new_tokens", "600"),
                                                    ("prompt tokens are left",)),
    "evaluation/unwritable_output_dir": Bad("evaluation.py",
                                            lambda i, d: evaluation(i, d, "--output_dir", i.file("a_file") / "ev"),
                                            ("cannot be created",)),
    "evaluation/alpha_beyond_float32": Bad(
        "evaluation.py",
        lambda i, d: evaluation(i, d, "--alpha", "1e39", models=("large", "small_base", "small_tuned")),
        ("--alpha 1e+39 is not a finite float32 number",)),
    "evaluation/temperature_beyond_float32": Bad(
        "evaluation.py", lambda i, d: evaluation(i, d, "--do_sample", "true", "--temperature", "1e39"),
        ("temperature 1e+39",)),
    "evaluation/negative_seed": Bad("evaluation.py", lambda i, d: evaluation(i, d, "--seed", "-1"),
                                    ("--seed -1 must be in [0, 4294967295]",)),
    "evaluation/max_length_hint_is_the_tokenizers": Bad(
        "evaluation.py", lambda i, d: evaluation(i, d, "--max_length", "20"), ("use at least 43",)),
    # rl_tune.py: ratings that give no preference, rewards that do not exist
    "rl_tune/workbook_without_ratings": Bad("rl_tune.py", lambda i, d: dpo(i, d, "ratings_none.jsonl"),
                                            ("holds no ratings",)),
    "rl_tune/only_ties": Bad("rl_tune.py", lambda i, d: dpo(i, d, "ratings_ties.jsonl"), ("are ties",)),
    "rl_tune/ratings_for_papers_not_in_the_dataset": Bad(
        "rl_tune.py", lambda i, d: dpo(i, d, "ratings_unknown.jsonl"), ("not-a-paper", "does not have")),
    "rl_tune/fewer_pairs_than_min_pairs": Bad("rl_tune.py", lambda i, d: dpo(i, d, "ratings_one_pair.jsonl"),
                                              ("fewer than --min_pairs 8",)),
    "rl_tune/unknown_reward": Bad("rl_tune.py", lambda i, d: rl_tune(i, d, "--reward", "rogue:1"),
                                  ("unknown reward 'rogue'", "did you mean 'rouge'")),
    "rl_tune/reward_weight_not_a_number": Bad("rl_tune.py", lambda i, d: rl_tune(i, d, "--reward", "eos:much"),
                                              ("weight 'much'",)),
    "steer/alpha_beyond_float32": Bad("steer.py", lambda i, d: steer(i, d, "--alpha", "1e39", "--prompt", "Good."),
                                      ("--alpha 1e+39 is not a finite float32 number",)),
    "steer/temperature_beyond_float32": Bad(
        "steer.py", lambda i, d: steer(i, d, "--do_sample", "true", "--temperature", "1e39", "--prompt", "Good."),
        ("--temperature 1e+39",)),
}


# Cases of the same classes whose fix belongs in steer.py / evaluation.py (number_problem is the check to
# call); strict xfail, so each one reports when fixed and then moves into BAD_INPUTS.
def test_the_table_covers_every_script_and_25_distinct_bad_inputs():
    kinds = {name.split("/")[1] for name in BAD_INPUTS}
    assert len(BAD_INPUTS) >= 25 and len(kinds) >= 25
    assert {b.script for b in BAD_INPUTS.values()} == set(SCRIPTS)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_ends_in_one_error_line_and_writes_nothing(case, inputs, server, tmp_path):
    bad = BAD_INPUTS[case]
    argv = bad.argv(inputs, tmp_path)  # may create this case's setup (a foreign dir, a corrupt workbook)
    before, shared_before = snapshot(tmp_path), snapshot(inputs.files)
    res = server.run(bad.script, argv, tmp_path / "_logs", timeout=240)
    assert_clean_failure(res, *bad.needles)
    assert snapshot(tmp_path) == before, "the failed run wrote or changed files"
    assert snapshot(inputs.files) == shared_before


def compressed_copy(path: Path, suffix: str, out_dir: Path) -> Path:
    """`path` compressed as `suffix` says (.gz, .bz2, .xz, .zst), under `out_dir`."""
    import bz2
    import gzip
    import lzma

    data = path.read_bytes()
    if suffix == ".zst":
        data = pytest.importorskip("zstandard").ZstdCompressor().compress(data)
    else:
        data = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix](data)
    out = out_dir / (path.name + suffix)
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("script", [
    "processing_meta_review.py", "fine_tune.py", "evaluation.py",
    "steer.py",
])
def test_compressed_data_files_are_read_wherever_a_data_file_is(script, inputs, server, tmp_path):
    """`.gz`, `.bz2`, `.xz`, `.zst`, as the datasets library reads them, for every flag that takes a data file."""
    logs = tmp_path / "_logs"
    suffixes = [".gz", ".bz2", ".xz", ".zst"] if script == "processing_meta_review.py" else [".gz"]
    for suffix in suffixes:
        data = compressed_copy(inputs.data, suffix, tmp_path)
        d = tmp_path / suffix.lstrip(".")
        d.mkdir()
        argv = {"processing_meta_review.py": lambda: processing(inputs, d, data, "--min_target_words", "3"),
                "fine_tune.py": lambda: fine_tune(inputs, d, "--dataset_path", data, "--num_samples", "0"),
                "evaluation.py": lambda: evaluation(inputs, d, "--dataset_path", data),
                "steer.py": lambda: steer(inputs, d, "--prompts_file", data, "--output_dir", d / "out")}[script]()
        res = server.run(script, argv, logs)
        assert res.returncode == 0, (suffix, res.stderr[-3000:])
        assert (d / "out").is_dir()


def test_no_network_and_no_cache_is_said_within_seconds(inputs, tmp_path):
    """No HF_HUB_OFFLINE, an empty cache and a Hub that does not answer: each script says so in one line within
    seconds (huggingface_hub alone would retry 1 + 2 + 4 + 8 + 8 s per file: 48 s for processing's tokenizer).
    Plain `python` processes, since huggingface_hub reads HF_HUB_OFFLINE when imported (the fork server has it set)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed: "connection refused", as without a network
    env = {k: v for k, v in {**os.environ, **quiet_env()}.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE",
                        "HF_DATASETS_CACHE")}
    env.update(HF_HOME=str(tmp_path / "empty_hf_home"), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    d = tmp_path
    commands = {
        "processing_meta_review.py": ["--output_dir", d / "p"],  # its Hub defaults: tokenizer and dataset
        "fine_tune.py": ["--dataset_path", inputs.data, "--output_dir", d / "f"],  # EleutherAI/pythia-70m
        "steer.py": ["--large_model", "EleutherAI/pythia-410m", "--small_base_model", inputs.models["small_base"],
                     "--small_tuned_model", inputs.models["small_tuned"], "--prompt", "Good."],
        "evaluation.py": ["--dataset_path", inputs.data, "--large_model", "EleutherAI/pythia-410m",
                          "--small_base_model", inputs.models["small_base"], "--output_dir", d / "e"],
    }
    start = time.monotonic()
    procs = {script: subprocess.Popen([sys.executable, str(ROOT / script), *map(str, argv)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script, argv in commands.items()}
    results = {script: (p.communicate(timeout=300), p.returncode) for script, p in procs.items()}
    elapsed = time.monotonic() - start
    for script, ((stdout, stderr), code) in results.items():
        line = assert_clean_failure(Result(code, stdout, stderr), f"(http://127.0.0.1:{port}) is unreachable and",
                                    "is not in the local cache", "pass a local path with --")
        assert "Retrying in" not in stderr, (script, line)
    assert elapsed < 120, f"{elapsed:.0f} s for four scripts started together"  # the retries alone were 48 s each


def test_no_network_with_a_warm_cache_carries_on_from_the_cache(tiny_tokenizer_dir, tmp_path):
    """The same unanswering Hub, but the default tokenizer and dataset are cached: processing runs on its Hub
    defaults from the cache at once, as it would with HF_HUB_OFFLINE=1."""
    from hub_cache import build_hub_cache, offline_env

    build_hub_cache(tmp_path / "hf", tiny_tokenizer_dir, models=["EleutherAI/pythia-70m"],
                    datasets={"zqz979/meta-review": make_rows(30)})
    env = {k: v for k, v in offline_env(tmp_path / "hf", {**os.environ, **quiet_env()}).items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{s.getsockname()[1]}"
    res = subprocess.run([sys.executable, str(ROOT / "processing_meta_review.py"), "--max_length", "256",
                          "--min_target_words", "3", "--output_dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is unreachable" in res.stderr and "using the local cache only" in res.stderr
    assert "Retrying in" not in res.stderr
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["rows_kept_total"] == 30


def test_plain_python_command_line_matches_the_fork_server(inputs, tmp_path):
    """The fork server is only a speed-up: a fresh `python fine_tune.py` fails on the same input the same way."""
    bad = BAD_INPUTS["fine_tune/unknown_model_config_key"]
    env = {**os.environ, **quiet_env()}
    proc = subprocess.run([sys.executable, str(ROOT / bad.script), *map(str, bad.argv(inputs, tmp_path))],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert_clean_failure(Result(proc.returncode, proc.stdout, proc.stderr), *bad.needles)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Crash during training: SIGKILL, then the same command again
# ---------------------------------------------------------------------------------------------
def fine_tune_flags(tok: Path, data: Path, out: Path) -> list:
    """A fresh tiny GPT-NeoX, 30 steps (6 epochs of 5 batches), a checkpoint and an evaluation every 2 steps."""
    return ["--config_name", "tiny", "--tokenizer_name", tok, "--dataset_path", data, "--max_length", "128",
            "--max_steps", "30", "--save_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--seed", "7", "--num_samples", "1", "--max_new_tokens", "4", "--report_to", "none",
            "--disable_tqdm", "true", "--logging_steps", "1", "--output_dir", out]


def kill_when(server: ForkServer, started: Started, ready: Callable[[], bool], timeout: float = 240) -> None:
    """SIGKILL the command as soon as `ready()` holds (polled every 2 ms); it must not have finished before."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert time.monotonic() < deadline, started.stderr.read_text()[-3000:]
            time.sleep(0.002)
    finally:
        os.kill(started.pid, signal.SIGKILL)  # also when the wait failed: no paused process is left behind
        result = server.wait(started)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def killed_at(server, flags, logs, tmp_path, **hook) -> None:
    """Run with a hook that stops the process at the chosen point, then SIGKILL it there."""
    marker = tmp_path / f"marker-{time.monotonic_ns()}"
    started = server.start("fine_tune.py", flags, logs, hook={**hook, "marker": str(marker)})
    kill_when(server, started, marker.exists)


def test_sigkill_anywhere_then_same_command_resumes_and_matches(server, tiny_tokenizer_dir, jsonl_file, tmp_path):
    logs = tmp_path / "_logs"
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    res = server.run("fine_tune.py", fine_tune_flags(tiny_tokenizer_dir, jsonl_file, whole), logs)
    assert res.returncode == 0, res.stderr[-3000:]
    flags = fine_tune_flags(tiny_tokenizer_dir, jsonl_file, crashed)

    # 1. Killed while checkpoint-10 is being written: weights and optimizer are there, RNG and trainer state not.
    killed_at(server, flags, logs, tmp_path, kind="pause", target="transformers.trainer:Trainer._save_rng_state",
              match="checkpoint-10")
    assert checkpoint_problems(crashed / "checkpoint-10")
    assert not checkpoint_problems(crashed / "checkpoint-8")

    # 2. The same command; killed inside a file this time: checkpoint-20's trainer_state.json half written.
    started = server.start("fine_tune.py", flags, logs, hook={
        "kind": "half_write", "target": "transformers.trainer_callback:TrainerState.save_to_json", "dest": 1,
        "match": "checkpoint-20", "marker": str(tmp_path / "marker-2")})
    kill_when(server, started, (tmp_path / "marker-2").exists)
    log = started.stderr.read_text()
    assert "skipping incomplete checkpoint checkpoint-10" in log and "resuming from checkpoint-8" in log
    assert "trainer_state.json missing or unreadable" in checkpoint_problems(crashed / "checkpoint-20")

    # 3. Killed at an arbitrary moment: as soon as checkpoint-24 appears, wherever the save is.
    started = server.start("fine_tune.py", flags, logs)
    kill_when(server, started, (crashed / "checkpoint-24").exists)
    assert "resuming from checkpoint-18" in started.stderr.read_text()

    # 4. Killed while final/ is being written (inside its temporary directory).
    killed_at(server, flags, logs, tmp_path, kind="pause",
              target="transformers.trainer_callback:TrainerState.save_to_json", match=".final.tmp-")
    assert not (crashed / "final").exists() and list(crashed.glob(".final.tmp-*"))

    # 5. The same command finishes: from the last complete checkpoint, with the uninterrupted run's result.
    newest = list_checkpoints(crashed)[0]
    assert not checkpoint_problems(newest)
    res = server.run("fine_tune.py", flags, logs)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {newest.name}" in res.stderr
    assert not list(crashed.glob(".final.*")) and (crashed / "final" / "model.safetensors").is_file()
    expected = json.loads((whole / "final" / "metrics.json").read_text())
    got = json.loads((crashed / "final" / "metrics.json").read_text())
    assert got["global_step"] == expected["global_step"]
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=0.01)
    # Resuming replays the same batches and RNG, so on CPU the result is in fact the same model.
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, crashed))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


# How each schedule ends (the training split has 5 batches of 4 per epoch): `stop` is the uninterrupted run's last step.
SCHEDULES = {
    "max_steps_within_the_first_epoch": (["--max_steps", "3", "--save_steps", "1"], 3),
    "max_steps_mid_epoch": (["--max_steps", "7", "--save_steps", "1"], 7),
    "epochs": (["--num_train_epochs", "2", "--save_steps", "2"], 10),
    # "Better" = a higher loss, which falls: no evaluation after step 2 improves, and patience 2 stops at step 6.
    "early_stopping": (["--max_steps", "30", "--save_steps", "2", "--greater_is_better", "true",
                        "--early_stopping_patience", "2"], 6),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_sigkill_mid_run_and_during_the_final_save_resumes_to_the_same_end(schedule, server, tiny_tokenizer_dir,
                                                                            jsonl_file, tmp_path):
    """The resumed run ends where the uninterrupted one does, at every kill point: killed mid-run, and killed while
    final/ is written after the last checkpoint (resuming from that checkpoint must train no further step)."""

    extra, stop = SCHEDULES[schedule]
    logs, whole, crashed = tmp_path / "_logs", tmp_path / "whole", tmp_path / "crashed"

    def flags(out: Path) -> list:
        base = fine_tune_flags(tiny_tokenizer_dir, jsonl_file, out)
        i = base.index("--max_steps")
        return [*base[:i], *base[i + 4:], "--lr_scheduler_type", "constant", *extra]  # drop --max_steps/--save_steps

    res = server.run("fine_tune.py", flags(whole), logs)
    assert res.returncode == 0, res.stderr[-3000:]
    expected = json.loads((whole / "final" / "metrics.json").read_text())
    assert expected["global_step"] == stop

    killed_at(server, flags(crashed), logs, tmp_path, kind="pause",
              target="transformers.trainer:Trainer._save_rng_state", match="checkpoint-2")
    killed_at(server, flags(crashed), logs, tmp_path, kind="pause",
              target="transformers.trainer_callback:TrainerState.save_to_json", match=".final.tmp-")
    assert not (crashed / "final").exists()
    assert list_checkpoints(crashed)[0].name == f"checkpoint-{stop}"
    res = server.run("fine_tune.py", flags(crashed), logs)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from checkpoint-{stop}" in res.stderr
    got = json.loads((crashed / "final" / "metrics.json").read_text())
    assert got["global_step"] == stop, "the resumed run trained past the uninterrupted run's end"
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == sorted(p.name for p in whole.glob("checkpoint-*"))
    assert got["eval_loss"] == expected["eval_loss"]
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, crashed))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# A full disk: a real small filesystem (tmpfs, where the tests may mount one), through the real command line
# ---------------------------------------------------------------------------------------------
def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_kb) -> a directory on a tmpfs of that size (remount(size_kb) grows it); skipped without root."""
    mounted = []

    def mount(size_kb: int, remount: bool = False) -> Path:
        where = tmp_path / "small_disk"
        where.mkdir(exist_ok=True)
        options = f"{'remount,' if remount else ''}size={size_kb}k"
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                             text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); the in-process ENOSPC "
                        "test in test_fine_tune.py covers this case")
        if not remount:
            mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_disk_is_one_line_and_the_same_command_resumes_with_room(server, tiny_tokenizer_dir, jsonl_file,
                                                                      tmp_path, small_disk):
    """Room for one checkpoint and final/ (the up-front check passes), not for the second checkpoint kept: the run
    fails in one line naming the directory, leaves no partial checkpoint, and resumes once there is room."""

    logs = tmp_path / "_logs"
    flags = lambda out: [*fine_tune_flags(tiny_tokenizer_dir, jsonl_file, out)[:-1], out]  # noqa: E731
    flags_8 = lambda out: [x if x != "30" else "8" for x in flags(out)]  # noqa: E731  (--max_steps 8)
    whole = tmp_path / "whole"
    res = server.run("fine_tune.py", flags_8(whole), logs)
    assert res.returncode == 0, res.stderr[-3000:]
    checkpoint, final = dir_bytes(whole / "checkpoint-8"), dir_bytes(whole / "final")

    disk = small_disk((checkpoint + final + checkpoint // 2) // 1024)
    run_dir = disk / "run"
    res = server.run("fine_tune.py", flags_8(run_dir), logs)
    line = assert_clean_failure(res, f"no space left on the device of --output_dir {run_dir}",
                                "a checkpoint needs about", "the partial files were removed",
                                "resumes from checkpoint-2")
    assert "Traceback" not in res.stderr, line
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-2"]
    assert not checkpoint_problems(run_dir / "checkpoint-2")
    assert not (run_dir / "final").exists() and not list(run_dir.glob(".final*"))

    small_disk(4 * (3 * checkpoint + final) // 1024, remount=True)
    res = server.run("fine_tune.py", flags_8(run_dir), logs)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from checkpoint-2" in res.stderr
    from safetensors.torch import load_file

    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (whole, run_dir))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_full_disk_while_saving_the_processed_dataset(server, inputs, tmp_path, small_disk):
    big = write_jsonl(tmp_path / "big.jsonl", make_rows(200))
    disk = small_disk(40)
    res = server.run("processing_meta_review.py", processing(inputs, disk, big), tmp_path / "_logs")
    assert_clean_failure(res, f"no space left on the device of {disk / 'out'}", "choose another --output_dir")
    assert list(disk.iterdir()) == []  # the partial copy went with the failure


def test_too_small_disk_is_refused_before_training(server, tiny_tokenizer_dir, jsonl_file, tmp_path, small_disk):
    disk = small_disk(64)
    res = server.run("fine_tune.py", fine_tune_flags(tiny_tokenizer_dir, jsonl_file, disk / "run"), tmp_path / "_logs")
    assert_clean_failure(res, f"--output_dir {disk / 'run'} has", "free, but one checkpoint needs about",
                         "choose another --output_dir")
    assert list(disk.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Crash during evaluation: the workbook and the ratings typed into it
# ---------------------------------------------------------------------------------------------
def type_ratings(path: Path) -> dict[tuple[str, str], tuple]:
    """Type three ratings into the Review sheet under the blind letters, as a reviewer would; returns them by
    (example_id, system), the systems found through the hidden Key sheet."""
    from openpyxl import load_workbook
    from test_workbook import header_of, key_of, row_of

    wb = load_workbook(path)
    key, ws = key_of(wb), wb["Review"]
    col = header_of(ws)
    eids = [ws.cell(r, col["example_id"]).value for r in range(2, ws.max_row + 1)]
    typed = {}
    for (eid, system), (rating, comment) in zip([(eids[0], "large"), (eids[0], "small_base"), (eids[1], "large")],
                                                [(5, "clear"), (2, "misses the main concern"), (4, None)]):
        label = key[("Review", eid, system)]
        ws.cell(row_of(ws, eid), col[f"{label} rating"], rating)
        if comment:
            ws.cell(row_of(ws, eid), col[f"{label} comment"], comment)
        typed[(eid, system)] = (rating, comment)
    wb.save(path)
    return typed


def read_ratings(path: Path) -> dict[tuple[str, str], tuple]:
    """{(example_id, system): (rating, comment)} of every rating in the Review sheet, un-blinded through the Key."""
    from openpyxl import load_workbook
    from test_workbook import header_of, key_of

    wb = load_workbook(path)
    system_of = {(eid, label): system for (sheet, eid, system), label in key_of(wb).items() if sheet == "Review"}
    ws = wb["Review"]
    col = header_of(ws)
    out = {}
    for r in range(2, ws.max_row + 1):
        eid = ws.cell(r, col["example_id"]).value
        for name in col:
            if name.endswith(" rating") and ws.cell(r, col[name]).value is not None:
                label = name.split()[0]
                out[(eid, system_of[(eid, label)])] = (ws.cell(r, col[name]).value,
                                                       ws.cell(r, col[f"{label} comment"]).value)
    return out


def test_sigkill_while_writing_the_workbook_loses_nothing(server, tiny_model_dirs, jsonl_file, tmp_path):
    out = tmp_path / "eval"
    flags = ["--dataset_path", jsonl_file, "--num_examples", "3", "--max_new_tokens", "3", "--bootstrap_samples", "10",
             "--large_model", tiny_model_dirs["large"], "--small_base_model", tiny_model_dirs["small_base"],
             "--output_dir", out]
    logs = tmp_path / "_logs"
    assert server.run("evaluation.py", flags, logs).returncode == 0
    book = out / "eval_examples.xlsx"
    typed = type_ratings(book)
    before = book.read_bytes()

    marker = tmp_path / "marker"
    started = server.start("evaluation.py", flags, logs, hook={
        "kind": "half_write", "target": "proxytune.workbook.writer:write_xlsx", "dest": 1, "marker": str(marker)})
    kill_when(server, started, marker.exists)
    assert book.read_bytes() == before and read_ratings(book) == typed
    (half,) = out.glob(".eval_examples.xlsx.*.tmp")  # the kill really came mid-write
    assert 0 < half.stat().st_size and not zipfile.is_zipfile(half)

    for _ in range(3):  # any number of re-runs
        res = server.run("evaluation.py", flags, logs)
        assert res.returncode == 0, res.stderr[-3000:]
        assert read_ratings(book) == typed
    assert not list(out.glob(".eval_examples.xlsx.*"))  # the half-written copy was cleaned up


# ---------------------------------------------------------------------------------------------
# Security
# ---------------------------------------------------------------------------------------------
def files_and_text(root: Path):
    """Every file under root as bytes; an .xlsx also as its unzipped XML members."""
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        yield str(path), path.read_bytes()
        if path.suffix == ".xlsx":
            with zipfile.ZipFile(path) as z:
                for name in z.namelist():
                    yield f"{path}!{name}", z.read(name)


def test_no_token_is_written_anywhere_in_the_pipeline(server, inputs, tiny_model_dirs, tmp_path, hf_home):
    """processing -> fine_tune (with --hub_token) -> steer --tune -> evaluation, with HF_TOKEN,
    HUGGING_FACE_HUB_TOKEN and a login token file set: neither token appears in any output or log."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    steps = [
        ("processing_meta_review.py", ["--dataset_name", inputs.data, "--tokenizer_name", inputs.tok, "--max_length",
                                       "256", "--min_target_words", "3", "--output_dir", out / "data"]),
        ("fine_tune.py", ["--config_name", "tiny", "--tokenizer_name", inputs.tok, "--dataset_path", out / "data",
                          "--max_length", "256", "--max_steps", "4", "--save_steps", "2", "--num_samples", "1",
                          "--max_new_tokens", "4", "--report_to", "tensorboard", "--hub_token", ENV_TOKEN,
                          "--output_dir", out / "tuned"]),
        ("steer.py", ["--large_model", tiny_model_dirs["large"], "--small_base_model", tiny_model_dirs["small_base"],
                      "--small_tuned_model", out / "tuned" / "final", "--tune", "--validation_data", out / "data",
                      "--n_examples", "4", "--n_trials", "3", "--max_target_tokens", "8",
                      "--output_dir", out / "steer"]),
        ("evaluation.py", ["--dataset_path", out / "data", "--num_examples", "2", "--max_new_tokens", "3",
                           "--bootstrap_samples", "10", "--large_model", tiny_model_dirs["large"],
                           "--small_base_model", tiny_model_dirs["small_base"], "--small_tuned_model",
                           out / "tuned" / "final", "--blend", out / "steer" / "blend.json", "--output_dir",
                           out / "eval"]),
    ]
    for script, argv in steps:
        res = server.run(script, argv, logs)
        assert res.returncode == 0, (script, res.stderr[-3000:])
    assert (out / "eval" / "eval_examples.xlsx").is_file() and list((out / "tuned").glob("checkpoint-*"))
    assert list((out / "tuned").rglob("events.out.tfevents*"))  # TensorBoard logs the arguments too
    assert json.loads((out / "tuned" / "final" / "fine_tune_config.json").read_text())["hub_token"] == "<redacted>"
    n_files = 0
    for root in (out, logs):
        for name, data in files_and_text(root):
            n_files += 1
            for token in (ENV_TOKEN, LOGIN_TOKEN):
                assert token.encode() not in data, f"{token} leaked into {name}"
    assert n_files > 40


@pytest.mark.parametrize("script, types", [
    ("processing_meta_review", ["ProcessingArguments"]),
    ("fine_tune", ["ModelArguments", "DataArguments", "FineTuneTrainingArguments"]),
    ("steer", ["ModelArguments", "SteerArguments", "TuneArguments"]),
    ("evaluation", ["ModelArguments", "DataArguments", "GenerationArguments", "OutputArguments"]),
])
def test_trust_remote_code_is_off_unless_asked(script, types):
    import importlib

    from proxytune.foundation.config import parse_config

    module = importlib.import_module(script)
    parsed = parse_config([getattr(module, t) for t in types], [])
    flags = [p.trust_remote_code for p in parsed if hasattr(p, "trust_remote_code")]
    assert flags == [False]
    parsed = parse_config([getattr(module, t) for t in types], ["--trust_remote_code"])
    assert [p.trust_remote_code for p in parsed if hasattr(p, "trust_remote_code")] == [True]


def test_models_load_from_safetensors_only(inputs, monkeypatch):
    """load_causal_lm (used by every script) asks for safetensors, and a pickle-only directory is refused."""
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, name, **kwargs):
        seen.update(kwargs)
        return original(cls, name, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_causal_lm(str(inputs.models["small_base"]), device="cpu")
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False
    with pytest.raises(UsageError, match="pickle weights"):
        load_causal_lm(str(inputs.pickle_only), device="cpu")


# ---------------------------------------------------------------------------------------------
# Scale-out: torchrun with 2 processes on CPU (gloo)
# ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, argv: list, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / script), *map(str, argv)]
    env = {**os.environ, **quiet_env()}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=cwd)


def test_torchrun_two_processes_fine_tune_on_cpu(server, tiny_tokenizer_dir, jsonl_file, tmp_path):
    flags = ["--config_name", "tiny", "--tokenizer_name", tiny_tokenizer_dir, "--dataset_path", jsonl_file,
             "--max_length", "128", "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "2",
             "--num_samples", "1", "--max_new_tokens", "4", "--report_to", "none", "--disable_tqdm", "true"]
    single = server.run("fine_tune.py", [*flags, "--output_dir", tmp_path / "one"], tmp_path / "_logs")
    assert single.returncode == 0, single.stderr[-3000:]
    res = torchrun("fine_tune.py", [*flags, "--output_dir", tmp_path / "two"], tmp_path)
    assert res.returncode == 0, res.stderr[-5000:]
    assert "x 2 process(es)" in res.stderr  # one DDP run over gloo, not two separate runs

    def shape(root: Path):  # checkpoints differ only in holding one RNG state file per rank
        return sorted(p.name for p in root.iterdir()), sorted(p.name for p in (root / "final").iterdir())

    assert shape(tmp_path / "two") == shape(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoint-4").glob("rng_state*")) == [
        "rng_state_0.pth", "rng_state_1.pth"]
    one, two = (json.loads((tmp_path / d / "final" / "metrics.json").read_text()) for d in ("one", "two"))
    assert sorted(two) == sorted(one) and two["global_step"] == one["global_step"] == 4
    assert "| world_size | 2 |" in (tmp_path / "two" / "final" / "README.md").read_text()


def test_torchrun_two_processes_evaluation_shards_and_merges(server, tiny_model_dirs, jsonl_file, tmp_path):
    flags = ["--dataset_path", jsonl_file, "--num_examples", "4", "--max_new_tokens", "3", "--bootstrap_samples", "10",
             "--large_model", tiny_model_dirs["large"], "--small_base_model", tiny_model_dirs["small_base"]]
    single = server.run("evaluation.py", [*flags, "--output_dir", tmp_path / "one"], tmp_path / "_logs")
    assert single.returncode == 0, single.stderr[-3000:]
    res = torchrun("evaluation.py", [*flags, "--output_dir", tmp_path / "two"], tmp_path)
    assert res.returncode == 0, res.stderr[-5000:]
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == [
        "shard-00000-of-00002.json", "shard-00001-of-00002.json"]

    def predictions(d: Path):
        return [json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()]

    one, two = predictions(tmp_path / "one"), predictions(tmp_path / "two")
    assert len(two) == 8
    assert [(p["example_id"], p["system"], p["prediction"]) for p in two] == [
        (p["example_id"], p["system"], p["prediction"]) for p in one]
    assert [p["nll"] for p in two] == pytest.approx([p["nll"] for p in one], rel=1e-4)
    assert (tmp_path / "two" / "eval_examples.xlsx").is_file()


# ---------------------------------------------------------------------------------------------
# Properties: prompt building / truncation, and the steering arithmetic
# ---------------------------------------------------------------------------------------------
WORDS = ["the", "paper", "proposes", "a", "method", "results", "are", "weak", "strong", "baselines", "novel", "idea",
         "experiments", "on", "CIFAR", "reviewers", "agree", "accept", "reject", "42", "(see", "Table", "3).", "-"]
review_text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=120).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(reviews=st.lists(review_text, min_size=1, max_size=4), budget=st.integers(0, 400))
def test_build_prompt_fits_keeps_the_template_and_cuts_only_review_tails(tiny_tokenizer, reviews, budget):
    from proxytune.foundation.errors import UsageError
    from proxytune.task.prompts import REVIEW_JOINER, build_prompt, render_prompt

    count = lambda text: len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    overhead = count(render_prompt([""] * len(reviews)))
    full = render_prompt(reviews)
    if count(full) > budget and overhead >= budget:
        with pytest.raises(UsageError, match="template alone"):
            build_prompt(reviews, tiny_tokenizer, budget)
        return
    prompt, truncated = build_prompt(reviews, tiny_tokenizer, budget)
    assert count(prompt) <= budget
    assert truncated == (count(full) > budget) and (prompt == full) == (not truncated)
    head, tail = "Peer reviews of a paper:\n\n", "\n\nMeta-review:"
    assert prompt.startswith(head) and prompt.endswith(tail)
    kept = prompt[len(head):-len(tail)].split(REVIEW_JOINER)
    assert len(kept) == len(reviews)
    assert all(original.startswith(cut) for cut, original in zip(kept, reviews))  # heads kept, tails cut


@settings(max_examples=40, deadline=None)
@given(reviews=st.lists(review_text, min_size=1, max_size=3), meta=review_text, max_length=st.integers(32, 300))
def test_tokenized_example_fits_and_never_cuts_the_target(tiny_tokenizer, reviews, meta, max_length):
    from proxytune.task.arguments import MIN_REVIEW_TOKENS
    from proxytune.task.processing import tokenize_example
    from proxytune.task.prompts import render_prompt

    row = {"example_id": "x", "reviews": reviews, "Input": "", "Output": meta}
    target = tiny_tokenizer(" " + meta, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    example = tokenize_example(row, tiny_tokenizer, max_length)
    if example is None:  # only when the target leaves no room for the template and a few review tokens
        overhead = len(tiny_tokenizer(render_prompt([""] * len(reviews)), add_special_tokens=False)["input_ids"])
        assert len(target) + overhead + MIN_REVIEW_TOKENS > max_length
        return
    ids, n = example["input_ids"], example["prompt_length"]
    assert len(ids) <= max_length
    assert ids[n:] == target and ids[-1] == tiny_tokenizer.eos_token_id
    assert ids[:n] == tiny_tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]


logprob_rows = st.integers(0, 2**16).map(
    lambda seed: [torch.log_softmax(torch.randn(2, 30, generator=torch.Generator().manual_seed(seed + k)) * 3, -1)
                  for k in range(3)])


@settings(max_examples=40, deadline=None)
@given(logps=logprob_rows, alpha=st.floats(0, 5))
def test_no_delta_means_no_steering(logps, alpha):
    """S_tuned == S: the delta is zero and proxy-tuning with any alpha is L itself."""
    from proxytune.steering.blend import Blend, blend_logprobs

    large, small, _ = logps
    torch.testing.assert_close(blend_logprobs(large, small, small, Blend.from_alpha(alpha)), large, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(logps=logprob_rows, weights=st.tuples(st.floats(0, 3), st.floats(0, 3), st.floats(-1, 3)),
       shifts=st.lists(st.floats(-50, 50), min_size=3, max_size=3))
def test_blend_ignores_per_row_constants(logps, weights, shifts):
    """Only distributions matter: adding a constant to one model's log-probs (a normaliser) changes nothing."""
    from proxytune.steering.blend import Blend, blend_logprobs

    blend = Blend(*weights)
    shifted = [lp + s for lp, s in zip(logps, shifts)]
    out = blend_logprobs(*logps, blend)
    torch.testing.assert_close(blend_logprobs(*shifted, blend), out, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(2), atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(logps=logprob_rows, alphas=st.tuples(st.floats(0, 4), st.floats(0, 4)))
def test_more_alpha_never_lowers_the_token_the_delta_favours_most(logps, alphas):
    """d/dalpha log p~(x) = delta(x) - E_p~[delta] >= 0 for x = argmax delta: steering harder pushes toward it."""
    from proxytune.steering.blend import Blend, blend_logprobs

    large, tuned, base = logps
    best = (tuned - base).argmax(-1, keepdim=True)  # (B, 1)
    low, high = sorted(alphas)
    p_low = blend_logprobs(large, tuned, base, Blend.from_alpha(low)).gather(-1, best)
    p_high = blend_logprobs(large, tuned, base, Blend.from_alpha(high)).gather(-1, best)
    assert (p_high >= p_low - 1e-5).all()
