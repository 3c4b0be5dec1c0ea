"""transfer.py and proxytune/transfer: the sources file, plans, job scripts, the real matrix (resumable), and the
first-order estimate (projection, logistic regression, linearisation, Δ = 0) at tiny size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_rows, make_tiny_model
from transformers import TrainerCallback

import fine_tune
import transfer
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_causal_lm
from proxytune.task.processing import tokenize_example
from proxytune.task.reviews import reviews_of
from proxytune.transfer.arguments import TransferArguments
from proxytune.transfer.clusters import cluster_groups, kmeans_labels, mean_prompt_states
from proxytune.transfer.first_order import (
    BLOCK_ROWS,
    fit_logistic,
    flat_parameters,
    lora_parameters,
    outputs_and_projected_gradients,
    outputs_of,
    project,
    projection_block,
    set_parameters,
    unproject,
)
from proxytune.transfer.jobs import read_template, write_jobs
from proxytune.transfer.plans import parse_subsets, plan_subsets
from proxytune.transfer.sources import load_groups, parse_sources

# --- the sources file ------------------------------------------------------------------------------------------------

@pytest.fixture
def year_rows_file(tmp_path):
    rows = [{**r, "year": 2018 + i % 2, "decision": "Accept" if i % 3 else "Reject"}
            for i, r in enumerate(make_rows(24))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_yaml(tmp_path, text: str, name: str = "sources.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_sources_file_parses_and_filters(tmp_path, year_rows_file):
    path = write_yaml(tmp_path, f"""
defaults: {{dataset: {year_rows_file}}}
groups:
  y2018: {{filter: {{year: 2018}}}}
  y2019-accept: {{filter: {{year: 2019, decision: [Accept]}}}}
