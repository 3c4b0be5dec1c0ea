"""Measuring the policy before and after: greedy samples, ROUGE and repetition, pair margins."""

from __future__ import annotations

from proxytune.models.loading import vocab_size_of
from proxytune.steering.scoring import score_targets
from proxytune.task.processing import tokenize_example
from proxytune.task.prompts import build_prompt
from proxytune.task.text_metrics import make_rouge_scorer, repetition_rate, score_rouge
from proxytune.training.final import generate_samples


def build_prompts(papers: list[dict], tokenizer, budget: int) -> list[dict]:
    """GRPO's rows: {prompt (the template, reviews cut to `budget` tokens), reference, example_id}."""
    rows = []
    for paper in papers:
        prompt, _ = build_prompt(paper["reviews"], tokenizer, budget)
        rows.append({"prompt": prompt, "reference": paper["Output"], "example_id": paper["example_id"]})
    return rows


def eval_samples(papers: list[dict], tokenizer, prompt_budget: int) -> list[dict]:
    """generate_samples' (proxytune.training.final) inputs for `papers`."""
    out = []
    for paper in papers:
        prompt, _ = build_prompt(paper["reviews"], tokenizer, prompt_budget)
        out.append({"id": paper["example_id"], "prompt": prompt, "reference": paper["Output"],
                    "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"]})
    return out


def evaluate_policy(model, tokenizer, papers: list[dict], max_length: int, max_new_tokens: int,
                    batch_size: int = 8) -> dict[str, float]:
    """Greedy outputs of `papers` (ROUGE-L F1 x 100, share ending with EOS, share of repeated 3-grams: evaluation.py's
    measures) and the reference's NLL per token (the training target, scored as evaluation.py does)."""
    import torch


    if not papers:
        return {}
    generated = generate_samples(model, tokenizer, eval_samples(papers, tokenizer, max_length - max_new_tokens),
                                           max_new_tokens, batch_size)
    scorer = make_rouge_scorer()
    scored = [ex for p in papers if (ex := tokenize_example({"reviews": p["reviews"], "Output": p["Output"]},
                                                           tokenizer, max_length))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        nll = score_targets({"policy": model}, [ex["input_ids"][:ex["prompt_length"]] for ex in scored],
                            [ex["input_ids"][ex["prompt_length"]:] for ex in scored],
                            vocab_size=vocab_size_of(tokenizer), batch_size=batch_size,
                            pad_token_id=tokenizer.pad_token_id, show_progress=False)
    model.train(was_training)
    n = len(generated)
    return {"examples": n,
            "rougeL": sum(score_rouge(scorer, g["generation"], g["reference"])["rougeL"] for g in generated) / n,
            "eos_rate": sum(g["stopped_with_eos"] for g in generated) / n,
            "repetition": sum(repetition_rate(g["generation"], 3) for g in generated) / n,
            "words": sum(len(g["generation"].split()) for g in generated) / n,
            "distinct_outputs": len({g["generation"] for g in generated}) / n,
            "reference_nll": float(nll["policy"].sum() / nll["n_tokens"].sum()) if scored else float("nan")}


def pair_margins(model, tokenizer, pairs: list[dict], batch_size: int = 8) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) under `model`, per pair (summed over tokens)."""
    import torch


    if not pairs:
        return []
    prompts = [p["prompt_ids"] for p in pairs]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        kw = dict(vocab_size=vocab_size_of(tokenizer), batch_size=batch_size, pad_token_id=tokenizer.pad_token_id,
                  show_progress=False)
        chosen = score_targets({"m": model}, prompts, [p["chosen_ids"] for p in pairs], **kw)["m"]
        rejected = score_targets({"m": model}, prompts, [p["rejected_ids"] for p in pairs], **kw)["m"]
    model.train(was_training)
    return (rejected - chosen).tolist()  # NLLs: rejected's minus chosen's is chosen's log-prob minus rejected's


def margin_summary(margins: list[float]) -> dict[str, float]:
    if not margins:
        return {}
    return {"pairs": len(margins), "mean_margin": sum(margins) / len(margins),
            "accuracy": sum(m > 0 for m in margins) / len(margins)}


def flat_metrics(metrics: dict) -> dict:
    """{"before": {"eos_rate": 0.1}} -> {"before_eos_rate": 0.1}: the card's results table takes numbers."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{k}": v for k, v in flat_metrics(value).items()})
        else:
            flat[key] = value
    return flat
