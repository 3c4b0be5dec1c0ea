"""rl_tune.py at tiny size: the reward spec and the pairs are what the flags and ratings say, DPO raises the held-out
chosen-over-rejected margin, GRPO raises what its reward pays for, and final/ loads in steer.py and evaluation.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rl_tune
from proxytune.evaluation.arguments import ARGUMENT_TYPES
from proxytune.foundation.cli import cli
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_causal_lm
from proxytune.preference.arguments import parse_args
from proxytune.preference.pairs import build_file_pairs, completion_ids, pairs_from_ratings
from proxytune.preference.rewards import make_reward_functions, parse_reward_spec
from proxytune.task.papers import load_papers


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def run_main(*argv) -> dict:
    return rl_tune.main(*parse_args([str(a) for a in argv]))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_causal_lm(str(path), device="cpu").state_dict().items()}


# --- the reward spec and the pairs ------------------------------------------------------------------
def test_reward_spec_is_parsed_with_weights_and_bad_specs_are_refused():
    assert parse_reward_spec("rouge:1,eos:0.5,repetition", None) == [("rouge", 1.0), ("eos", 0.5),
                                                                             ("repetition", 1.0)]
    assert parse_reward_spec("", "some/dir") == []  # the reward model alone
    for spec, words in [("rogue:1", "did you mean 'rouge'"), ("eos:much", "not a number"), ("eos:-1", ">= 0"),
                        ("eos:nan", "finite"), ("eos,eos", "twice"), ("eos:0", "weight 0"), ("", "names no reward")]:
        with pytest.raises(UsageError, match=words):
            parse_reward_spec(spec, None)


def test_pairs_higher_rating_chosen_ties_skipped_choices_as_given():
    recs = [{"type": "rating", "example_id": "p", "system": "a", "rating": 4, "output": "good"},
            {"type": "rating", "example_id": "p", "system": "b", "rating": 2, "output": "bad"},
            {"type": "rating", "example_id": "p", "system": "c", "rating": 4, "output": "also good"},
            {"type": "rating", "example_id": "q", "system": "a", "rating": None, "output": "unrated"},
            {"type": "pairwise", "example_id": "q", "systems": ["a", "b"], "choice": "b", "winner": "b", "loser": "a",
             "outputs": {"a": "loser text", "b": "winner text"}},
            {"type": "pairwise", "example_id": "r", "systems": ["a", "b"], "choice": "tie", "winner": None,
             "loser": None, "outputs": {"a": "x", "b": "y"}}]
    pairs, counts = pairs_from_ratings(recs)
    got = sorted((p["example_id"], p["chosen"], p["rejected"]) for p in pairs)
    assert got == [("p", "also good", "bad"), ("p", "good", "bad"), ("q", "winner text", "loser text")]
    assert counts == {"ratings": 3, "choices": 2, "ties": 2}  # a = c on p, and the tie choice on r


def test_eos_reward_reads_the_completion_ids_and_repetition_is_a_penalty():
    eos, rouge, length, rep = make_reward_functions(
        [("eos", 1.0), ("rouge", 1.0), ("length", 1.0), ("repetition", 1.0)], [0], (2, 4), 3)
    # TRL decodes completions without special tokens: only the ids show that the first one stopped
    assert eos(completions=["Accept.", "Accept."], completion_ids=[[7, 8, 0], [7, 8, 9]]) == [1.0, 0.0]
    assert rouge(completions=["the paper is good", "zebra"], reference=["the paper is good"] * 2)[0] == pytest.approx(1)
    assert length(completions=["a b c", "a", "a b c d e f g h i j"]) == [1.0, 0.5, 0.0]
    assert rep(completions=["a b c a b c a b c", "a b c d"]) == [pytest.approx(-4 / 7), 0.0]


def test_completion_ids_keep_an_eos_only_where_the_output_ended_with_one(tiny_tokenizer):
    stopped = completion_ids("Accept.", True, tiny_tokenizer, 100)
    cut = completion_ids("Accept.", False, tiny_tokenizer, 100)
    assert stopped == cut + [tiny_tokenizer.eos_token_id] and tiny_tokenizer.eos_token_id not in cut


# --- DPO end to end -----------------------------------------------------------------------------------
def simulated_ratings(tmp_path: Path, data: Path) -> Path:
    """Two outputs per paper, rated by a known rule: one that stops with EOS and does not repeat (5), one that
    loops and is cut off (1). predictions.jsonl beside the ratings says which ended with EOS, as evaluation.py's."""
    ratings, predictions = [], []
    for paper in load_papers(str(data), "train"):
        good, bad = paper["Output"], "the paper the paper the paper the paper the paper"
        for system, text, rating, eos in (("a", good, 5, True), ("b", bad, 1, False)):
            ratings.append({"type": "rating", "example_id": paper["example_id"], "system": system, "rating": rating,
                            "output": text})
            predictions.append({"example_id": paper["example_id"], "system": system, "prediction": text,
                                "ended_with_eos": eos})
    (tmp_path / "eval").mkdir()
    write_jsonl(tmp_path / "eval" / "predictions.jsonl", predictions)
    return write_jsonl(tmp_path / "eval" / "ratings.jsonl", ratings)