""")
    sources = parse_sources(path)
    assert [g.name for g in sources.groups] == ["y2018", "y2019-accept"]
    assert sources.groups[0].filter == {"year": ["2018"]}  # a YAML int matches the file's value as text
    rows = load_groups(sources)
    assert len(rows["y2018"]) == 12 and all(r["year"] == 2018 for r in rows["y2018"])
    assert rows["y2019-accept"] and all(r["year"] == 2019 and r["decision"] == "Accept" for r in rows["y2019-accept"])
    assert set(rows["y2018"][0]) >= {"Input", "Output"}


def test_group_by_shortcut_splits_one_dataset_by_columns(tmp_path, year_rows_file):
    path = write_yaml(tmp_path, f"defaults: {{dataset: {year_rows_file}}}\ngroup_by: [year, decision]\n")
    sources = parse_sources(path)
    rows = load_groups(sources)
    assert sorted(rows) == ["2018-Accept", "2018-Reject", "2019-Accept", "2019-Reject"]
    assert sum(len(r) for r in rows.values()) == 24


@pytest.mark.parametrize("text, message", [
    ("groups: {a: {dataset: x.jsonl, filer: {year: 1}}, b: {dataset: x.jsonl}}",
     "group 'a': unknown key 'filer'; did you mean 'filter'?"),
    ("groups: {a: {filter: {year: 1}}, b: {dataset: x.jsonl}}", "group 'a': no dataset"),
    ("groups: {a: {dataset: x.jsonl, filter: {year: {x: 1}}}, b: {dataset: x.jsonl}}",
     "group 'a': filter 'year' must be a value or a list of values"),
    ("groups: {a: {dataset: x.jsonl, task: classification}, b: {dataset: x.jsonl}}",
     "group 'a': task 'classification' is not supported"),
    ("groups: {a b: {dataset: x.jsonl}, c: {dataset: x.jsonl}}", "group 'a b': a name is letters"),
    ("groups: {a: {dataset: x.jsonl}}", "one group only"),
    ("defaults: {dataset: x.jsonl}\ngroups: {a: {}, b: {}}\ngroup_by: year", "give exactly one of"),
    ("group_by: year", "group_by splits one dataset: give defaults.dataset"),
    ("defaults: {dataset: x.jsonl}\nkmeans: {clusters: 1}", "'clusters' must be an integer >= 2"),
    ("grups: {}", "unknown key 'grups'; did you mean 'groups'?"),
    ("groups: [a, b", "is not valid YAML"),
])
def test_bad_sources_files_get_one_line_errors_naming_the_entry(tmp_path, text, message):
    with pytest.raises(UsageError) as err:
        parse_sources(write_yaml(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_filter_that_keeps_nothing_or_a_missing_column_is_named(tmp_path, year_rows_file):
    for condition, message in (("{year: 1999}", "group 'b': the filter {'year': ['1999']} keeps no row"),
                               ("{venue: x}", "group 'b': filter column(s) ['venue'] not in")):
        path = write_yaml(tmp_path, f"defaults: {{dataset: {year_rows_file}}}\n"
                                    f"groups: {{a: {{filter: {{year: 2018}}}}, b: {{filter: {condition}}}}}\n")
        with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")):
            load_groups(parse_sources(path))


# --- plans and jobs ---------------------------------------------------------------------------------------------------

def test_plans():
    groups = ["A", "B", "C"]
    assert plan_subsets("every", ["A", "B"]) == [("A",), ("B",), ("A", "B")]
    assert plan_subsets("alone,all", groups) == [("A",), ("B",), ("C",), ("A", "B", "C")]
    assert plan_subsets("leave_one_out,pairs", groups) == [("B", "C"), ("A", "C"), ("A", "B")]
    assert len(plan_subsets("every", groups)) == 7
    assert plan_subsets("random:2:2", groups, seed=3) == plan_subsets("random:2:2", groups, seed=3)
    assert all(len(s) == 2 for s in plan_subsets("random:2:2", groups))
    assert plan_subsets("with:B:2", groups) == [("B",), ("A", "B"), ("B", "C")]  # what to add to B's own data
    assert len(plan_subsets("with:A:3", list("ABCDEFGH"))) == 1 + 7 + 21 and plan_subsets("with:A:9", groups)[-1] == (
        "A", "B", "C")
    with pytest.raises(UsageError, match="write with:G:K, G one of the groups"):
        plan_subsets("with:D:2", groups)
    assert parse_subsets("B+A, C", groups) == [("A", "B"), ("C",)]
    with pytest.raises(UsageError, match=r"unknown group\(s\) \['D'\]"):
        parse_subsets("A+D", groups)
    with pytest.raises(UsageError, match="unknown plan 'evry'"):
        plan_subsets("evry", groups)
    with pytest.raises(UsageError, match="make 127 fine-tunes"):
        plan_subsets("every", list("ABCDEFG"))


def test_job_scripts_from_a_template_with_named_fields(tmp_path):
    template = write_yaml(tmp_path, "#!/bin/sh\n# {job_name} cpus={cpus} gpus={gpus} time={timeout} ${{HOME}}\n"
                                    "cd {workdir} && python transfer.py {args}\n", "job.tmpl")
    paths = write_jobs(tmp_path, read_template(str(template)), tmp_path / "jobs" / "t.yaml", 2,
                       {"cpus": 3, "gpus": 0, "timeout": "1:00:00"}, "tr")
    assert [p.name for p in paths] == ["tr-0.sh", "tr-1.sh"]
    text = paths[1].read_text()
    assert "# tr-1 cpus=3 gpus=0 time=1:00:00 ${HOME}" in text
    assert "--step real --worker 1 --num_workers 2" in text
    bad = write_yaml(tmp_path, "{job_name} {memory} {args}", "bad.tmpl")
    with pytest.raises(UsageError, match=r"unknown field\(s\) \{memory\}"):
        read_template(str(bad))
    assert "{args}" in read_template(None)


# --- the first-order estimate's pieces --------------------------------------------------------------------------------

def test_projection_is_reproducible_from_the_seed_and_adjoint_to_its_inverse():
    g = torch.randn(3, BLOCK_ROWS + 50, generator=torch.Generator().manual_seed(0))  # two blocks, the last partial
    z = project(g, seed=7, dim=16)
    assert torch.equal(z, project(g, seed=7, dim=16))
    assert not torch.allclose(z, project(g, seed=8, dim=16))
    block = projection_block(7, 16, 0)
    assert set(block.unique().tolist()) == {-0.25, 0.25}  # ±1/√16
    # <G P, w> = <G, P w>: the estimate's Δ = P w moves the outputs by exactly z·w to first order
    w = torch.randn(16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.double() @ w.double(), g.double() @ unproject(w, 7, g.shape[1]).double(),
                               rtol=1e-4, atol=1e-3)


def test_logistic_regression_matches_scikit_learn_and_scipy():
    from scipy.optimize import minimize
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    y = (x @ rng.normal(size=5) + rng.normal(size=60) > 0).astype(float)
    l2 = 0.05
    ours = fit_logistic(x, np.zeros(60), l2, labels=y)
    reference = LogisticRegression(C=1 / (60 * l2), fit_intercept=False, tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(ours, reference.coef_[0], rtol=1e-5, atol=1e-7)
    # with an offset (which scikit-learn has no option for): scipy's L-BFGS on the same objective
    offset = rng.normal(size=60)

    def objective(w):
        m = offset + x @ w
        return np.mean(np.logaddexp(0, m) - m) + 0.5 * l2 * w @ w

    expected = minimize(objective, np.zeros(5), method="BFGS", options={"gtol": 1e-12}).x
    np.testing.assert_allclose(fit_logistic(x, offset, l2), expected, rtol=1e-5, atol=1e-6)


def test_estimate_equals_the_real_fine_tune_where_the_model_is_linear():
    """A logistic model is its own linearisation: fine-tuning it on a subset (minimising the subset's loss plus
    (l2/2)‖θ − θ0‖², done here with scipy) and the estimate's step from θ0 (with P = I) land on the same θ, so the
    estimated target loss is the real one."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 4)), rng.integers(0, 2, 40) * 2 - 1  # labels ±1
    signed = x * y[:, None]  # the output of example i is its log-odds of the correct label: y_i x_i·θ
    theta0, l2 = rng.normal(size=4), 0.1
    subset, target = np.arange(25), np.arange(25, 40)
    loss = lambda theta, idx: np.mean(np.logaddexp(0, -signed[idx] @ theta))  # noqa: E731
    real = minimize(lambda t: loss(t, subset) + 0.5 * l2 * (t - theta0) @ (t - theta0), theta0, method="BFGS",
                    options={"gtol": 1e-12}).x
    w = fit_logistic(signed[subset], signed[subset] @ theta0, l2)
    np.testing.assert_allclose(theta0 + w, real, rtol=1e-5, atol=1e-6)
    assert loss(theta0 + w, target) == pytest.approx(loss(real, target), rel=1e-8)


