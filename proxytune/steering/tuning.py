"""steer.py --tune: search blends by perplexity, decode the candidates, choose one by generation, report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from proxytune.foundation.datafiles import read_data_text
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import atomic_directory, write_json
from proxytune.models.loading import vocab_size_of
from proxytune.models.quantization import describe_quantization, loaded_bits, loaded_quantization
from proxytune.steering.arguments import SteerArguments, TuneArguments
from proxytune.steering.blend import (
    LARGE,
    NEGLIGIBLE_SHARE,
    SMALL_BASE,
    SMALL_TUNED,
    Blend,
    describe_blend,
    is_steering,
)
from proxytune.steering.decoding import model_context
from proxytune.steering.generation import build_prompts, generate_texts
from proxytune.steering.scoring import CACHE_DTYPES, score_targets
from proxytune.steering.search import score_entry, search_blends
from proxytune.task.processing import tokenize_example
from proxytune.task.prompts import DEFAULT_TEMPLATE, PromptTemplate, read_template
from proxytune.task.reviews import clean_text, from_alpaca, reviews_of
from proxytune.task.sources import load_saved_split
from proxytune.task.text_metrics import make_rouge_scorer, score_rouge

logger = logging.getLogger(__name__)


# Generation selection keeps plain proxy-tuning (alpha = 1, the method's own setting) unless a candidate's ROUGE-L gain
# over it on the same papers is clear: the lower end of a one-sided 95% paired bootstrap interval above 0. The best of
# several noisy means is biased upwards (the winner's curse): in the lab, alpha = 1.5 led alpha = 1 by 1.3 ROUGE-L on
# the 16 held-out papers (interval -1.5 to +4.3), trailed it by 0.1 on all 64 validation papers and by 1.2 on the
# 99 test papers (bench/RESULTS.md). Greedy outputs of small models differ a lot from paper to paper.
REFERENCE_CANDIDATE = "proxy-tuning, alpha=1"


SELECTION_CONFIDENCE = 0.95


BOOTSTRAP_SAMPLES = 2000


def load_validation_examples(args: TuneArguments, tokenizer, context: int, seed: int,
                             template: PromptTemplate = DEFAULT_TEMPLATE) -> list[dict]:
    """Validation examples drawn with `seed`, each {prompt_ids, target_ids, reviews, reference}.

    The ids (for scoring) come from processing_meta_review.py's saved dataset (its input_ids / prompt_length, so the
    tokens are exactly those fine-tuning saw) or from a raw Input/Output JSONL, prompted with the same code; targets
    are cut to --max_target_tokens, prompts to fit the context. `reviews` and `reference` (the meta-review text) are
    what the generation stage prompts with and scores against; None where a saved dataset lacks those columns. A saved
    dataset made with another prompt template than `template` is prompted again from its reviews.
    """
    path = Path(args.validation_data)
    if not path.exists():
        raise UsageError(f"--validation_data {path} does not exist; pass processing_meta_review.py's output_dir "
                         "or a JSONL with Input/Output columns")
    if path.is_dir():
        data = load_saved_split(path, args.validation_split, "--validation_data", "--validation_split")
        missing = {"input_ids", "prompt_length"} - set(data.column_names)
        if missing:
            raise UsageError(f"--validation_data {path} lacks columns {sorted(missing)}; run processing_meta_review.py")
        text_columns = [c for c in ("reviews", "Output") if c in data.column_names]
        rows = list(data.select_columns(["input_ids", "prompt_length", *text_columns]))
        if not template.same_as(read_template(path) or DEFAULT_TEMPLATE):
            if len(text_columns) < 2:
                raise UsageError(f"--validation_data {path} was made with another prompt template and lacks the "
                                 "reviews/Output columns to prompt again; process it with --prompt_template "
                                 f"{template.name}")
            rows = [{"Input": row["reviews"], "Output": row["Output"]} for row in rows]
    else:
        rows = []
        for number, line in enumerate(read_data_text(path, "--validation_data").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"--validation_data {path} line {number} is not JSON: {err}") from None
            if isinstance(row, dict) and "Input" not in row and "Output" not in row and "instruction" in row:
                row = from_alpaca(row)
            if not isinstance(row, dict) or "Input" not in row or "Output" not in row:
                raise UsageError(f"--validation_data {path} line {number} needs Input and Output columns (or "
                                 "Alpaca's instruction and output)")
            rows.append(row)
    if not rows:
        raise UsageError(f"--validation_data {path} holds no examples")
    import random

    picked = sorted(random.Random(seed).sample(range(len(rows)), min(args.n_examples, len(rows))))
    examples, n_cut = [], 0
    for i in picked:
        row = rows[i]
        if "input_ids" not in row:
            meta = clean_text(row["Output"], "whitespace") if isinstance(row["Output"], str) else ""
            reviews = reviews_of(row["Input"])
            if not meta or not reviews:
                continue
            tokenized = tokenize_example({"reviews": reviews, "Output": meta}, tokenizer, context, template)
            if tokenized is None:  # the meta-review alone fills the context
                continue
            row = {**tokenized, "reviews": reviews, "Output": meta}
        ids, n_prompt = list(row["input_ids"]), int(row["prompt_length"])
        prompt, target = ids[:n_prompt], ids[n_prompt:][:args.max_target_tokens]
        if len(prompt) + len(target) > context:
            prompt, n_cut = prompt[len(prompt) + len(target) - context:], n_cut + 1
        if prompt and target:
            examples.append({"prompt_ids": prompt, "target_ids": target, "reviews": row.get("reviews"),
                             "reference": row.get("Output")})
    if n_cut:
        logger.warning("%d prompts were longer than the context (%d) and lost their first tokens", n_cut, context)
    if not examples:
        raise UsageError(f"--validation_data {path}: no usable example (empty reviews or meta-reviews)")
    return examples


def candidate_blends(best: dict[str, Blend], alphas: Sequence[float]) -> dict[str, Blend]:
    """What the generation stage decodes: proxy-tuning at alpha = 1 (the reference) and each of `alphas`, then the
    perplexity-best alpha and free blend. A blend whose coefficients all lie within 1e-3 of an earlier candidate's
    is decoded once, under the earlier name."""
    candidates = {f"proxy-tuning, alpha={a:g}": Blend.from_alpha(a) for a in dict.fromkeys([1.0, *alphas])}
    candidates |= {name: best[name] for name in ("proxy-tuning, tuned alpha", "free blend")}
    kept: dict[str, Blend] = {}
    for name, blend in candidates.items():
        same = [k for k, other in kept.items()
                if all(abs(x - y) <= 1e-3 for x, y in zip(blend.coefficients, other.coefficients))]
        if same:
            logger.info("candidate %s is %s's blend; decoded once", name, same[0])
        else:
            kept[name] = blend
    return kept


def decode_candidates(models: dict[str, Any], tokenizer, candidates: dict[str, Blend], examples: list[dict],
                      steer_args: SteerArguments, template: PromptTemplate = DEFAULT_TEMPLATE
                      ) -> tuple[dict[str, list[float]], list[dict]]:
    """Stage 2: decode every candidate on `examples` (steer_args' decoding: greedy by default) and score each output
    by ROUGE-L F1 (x 100, stemmed: evaluation.py's scorer) against the meta-review.
    -> ({candidate: ROUGE-L per example}, one row per candidate and example: prompt, output, ROUGE-L, ...)."""

    budget = model_context(models) - steer_args.max_new_tokens
    if budget < 1:
        raise UsageError(f"--max_new_tokens {steer_args.max_new_tokens} leaves no room for the prompt in the "
                         f"{model_context(models)}-token context; lower it")
    prompts = build_prompts([(ex["reviews"], {}) for ex in examples], tokenizer, budget, True, template)
    scorer = make_rouge_scorer()
    scores, rows = {}, []
    for i, (name, blend) in enumerate(candidates.items(), start=1):
        started = time.perf_counter()
        results = generate_texts(models, tokenizer, prompts, blend, steer_args,
                                 desc=f"candidate {i}/{len(candidates)}: {name}")
        scores[name] = [score_rouge(scorer, r["generation"], ex["reference"])["rougeL"]
                        for r, ex in zip(results, examples)]
        rows += [{"candidate": name, "example": j, "rougeL": score, "prompt": prompt, **r, "reference": ex["reference"]}
                 for j, (prompt, r, score, ex) in enumerate(zip(prompts, results, scores[name], examples))]
        logger.info("candidate %s (%s): ROUGE-L %.2f, EOS %.2f, %.1f s", name, describe_blend(blend),
                    sum(scores[name]) / len(results), sum(r["ended_with_eos"] for r in results) / len(results),
                    time.perf_counter() - started)
    return scores, rows


def generation_figures(scores: dict[str, list[float]], rows: list[dict], seed: int) -> dict[str, dict]:
    """Each candidate's mean ROUGE-L, EOS share and mean new tokens, and its ROUGE-L gain over the reference
    (REFERENCE_CANDIDATE) on the same papers with a paired bootstrap interval ([low, high]: the 5% and 95% points).
    `clearly_better`: low > 0, the bar a candidate must clear to replace the reference (see SELECTION_CONFIDENCE)."""
    reference = torch.tensor(scores[REFERENCE_CANDIDATE], dtype=torch.float64)  # (n,)
    n = reference.shape[0]
    resamples = torch.randint(n, (BOOTSTRAP_SAMPLES, n), generator=torch.Generator().manual_seed(seed))  # (B, n)
    figures = {}
    for name, values in scores.items():
        mine = [r for r in rows if r["candidate"] == name]
        diff = torch.tensor(values, dtype=torch.float64) - reference  # (n,) paired by paper
        means = diff[resamples].mean(dim=1)  # (B,)
        low, high = (float(q) for q in torch.quantile(means, torch.tensor(
            [1 - SELECTION_CONFIDENCE, SELECTION_CONFIDENCE], dtype=torch.float64)))
        figures[name] = {"rougeL": sum(values) / n, "gain": float(diff.mean()), "gain_low": low, "gain_high": high,
                         "clearly_better": name != REFERENCE_CANDIDATE and low > 0,
                         "eos_rate": sum(r["ended_with_eos"] for r in mine) / n,
                         "new_tokens": sum(r["n_new_tokens"] for r in mine) / n, "n_examples": n}
    return figures


def choose_by_generation(entries: dict[str, dict]) -> str:
    """The reference (plain proxy-tuning) unless some candidate generates clearly better (generation_figures); then,
    of those, the best mean ROUGE-L, and on a tie the lower tuning perplexity.
    `choose_by_generation({"proxy-tuning, alpha=1": {...}, "b": {"generation": {"clearly_better": True, ...}}})`
    -> 'b'."""
    better = [name for name, e in entries.items() if e["generation"]["clearly_better"]]
    if not better:
        return REFERENCE_CANDIDATE
    return min(better, key=lambda name: (-round(entries[name]["generation"]["rougeL"], 9), entries[name]["tune_nll"]))


def warn_if_not_steering(name: str, blend: Blend) -> str | None:
    """Log (and return) a warning when a tuned blend is not L steered by the small pair (describe_blend)."""
    if is_steering(blend):
        return None
    message = (f"the {name} is not steering: it is {describe_blend(blend)} ({blend.describe()}); "
               f"a weight under {NEGLIGIBLE_SHARE:.0%} of the largest counts as 0")
    logger.warning(message)
    return message


def tune(models: dict[str, Any], tokenizer, args: TuneArguments, steer_args: SteerArguments,
         template: PromptTemplate = DEFAULT_TEMPLATE) -> tuple[dict, list]:
    """Choose the blend for prompts of `template`. Stage 1: score every validation example once per model, then search
    blends on the cached rows by perplexity. Stage 2 (--select_by generation): decode the candidates on held-out papers,
    keep the best ROUGE-L. -> (report dict, the candidates' generations)."""
    context = model_context(models)
    examples = load_validation_examples(args, tokenizer, context, steer_args.seed, template)
    n = len(examples)
    n_holdout = min(round(n * args.holdout_fraction), n - 1)  # at least one example to tune on
    split = {"tune": examples[:n - n_holdout], "holdout": examples[n - n_holdout:]}
    vocab_size = vocab_size_of(tokenizer)
    n_rows = sum(len(ex["target_ids"]) for ex in examples)
    cache_gb = n_rows * vocab_size * 3 * CACHE_DTYPES[args.cache_dtype].itemsize / 1e9
    logger.info("tuning on %d examples, holding out %d; %d target tokens -> %.2f GB of cached log-prob rows",
                n - n_holdout, n_holdout, n_rows, cache_gb)
    if cache_gb > args.max_cache_gb:
        raise UsageError(f"the log-prob cache would take {cache_gb:.1f} GB > --max_cache_gb {args.max_cache_gb}; "
                         "lower --n_examples or --max_target_tokens, or use --cache_dtype bfloat16")
    generation_examples = []
    if args.select_by == "generation":
        generation_examples = (split["holdout"] or split["tune"])[:args.generation_examples]
        if not split["holdout"]:
            logger.warning("no held-out examples (--holdout_fraction 0): the candidates are decoded on papers the "
                           "perplexity search tuned on")
        if any(ex["reviews"] is None or ex["reference"] is None for ex in generation_examples):
            raise UsageError(f"--validation_data {args.validation_data} has no reviews/Output columns to prompt with "
                             "and score against; write it with processing_meta_review.py, "
                             "or pass --select_by perplexity")

    seconds = {}
    started = time.perf_counter()
    caches = {}
    for part, exs in split.items():
        if exs:
            caches[part] = score_targets(
                models, [ex["prompt_ids"] for ex in exs], [ex["target_ids"] for ex in exs], vocab_size=vocab_size,
                batch_size=steer_args.batch_size, keep_logprobs=(LARGE, SMALL_TUNED, SMALL_BASE),
                cache_dtype=CACHE_DTYPES[args.cache_dtype], pad_token_id=tokenizer.pad_token_id)
    seconds["scoring"] = time.perf_counter() - started
    logger.info("scored in %.1f s", seconds["scoring"])

    started = time.perf_counter()
    entries = {f"{role} (T=1)": score_entry(caches, model=role) for role in models}
    entries["proxy-tuning, alpha=1"] = score_entry(caches, Blend.from_alpha(1.0))
    searched, best = search_blends(caches, args.n_trials, args.candidate_alphas)
    entries |= searched
    seconds["search"] = time.perf_counter() - started
    logger.info("searched in %.1f s", seconds["search"])

    candidates, rows, generation = {}, [], None
    if args.select_by == "generation":
        candidates = candidate_blends(best, args.candidate_alphas)
        for name, blend in candidates.items():
            entries.setdefault(name, score_entry(caches, blend))
        n_tokens = len(candidates) * len(generation_examples) * steer_args.max_new_tokens
        logger.info("stage 2: %d candidates x %d held-out papers x up to %d new tokens = %d steered tokens (%s)",
                    len(candidates), len(generation_examples), steer_args.max_new_tokens, n_tokens,
                    "sampled" if steer_args.do_sample else "greedy")
        started = time.perf_counter()
        scores, rows = decode_candidates(models, tokenizer, candidates, generation_examples, steer_args, template)
        seconds["generation"] = time.perf_counter() - started
        for name, figures in generation_figures(scores, rows, steer_args.seed).items():
            entries[name]["generation"] = figures
        chosen = choose_by_generation({name: entries[name] for name in candidates})
        generation = {"n_examples": len(generation_examples), "examples": "holdout" if split["holdout"] else "tune",
                      "max_new_tokens": steer_args.max_new_tokens, "do_sample": steer_args.do_sample,
                      "metric": "ROUGE-L F1 x 100 (stemmed) against the meta-review, mean over papers",
                      "rule": f"{REFERENCE_CANDIDATE} unless a candidate's paired ROUGE-L gain over it has the lower "
                              f"end of its one-sided {SELECTION_CONFIDENCE:.0%} bootstrap interval above 0; then the "
                              "best of those"}
    else:
        chosen = "free blend"
    chosen_blend = Blend(**entries[chosen]["blend"])
    warnings = [w for w in (warn_if_not_steering(f"chosen blend ({chosen})", chosen_blend),
                            chosen != "free blend" and warn_if_not_steering("perplexity-best free blend",
                                                                            best["free blend"]))
                if w]
    report = {
        "chosen": chosen,
        "selected_by": args.select_by,
        "blend": chosen_blend.to_dict(),
        "system": describe_blend(chosen_blend, loaded_bits(models)),
        "quantization": {role: loaded_quantization(model) for role, model in models.items()},
        "steering": is_steering(chosen_blend),
        "warnings": warnings,
        "candidates": list(candidates),
        "generation": generation,
        "entries": entries,
        "n_examples": {part: len(exs) for part, exs in split.items()},
        "n_target_tokens": {part: int(c["n_tokens"].sum()) for part, c in caches.items()},
        "n_trials": args.n_trials,
        "seconds": seconds,
        "normalisation": f"full vocabulary ({vocab_size} tokens)",
        "validation_data": str(args.validation_data),
        "prompt_template": template.record(),
    }
    return report, rows


def format_report(report: dict) -> str:
    """The tuning report as a small fixed-width table; * marks the chosen blend."""
    entries = report["entries"].values()
    has_holdout = any("holdout_ppl" in e for e in entries)
    has_generation = any("generation" in e for e in entries)
    header = f"{'model / blend':36} {'w_L':>6} {'w_tuned':>7} {'w_base':>6} {'T_L':>5} {'T_S':>5} {'tune ppl':>9}"
    header += f" {'holdout ppl':>11}" if has_holdout else ""
    header += f" {'ROUGE-L':>7} {'EOS':>4}  {'vs alpha=1 [90% CI]':<20}" if has_generation else ""
    lines = [header.rstrip(), "-" * len(header.rstrip())]
    for name, e in report["entries"].items():
        b = e["blend"]
        cells = ("{:>6.3g} {:>7.3g} {:>6.3g} {:>5.3g} {:>5.3g}".format(
            b["large_weight"], b["tuned_weight"], b["base_weight"], b["large_temperature"], b["small_temperature"])
            if b else f"{'':>6} {'':>7} {'':>6} {'':>5} {'':>5}")
        mark = "*" if name == report.get("chosen") else " "
        line = f"{mark}{name:35} {cells} {e['tune_ppl']:>9.3f}"
        line += f" {e['holdout_ppl']:>11.3f}" if has_holdout else ""
        if "generation" in e:
            g = e["generation"]
            line += (f" {g['rougeL']:>7.2f} {g['eos_rate']:>4.2f}  {g['gain']:+.2f} "
                     f"[{g['gain_low']:+.2f}, {g['gain_high']:+.2f}]")
        lines.append(line.rstrip())
    generation = report.get("generation")
    papers = f"{generation['n_examples']} {generation['examples']} papers" if generation else ""
    how = ("the lowest tuning perplexity" if not generation
           else f"no candidate's ROUGE-L gain over it is clear on {papers}" if report["chosen"] == REFERENCE_CANDIDATE
           else f"the best ROUGE-L of the candidates clearly better than alpha=1 on {papers}")
    lines.append(f"chosen: {report['chosen']} = {report.get('system', '?')} ({how})")
    quantized = {role: q for role, q in (report.get("quantization") or {}).items() if q}
    if quantized:
        lines.append("tuned on quantised models: " + "; ".join(f"{role} {describe_quantization(q)}"
                                                                 for role, q in quantized.items()))
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def write_tune_outputs(report: dict, rows: list[dict], config: dict, output_dir: str, overwrite: bool) -> None:
    """blend.json (the chosen blend, the models it was tuned with, a summary), tune_report.json (every entry) and,
    with generation selection, candidate_generations.jsonl (every candidate's outputs and ROUGE-L)."""
    chosen = report["entries"][report["chosen"]]
    summary = {k: v for k, v in chosen.items() if k not in ("blend", "system")} | {
        k: report[k] for k in ("chosen", "selected_by", "warnings", "n_examples", "validation_data")}
    with atomic_directory(output_dir, overwrite=overwrite) as tmp:
        Blend(**report["blend"]).save(tmp / "blend.json", report=summary, models=report.get("models"),
                                      system=report.get("system"), prompt_template=report.get("prompt_template"))
        write_json(tmp / "tune_report.json", {**report, "config": config})
        if rows:
            with open(tmp / "candidate_generations.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    logger.info("wrote %s and %s", Path(output_dir) / "blend.json", Path(output_dir) / "tune_report.json")