def test_dpo_raises_the_held_out_margin_and_loads_in_steer(tmp_path, jsonl_file, tiny_model_dirs,
                                                            tiny_tokenizer_dir):
    ratings = simulated_ratings(tmp_path, jsonl_file)
    out = tmp_path / "dpo"
    result = run_main("--method", "dpo", "--workbook", ratings, "--dataset_path", jsonl_file,
                      "--model_name_or_path", tiny_model_dirs["small_tuned"], "--max_length", 256,
                      "--eval_pairs_percentage", 25, "--min_pairs", 4, "--max_steps", 6,
                      "--per_device_train_batch_size", 4, "--learning_rate", 3e-3, "--beta", 0.1,
                      "--num_eval_examples", 2, "--num_samples", 1, "--max_new_tokens", 6, "--report_to", "none",
                      "--save_steps", 3, "--output_dir", out)
    final = out / "final"
    m = result["metrics"]
    assert m["heldout_pairs"] >= 4 and m["train_rows"] >= 12
    held = m["heldout_margin"]
    assert held["after"]["mean_margin"] > held["before"]["mean_margin"] + 1.0  # papers DPO never saw
    assert m["train_margin"]["after"]["mean_margin"] > m["train_margin"]["before"]["mean_margin"]
    before, after = weights(tiny_model_dirs["small_tuned"]), weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for name in ("README.md", "metrics.json", "training_curve.png", "samples.jsonl", "rl_tune_config.json",
                 "model.safetensors", "prompt_template.txt"):
        assert (final / name).is_file(), name
    assert "rl_tune.py" in (final / "README.md").read_text() and "held-out margin" in (final / "README.md").read_text()
    # steer.py takes it as --small_tuned_model
    from proxytune.steering.arguments import ModelArguments, SteerArguments, TuneArguments
    from steer import main as steer_main

    steered = steer_main(*parse_config([ModelArguments, SteerArguments, TuneArguments], [
        "--large_model", str(tiny_model_dirs["large"]), "--small_base_model", str(tiny_model_dirs["small_base"]),
        "--small_tuned_model", str(final), "--large_device", "cpu", "--prompt", "Good paper.",
        "--max_new_tokens", "3"]))
    assert steered is not None
    # a finished run is not retrained
    assert run_main("--method", "dpo", "--workbook", ratings, "--dataset_path", jsonl_file,
                    "--model_name_or_path", tiny_model_dirs["small_tuned"], "--output_dir", out)["status"] == "done"


