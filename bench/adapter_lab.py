"""Bottleneck adapters against LoRA as S_tuned in the steering lab: what L steered by each gives (issue 28).

    python bench/adapter_lab.py --threads 1                          # the lab in outputs/lab; ~16 min at 1 thread
    python bench/adapter_lab.py --lab_dir /elsewhere/outputs/lab --threads 1
    python bench/adapter_lab.py --smoke                              # outputs/lab-smoke's models; record stays there

Reads a finished steering lab (bench/steering_lab.py; nothing in it is written): S, L, the processed MReD data and the
lab's own evaluation of the test papers. Trains two adapters on S at a matched number of trained parameters:
- LoRA, rank --lora_r on all four GPT-NeoX linear layers (16·r·d parameters per layer, alpha 2r, no dropout), and
- bottleneck adapters, reduction factor --reduction_factor, after the attention block and the MLP (ReLU; per layer
  2·(2·d·d/f + d/f + d) parameters): on the lab's S (d = 64, 2 layers) r = 8 trains 16,384, f = 2 (32 units) 16,768.
Each is trained with the lab's own S_tuned command (steering_lab.finetune_arguments: the train split for 2 epochs,
batch 8, cosine schedule with 5% warm-up, the best epoch by validation loss, seed 42) with the adapter's flags added, at
each of --learning_rates (the lab's 1e-3 among them), and the run with the lowest validation loss is kept, so neither
adapter is judged at a rate that suits only the other. Then evaluation.py, with the lab's test-paper command line and
its fair decoding (greedy with no_repeat_ngram_size 3), runs S_tuned alone and L steered by (S, S_tuned) at alpha = 1
for each. The record sets them beside the lab's own rows (its fully fine-tuned S_tuned, L steered by it, S, L,
L_tuned: read from the lab's evaluation, same papers, same decoding), with paired 95% bootstrap intervals over papers
(proxytune.foundation.statistics), and the paired differences bottleneck - LoRA.

Writes under --output_dir (default outputs/adapter_lab): train/<adapter>-lr<lr>/ (fine_tune.py runs), eval/<adapter>/
(evaluation.py runs), commands.sh, times.json and report.json. A re-run reuses a run made with the same settings
(<run>.stage.json beside it: its command line and when the lab made its inputs) and redoes one made with others.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import ROOT, argv_flags, fit_stage, lab_stage_times, record  # noqa: E402
from steering_lab import (  # noqa: E402
    DECODING_NAMES,
    FAIR,
    LabArguments,
    evaluation_arguments,
    finetune_arguments,
    paper_scores,
    resolve_lab,
    run_script,
)

from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import write_json
from proxytune.foundation.statistics import bootstrap_interval, resample_indices

logger = logging.getLogger("adapter_lab")

LAB_STAGES = ("data", "pretrain_small", "pretrain_large", "finetune_small", "finetune_large", "evaluate:test")
ADAPTER_FILES = ("adapter_model.safetensors", "bottleneck_adapter.safetensors")  # LoRA's, ours: trained weights only
BOOTSTRAP_SAMPLES, CONFIDENCE, SEED = 1000, 0.95, 42


@dataclass
class AdapterLabArguments:
    lab_dir: str | None = field(default=None, metadata={
        "help": "A finished steering lab's work directory, read only (default: outputs/lab, or outputs/lab-smoke "
                "with --smoke)."})
    smoke: bool = field(default=False, metadata={
        "help": "The lab is a --smoke lab (its profile's sizes); the record goes to OUTPUT_DIR/RESULTS.md."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where the adapters and evaluations go (default: outputs/adapter_lab, or outputs/adapter_lab-smoke)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA's rank (alpha = 2r, dropout 0, all four linear layers)."})
    reduction_factor: int = field(default=2, metadata={
        "help": "The bottleneck adapters' hidden size / bottleneck size: 2 on the lab's S matches r = 8."})
    learning_rates: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], metadata={
        "help": "Each adapter is trained at each; the lowest validation loss is kept."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's own choice)."})
    results_file: str | None = field(default=None, metadata={
        "help": "Where the record goes (default: bench/RESULTS.md; with --smoke, OUTPUT_DIR/RESULTS.md)."})
    no_record: bool = field(default=False, metadata={"help": "Print the table only."})

    def __post_init__(self):
        problems = [f"--{name} {getattr(self, name)} must be at least 1" for name in ("lora_r", "reduction_factor")
                    if getattr(self, name) < 1]
        if not self.learning_rates or min(self.learning_rates) <= 0:
            problems.append(f"--learning_rates {self.learning_rates}: give one or more positive rates")
        if problems:
            raise UsageError("; ".join(problems))


def adapter_flags(args: AdapterLabArguments) -> dict[str, list[str]]:
    """fine_tune.py's flags for each adapter."""
    return {"lora": ["--use_lora", "--lora_r", str(args.lora_r), "--lora_alpha", str(2 * args.lora_r),
                     "--lora_dropout", "0"],
            "bottleneck": ["--adapter", "bottleneck", "--reduction_factor", str(args.reduction_factor),
                           "--adapter_non_linearity", "relu"]}


