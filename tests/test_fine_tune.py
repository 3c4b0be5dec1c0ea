"""Tests for fine_tune.py: the label rule, the collator, logits trimming, checkpoint checks, and end-to-end
runs of main() on tiny GPT-NeoX models (fixture data anywhere; real MReD rows + Pythia tokenizer when ../shared
is present)."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PYTHIA_TOKENIZER, SHARED_DATA, assert_clear_lead, make_rows, make_tiny_model, requires_shared
from transformers import GenerationConfig

import fine_tune
from proxytune.foundation.cli import cli
from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_causal_lm, load_tokenizer
from proxytune.task.reviews import clean_text
from proxytune.training.arguments import DataArguments, ModelArguments, parse_args
from proxytune.training.checkpoints import checkpoint_problems, find_resume_checkpoint, list_checkpoints
from proxytune.training.data import IGNORE_INDEX, CausalLMCollator, build_labels
from proxytune.training.disk import estimate_disk_needs
from proxytune.training.final import push_final
from proxytune.training.model import load_model
from proxytune.training.tasks import prepare_data
from proxytune.training.trainer import trim_to_label_logits

IGNORE = IGNORE_INDEX
# Flags every end-to-end run shares: quiet, tiny, CPU.
QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0"]


def run_main(*flags: str) -> dict:
    return fine_tune.main(*parse_args([*QUIET, *flags]))


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def save_processed(out: Path, examples: list[dict], tokenizer_name: str, max_length: int,
                   validation: list[dict] | None = None) -> Path:
    """A directory shaped like processing_meta_review.py's output."""
    import datasets

    from proxytune.task.processing import _features

    def split(rows):
        return datasets.Dataset.from_list(rows, features=_features())

    val = split(validation if validation is not None else examples)
    datasets.DatasetDict({"train": split(examples), "validation": val, "test": val}).save_to_disk(str(out))
    made_with = {"max_length": max_length, "tokenizer_name": tokenizer_name}
    (out / "processing_config.json").write_text(json.dumps(made_with))
    return out


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved random tiny GPT-NeoX (embeddings 12 rows wider than the tokenizer, like Pythia's)."""
    path = tmp_path_factory.mktemp("base")
    make_tiny_model(len(tiny_tokenizer), padded_vocab=len(tiny_tokenizer) + 12).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fixture_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(24)), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Labels, collator, logits trimming
# ---------------------------------------------------------------------------------------------
def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--max_length", "--use_lora", "--config_name", "--text_column", "--early_stopping_patience",
                 "--learning_rate", "--resume_from_checkpoint"):
        assert flag in help_text


def test_task_defaults():
    _, _, training = parse_args(["--save_steps", "40"])
    assert training.eval_strategy == "steps" and training.eval_steps == 40  # evaluated at every checkpoint
    assert training.load_best_model_at_end and training.metric_for_best_model == "eval_loss"
    assert training.train_sampling_strategy == "group_by_length" and training.remove_unused_columns is False
    assert training.output_dir == "outputs/pythia-70m-meta-review"
    _, _, no_eval = parse_args(["--eval_strategy", "no"])
    assert no_eval.load_best_model_at_end is False  # nothing to pick the best by


def test_run_config_redacts_tokens_and_push_uploads_final(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    from proxytune.foundation.config import to_jsonable

    model_args, data_args, training = parse_args(["--hub_token", "hf_SECRET", "--hub_model_id", "me/tuned",
                                                            "--output_dir", str(tmp_path / "run")])
    config = to_jsonable(model_args, data_args, training)
    assert "hf_SECRET" not in json.dumps(config) and config["hub_token"] == "<redacted>"
    assert config["tokenizer_name"] is None and to_jsonable(ModelArguments(tokenizer_name="tok/x"))[
        "tokenizer_name"] == "tok/x"  # a setting, not a secret
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls["repo"] = repo_id
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message, revision=None):
            calls["folder"] = folder_path

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    with caplog.at_level("INFO"):
        push_final(final, training)
    assert calls == {"token": "hf_SECRET", "repo": "me/tuned", "folder": str(final)}
    assert "hf_SECRET" not in caplog.text


