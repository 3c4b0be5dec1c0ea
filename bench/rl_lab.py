"""Does preference/reward tuning help the lab's S_tuned, and does steering carry it to L? (rl_tune.py on the lab)

    python bench/rl_lab.py --threads 1                 # GRPO, test-split evaluation of both pairs, DPO; records
    python bench/rl_lab.py --threads 1 --only grpo     # or --only dpo
    python bench/rl_lab.py --ci                        # the same path at a few steps and papers, no record

Reads the offline lab's models and data (bench/steering_lab.py; /work/main/outputs/lab or --lab): S, S_tuned, L and the
processed MReD DatasetDict. Writes under --work (git-ignored bench/work/rl_lab) and records in bench/RESULTS.md, each
record replacing this script's earlier record of the same configuration (earlier runs: git log -p bench/RESULTS.md).
A re-run reuses a stage (grpo, eval/S_tuned, eval/S_grpo, dpo_ratings, dpo) only when the settings recorded beside it
(<stage>.stage.json: its command line, the lab's models, the stages it reads) are today's; one made with other settings,
or by an older version that recorded none, runs again, as do the stages that read it, with a log line naming the change.

GRPO: S_tuned (which loops under greedy decoding) is tuned by `rl_tune.py --method grpo` with the built-in rewards;
then `evaluation.py` (the lab's command line, with --systems small_tuned,steered) runs on the test split twice, once
with S_tuned and once with S_grpo as --small_tuned_model, so ROUGE-L, EOS rate, repetition and reference NLL (with the
bootstrap intervals evaluation.py computes) are reported for S alone and for L steered by (S, S_x) at alpha = 1.
The GRPO defaults are the settings bench/rl_sweep.py found to help without collapsing the 1.8M-parameter model
(sampling at temperature 0.5, KL beta 0.1, a length reward in a range a 128-token budget can end inside); its
record shows the settings that collapse it instead.

DPO: ratings simulated by a rule this script knows: S_tuned writes its greedy meta-review and --dpo_samples sampled
ones at each of --dpo_temperatures for each of --dpo_papers training papers; each is rated
1 + 2 * (ended with EOS) + 2 * (1 - share of repeated 3-grams), rounded, and written as evaluation.py's
ratings.jsonl and predictions.jsonl; `rl_tune.py --method dpo --workbook ratings.jsonl` then trains on the pairs
of 75% of the papers and reports the chosen-over-rejected margin on the other 25%, and the greedy EOS rate and
repetition on validation papers before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, argv_flags, fit_stage, lab_stage_times, record  # noqa: E402

import rl_tune
from proxytune.evaluation.generation import cut_at_eos
from proxytune.foundation.cli import setup_logging
from proxytune.models.loading import load_causal_lm, load_tokenizer
from proxytune.preference.arguments import parse_args
from proxytune.task.papers import load_papers, select_examples
from proxytune.task.prompts import build_prompt
from proxytune.task.text_metrics import repetition_rate

DEFAULT_LAB = Path("/work/main/outputs/lab")
LAB_STAGES = ("data", "pretrain_small", "pretrain_large", "finetune_small")  # the lab's stages whose outputs are read
logger = logging.getLogger("rl_lab")


def prepare(name: str, directory: Path, argv: list[str], lab: Path, **upstream: dict) -> dict:
    """The settings of the stage that writes `directory` (its command line less where it writes, when the lab made
    its inputs, the digests of the stages it reads), and its outputs fit to them (bench/_util.prepare_stage): a
    stage made with other settings is deleted, to run again, with one line naming what changed."""
    config = {**argv_flags(argv), "lab": lab_stage_times(lab, LAB_STAGES)}
    config.pop("--output_dir", None)
    return fit_stage(name, directory, config, upstream, logger)


def run_grpo(args, lab: Path, work: Path) -> dict:
    argv = ["--method", "grpo", "--reward", args.reward, "--length_range", args.length_range,
            "--model_name_or_path", str(lab / "small_tuned" / "final"), "--dataset_path", str(lab / "data"),
            "--max_length", "512", "--max_completion_length", "128",
            "--num_generations", str(args.num_generations), "--per_device_train_batch_size",
            str(args.num_generations * args.prompts_per_step), "--temperature", str(args.temperature),
            "--top_k", str(args.top_k),
            "--learning_rate", str(args.grpo_lr), "--beta", str(args.beta), "--max_steps", str(args.grpo_steps),
            "--num_eval_examples", str(args.eval_examples), "--num_samples", "4", "--max_new_tokens", "128",
            "--logging_steps", "5", "--save_steps", "10", "--seed", "42", "--report_to", "none", "--disable_tqdm",
            "true", "--output_dir", str(work / "grpo")]
    config = prepare("grpo", work / "grpo", argv, lab)
    t0 = time.perf_counter()
    result = rl_tune.main(*parse_args(argv))
    return {"metrics": result["metrics"], "final": result["final_dir"], "argv": argv, "config": config,
            "seconds": stage_seconds(work / "grpo", result["status"] == "trained", time.perf_counter() - t0)}


def stage_seconds(directory: Path, ran: bool, seconds: float) -> float | None:
    """The wall time of a stage: measured now, or the one saved when it ran (a re-run reuses the stages that
    finished with the same settings)."""
    path = directory / "bench_seconds.json"
    if ran:
        path.write_text(json.dumps({"seconds": seconds}))
        return seconds
    return json.loads(path.read_text())["seconds"] if path.is_file() else None


def minutes(seconds: float | None) -> str:
    return f"{seconds / 60:.1f} min" if seconds is not None else "time not recorded (a stage of an earlier run)"


def run_evaluation(args, lab: Path, small_tuned: Path, out: Path, **upstream: dict) -> dict:
    """The lab's evaluation.py command line, with --small_tuned_model swapped and the two systems that use it;
    `upstream`: the settings of the stage that made small_tuned, if this script made it."""
    cmd = [sys.executable, str(ROOT / "evaluation.py"), "--small_base_model", str(lab / "small" / "final"),
           "--small_tuned_model", str(small_tuned), "--large_model", str(lab / "large" / "final"),
           "--systems", "small_tuned", "steered", "--alpha", "1.0", "--dataset_path", str(lab / "data"),
           "--split", "test",
           "--seed", "42", "--max_length", "512", "--max_new_tokens", "128", "--batch_size", "16", "--device", "cpu",
           "--bootstrap_samples", "1000", "--pairwise", "none", "--output_dir", str(out)]
    cmd += ["--all_examples", "true"] if args.test_examples == 0 else ["--num_examples", str(args.test_examples)]
    prepare(f"{out.parent.name}/{out.name}", out, cmd[2:], lab, **upstream)
    t0 = time.perf_counter()
    ran = not (out / "metrics.json").is_file()
    if ran:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return {"metrics": json.loads((out / "metrics.json").read_text()), "command": " ".join(cmd[1:]),
            "seconds": stage_seconds(out, ran, time.perf_counter() - t0)}


def cell(summary: dict, key: str, scale: float = 1.0, log: bool = False) -> str:
    """'12.3 [11.0, 13.5]' from evaluation.py's {mean, ci_low, ci_high}; log=True turns perplexity into NLL."""
    m = summary.get(key)
    if not m:
        return "-"
    f = (lambda x: math.log(x)) if log else (lambda x: x * scale)
    return f"{f(m['mean']):.3f} [{f(m['ci_low']):.3f}, {f(m['ci_high']):.3f}]"


