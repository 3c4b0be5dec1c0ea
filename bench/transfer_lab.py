"""Transfer lab: do first-order estimates rank training subsets as real fine-tunes do, on real meta-reviews?

MReD (../shared, 665 papers) in 8 groups, year x decision (accept / reject); the lab's pretrained S
(bench/steering_lab.py builds it: a GPT-NeoX trained from scratch on IMDB) fine-tuned with LoRA by transfer.py on
each group alone, on all of them (θ0, the meta-initialisation), and on 20 random subsets of 3 groups: the real
matrix. Then transfer.py's first-order estimates of the same subsets from θ0, and the comparison (the paper's mean
(real - est)^2 / real^2, the Spearman correlation, the linearisation error, the wall time of both, side by side in
one run). Last, the answer a user wants: for one target group (--target), the subset the estimates rank best among
the plan's and the target with each other group (transfer.py --plan with:G:2, estimated only), confirmed by one
real fine-tune against fine-tuning on everything and on the target alone.

    python bench/steering_lab.py --threads 1          # first, for S (or pass any small causal LM as --model)
    python bench/transfer_lab.py --threads 1 --model outputs/lab/small/final
    python bench/transfer_lab.py --smoke              # a random tiny model: the path (~15 min at 1 thread)

Records into bench/RESULTS.md (smoke: WORK_DIR/RESULTS.md) and draws assets/transfer_lab.png (estimate against real,
one point per subset and target group). Every stage is transfer.py's, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _util import ROOT, random_model, record  # noqa: E402

import transfer  # noqa: E402
from proxytune.foundation.config import parse_config  # noqa: E402
from proxytune.transfer.arguments import TransferArguments  # noqa: E402
from proxytune.transfer.compare import relative_squared_error, spearman  # noqa: E402
from proxytune.transfer.plans import plan_subsets, subset_name  # noqa: E402

MRED = ROOT.parent / "shared" / "data" / "meta_review" / "mred_val_longest.jsonl"
PYTHIA_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "pythia"
ACCEPT = ["Accept (Poster)", "Accept (Oral)", "Accept (Spotlight)", "Accept (Workshop)"]
REJECT = ["Reject", "Reject (Invite to Workshop Track)"]
PLAN = "alone,all,random:20:3"
SMOKE_PLAN = "alone,all,random:4:3"
# The estimate's settings: the same in every call, since estimates.json starts afresh when they change.
ESTIMATE_FLAGS = ("--projection_dim", "200", "--scale", "0.02")
# The confirmation's pool: every subset of up to this many groups holding the target (the target alone and with each
# other group; the plan's subsets are ranked too). 3 would estimate 21 more subsets: ~15 min more at 1 thread.
POOL_SIZE = 2


def write_inputs(work: Path, model: str, smoke: bool) -> tuple[Path, Path]:
    """sources.yaml (8 groups: year x accept/reject) and lora.yaml (the fine-tune every cell runs)."""
    groups = {f"{year}-{name}": {"filter": {"year": year, "decision": values}}
              for year in (2018, 2019, 2020, 2021) for name, values in (("accept", ACCEPT), ("reject", REJECT))}
    sources = {"defaults": {"dataset": str(MRED)}, "groups": groups}
    lora = {"model_name_or_path": model, "max_length": 256 if smoke else 512, "use_lora": True, "lora_r": 8,
            "lora_alpha": 16, "learning_rate": 1e-3, "num_train_epochs": 1 if smoke else 2,
            "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "warmup_steps": 0.05,
            "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 1, "num_samples": 0,
            "report_to": "none", "disable_tqdm": True, "seed": 0}
    if smoke:
        lora.update(max_steps=2, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    paths = work / "sources.yaml", work / "lora.yaml"
    for path, content in zip(paths, (sources, lora)):
        path.write_text(json.dumps(content, indent=1), encoding="utf-8")  # JSON is YAML
    return paths


def smoke_model(work: Path) -> str:
    """A random 2-layer GPT-NeoX with the Pythia tokenizer (the path of the lab, none of its meaning)."""
    from transformers import AutoTokenizer

    path = work / "smoke-model"
    if not (path / "config.json").is_file():
        model = random_model("tiny")
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(str(PYTHIA_TOKENIZER)).save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n"))
    parser.add_argument("--model", default=str(ROOT / "outputs" / "lab" / "small" / "final"),
                        help="S: the small pretrained causal LM every cell fine-tunes (default: steering_lab.py's S).")
    parser.add_argument("--work_dir", default=None, help="Default: outputs/transfer-lab (smoke: ...-smoke).")
    parser.add_argument("--smoke", action="store_true", help="A random tiny model, 2 steps per cell.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads.")
    parser.add_argument("--no_record", action="store_true", help="Print the table only.")
    parser.add_argument("--target", default="2018-accept",
                        help="The target group of the confirmation (default: the group with the fewest papers, where "
                             "borrowing data should matter most).")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not MRED.is_file():
        sys.exit(f"error: {MRED} is not there (../shared); the lab needs the MReD file")
    work = Path(args.work_dir or ROOT / "outputs" / ("transfer-lab-smoke" if args.smoke else "transfer-lab")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = smoke_model(work) if args.smoke else args.model
    if not Path(model).is_dir():
        sys.exit(f"error: --model {model} is not a directory; run bench/steering_lab.py first or pass a model")
    sources, lora = write_inputs(work, model, args.smoke)
    flags = ["--sources", str(sources), "--fine_tune_config", str(lora), "--output_dir", str(work / "transfer"),
             "--plan", SMOKE_PLAN if args.smoke else PLAN, "--seed", "0"]

    def run(*more: str) -> dict:
        return transfer.main(*parse_config([TransferArguments], [*flags, *more]))

    real = run("--step", "real")
    estimate = run("--step", "estimate", *ESTIMATE_FLAGS)
    comparison = run("--step", "compare")["comparison"]
    matrix, estimates = real["matrix"], estimate["estimates"]
    out = work / "transfer"
    groups = matrix["groups"]
    if args.target not in groups:
        sys.exit(f"error: --target {args.target} is not a group ({', '.join(groups)})")
    # Wall times from the stages' own records (each cell's fine-tune and scoring; the gradients, θ0's scoring and each
    # subset's fit and scoring), so that a resumed run reports the whole of the work, not this call's share.
    cells = [json.loads((out / "cells" / f"{s}.scores.json").read_text(encoding="utf-8"))
             for s in comparison["subsets"]]
    real_wall = sum(c["wall_seconds_this_call"] + c["score_seconds"] for c in cells)
    estimate_wall = comparison["estimate_seconds"]

    # The answer a user wants: estimate every subset of up to POOL_SIZE groups holding the target (the plan's are
    # estimated already), take the best for the target, fine-tune it for real (unless the plan has it), and set
    # its real loss against all groups' and the target's own.
    pool_plan = f"with:{args.target}:{POOL_SIZE}"
    pool = run("--step", "estimate", *ESTIMATE_FLAGS, "--plan", pool_plan)["estimates"]["estimates"]
    ranked = {s: pool[s] for s in [*comparison["subsets"], *map(subset_name, plan_subsets(pool_plan, groups))]}
    pick = min(ranked, key=lambda s: ranked[s]["loss"][args.target])
    had_cell = pick in matrix["loss"]
    confirmed = run("--step", "real", "--subsets", pick)["matrix"]["loss"][pick][args.target]
    run("--step", "real")  # matrix.json is the plan's again (the line above wrote a matrix of the pick alone)
    pick_cell = json.loads((out / "cells" / f"{pick}.scores.json").read_text(encoding="utf-8"))
    pool_wall = sum(pool[s]["seconds"] for s in ranked if s not in comparison["subsets"]) + (
        0 if had_cell else pick_cell["wall_seconds_this_call"] + pick_cell["score_seconds"])
    everything = "+".join(groups)
    target_real = {s: row[args.target] for s, row in matrix["loss"].items()}
    best_real = min(target_real, key=target_real.get)
    confirmation = (f"{args.target}: of {len(ranked)} subsets estimated (the plan's and `{pool_plan}`), the best by "
                    f"estimate is {pick} (est. {ranked[pick]['loss'][args.target]:.4f}); "
                    f"real fine-tune {confirmed:.4f} against all groups {target_real[everything]:.4f} and "
                    f"{args.target} alone {target_real[args.target]:.4f}; best real subset of the plan {best_real} "
                    f"({target_real[best_real]:.4f})")

    lin = [estimates["estimates"][s]["linearization"] for s in comparison["subsets"]
           if estimates["estimates"][s]["linearization"]]
    per_group = comparison["per_group"]
    rhos = [v["spearman"] for v in per_group.values() if v["spearman"] is not None]
    picks = [(g, v["best_by_estimate"], v["real_loss_of_estimated_best"], matrix["loss"][everything][g],
              matrix["loss"][g][g], v["best_by_real"], v["real_loss_of_real_best"]) for g, v in per_group.items()]
    beats = sum(p[2] <= min(p[3], p[4]) for p in picks)
    # Two baselines the estimate must beat to be worth its cost: θ0's own loss as the estimate of every subset (no
    # step at all), and ranking the subsets by their number of training examples (more data, lower loss).
    subsets = comparison["subsets"]
    theta0_error = relative_squared_error([matrix["loss"][s][g] for s in subsets for g in groups],
                                          [estimates["theta0_loss"][g] for s in subsets for g in groups])
    size_rhos = [spearman([matrix["loss"][s][g] for s in subsets],
                          [-estimates["estimates"][s]["train_examples"] for s in subsets]) for g in groups]
    size_rhos = [r for r in size_rhos if r is not None]
    real_train = comparison["real_train_seconds"]
    table = [
        ("training subsets (real fine-tunes and estimates)", len(comparison["subsets"]), "≥ 20"),
        ("(subset, target) cells", comparison["cells"], ""),
        ("Spearman over the subsets, per target group, mean of the 8",
         f"{sum(rhos) / len(rhos):.3f}" if rhos else "n/a", "≥ 0.8"),
        ("Spearman over all cells (also ranks the targets' loss levels: easier)",
         f"{comparison['spearman']:.3f}" if comparison["spearman"] is not None else "n/a", ""),
        ("mean (real − est)² / real² (the paper's error)", f"{100 * comparison['relative_squared_error']:.3g}%",
         "≈ 1%"),
        ("baseline: the same error with θ0's own loss as every subset's estimate (no step)",
         f"{100 * theta0_error:.3g}%", ""),
        ("baseline: Spearman per target, mean of the 8, ranking the subsets by training examples (more is better)",
         f"{sum(size_rhos) / len(size_rhos):.3f}" if size_rhos else "n/a", ""),
        ("linearisation: Σ(f − lin)² / Σf², mean over subsets",
         f"{sum(x['relative_error'] for x in lin) / len(lin):.2e}", ""),
        ("linearisation: Σ(f − lin)² / Σ(f − s)², mean over subsets",
         f"{sum(x['error_over_change'] for x in lin) / len(lin):.3f}", ""),
        ("real: Trainer train_runtime of the subsets' runs (s)", f"{real_train:.0f}" if real_train else "n/a", ""),
        ("real: wall time of the subsets' cells, fine-tune + scoring, summed (s)", f"{real_wall:.0f}", ""),
        ("estimate: wall time, gradients + θ0 + each subset's fit and scoring, summed (s)", f"{estimate_wall:.0f}",
         ""),
        ("estimate: per-example gradients, once (s)", f"{estimates.get('gradient_seconds') or 0:.0f}", ""),
        ("speed-up, real train_runtime / estimate seconds",
         f"**{comparison['speedup']:.2f}**" if comparison["speedup"] else "n/a", "≥ 10"),
        ("speed-up, wall: real cells / estimate", f"{real_wall / estimate_wall:.2f}", "≥ 10"),
        ("targets where the estimate's pick among the plan beats both all and the target alone (real losses)",
         f"{beats} / {len(picks)}", ""),
        (f"confirmation on {args.target}: the estimate's best of {len(ranked)} subsets, real loss "
         f"({'the plan has its cell' if had_cell else 'one more fine-tune'}) against all / alone",
         f"{pick}: {confirmed:.4f} / {target_real[everything]:.4f} / {target_real[args.target]:.4f}",
         "below both"),
        ("confirmation: wall time of its extra estimates and fine-tune, summed (s)", f"{pool_wall:.0f}", ""),
    ]
    for row in table:
        print(" | ".join(str(c) for c in row))
    picks_text = "; ".join(f"{g}: est. best {b} (real {r:.4f}) vs all {a:.4f}, alone {o:.4f}, real best {rb} "
                           f"({rr:.4f})" for g, b, r, a, o, rb, rr in picks)
    if args.smoke or args.no_record:
        results, figure = work / "RESULTS.md", work / "transfer_lab.png"
    else:
        results, figure = None, ROOT / "assets" / "transfer_lab.png"
    shutil.copyfile(out / "comparison.png", figure)
    if args.no_record:
        return
    notes = (f"`bench/transfer_lab.py{' --smoke' if args.smoke else ''}`: MReD ({MRED.name}) in 8 groups, year × "
             f"accept/reject; S = `{model}`; each cell `fine_tune.py` with LoRA ({json.loads(lora.read_text())}); "
             f"plan `{SMOKE_PLAN if args.smoke else PLAN}`; held-out 20% of each group; estimates from θ0 = the cell "
             "of all groups, d = 200, "
             f"scale 0.02, l2 1.0. Real cells start from S, the estimates from θ0. Per target, among the plan: "
             f"{picks_text}. Confirmation: {confirmation}. "
             f"Matrix: {out / 'matrix.csv'}; estimates: {out / 'estimate' / 'estimates.csv'}; figure: "
             f"{figure.relative_to(ROOT) if figure.is_relative_to(ROOT) else figure}.")
    record("Transfer matrix: first-order estimates against real LoRA fine-tunes" + (" (smoke)" if args.smoke else ""),
           table, ("measure", "value", "target"), notes, results=results)


if __name__ == "__main__":
    main()