def test_labels_mask_prompt_by_position_and_keep_eos():
    assert build_labels([5, 6, 7, 0], 2) == [IGNORE, IGNORE, 7, 0]
    # pad = eos = 0: the failure mode where masking by id would hide the target's EOS.
    collate = CausalLMCollator(pad_token_id=0)
    batch = collate([
        {"input_ids": [5, 6, 7, 0], "labels": build_labels([5, 6, 7, 0], 2), "length": 4},
        {"input_ids": [8, 9, 0], "labels": build_labels([8, 9, 0], 1), "length": 3},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 7, 0], [IGNORE, 9, 0, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_collator_pads_to_multiple():
    collate = CausalLMCollator(pad_token_id=1, pad_to_multiple_of=8)
    batch = collate([{"input_ids": [3] * 5, "labels": [3] * 5}])
    assert batch["input_ids"].shape == (1, 8) and batch["labels"][0, 5:].eq(IGNORE).all()


def test_trimmed_logits_give_the_same_loss(tiny_tokenizer):
    model = make_tiny_model(len(tiny_tokenizer), padded_vocab=len(tiny_tokenizer) + 12)
    gen = torch.Generator().manual_seed(0)
    features = []
    for length, prompt in [(40, 25), (36, 30), (30, 12)]:
        ids = torch.randint(2, len(tiny_tokenizer), (length,), generator=gen).tolist()
        features.append({"input_ids": ids, "labels": build_labels(ids, prompt)})
    batch = CausalLMCollator(pad_token_id=1)(features)
    trimmed = trim_to_label_logits(batch)
    assert trimmed["logits_to_keep"] == 40 - 12 + 1  # from the position predicting the earliest label
    with torch.no_grad():
        full, cut = model(**batch), model(**trimmed)
    assert cut.logits.shape[1] == 29 < full.logits.shape[1]
    torch.testing.assert_close(cut.loss, full.loss)
    # No prompt (plain-text mode): nothing to trim.
    all_labels = CausalLMCollator(1)([{"input_ids": [4, 5, 6], "labels": [4, 5, 6]}])
    assert "logits_to_keep" not in trim_to_label_logits(all_labels)


@requires_shared
def test_labels_on_a_real_example(tmp_path):
    """A real MReD row through the raw-file path (proxytune.task.processing.process) with the Pythia tokenizer."""
    row = json.loads((SHARED_DATA / "mred_val_longest.jsonl").read_text(encoding="utf-8").splitlines()[0])
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps({"Input": row["Input"], "Output": row["Output"]}) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(str(PYTHIA_TOKENIZER))
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    data_args = DataArguments(dataset_path=str(source), max_length=256, validation_split_percentage=0)
    data = prepare_data(data_args, tokenizer, str(PYTHIA_TOKENIZER), seed=0)
    example = data.train[0]
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels) == example["length"] <= 256  # the reviews were cut to fit
    n_prompt = next(i for i, x in enumerate(labels) if x != IGNORE)
    assert tokenizer.decode(ids[:n_prompt]).endswith("\n\nMeta-review:")
    assert labels[n_prompt:] == ids[n_prompt:]
    assert labels[-1] == tokenizer.eos_token_id  # the model learns to stop
    assert tokenizer.decode(labels[n_prompt:]) == " " + clean_text(row["Output"], "whitespace") + "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# Checkpoint completeness
# ---------------------------------------------------------------------------------------------
def test_checkpoint_problems_name_what_is_missing(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    assert "trainer_state.json missing or unreadable" in checkpoint_problems(ckpt)
    save_file({"w": torch.zeros(4, 4)}, str(ckpt / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"x": torch.ones(3)}, ckpt / name)
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert checkpoint_problems(ckpt) == []
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 2])  # killed mid-write
    assert checkpoint_problems(ckpt) == ["optimizer.pt missing or truncated"]
    assert checkpoint_problems(ckpt, need_optimizer=False) == []
    weights = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(weights[:40])
    assert "model.safetensors is truncated or corrupt" in checkpoint_problems(ckpt, need_optimizer=False)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.exactness