@pytest.fixture
def lora_model(tiny_model_dirs):
    from peft import LoraConfig, get_peft_model

    base = load_causal_lm(str(tiny_model_dirs["small_base"]), dtype="float32", device="cpu")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], init_lora_weights=False)
    return get_peft_model(base, config).eval()


def tokenized_rows(tokenizer, n: int = 6) -> list[dict]:
    return [tokenize_example({"reviews": reviews_of(r["Input"]), "Output": r["Output"]}, tokenizer, 128)
            for r in make_rows(n)]


def test_scores_from_the_target_positions_alone_equal_those_from_every_position(lora_model, tiny_tokenizer):
    """target_logits puts only the positions that predict a target through the output layer; the loss and the
    outputs s_i equal those computed from the logits of every position (float64), rows of different prompt lengths
    in one batch."""
    from proxytune.transfer.losses import batches, log_odds_output, target_loss, token_nll

    model = lora_model.double()
    rows = tokenized_rows(tiny_tokenizer)
    assert len({r["prompt_length"] for r in rows}) > 1
    pad = tiny_tokenizer.pad_token_id
    total, count, outputs = 0.0, 0, []
    with torch.no_grad():
        for batch in batches(rows, 4, pad, "cpu"):
            full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, mask = token_nll(full, batch["labels"])
            total, count = total + float(nll.sum()), count + int(mask.sum())
            outputs += log_odds_output(full, batch["labels"]).tolist()
    try:
        assert target_loss(model, rows, pad, batch_size=4) == pytest.approx(total / count, rel=1e-12)
        np.testing.assert_allclose(outputs_of(model, rows, pad, batch_size=4), outputs, rtol=1e-12)
    finally:
        model.float()