def simulate_ratings(args, lab: Path, out: Path) -> tuple[int, int]:
    """Sampled outputs of S_tuned on training papers, rated by the known rule; (ratings, papers) written."""
    import torch


    out.mkdir(parents=True, exist_ok=True)
    if (out / "ratings.jsonl").is_file():
        lines = (out / "ratings.jsonl").read_text().splitlines()
        return len(lines), len({json.loads(x)["example_id"] for x in lines})
    model_dir = lab / "small_tuned" / "final"
    tokenizer, model = load_tokenizer(str(model_dir)), load_causal_lm(str(model_dir), device="cpu")
    papers = load_papers(str(lab / "data"), "train")
    papers = [papers[i] for i in select_examples(len(papers), args.dpo_papers, 42)]
    torch.manual_seed(42)
    ratings, predictions = [], []
    for paper in papers:
        prompt, _ = build_prompt(paper["reviews"], tokenizer, 512 - 128)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        rows = []
        with torch.no_grad():
            # Greedy (0) among the temperatures: the loops greedy decoding writes must be among what is rated,
            # or DPO never sees them rejected and the greedy outputs it is judged on need not move.
            for temperature in args.dpo_temperatures:
                sampled = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
                gen = model.generate(ids, max_new_tokens=128, num_return_sequences=args.dpo_samples if temperature > 0
                                     else 1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **sampled)
                rows += gen[:, ids.shape[1]:].tolist()
        for k, row in enumerate(rows):
            tokens, eos = cut_at_eos(row, tokenizer.eos_token_id)
            text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            rating = max(1, min(5, round(1 + 2 * eos + 2 * (1 - repetition_rate(text, 3)))))
            system = f"sample{k}"
            ratings.append({"type": "rating", "example_id": paper["example_id"], "system": system, "rating": rating,
                            "comment": None, "output": text, "kept": None})
            predictions.append({"example_id": paper["example_id"], "system": system, "prediction": text,
                                "ended_with_eos": eos})
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    (out / "ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ratings))
    return len(ratings), len(papers)


def rated_outputs(args) -> str:
    """'the greedy output and 2 samples at each of temperatures 0.7, 1.0' from --dpo_samples/--dpo_temperatures."""
    hot = [t for t in args.dpo_temperatures if t > 0]
    parts = (["the greedy output"] if len(hot) < len(args.dpo_temperatures) else []) + (
        [f"{args.dpo_samples} samples at each of temperatures {', '.join(f'{t:g}' for t in hot)}"] if hot else [])
    return " and ".join(parts)


def run_dpo(args, lab: Path, work: Path) -> dict:
    # The ratings' settings as rl_lab's flags and the constants simulate_ratings uses.
    simulated = ["--dpo_papers", str(args.dpo_papers), "--dpo_samples", str(args.dpo_samples), "--dpo_temperatures",
                 *map(str, args.dpo_temperatures), "--model_name_or_path", str(lab / "small_tuned" / "final"),
                 "--dataset_path", str(lab / "data"), "--max_length", "512", "--max_new_tokens", "128", "--seed", "42"]
    ratings = prepare("dpo_ratings", work / "dpo_ratings", simulated, lab)
    t0 = time.perf_counter()
    ran = not (work / "dpo_ratings" / "ratings.jsonl").is_file()
    n_ratings, n_papers = simulate_ratings(args, lab, work / "dpo_ratings")
    t_sim = stage_seconds(work / "dpo_ratings", ran, time.perf_counter() - t0)
    argv = ["--method", "dpo", "--workbook", str(work / "dpo_ratings" / "ratings.jsonl"), "--model_name_or_path",
            str(lab / "small_tuned" / "final"), "--dataset_path", str(lab / "data"), "--max_length", "512",
            "--eval_pairs_percentage", "25", "--num_train_epochs", str(args.dpo_epochs),
            "--per_device_train_batch_size", "8", "--learning_rate", str(args.dpo_lr), "--beta", "0.1",
            "--num_eval_examples", str(args.eval_examples),
            "--num_samples", "4", "--max_new_tokens", "128", "--logging_steps", "5", "--save_steps", "50", "--seed",
            "42", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(work / "dpo")]
    if args.ci:
        argv += ["--max_steps", "3", "--min_pairs", "2"]
    prepare("dpo", work / "dpo", argv, lab, dpo_ratings=ratings)
    t1 = time.perf_counter()
    result = rl_tune.main(*parse_args(argv))
    return {"metrics": result["metrics"], "simulate_seconds": t_sim, "ratings": n_ratings, "papers": n_papers,
            "seconds": stage_seconds(work / "dpo", result["status"] == "trained", time.perf_counter() - t1)}


def before_after_rows(label: str, metrics: dict) -> list[tuple]:
    b, a = metrics["before"], metrics["after"]
    return [(label, k, f"{b[k]:.3f}", f"{a[k]:.3f}", f"{a[k] - b[k]:+.3f}") for k in
            ("rougeL", "eos_rate", "repetition", "reference_nll", "words", "distinct_outputs") if k in b and k in a]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab", type=Path, default=DEFAULT_LAB)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "rl_lab")
    parser.add_argument("--only", choices=["grpo", "dpo"], default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reward", default="rouge:2,eos:1,repetition:1,length:2")
    parser.add_argument("--length_range", default="20,60", help="rl_tune.py's --length_range (words).")
    parser.add_argument("--grpo_steps", type=int, default=80)
    parser.add_argument("--grpo_lr", type=float, default=3e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--temperature", type=float, default=0.5)
    parser.add_argument("--top_k", type=int, default=0, help="GRPO sampling's top-k (0 = off): a small k explores "
                        "next to the greedy path, whose outputs are the ones judged")
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--prompts_per_step", type=int, default=2)
    parser.add_argument("--eval_examples", type=int, default=32, help="Validation papers of rl_tune's before/after.")
    parser.add_argument("--test_examples", type=int, default=48, help="Test papers for evaluation.py; 0 = all 99.")
    parser.add_argument("--dpo_papers", type=int, default=64)
    parser.add_argument("--dpo_samples", type=int, default=2)
    parser.add_argument("--dpo_temperatures", type=float, nargs="+", default=[0.0, 0.7, 1.0],
                        help="S_tuned's outputs to rate: --dpo_samples samples at each temperature; "
                             "0 = the greedy output")
    parser.add_argument("--dpo_epochs", type=float, default=2)
    parser.add_argument("--dpo_lr", type=float, default=1e-4)
    parser.add_argument("--no_record", action="store_true")
    parser.add_argument("--ci", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    if args.ci:
        args.grpo_steps, args.eval_examples, args.test_examples, args.dpo_papers, args.no_record = 2, 2, 2, 8, True
        args.work = args.work.with_name("rl_lab_ci")
    if not (args.lab / "small_tuned" / "final").is_dir():
        sys.exit(f"needs the offline lab's models in {args.lab} (python bench/steering_lab.py)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    if args.only in (None, "grpo"):
        grpo = run_grpo(args, args.lab, args.work)
        rows += before_after_rows(f"S_grpo vs S_tuned, greedy, {args.eval_examples} validation papers", grpo["metrics"])
        notes.append(f"GRPO: {grpo['metrics']['global_step']} steps of {args.prompts_per_step} prompts x "
                     f"{args.num_generations} completions (temperature {args.temperature}, <= 128 tokens), rewards "
                     f"{args.reward} (length range {args.length_range} words), lr {args.grpo_lr:g}, beta {args.beta}; "
                     f"{minutes(grpo['seconds'])} (rl_tune.py wall time, its before/after evaluation included), of "
                     f"which training {grpo['metrics']['train_runtime'] / 60:.1f} min (the Trainer's train_runtime).")
        evals = {}
        evals["S_tuned"] = run_evaluation(args, args.lab, args.lab / "small_tuned" / "final",
                                          args.work / "eval" / "S_tuned")
        evals["S_grpo"] = run_evaluation(args, args.lab, grpo["final"], args.work / "eval" / "S_grpo",
                                         grpo=grpo["config"])
        table2 = []
        for name, ev in evals.items():
            for system in ("small_tuned", "steered"):
                s = ev["metrics"]["systems"][system]
                label = name if system == "small_tuned" else f"L steered by (S, {name}), alpha 1"
                table2.append((label, cell(s, "rougeL"), cell(s, "eos_share"), cell(s, "repetition"),
                               cell(s, "perplexity", log=True)))
        for row in table2:
            print(" | ".join(row))
        n_test = evals["S_tuned"]["metrics"]["n_examples"]
        notes.append(f"Test split ({n_test} papers, greedy, 128 new tokens) by evaluation.py, "
                     f"{' and '.join(minutes(e['seconds']) for e in evals.values())}: `python "
                     f"{evals['S_grpo']['command']}`.")
        if not args.no_record:
            record(f"GRPO on the lab's S_tuned, steering with it (test split, {n_test} papers; "
                   "evaluation.py intervals)",
                   table2, ("system", "ROUGE-L [95% CI]", "EOS rate", "repeated 3-grams", "reference NLL/token"),
                   "\n\n".join(notes))
    if args.only in (None, "dpo"):
        dpo = run_dpo(args, args.lab, args.work)
        m = dpo["metrics"]
        rows += before_after_rows(f"S_dpo vs S_tuned, greedy, {args.eval_examples} validation papers", m)
        for name in ("heldout_margin", "train_margin"):
            b, a = m[name]["before"], m[name]["after"]
            rows.append((f"{name} ({b.get('pairs', 0)} pairs)", "mean log p(chosen) - log p(rejected)",
                         f"{b.get('mean_margin', float('nan')):.3f}", f"{a.get('mean_margin', float('nan')):.3f}",
                         f"{a.get('mean_margin', 0) - b.get('mean_margin', 0):+.3f}"))
            rows.append((f"{name} ({b.get('pairs', 0)} pairs)", "accuracy (margin > 0)",
                         f"{b.get('accuracy', float('nan')):.3f}", f"{a.get('accuracy', float('nan')):.3f}",
                         f"{a.get('accuracy', 0) - b.get('accuracy', 0):+.3f}"))
        notes.append(f"DPO: {dpo['ratings']} simulated ratings of {dpo['papers']} training papers "
                     f"({rated_outputs(args)}"
                     f" per paper; rating = 1 + 2*EOS + 2*(1 - repetition)) -> "
                     f"{m['train_rows']} training and {m['heldout_pairs']} held-out pairs (held-out papers: 25%); "
                     f"{args.dpo_epochs:g} epochs, lr {args.dpo_lr:g}, beta 0.1; sampling and rating "
                     f"{minutes(dpo['simulate_seconds'])}, rl_tune.py {minutes(dpo['seconds'])} (training "
                     f"{m['train_runtime'] / 60:.1f} min).")
    for row in rows:
        print(" | ".join(row))
    print("\n".join(notes))
    if not args.no_record and rows:
        record("rl_tune.py on the lab's S_tuned: before/after (rl_tune.py's metrics.json)", rows,
               ("run", "measure", "before", "after", "change"), "\n\n".join(notes))


if __name__ == "__main__":
    main()
