"""Classification and regression (proxytune/training/classification.py through fine_tune.py --task), the labels
processing_meta_review.py keeps, and evaluation.py's decision consistency: pooling under left and right padding, metrics
and decision consistency against hand counts, labels round-tripping through the saved config, loss going down, and the
bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clear_lead, make_rows

import evaluation
import fine_tune
from proxytune.evaluation.arguments import ARGUMENT_TYPES
from proxytune.evaluation.scores import decision_consistency
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.task.arguments import ProcessingArguments
from proxytune.task.papers import DataArguments, load_examples
from proxytune.training import classification as classify
from proxytune.training.arguments import parse_args
from proxytune.training.data import retokenize
from proxytune.training.model import load_model

QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0"]


def labelled_rows(n: int = 24) -> list[dict]:
    """The fixture rows with a decision their meta-review states ("Reject" in it or not) and a rating."""
    rows = make_rows(n)
    for i, row in enumerate(rows):
        reject = "reject" in row["Output"].lower()
        row["decision"] = "Reject" if reject else ["Accept (Poster)", "Accept (Oral)"][i % 2]
        row["avg_rating"] = (3.0 if reject else 6.5) + (i % 3) / 3
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def labelled_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("labelled") / "papers.jsonl", labelled_rows())


def train(tok_dir: Path, data: Path, out: Path, *extra: str) -> dict:
    return fine_tune.main(*parse_args([
        *QUIET, "--config_name", "tiny", "--tokenizer_name", str(tok_dir), "--dataset_path", str(data),
        "--max_length", "96", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--save_steps", "10",
        "--eval_steps", "10", "--seed", "0", "--output_dir", str(out), *extra]))


@pytest.fixture(scope="module")
def trained_classifier(tiny_tokenizer_dir, labelled_jsonl, tmp_path_factory) -> tuple[Path, dict]:
    """meta-review -> decision on the fixture papers, 30 steps of a fresh tiny model."""
    out = tmp_path_factory.mktemp("classifier")
    result = train(tiny_tokenizer_dir, labelled_jsonl, out, "--task", "classification", "--label_column", "decision",
                   "--classification_input", "meta_review", "--max_steps", "30", "--class_weights", "balanced",
                   "--validation_split_percentage", "25")
    return out / "final", result


# ---------------------------------------------------------------------------------------------
# Pooling, metrics, weights
# ---------------------------------------------------------------------------------------------
def tiny_classifier(vocab: int = 64, num_labels: int = 3, pad: int = 1):
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, pad_token_id=pad,
                           eos_token_id=0, bos_token_id=0)
    return GPTNeoXForSequenceClassification(config).eval()


@pytest.mark.parametrize("side", ["right", "left"])
def test_pooling_reads_the_last_real_token_under_either_padding(side):
    """A padded batch gives each row the logits it has alone (its last real token's), not the last column's."""
    model = tiny_classifier()
    rows = [{"input_ids": [5, 9, 12, 7, 30, 2], "labels": 0}, {"input_ids": [8, 3, 44], "labels": 1}]
    batch = classify.ClassificationCollator(pad_token_id=1, padding_side=side)(rows)
    assert batch["input_ids"].shape == (2, 6) and (batch["input_ids"][1] == 1).sum() == 3
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2, 3)
        alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
        last_column = model.score(model.gpt_neox(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).last_hidden_state)[1, -1]
    for i in range(2):
        torch.testing.assert_close(padded[i], alone[i], atol=1e-5, rtol=1e-4)
    if side == "right":  # the test can fail: the last column of the short row is a pad position, not its last token
        assert not torch.allclose(last_column, alone[1], atol=1e-3)


def test_input_ends_with_the_cue_and_is_cut_to_max_length(tiny_tokenizer):
    """Pooling reads the cue: it is never cut and never the pad token; only the text's tail goes."""
    long_text = "The reviewers agree the paper is strong. " * 40
    cue_ids = tiny_tokenizer(classify.INPUT_TEMPLATES["meta_review"][1], add_special_tokens=False)["input_ids"]
    ids = classify.encode_input(long_text, tiny_tokenizer, 40, "meta_review")
    assert len(ids) == 40 and ids[-len(cue_ids):] == cue_ids and tiny_tokenizer.pad_token_id not in ids
    short = classify.encode_input("Accept.", tiny_tokenizer, 40, "meta_review")
    assert tiny_tokenizer.decode(short) == "Meta-review of a paper:\n\nAccept.\n\nVerdict:"
    with pytest.raises(UsageError, match="--max_length 3 leaves no room"):
        classify.encode_input("Accept.", tiny_tokenizer, 3, "meta_review")


def test_classification_metrics_match_a_hand_count():
    predictions = [0, 0, 1, 1, 2, 0, 1, 2]
    labels = [0, 1, 1, 1, 2, 2, 0, 2]
    m = classify.classification_metrics(predictions, labels, majority=1)
    assert m["accuracy"] == pytest.approx(5 / 8)
    # class 0: tp 1, fp 2, fn 1 -> 2/5; class 1: tp 2, fp 1, fn 1 -> 4/6; class 2: tp 2, fp 0, fn 1 -> 4/5
    assert m["macro_f1"] == pytest.approx((2 / 5 + 4 / 6 + 4 / 5) / 3)
    assert m["majority_rate"] == pytest.approx(3 / 8)
    assert classify.confusion_matrix(predictions, labels, 3) == [[1, 1, 0], [1, 2, 0], [1, 0, 2]]


def test_regression_metrics_match_a_hand_count():
    m = classify.regression_metrics([[1.0], [2.0], [4.0], [3.0]], [1.0, 3.0, 2.0, 4.0])
    assert m["mse"] == pytest.approx((0 + 1 + 4 + 1) / 4)
    # ranks 1 2 4 3 vs 1 3 2 4: d^2 = 0 + 1 + 4 + 1 = 6, rho = 1 - 6 * 6 / (4 * 15)
    assert m["spearman"] == pytest.approx(1 - 6 * 6 / (4 * 15))
    assert classify.regression_metrics([2.0, 2.0], [1.0, 3.0])["spearman"] is None


def test_balanced_class_weights_keep_the_loss_scale():
    weights = classify.balanced_weights({"accept": 1, "reject": 3}, ["accept", "reject"])
    assert weights == pytest.approx([2.0, 2 / 3])
    assert (1 * weights[0] + 3 * weights[1]) / 4 == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# End to end through fine_tune.py
# ---------------------------------------------------------------------------------------------
def test_classifier_trains_and_its_labels_round_trip(trained_classifier):
    final, result = trained_classifier
    losses = [h["loss"] for h in json.loads((final / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # the loss goes down
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForSequenceClassification"]
    assert config["id2label"] == {"0": "accept", "1": "reject"} and config["label2id"] == {"accept": 0, "reject": 1}
    assert config["pad_token_id"] == 1 != config["eos_token_id"]
    info = json.loads((final / "classifier.json").read_text())
    assert info["labels"] == ["accept", "reject"] and info["classification_input"] == "meta_review"
    assert info["weights"] == pytest.approx(classify.balanced_weights(info["train_label_counts"], info["labels"]))
    metrics = json.loads((final / "metrics.json").read_text())
    for key in ("eval_accuracy", "eval_macro_f1", "eval_majority_rate", "eval_confusion_matrix"):
        assert key in metrics
    assert sum(map(sum, metrics["eval_confusion_matrix"])) == result["metrics"]["validation_examples"]
    assert (final / "confusion_matrix.png").stat().st_size > 1000
    card = (final / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "0: accept" in card
    model, tokenizer, loaded = classify.load_classifier(final, device="cpu")
    assert model.config.id2label == {0: "accept", 1: "reject"}
    assert set(classify.predict(model, tokenizer, loaded, ["Reject.", "A strong paper, accept."])) <= {"accept",
                                                                                                    "reject"}


def test_gradient_accumulation_gives_the_same_step(tiny_tokenizer_dir, labelled_jsonl, tmp_path):
    """The class-weighted loss is summed over the whole accumulated batch and divided once by its size: one step of
    2 x 2 accumulated examples moves the weights exactly as one step of 4."""
    from safetensors.torch import load_file

    weights = {}
    for batch, accumulate in ((4, 1), (2, 2)):
        out = tmp_path / f"b{batch}"
        train(tiny_tokenizer_dir, labelled_jsonl, out, "--task", "classification", "--class_weights", "balanced",
              "--max_steps", "1", "--warmup_steps", "0", "--per_device_train_batch_size", str(batch),
              "--gradient_accumulation_steps", str(accumulate), "--eval_strategy", "no", "--save_strategy", "no")
        weights[batch] = load_file(str(out / "final" / "model.safetensors"))
    from proxytune.models.loading import load_tokenizer

    model_args = parse_args(["--config_name", "tiny", "--tokenizer_name", str(tiny_tokenizer_dir),
                                       "--report_to", "none"])[0]
    start = load_model(model_args, load_tokenizer(str(tiny_tokenizer_dir)), 96, 0, {"num_labels": 2})
    moved = [k for k, v in start.state_dict().items() if k in weights[4] and not torch.allclose(v, weights[4][k])]
    assert moved  # the step changed something, so the comparison below can fail
    for key in weights[4]:
        torch.testing.assert_close(weights[2][key], weights[4][key], atol=1e-6, rtol=1e-5)


def test_rerun_of_a_finished_classifier_changes_nothing(trained_classifier, tiny_tokenizer_dir, labelled_jsonl):
    final, _ = trained_classifier
    before = (final / "model.safetensors").stat().st_mtime_ns
    result = train(tiny_tokenizer_dir, labelled_jsonl, final.parent, "--task", "classification",
                   "--classification_input", "meta_review", "--max_steps", "30")
    assert result["status"] == "done" and (final / "model.safetensors").stat().st_mtime_ns == before


def test_regression_of_the_rating_from_the_reviews(tiny_tokenizer_dir, labelled_jsonl, tmp_path):
    result = train(tiny_tokenizer_dir, labelled_jsonl, tmp_path, "--task", "regression", "--max_steps", "4",
                   "--do_predict")
    final = tmp_path / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    assert {"eval_mse", "eval_spearman", "test_mse"} <= set(metrics) and result["status"] == "trained"
    assert json.loads((final / "config.json").read_text())["problem_type"] == "regression"
    assert json.loads((final / "classifier.json").read_text())["label_column"] == "avg_rating"
    assert (final / "predictions.png").is_file()


def test_lora_classifier_saves_its_head_and_loads_back(base_model_dir, labelled_jsonl, tmp_path):
    fine_tune.main(*parse_args([
        *QUIET, "--model_name_or_path", str(base_model_dir), "--dataset_path", str(labelled_jsonl), "--task",
        "classification", "--classification_input", "meta_review", "--use_lora", "--max_length", "96",
        "--max_steps", "2", "--save_steps", "2", "--output_dir", str(tmp_path)]))
    final = tmp_path / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in (adapter["modules_to_save"] or [])
    model, tokenizer, info = classify.load_classifier(final, device="cpu")
    assert type(model).__name__ == "GPTNeoXForSequenceClassification"
    assert classify.predict(model, tokenizer, info, ["Reject."])[0] in ("accept", "reject")


# ---------------------------------------------------------------------------------------------
# Plain labelled text (--classification_input text): a sentiment classifier for rl_tune.py's reward
# ---------------------------------------------------------------------------------------------
def sentiment_rows(n: int = 32, labels: tuple = ("neg", "pos")) -> list[dict]:
    """IMDB-like rows (split, label, id, rating, text): a positive or negative word in an otherwise shared review."""
    words = {0: ["awful", "boring", "dreadful", "dull"], 1: ["great", "wonderful", "superb", "lovely"]}
    return [{"split": "train", "label": labels[i % 2], "id": i, "rating": 8 if i % 2 else 2,
             "text": f"Film {i} was {words[i % 2][i % 4]}.<br />I saw it twice."} for i in range(n)]


def test_text_classifier_names_its_classes_and_reads_them_back(tiny_tokenizer_dir, tmp_path):
    """IMDB's neg/pos become negative/positive in --label_map's order; the plain template is recorded and is what
    rl_tune.py's reward (load_reward_model) encodes with; --reward_label positive reads class 1."""
    from proxytune.training.classifier_scores import load_reward_model

    data = write_jsonl(tmp_path / "imdb.jsonl", sentiment_rows())
    result = train(tiny_tokenizer_dir, data, tmp_path / "out", "--task", "classification", "--classification_input",
                   "text", "--label_map", "neg=negative,pos=positive", "--max_steps", "20",
                   "--validation_split_percentage", "25")
    final = tmp_path / "out" / "final"
    losses = [h["loss"] for h in json.loads((final / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert result["status"] == "trained" and sum(losses[-5:]) < sum(losses[:5])
    info = json.loads((final / "classifier.json").read_text())
    assert info["labels"] == ["negative", "positive"] and info["label_column"] == "label"
    assert info["template"] == ["", "\n\nLabel:"] and info["classification_input"] == "text"
    assert info["label_map"] == {"neg": "negative", "pos": "positive"} and info["text_column"] == "text"
    assert sum(info["train_label_counts"].values()) == 24
    assert json.loads((final / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    reward = load_reward_model(str(final), "positive", "logit", "auto")
    assert reward.label == 1 and reward.reads == "full"  # a text classifier reads prompt + completion
    tok = reward.tokenizer
    assert reward.encode("Film 1 was great.") == tok("Film 1 was great.\n\nLabel:", add_special_tokens=False)[
        "input_ids"] == classify.encode_input("Film 1 was great.", tok, 96, "text")
    model, tokenizer, loaded = classify.load_classifier(final, device="cpu")
    assert set(classify.predict(model, tokenizer, loaded, ["It was great.", "It was awful."])) <= {"negative",
                                                                                                  "positive"}


def test_text_labels_as_numbers_and_a_recorded_template_wins(tiny_tokenizer_dir, tmp_path):
    """The Hub's IMDB labels are 0/1 (read back from JSON as ints, or floats from a CSV): --label_map 0=...,1=...
    names them; a classifier is encoded with the template its classifier.json records, not today's default."""
    rows = sentiment_rows(labels=(0, 1))
    out = tmp_path / "out"
    train(tiny_tokenizer_dir, write_jsonl(tmp_path / "imdb.jsonl", rows), out, "--task", "classification",
          "--classification_input", "text", "--label_map", "0=negative,1=positive", "--max_steps", "1",
          "--eval_strategy", "no", "--save_strategy", "no")
    info = json.loads((out / "final" / "classifier.json").read_text())
    counts = info["train_label_counts"]
    assert info["labels"] == ["negative", "positive"] == list(counts) and sum(counts.values()) == 29  # 10% held out
    assert classify.label_key(1.0) == classify.label_key(1) == "1" and classify.label_key(" pos ") == "pos"
    assert classify.template_of({"classification_input": "text", "template": ["Review: ", " Mood:"]}) == (
        "Review: ", " Mood:")
    assert classify.template_of({"classification_input": "meta_review"}) == classify.INPUT_TEMPLATES["meta_review"]


@pytest.mark.parametrize("flags, needles", [
    (["--label_map", "neg=negative"], ("fewer than two class names",)),
    (["--label_map", "neg=negative,pos"], ("'pos' is not value=name",)),
    (["--label_map", "neg=negative,meh=neutral"], ("does not name", "'pos'")),
    (["--label_map", "neg=negative,pos=positive,meh=neutral"], ("no training row", "neutral")),
    (["--label_column", "stars"], ("--label_column stars is not a column", "rating")),
    (["--text_column", "body"], ("column 'body' not found",)),
])
def test_bad_text_classification_flags_are_one_clear_error(flags, needles, tiny_tokenizer_dir, tmp_path):
    data = write_jsonl(tmp_path / "imdb.jsonl", sentiment_rows(12))
    with pytest.raises(UsageError) as err:
        train(tiny_tokenizer_dir, data, tmp_path / "out", "--task", "classification", "--classification_input",
              "text", *flags, "--max_steps", "1")
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "out" / "final").exists()


def test_text_column_without_text_input_and_label_map_for_regression_are_refused():
    with pytest.raises(UsageError, match="--classification_input text"):
        parse_args(["--report_to", "none", "--task", "classification", "--text_column", "text"])
    with pytest.raises(UsageError, match="--label_map names classes"):
        parse_args(["--report_to", "none", "--task", "regression", "--label_map", "0=a,1=b"])
    _, data_args, _ = parse_args(["--report_to", "none", "--task", "classification", "--classification_input", "text"])
    assert (data_args.text_column, data_args.label_column) == ("text", "label")


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from conftest import make_tiny_model

    path = tmp_path_factory.mktemp("base")
    make_tiny_model(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_language_modelling_stays_the_default():
    _, data_args, _ = parse_args(["--report_to", "none"])
    assert data_args.task == "language_modeling" and data_args.label_column is None


@pytest.mark.parametrize("case, rows, flags, needles", [
    ("missing_label_column", lambda: make_rows(12), ["--task", "classification"],
     ("--label_column decision is not a column", "columns: ")),
    ("single_class", lambda: [{**r, "decision": "Reject"} for r in labelled_rows(12)], ["--task", "classification"],
     ("single class in the training split", "'reject'")),
    ("non_numeric_regression", lambda: labelled_rows(12), ["--task", "regression", "--label_column", "decision"],
     ("--task regression needs numbers in --label_column decision", "holds 'accept'")),
    ("unseen_in_validation",
     lambda: labelled_rows(12) + [{**make_rows(30)[29], "decision": "Workshop", "avg_rating": 5.0}],
     ["--task", "classification", "--validation_split_percentage", "50"], ("that the training split lacks",)),
    ("class_weights_for_regression", lambda: labelled_rows(12), ["--task", "regression", "--class_weights",
                                                                 "balanced"], ("needs --task classification",)),
])
def test_bad_label_input_is_one_clear_error(case, rows, flags, needles, tiny_tokenizer_dir, tmp_path):
    data = rows()
    if case == "unseen_in_validation":  # the one odd paper must land outside train: put it in its own split
        write_jsonl(tmp_path / "train.jsonl", data[:-1])
        write_jsonl(tmp_path / "validation.jsonl", data[-1:])
        path = tmp_path
    else:
        path = write_jsonl(tmp_path / "papers.jsonl", data)
    with pytest.raises(UsageError) as err:
        train(tiny_tokenizer_dir, path, tmp_path / "out", *flags, "--max_steps", "1")
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "out" / "final").exists()


# ---------------------------------------------------------------------------------------------
# processing_meta_review.py: labels kept, normalised, counted, stratified
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, normalised", [
    ("Accept (Poster)", "accept"), ("Accept (Oral)", "accept"), ("Accept (Spotlight)", "accept"),
    ("Accept (Workshop)", "accept"), ("Reject", "reject"), ("Reject (Invite to Workshop Track)", "reject"),
    ("  accept ", "accept"), ("Workshop", "workshop"), ("", None), (None, None)])
def test_decisions_are_normalised_by_the_documented_map(raw, normalised):
    from proxytune.task.reviews import normalise_decision

    assert normalise_decision(raw) == normalised


def test_processing_keeps_counts_and_can_stratify_labels(tiny_tokenizer_dir, tmp_path):
    import datasets

    import processing_meta_review as pm

    rows = labelled_rows(40)
    data = write_jsonl(tmp_path / "papers.jsonl", rows)
    args = ["--dataset_name", str(data), "--tokenizer_name", str(tiny_tokenizer_dir), "--max_length", "256",
            "--validation_split_percentage", "25", "--test_split_percentage", "25"]
    stats = pm.main(*parse_config([ProcessingArguments], [*args, "--stratify_by_column", "decision",
                                                              "--output_dir", str(tmp_path / "strat")]))
    dataset = datasets.load_from_disk(str(tmp_path / "strat"))
    assert dataset["train"].features["decision"].dtype == "string"
    assert dataset["train"].features["avg_rating"].dtype == "float64"
    n_reject = sum("reject" in r["Output"].lower() for r in rows)
    counts = stats["labels"]["decision"]
    assert sum(c["reject"] for c in counts.values()) == n_reject
    assert sum(c["accept"] for c in counts.values()) == len(rows) - n_reject
    share = n_reject / len(rows)
    for name in ("train", "validation", "test"):  # each split keeps the label mix, to one paper
        n = len(dataset[name])
        assert abs(counts[name]["reject"] - share * n) <= 1
        assert counts[name] == {k: list(dataset[name]["decision"]).count(k) for k in ("accept", "reject")}
    assert stats["labels"]["avg_rating"]["train"]["n"] == len(dataset["train"])
    plain = pm.main(*parse_config([ProcessingArguments], [*args, "--output_dir", str(tmp_path / "plain")]))
    assert "stratified_by" not in plain and plain["rows_kept"] == stats["rows_kept"]
    with pytest.raises(UsageError, match="--stratify_by_column Score: no such column"):
        pm.main(*parse_config([ProcessingArguments], [*args, "--label_columns", "decision", "Score",
                                                          "--stratify_by_column", "Score", "--output_dir",
                                                          str(tmp_path / "bad")]))


def test_retokenizing_keeps_the_label_columns(tiny_tokenizer_dir, tiny_tokenizer, labelled_jsonl, tmp_path):
    import datasets

    import processing_meta_review as pm

    pm.main(*parse_config([ProcessingArguments], [
        "--dataset_name", str(labelled_jsonl), "--tokenizer_name", str(tiny_tokenizer_dir), "--max_length", "256",
        "--output_dir", str(tmp_path / "data")]))
    again, _ = retokenize(datasets.load_from_disk(str(tmp_path / "data")), tiny_tokenizer, 128)
    assert {"decision", "avg_rating"} <= set(again["train"].column_names)


# ---------------------------------------------------------------------------------------------
# evaluation.py --decision_classifier
# ---------------------------------------------------------------------------------------------
def test_decision_consistency_matches_a_hand_count():
    import numpy as np

    decisions = ["accept", "accept", None, "reject", "reject"]
    info = {"train_label_counts": {"accept": 2, "reject": 5}}
    idx = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [2, 2, 2, 2, 2], [3, 4, 3, 4, 2]])  # (S, N)
    result = decision_consistency(
        {"a": ["accept", "reject", "reject", "reject", "accept"], "b": ["reject"] * 5},
        ["accept", "accept", "accept", "reject", "accept"], decisions, info, idx, 0.5)
    # papers 0, 1, 3, 4 have a decision; a matches 0 and 3, b matches 3 and 4; the references match 0, 1, 3
    assert result["systems"]["a"]["mean"] == pytest.approx(2 / 4)
    assert result["systems"]["b"]["mean"] == pytest.approx(2 / 4)
    assert result["ceiling"]["mean"] == pytest.approx(3 / 4)
    assert result["floor"]["class"] == "reject" and result["floor"]["mean"] == pytest.approx(2 / 4)
    assert (result["n_labelled"], result["n_unlabelled"]) == (4, 1)
    # resamples: all papers 2/4, paper 0 only 1, paper 2 only (unlabelled: left out), papers 3 and 4: 1/2
    assert result["systems"]["a"]["ci_low"] == pytest.approx(np.percentile([0.5, 1.0, 0.5], 25))
    assert result["systems"]["a"]["ci_high"] == pytest.approx(np.percentile([0.5, 1.0, 0.5], 75))


@pytest.mark.exactness
def test_evaluation_reports_decision_consistency(trained_classifier, tiny_model_dirs, tmp_path):
    """Through evaluation.main: the shares in metrics.json and the workbook are the hand count of what the classifier
    says about each generated and reference meta-review."""
    from openpyxl import load_workbook

    final, _ = trained_classifier
    rows = labelled_rows(8)
    rows[1]["decision"] = None  # a paper without a decision: left out
    data = write_jsonl(tmp_path / "papers.jsonl", rows)
    out = tmp_path / "eval"
    metrics = evaluation.main(*parse_config(ARGUMENT_TYPES, [
        "--dataset_path", str(data), "--all_examples", "--max_new_tokens", "6", "--bootstrap_samples", "50",
        "--small_base_model", str(tiny_model_dirs["small_base"]), "--large_model", str(tiny_model_dirs["large"]),
        "--decision_classifier", str(final), "--output_dir", str(out)]))
    model, tokenizer, info = classify.load_classifier(final, device="cpu")
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    truth = {p["example_id"]: p for p in preds}
    # The hand count classifies the texts in other batches than evaluation did: equal labels need each text's top
    # two logits clearly apart (conftest's exactness note).
    texts = [p["prediction"] for p in preds] + [p["reference"] for p in preds]
    batch = classify.ClassificationCollator(tokenizer.pad_token_id)([
        {"input_ids": classify.encode_input(t, tokenizer, info["max_length"], info["classification_input"]),
         "labels": 0} for t in texts])
    with torch.no_grad():
        assert_clear_lead(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    from proxytune.task.reviews import normalise_decision

    decision_of = {}
    for row in load_examples(DataArguments(dataset_path=str(data))):
        decision_of[row["example_id"]] = row["decision"]
    assert sorted(decision_of.values(), key=str) == sorted(map(normalise_decision, [r["decision"] for r in rows]),
                                                           key=str)
    labelled = [eid for eid, d in decision_of.items() if d is not None]
    dc = metrics["decision_consistency"]
    assert (dc["n_labelled"], dc["n_unlabelled"]) == (7, 1)
    for system in ("small_base", "large"):
        mine = [p for p in preds if p["system"] == system and p["example_id"] in labelled]
        said = classify.predict(model, tokenizer, info, [p["prediction"] for p in mine])
        assert [p["predicted_decision"] for p in mine] == said
        hand = sum(s == decision_of[p["example_id"]] for s, p in zip(said, mine)) / len(mine)
        assert metrics["systems"][system]["decision_consistency"]["mean"] == pytest.approx(hand)
        assert dc["systems"][system]["mean"] == pytest.approx(hand)
    refs = classify.predict(model, tokenizer, info, [truth[eid]["reference"] for eid in labelled])
    assert dc["ceiling"]["mean"] == pytest.approx(sum(r == decision_of[e] for r, e in zip(refs, labelled)) / 7)
    majority = max(info["train_label_counts"], key=info["train_label_counts"].get)
    assert dc["floor"]["mean"] == pytest.approx(sum(decision_of[e] == majority for e in labelled) / 7)
    ws = load_workbook(out / "eval_examples.xlsx")["Summary"]
    header = [c.value for c in ws[1]]
    assert "decision_consistency" in header
    notes = [ws.cell(r, 1).value or "" for r in range(1, 12)]
    assert any(n.startswith("decision_consistency ceiling") for n in notes)
    assert any(n.startswith("decision_consistency floor (majority class") for n in notes)


@pytest.mark.parametrize("case, needles", [
    ("no_classifier", ("holds no classifier.json",)),
    ("no_decisions", ("needs the papers' decisions", "has none")),
    ("unseen_decision", ("decisions ['workshop'] that --decision_classifier", "its labels: accept, reject")),
])
def test_decision_classifier_bad_inputs(case, needles, trained_classifier, tiny_model_dirs, tmp_path):
    final, _ = trained_classifier
    rows = labelled_rows(4)
    if case == "no_decisions":
        rows = make_rows(4)
    if case == "unseen_decision":
        rows[0]["decision"] = "Workshop"
    data = write_jsonl(tmp_path / "papers.jsonl", rows)
    classifier = tmp_path if case == "no_classifier" else final
    with pytest.raises(UsageError) as err:
        evaluation.main(*parse_config(ARGUMENT_TYPES, [
            "--dataset_path", str(data), "--all_examples", "--max_new_tokens", "2", "--large_model",
            str(tiny_model_dirs["large"]), "--decision_classifier", str(classifier), "--output_dir",
            str(tmp_path / "eval")]))
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "eval" / "metrics.json").exists()
