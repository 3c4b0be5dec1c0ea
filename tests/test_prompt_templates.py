"""Named prompt templates (meta_review, alpaca, a file) and Alpaca-style instruction data: rendering, budgeting, the
record in final/ and blend.json, and the scripts reading it back (issue 28)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import META, PYTHIA_TOKENIZER, REVIEWS, SHARED, SHARED_DATA, requires_shared

import evaluation
import fine_tune
import steer
from processing_meta_review import main as process_main
from proxytune.evaluation.arguments import ARGUMENT_TYPES
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_tokenizer
from proxytune.preference.arguments import RLArguments, RLModelArguments
from proxytune.preference.trainers import paper_template
from proxytune.steering.arguments import ModelArguments, SteerArguments, TuneArguments
from proxytune.steering.blend import Blend
from proxytune.steering.tuning import load_validation_examples
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.processing import process, tokenize_example
from proxytune.task.prompts import (
    ALPACA_NO_INPUT,
    ALPACA_TEMPLATE,
    TEMPLATES,
    build_prompt,
    choose_template,
    load_template,
    read_template,
    render_prompt,
)
from proxytune.training.arguments import parse_args
from proxytune.training.data import IGNORE_INDEX
from proxytune.training.tasks import prepare_data

ALPACA_FILE = SHARED / "data" / "alpaca" / "seed_tasks_alpaca.json"

requires_alpaca = pytest.mark.skipif(
    not (ALPACA_FILE.is_file() and PYTHIA_TOKENIZER.is_dir()),
    reason="../shared (the Alpaca seed tasks and the Pythia tokenizer) is not present beside the repo",
)

QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0"]

MAX_LENGTH = 320  # the tiny tokenizer spends 157 tokens on Alpaca's template with an input


def alpaca_rows(n: int = 16) -> list[dict]:
    """Instruction rows in Alpaca's shape; every other one has an input."""
    return [{"instruction": f"Task {i}: summarise the review as a meta-review.",
             "input": REVIEWS[i % len(REVIEWS)] if i % 2 == 0 else "",
             "output": f"Case {i}. {META[i % len(META)]}"} for i in range(n)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    text = json.dumps(rows) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def processing_args(data: Path, tokenizer_dir: Path, out: Path, **kw) -> ProcessingArguments:
    return ProcessingArguments(dataset_name=str(data), tokenizer_name=str(tokenizer_dir), output_dir=str(out),
                               max_length=kw.pop("max_length", MAX_LENGTH), min_target_words=1, **kw)


# --- the templates ---------------------------------------------------------------------------------
def test_the_default_is_todays_meta_review_prompt():
    assert TEMPLATES["meta_review"].text == "Peer reviews of a paper:\n\n{reviews}\n\nMeta-review:"
    assert render_prompt(["Good paper.", "Weak baselines."]) == \
        "Peer reviews of a paper:\n\nGood paper.\n\nWeak baselines.\n\nMeta-review:"
    assert choose_template(None, []) is TEMPLATES["meta_review"]


@requires_shared
def test_default_processing_output_is_unchanged_byte_for_byte():
    """The processed rows of real MReD and ORSUM data (several reviews per paper, cut to fit) hash as they did
    before templates had names (digest taken from the code of commit d8f784d)."""
    tokenizer = load_tokenizer(str(PYTHIA_TOKENIZER))
    tokenizer.model_max_length = int(1e30)
    digest = hashlib.sha256()
    for name, n in (("orsum_raw_sample.jsonl", None), ("mred_val_longest.jsonl", 40)):
        args = ProcessingArguments(dataset_name=str(SHARED_DATA / name), tokenizer_name="pythia", max_length=300,
                                   max_examples=n)
        dataset, _ = process(args, tokenizer)
        for split in ("train", "validation", "test"):
            for r in dataset[split]:
                digest.update(json.dumps([r["example_id"], r["prompt"], r["target"], r["input_ids"],
                                          r["prompt_length"], r["truncated"]]).encode())
    assert digest.hexdigest() == "9fc26f2d00c6f105ae3f97a1b6bba12a4c69299ac724c21e732af1a066f8d46d"


def test_alpaca_renders_stanford_alpacas_prompts_with_and_without_input():
    alpaca = TEMPLATES["alpaca"]
    assert alpaca.render(["Add the numbers.", "2, 3"]) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n2, 3"
        "\n\n### Response:")
    assert alpaca.render(["Name a colour."]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a colour.\n\n### Response:")
    assert (alpaca.text, alpaca.text_no_input) == (ALPACA_TEMPLATE, ALPACA_NO_INPUT)


def test_template_files_and_records(tmp_path):
    custom = tmp_path / "qa.txt"
    custom.write_text("Q: {instruction}\n{input}\nA:\n", encoding="utf-8")  # the editor's trailing newline is dropped
    template = load_template(str(custom))
    assert template.render(["Add.", "2, 3"]) == "Q: Add.\n2, 3\nA:" and template.splits_input
    same = tmp_path / "same.txt"
    same.write_text(TEMPLATES["meta_review"].text + "\n", encoding="utf-8")  # as prompt_template.txt holds it
    assert load_template(str(same)).same_as(TEMPLATES["meta_review"])
    record = tmp_path / "prompt_template.json"
    record.write_text(json.dumps(TEMPLATES["alpaca"].record()), encoding="utf-8")
    assert load_template(str(record)) == TEMPLATES["alpaca"] and read_template(tmp_path) == TEMPLATES["alpaca"]


@pytest.mark.parametrize("text, needle", [
    ("Summarise {reviews} for {venue}:", "unknown field {venue}"),
    ("Q: {instruction!r} A:", "unknown field {instruction!r}"),
    ("Reviews: {reviews} }", "literal braces"),
    ("No field at all", "has no field"),
    ("{reviews} and {instruction}", "cannot be mixed"),
])
def test_a_template_file_with_an_unknown_field_is_refused_in_one_line(tmp_path, text, needle):
    path = tmp_path / "bad.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match="prompt template") as err:
        load_template(str(path))
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError, match="neither a template name"):
        load_template("alpaka")


