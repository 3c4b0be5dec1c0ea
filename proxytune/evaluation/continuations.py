"""evaluation.py --text_dataset: every system continues prompts that have no reference (the first N tokens of held-out
texts, as rl_tune.py builds them), and the continuations are scored on their own: a reward classifier's positive rate
and mean score, an independent judge classifier's positive rate, their perplexity under a fluency model, distinct-1/2/3,
the share ending with EOS and their length, each with bootstrap intervals over the prompts. The outputs are those of a
meta-review run: metrics.json, predictions.jsonl, the workbook (the prompt in its reviews column, no reference),
ratings.jsonl and a figure."""

from __future__ import annotations

import datetime
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from proxytune.evaluation.arguments import (
    SYSTEM_ROLES,
    ContinuationArguments,
    GenerationArguments,
    ModelArguments,
    OutputArguments,
)
from proxytune.evaluation.generation import cut_at_eos, generate_batch
from proxytune.evaluation.outputs import plot_systems, resolve_pairwise, write_jsonl_atomically
from proxytune.evaluation.shards import library_versions
from proxytune.evaluation.systems import (
    describe_system,
    load_blend,
    load_models,
    resolve_decoding,
    resolve_models,
    resolve_systems,
)
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import write_json
from proxytune.foundation.progress import progress_bar
from proxytune.foundation.statistics import bootstrap_interval, resample_indices
from proxytune.models.loading import load_causal_lm, load_tokenizer, vocab_size_of
from proxytune.models.quantization import loaded_bits, loaded_quantization
from proxytune.steering.decoding import left_pad, model_context
from proxytune.steering.scoring import score_targets
from proxytune.task.papers import DataArguments, select_examples
from proxytune.task.text_metrics import distinct_shares
from proxytune.training.classifier_scores import ClassifierReward, load_reward_model
from proxytune.training.text_prompts import load_prompt_texts, parse_token_range, text_prompt_rows
from proxytune.workbook.judgments import export_judgments
from proxytune.workbook.writer import BookOptions, write_workbook

logger = logging.getLogger(__name__)


DISTINCT_NS = (1, 2, 3)


# metrics.json's per-system figures, in the log table's order; the shares (in [0, 1]) are also drawn in FIGURE.
CONTINUATION_METRICS = ("reward_positive_rate", "reward_score", "judge_positive_rate", "fluency_perplexity",
                        *(f"distinct_{n}" for n in DISTINCT_NS), "eos_share", "new_tokens", "words")
SHARE_METRICS = ("reward_positive_rate", "judge_positive_rate", *(f"distinct_{n}" for n in DISTINCT_NS), "eos_share")


FIGURE = "shares_by_system.png"


def build_prompts(cont_args: ContinuationArguments, data_args: DataArguments, tokenizer) -> tuple[list[dict], int]:
    """(prompts, number of held-out texts): --num_examples of --text_dataset's held-out texts (a seeded sample, in
    their order), each cut to its first N tokens (rl_tune.py's text_prompt_rows, seeded by --seed). A prompt is
    {example_id ("text-<position among the held-out texts>", stable across runs for the workbook's ratings),
    position, prompt, prompt_ids, completion_length (drawn, or None: --max_new_tokens)}."""
    prompt_range = parse_token_range(cont_args.prompt_length, "--prompt_length")
    drawn = cont_args.completion_length is not None
    completion_range = parse_token_range(cont_args.completion_length, "--completion_length") if drawn else (1, 1)
    source = SimpleNamespace(text_dataset=cont_args.text_dataset, text_column=cont_args.text_column,
                             validation_split_percentage=cont_args.validation_split_percentage, max_train_samples=None)
    _, heldout = load_prompt_texts(source, data_args.seed)
    positions = select_examples(len(heldout), data_args.num_examples, data_args.seed)
    rows = text_prompt_rows([heldout[i] for i in positions], tokenizer, prompt_range, completion_range,
                            data_args.seed)
    prompts = []
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        if ids:
            prompts.append({"example_id": f"text-{positions[int(row['example_id'])]}", "position": len(prompts),
                            "prompt": row["prompt"], "prompt_ids": ids,
                            "completion_length": row["completion_length"] if drawn else None})
    if not prompts:
        raise UsageError(f"--text_dataset {cont_args.text_dataset} has no held-out text of at least {prompt_range[0]} "
                         f"tokens among the {len(positions)} drawn; check --text_column, --prompt_length and "
                         "--validation_split_percentage")
    return prompts, len(heldout)


