"""The lm-evaluation-harness backend (proxytune/integrations/harness.py), run by the harness itself on local tasks:
with S_tuned = S the steered blend is L, so its results must be those of the harness's own `hf` backend for L."""

from __future__ import annotations

import json
import math

import pytest
from conftest import META, REVIEWS, make_tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install lm-eval==0.4.13")

from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from proxytune.foundation.errors import UsageError  # noqa: E402
from proxytune.integrations.harness import MODEL_TYPE, SteeredLM  # noqa: E402
from proxytune.integrations.steered import SteeredModel  # noqa: E402
from proxytune.steering.blend import Blend  # noqa: E402

TASKS = ["pt_mc", "pt_gen", "pt_ppl"]


def write_tasks(root, cache_dir) -> None:
    """Three local tasks over JSONL files: a two-choice decision (loglikelihood), a short generation with stop
    sequences (generate_until) and the meta-reviews' perplexity (loglikelihood_rolling)."""
    rows = [{"text": f"Paper {i}. {REVIEWS[i % len(REVIEWS)]}", "label": i % 2, "target": META[i % len(META)]}
            for i in range(6)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = {"dataset_path": "json", "test_split": "test",
              "dataset_kwargs": {"data_files": {"test": str(root / "data.jsonl")}, "cache_dir": str(cache_dir)}}
    tasks = {
        "pt_mc": {"output_type": "multiple_choice", "doc_to_text": "{{text}}\nDecision:",
                  "doc_to_choice": ["accept", "reject"], "doc_to_target": "label", "metric_list": [{"metric": "acc"}]},
        "pt_gen": {"output_type": "generate_until", "doc_to_text": "{{text}}\nMeta-review:",
                   "doc_to_target": "{{target}}", "metric_list": [{"metric": "exact_match"}],
                   # "but": a word the tiny models emit, so that a stop sequence cuts some generations
                   "generation_kwargs": {"until": ["\n", ".", "but"], "max_gen_toks": 12, "do_sample": False}},
        "pt_ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{target}}",
                   "metric_list": [{"metric": "word_perplexity"}]},
    }
    for name, config in tasks.items():
        # JSON is YAML: the task files need no YAML writer.
        (root / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **config}), encoding="utf-8")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(root, tmp_path_factory.mktemp("datasets_cache"))
    return root


@pytest.fixture(scope="module")
def models64(tiny_tokenizer):
    """L, S and another S_tuned in float64 (so that the two backends' different batching cannot flip a greedy
    choice), with as many output rows as the tokenizer has tokens (the `hf` backend normalises over all rows)."""
    vocab = len(tiny_tokenizer)
    return {"large": make_tiny_model(vocab, seed=2, hidden_size=64, num_layers=3).double(),
            "small_base": make_tiny_model(vocab, seed=0).double(),
            "small_tuned": make_tiny_model(vocab, seed=1).double()}


def evaluate(model, task_dir) -> dict:
    """lm_eval.simple_evaluate on the local tasks -> {task: {"metrics": ..., "responses": per-doc responses}}."""
    results = lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=TaskManager(
        include_path=str(task_dir), include_defaults=False), log_samples=True, batch_size=4, device="cpu")
    out = {}
    for task in TASKS:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        out[task] = {"metrics": results["results"][task],
                     "responses": [s["filtered_resps"] for s in samples]}
    return out


def loglikelihoods(result: dict, task: str) -> list[float]:
    """The per-document scores of a task: each choice's log-likelihood (mc) or the document's (rolling)."""
    values = []
    for resps in result[task]["responses"]:
        for r in resps if isinstance(resps, list) else [resps]:
            values.append(float(r[0] if isinstance(r, (list, tuple)) else r))
    return values


@pytest.fixture(scope="module")
def hf_results(models64, tiny_tokenizer, task_dir):
    return evaluate(HFLM(pretrained=models64["large"], tokenizer=tiny_tokenizer, batch_size=4, device="cpu"), task_dir)


def steered_lm(models64, tokenizer, small_tuned: str, alpha: float, speculative: bool = True) -> SteeredLM:
    models = {**models64, "small_tuned": models64[small_tuned]}
    return SteeredLM(SteeredModel(models, tokenizer, Blend.from_alpha(alpha), speculative=speculative), batch_size=3)


@pytest.mark.parametrize("speculative", [True, False])
def test_zero_delta_blend_equals_the_hf_backend_for_the_large_model(models64, tiny_tokenizer, task_dir, hf_results,
                                                                     speculative):
    ours = evaluate(steered_lm(models64, tiny_tokenizer, "small_base", 1.0, speculative), task_dir)
    for task in ("pt_mc", "pt_ppl"):
        # Our log-softmax runs in float32 (as everywhere in steering), the hf backend's in the model's float64.
        assert loglikelihoods(ours, task) == pytest.approx(loglikelihoods(hf_results, task), abs=1e-4, rel=1e-6)
    assert ours["pt_mc"]["metrics"]["acc,none"] == hf_results["pt_mc"]["metrics"]["acc,none"]
    assert ours["pt_gen"]["responses"] == hf_results["pt_gen"]["responses"]
    assert any(r != [""] for r in ours["pt_gen"]["responses"]), "the generation task produced nothing to compare"
    assert math.isclose(ours["pt_ppl"]["metrics"]["word_perplexity,none"],
                        hf_results["pt_ppl"]["metrics"]["word_perplexity,none"], rel_tol=1e-4)


