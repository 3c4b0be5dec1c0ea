"""The steering lab's models through lm-evaluation-harness: MReD test papers as local harness tasks (issue 31).

After `bench/steering_lab.py` has trained and evaluated its models, this script writes three local tasks from the
same test papers, with the same prompts, and evaluates S, S_tuned, L, L_tuned with the harness's own `hf` backend and
L steered by (S, S_tuned) at alpha = 1 with ours (`proxytune-steered`), each through `lm_eval.simple_evaluate`:

- `mred_reference`: the meta-review given the reviews (output_type loglikelihood): context = evaluation.py's scoring
  prompt, continuation = " " + meta-review + EOS. The reference NLL the lab's evaluation.py measured, per token, so
  the two must agree; the record prints both and the largest per-paper difference.
- `mred_decision`: accept or reject (two-choice log-likelihood, `acc`) after the prompt and " Decision:", beside the
  majority class's rate. At the lab's size expect chance: the models never saw a decision cue.
- `mred_meta_review`: the meta-review alone (loglikelihood_rolling): word perplexity and bits per byte.

    python bench/harness_lab.py                           # the full lab's models (outputs/lab), record -> RESULTS.md
    python bench/harness_lab.py --smoke                   # the smoke lab's (outputs/lab-smoke), record there

Needs lm-eval (`pip install lm-eval==0.4.13`). Tasks and per-document results go to WORK_DIR/harness/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import ROOT, record  # noqa: E402
from steering_lab import SYSTEMS, LabArguments, evaluation_data, resolve_lab  # noqa: E402

try:
    import lm_eval  # noqa: F401  (an optional extra)
except ImportError as missing:
    sys.exit(f"bench/harness_lab.py needs lm-eval ({missing}): pip install lm-eval==0.4.13")

import proxytune.integrations.harness  # noqa: F401  (registers the proxytune-steered model type)
from proxytune.evaluation.arguments import ARGUMENT_TYPES
from proxytune.evaluation.generation import build_inputs
from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.foundation.outputs import write_json
from proxytune.models.loading import load_causal_lm, load_tokenizer
from proxytune.steering.decoding import model_context
from proxytune.task.papers import load_examples, select_examples

logger = logging.getLogger("harness_lab")

TASKS = ("mred_reference", "mred_decision", "mred_meta_review")
# (label, lab model name for the hf backend, or None: the steered blend through proxytune-steered)
HARNESS_SYSTEMS = (("S", "small"), ("S_tuned", "small_tuned"), ("L", "large"), ("L_tuned", "large_tuned"),
                   ("steered L, alpha=1", None))
LAB_SYSTEM = {label: system for label, run, system in SYSTEMS if run == "main"}  # label -> evaluation.py's system


@dataclass
class HarnessLabArguments:
    work_dir: str | None = field(default=None, metadata={
        "help": "The steering lab's work directory (default: outputs/lab, or outputs/lab-smoke with --smoke)."})
    smoke: bool = field(default=False, metadata={"help": "The smoke lab's models; the record stays in its work dir."})
    batch_size: int = field(default=8, metadata={"help": "The harness's batch size."})
    results_file: str | None = field(default=None, metadata={
        "help": "Where the record goes (default: bench/RESULTS.md; with --smoke, WORK_DIR/RESULTS.md)."})
    no_record: bool = field(default=False, metadata={"help": "Print the table only."})


def decision_label(value) -> int | None:
    """0 = accept, 1 = reject, None = neither ('Accept (Poster)' is an accept; 'Withdrawn' is neither)."""
    text = str(value or "").strip().lower()
    return 0 if text.startswith("accept") else 1 if text.startswith("reject") else None


def write_tasks(lab, root: Path) -> list[dict]:
    """The test papers as JSONL and three task YAMLs (JSON is YAML) in `root`; returns the documents."""
    data_args = parse_config(ARGUMENT_TYPES, evaluation_data(lab))[1]  # (model, data, generation, ...)
    rows = load_examples(data_args)
    examples = [rows[i] for i in select_examples(len(rows), data_args.num_examples, data_args.seed)]
    tokenizer = load_tokenizer(lab.model("large"), padding_side="left")
    tokenizer.model_max_length = int(1e30)
    context = min(model_context({"large": load_causal_lm(lab.model("large"))}), data_args.max_length)
    build_inputs(examples, tokenizer, context - lab.profile.max_new_tokens, context)  # evaluation.py's own prompts
    docs = []
    for ex in examples:
        docs.append({"example_id": ex["example_id"],
                     "prompt": tokenizer.decode(ex["score_prompt_ids"]),
                     "reference": tokenizer.decode(ex["target_ids"]),  # " " + meta-review (+ EOS, as text)
                     "meta_review": ex["Output"], "target_tokens": len(ex["target_ids"]),
                     "label": decision_label(ex.get("decision"))})
    root.mkdir(parents=True, exist_ok=True)
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    decided = root / "test_decided.jsonl"
    decided.write_text("".join(json.dumps(d) + "\n" for d in docs if d["label"] is not None), encoding="utf-8")
    cache = str(root / "datasets_cache")
    source = lambda path: {"dataset_path": "json", "test_split": "test",  # noqa: E731
                           "dataset_kwargs": {"data_files": {"test": str(path)}, "cache_dir": cache}}
    tasks = {
        "mred_reference": {**source(data), "output_type": "loglikelihood", "doc_to_text": "{{prompt}}",
                           "doc_to_target": "{{reference}}", "target_delimiter": "",
                           # the per-token NLL is summed here from the samples ("perplexity" would exponentiate a
                           # document's whole log-likelihood, thousands of nats); "acc": is the reference greedy
                           "metric_list": [{"metric": "acc"}]},
        "mred_decision": {**source(decided), "output_type": "multiple_choice", "doc_to_text": "{{prompt}} Decision:",
                          "doc_to_choice": ["accept", "reject"], "doc_to_target": "label",
                          "metric_list": [{"metric": "acc"}]},
        "mred_meta_review": {**source(data), "output_type": "loglikelihood_rolling", "doc_to_text": "",
                             "doc_to_target": "{{meta_review}}",
                             "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]},
    }
    for name, config in tasks.items():
        (root / f"{name}.yaml").write_text(json.dumps({"task": name, **config}, indent=1), encoding="utf-8")
    return docs


def harness_run(model: str, model_args: str, root: Path, batch_size: int) -> dict:
    """lm_eval.simple_evaluate on the local tasks: {task: {"metrics": ..., "scores": per-doc first response}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), log_samples=True,
                                      task_manager=TaskManager(include_path=str(root), include_defaults=False),
                                      batch_size=batch_size, device="cpu")
    out = {}
    for task in TASKS:
        samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
        metrics = {k: v for k, v in results["results"][task].items() if isinstance(v, (int, float))}
        scores = []
        for s in samples:
            resp = s["filtered_resps"]
            first = resp[0] if isinstance(resp, list) else resp
            scores.append(float(first[0] if isinstance(first, (list, tuple)) else first))
        out[task] = {"metrics": metrics, "scores": scores}
    return out


