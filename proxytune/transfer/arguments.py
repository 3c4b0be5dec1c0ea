"""The flags of transfer.py: the sources, the fine-tune every cell runs, the plan, the step, workers and jobs, and the
first-order estimate's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxytune.foundation.errors import raise_problems
from proxytune.foundation.validation import SEED_MAX, number_problems

STEPS = ("real", "jobs", "estimate", "compare")


@dataclass
class TransferArguments:
    sources: str | None = field(default=None, metadata={
        "help": "The sources file (YAML): the groups of training data (docs/which-data.md). Required."})
    fine_tune_config: list[str] = field(default_factory=list, metadata={
        "help": "fine_tune.py config file(s) every cell runs with (model, LoRA, max_length, steps, ...); the cell "
                "sets dataset_path and output_dir. The estimate needs use_lora without merge_lora."})
    output_dir: str = field(default="outputs/transfer", metadata={
        "help": "Where groups/, subsets/, cells/, estimate/, the matrix and the comparison go; re-running the same "
                "command resumes."})
    step: str = field(default="real", metadata={
        "help": "real: fine-tune and score the plan's cells (this worker's share), then write the matrix; jobs: "
                "write one batch-job script per worker instead; estimate: the first-order estimates of the plan's "
                "subsets; compare: estimates against the real cells.", "choices": list(STEPS)})
    plan: str = field(default="every", metadata={
        "help": "Training subsets, comma-separated kinds: every (all combinations), alone, all, leave_one_out, pairs, "
                "random:N:K (N random subsets of K groups), with:G:K (every subset of at most K groups holding G)."})
    subsets: str | None = field(default=None, metadata={
        "help": "An explicit list instead of --plan: groups joined by '+', subsets by ',' (A+B,A,B)."})
    held_out_percentage: float = field(default=20.0, metadata={
        "help": "Share of each group's rows held out: every cell and estimate is scored on them."})
    seed: int = field(default=0, metadata={"help": "Seed of the group splits and of random:N:K plans."})
    worker: int = field(default=0, metadata={"help": "This worker's number (0-based): it runs cells worker, "
                                             "worker + num_workers, ..."})
    num_workers: int = field(default=1, metadata={"help": "How many workers share the cells (--step real, jobs)."})
    job_template: str | None = field(default=None, metadata={
        "help": "--step jobs: a job-script template with fields {job_name} {cpus} {gpus} {timeout} {args} {workdir} "
                "(default: a Slurm script)."})
    job_name: str = field(default="transfer", metadata={"help": "--step jobs: job names are <job_name>-<worker>."})
    job_cpus: int = field(default=4, metadata={"help": "--step jobs: the {cpus} field."})
    job_gpus: int = field(default=1, metadata={"help": "--step jobs: the {gpus} field."})
    job_timeout: str = field(default="04:00:00", metadata={"help": "--step jobs: the {timeout} field."})
    meta_init: str | None = field(default=None, metadata={
        "help": "--step estimate: θ0, a LoRA adapter directory fine-tuned on all groups. Default: the matrix's cell "
                "of all groups (cells/<A+B+...>/final), which --plan every or all trains."})
    projection_dim: int = field(default=200, metadata={
        "help": "--step estimate: dimensions the per-example LoRA gradients are projected to (the paper: 100-400)."})
    projection_seed: int = field(default=0, metadata={"help": "--step estimate: seed of the ±1/√d projection."})
    gradient_dtype: str = field(default="float32", metadata={
        "help": "--step estimate: how the projected gradients are stored.", "choices": ["float32", "float16"]})
    scale: float = field(default=0.02, metadata={
        "help": "--step estimate: the norm of each subset's step Δ, relative to θ0's LoRA parameters' norm "
                "(the authors' --scale); 0 scores θ0 itself."})
    l2: float = field(default=1.0, metadata={
        "help": "--step estimate: L2 penalty of the logistic regression (on the mean loss over the subset)."})
    check_examples: int = field(default=16, metadata={
        "help": "--step estimate: examples per subset on which the linearisation is checked against a forward pass."})
    batch_size: int = field(default=8, metadata={"help": "Batch size of the forward passes that score held-out data."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... Default: cuda when there is one."})

    def __post_init__(self):
        problems = number_problems(self, {
            "held_out_percentage": ("(0, 100)", "each group needs held-out rows"), "seed": f"[0, {SEED_MAX}]",
            "worker": "[0, inf)", "num_workers": "[1, inf)", "job_cpus": "[0, inf)", "job_gpus": "[0, inf)",
            "projection_dim": "[1, inf)", "projection_seed": f"[0, {SEED_MAX}]", "scale": "[0, inf)",
            "l2": "(0, inf)", "check_examples": "[0, inf)", "batch_size": "[1, inf)"})
        if not self.sources:
            problems.append("--sources is required: a YAML file of groups (docs/which-data.md)")
        if self.worker >= self.num_workers:
            problems.append(f"--worker {self.worker} must be below --num_workers {self.num_workers}")
        raise_problems(problems)