def with_flags(argv: list[str], **values: str) -> list[str]:
    """`argv` with the value of each `--key` in `values` replaced: with_flags(["--a", "1"], a="2") == ["--a", "2"]."""
    argv = list(argv)
    for key, value in values.items():
        argv[argv.index(f"--{key}") + 1] = value
    return argv


def parameter_count(path: Path) -> int:
    """The number of parameters in a safetensors file."""
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(path)).values())


def trained_parameters(final_dir: Path) -> int:
    """The parameters an adapter run trained: its adapter file's (LoRA's or ours), which holds only them."""
    for name in ADAPTER_FILES:
        if (final_dir / name).is_file():
            return parameter_count(final_dir / name)
    raise FileNotFoundError(f"{final_dir} holds no adapter file ({', '.join(ADAPTER_FILES)})")


class Timer:
    """Each run's wall seconds and the machine's 1-minute load average as it ended, kept in OUTPUT_DIR/times.json: a
    re-run that reuses a run reports what it took when it ran."""

    def __init__(self, path: Path):
        self.path = path
        self.times = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def run(self, name: str, fn, ran) -> object:
        start = time.perf_counter()
        result = fn()
        if ran(result):
            self.times[name] = {"seconds": round(time.perf_counter() - start, 1), "load": round(os.getloadavg()[0], 1)}
            write_json(self.path, self.times)
        return result

    def seconds(self, name: str) -> float | None:
        return self.times.get(name, {}).get("seconds")

    def describe(self) -> str:
        """'lora-lr0.001 0.9 min (load 2.2), ...; 12.3 min in all'."""
        runs = ", ".join(f"{name} {t['seconds'] / 60:.1f} min (load {t['load']:.1f})" for name, t in self.times.items())
        return f"{runs}; {sum(t['seconds'] for t in self.times.values()) / 60:.1f} min in all"


def train_adapters(lab, args: AdapterLabArguments, out: Path, timer: Timer, lab_times: dict) -> dict[str, dict]:
    """{adapter: the kept run (lr, final_dir, metrics, config) and every run's validation loss}."""
    kept = {}
    for name, flags in adapter_flags(args).items():
        runs = []
        for lr in args.learning_rates:
            run_dir = out / "train" / f"{name}-lr{lr:g}"
            argv = [*with_flags(finetune_arguments(lab, "small"), output_dir=str(run_dir), learning_rate=f"{lr:g}"),
                    *flags]
            config = {**argv_flags(argv), "lab": lab_times}
            config.pop("--output_dir")
            fit_stage(run_dir.name, run_dir, config, {}, logger)
            result = timer.run(run_dir.name, lambda a=argv: run_script(lab, "fine_tune", a),
                               lambda r: r["status"] == "trained")
            runs.append({"lr": lr, "final_dir": Path(result["final_dir"]), "metrics": result["metrics"],
                         "config": config, "seconds": timer.seconds(run_dir.name)})
            logger.info("%s at lr %g: validation loss %.4f", name, lr, result["metrics"]["eval_loss"])
        best = min(runs, key=lambda r: r["metrics"]["eval_loss"])
        kept[name] = {**best, "runs": runs, "trained_parameters": trained_parameters(best["final_dir"])}
    return kept


