"""RL from a reward, the Mini-ChatGPT recipe, at tiny size: prompts from plain text, a two-class classifier read at
the class asked for, PPO's equations against hand-computed values, PPO raising a toy reward (and steering carrying the
gain to a larger model), and rl_tune.py --method rloo / grpo / ppo end to end (resume after a kill, final/ loads in
steer.py and evaluation.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import REVIEWS

import evaluation
import rl_tune
from proxytune.evaluation.arguments import ARGUMENT_TYPES
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.models.loading import load_causal_lm
from proxytune.preference.arguments import parse_args
from proxytune.preference.ppo import AdaptiveKLController, gae_advantages, policy_loss, token_rewards, value_loss
from proxytune.preference.ppo_trainer import PPOTrainer
from proxytune.preference.trainers import build_trainer, load_rewards, prepare
from proxytune.steering.arguments import ModelArguments, SteerArguments, TuneArguments
from proxytune.steering.blend import Blend, blend_logprobs
from proxytune.training.classification import encode_input
from proxytune.training.classifier_scores import load_reward_model, resolve_label
from proxytune.training.text_prompts import parse_token_range, text_prompt_rows
from steer import main as steer_main


def run_main(*argv) -> dict:
    return rl_tune.main(*parse_args([str(a) for a in argv]))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_causal_lm(str(path), device="cpu").state_dict().items()}


@pytest.fixture
def sentiment_dir(tmp_path, tiny_tokenizer) -> Path:
    """A random two-class sequence classifier labelled NEGATIVE (0) / POSITIVE (1), with the tiny tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tiny_tokenizer) + 12, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, num_labels=2, pad_token_id=1,
                           id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1})
    path = tmp_path / "sentiment"
    GPTNeoXForSequenceClassification(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


# --- prompts from plain text ------------------------------------------------------------------------------------
def test_token_ranges_are_parsed_and_bad_ones_refused():
    assert parse_token_range("2,8", "--prompt_length") == (2, 8)
    assert parse_token_range("8", "--completion_length") == (8, 8)
    for text, words in [("8,2", "low <= high"), ("0,4", "1 <= low"), ("a,b", "not a number"), ("1,2,3", "range")]:
        with pytest.raises(UsageError, match=words):
            parse_token_range(text, "--prompt_length")


def test_text_prompts_are_the_first_n_tokens_with_lengths_in_range(tiny_tokenizer):
    texts = [f"{r} {r}" for r in REVIEWS] * 5
    rows = text_prompt_rows(texts, tiny_tokenizer, (2, 8), (4, 16), seed=3)
    assert len(rows) == len(texts)
    prompt_lengths, completion_lengths = set(), set()
    for row, text in zip(rows, texts):
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(tiny_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        assert tiny_tokenizer.decode(ids[:n]) == row["prompt"] and 2 <= n <= 8  # a prefix of the text
        assert 4 <= row["completion_length"] <= 16
        prompt_lengths.add(n)
        completion_lengths.add(row["completion_length"])
    assert len(prompt_lengths) > 3 and len(completion_lengths) > 5  # drawn, not fixed
    assert rows == text_prompt_rows(texts, tiny_tokenizer, (2, 8), (4, 16), seed=3)  # seeded
    fixed = text_prompt_rows(texts, tiny_tokenizer, (3, 3), (5, 5), seed=0)
    assert {r["completion_length"] for r in fixed} == {5}
    assert text_prompt_rows(["Hi"], tiny_tokenizer, (50, 60), (4, 4), seed=0) == []  # too short for any prompt


# --- a classifier as the reward ---------------------------------------------------------------------------------
def test_a_two_class_classifier_rewards_the_class_asked_for(sentiment_dir, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification

    texts = ["The paper is good.", "Reject, the proofs are wrong.", "Strong results"]
    model = AutoModelForSequenceClassification.from_pretrained(sentiment_dir).eval()
    enc = tiny_tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits.double()  # (3, 2)
    assert (logits[:, 0] - logits[:, 1]).abs().min() > 1e-3  # the two classes' logits differ: the test can fail
    positive = load_reward_model(str(sentiment_dir), "positive", "logit", "completion")
    negative = load_reward_model(str(sentiment_dir), "0", "logit", "completion")
    assert positive.__name__ == "sentiment" and positive.label == 1 and negative.label == 0
    got = positive(prompts=["x"] * 3, completions=texts)
    assert got == pytest.approx(logits[:, 1].tolist(), abs=1e-5)  # the POSITIVE logit, not TRL's logits[:, 0]
    assert negative(prompts=["x"] * 3, completions=texts) == pytest.approx(logits[:, 0].tolist(), abs=1e-5)
    log_odds = load_reward_model(str(sentiment_dir), "POSITIVE", "log_odds", "completion")
    assert log_odds(prompts=["x"] * 3, completions=texts) == pytest.approx((logits[:, 1] - logits[:, 0]).tolist(),
                                                                           abs=1e-5)
    prob = load_reward_model(str(sentiment_dir), "POSITIVE", "probability", "completion")
    assert prob(prompts=["x"] * 3, completions=texts) == pytest.approx(logits.softmax(-1)[:, 1].tolist(), abs=1e-5)
    full = load_reward_model(str(sentiment_dir), "POSITIVE", "logit", "full")
    assert full(prompts=["The paper", "Reject,", "Strong"], completions=[" is good.", " the proofs are wrong.",
                                                                          " results"]) == pytest.approx(got, abs=1e-5)
    assert positive.is_label(texts) == (logits[:, 1] > logits[:, 0]).tolist()


def test_label_errors_name_the_labels():
    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    with pytest.raises(UsageError, match="pass --reward_label .* e.g. --reward_label POSITIVE"):
        resolve_label(labels, 2, None, "m")
    with pytest.raises(UsageError, match="no label 'happy' .*0: NEGATIVE, 1: POSITIVE"):
        resolve_label(labels, 2, "happy", "m")
    with pytest.raises(UsageError, match="no label '2'"):
        resolve_label(labels, 2, "2", "m")
    with pytest.raises(UsageError, match="one output"):
        resolve_label({0: "LABEL_0"}, 1, "POSITIVE", "m")
    assert resolve_label({0: "LABEL_0"}, 1, None, "m") is None
    assert resolve_label({"0": "neg", "1": "pos"}, 2, "POS", "m") == 1  # JSON configs key id2label by strings


def test_a_fine_tune_classifier_is_read_through_its_template(tmp_path, sentiment_dir, tiny_tokenizer):
    """fine_tune.py --task classification's final/: classifier.json's labels and template decide what is scored."""
    final = tmp_path / "final"
    shutil.copytree(sentiment_dir, final)
    info = {"task": "classification", "label_column": "label", "classification_input": "meta_review",
            "max_length": 64, "template": ["Meta-review of a paper:\n\n", "\n\nVerdict:"], "labels": ["neg", "pos"]}
    (final / "classifier.json").write_text(json.dumps(info), encoding="utf-8")
    reward = load_reward_model(str(final), "pos", "logit", "auto")  # a meta-review classifier reads the completion
    model = load_causal_lm(str(final), dtype="float32", device="cpu", head={
        "num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}})
    ids = torch.tensor([encode_input("Accept.", tiny_tokenizer, 64, "meta_review")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0, 1].item()
    assert reward(prompts=["Peer reviews of a paper: ..."], completions=["Accept."]) == pytest.approx([expected],
                                                                                                   abs=1e-5)
    with pytest.raises(UsageError, match="labels 0: neg, 1: pos"):
        load_reward_model(str(final), "POSITIVE", "logit", "completion")


# --- PPO's equations ---------------------------------------------------------------------------------------------
def test_gae_matches_a_hand_computed_example():
    """One episode of 3 tokens then padding; gamma 0.9, lambda 0.8. By hand:
    delta_2 = 1.0 - 0.3 = 0.7; delta_1 = 0 + 0.9*0.3 - 0.2 = 0.07; delta_0 = 0 + 0.9*0.2 - 0.5 = -0.32
    A_2 = 0.7; A_1 = 0.07 + 0.72*0.7 = 0.574; A_0 = -0.32 + 0.72*0.574 = 0.09328; R = A + V."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]], dtype=torch.float64)  # the padded 9 must be ignored
    values = torch.tensor([[0.5, 0.2, 0.3, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    assert advantages.tolist()[0] == pytest.approx([0.09328, 0.574, 0.7, 0.0])
    assert returns.tolist()[0] == pytest.approx([0.59328, 0.774, 1.0, 0.0])
    # gamma = lambda = 1: the advantage is the reward-to-go minus the value
    a, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert a.tolist()[0] == pytest.approx([0.5, 0.8, 0.7, 0.0])


def test_token_rewards_put_the_kl_on_every_token_and_the_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -1.5], [-1.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.5], [-2.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = token_rewards(torch.tensor([2.0, -1.0]), logprobs, ref, mask, kl_coef=0.1)
    assert kl.flatten().tolist() == pytest.approx([0.5, -1.0, 0.0, 1.0, 0.0, 0.0])
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, 2.0, -0.1 - 1.0, 0.0, 0.0])


def test_the_clipped_policy_loss_has_no_gradient_outside_the_clip_range():
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios 1.5 and 0.5 (outside 1 +- 0.2) and 1.1, 0.9 (inside), each with A > 0 and A < 0
    for advantage, ratio, zero in [(1.0, 1.5, True), (1.0, 1.1, False), (-1.0, 0.5, True), (-1.0, 0.9, False),
                                   (1.0, 0.5, False), (-1.0, 1.5, False)]:  # the last two: clipping never helps
        logprobs = torch.full((1, 4), float(torch.log(torch.tensor(ratio))), dtype=torch.float64, requires_grad=True)
        loss, clip_frac = policy_loss(logprobs, old, torch.full((1, 4), advantage, dtype=torch.float64),
                                      torch.ones(1, 4, dtype=torch.float64), cliprange=0.2)
        loss.backward()
        grad = logprobs.grad.abs().max().item()
        assert (grad == 0.0) == zero, (advantage, ratio, grad)
        assert clip_frac.item() == (1.0 if zero else 0.0)
        if not zero:  # inside: d(-A rho)/d log pi = -A rho per token, averaged over 4
            assert grad == pytest.approx(ratio / 4)


def test_the_value_loss_is_clipped_around_the_old_values():
    old = torch.tensor([[0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0]], dtype=torch.float64)
    far = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)  # moved 0.5 > 0.2: clipped to 0.2
    loss = value_loss(far, old, returns, torch.ones(1, 1), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8 ** 2)  # the larger of (0.5-1)^2 and (0.2-1)^2
    loss.backward()
    assert far.grad.item() == 0.0


def test_the_adaptive_kl_controller_moves_beta_toward_the_target():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=100)
    ctl.update(12.0, n=10)  # error clipped to +0.2: beta * (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.2 * 1.02)
    ctl.update(3.0, n=10)  # error -0.5 -> -0.2
    assert ctl.value == pytest.approx(0.2 * 1.02 * 0.98)
    fixed = AdaptiveKLController(0.2, 6.0, 100, adaptive=False)
    fixed.update(100.0, 10)
    assert fixed.value == 0.2


# --- PPO's loop --------------------------------------------------------------------------------------------------
def even_token_share(completions, completion_ids, **_):
    """A toy reward: the share of a completion's tokens with an even id (each sample says how good it was)."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


def even_mass(model, tokenizer, prompts: list[str]) -> float:
    """The policy's probability of an even token next, averaged over prompts: the toy reward's expectation at the
    first completion token, computed exactly."""
    vocab = len(tokenizer)
    total = 0.0
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            probs = torch.softmax(model(ids).logits[0, -1, :vocab].double(), -1)
            total += probs[0::2].sum().item()
    return total / len(prompts)


def test_ppo_raises_a_toy_reward(tmp_path, tiny_model_dirs, tiny_tokenizer):
    model = load_causal_lm(str(tiny_model_dirs["small_tuned"]), device="cpu")
    prompts = [" ".join(r.split()[:3]) for r in REVIEWS]
    rows = [{"prompt": p, "completion_length": 4} for p in prompts]
    _, _, args = parse_args(["--method", "ppo", "--output_dir", str(tmp_path / "ppo"), "--learning_rate", "3e-2",
                             "--per_device_train_batch_size", "6", "--max_steps", "10", "--init_kl_coef", "0.01",
                             "--save_steps", "100"])
    before = even_mass(model, tiny_tokenizer, prompts)
    trainer = PPOTrainer(model, tiny_tokenizer, args, rows, [even_token_share], [1.0])
    trainer.train()
    after = even_mass(trainer.model, tiny_tokenizer, prompts)
    assert after > before + 0.2, (before, after)  # measured: 0.50 -> 0.89
    rewards = [h["reward"] for h in trainer.state.log_history]
    assert len(rewards) == 10 and sum(rewards[-3:]) > sum(rewards[:3])
    assert all(h["kl_coef"] > 0 and "value_loss" in h and "rewards/even_token_share/mean" in h
               for h in trainer.state.log_history)
    # steering carries it to a larger model: L + alpha (log p_S_ppo - log p_S) puts more mass on the rewarded tokens
    large = load_causal_lm(str(tiny_model_dirs["large"]), device="cpu")
    start = load_causal_lm(str(tiny_model_dirs["small_tuned"]), device="cpu")
    vocab = len(tiny_tokenizer)

    def next_logprobs(m, prompt):
        ids = tiny_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            return torch.log_softmax(m(ids).logits[:, -1, :vocab].double(), -1)  # (1, V)

    for alpha, at_least in ((0.0, 0.0), (1.0, 0.15)):
        steered = [blend_logprobs(next_logprobs(large, p), next_logprobs(trainer.model, p), next_logprobs(start, p),
                                  Blend.from_alpha(alpha)).exp()[0, 0::2].sum().item() for p in prompts]
        gain = sum(steered) / len(prompts) - even_mass(large, tiny_tokenizer, prompts)
        assert gain >= at_least - 1e-9 and (alpha > 0 or abs(gain) < 1e-9), (alpha, gain)


# --- rl_tune.py end to end ---------------------------------------------------------------------------------------
def text_flags(text_file, sentiment_dir, model_dir) -> list:
    return ["--text_dataset", text_file, "--reward_model", sentiment_dir, "--reward_label", "POSITIVE",
            "--model_name_or_path", model_dir, "--prompt_length", "2,8", "--completion_length", "4,6",
            "--num_eval_examples", 4, "--num_samples", 2, "--report_to", "none", "--logging_steps", 1]


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_rloo_and_grpo_train_from_the_classifier_and_load_in_steer(method, tmp_path, text_file, sentiment_dir,
                                                                   tiny_model_dirs):
    out = tmp_path / method
    result = run_main("--method", method, *text_flags(text_file, sentiment_dir, tiny_model_dirs["small_tuned"]),
                      "--num_generations", 2, "--per_device_train_batch_size", 4, "--max_steps", 2,
                      "--learning_rate", 1e-3, "--output_dir", out)
    final = out / "final"
    m = result["metrics"]
    assert {"reward", "positive_rate", "distinct_1", "distinct_2", "new_tokens"} <= set(m["after"])
    lengths = m["prompt_lengths"]
    assert 2 <= lengths["prompt_tokens_min"] and lengths["prompt_tokens_max"] <= 8
    assert 4 <= lengths["completion_tokens_min"] and lengths["completion_tokens_max"] <= 6
    config = json.loads((final / "rl_tune_config.json").read_text())
    assert config["prompt_length"] == "2,8" and config["completion_length"] == "4,6" and config["method"] == method
    log = json.loads((final / "trainer_state.json").read_text())["log_history"]
    assert any("rewards/sentiment/mean" in h for h in log)
    # TRL sampled at most the drawn lengths
    assert all(h["completions/max_length"] <= 6 for h in log if "completions/max_length" in h)
    samples = [json.loads(line) for line in (final / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all("reward" in s and "completion" in s for s in samples)
    assert any(not torch.equal(a, b) for a, b in zip(weights(tiny_model_dirs["small_tuned"]).values(),
                                                      weights(final).values()))
    assert steer_main(*parse_config([ModelArguments, SteerArguments, TuneArguments], [
        "--large_model", str(tiny_model_dirs["large"]), "--small_base_model", str(tiny_model_dirs["small_base"]),
        "--small_tuned_model", str(final), "--large_device", "cpu", "--no_use_template", "--prompt", "Film 3. The",
        "--max_new_tokens", "3"])) is not None


@pytest.mark.exactness
def test_ppo_resumes_after_a_kill_to_the_uninterrupted_weights(tmp_path, text_file, sentiment_dir, tiny_model_dirs):
    flags = ["--method", "ppo", *text_flags(text_file, sentiment_dir, tiny_model_dirs["small_tuned"]),
             "--per_device_train_batch_size", 4, "--learning_rate", 1e-3, "--save_steps", 2, "--save_total_limit", 5,
             "--max_steps", 4, "--num_eval_examples", 0, "--num_samples", 0]
    whole = run_main(*flags, "--output_dir", tmp_path / "whole")
    assert whole["metrics"]["global_step"] == 4 and (tmp_path / "whole" / "checkpoint-2" / "value_head.safetensors"
                                                     ).is_file()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")  # killed after step 2
    (tmp_path / "part" / "checkpoint-3").mkdir()  # and halfway through writing the next checkpoint
    resumed = run_main(*flags, "--output_dir", tmp_path / "part")
    assert resumed["resumed_from"].name == "checkpoint-2" and resumed["metrics"]["global_step"] == 4
    a, b = weights(tmp_path / "whole" / "final"), weights(tmp_path / "part" / "final")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    log = json.loads((tmp_path / "part" / "final" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in log] == [1, 2, 3, 4]  # the history before the kill came back with the checkpoint
    assert run_main(*flags, "--output_dir", tmp_path / "part")["status"] == "done"


def test_ppo_with_lora_writes_an_adapter_that_loads_in_evaluation(tmp_path, text_file, sentiment_dir, jsonl_file,
                                                                  tiny_model_dirs):
    result = run_main("--method", "ppo", *text_flags(text_file, sentiment_dir, tiny_model_dirs["small_tuned"]),
                      "--per_device_train_batch_size", 4, "--max_steps", 2, "--learning_rate", 1e-2, "--use_lora",
                      "--lora_r", 4, "--num_eval_examples", 2, "--output_dir", tmp_path / "lora")
    final = result["final_dir"]
    assert (final / "adapter_config.json").is_file()
    base, tuned = weights(tiny_model_dirs["small_tuned"]), weights(final)  # the adapter merged on load
    assert any(not torch.allclose(base[k], tuned[k]) for k in base)
    metrics = evaluation.main(*parse_config(ARGUMENT_TYPES, [
        "--dataset_path", str(jsonl_file), "--num_examples", "2", "--max_new_tokens", "3", "--bootstrap_samples", "20",
        "--small_tuned_model", str(final), "--systems", "small_tuned", "--output_dir", str(tmp_path / "eval")]))
    assert metrics is not None and (tmp_path / "eval" / "metrics.json").is_file()


def test_rloo_resumes_from_the_last_complete_checkpoint(tmp_path, text_file, sentiment_dir, tiny_model_dirs):
    flags = ["--method", "rloo", *text_flags(text_file, sentiment_dir, tiny_model_dirs["small_tuned"]),
             "--num_generations", 2, "--per_device_train_batch_size", 4, "--learning_rate", 1e-3, "--save_steps", 2,
             "--save_total_limit", 5, "--max_steps", 4, "--num_eval_examples", 0, "--num_samples", 0]
    run_main(*flags, "--output_dir", tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "part" / "checkpoint-2")  # killed after step 2
    (tmp_path / "part" / "checkpoint-3").mkdir()  # and halfway through writing the next checkpoint
    resumed = run_main(*flags, "--output_dir", tmp_path / "part")
    assert resumed["resumed_from"].name == "checkpoint-2" and resumed["metrics"]["global_step"] == 4
    assert not (tmp_path / "part" / "checkpoint-3").exists() and (tmp_path / "part" / "final").is_dir()


def test_bad_reward_flags_fail_in_one_line(tmp_path, text_file, sentiment_dir, tiny_model_dirs):
    common = ["--method", "ppo", "--text_dataset", text_file, "--model_name_or_path", tiny_model_dirs["small_tuned"],
              "--output_dir", tmp_path / "o"]
    cases = [(["--reward_model", sentiment_dir], "has 2 classes (0: NEGATIVE, 1: POSITIVE); pass --reward_label"),
             (["--reward_model", sentiment_dir, "--reward_label", "happy"], "no label 'happy'"),
             (["--reward", "rouge:1"], "compares with a reference"),
             (["--reward", "eos:1", "--reward_label", "POSITIVE"], "pass --reward_model"),
             (["--reward_model", sentiment_dir, "--reward_label", "1", "--prompt_length", "8,2"], "--prompt_length"),
             (["--reward_model", tmp_path / "nope", "--reward_label", "1"], "does not exist")]
    for extra, words in cases:
        with pytest.raises(UsageError, match=words.replace("(", r"\(").replace(")", r"\)")):
            run_main(*common, *extra)
    assert not (tmp_path / "o" / "final").exists()


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo"])
def test_every_reward_method_hands_its_trainer_the_class_asked_for(method, tmp_path, text_file, sentiment_dir,
                                                                     tiny_model_dirs, tiny_tokenizer):
    """TRL would load a reward path with num_labels=1 and read logits[:, 0] (NEGATIVE); each trainer gets instead the
    function that scores POSITIVE."""
    args, model_args, training_args = parse_args([str(a) for a in [
        "--method", method, *text_flags(text_file, sentiment_dir, tiny_model_dirs["small_tuned"]),
        "--per_device_train_batch_size", 4, "--max_steps", 1, "--output_dir", tmp_path / "o",
        *(["--num_generations", 2] if method != "ppo" else [])]])
    rows, _, _, spec = prepare(args, model_args, training_args, tiny_tokenizer)
    setup = load_rewards(args, spec, tiny_tokenizer, training_args)
    model = load_causal_lm(str(tiny_model_dirs["small_tuned"]), device="cpu")
    trainer = build_trainer(args, model, tiny_tokenizer, training_args, rows, setup)
    (reward,) = trainer.rewards if method == "ppo" else trainer.reward_funcs
    texts = ["Film 1. The paper is good.", "Film 2. Reject."]
    classifier = load_causal_lm(str(sentiment_dir), dtype="float32", device="cpu", head={"num_labels": 2})
    with torch.no_grad():
        logits = classifier(**tiny_tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")).logits
    assert reward(prompts=["Film 1.", "Film 2."], completions=[" The paper is good.", " Reject."]) == pytest.approx(
        logits[:, 1].tolist(), abs=1e-5)  # full text (prompt + completion), the POSITIVE logit
