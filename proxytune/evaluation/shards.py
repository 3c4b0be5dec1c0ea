"""Running on several processes: one shard of examples each, merged by rank 0."""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path

from proxytune.evaluation.arguments import GenerationArguments, ModelArguments, OutputArguments
from proxytune.evaluation.generation import build_inputs, generate, score_references
from proxytune.evaluation.scores import check_decisions
from proxytune.evaluation.systems import describe_system, load_blend, load_models, resolve_decoding, resolve_systems
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import write_json
from proxytune.foundation.progress import progress_bar
from proxytune.models.quantization import loaded_bits, loaded_quantization
from proxytune.steering.blend import is_steering
from proxytune.steering.decoding import model_context
from proxytune.steering.records import run_template
from proxytune.task.papers import DataArguments, load_examples, select_examples
from proxytune.task.processing import check_max_length
from proxytune.training.classification import read_classifier_info

logger = logging.getLogger(__name__)


SHARD_FORMAT = "evaluation-shard-v1"


def resolve_sharding(out_args: OutputArguments) -> tuple[int, int, bool]:
    """(shard_index, num_shards, launched_by_torchrun): flags win, else RANK/WORLD_SIZE, else one process."""
    if out_args.num_shards is not None or out_args.shard_index is not None:
        return out_args.shard_index or 0, out_args.num_shards or 1, False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return int(os.environ.get("RANK", "0")), world, True
    return 0, 1, False


def shard_path(output_dir: Path, index: int, num_shards: int) -> Path:
    return output_dir / "shards" / f"shard-{index:05d}-of-{num_shards:05d}.json"


def write_shard(path: Path, shard: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, shard)


def merge_shards(output_dir: Path, num_shards: int | None) -> dict:
    """Read every shard file of one run; refuse missing shards and shards of different runs."""
    files = sorted((output_dir / "shards").glob("shard-*-of-*.json"))
    counts = {int(f.stem.split("-of-")[1]) for f in files}
    if num_shards is None or num_shards == 1:
        if len(counts) != 1:
            raise UsageError(f"{output_dir}/shards holds shards of {sorted(counts) or 'no'} run sizes; "
                             "pass --num_shards N (or re-run the shards)")
        (num_shards,) = counts
    shards = []
    for k in range(num_shards):
        path = shard_path(output_dir, k, num_shards)
        if not path.is_file():
            raise UsageError(f"shard {k} of {num_shards} is missing ({path}); run it with --shard_index {k} "
                             f"--num_shards {num_shards}")
        shards.append(json.loads(path.read_text(encoding="utf-8")))
    if {s["run_key"] for s in shards} != {shards[0]["run_key"]}:
        raise UsageError(f"the shards in {output_dir}/shards come from different runs (models, data or "
                         "settings differ); re-run all shards with the same flags")
    merged = {**shards[0], "examples": [], "records": []}
    for s in shards:
        merged["examples"] += s["examples"]
        merged["records"] += s["records"]
    merged["examples"].sort(key=lambda e: e["position"])
    return merged