def test_linearisation_error_vanishes_with_the_step(lora_model, tiny_tokenizer):
    rows = tokenized_rows(tiny_tokenizer)
    params = lora_parameters(lora_model, "test")
    theta0 = flat_parameters(params)
    s, z = outputs_and_projected_gradients(lora_model, params, rows, tiny_tokenizer.pad_token_id, seed=0, dim=64)
    np.testing.assert_allclose(s, outputs_of(lora_model, rows, tiny_tokenizer.pad_token_id), rtol=1e-5, atol=1e-5)
    w = np.random.default_rng(0).normal(size=64)
    errors = []
    for size in (1e-1, 1e-2):
        factor = size * float(theta0.norm()) / float(unproject(w, 0, theta0.numel()).norm())
        set_parameters(params, theta0 + factor * unproject(w, 0, theta0.numel()))
        actual = outputs_of(lora_model, rows, tiny_tokenizer.pad_token_id)
        set_parameters(params, theta0)
        change, linear = actual - s, z.astype(np.float64) @ (w * factor)
        assert np.abs(change).max() > 1e-4  # the step moves the outputs ...
        errors.append(np.linalg.norm(change - linear) / np.linalg.norm(change))  # ... as the linear model says
    assert errors[1] < 0.05 and errors[1] < errors[0] / 3  # second-order error: shrinks with the step


# --- transfer.py end to end: the real matrix (killed and resumed), the estimate, the comparison, the jobs ------------

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise RuntimeError(f"killed after saving step {state.global_step}")