def test_memorises_two_examples_and_stops(tmp_path, tiny_tokenizer, tiny_tokenizer_dir, base_model_dir):
    """Fine-tune a saved tiny model on two short examples until it memorises them: it must then write each
    meta-review and END it with EOS, after a reload from disk."""
    from proxytune.task.processing import tokenize_example

    rows = [
        {"example_id": "a", "reviews": ["Novel idea with strong results on CIFAR."], "Input": "",
         "Output": "Strong results. Accept."},
        {"example_id": "b", "reviews": ["The writing needs work."], "Input": "",
         "Output": "The paper is not ready. Reject."},
    ]
    examples = [tokenize_example(r, tiny_tokenizer, 128) for r in rows]
    data_dir = save_processed(tmp_path / "data", examples, str(tiny_tokenizer_dir), 128)
    out = tmp_path / "run"
    result = run_main(
        "--model_name_or_path", str(base_model_dir), "--dataset_path", str(data_dir), "--max_length", "128",
        "--max_steps", "60", "--learning_rate", "1e-2", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
        "--per_device_train_batch_size", "2", "--save_steps", "30", "--num_samples", "2", "--max_new_tokens", "30",
        "--do_predict", "--output_dir", str(out),
    )
    final = out / "final"
    assert result["status"] == "trained" and result["final_dir"] == final
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "metrics.json",
                 "trainer_state.json", "training_curve.png", "samples.jsonl", "fine_tune_config.json",
                 "prompt_template.txt"):
        assert (final / name).is_file(), name
    assert (out / "fine_tune_config.json").is_file() and (out / "checkpoint-60").is_dir()

    before, after = weights_of(base_model_dir), weights_of(final)
    assert all(not torch.equal(before[k], after[k]) for k in before), "every tensor must have been trained"
    history = json.loads((final / "trainer_state.json").read_text())["log_history"]
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert train_losses[-1] < 0.2 * train_losses[0] and eval_losses[-1] < eval_losses[0]
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)
    assert metrics["test_loss"] == pytest.approx(metrics["eval_loss"])  # --do_predict; test = validation here
    assert metrics["samples_stopped_with_eos"] == 1.0
    config = json.loads((final / "fine_tune_config.json").read_text())
    assert config["max_length"] == 128 and config["learning_rate"] == 0.01

    samples = [json.loads(line) for line in (final / "samples.jsonl").read_text().splitlines()]
    assert [s["generation"].strip() for s in samples] == [s["reference"] for s in samples]

    model = load_causal_lm(str(final), device="cpu")
    tokenizer = load_tokenizer(str(final))
    prompt = torch.tensor([examples[1]["input_ids"][: examples[1]["prompt_length"]]])  # (1, T)
    greedy = GenerationConfig(max_new_tokens=30, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, output_scores=True, return_dict_in_generate=True)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy)
    assert_clear_lead(torch.stack(out.scores, 1))  # memorised: no step a CPU's rounding could turn
    new = out.sequences[0, prompt.shape[1]:].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 30  # stopped by itself
    assert tokenizer.decode(new, skip_special_tokens=True) == " The paper is not ready. Reject."


@pytest.mark.exactness
def test_resume_continues_from_the_last_complete_checkpoint(tmp_path, fixture_jsonl, base_model_dir):
    """Kill-after-save simulation: the newest checkpoint is half written. The same command resumes from the
    previous one, and the result equals an uninterrupted run's (which also proves the checkpoint's weights,
    lm_head included, were restored). A finished run is then left alone."""
    flags = ["--model_name_or_path", str(base_model_dir), "--dataset_path", str(fixture_jsonl), "--max_length", "128",
             "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
             "--save_total_limit", "0", "--num_samples", "1", "--max_new_tokens", "4"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_main(*flags, "--output_dir", str(whole))
    assert (whole / "checkpoint-2").is_dir() and (whole / "checkpoint-4").is_dir()

    shutil.copytree(whole, broken)
    shutil.rmtree(broken / "final")  # killed before the end ...
    (broken / "checkpoint-4" / "trainer_state.json").unlink()  # ... while checkpoint-4 was being written
    optimizer = broken / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert find_resume_checkpoint(broken)[0] == broken / "checkpoint-2"

    result = run_main(*flags, "--output_dir", str(broken))
    assert result["status"] == "trained" and result["resumed_from"] == broken / "checkpoint-2"
    assert result["metrics"]["global_step"] == 4
    assert checkpoint_problems(broken / "checkpoint-4") == []  # written again, completely
    expected, resumed = weights_of(whole / "final"), weights_of(broken / "final")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=1e-6)

    stamp = (broken / "final" / "model.safetensors").stat().st_mtime_ns
    again = run_main(*flags, "--output_dir", str(broken))
    assert again["status"] == "done" and again["metrics"]["global_step"] == 4
    assert (broken / "final" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("merge", [False, True])
def test_lora_result_loads_with_common(tmp_path, fixture_jsonl, base_model_dir, merge):
    out = tmp_path / "lora"
    run_main("--model_name_or_path", str(base_model_dir), "--dataset_path", str(fixture_jsonl), "--max_length", "128",
             "--use_lora", "--merge_lora", str(merge).lower(), "--lora_r", "4", "--max_steps", "3", "--save_steps", "3",
             "--learning_rate", "2e-2", "--num_samples", "0", "--output_dir", str(out))
    final = out / "final"
    assert (final / "adapter_config.json").is_file() != merge
    assert (final / "model.safetensors").is_file() == merge
    if not merge:
        assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_model_dir)
    tuned = load_causal_lm(str(final), device="cpu")  # an adapter directory is merged on load
    base = load_causal_lm(str(base_model_dir), device="cpu")
    assert type(tuned).__name__ == "GPTNeoXForCausalLM"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, base(ids).logits)


