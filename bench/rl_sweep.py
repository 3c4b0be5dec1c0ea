"""Which GRPO settings improve the lab's S_tuned without collapsing it? A sweep of bench/rl_lab.py's GRPO stage.

    python bench/rl_sweep.py --threads 1            # every configuration below; finished ones are reused; records
    python bench/rl_sweep.py --only R1 K --no_record

Each configuration runs `bench/rl_lab.py --only grpo` in its own work directory (bench/work/sweep_<name>; a re-run
reuses what finished there with the same settings, and rl_lab.py redoes a stage whose settings changed, e.g. after an
edit of CONFIGS or another --test_examples): rl_tune.py --method grpo from the lab's S_tuned, then evaluation.py on
--test_examples test papers with S_grpo as --small_tuned_model. One table row per configuration: S_grpo's greedy
outputs on 32 validation papers before -> after (rl_tune.py's metrics.json, with the share of distinct outputs, which
shows a collapse to one text), and L steered by (S, S_grpo) on the test papers (evaluation.py's metrics.json).

The question the sweep answers: the issue asks GRPO to cut the repetition and raise the EOS rate of S_tuned's greedy
outputs (NLL within +5%) and steering to keep the gains; the first run did so by writing one 7-token sentence for
every paper. A configuration that helps must do it without `distinct` falling to 1/32 and without steered ROUGE-L
falling far below steering with S_tuned.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _util import ROOT, record  # noqa: E402

# name -> rl_lab.py flags. R1 is rl_lab's first recorded run; the others change one or two things at a time.
T02 = dict(length_range="15,60", temperature=0.2, lr=5e-4, beta=0.04, steps=30)  # R1's sampling, a length term added
SHORT = dict(reward="rouge:2,eos:1,repetition:1,length:2", length_range="20,60")  # a range 128 tokens can end inside
LONG = dict(reward="rouge:2,eos:1,repetition:2,length:2", length_range="40,90", lr=5e-4, beta=0.04)
DEFAULTS = dict(top_k=0, generations=4, prompts=2)  # rl_lab.py's, unless a configuration says otherwise
CONFIGS = {
    "R1": dict(reward="rouge:1,eos:1,repetition:1", length_range="20,200", temperature=0.2, lr=5e-4, beta=0.04,
               steps=30),
    "K": {**T02, "reward": "rouge:1,eos:1,repetition:1,length:1"},
    "L": {**T02, "reward": "rouge:3,eos:1,repetition:1,length:1"},
    "J": {**SHORT, "temperature": 0.3, "lr": 5e-4, "beta": 0.04, "steps": 40},
    "C": dict(reward="rouge:4,eos:1,repetition:1,length:2", length_range="40,90", temperature=0.3, lr=5e-4, beta=0.04,
              steps=40),
    "D": dict(reward="rouge:8,eos:1,repetition:1,length:2", length_range="40,90", temperature=0.3, lr=3e-4, beta=0.1,
              steps=40),
    "I": {**SHORT, "temperature": 0.5, "lr": 3e-4, "beta": 0.1, "steps": 40},
    "I80": {**SHORT, "temperature": 0.5, "lr": 3e-4, "beta": 0.1, "steps": 80},  # rl_lab.py's defaults
    "I160": {**SHORT, "temperature": 0.5, "lr": 3e-4, "beta": 0.1, "steps": 160},
    "I5": {**SHORT, "temperature": 0.5, "lr": 5e-4, "beta": 0.1, "steps": 40},
    "E": {**LONG, "temperature": 0.5, "steps": 60, "generations": 8, "prompts": 1},
    "B": dict(reward="rouge:4,eos:1,repetition:1,length:1", length_range="30,90", temperature=0.7, lr=3e-4, beta=0.04,
              steps=40),
    "A": dict(reward="rouge:4,eos:1,repetition:1,length:1", length_range="30,90", temperature=1.0, lr=1e-4, beta=0.1,
              steps=40),
    "G": {**LONG, "temperature": 1.0, "top_k": 3, "steps": 40},
    "H": {**LONG, "temperature": 1.0, "top_k": 2, "steps": 40},
}


def rl_lab_argv(name: str, c: dict, args) -> list[str]:
    argv = [sys.executable, str(ROOT / "bench" / "rl_lab.py"), "--only", "grpo", "--no_record", "--work",
            str(args.work / f"sweep_{name}"), "--reward", c["reward"], "--length_range", c["length_range"],
            "--temperature", str(c["temperature"]), "--top_k", str(c["top_k"]), "--grpo_lr", str(c["lr"]),
            "--beta", str(c["beta"]), "--grpo_steps", str(c["steps"]), "--num_generations",
            str(c["generations"]), "--prompts_per_step", str(c["prompts"]), "--test_examples",
            str(args.test_examples), "--lab", str(args.lab)]
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def describe(c: dict) -> str:
    sampling = f"T {c['temperature']:g}" + (f", top-k {c['top_k']}" if c["top_k"] else "")
    group = f"{c['prompts']}x{c['generations']}"
    return (f"`{c['reward']}`, length {c['length_range']}; {sampling}; lr {c['lr']:g}, beta {c['beta']:g}, "
            f"{c['steps']} steps of {group}")


def mean(summary: dict, key: str) -> float:
    return summary[key]["mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--lab", type=Path, default=Path("/work/main/outputs/lab"))
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    parser.add_argument("--test_examples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no_record", action="store_true")
    args = parser.parse_args()
    rows, baseline = [], None
    for name in args.only:
        c = {**DEFAULTS, **CONFIGS[name]}
        work = args.work / f"sweep_{name}"
        subprocess.run(rl_lab_argv(name, c, args), check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        tuned = json.loads((work / "grpo" / "final" / "metrics.json").read_text())
        before, after = tuned["before"], tuned["after"]
        steered = json.loads((work / "eval" / "S_grpo" / "metrics.json").read_text())["systems"]["steered"]
        if baseline is None:
            baseline = json.loads((work / "eval" / "S_tuned" / "metrics.json").read_text())["systems"]["steered"]
            rows.append(("S_tuned (before)", "", f"{before['rougeL']:.1f}", f"{before['eos_rate']:.2f}",
                         f"{before['repetition']:.2f}", "", f"{before['distinct_outputs']:.2f}",
                         f"{mean(baseline, 'rougeL'):.1f}", f"{mean(baseline, 'eos_share'):.2f}",
                         f"{mean(baseline, 'repetition'):.2f}"))
        nll = 100 * (after["reference_nll"] / before["reference_nll"] - 1)
        rows.append((name, describe(c), f"{after['rougeL']:.1f}", f"{after['eos_rate']:.2f}",
                     f"{after['repetition']:.2f}", f"{nll:+.1f}%", f"{after['distinct_outputs']:.2f}",
                     f"{mean(steered, 'rougeL'):.1f}", f"{mean(steered, 'eos_share'):.2f}",
                     f"{mean(steered, 'repetition'):.2f}"))
    header = ("run", "GRPO settings", "S greedy ROUGE-L", "S EOS rate", "S repeated 3-grams", "S reference NLL",
              "S distinct outputs", "steered ROUGE-L", "steered EOS rate", "steered repeated 3-grams")
    n_test = json.loads((args.work / f"sweep_{args.only[0]}" / "eval" / "S_tuned" / "metrics.json").read_text())[
        "n_examples"]
    notes = (f"S columns: S_grpo's greedy outputs on 32 validation papers (rl_tune.py's after-training evaluation; "
             f"NLL as the change from S_tuned's); distinct outputs = share of the 32 that differ (1/32 = 0.03: one "
             f"text for every paper). Steered columns: L steered by (S, S_grpo) at alpha 1, {n_test} test papers, "
             f"greedy, 128 new tokens (evaluation.py). Each run: `python bench/rl_lab.py --only grpo` with the "
             f"settings shown (bench/rl_sweep.py CONFIGS), 4 completions per prompt unless shown, <= 128 tokens.")
    for row in rows:
        print(" | ".join(row))
    if not args.no_record:
        record("GRPO settings on the lab's S_tuned: greedy outputs and steering (bench/rl_sweep.py)", rows, header,
               notes)


if __name__ == "__main__":
    main()