def test_transfer_matrix_resumes_and_estimates_compare(tmp_path, year_rows_file, tiny_model_dirs):
    sources = write_yaml(tmp_path, f"""
defaults: {{dataset: {year_rows_file}}}
groups:
  y2018: {{filter: {{year: 2018}}}}
  y2019: {{filter: {{year: 2019}}}}
""")
    lora = write_yaml(tmp_path, f"""
model_name_or_path: {tiny_model_dirs['small_base']}
max_length: 128
use_lora: true
lora_r: 4
lora_target_modules: [query_key_value]
max_steps: 4
save_steps: 2
per_device_train_batch_size: 4
learning_rate: 1.0e-2
warmup_steps: 0
num_samples: 0
report_to: none
disable_tqdm: true
""", "lora.yaml")
    out = tmp_path / "out"
    flags = [str(sources), "--fine_tune_config", str(lora), "--output_dir", str(out)]
    # the config files are the transfer's own flags: sources given as a flag, the rest as config
    args = lambda *more: parse_config([TransferArguments], ["--sources", *flags, *more])  # noqa: E731

    calls = []

    def killed_in_second_cell(model_args, data_args, training_args, callbacks=()):
        calls.append(training_args.output_dir)
        extra = [KillAfterSave()] if len(calls) == 2 else []
        return fine_tune.main(model_args, data_args, training_args, callbacks=[*callbacks, *extra])

    with pytest.raises(RuntimeError, match="killed after saving step 2"):
        transfer.main(*args(), train=killed_in_second_cell)
    first = out / "cells" / "y2018.scores.json"
    assert first.is_file() and not (out / "cells" / "y2019.scores.json").exists()
    assert (out / "cells" / "y2019" / "checkpoint-2").is_dir()
    stamp = first.stat().st_mtime_ns

    result = transfer.main(*args())
    assert result["trained"] == ["y2019", "y2018+y2019"]  # the first cell is not trained again
    assert first.stat().st_mtime_ns == stamp
    scores = json.loads((out / "cells" / "y2019.scores.json").read_text())
    assert scores["resumed_from"].endswith("checkpoint-2")
    matrix = result["matrix"]
    assert matrix["missing"] == [] and set(matrix["loss"]) == {"y2018", "y2019", "y2018+y2019"}
    assert all(set(row) == {"y2018", "y2019"} and all(v > 0 for v in row.values()) for row in matrix["loss"].values())
    csv_rows = (out / "matrix.csv").read_text().splitlines()
    assert csv_rows[0] == "train_subset,y2018,y2019" and len(csv_rows) == 5  # header, base model, 3 subsets
    assert (out / "matrix.png").stat().st_size > 0

    # Δ = 0 (scale 0): every estimate is θ0's own loss, exactly
    zero = transfer.main(*args("--step", "estimate", "--scale", "0", "--projection_dim", "8"))["estimates"]
    for estimate in zero["estimates"].values():
        assert estimate["loss"] == zero["theta0_loss"]
    for g, value in zero["theta0_loss"].items():  # θ0 is the cell of all groups (there merged, here not)
        assert value == pytest.approx(matrix["loss"]["y2018+y2019"][g], rel=1e-5)
    # the gradients are stored once and reused for other settings of the step
    stored = np.load(out / "estimate" / "gradients" / "projected.npy")
    assert stored.shape == (sum(json.loads((out / "groups.json").read_text())["groups"][g]["train"]
                                for g in ("y2018", "y2019")), 8)
    estimates = transfer.main(*args("--step", "estimate", "--scale", "0.05", "--projection_dim", "8"))["estimates"]
    np.testing.assert_array_equal(np.load(out / "estimate" / "gradients" / "projected.npy"), stored)
    assert estimates["estimates"]["y2018"]["loss"] != zero["theta0_loss"]
    assert 0 <= estimates["estimates"]["y2018"]["linearization"]["relative_error"] < 1

    comparison = transfer.main(*args("--step", "compare"))["comparison"]
    assert comparison["cells"] == 6 and comparison["relative_squared_error"] >= 0
    assert (out / "comparison.json").is_file() and (out / "comparison.png").stat().st_size > 0

    jobs = transfer.main(*args("--step", "jobs", "--num_workers", "2"))["jobs"]
    assert len(jobs) == 2 and "--worker 1 --num_workers 2" in jobs[1].read_text()
    job_config = out / "jobs" / "transfer.yaml"
    parsed = parse_config([TransferArguments], [str(job_config), "--worker", "1", "--num_workers", "2"])[0]
    assert parsed.sources == str(sources) and parsed.fine_tune_config == [str(lora)]


def test_kmeans_groups_from_the_base_models_prompt_states(tmp_path, year_rows_file, tiny_model_dirs, tiny_tokenizer):
    # two well-separated blobs come back as two clusters
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 0.1, (10, 4)), rng.normal(5, 0.1, (10, 4))])
    labels = kmeans_labels(features, 2, seed=0)
    assert len(set(labels[:10])) == 1 and len(set(labels[10:])) == 1 and labels[0] != labels[10]
    # the mean over the prompt leaves padding out: a prompt's state is the same alone and in a padded batch
    model = load_causal_lm(str(tiny_model_dirs["small_base"]), dtype="float32", device="cpu")
    rows = make_rows(4)
    together = mean_prompt_states(model, tiny_tokenizer, rows, 64, batch_size=4)
    alone = np.concatenate([mean_prompt_states(model, tiny_tokenizer, [r], 64) for r in rows])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    sources = parse_sources(write_yaml(tmp_path, f"defaults: {{dataset: {year_rows_file}}}\nkmeans: {{clusters: 2}}\n"))
    groups = cluster_groups(sources, tiny_tokenizer, str(tiny_model_dirs["small_base"]), "cpu")
    assert sorted(groups) == ["cluster-0", "cluster-1"] and sum(len(g) for g in groups.values()) == 24
    assert groups == cluster_groups(sources, tiny_tokenizer, str(tiny_model_dirs["small_base"]), "cpu")


