"""bench/sentiment_lab.py (the Mini-ChatGPT recipe offline): the smoke profile end to end on a tiny steering lab and
tiny reviews (classifiers, RLOO, PPO, L_rl, six evaluation.py runs, the record and the figure), its caching, the split's
halves, the targets' paired arithmetic against a hand count; and evaluation.py sampling the plain systems from the
whole distribution, as the steered system, rl_tune.py and PPO do (the lab compares them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import REVIEWS, make_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import sentiment_lab  # noqa: E402

from proxytune.evaluation.generation import generate_batch  # noqa: E402

WORDS = {"neg": ["awful", "boring", "dreadful", "dull"], "pos": ["great", "wonderful", "superb", "lovely"]}


def reviews(n: int) -> list[dict]:
    """IMDB-shaped rows (split, label, id, rating, text) whose sentiment word follows the label; ids restart per split
    as in the shared file."""
    rows = []
    for i in range(n):
        label = ("neg", "pos")[i % 2]
        rows.append({"split": "train" if i < n // 2 else "test", "label": label, "id": i % (n // 2), "rating": 1,
                     "text": f"This film was {WORDS[label][i % 4]}.<br /><br />{REVIEWS[i % len(REVIEWS)]}"})
    return rows


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A finished steering lab's S and L (tiny, random) and a file of 300 labelled reviews."""
    root = tmp_path_factory.mktemp("sentiment")
    for name, spec in {"small": dict(seed=0, hidden_size=32, num_layers=2),
                       "large": dict(seed=2, hidden_size=64, num_layers=3)}.items():
        path = root / "steering" / name / "final"
        make_tiny_model(len(tiny_tokenizer), padded_vocab=len(tiny_tokenizer) + 12, **spec).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
    data = root / "imdb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reviews(300)), encoding="utf-8")
    return {"steering": root / "steering", "data": data, "work": root / "work"}


def run_lab(tiny_lab, **flags) -> dict:
    args = sentiment_lab.SentimentLabArguments(
        smoke=True, steering_lab_dir=str(tiny_lab["steering"]), work_dir=str(tiny_lab["work"]),
        data=str(tiny_lab["data"]), threads=1, **flags)
    return sentiment_lab.main(args)


def test_smoke_runs_end_to_end_and_a_rerun_reuses_every_stage(tiny_lab):
    work = tiny_lab["work"]
    report = run_lab(tiny_lab)
    labels = [label for label, _, _ in sentiment_lab.system_labels(sentiment_lab.resolve_lab(
        sentiment_lab.SentimentLabArguments(smoke=True, steering_lab_dir=str(tiny_lab["steering"]),
                                            data=str(tiny_lab["data"]))))]
    assert list(report["systems"]) == labels and len(labels) == 11
    for summary in report["systems"].values():
        assert {"judge_positive_rate", "reward_positive_rate", "fluency_perplexity", "distinct_1",
                "distinct_2"} <= set(summary) and summary["n"] == 12
    assert len(report["targets"]) == 6 and all({"gain_over_L", "fluency_vs_L", "fluency_vs_S_rl", "upper_gap"}
                                               <= set(t) for t in report["targets"].values())
    split = json.loads((work / "split" / "split.json").read_text())
    assert split["shared_reviews"] == 0 and split["parts"]["judge"]["rows"] == 64
    info = json.loads((work / "reward" / "final" / "classifier.json").read_text())
    assert info["labels"] == ["negative", "positive"] and info["classification_input"] == "text"
    results = (work / "RESULTS.md").read_text()
    assert "## sentiment_lab" in results and "| L_rl (RLOO on L) |" in results and "target >= 80%" in results
    assert "**Three continuations per system**" in results and (work / "sentiment_lab.png").stat().st_size > 10_000
    commands = (work / "commands.sh").read_text()
    assert commands.count("python fine_tune.py") == 2 and commands.count("python rl_tune.py") == 3
    assert commands.count("python evaluation.py") == 6

    again = run_lab(tiny_lab)  # every stage cached: no script runs, the same figures
    assert (work / "commands.sh").read_text() == commands
    assert all(t["cached"] for t in again["times"].values())
    assert again["systems"]["L"]["judge_positive_rate"] == report["systems"]["L"]["judge_positive_rate"]

    without = run_lab(tiny_lab, large_rl=False)  # other settings: only the run that held L_rl is made again
    added = (work / "commands.sh").read_text()[len(commands):]
    assert added.count("python evaluation.py") == 1 and "--alpha 1.0 --systems small_base" in added
    assert "python rl_tune.py" not in added and "L_rl (RLOO on L)" not in without["systems"]
    assert "gain_share" not in without["targets"]["L steered by (S, S_rloo), alpha=1"]