def test_processing_refuses_an_unknown_field_before_reading_anything(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "bad.txt"
    bad.write_text("Reviews: {reviews}\nPaper: {title}\nMeta-review:", encoding="utf-8")
    data = write_rows(tmp_path / "a.json", alpaca_rows())
    with pytest.raises(UsageError, match=r"unknown field \{title\}"):
        process_main(processing_args(data, tiny_tokenizer_dir, tmp_path / "out", prompt_template=str(bad)))
    assert not (tmp_path / "out").exists()


# --- budgeting -------------------------------------------------------------------------------------
def test_budget_cuts_the_input_then_the_instruction_never_the_template_or_target(tiny_tokenizer):
    alpaca = TEMPLATES["alpaca"]
    instruction, given = "Summarise the review. " * 3, " ".join(REVIEWS)
    row = {"reviews": [instruction.strip(), given], "Output": META[0]}
    tok = lambda text: tiny_tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    target = tok(" " + META[0]) + [tiny_tokenizer.eos_token_id]
    whole = len(tok(alpaca.render(row["reviews"])))
    head, tail = alpaca.text.split("{instruction}")[0], "\n\n### Response:"
    for max_length, instruction_whole in ((whole + len(target) - 40, True), (len(tok(alpaca.render(["", ""])))
                                                                           + len(target) + 20, False)):
        example = tokenize_example(row, tiny_tokenizer, max_length, alpaca)
        assert example["truncated"] and len(example["input_ids"]) <= max_length
        assert example["input_ids"][example["prompt_length"]:] == target  # the target whole, EOS last
        prompt = example["prompt"]
        assert prompt.startswith(head) and prompt.endswith(tail) and "\n\n### Input:\n" in prompt  # template whole
        kept_instruction = prompt[len(head):].split("\n\n### Input:\n")[0]
        kept_input = prompt.split("\n\n### Input:\n")[1].removesuffix(tail)
        if instruction_whole:  # the input gave way first
            assert kept_instruction == instruction.strip() and given.startswith(kept_input) and kept_input != given
        else:  # then the instruction, the input already gone
            assert kept_input == "" and instruction.startswith(kept_instruction) and kept_instruction
    # Reviews of the default template still share the budget fairly.
    reviews = [REVIEWS[0] * 3, REVIEWS[1] * 3]
    prompt, cut = build_prompt(reviews, tiny_tokenizer, 60)
    assert cut and prompt.startswith("Peer reviews of a paper:\n\n") and prompt.endswith("\n\nMeta-review:")
    parts = prompt.removeprefix("Peer reviews of a paper:\n\n").removesuffix("\n\nMeta-review:").split("\n\n")
    assert len(parts) == 2 and abs(len(tok(parts[0])) - len(tok(parts[1]))) <= 2


# --- Alpaca data through processing -----------------------------------------------------------------
@pytest.mark.parametrize("shape", ["json", "jsonl"])
def test_alpaca_file_processes_in_both_shapes(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, shape):
    from datasets import load_from_disk

    rows = alpaca_rows() + [{"instruction": "", "input": "orphan input", "output": "An answer."}]
    data = write_rows(tmp_path / f"alpaca.{shape}", rows)
    stats = process_main(processing_args(data, tiny_tokenizer_dir, tmp_path / "out", prompt_template="alpaca"))
    assert stats["rows_in_total"] == 17 and stats["rows_kept_total"] == 16 and stats["dropped"] == {"empty_reviews": 1}
    out = tmp_path / "out"
    assert read_template(out) == TEMPLATES["alpaca"]
    assert (out / "prompt_template.txt").read_text().startswith(ALPACA_TEMPLATE)
    examples = [r for split in load_from_disk(str(out)).values() for r in split]
    by_case = {int(r["Output"].split(".")[0].removeprefix("Case ")): r for r in examples}
    for i, r in by_case.items():
        assert len(r["reviews"]) == (2 if i % 2 == 0 else 1) and r["prompt"].endswith("\n\n### Response:")
        assert r["truncated"] or r["prompt"] == TEMPLATES["alpaca"].render(r["reviews"])
        assert r["prompt"].startswith("Below is an instruction that describes a task" + (", paired" if i % 2 == 0
                                                                                          else ". Write"))
        assert r["input_ids"][r["prompt_length"]:] == tiny_tokenizer(" " + r["Output"])["input_ids"] + [0]


@requires_alpaca
@pytest.mark.parametrize("shape", ["json", "jsonl"])
def test_the_real_alpaca_seed_tasks_process(tmp_path, shape):
    from datasets import load_from_disk

    data = ALPACA_FILE
    if shape == "jsonl":  # the same rows as JSON lines, in tmp_path
        data = write_rows(tmp_path / "seed_tasks.jsonl", json.loads(ALPACA_FILE.read_text(encoding="utf-8")))
    stats = process_main(ProcessingArguments(
        dataset_name=str(data), tokenizer_name=str(PYTHIA_TOKENIZER), output_dir=str(tmp_path / "out"),
        prompt_template="alpaca", min_target_words=1, max_length=512))
    assert stats["rows_in_total"] == 175 and stats["rows_kept_total"] + sum(stats["dropped"].values()) == 175
    examples = [r for split in load_from_disk(str(tmp_path / "out")).values() for r in split]
    with_input = [r for r in examples if len(r["reviews"]) == 2]
    assert len(examples) == stats["rows_kept_total"] >= 170 and 115 <= len(with_input) <= 125
    assert all(r["input_ids"][-1] == 0 and len(r["input_ids"]) <= 512 for r in examples)  # EOS ends every target
    assert all("### Input:" in r["prompt"] for r in with_input)
    assert all("### Input:" not in r["prompt"] for r in examples if len(r["reviews"]) == 1)


# --- the template travels: processing -> fine_tune final/ -> steer.py (blend.json) -> evaluation.py, rl_tune.py -----
@pytest.fixture(scope="module")
def alpaca_run(tmp_path_factory, tiny_tokenizer_dir, tiny_model_dirs) -> dict[str, Path]:
    """Alpaca data processed with --prompt_template alpaca, and the small base model fine-tuned on it for two steps
    without the flag (the processed data's record gives the template)."""
    root = tmp_path_factory.mktemp("alpaca_run")
    data = write_rows(root / "alpaca.json", alpaca_rows(24))
    process_main(processing_args(data, tiny_tokenizer_dir, root / "processed", prompt_template="alpaca"))
    flags = ["--model_name_or_path", str(tiny_model_dirs["small_base"]), "--dataset_path", str(root / "processed"),
             "--max_length", str(MAX_LENGTH), "--max_steps", "2", "--save_steps", "2",
             "--per_device_train_batch_size", "2", "--num_samples", "1", "--max_new_tokens", "3",
             "--output_dir", str(root / "tuned")]
    fine_tune.main(*parse_args([*QUIET, *flags]))
    prompts = write_rows(root / "prompts.jsonl", alpaca_rows(4))
    return {"root": root, "processed": root / "processed", "final": root / "tuned" / "final", "prompts": prompts,
            "flags": flags}


def test_training_masks_the_prompt_and_learns_eos(alpaca_run, tiny_tokenizer):
    _, data_args, _ = parse_args([*QUIET, *alpaca_run["flags"]])
    data = prepare_data(data_args, tiny_tokenizer, "tiny", 0)
    assert data.template == TEMPLATES["alpaca"]
    for row in data.train:
        labels, ids = row["labels"], row["input_ids"]
        n_prompt = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert tiny_tokenizer.decode(ids[:n_prompt]).startswith("Below is an instruction")
        assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(ids[:n_prompt]).endswith("### Response:")


def test_a_fine_tune_flag_that_differs_from_the_data_re_prompts_it_and_warns(alpaca_run, tiny_tokenizer,
                                                                              template_warnings):
    _, data_args, _ = parse_args([*QUIET, *alpaca_run["flags"], "--prompt_template", "meta_review"])
    data = prepare_data(data_args, tiny_tokenizer, "tiny", 0)
    assert data.template == TEMPLATES["meta_review"] and data.samples[0]["prompt"].startswith("Peer reviews of a paper")
    assert len(template_warnings) == 1 and str(alpaca_run["processed"]) in template_warnings[0]


def test_final_records_the_template(alpaca_run):
    final = alpaca_run["final"]
    assert read_template(final) == TEMPLATES["alpaca"]
    assert json.loads((final / "prompt_template.json").read_text())["name"] == "alpaca"
    assert "### Instruction:" in (final / "README.md").read_text()
    sample = json.loads((final / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("Below is an instruction")


def steer_flags(tiny_model_dirs, final: Path) -> list[str]:
    return ["--large_model", str(tiny_model_dirs["large"]), "--small_base_model", str(tiny_model_dirs["small_base"]),
            "--small_tuned_model", str(final), "--large_device", "cpu", "--max_new_tokens", "2"]


def run_steer(argv: list[str]):
    return steer.main(*parse_config([ModelArguments, SteerArguments, TuneArguments], argv))


def test_steer_uses_the_recorded_template_and_warns_on_another(alpaca_run, tiny_model_dirs, tmp_path,
                                                              template_warnings):
    flags = [*steer_flags(tiny_model_dirs, alpaca_run["final"]), "--alpha", "1", "--prompts_file",
             str(alpaca_run["prompts"])]
    run_steer([*flags, "--output_dir", str(tmp_path / "gen")])
    assert template_warnings == []
    written = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in written] == [TEMPLATES["alpaca"].render([r["instruction"], r["input"]] if r["input"]
                                                                         else [r["instruction"]])
                                              for r in alpaca_rows(4)]
    assert written[0]["reference"] == alpaca_rows(4)[0]["output"]
    run_steer([*flags, "--prompt_template", "meta_review", "--output_dir", str(tmp_path / "gen2")])
    assert len(template_warnings) == 1 and "meta_review" in template_warnings[0]
    assert str(alpaca_run["final"]) in template_warnings[0]
    first = json.loads((tmp_path / "gen2" / "generations.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("Peer reviews of a paper:")  # the flag wins


@pytest.fixture(scope="module")
def tuned_blend(alpaca_run, tiny_model_dirs) -> Path:
    out = alpaca_run["root"] / "steer"
    run_steer([*steer_flags(tiny_model_dirs, alpaca_run["final"]), "--tune", "--select_by", "perplexity",
               "--validation_data", str(alpaca_run["processed"]), "--n_examples", "4", "--n_trials", "2",
               "--max_target_tokens", "6", "--output_dir", str(out)])
    return out / "blend.json"


def test_the_blend_records_the_template(tuned_blend):
    written = json.loads(tuned_blend.read_text())
    assert written["prompt_template"] == TEMPLATES["alpaca"].record()
    Blend.load(tuned_blend)  # an extra key, skipped


def test_evaluation_uses_the_blends_template_and_warns_on_another(alpaca_run, tuned_blend, tmp_path,
                                                                 template_warnings):
    def run(out: Path, *extra: str) -> dict:
        argv = ["--blend", str(tuned_blend), "--dataset_path", str(alpaca_run["processed"]), "--num_examples", "2",
                "--max_new_tokens", "2", "--batch_size", "2", "--bootstrap_samples", "20", "--max_length",
                str(MAX_LENGTH), "--output_dir", str(out), *extra]
        return evaluation.main(*parse_config(ARGUMENT_TYPES, argv))

    metrics = run(tmp_path / "eval")  # every model from the blend's record, the template from it
    assert template_warnings == []
    assert metrics["run"]["prompt_template"] == TEMPLATES["alpaca"].describe()
    assert (tmp_path / "eval" / "prompt_template.txt").read_text() == TEMPLATES["alpaca"].describe() + "\n"
    metrics = run(tmp_path / "eval2", "--prompt_template", "meta_review", "--systems", "small_tuned")
    assert len(template_warnings) == 3 and all("meta_review" in w for w in template_warnings)  # final/, blend, data
    assert metrics["run"]["prompt_template"] == TEMPLATES["meta_review"].text


def test_rl_tune_reads_the_policys_template(alpaca_run, template_warnings):
    model_args = RLModelArguments(model_name_or_path=str(alpaca_run["final"]))
    assert paper_template(RLArguments(), model_args) == TEMPLATES["alpaca"] and template_warnings == []
    assert paper_template(RLArguments(prompt_template="meta_review"), model_args) == TEMPLATES["meta_review"]
    assert len(template_warnings) == 1 and "differs from alpaca" in template_warnings[0]
    assert paper_template(RLArguments(text_dataset="imdb.jsonl"), model_args) is None


def test_tuning_prompts_saved_data_again_under_another_template(alpaca_run, tiny_tokenizer):
    args = TuneArguments(validation_data=str(alpaca_run["processed"]), n_examples=3)
    saved = load_validation_examples(args, tiny_tokenizer, 512, 0, TEMPLATES["alpaca"])
    again = load_validation_examples(args, tiny_tokenizer, 512, 0, TEMPLATES["meta_review"])
    assert all(tiny_tokenizer.decode(ex["prompt_ids"]).startswith("Below is an instruction") for ex in saved)
    assert all(tiny_tokenizer.decode(ex["prompt_ids"]).startswith("Peer reviews of a paper:") for ex in again)
    assert [ex["target_ids"] for ex in saved] == [ex["target_ids"] for ex in again]