def evaluate_adapters(lab, out: Path, kept: dict[str, dict], timer: Timer, lab_times: dict) -> dict[str, Path]:
    """evaluation.py on the lab's test papers, the lab's command line and fair decoding, S_tuned alone and steered at
    alpha = 1, for each adapter's kept run; {adapter: its evaluation directory}."""
    dirs = {}
    for name, run in kept.items():
        eval_dir = out / "eval" / name
        lab_argv = evaluation_arguments(lab, "main", FAIR)  # the lab's run of S, S_tuned, L, L_tuned, steered
        models = lab_argv[:lab_argv.index("--large_tuned_model")]
        argv = [*with_flags(models, small_tuned_model=str(run["final_dir"])), "--systems", "small_tuned", "steered",
                "--alpha", "1.0", "--pairwise", "none",
                *with_flags(lab_argv[lab_argv.index("--alpha") + 2:], output_dir=str(eval_dir))]
        config = {**argv_flags(argv), "lab": lab_times}
        config.pop("--output_dir")
        fit_stage(f"eval/{name}", eval_dir, config, {f"train/{name}": run["config"]}, logger)
        done = lambda d=eval_dir: (d / "predictions.jsonl").is_file() and (d / "metrics.json").is_file()  # noqa: E731
        if not done():
            timer.run(f"eval/{name}", lambda a=argv: run_script(lab, "evaluation", a), lambda _: True)
        dirs[name] = eval_dir
    return dirs


def read_systems(sources: dict[str, tuple[Path, str]]) -> dict[str, dict]:
    """{label: per-paper arrays (nll, tokens, rougeL, eos, words), papers in one order} from evaluation.py's
    predictions.jsonl files; `sources`: label -> (predictions file, system in it). Every file holds the same papers."""
    keys = {"nll": "nll", "tokens": "target_tokens", "rougeL": "rougeL", "eos": "ended_with_eos", "words": "words"}
    out, order = {}, None
    for label, (path, system) in sources.items():
        ids, out[label] = paper_scores(path, system, keys)
        order = order or ids
        if ids != order:
            raise UsageError(f"{path} scored other papers than the lab's evaluation; delete it and run again")
    return out


def analyse(per_system: dict[str, dict], comparisons: list[tuple[str, str]]) -> dict:
    """Each system's corpus-level NLL per token, mean ROUGE-L, EOS rate and words, and for each (a, b) of
    `comparisons` how much better a is than b (NLL_b - NLL_a; ROUGE-L_a - ROUGE-L_b), all with 95% intervals from one
    set of paired bootstrap resamples of the papers."""
    n = len(next(iter(per_system.values()))["nll"])
    idx = resample_indices(n, BOOTSTRAP_SAMPLES, SEED)  # (B, N)

    def nll(name, ix):  # (B,)
        return per_system[name]["nll"][ix].sum(-1) / per_system[name]["tokens"][ix].sum(-1)

    def mean(name, key, ix):
        return per_system[name][key][ix].mean(-1)

    systems = {name: {"nll": bootstrap_interval(lambda ix, s=name: nll(s, ix), idx, CONFIDENCE),
                      **{k: bootstrap_interval(lambda ix, s=name, k=k: mean(s, k, ix), idx, CONFIDENCE)
                         for k in ("rougeL", "eos", "words")}} for name in per_system}
    better = {f"{a} vs {b}": {
        "nll": bootstrap_interval(lambda ix, a=a, b=b: nll(b, ix) - nll(a, ix), idx, CONFIDENCE),
        "rougeL": bootstrap_interval(lambda ix, a=a, b=b: mean(a, "rougeL", ix) - mean(b, "rougeL", ix), idx,
                                     CONFIDENCE)} for a, b in comparisons}
    return {"n_papers": n, "bootstrap_samples": BOOTSTRAP_SAMPLES, "systems": systems, "better": better}


