"""Measuring the policy before and after: greedy samples, ROUGE and repetition, pair margins."""

from __future__ import annotations

from proxytune.models.loading import vocab_size_of
from proxytune.steering.scoring import score_targets
from proxytune.task.processing import tokenize_example
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_prompt
from proxytune.task.text_metrics import distinct_n, make_rouge_scorer, repetition_rate, score_rouge
from proxytune.training.final import generate_samples


def build_prompts(papers: list[dict], tokenizer, budget: int,
                  template: PromptTemplate = DEFAULT_TEMPLATE) -> list[dict]:
    """GRPO's rows: {prompt (the template, reviews cut to `budget` tokens), reference, example_id}."""
    rows = []
    for paper in papers:
        prompt, _ = build_prompt(paper["reviews"], tokenizer, budget, template)
        rows.append({"prompt": prompt, "reference": paper["Output"], "example_id": paper["example_id"]})
    return rows


def eval_samples(papers: list[dict], tokenizer, prompt_budget: int,
                 template: PromptTemplate = DEFAULT_TEMPLATE) -> list[dict]:
    """generate_samples' (proxytune.training.final) inputs for `papers`."""
    out = []
    for paper in papers:
        prompt, _ = build_prompt(paper["reviews"], tokenizer, prompt_budget, template)
        out.append({"id": paper["example_id"], "prompt": prompt, "reference": paper["Output"],
                    "prompt_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"]})
    return out


def evaluate_policy(model, tokenizer, papers: list[dict], max_length: int, max_new_tokens: int,
                    batch_size: int = 8, template: PromptTemplate = DEFAULT_TEMPLATE) -> dict[str, float]:
    """Greedy outputs of `papers` (ROUGE-L F1 x 100, share ending with EOS, share of repeated 3-grams: evaluation.py's
    measures) and the reference's NLL per token (the training target, scored as evaluation.py does)."""
    import torch


    if not papers:
        return {}
    generated = generate_samples(model, tokenizer,
                                 eval_samples(papers, tokenizer, max_length - max_new_tokens, template),
                                 max_new_tokens, batch_size)
    scorer = make_rouge_scorer()
    scored = [ex for p in papers if (ex := tokenize_example({"reviews": p["reviews"], "Output": p["Output"]},
                                                           tokenizer, max_length, template))]
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


def sample_continuations(model, tokenizer, rows: list[dict], seed: int, batch_size: int = 16) -> list[dict]:
    """One sampled continuation (temperature 1, no top-k/top-p: the policy's own distribution, as the rollouts) of
    each row's prompt, `completion_length` new tokens at most, stopping at EOS. Seeded; the global RNG is left as it
    was. -> [{id, prompt, completion, completion_ids, stopped_with_eos}]."""
    import torch

    device = next(model.parameters()).device
    vocab_rows = model.get_output_embeddings().weight.shape[0]
    was_training = model.training
    model.eval()
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            enc = tokenizer([r["prompt"] for r in chunk], add_special_tokens=False, padding=True,
                            padding_side="left", return_tensors="pt").to(device)
            generated = model.generate(**enc, do_sample=True, top_k=0, top_p=1.0,
                                       max_new_tokens=max(r["completion_length"] for r in chunk),
                                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                       suppress_tokens=list(range(len(tokenizer), vocab_rows)) or None)
            for r, ids in zip(chunk, generated[:, enc["input_ids"].shape[1]:].tolist()):
                ids = ids[:r["completion_length"]]
                stopped = tokenizer.eos_token_id in ids
                ids = ids[:ids.index(tokenizer.eos_token_id) + 1] if stopped else ids
                out.append({"id": r["example_id"], "prompt": r["prompt"], "completion_ids": ids,
                            "completion": tokenizer.decode(ids, skip_special_tokens=True), "stopped_with_eos": stopped})
    model.train(was_training)
    return out


def evaluate_rewards(model, tokenizer, rows: list[dict], rewards: list, weights: list[float], classifier, seed: int,
                     ) -> tuple[dict[str, float], list[dict]]:
    """Held-out text prompts continued by sampling and scored: the weighted reward's mean, each reward's mean, the
    share the classifier puts in --reward_label's class (positive_rate), distinct-1/2 and length (reward hacking shows
    there first). -> (summary, the samples with their reward)."""
    if not rows:
        return {}, []
    samples = sample_continuations(model, tokenizer, rows, seed)
    prompts, texts = [s["prompt"] for s in samples], [s["completion"] for s in samples]
    ids = [s["completion_ids"] for s in samples]
    per_function = [function(prompts=prompts, completions=texts, completion_ids=ids) for function in rewards]
    total = [sum(w * r[i] for w, r in zip(weights, per_function)) for i in range(len(samples))]
    n = len(samples)
    summary = {"examples": n, "reward": sum(total) / n,
               **{f"reward_{getattr(f, '__name__', 'fn')}": sum(r) / n for f, r in zip(rewards, per_function)},
               "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
               "new_tokens": sum(len(x) for x in ids) / n, "eos_rate": sum(s["stopped_with_eos"] for s in samples) / n}
    if classifier is not None and classifier.label is not None:
        summary["positive_rate"] = sum(classifier.is_label(classifier.texts(prompts, texts))) / n
    for sample, reward in zip(samples, total):
        sample["reward"] = reward
        del sample["completion_ids"]
    return summary, samples


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