@pytest.mark.exactness
def test_dpo_resumes_from_the_last_complete_checkpoint(tmp_path, jsonl_file, tiny_model_dirs):
    ratings = simulated_ratings(tmp_path, jsonl_file)
    flags = ["--method", "dpo", "--workbook", ratings, "--dataset_path", jsonl_file, "--model_name_or_path",
             tiny_model_dirs["small_tuned"], "--max_length", 256, "--min_pairs", 4, "--per_device_train_batch_size", 4,
             "--learning_rate", 3e-3, "--num_eval_examples", 0, "--num_samples", 0, "--report_to", "none",
             "--save_steps", 2, "--save_total_limit", 5, "--seed", 3]
    whole = run_main(*flags, "--max_steps", 4, "--output_dir", tmp_path / "whole")
    import shutil

    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")  # killed after step 2
    (tmp_path / "part" / "checkpoint-3").mkdir()  # and halfway through writing the next checkpoint
    resumed = run_main(*flags, "--max_steps", 4, "--output_dir", tmp_path / "part")
    assert resumed["resumed_from"].name == "checkpoint-2" and whole["metrics"]["global_step"] == 4
    assert not (tmp_path / "part" / "checkpoint-3").exists()
    a, b = weights(tmp_path / "whole" / "final"), weights(tmp_path / "part" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- GRPO end to end ----------------------------------------------------------------------------------
def eos_prone_model(src: Path, dst: Path, tokenizer) -> Path:
    """The tiny model with its EOS logit raised, so a few of its samples stop (P(EOS) ~ 0.1 per token) and the eos
    reward has something to tell apart; a random model almost never samples EOS."""
    model = load_causal_lm(str(src), device="cpu")
    with torch.no_grad():
        ids = tokenizer("Peer reviews of a paper: good paper. Meta-review:", return_tensors="pt")["input_ids"]
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)  # (H,)
        out = model.get_output_embeddings().weight  # (V, H)
        logits = hidden @ out.T
        boost = float(logits.max() - logits[tokenizer.eos_token_id]) + 1.0
        out[tokenizer.eos_token_id] += boost * hidden / hidden.dot(hidden)
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dst


def first_token_eos_logprob(path: Path, tokenizer, papers: list[dict]) -> float:
    from proxytune.task.prompts import build_prompt

    model = load_causal_lm(str(path), device="cpu")
    total = 0.0
    with torch.no_grad():
        for paper in papers:
            prompt, _ = build_prompt(paper["reviews"], tokenizer, 200)
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            total += torch.log_softmax(model(ids).logits[0, -1, :len(tokenizer)], -1)[tokenizer.eos_token_id].item()
    return total / len(papers)


def test_grpo_raises_what_the_reward_pays_for_and_loads_in_evaluation(tmp_path, jsonl_file, tiny_model_dirs,
                                                                       tiny_tokenizer):
    start = eos_prone_model(tiny_model_dirs["small_tuned"], tmp_path / "start", tiny_tokenizer)
    out = tmp_path / "grpo"
    result = run_main("--method", "grpo", "--reward", "eos:1", "--dataset_path", jsonl_file,
                      "--model_name_or_path", start, "--max_length", 256, "--max_completion_length", 6,
                      "--num_generations", 4, "--per_device_train_batch_size", 8, "--max_steps", 8,
                      "--learning_rate", 1e-2, "--num_eval_examples", 2, "--num_samples", 1, "--max_new_tokens", 6,
                      "--report_to", "none", "--logging_steps", 1, "--output_dir", out)
    final = out / "final"
    papers = load_papers(str(jsonl_file), "validation")[:6]
    assert first_token_eos_logprob(final, tiny_tokenizer, papers) > first_token_eos_logprob(start, tiny_tokenizer,
                                                                                            papers) + 0.5
    log = json.loads((final / "trainer_state.json").read_text())["log_history"]
    rewards = [h["rewards/eos/mean"] for h in log if "rewards/eos/mean" in h]
    assert len(rewards) == 8 and 0 < max(rewards)
    before, after = weights(start), weights(final)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert {"rougeL", "eos_rate", "repetition", "reference_nll"} <= set(result["metrics"]["after"])
    # evaluation.py takes it as --small_tuned_model
    import evaluation

    metrics = evaluation.main(*parse_config(ARGUMENT_TYPES, [
        "--dataset_path", str(jsonl_file), "--num_examples", "2", "--max_new_tokens", "3", "--bootstrap_samples", "20",
        "--small_tuned_model", str(final), "--systems", "small_tuned", "--output_dir", str(tmp_path / "eval")]))
    assert metrics is not None and (tmp_path / "eval" / "metrics.json").is_file()