def test_transfer_flags_are_checked_in_one_line():
    for flags, message in ((["--worker", "2", "--num_workers", "2"], "--worker 2 must be below --num_workers 2"),
                           ([], "--sources is required"),
                           (["--sources", "s.yaml", "--scale", "-1"], "--scale -1.0 must be >= 0"),
                           (["--sources", "s.yaml", "--step", "guess"], "invalid choice: 'guess'")):
        with pytest.raises(UsageError, match=message):
            parse_config([TransferArguments], flags)


def test_estimate_without_a_lora_meta_initialisation_is_refused(tmp_path, year_rows_file, tiny_model_dirs):
    sources = write_yaml(tmp_path, f"defaults: {{dataset: {year_rows_file}}}\ngroup_by: year\n")
    full = write_yaml(tmp_path, f"model_name_or_path: {tiny_model_dirs['small_base']}\nmax_length: 128\n", "ft.yaml")
    args = parse_config([TransferArguments], ["--sources", str(sources), "--fine_tune_config", str(full),
                                              "--output_dir", str(tmp_path / "out"), "--step", "estimate"])
    with pytest.raises(UsageError, match=r"--meta_init .*2018\+2019/final is not a LoRA adapter directory"):
        transfer.main(*args)
    args[0].meta_init = str(tiny_model_dirs["small_base"])  # a full model, not an adapter
    with pytest.raises(UsageError, match="is not a LoRA adapter directory"):
        transfer.main(*args)


def test_groups_and_subsets_use_the_fine_tune_template_and_a_differing_record_is_warned(
        tmp_path, year_rows_file, tiny_tokenizer, template_warnings):
    """The fine-tune config's prompt_template makes the groups' prompts (recorded beside them and the subsets, so the
    cells' fine_tune.py reads the same), as steer.py's --prompt_template would; its model's recorded one is warned
    about when it differs; a re-run with another template is refused rather than mixing the two."""
    import datasets

    from proxytune.task.prompts import TEMPLATES, read_template, write_template
    from proxytune.transfer.splits import write_subset

    model_dir = tmp_path / "tuned"  # a fine_tune.py final/ that records meta_review
    make_tiny_model(len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    write_template(model_dir, TEMPLATES["meta_review"])
    sources = write_yaml(tmp_path, f"""
defaults: {{dataset: {year_rows_file}}}
groups:
  y2018: {{filter: {{year: 2018}}}}
  y2019: {{filter: {{year: 2019}}}}
""")
    config = write_yaml(tmp_path, f"model_name_or_path: {model_dir}\nmax_length: 256\nprompt_template: alpaca\n",
                        "ft.yaml")
    out = tmp_path / "out"
    argv = ["--sources", str(sources), "--fine_tune_config", str(config), "--output_dir", str(out), "--step", "jobs"]
    transfer.main(*parse_config([TransferArguments], argv))
    assert any("prompt template alpaca" in line and str(model_dir) in line for line in template_warnings)
    for group in ("y2018", "y2019"):
        assert read_template(out / "groups" / group).same_as(TEMPLATES["alpaca"])
        ids = datasets.load_from_disk(str(out / "groups" / group))["train"][0]["input_ids"]
        assert tiny_tokenizer.decode(ids).startswith("Below is an instruction that describes a task")
    assert read_template(write_subset(out, ["y2018", "y2019"])).same_as(TEMPLATES["alpaca"])
    assert json.loads((out / "groups.json").read_text())["settings"]["prompt_template"]["name"] == "alpaca"

    # No prompt_template in the config: the model's record, meta_review.
    config.write_text(f"model_name_or_path: {model_dir}\nmax_length: 256\n", encoding="utf-8")
    with pytest.raises(UsageError, match="prompt_template .*alpaca.* -> .*meta_review"):
        transfer.main(*parse_config([TransferArguments], argv))