def test_plain_text_mode_packs_blocks(tmp_path, tiny_tokenizer, tiny_tokenizer_dir):
    """--text_column on a .jsonl.gz: texts + EOS packed into --max_length blocks, loss on every token; a fresh
    model from the 'tiny' preset trains on it."""
    from conftest import META, REVIEWS

    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"{REVIEWS[i % 6]} {META[(i * 5) % 6]}", "id": i}) + "\n")
    data_args = DataArguments(dataset_path=str(path), text_column="text", max_length=32,
                                        validation_split_percentage=10)
    data = prepare_data(data_args, tiny_tokenizer, str(tiny_tokenizer_dir), seed=0)
    assert len(data.train) > 10 and len(data.validation) >= 1
    assert all(n == 32 for n in data.train["length"])
    assert data.train[0]["labels"] == data.train[0]["input_ids"]
    # 36 training texts, each followed by EOS; only the last partial block (< 32 tokens) is dropped.
    assert sum(row.count(tiny_tokenizer.eos_token_id) for row in data.train["input_ids"]) >= 35
    unpacked = prepare_data(DataArguments(dataset_path=str(path), text_column="text", packing=False,
                                                              max_length=120), tiny_tokenizer, "tok", seed=0)
    eos = tiny_tokenizer.eos_token_id
    # One example per text, ending in EOS; a text cut at max_length gets none (it did not end there).
    assert all(row[-1] == eos or (len(row) == 120 and eos not in row) for row in unpacked.train["input_ids"])
    assert any(row[-1] == eos for row in unpacked.train["input_ids"])

    out = tmp_path / "lm"
    result = run_main("--config_name", "tiny", "--tokenizer_name", str(tiny_tokenizer_dir), "--dataset_path", str(path),
                      "--text_column", "text", "--max_length", "32", "--max_steps", "3", "--save_steps", "3",
                      "--num_samples", "1", "--max_new_tokens", "4", "--output_dir", str(out))
    assert result["status"] == "trained"
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["vocab_size"] == 384 and config["hidden_size"] == 32  # 300 tokens rounded up to 128s


def test_max_samples_is_a_seeded_sample_not_the_first_rows(tmp_path, tiny_tokenizer):
    """A file sorted by label (like the IMDB sample): --max_train_samples must not take one class only."""
    path = tmp_path / "sorted.jsonl"
    path.write_text("".join(json.dumps({"text": f"{'good' if i < 50 else 'bad'} film number {i}"}) + "\n"
                            for i in range(100)))
    args = DataArguments(dataset_path=str(path), text_column="text", packing=False, max_length=32,
                                   validation_split_percentage=0, max_train_samples=10)
    texts = lambda seed: [tiny_tokenizer.decode(ids) for ids in  # noqa: E731
                          prepare_data(args, tiny_tokenizer, "tok", seed=seed).train["input_ids"]]
    first, again, other = texts(0), texts(0), texts(1)
    assert len(first) == 10 and first == again and first != other
    assert any("good" in t for t in first) and any("bad" in t for t in first)
    numbers = [int(re.search(r"number (\d+)", t).group(1)) for t in first]
    assert numbers == sorted(numbers)  # kept in file order