def test_grpo_with_a_learned_reward_model(tmp_path, jsonl_file, tiny_model_dirs, tiny_tokenizer):
    """--reward_model adds a sequence-classification score (num_labels 1); a random tiny one only has to run."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tiny_tokenizer) + 12, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, num_labels=1, pad_token_id=1)
    GPTNeoXForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    result = run_main("--method", "grpo", "--reward", "length:1", "--reward_model", tmp_path / "rm",
                      "--dataset_path", jsonl_file, "--model_name_or_path", tiny_model_dirs["small_tuned"],
                      "--max_length", 256, "--max_completion_length", 4, "--num_generations", 2,
                      "--per_device_train_batch_size", 4, "--max_steps", 2, "--num_eval_examples", 0,
                      "--num_samples", 0, "--report_to", "none", "--logging_steps", 1, "--output_dir", tmp_path / "o")
    log = json.loads((result["final_dir"] / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/rm/mean" in h for h in log), log[0].keys()


# --- bad input ------------------------------------------------------------------------------------
def test_bad_dpo_inputs_fail_in_one_line_and_write_nothing(tmp_path, jsonl_file, tiny_model_dirs, capsys):
    paper = load_papers(str(jsonl_file), "train")[0]["example_id"]
    rate = lambda eid, system, r: {"type": "rating", "example_id": eid, "system": system, "rating": r,  # noqa: E731
                                   "output": f"output {system}"}
    cases = {
        "no_ratings.jsonl": ([{"type": "rating", "example_id": paper, "system": "a", "rating": None, "output": "x"}],
                             "holds no ratings"),
        "ties.jsonl": ([rate(paper, "a", 3), rate(paper, "b", 3)], "are ties"),
        "unknown.jsonl": ([rate("nope", "a", 3), rate("nope", "b", 1)], "does not have (e.g. example_id nope)"),
        "few.jsonl": ([rate(paper, "a", 3), rate(paper, "b", 1)], "fewer than --min_pairs 8"),
    }
    for name, (records, words) in cases.items():
        path = write_jsonl(tmp_path / name, records)
        out = tmp_path / f"out-{name}"
        with pytest.raises(SystemExit) as exit_info:
            cli(run_main)("--method", "dpo", "--workbook", path, "--dataset_path", jsonl_file,
                          "--model_name_or_path", tiny_model_dirs["small_tuned"], "--output_dir", out)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and words in err[-1], (name, err[-1])
        assert not out.exists()


def test_pairs_file_prompt_as_written_and_eos_text_becomes_the_eos_id(tmp_path, tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Peer reviews of a paper:\n\nGood.\n\nMeta-review:", "chosen": f"Accept.{eos}",
         "rejected": "Accept"},
        {"prompt": "p", "chosen": "same", "rejected": "same"}])
    (pair,) = build_file_pairs(path, tiny_tokenizer, 256)  # the identical pair is skipped
    assert pair["chosen_ids"][-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.eos_token_id not in pair["rejected_ids"]
    assert tiny_tokenizer.decode(pair["prompt_ids"]).endswith("Meta-review:")


def test_lora_adapter_and_merged_weights_load_as_small_tuned(tmp_path, jsonl_file, tiny_model_dirs):
    ratings = simulated_ratings(tmp_path, jsonl_file)
    flags = ["--method", "dpo", "--workbook", ratings, "--dataset_path", jsonl_file, "--model_name_or_path",
             tiny_model_dirs["small_tuned"], "--max_length", 256, "--min_pairs", 4, "--max_steps", 2,
             "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--num_eval_examples", 0, "--num_samples", 0,
             "--report_to", "none", "--use_lora", "--lora_r", 4]
    adapter = run_main(*flags, "--output_dir", tmp_path / "adapter")["final_dir"]
    merged = run_main(*flags, "--merge_lora", "--output_dir", tmp_path / "merged")["final_dir"]
    assert (adapter / "adapter_config.json").is_file() and not (merged / "adapter_config.json").exists()
    a, m, base = weights(adapter), weights(merged), weights(tiny_model_dirs["small_tuned"])
    assert all(torch.allclose(a[k], m[k], atol=1e-5) for k in m)  # the adapter, merged on load, is the merged model
    assert any(not torch.allclose(m[k], base[k]) for k in base)