def test_halves_are_disjoint_and_sized():
    rows = [{"line": i, "label": "pos", "text": f"t{i}"} for i in range(400)]
    profile = sentiment_lab.PROFILES["smoke"]
    parts = sentiment_lab.split_halves(rows, profile, seed=0)
    lines = {name: {r["line"] for r in part} for name, part in parts.items()}
    assert [len(lines[n]) for n in ("reward", "prompts_train", "prompts_eval", "judge")] == [64, 64, 12, 64]
    assert sum(map(len, lines.values())) == len(set().union(*lines.values()))  # no row in two parts
    half_a = lines["reward"] | lines["prompts_train"] | lines["prompts_eval"]
    assert parts == sentiment_lab.split_halves(rows, profile, seed=0) and not half_a & lines["judge"]
    with pytest.raises(sentiment_lab.UsageError, match="needs 140 in half A"):
        sentiment_lab.split_halves(rows[:200], profile, seed=0)
    assert sentiment_lab.clean("Good.<br /><br />Very  good.") == "Good. Very good."


def test_targets_match_a_hand_count():
    """10 prompts: L positive on none, L_rl on 4, steered on 2 of those: a gain share of 0.5; fluency ratios from
    the summed NLL and tokens."""
    def recs(positive: int, nll: float) -> list[dict]:
        return [{"example_id": f"text-{i}", "judge_positive": i < positive, "fluency_nll": nll, "fluency_tokens": 2}
                for i in range(10)]

    records = {"L": recs(0, 2.0), "L_rl (RLOO on L)": recs(4, 2.0), "S_rl (RLOO)": recs(1, 4.0),
               "L steered by (S, S_rloo), alpha=1": recs(2, 3.0)}
    t = sentiment_lab.paired_targets(records, "L steered by (S, S_rloo), alpha=1", 0.95, 200, 0)
    assert t["gain_share"]["mean"] == pytest.approx(0.5) and t["gain_over_L"]["mean"] == pytest.approx(0.2)
    assert t["upper_gap"]["mean"] == pytest.approx(0.4)
    assert t["fluency_vs_L"]["mean"] == pytest.approx(torch.tensor(1.5 - 1.0).exp().item())  # exp(3/2) / exp(2/2)
    assert t["fluency_vs_S_rl"]["mean"] == pytest.approx(torch.tensor(1.5 - 2.0).exp().item())
    lines = sentiment_lab.target_lines({"steered": t}, True)
    assert "50% [" in lines[0] and "missed by 30 points" in lines[0] and "target <= 1.5x: missed by 0.15x" in lines[0]


def test_evaluation_samples_plain_systems_from_the_whole_distribution(tiny_tokenizer):
    """A model whose logits are built, near-uniform and falling with the token id (every hidden state is e_0, and
    logit_i = -0.001 i): GenerationConfig's default top-k (50) would keep ids 0-49 only; sampling from the whole
    distribution, as the steered system does, reaches the rest of the vocabulary."""
    model = make_tiny_model(len(tiny_tokenizer))
    with torch.no_grad():
        norm = model.gpt_neox.final_layer_norm
        norm.weight.zero_()
        norm.bias.zero_()
        norm.bias[0] = 1.0
        out = model.get_output_embeddings().weight  # (V, H)
        out.zero_()
        out[:, 0] = -0.001 * torch.arange(out.shape[0])
    input_ids = torch.tensor([[5, 6, 7]] * 8)  # (B, T)
    settings = {"max_new_tokens": 16, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
                "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    torch.manual_seed(0)
    new = generate_batch("large", {"large": model}, None, input_ids, torch.ones_like(input_ids), settings,
                         tiny_tokenizer, torch.Generator().manual_seed(0))
    assert int(new.max()) >= 50, new  # all 128 below 50: about (1/5)^128 from the whole vocabulary