@requires_shared
def test_fresh_tiny_pythia_on_real_data(tmp_path):
    """The issue's acceptance run, scaled down: a fresh GPT-NeoX (vocab 50,304, hidden 32, 2 layers) with the
    Pythia tokenizer on six real MReD examples, max_length 256."""
    lines = (SHARED_DATA / "mred_val_longest.jsonl").read_text(encoding="utf-8").splitlines()[:6]
    source = tmp_path / "six.jsonl"
    source.write_text("".join(json.dumps({k: json.loads(line)[k] for k in ("Input", "Output")}) + "\n"
                              for line in lines))
    out = tmp_path / "run"
    flags = ["--config_name", "tiny", "--tokenizer_name", str(PYTHIA_TOKENIZER), "--dataset_path", str(source),
             "--max_length", "256", "--validation_split_percentage", "20", "--seed", "3"]
    result = run_main(*flags, "--max_steps", "6", "--save_steps", "6", "--per_device_train_batch_size", "2",
                      "--learning_rate", "3e-3", "--warmup_steps", "0", "--num_samples", "1", "--max_new_tokens", "8",
                      "--output_dir", str(out))
    final = out / "final"
    config = json.loads((final / "config.json").read_text())
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (50304, 32, 2)
    assert result["metrics"]["train_examples"] == 4 and result["metrics"]["validation_examples"] == 1

    # The same seed rebuilds the initial weights: training must have moved every tensor.
    model_args, data_args, training_args = parse_args([*QUIET, *flags])
    initial = load_model(model_args, load_tokenizer(str(PYTHIA_TOKENIZER)), 256, training_args.seed)
    trained = load_causal_lm(str(final), device="cpu")
    initial_state, trained_state = initial.state_dict(), trained.state_dict()
    assert all(not torch.equal(initial_state[k], trained_state[k]) for k in initial_state)
    history = result["metrics"]
    losses = [h["loss"] for h in json.loads((final / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert losses[-1] < losses[0] and history["eval_loss"] < 10.8  # below uniform guessing, ln(50304) = 10.83
    sample = json.loads((final / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].endswith("Meta-review:") and sample["new_tokens"] <= 8


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def bad_input_flags(tmp_path, fixture_jsonl, tiny_tokenizer_dir, base_model_dir):
    no_columns = tmp_path / "wrong.jsonl"
    no_columns.write_text(json.dumps({"reviews": "x", "summary": "y"}) + "\n")
    base = ["--model_name_or_path", str(base_model_dir), "--dataset_path", str(fixture_jsonl), "--max_length", "128",
            "--output_dir", str(tmp_path / "out")]
    return {
        "missing model": (base + ["--model_name_or_path", str(tmp_path / "no-model")], "no-model"),
        "missing dataset": (base + ["--dataset_path", str(tmp_path / "nope.jsonl")], "--dataset_path"),
        "missing columns": (base + ["--dataset_path", str(no_columns)], "column 'Input' not found"),
        "unknown config key": (base + ["--config_name", "tiny", "--tokenizer_name", str(tiny_tokenizer_dir),
                                       "--config_overrides", "hiden_size=64"], "did you mean 'hidden_size'"),
        "max_length below template": (base + ["--max_length", "12"], "leaves no room for the prompt template"),
        "unknown preset": (base + ["--config_name", "pythia-7q"], "neither a preset"),
    }


@pytest.mark.parametrize("case", ["missing model", "missing dataset", "missing columns", "unknown config key",
                                  "max_length below template", "unknown preset"])
def test_bad_input_is_one_line_exit_2(case, bad_input_flags, capsys):
    flags, expected = bad_input_flags[case]
    with pytest.raises(SystemExit) as exit_info:
        cli(run_main)(*flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], err


def test_bad_flags_are_usage_errors(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(UsageError, match="did you mean 'learning_rate'"):
        parse_args([str(config)])
    with pytest.raises(UsageError, match="--save_steps 10 is not a multiple of --eval_steps 3"):
        parse_args(["--save_steps", "10", "--eval_steps", "3"])
    with pytest.raises(UsageError, match="--merge_lora needs --use_lora"):
        parse_args(["--merge_lora"])


def test_foreign_output_dir_is_not_touched(tmp_path, fixture_jsonl, base_model_dir, capsys):
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no fine_tune.py run"):
        run_main("--model_name_or_path", str(base_model_dir), "--dataset_path", str(fixture_jsonl),
                 "--output_dir", str(out))
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# A full disk, in process (tests/test_reliability.py does it on a real tmpfs where it may mount one)
# ---------------------------------------------------------------------------------------------
def test_full_disk_mid_run_is_one_error_and_the_same_command_resumes(tmp_path, fixture_jsonl, base_model_dir,
                                                                     monkeypatch):
    """safetensors fails as it does on a full disk (after writing part of the file); the partial checkpoint is
    removed, the error names the directory and the resume point, and the same command then finishes."""
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    flags = ["--model_name_or_path", str(base_model_dir), "--dataset_path", str(fixture_jsonl), "--max_length", "128",
             "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "4", "--num_samples", "0",
             "--output_dir", str(tmp_path / "run")]
    real_save = modeling_utils.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "checkpoint-4" in str(filename):
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(UsageError, match=r"no space left on the device of --output_dir .*run .*a checkpoint needs "
                                         r"about .*then run the same command again \(it resumes from checkpoint-2\)"):
        run_main(*flags)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    monkeypatch.setattr(modeling_utils, "safe_save_file", real_save)
    result = run_main(*flags)
    assert result["resumed_from"].name == "checkpoint-2" and result["metrics"]["global_step"] == 4


def test_too_little_free_space_is_refused_up_front(tmp_path, fixture_jsonl, base_model_dir, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**6, 10**6 - 50_000, 50_000))
    with pytest.raises(UsageError, match=r"has 50\.0 KB free, but one checkpoint needs about .* KB \(weights and "
                                         r"optimizer state\) and final/ .*; free some space"):
        run_main("--model_name_or_path", str(base_model_dir), "--dataset_path", str(fixture_jsonl), "--max_length",
                 "128", "--max_steps", "2", "--output_dir", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_disk_needs_follow_the_checkpoint_rule(tiny_tokenizer, base_model_dir):
    """A checkpoint holds the weights and AdamW's two float32 moments per trained parameter."""
    model = load_causal_lm(str(base_model_dir), dtype="float32", device="cpu")
    n = sum(p.numel() for p in model.parameters())
    model_args, _, training_args = parse_args(["--save_total_limit", "2"])
    needs = estimate_disk_needs(model, model_args, training_args, existing=0)
    assert (needs.checkpoint, needs.final) == (4 * n + 8 * n, 4 * n)
    assert needs.peak == 3 * needs.checkpoint


def test_recutting_a_processed_dir_that_empties_validation_is_one_error(tmp_path, tiny_tokenizer, tiny_tokenizer_dir,
                                                                        base_model_dir):
    """Processed at 256; re-cut at the smallest workable --max_length, the long validation meta-reviews no longer
    fit: one error naming the split and the fix (it was `ValueError: Keys mismatch` from Dataset.from_list([]))."""
    from processing_meta_review import main as process_main
    from proxytune.task.arguments import ProcessingArguments
    from proxytune.task.processing import min_max_length

    src = tmp_path / "src"
    src.mkdir()
    short = [{"Input": f"Paper {i}. A fine review.", "Output": "a"} for i in range(8)]
    long = [{"Input": f"Paper {i}. Another review.", "Output": "the reviewers agree that " * 6} for i in range(3)]
    for name, rows in (("train", short), ("validation", long), ("test", short[:2])):
        (src / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    process_main(ProcessingArguments(dataset_name=str(src), tokenizer_name=str(tiny_tokenizer_dir), max_length=256,
                                     min_target_words=1, output_dir=str(tmp_path / "processed")))
    n = min_max_length(tiny_tokenizer) + 4
    with pytest.raises(UsageError, match=rf"--max_length {n} leaves no validation examples from .*processed: their "
                                         r"meta-reviews are too long to fit with a prompt \(3 examples dropped\); "
                                         r"raise --max_length"):
        run_main("--model_name_or_path", str(base_model_dir), "--dataset_path", str(tmp_path / "processed"),
                 "--max_length", str(n), "--max_steps", "1", "--output_dir", str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