def generate_continuations(system: str, prompts: list[dict], models: dict[str, Any], blend, settings: dict,
                           tokenizer, batch_size: int, seed: int, progress=None,
                           speculative: bool = True) -> list[dict]:
    """One record per prompt, in the order given: the continuation (`prediction`, decoded as generated, leading space
    kept, so that prompt + prediction is the text), cut at the first EOS and at the prompt's completion_length (else
    settings' max_new_tokens). A batch generates up to its longest draw: the first n tokens of a longer continuation
    are a continuation of n tokens, greedy or sampled (rl_tune.py cuts its completions the same way)."""
    import torch

    torch.manual_seed(seed)
    device = models[SYSTEM_ROLES[system][0]].device
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]["prompt_ids"]))  # less padding per batch
    records: list[dict | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        limits = [prompts[i]["completion_length"] or settings["max_new_tokens"] for i in batch]
        input_ids, attention_mask = left_pad([prompts[i]["prompt_ids"] for i in batch], tokenizer.pad_token_id)
        new_tokens = generate_batch(system, models, blend, input_ids.to(device), attention_mask.to(device),
                                    {**settings, "max_new_tokens": max(limits)}, tokenizer, generator, speculative)
        for i, limit, row in zip(batch, limits, new_tokens.tolist()):  # row: (<= max(limits),) new token ids
            tokens, ended = cut_at_eos(row[:limit], tokenizer.eos_token_id)
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            records[i] = {"example_id": prompts[i]["example_id"], "system": system, "prompt": prompts[i]["prompt"],
                          "prediction": text, "new_tokens": len(tokens), "ended_with_eos": ended,
                          "completion_length": limit, "prompt_tokens": len(prompts[i]["prompt_ids"]),
                          "words": len(text.split())}
        if progress is not None:
            progress.update(len(batch))
    return records


def load_classifiers(cont_args: ContinuationArguments, device: str) -> tuple[ClassifierReward | None,
                                                                             ClassifierReward | None]:
    """(reward classifier, judge classifier), each None when not given; a label they do not have fails here, before
    any generation. The judge must have classes: its figure is a positive rate."""
    reward = judge = None
    if cont_args.reward_model:
        reward = load_reward_model(cont_args.reward_model, cont_args.reward_label, cont_args.reward_score,
                                   cont_args.reward_input, device=device)
    if cont_args.judge_classifier:
        judge = load_reward_model(cont_args.judge_classifier, cont_args.judge_label or cont_args.reward_label, "logit",
                                  cont_args.reward_input, device=device, flag="--judge_classifier",
                                  label_flag="--judge_label")
        if judge.label is None:
            raise UsageError(f"--judge_classifier {cont_args.judge_classifier} has one output (a score), not classes; "
                             "judge_positive_rate needs a classifier with classes")
    return reward, judge


def read_classifier(classifier: ClassifierReward, records: list[dict], prefix: str, with_score: bool) -> None:
    """Add `{prefix}_positive` (its top class is the asked-for one; None for a one-output head) and, `with_score`,
    `{prefix}_score` to every record, from one pass of the classifier over what it reads (prompt + continuation, or
    the continuation)."""
    z = classifier.logits(classifier.texts([r["prompt"] for r in records], [r["prediction"] for r in records]))
    positive = (z.argmax(-1) == classifier.label).tolist() if classifier.label is not None else [None] * len(records)
    scores = classifier.score_logits(z) if with_score else [None] * len(records)
    for rec, is_label, score in zip(records, positive, scores):
        rec[f"{prefix}_positive"] = is_label
        if with_score:
            rec[f"{prefix}_score"] = score


def score_fluency(model, tokenizer, records: list[dict], batch_size: int) -> None:
    """Add fluency_nll (summed NLL of the continuation's tokens given the prompt's, float64), fluency_tokens and
    fluency_perplexity = exp(nll / tokens) to every record. Both texts are tokenized by the fluency model's own
    tokenizer, separately (the boundary is where the prompt ends); no EOS is scored: fluency is of the text. An empty
    continuation has no tokens and no perplexity (None)."""
    context = model_context({"fluency": model})
    items = []
    for k, rec in enumerate(records):
        # A prompt its tokenizer makes nothing of still needs a first position to predict from: EOS, a text's start.
        prompt_ids = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        target_ids = tokenizer(rec["prediction"], add_special_tokens=False)["input_ids"][:context - len(prompt_ids)]
        rec.update(fluency_nll=None, fluency_tokens=len(target_ids), fluency_perplexity=None)
        if target_ids:
            items.append((k, prompt_ids, target_ids))
    if not items:
        return
    scored = score_targets({"fluency": model}, [p for _, p, _ in items], [t for _, _, t in items],
                           vocab_size=vocab_size_of(tokenizer), batch_size=batch_size,
                           pad_token_id=tokenizer.pad_token_id)
    for (k, _, target_ids), nll in zip(items, scored["fluency"].tolist()):
        records[k]["fluency_nll"] = nll
        records[k]["fluency_perplexity"] = math.exp(nll / len(target_ids))


def ratio_statistic(numerator, denominator, empty: float = 0.0):
    """positions (S, N) -> (S,) sum(numerator) / sum(denominator) over each row's examples; `empty` where the
    denominator sums to 0."""
    import numpy as np

    def stat(ix):
        den = denominator[ix].sum(-1)
        return np.divide(numerator[ix].sum(-1), den, out=np.full(den.shape, empty), where=den > 0)

    return stat


def mean_interval(values: list[float], interval) -> dict[str, float]:
    """The mean of per-prompt `values` with `interval`'s bootstrap (positions (S, N) -> (S,) statistic)."""
    import numpy as np

    x = np.array(values)  # (N,)
    return interval(lambda ix: x[ix].mean(-1))


def summarize_continuations(records: list[dict], systems: list[str], n_prompts: int, samples: int, confidence: float,
                            seed: int) -> dict[str, dict[str, Any]]:
    """{system: {metric: {mean, ci_low, ci_high}, "n": n}} with a percentile bootstrap over the prompts, the same
    resamples for every system and metric (paired intervals). `records` are in prompt order for each system.

    Rates and means are per continuation. fluency_perplexity is corpus-level, exp(total NLL / total tokens), as the
    reference perplexity is. distinct_n (distinct word n-grams / all word n-grams over all of a system's continuations)
    is not a mean, so it is written as one: each occurrence of an n-gram seen c times counts 1/c of a distinct one
    (task.text_metrics.distinct_shares), and a resample sums these shares and the n-gram counts of the continuations
    it draws; the point value is exactly distinct_n, and the interval shows how it moves with the prompts drawn.
    """
    import numpy as np

    idx = resample_indices(n_prompts, samples, seed)
    interval = lambda stat: bootstrap_interval(stat, idx, confidence)  # noqa: E731
    out = {}
    for system in systems:
        recs = [r for r in records if r["system"] == system]
        summary: dict[str, Any] = {"n": len(recs)}
        mean_of = lambda key: mean_interval([float(r[key]) for r in recs], interval)  # noqa: E731
        if recs[0].get("reward_positive") is not None:
            summary["reward_positive_rate"] = mean_of("reward_positive")
        if recs[0].get("reward_score") is not None:
            summary["reward_score"] = mean_of("reward_score")
        if recs[0].get("judge_positive") is not None:
            summary["judge_positive_rate"] = mean_of("judge_positive")
        if "fluency_tokens" in recs[0] and any(r["fluency_tokens"] for r in recs):
            nll = np.array([r["fluency_nll"] or 0.0 for r in recs])
            tokens = np.array([r["fluency_tokens"] for r in recs], dtype=float)
            per_token = ratio_statistic(nll, tokens, empty=float("nan"))  # a resample of empty continuations: NaN
            summary["fluency_perplexity"] = interval(lambda ix: np.exp(per_token(ix)))
            summary["fluency_tokens"] = int(tokens.sum())
        texts = [r["prediction"] for r in recs]
        for n in DISTINCT_NS:
            shares, counts = (np.array(x, dtype=float) for x in distinct_shares(texts, n))
            summary[f"distinct_{n}"] = interval(ratio_statistic(shares, counts))
        summary["eos_share"] = mean_of("ended_with_eos")
        summary["new_tokens"] = mean_of("new_tokens")
        summary["words"] = mean_of("words")
        out[system] = summary
    return out


def notes(out_args: OutputArguments, reward: ClassifierReward | None, judge: ClassifierReward | None,
          cont_args: ContinuationArguments) -> dict[str, str]:
    """metrics.json's `notes`: what each figure is."""
    def label(classifier: ClassifierReward) -> str:
        return classifier.model.config.id2label.get(classifier.label, classifier.label)

    out = {"intervals": f"{out_args.confidence:.0%} percentile bootstrap over the prompts, "
                        f"{out_args.bootstrap_samples} resamples shared by all systems",
           "prompts": f"the first N tokens of held-out texts of {cont_args.text_dataset}, N drawn from "
                      f"{cont_args.prompt_length}; no reference",
           "distinct_n": "distinct word n-grams / all word n-grams over all continuations of a system (0 when they "
                         "hold no n-gram); its interval resamples the continuations with each n-gram occurrence "
                         "counting 1/c of a distinct n-gram (c its count over all of them)",
           "eos_share": "share of continuations that ended with EOS (before their length limit)",
           "new_tokens": "mean tokens per continuation (EOS not counted); words: mean whitespace words",
           "human": "mean rating (1-5) and pairwise win rate (ties count half) from the workbook as read at the start "
                    "of this run, with bootstrap intervals over the judged prompts"}
    if reward is not None:
        read = "prompt + continuation" if reward.reads == "full" else "the continuation"
        out["reward"] = (f"--reward_model {cont_args.reward_model} on {read}: reward_score = mean {reward.score} "
                         + (f"of class '{label(reward)}'; reward_positive_rate = share whose top class it is"
                            if reward.label is not None else "(its one output)"))
    if judge is not None:
        read = "prompt + continuation" if judge.reads == "full" else "the continuation"
        out["judge"] = (f"--judge_classifier {cont_args.judge_classifier} on {read}: judge_positive_rate = share whose "
                        f"top class is '{label(judge)}'")
    if cont_args.fluency_model:
        out["fluency_perplexity"] = (f"exp(total NLL / total tokens) of the continuations given their prompts under "
                                     f"--fluency_model {cont_args.fluency_model} (its own tokenization, EOS not "
                                     "scored); a record's fluency_perplexity is its continuation's own")
    return out


def write_continuation_outputs(records: list[dict], prompts: list[dict], summary: dict, run_info: dict,
                               out_args: OutputArguments, notes_: dict[str, str]) -> dict:
    """The workbook (first: it is the file that can refuse), ratings.jsonl, metrics.json, predictions.jsonl and the
    figure of the shares, in --output_dir. Returns metrics.json's content."""
    systems = list(run_info["systems"])
    out_dir = Path(out_args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The workbook of meta-reviews, as it is: the prompt in the reviews column, no reference.
    examples = [{"example_id": p["example_id"], "position": p["position"], "input": p["prompt"], "reference": "",
                 "prompt_truncated": False} for p in prompts]
    options = BookOptions(review_chars=out_args.review_chars, pairwise=resolve_pairwise(out_args.pairwise, systems),
                          seed=run_info["seed"] if out_args.review_seed is None else out_args.review_seed,
                          bootstrap_samples=out_args.bootstrap_samples, confidence=out_args.confidence)
    book = write_workbook(out_args.workbook_path, records, examples, summary, run_info, options)
    export_judgments(book.judgments, out_dir / "ratings.jsonl")
    metrics = {"n_examples": len(prompts), "systems": summary, "run": run_info,
               "human": {"review_seed": options.seed, "pairwise": options.pairwise, "systems": book.human,
                         "judgments": len(book.judgments.current), "kept": len(book.judgments.kept)},
               "notes": notes_}
    write_json(out_dir / "metrics.json", metrics)
    write_jsonl_atomically(out_dir / "predictions.jsonl", records)
    shares = tuple(m for m in SHARE_METRICS if m in summary[systems[0]])
    plot_systems(out_dir / FIGURE, summary, shares, ylabel="share", title="Shares")
    return metrics


def evaluate_continuations(model_args: ModelArguments, data_args: DataArguments, gen_args: GenerationArguments,
                           out_args: OutputArguments, cont_args: ContinuationArguments, device: str,
                           num_shards: int = 1) -> dict:
    """Load the classifiers, the systems' models and the prompts; generate every system's continuations; score and
    write them. Returns metrics.json's content."""
    if num_shards > 1 or out_args.merge_only:
        raise UsageError("--text_dataset runs in one process: drop --num_shards, --shard_index and --merge_only "
                         "(and torchrun)")
    if out_args.decision_classifier:
        raise UsageError("--decision_classifier compares meta-reviews with their papers' decisions; text prompts have "
                         "neither: drop it with --text_dataset (--reward_model and --judge_classifier read classes)")
    model_args = resolve_models(model_args)
    systems = resolve_systems(model_args)
    decoding = resolve_decoding(gen_args, systems)
    if cont_args.completion_length is not None:  # each continuation is cut at its draw (generate_continuations)
        high = parse_token_range(cont_args.completion_length, "--completion_length")[1]
        decoding = {s: {**settings, "max_new_tokens": high} for s, settings in decoding.items()}
    blend = load_blend(model_args) if "steered" in systems else None
    reward, judge = load_classifiers(cont_args, device)  # a label they lack fails before the models load
    tokenizer, models = load_models(model_args, systems, device)
    fluency = None
    if cont_args.fluency_model:
        fluency = (load_causal_lm(cont_args.fluency_model, dtype=model_args.dtype, device=device,
                                  trust_remote_code=model_args.trust_remote_code, flag="--fluency_model"),
                   load_tokenizer(cont_args.fluency_model, trust_remote_code=model_args.trust_remote_code,
                                  flag="--fluency_model"))
    prompts, n_heldout = build_prompts(cont_args, data_args, tokenizer)
    max_new = max(s["max_new_tokens"] for s in decoding.values())
    longest = max(len(p["prompt_ids"]) for p in prompts)
    context = min(model_context(models), data_args.max_length)
    if longest + max_new > context:
        raise UsageError(f"a prompt of {longest} tokens + {max_new} new tokens exceeds {context} tokens (the models' "
                         "context or --max_length); lower --prompt_length or --completion_length/--max_new_tokens")
    paths = model_args.model_paths()
    bits = loaded_bits(models)
    prompt_tokens = [len(p["prompt_ids"]) for p in prompts]
    run_info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "text_dataset": cont_args.text_dataset, "text_column": cont_args.text_column, "n_examples": len(prompts),
        "heldout_texts": n_heldout, "seed": data_args.seed, "prompt_length": cont_args.prompt_length,
        "completion_length": cont_args.completion_length,
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens),
                          "mean": sum(prompt_tokens) / len(prompt_tokens)},
        "systems": {s: {"model": describe_system(s, paths, blend, bits), "decoding": decoding[s]} for s in systems},
        "blend": blend.to_dict() if blend is not None else None,
        "tokenizer": model_args.tokenizer_name or paths.get("large") or next(iter(paths.values())),
        "reward_model": cont_args.reward_model, "reward_label": cont_args.reward_label,
        "reward_score": cont_args.reward_score, "judge_classifier": cont_args.judge_classifier,
        "judge_label": (cont_args.judge_label or cont_args.reward_label) if judge is not None else None,
        "reward_input": cont_args.reward_input, "fluency_model": cont_args.fluency_model,
        "dtype": model_args.dtype, "device": device,
        "quantization": {role: loaded_quantization(model) or "none" for role, model in models.items()},
        "compute_perplexity": False,  # no reference to score: the workbook's Scores sheet leaves the column out
        "bootstrap_samples": out_args.bootstrap_samples, "confidence": out_args.confidence,
        "versions": library_versions(),
    }
    logger.info("continuing %d prompts of %s (%d held-out texts) with %s; decoding %s; scored by %s",
                len(prompts), cont_args.text_dataset, n_heldout, ", ".join(systems), json.dumps(decoding),
                ", ".join(f"{k} {v}" for k, v in (("--reward_model", cont_args.reward_model),
                                                  ("--judge_classifier", cont_args.judge_classifier),
                                                  ("--fluency_model", cont_args.fluency_model)) if v)
                or "distinct-n, EOS and length only")
    records = []
    with progress_bar(total=len(prompts) * len(systems), desc="generate", unit="prompt") as progress:
        for system in systems:
            progress.set_postfix_str(system)
            records += generate_continuations(system, prompts, models, blend, decoding[system], tokenizer,
                                              gen_args.batch_size, data_args.seed, progress, gen_args.speculative)
    if reward is not None:
        read_classifier(reward, records, "reward", with_score=True)
    if judge is not None:
        read_classifier(judge, records, "judge", with_score=False)
    if fluency is not None:
        score_fluency(*fluency, records, gen_args.batch_size)
    position = {p["example_id"]: p["position"] for p in prompts}
    records.sort(key=lambda r: (position[r["example_id"]], systems.index(r["system"])))
    summary = summarize_continuations(records, systems, len(prompts), out_args.bootstrap_samples,
                                      out_args.confidence, data_args.seed)
    return write_continuation_outputs(records, prompts, summary, run_info, out_args,
                                      notes(out_args, reward, judge, cont_args))