def test_a_real_delta_at_alpha_one_changes_the_results(models64, tiny_tokenizer, task_dir, hf_results):
    ours = evaluate(steered_lm(models64, tiny_tokenizer, "small_tuned", 1.0), task_dir)
    for task in ("pt_mc", "pt_ppl"):
        differences = [abs(a - b) for a, b in zip(loglikelihoods(ours, task), loglikelihoods(hf_results, task))]
        assert max(differences) > 0.1
    assert ours["pt_gen"]["responses"] != hf_results["pt_gen"]["responses"]


def test_model_args_string_loads_the_models_and_the_blend_file(tmp_path, tiny_tokenizer, models64, task_dir,
                                                               hf_results):
    """What `--model_args` holds: model paths, devices and a blend.json, through the harness's registry."""
    for role in ("large", "small_base"):
        model = make_tiny_model(len(tiny_tokenizer), seed={"large": 2, "small_base": 0}[role],
                                **({"hidden_size": 64, "num_layers": 3} if role == "large" else {}))
        model.save_pretrained(tmp_path / role)
        tiny_tokenizer.save_pretrained(tmp_path / role)
    (tmp_path / "blend.json").write_text(json.dumps({"alpha": 1.0}), encoding="utf-8")
    args = (f"large_model={tmp_path / 'large'},small_base_model={tmp_path / 'small_base'},"
            f"small_tuned_model={tmp_path / 'small_base'},blend={tmp_path / 'blend.json'},large_dtype=float32")
    results = lm_eval.simple_evaluate(model=MODEL_TYPE, model_args=args, tasks=["pt_mc"], log_samples=True,
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                      batch_size=2, device="cuda:0")  # lm-eval's default device: falls back to CPU
    samples = sorted(results["samples"]["pt_mc"], key=lambda s: s["doc_id"])
    ours = [float(r[0]) for s in samples for r in s["filtered_resps"]]
    assert ours == pytest.approx(loglikelihoods(hf_results, "pt_mc"), abs=1e-4)


def test_model_args_are_checked():
    with pytest.raises(UsageError, match="unknown model_args large_modle"):
        SteeredLM(large_modle="x")
    with pytest.raises(UsageError, match="give one of blend=FILE, alpha=A"):
        SteeredLM(alpha=1.0, large_weight=1.0)



def test_the_prompt_template_is_steer_pys_and_the_chat_template(models64, tiny_tokenizer, task_dir, tmp_path,
                                                                 template_warnings):
    """The template comes as steer.py's does (S_tuned's final/ records it; prompt_template= wins, warned), and the
    harness's --apply_chat_template formats the tasks' prompts with it."""
    from proxytune.task.prompts import TEMPLATES, write_template

    alpaca = TEMPLATES["alpaca"]
    lm = SteeredLM(SteeredModel(models64, tiny_tokenizer, Blend.from_alpha(1.0), template=alpaca), batch_size=3)
    eos = tiny_tokenizer.decode(tiny_tokenizer.eos_token_id)
    chat = [{"role": "system", "content": "Summarise the reviews."}, {"role": "user", "content": "Good paper."},
            {"role": "assistant", "content": "Accept."}, {"role": "user", "content": "Weak baselines."}]
    assert lm.apply_chat_template(chat) == (alpaca.render(["Summarise the reviews.", "Good paper."]) + " Accept." + eos
                                            + alpaca.render(["Weak baselines."]))
    assert lm.apply_chat_template(chat[:3], add_generation_prompt=False).endswith("### Response: Accept.")
    assert lm.chat_template() == alpaca.describe() and lm.get_model_info()["prompt_template"]["name"] == "alpaca"
    results = lm_eval.simple_evaluate(model=lm, tasks=["pt_gen"], apply_chat_template=True, log_samples=True,
                                      task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                      batch_size=3, device="cpu")
    contexts = [json.dumps(s["arguments"]) for s in results["samples"]["pt_gen"]]
    assert contexts and all("### Instruction:" in c and "Meta-review:" in c for c in contexts)

    roles = {"large": {"seed": 2, "hidden_size": 64, "num_layers": 3}, "small_base": {"seed": 0},
             "small_tuned": {"seed": 1}}
    for role, shape in roles.items():
        make_tiny_model(len(tiny_tokenizer), **shape).save_pretrained(tmp_path / role)
        tiny_tokenizer.save_pretrained(tmp_path / role)
    write_template(tmp_path / "small_tuned", alpaca)  # as fine_tune.py records it in final/
    flags = {f"{role}_model": str(tmp_path / role) for role in roles}
    assert SteeredLM(alpha=1.0, **flags).steered.template.same_as(alpaca) and not template_warnings
    assert SteeredLM(alpha=1.0, prompt_template="meta_review", **flags).steered.template.name == "meta_review"
    assert any("differs from alpaca" in line and str(tmp_path / "small_tuned") in line for line in template_warnings)
    with pytest.raises(UsageError, match="not both"):
        SteeredLM(lm.steered, prompt_template="alpaca")
