"""Which training data helps a target: the transfer matrix by real fine-tunes, and first-order estimates of it
without fine-tuning (docs/which-data.md).

Fine-tune every combination of the sources file's groups (for A and B: A+B, A, B) with fine_tune.py and score each
on every group's held-out rows (resumable; matrix.csv/json and matrix.png in --output_dir):
    python transfer.py --sources sources.yaml --fine_tune_config lora.yaml --output_dir outputs/transfer

The same cells as cluster jobs, one per worker, from a template (default: Slurm); submit jobs/*.sh:
    python transfer.py --sources sources.yaml --fine_tune_config lora.yaml --step jobs --num_workers 4

The prompts are in the fine-tune config's prompt_template, else the one its model's final/ records, else meta_review,
and each group and subset records it, as processing_meta_review.py does.

Estimate 50 random subsets of 3 groups from θ0 (the cell of all groups, a LoRA adapter), then compare the
estimates with the real cells of the same plan:
    python transfer.py --sources sources.yaml --fine_tune_config lora.yaml --step estimate --plan random:50:3
    python transfer.py --sources sources.yaml --fine_tune_config lora.yaml --step compare --plan random:50:3
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import fine_tune
from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.config import to_jsonable
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import check_output_dir
from proxytune.models.loading import load_causal_lm, load_tokenizer
from proxytune.task.processing import check_max_length
from proxytune.training.arguments import parse_args as parse_fine_tune_args
from proxytune.training.hp_search import write_config
from proxytune.transfer.arguments import TransferArguments
from proxytune.transfer.clusters import cluster_groups
from proxytune.transfer.compare import compare
from proxytune.transfer.first_order import ESTIMATE_DIR, fingerprint, run_estimates
from proxytune.transfer.jobs import read_template, write_jobs
from proxytune.transfer.matrix import base_scores, base_settings, cell_paths, collect_matrix, run_cells
from proxytune.transfer.plans import parse_subsets, plan_subsets
from proxytune.transfer.sources import load_groups, parse_sources
from proxytune.transfer.splits import fine_tune_template, load_held_out, load_train, settings_of, write_groups

logger = logging.getLogger("transfer")


def main(args: TransferArguments, train=fine_tune.main) -> dict[str, Any]:
    """Run one step; returns what it wrote ({"step", ...}). `train` runs one fine-tune (fine_tune.py's main)."""
    setup_logging()
    out = Path(args.output_dir)
    check_output_dir(out)
    # The sources and the fine-tune config, checked before any work.
    sources = parse_sources(args.sources)
    model_args, data_args, _ = parse_fine_tune_args(list(args.fine_tune_config))
    tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = load_tokenizer(tokenizer_name, flag="--fine_tune_config's model")
    model = model_args.model_name_or_path
    template = fine_tune_template(data_args, model)
    check_max_length(tokenizer, data_args.max_length, "--fine_tune_config's max_length", template)

    # The groups, processed once into groups/<group>/ (train / validation / held-out test).
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "groups.json"
    if record_path.is_file() and sources.kmeans is not None:  # clustering again would cost a pass over every row
        rows = {g: [] for g in json.loads(record_path.read_text(encoding="utf-8"))["groups"]}
    elif sources.kmeans is not None:
        rows = cluster_groups(sources, tokenizer, model, args.device, template)
    else:
        rows = load_groups(sources)
    record = write_groups(out, rows, tokenizer, settings_of(data_args, tokenizer_name, args.held_out_percentage,
                                                            args.seed, template), template)
    groups = list(record["groups"])
    subsets = parse_subsets(args.subsets, groups) if args.subsets else plan_subsets(args.plan, groups, args.seed)
    logger.info("%d groups (%s); %d training subsets; step %s", len(groups), ", ".join(groups), len(subsets),
                args.step)

    if args.step == "jobs":
        config = out / "jobs" / "transfer.yaml"
        config.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in to_jsonable(args).items() if k not in ("step", "worker", "num_workers")
                    and not k.startswith("job_")}
        write_config(config, settings, "transfer.py settings of the jobs in this directory")
        fields = {"cpus": args.job_cpus, "gpus": args.job_gpus, "timeout": args.job_timeout}
        paths = write_jobs(out, read_template(args.job_template), config, args.num_workers, fields, args.job_name)
        logger.info("wrote %d job scripts: %s", len(paths), ", ".join(str(p) for p in paths))
        return {"step": "jobs", "jobs": paths}

    pad = tokenizer.pad_token_id
    held_out = load_held_out(out, groups)
    if args.step == "real":
        trained = run_cells(out, subsets, base_settings(args.fine_tune_config), held_out, train, pad, args.worker,
                            args.num_workers, args.device, args.batch_size)
        base = base_scores(out, model_args.model_name_or_path, held_out, pad, args.device, args.batch_size)
        matrix = collect_matrix(out, subsets, groups, base)
        if matrix["missing"]:
            logger.warning("the matrix lacks %d cell(s) (other workers', or not run yet): %s", len(matrix["missing"]),
                           ", ".join(matrix["missing"]))
        logger.info("wrote %s", out / "matrix.csv")
        return {"step": "real", "trained": trained, "matrix": matrix}

    if args.step == "estimate":
        meta_init = args.meta_init or str(cell_paths(out, tuple(groups))[1] / "final")
        if not (Path(meta_init) / "adapter_config.json").is_file():
            raise UsageError(f"--meta_init {meta_init} is not a LoRA adapter directory: fine-tune the cell of all "
                             "groups first (--step real with a plan that has it, and use_lora without merge_lora in "
                             "--fine_tune_config), or pass --meta_init")
        model = load_causal_lm(meta_init, dtype="float32", device=args.device, merge_adapter=False,
                               flag="--meta_init")
        settings = {"meta_init": fingerprint(meta_init), "projection_dim": args.projection_dim,
                    "projection_seed": args.projection_seed, "gradient_dtype": args.gradient_dtype,
                    "scale": args.scale, "l2": args.l2, "check_examples": args.check_examples}
        estimates = run_estimates(out, model, subsets, held_out, load_train(out, groups), pad, settings,
                                  args.batch_size)
        logger.info("wrote %s; best subset by estimate per target: %s", out / ESTIMATE_DIR / "estimates.json",
                    estimates["best_by_estimate"])
        return {"step": "estimate", "estimates": estimates}

    matrix_path, estimates_path = out / "matrix.json", out / ESTIMATE_DIR / "estimates.json"
    for path, step in ((matrix_path, "real"), (estimates_path, "estimate")):
        if not path.is_file():
            raise UsageError(f"{path} does not exist: run --step {step} first")
    result = compare(json.loads(matrix_path.read_text(encoding="utf-8")),
                     json.loads(estimates_path.read_text(encoding="utf-8")), out)
    logger.info("estimates vs real on %d cells: Spearman %s, relative squared error %.4g; wrote %s", result["cells"],
                result["spearman"], result["relative_squared_error"], out / "comparison.json")
    return {"step": "compare", "comparison": result}


if __name__ == "__main__":
    run_cli(main, [TransferArguments], __doc__)