def interval(entry: dict, digits: int, signed: bool = False) -> str:
    f = f"{{:+.{digits}f}}" if signed else f"{{:.{digits}f}}"
    return f"{f.format(entry['mean'])} [{f.format(entry['ci_low'])}, {f.format(entry['ci_high'])}]"


def display(path: Path) -> Path:
    """`path` relative to the repository when it is inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main(args: AdapterLabArguments) -> dict:
    setup_logging()
    lab = resolve_lab(LabArguments(work_dir=args.lab_dir, smoke=args.smoke))
    lab_eval = lab.eval_dir / FAIR / "main" / "predictions.jsonl"
    if not (lab.path("small", "final").is_dir() and lab.path("data").is_dir() and lab_eval.is_file()):
        raise UsageError(f"{lab.work} has no finished steering lab (S, data and {lab_eval.relative_to(lab.work)}): "
                         f"run python bench/steering_lab.py{' --smoke' if args.smoke else ''} first")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.output_dir or ROOT / ("outputs/adapter_lab-smoke" if args.smoke else "outputs/adapter_lab"))
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    logger.info("adapter lab: the steering lab %s, LoRA r=%d against bottleneck f=%d at learning rates %s; output %s",
                lab.work, args.lora_r, args.reduction_factor, args.learning_rates, out)
    lab_times = lab_stage_times(lab.work, LAB_STAGES)
    timer = Timer(out / "times.json")
    try:
        kept = train_adapters(lab, args, out, timer, lab_times)
        eval_dirs = evaluate_adapters(lab, out, kept, timer, lab_times)
    finally:
        if lab.commands:
            with (out / "commands.sh").open("a", encoding="utf-8") as f:
                f.write(f"# {dt.datetime.now():%Y-%m-%d %H:%M} (run from {ROOT})\n" + "\n".join(lab.commands) + "\n")

    # The table: the adapters' S_tuned and steered L beside the lab's own systems, on the same papers.
    label = {"lora": f"LoRA r={args.lora_r}", "bottleneck": f"bottleneck f={args.reduction_factor}"}
    lab_main = lab.eval_dir / FAIR / "main" / "predictions.jsonl"
    sources = {"S_tuned, full fine-tune (the lab's)": (lab_main, "small_tuned"),
               **{f"S_tuned, {label[a]}": (eval_dirs[a] / "predictions.jsonl", "small_tuned") for a in kept},
               "L steered by (S, full S_tuned), alpha 1 (the lab's)": (lab_main, "steered"),
               **{f"L steered by (S, {label[a]} S_tuned), alpha 1": (eval_dirs[a] / "predictions.jsonl", "steered")
                  for a in kept},
               "S (the lab's)": (lab_main, "small_base"), "L (the lab's)": (lab_main, "large"),
               "L_tuned (the lab's)": (lab_main, "large_tuned")}
    per_system = read_systems(sources)
    steered = {a: f"L steered by (S, {label[a]} S_tuned), alpha 1" for a in kept}
    tuned = {a: f"S_tuned, {label[a]}" for a in kept}
    full_tuned = "S_tuned, full fine-tune (the lab's)"
    full_steered = "L steered by (S, full S_tuned), alpha 1 (the lab's)"
    comparisons = [(tuned["bottleneck"], tuned["lora"]), (steered["bottleneck"], steered["lora"]),
                   *[(steered[a], tuned[a]) for a in kept], (full_steered, full_tuned),
                   *[(steered[a], full_steered) for a in kept]]
    analysis = analyse(per_system, comparisons)

    metrics_file = lab.path("small_tuned", "final", "metrics.json")
    full_metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    full_lr = argv_flags(finetune_arguments(lab, "small"))["--learning_rate"]
    s_params = parameter_count(lab.path("small", "final", "model.safetensors"))
    trained = {full_tuned: (s_params, full_lr, full_metrics.get("eval_loss")),
               **{tuned[a]: (kept[a]["trained_parameters"], f"{kept[a]['lr']:g}", kept[a]["metrics"]["eval_loss"])
                  for a in kept}}
    trained.update({full_steered: trained[full_tuned], **{steered[a]: trained[tuned[a]] for a in kept}})
    rows = []
    for name, s in analysis["systems"].items():
        params, lr, loss = trained.get(name, (None, "-", None))
        rows.append((name, f"{params:,}" if params else "-", lr, f"{loss:.4f}" if loss is not None else "-",
                     interval(s["nll"], 3), interval(s["rougeL"], 1), f"{s['eos']['mean']:.2f}",
                     f"{s['words']['mean']:.0f}"))
    header = ("system", "trained parameters", "lr (best of grid)", "validation loss", "test NLL/token [95% CI]",
              f"ROUGE-L, {DECODING_NAMES[FAIR]} [95% CI]", "EOS rate", "words")
    diff_lines = ["| a better than b (paired, 95% CI) | NLL/token: b - a | ROUGE-L: a - b |", "|---|---|---|"]
    diff_lines += [f"| {k} | {interval(v['nll'], 3, signed=True)} | {interval(v['rougeL'], 1, signed=True)} |"
                   for k, v in analysis["better"].items()]
    grid = "; ".join(f"{label[a]}: " + ", ".join(f"lr {r['lr']:g} -> {r['metrics']['eval_loss']:.4f}"
                                                 + (f" ({r['seconds'] / 60:.1f} min)" if r["seconds"] else "")
                                                 for r in kept[a]["runs"]) for a in kept)
    where = display(lab.work)
    notes = "\n".join([
        f"The steering lab in `{where}` (S d={lab.profile.small.get('hidden_size')} x "
        f"{lab.profile.small.get('num_hidden_layers')} layers, {s_params:,} parameters; its L, L_tuned and fully "
        f"fine-tuned S_tuned as it made them), read only. Each adapter trained on S with the lab's S_tuned command "
        f"(commands: `{display(out / 'commands.sh')}`; {lab.profile.finetune_epochs} "
        f"epochs of the train split, batch {lab.profile.finetune_batch}, max_length {lab.profile.max_length}, cosine "
        "schedule with 5% warm-up, best "
        f"epoch by validation loss, seed {lab.args.seed}) plus its flags: LoRA r={args.lora_r} (alpha "
        f"{2 * args.lora_r}, dropout 0, query_key_value, dense, dense_h_to_4h, dense_4h_to_h), bottleneck "
        f"f={args.reduction_factor} (ReLU, after attention and MLP); at lr "
        f"{', '.join(f'{x:g}' for x in args.learning_rates)}, the lowest validation loss kept. Validation losses: "
        f"{grid}. A steered row repeats its S_tuned's training columns; the lab's S_tuned is its own full fine-tune "
        "at its learning rate (no grid).",
        "",
        f"Test: {analysis['n_papers']} papers, evaluation.py with the lab's command line (--systems small_tuned "
        f"steered --alpha 1.0, at most {lab.profile.max_new_tokens} new tokens, {DECODING_NAMES[FAIR]}); the lab's "
        "rows are read from its own evaluation of the same papers with the same decoding. NLL: of the reference "
        "meta-review given the prompt, corpus-level per token. Intervals: 95% percentile bootstrap over papers, "
        f"{BOOTSTRAP_SAMPLES} resamples shared by every system (paired).",
        "",
        *diff_lines,
        "",
        f"Wall times of the runs (min, 1-thread torch, with the machine's 1-min load average as each ended, on "
        f"{os.cpu_count()} cores shared with other work: indicative only): {timer.describe()}.",
    ])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(row))
    print(notes)
    report = {"rows": rows, "header": header, "analysis": analysis,
              "kept": {a: {k: str(v) if isinstance(v, Path) else v for k, v in kept[a].items() if k != "runs"}
                       for a in kept}}
    write_json(out / "report.json", report)
    if not args.no_record:
        results = Path(args.results_file) if args.results_file else (
            out / "RESULTS.md" if args.smoke else ROOT / "bench" / "RESULTS.md")
        record("Bottleneck adapters against LoRA as S_tuned in the steering lab (test papers, steered L)", rows, header,
               notes, results=results, bench="adapter_lab")
        logger.info("recorded in %s", results)
    return report


if __name__ == "__main__":
    run_cli(main, [AdapterLabArguments], __doc__)