def wait_for_ranks(timeout: float) -> bool:
    """Barrier across torchrun/accelerate processes (gloo, so it works on CPU too). Returns True if this
    call set up the process group (and should tear it down)."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise UsageError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or accelerate "
                             "launch, or shard by hand with --shard_index/--num_shards and --merge_only")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
        created = True
    dist.barrier()
    return created


def run_key(run_info: dict, example_ids: list[str]) -> str:
    """What must agree between shards of one run (not the date)."""
    keyed = {k: v for k, v in run_info.items() if k not in ("date", "device")}
    return hashlib.sha1(json.dumps([keyed, example_ids], sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_shard(model_args: ModelArguments, data_args: DataArguments, gen_args: GenerationArguments,
                   out_args: OutputArguments, shard_index: int, num_shards: int, device: str) -> dict:
    """Load data and models, generate (and score references) for this process's share of the examples."""
    systems = resolve_systems(model_args)
    decoding = resolve_decoding(gen_args, systems)
    blend = load_blend(model_args) if "steered" in systems else None
    rows = load_examples(data_args)
    positions = select_examples(len(rows), data_args.num_examples, data_args.seed)
    selected = [{**rows[i], "position": p} for p, i in enumerate(positions)]
    if out_args.decision_classifier:  # before an hour of generation
        check_decisions(selected, read_classifier_info(out_args.decision_classifier), out_args.decision_classifier,
                        f"{data_args.dataset_path} (split {data_args.split}, column '{data_args.decision_column}')")
    template = run_template(data_args.prompt_template, model_args.small_tuned_model, model_args.blend,
                            data_args.dataset_path)
    tokenizer, models = load_models(model_args, systems, device)

    check_max_length(tokenizer, data_args.max_length, template=template)
    max_new = max(s["max_new_tokens"] for s in decoding.values())

    context = min(model_context(models), data_args.max_length)
    prompt_budget = context - max_new
    if prompt_budget < 16:
        raise UsageError(f"only {prompt_budget} prompt tokens are left (context {context} - max_new_tokens "
                         f"{max_new}); raise --max_length or lower --max_new_tokens")
    mine = [ex for ex in selected if ex["position"] % num_shards == shard_index]
    build_inputs(mine, tokenizer, prompt_budget, context, template)
    paths = model_args.model_paths()
    bits = loaded_bits(models)
    run_info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset_path": data_args.dataset_path, "split": data_args.split, "n_examples": len(selected),
        "rows_in_split": len(rows), "seed": data_args.seed,
        "systems": {s: {"model": describe_system(s, paths, blend, bits), "decoding": decoding[s]} for s in systems},
        "blend": blend.to_dict() if blend is not None else None,
        "tokenizer": model_args.tokenizer_name or paths.get("large") or next(iter(paths.values())),
        "context": context, "max_length": data_args.max_length, "prompt_token_budget": prompt_budget,
        "prompt_template": template.describe(), "dtype": model_args.dtype, "device": device,
        # Each loaded model's quantisation (bits, quant type, double quant, compute dtype), as blend.json records it.
        "quantization": {role: loaded_quantization(model) or "none" for role, model in models.items()},
        "compute_perplexity": out_args.compute_perplexity, "bootstrap_samples": out_args.bootstrap_samples,
        "confidence": out_args.confidence, "shards": num_shards, "versions": library_versions(),
    }
    logger.info("evaluating %s on %d of %d examples of %s[%s] (this shard: %d); prompt budget %d tokens, "
                "decoding %s", ", ".join(systems), len(selected), len(rows), data_args.dataset_path,
                data_args.split, len(mine), prompt_budget, json.dumps(decoding))
    n_new = sum(decoding[s]["max_new_tokens"] for s in systems) * len(mine)
    logger.info("work: up to %d new tokens (%d examples x %d systems x up to %d tokens%s); the progress bar's ETA "
                "is the estimate%s", n_new, len(mine), len(systems), max_new,
                "; 'steered' runs three models per token" if "steered" in systems else "",
                "" if data_args.num_examples is None else "; --all_examples evaluates the whole split")
    if "steered" in systems and not is_steering(blend):
        logger.warning("the blend (%s) does not steer the large model with the small pair: 'steered' is %s",
                       blend.describe(), describe_system("steered", paths, blend, bits))
    n_cut = sum(ex["reference_cut"] for ex in mine)
    if n_cut and out_args.compute_perplexity:
        logger.warning("%d references alone fill the %d-token context; they are scored on their first tokens",
                       n_cut, context)
    records = []
    with progress_bar(total=len(mine) * len(systems), desc="generate", unit="example") as progress:
        for system in systems:
            progress.set_postfix_str(system)
            records += generate(system, mine, models, blend, decoding[system], tokenizer, gen_args.batch_size,
                                data_args.seed, progress, gen_args.speculative)
    if out_args.compute_perplexity and mine:
        nll = score_references(systems, mine, models, blend, tokenizer, gen_args.batch_size)
        by_id = {ex["example_id"]: k for k, ex in enumerate(mine)}
        for rec in records:
            rec["nll"], rec["target_tokens"] = nll[rec["system"]][by_id[rec["example_id"]]]
    return {
        "format": SHARD_FORMAT, "run_key": run_key(run_info, [ex["example_id"] for ex in selected]),
        "shard_index": shard_index, "num_shards": num_shards, "run_info": run_info,
        "examples": [{"example_id": ex["example_id"], "position": ex["position"], "index": ex["index"],
                      "input": ex["Input"], "reference": ex["Output"], "prompt_truncated": ex["prompt_truncated"],
                      "decision": ex["decision"]}
                     for ex in mine],
        "records": records,
    }


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("torch", "transformers", "rouge-score", "openpyxl")}