def lab_nll(lab, label: str) -> dict[str, tuple[float, int]]:
    """{example_id: (reference NLL in nats, target tokens)} from the lab's evaluation.py run (greedy; NLL does not
    depend on the decoding)."""
    path = lab.eval_dir / "greedy" / "main" / "predictions.jsonl"
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return {r["example_id"]: (float(r["nll"]), int(r["target_tokens"])) for r in recs
            if r["system"] == LAB_SYSTEM[label]}


def main(args: HarnessLabArguments) -> dict:
    setup_logging()
    lab = resolve_lab(LabArguments(work_dir=args.work_dir, smoke=args.smoke))
    if not (lab.eval_dir / "greedy" / "main" / "predictions.jsonl").is_file():
        raise UsageError(f"{lab.work} has no finished steering lab (no eval/test/greedy/main/predictions.jsonl): run "
                         f"python bench/steering_lab.py{' --smoke' if args.smoke else ''} first")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    root = lab.path("harness")
    docs = write_tasks(lab, root)
    tokenizer_dir = lab.model("large")
    per_system = {}
    for label, name in HARNESS_SYSTEMS:
        if name is None:
            model, model_args = "proxytune-steered", (
                f"large_model={lab.model('large')},small_base_model={lab.model('small')},"
                f"small_tuned_model={lab.model('small_tuned')},alpha=1.0,large_device=cpu")
        else:
            model, model_args = "hf", f"pretrained={lab.model(name)},tokenizer={tokenizer_dir},dtype=float32"
        logger.info("%s: lm_eval %s %s", label, model, model_args)
        per_system[label] = harness_run(model, model_args, root, args.batch_size)
    write_json(root / "results.json", per_system)

    tokens = sum(d["target_tokens"] for d in docs)
    labels = [d["label"] for d in docs if d["label"] is not None]
    majority = max(labels.count(0), labels.count(1)) / len(labels) if labels else float("nan")
    rows, worst = [], 0.0
    for label, _ in HARNESS_SYSTEMS:
        res = per_system[label]
        harness_nll = -sum(res["mred_reference"]["scores"]) / tokens
        ours = lab_nll(lab, label)
        lab_total = sum(ours[d["example_id"]][0] for d in docs)
        diffs = [abs(-s - ours[d["example_id"]][0]) for s, d in zip(res["mred_reference"]["scores"], docs)]
        worst = max(worst, max(diffs))
        dec, roll = res["mred_decision"]["metrics"], res["mred_meta_review"]["metrics"]
        rows.append((label, f"{harness_nll:.4f}", f"{lab_total / tokens:.4f}", f"{max(diffs):.2g}",
                     f"{dec.get('acc,none', math.nan):.2f} ± {dec.get('acc_stderr,none', math.nan):.2f}",
                     f"{roll.get('word_perplexity,none', math.nan):.1f}",
                     f"{roll.get('bits_per_byte,none', math.nan):.3f}"))
    header = ("system", "reference NLL/token, harness", "same, lab's evaluation.py",
              "largest per-paper difference (nats)", "decision acc ± stderr", "meta-review word ppl", "bits/byte")
    where = lab.work.relative_to(ROOT) if lab.work.is_relative_to(ROOT) else lab.work
    notes = (f"{len(docs)} test papers of the steering lab's work dir `{where}` "
             f"({tokens:,} reference tokens; decision task on the {len(labels)} accept/reject papers, majority class "
             f"{majority:.2f}). S, S_tuned, L, L_tuned: the harness's `hf` backend (float32, CPU); steered: "
             "`proxytune-steered` with the three models and alpha = 1. Each through `lm_eval.simple_evaluate` on the "
             "local tasks `bench/harness_lab.py` wrote (prompts = evaluation.py's scoring prompts, decoded). The "
             f"harness and the lab agree to {worst:.2g} nats per paper at most on the reference NLL (the same tokens "
             "scored by two code paths; differences are float32 summation order).")
    width = max(len(h) for h in header)
    for row in rows:
        logger.info("  ".join(f"{c:>{min(width, 14)}}" for c in row))
    logger.info(notes)
    if not args.no_record:
        results = Path(args.results_file) if args.results_file else (
            lab.work / "RESULTS.md" if args.smoke else ROOT / "bench" / "RESULTS.md")
        record("Steering lab through lm-evaluation-harness: MReD test papers as local tasks", rows, header, notes,
               results=results, bench="harness_lab")
        logger.info("recorded in %s", results)
    return {"rows": rows, "worst_diff": worst, "per_system": per_system}


if __name__ == "__main__":
    run_cli(main, [HarnessLabArguments], __doc__)
