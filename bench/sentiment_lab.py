"""Does steering carry RL from a small model to a large one? The Mini-ChatGPT recipe offline (issue 26).

The tutorial this project grew from tunes GPT-2 with PPO so that it continues IMDB reviews positively
(docs/rl-from-a-reward.md). This lab runs that recipe on the steering lab's IMDB-pretrained S and L
(bench/steering_lab.py's WORK_DIR/small/final and large/final, read in place, never written), through the project's
own scripts, and asks whether L steered by the small pair (S, S_rl) gets the positive continuations that RL on L itself
gets, without losing L's fluency:

    python bench/sentiment_lab.py --threads 1               # the full profile: about 22 min on 1 core; cached
    python bench/sentiment_lab.py --smoke                   # on outputs/lab-smoke: tiny, under a minute

The real thing, on one GPU with the Hub (--preset pythia): S = EleutherAI/pythia-70m (RL-tuned), L =
EleutherAI/pythia-410m or -1.4b (steered; L_rl = RLOO on L), Pythia's tokenizer, the reviews from ../shared when present
else the Hub's stanfordnlp/imdb (train + test), the "pythia" profile (8,000 reviews per classifier cut to 128 tokens,
1,000 RL steps of 64 completions, 1,024 held-out prompts), bf16 mixed precision for the classifiers and RLOO (our PPO
refuses --bf16 and trains in float32), device cuda when available (--device to choose):

    python bench/sentiment_lab.py --preset pythia --large 410m      # ESTIMATE: 25-35 min on one A100 80GB
    python bench/sentiment_lab.py --preset pythia --large 1.4b      # ESTIMATE: 35-50 min on one A100 80GB
    python bench/sentiment_lab.py --preset pythia --smoke           # the same path, tiny sizes: a few minutes

Those times are an ESTIMATE, not a measurement: no GPU run of the preset has been made (its smoke path is tested on
tiny random models under the Pythia ids, on CPU), and the profile's learning rates are the usual ones for pretrained
models of these sizes, not piloted. How the estimate is made: compute at 6N FLOPs per trained token and 2N per
forward token (N = non-embedding parameters + output head: 45M, 354M, 1.31B) at an assumed 100 TFLOP/s sustained in
bf16 on an A100 (a third of its 312 peak): the judge on 0.9M tokens is 1.7 PFLOP (410m) or 6.7 PFLOP (1.4b), under
2 min; RL on L is 1.5M tokens x ~12N (sampling, policy forward and backward, reference, reward) = 6.5 or 24 PFLOP, 1-4
min. FLOPs do not bound it: sampling 16 tokens a step in batches of 64 is latency-bound, assumed ~0.4 ms per layer
per decoding step (eager PyTorch kernel launches; 6 layers in 70m, 24 in 410m and 1.4b), plus ~0.1-0.2 s of Trainer
overhead a step: ~0.3 s a step on S (RLOO and PPO: 10-12 min), 0.5-1.0 s on L (rl_large: 8-17 min); evaluation
3-6 min; about 1 min of model loading per script run (11 runs) and the Hub download (0.9 or 2.9 GB). The CPU stage
times below were not scaled: their models are too small for a FLOP ratio to carry the GPU's latency floor. H100:
about 0.7-0.8x the A100's time (the latency-bound part does not follow its FLOPs). In money, at an assumed $1.5-2 an
hour (A100) or $2.5-3.5 (H100), about $1-3 a run. Memory: RLOO on 1.4b with float32 master weights, Adam, gradients
and the reference is about 30 GB, so a 40 GB card should do. Replace this estimate with the record's measured stage
times after the first real run.

Stages (each under --work_dir, reused when the settings recorded beside it, <stage>.stage.json, are today's: its
command line, the steering lab's models, the stages it reads; one made with other settings runs again, with the
stages after it, and a log line names the change):

1. split: the shared IMDB file (IMDB's `<br />` line breaks as spaces), shuffled by --seed and cut into two disjoint
   halves. Half A gives the reward classifier's rows, the RL training prompts and the held-out evaluation prompts (three
   disjoint sets); half B the judge's rows. The prompts are a saved DatasetDict (train, validation), so rl_tune.py
   trains on `train` and scores its before/after on `validation`, which evaluation.py --text_dataset continues too.
2. reward, judge: `fine_tune.py --task classification --classification_input text --label_map
   neg=negative,pos=positive`, the reward from S's weights on half A, the judge from L's weights on half B: other
   texts and another model, so a gain the judge does not share is the reward model's quirk being exploited.
3. rl_rloo, rl_ppo: `rl_tune.py --method rloo` (TRL) and `--method ppo` (ours) on S, the reward classifier's
   'positive' logit as the reward (the tutorial's), prompts of 2-8 tokens, completions of 4-16; the same completions
   per step for both. rl_large: `--method rloo` on L with the same settings, the upper bound (L_rl).
4. evaluate: `evaluation.py --text_dataset` on the held-out prompts, every system sampled at temperature 1 (the
   tutorial's decoding) with the same seed: S, S_rl (each method), L, L_rl, and L steered by (S, S_rl) at alpha 0.5,
   1, 2; per system the judge's and the reward's positive rate, fluency perplexity of the continuation under L (the
   largest model here; it favours L's own samples, which are the baseline), distinct-1/2, length, with evaluation.py's
   bootstrap intervals (one run per S_rl and alpha: the same prompts and resamples in each).
5. report: a record in bench/RESULTS.md (smoke: WORK_DIR/RESULTS.md) with the targets (steered L gains >= 80% of
   L_rl's judge positive-rate gain over L, paired bootstrap over prompts; fluency perplexity <= 1.5x L's and below
   S_rl's), met or missed by how much, stage times and three continuations per system; the figure (positive rate
   against fluency, one point per system) in assets/sentiment_lab.png (smoke: WORK_DIR/sentiment_lab.png).

The full profile's plan, about 22 minutes on 1 core (`--threads 1`). Rates measured in pilots on the steering lab's
S (d=64 x 2) and L (d=256 x 4) with 1 torch thread while other jobs shared the 2 cores (load 2.5-3), so a quiet core
should be faster; the smoke profile's stage times (about 1 s each) say nothing about these models:

| stage | work | measured rate | minutes |
| --- | --- | --- | --- |
| split | 39k reviews read, shuffled, written | 1-2 s | 0.1 |
| reward (S) | 3,600 reviews x 64 tokens, 1 epoch (225 steps of 16) | 22 steps/s + ~25 s loading/eval | 0.6 |
| judge (L) | the same on half B | 2.0 steps/s + ~25 s | 2.3 |
| rl_rloo (S) | 250 steps of 8 prompts x 4 completions | 0.5-0.8 s/step + ~15 s | 3.5 |
| rl_ppo (S) | 250 steps of 32 prompts x 1, 4 PPO epochs | 0.8 s/step + ~15 s | 3.6 |
| rl_large (L) | 250 RLOO steps as rl_rloo | 1.5-2.1 s/step + ~20 s | 7.4 |
| evaluate | 6 runs, 512 prompts: 5 plain systems, 6 steered | 20-28 steered, ~60 plain prompts/s | 4.0 |
| **total** | | | **21.5** |

Why these sizes: the classifiers read the first 64 tokens (the texts they score are 6-24 tokens; 1 epoch of 3,600
reviews reached held-out accuracy 0.72 (S, lr 3e-3) and 0.70 (L, lr 1e-3) in the pilots, majority 0.49); RLOO at lr
1e-3 raised S's held-out positive rate (reward) 0.56 -> 0.70 in 60 steps and L's 0.56 -> 0.77, PPO at lr 3e-4 0.56 ->
0.70 (lr 1e-3 cut its completions short at KL 5): 250 steps should move them clearly, and more would not fit; 512
held-out prompts give a positive rate's 95% interval about +-4 points.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import ROOT, fit_stage, lab_stage_times, record  # noqa: E402

import evaluation
import fine_tune
import rl_tune
from proxytune.evaluation.arguments import ARGUMENT_TYPES
from proxytune.foundation.cli import run_cli, setup_logging
from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError, first_line
from proxytune.foundation.outputs import write_json
from proxytune.foundation.statistics import bootstrap_interval, resample_indices
from proxytune.models.loading import default_device
from proxytune.preference.arguments import parse_args as parse_rl_args
from proxytune.training.arguments import parse_args as parse_fine_tune_args

logger = logging.getLogger("sentiment_lab")

IMDB = ROOT.parent / "shared" / "data" / "imdb" / "imdb_partial.jsonl.gz"
HUB_IMDB = "stanfordnlp/imdb"  # --preset pythia's reviews where ../shared is absent (train + test, 50k labelled)
PYTHIA_SMALL = "EleutherAI/pythia-70m"
# --preset pythia --large: the judge's learning rate (classification from L's weights; S's reward classifier gets the
# profile's reward_lr). A guess scaled as the steering lab's fine-tuning rates (a tenth of Pythia's pretraining peak
# halved for a classification head), not tuned.
PYTHIA_JUDGE_LR = {"410m": 2e-5, "1.4b": 1e-5}
LABEL_MAP = "neg=negative,pos=positive"  # the shared file's labels, named so that --reward_label positive reads them
POSITIVE = "positive"
PROMPT_LENGTH, COMPLETION_LENGTH = "2,8", "4,16"  # the tutorial's
ALPHAS = (0.5, 1.0, 2.0)
METHODS = ("rloo", "ppo")
LAB_STAGES = ("pretrain_small", "pretrain_large")  # the steering lab's stages whose outputs are read
# Targets (issue 26): steered L's judge positive-rate gain over L at least this share of L_rl's; its fluency perplexity
# at most this multiple of L's (and below S_rl's).
GAIN_TARGET = 0.80
FLUENCY_TARGET = 1.5
QUIET = ["--disable_tqdm", "true", "--report_to", "none"]


@dataclass(frozen=True)
class Profile:
    """Everything that sets the lab's size."""

    classifier_rows: int  # training rows of each classifier (10% of them held out for its accuracy)
    classifier_max_length: int  # a review is cut to its first tokens (the head kept), the cue included
    classifier_epochs: float
    classifier_batch: int
    reward_lr: float  # the reward classifier's (from S) learning rate
    judge_lr: float  # the judge's (from L)
    prompt_rows: int  # RL training texts (a prompt is each one's first 2-8 tokens)
    eval_prompts: int  # held-out texts continued by every system
    rl_steps: int
    rl_prompts: int  # prompts per step; RLOO samples rl_generations completions of each, PPO one of as many prompts
    rl_generations: int
    rloo_lr: float
    rloo_beta: float  # RLOO's fixed KL coefficient
    ppo_lr: float
    ppo_init_kl: float  # PPO's starting KL coefficient (adapted toward its target)
    large_rl: bool  # L_rl (RLOO on L, same settings): the upper bound
    eval_batch: int
    bootstrap_samples: int


PROFILES = {
    # The plan in the docstring: pilots on the steering lab's S and L (1 torch thread, load 2.5-3 on 2 cores) gave the
    # learning rates and the time per step.
    "full": Profile(classifier_rows=4000, classifier_max_length=64, classifier_epochs=1, classifier_batch=16,
                    reward_lr=3e-3, judge_lr=1e-3, prompt_rows=8000, eval_prompts=512, rl_steps=250, rl_prompts=8,
                    rl_generations=4, rloo_lr=1e-3, rloo_beta=0.05, ppo_lr=3e-4, ppo_init_kl=0.2, large_rl=True,
                    eval_batch=32, bootstrap_samples=1000),
    "smoke": Profile(classifier_rows=64, classifier_max_length=32, classifier_epochs=1, classifier_batch=8,
                     reward_lr=1e-3, judge_lr=1e-3, prompt_rows=64, eval_prompts=12, rl_steps=3, rl_prompts=4,
                     rl_generations=2, rloo_lr=1e-3, rloo_beta=0.05, ppo_lr=1e-3, ppo_init_kl=0.2, large_rl=True,
                     eval_batch=12, bootstrap_samples=100),
    # --preset pythia: pretrained S (Pythia-70m) and L (410m or 1.4b) from the Hub, sized for one 40-80 GB GPU. Not
    # piloted: the learning rates are the usual ones for pretrained models of these sizes (RLOO/PPO 1e-5/1.41e-5, the
    # tutorial's PPO rate; classifiers 5e-5 for 70m, PYTHIA_JUDGE_LR for L), the steps 4x the CPU profile's, and 1,024
    # held-out prompts give a positive rate's 95% interval about +-3 points.
    "pythia": Profile(classifier_rows=8000, classifier_max_length=128, classifier_epochs=1, classifier_batch=32,
                      reward_lr=5e-5, judge_lr=2e-5, prompt_rows=8000, eval_prompts=1024, rl_steps=1000,
                      rl_prompts=16, rl_generations=4, rloo_lr=1e-5, rloo_beta=0.05, ppo_lr=1.41e-5, ppo_init_kl=0.2,
                      large_rl=True, eval_batch=64, bootstrap_samples=1000),
    # --preset pythia --smoke: the same path at the smoke profile's sizes (the Pythia rates).
    "pythia-smoke": Profile(classifier_rows=64, classifier_max_length=32, classifier_epochs=1, classifier_batch=8,
                            reward_lr=5e-5, judge_lr=2e-5, prompt_rows=64, eval_prompts=12, rl_steps=3, rl_prompts=4,
                            rl_generations=2, rloo_lr=1e-5, rloo_beta=0.05, ppo_lr=1.41e-5, ppo_init_kl=0.2,
                            large_rl=True, eval_batch=12, bootstrap_samples=100),
}


@dataclass
class SentimentLabArguments:
    steering_lab_dir: str | None = field(default=None, metadata={
        "help": "The steering lab's work directory, whose small/final (S) and large/final (L) are read (default: "
                "outputs/lab, or outputs/lab-smoke with --smoke)."})
    work_dir: str | None = field(default=None, metadata={
        "help": "Where every stage writes (default: outputs/sentiment_lab, or outputs/sentiment_lab-smoke)."})
    smoke: bool = field(default=False, metadata={"help": "Tiny everything: an end-to-end check in under a minute."})
    preset: str | None = field(default=None, metadata={
        "help": f"'pythia': S = {PYTHIA_SMALL} and L = EleutherAI/pythia-<--large> from the Hub instead of the "
                "steering lab's models (Pythia's tokenizer; bf16 on a GPU). With --smoke: the same path, tiny sizes."})
    large: str = field(default="410m", metadata={"help": f"L with --preset pythia: {', '.join(PYTHIA_JUDGE_LR)}."})
    data: str | None = field(default=None, metadata={
        "help": "Labelled reviews: a .jsonl or .jsonl.gz with text and label (neg/pos) fields, or (with --preset) a "
                "Hub dataset id. Default: ../shared/data/imdb/imdb_partial.jsonl.gz; with --preset, "
                f"{HUB_IMDB} where that file is absent."})
    device: str | None = field(default=None, metadata={
        "help": "Device of evaluation.py (and, on a GPU, the classifiers' and RL's Trainer). Default: cpu, or with "
                "--preset cuda when available."})
    large_rl: bool | None = field(default=None, metadata={
        "help": "Train L_rl (RLOO on L), the upper bound. Default: the profile's (on)."})
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})
    seed: int = field(default=42, metadata={"help": "Seed of the split, the training runs, sampling and bootstrap."})
    results_file: str | None = field(default=None, metadata={
        "help": "Record here (default: bench/RESULTS.md; smoke: WORK_DIR/RESULTS.md)."})
    figure: str | None = field(default=None, metadata={
        "help": "The figure (default: assets/sentiment_lab.png; smoke: WORK_DIR/sentiment_lab.png)."})
    no_record: bool = field(default=False, metadata={"help": "Print the report; write no record."})

    def __post_init__(self):
        problems = []
        if self.data is None:
            self.data = str(IMDB) if IMDB.is_file() or not self.preset else HUB_IMDB
        if self.preset not in (None, "pythia"):
            problems.append(f"--preset {self.preset}: unknown; the one preset is 'pythia' (leave it out for the "
                            "steering lab's models)")
        if self.large not in PYTHIA_JUDGE_LR:
            problems.append(f"--large {self.large}: choose from {', '.join(PYTHIA_JUDGE_LR)}")
        elif self.large != "410m" and not self.preset:
            problems.append(f"--large {self.large} needs --preset pythia")
        if self.preset and self.steering_lab_dir:
            problems.append("--steering_lab_dir does not apply with --preset pythia (S and L come from the Hub)")
        if (not self.preset or looks_local(self.data)) and not Path(self.data).expanduser().is_file():
            problems.append(f"--data {self.data} is not a file; pass a .jsonl[.gz] of labelled reviews (text, label)")
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads {self.threads} must be >= 1")
        if problems:
            raise UsageError("; ".join(problems))


@dataclass
class Lab:
    args: SentimentLabArguments
    profile: Profile
    steering: Path | None  # the steering lab's work dir (None with --preset)
    work: Path
    results_file: Path
    figure: Path
    commands: list[str] = field(default_factory=list)
    times: dict[str, dict] = field(default_factory=dict)  # stage -> {seconds, cached}
    device: str = "cpu"
    pretrained: dict[str, str] = field(default_factory=dict)  # --preset: 'small'/'large' -> Hub id

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    @property
    def small(self) -> str:
        return self.pretrained.get("small") or str(self.steering / "small" / "final")

    @property
    def large(self) -> str:
        return self.pretrained.get("large") or str(self.steering / "large" / "final")


def looks_local(source: str) -> bool:
    """'user/name' is a Hub id; an existing path, './x', '/x', '~/x', 'a/b/c' or 'x.jsonl[.gz]' is a file (as
    bench/steering_lab.py reads its sources)."""
    return (Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
            or source.endswith((".jsonl", ".jsonl.gz", ".json")))


def resolve_lab(args: SentimentLabArguments) -> Lab:
    if args.preset:
        return resolve_preset(args)
    profile = PROFILES["smoke" if args.smoke else "full"]
    if args.large_rl is not None:
        profile = Profile(**{**asdict(profile), "large_rl": args.large_rl})
    steering = Path(args.steering_lab_dir or ROOT / ("outputs/lab-smoke" if args.smoke else "outputs/lab")).resolve()
    work = Path(args.work_dir or ROOT / ("outputs/sentiment_lab-smoke" if args.smoke else "outputs/sentiment_lab"))
    work = work.resolve()
    results = Path(args.results_file) if args.results_file else (
        work / "RESULTS.md" if args.smoke else ROOT / "bench" / "RESULTS.md")
    figure = Path(args.figure) if args.figure else (
        work / "sentiment_lab.png" if args.smoke else ROOT / "assets" / "sentiment_lab.png")
    for model in ("small", "large"):
        if not (steering / model / "final" / "config.json").is_file():
            raise UsageError(f"--steering_lab_dir {steering} has no {model}/final (the steering lab's IMDB-pretrained "
                             f"{'S' if model == 'small' else 'L'}); run python bench/steering_lab.py"
                             f"{' --smoke' if args.smoke else ''} first, or pass its work directory")
    return Lab(args, profile, steering, work, results, figure)


def resolve_preset(args: SentimentLabArguments) -> Lab:
    """--preset pythia: S and L by their Hub ids, the "pythia" (or "pythia-smoke") profile with L's judge rate, the
    device from default_device() unless --device says otherwise."""
    profile = PROFILES["pythia-smoke" if args.smoke else "pythia"]
    profile = Profile(**{**asdict(profile), "judge_lr": PYTHIA_JUDGE_LR[args.large],
                         **({} if args.large_rl is None else {"large_rl": args.large_rl})})
    name = f"pythia-{args.large}"
    work = Path(args.work_dir or ROOT / f"outputs/sentiment_lab-{'smoke-' if args.smoke else ''}{name}").resolve()
    results = Path(args.results_file) if args.results_file else (
        work / "RESULTS.md" if args.smoke else ROOT / "bench" / "RESULTS.md")
    figure = Path(args.figure) if args.figure else (
        work / "sentiment_lab.png" if args.smoke else ROOT / "assets" / f"sentiment_lab_{name}.png")
    return Lab(args, profile, None, work, results, figure, device=args.device or default_device(),
               pretrained={"small": PYTHIA_SMALL, "large": f"EleutherAI/{name}"})


# ---------------------------------------------------------------------------------------------
# Running a stage: cached by its settings, timed, logged as a command
# ---------------------------------------------------------------------------------------------
def lab_made(lab: Lab) -> dict:
    """When the steering lab made S and L (its stages.json), so that a rebuilt S or L makes every stage run again."""
    if lab.steering is None:  # --preset: the Hub's models (their revision is the Hub's)
        return {"pretrained": lab.pretrained}
    return lab_stage_times(lab.steering, LAB_STAGES)


def prepare(lab: Lab, name: str, directory: Path, settings: dict, **upstream: dict) -> dict:
    """The stage's settings (`settings`, the steering lab's S and L, the digests of the stages it reads) and its outputs
    fit to them (bench/_util.prepare_stage): outputs made with other settings are deleted, to be made again."""
    return fit_stage(name, directory, {**settings, "steering_lab": lab_made(lab)}, upstream, logger)


def run_stage(lab: Lab, name: str, done: Path, fn) -> None:
    """Run `fn()` unless `done` exists; the stage's time (now, or when it ran) goes to lab.times and times.json."""
    path = lab.path("times.json")
    times = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if done.exists() and name in times:
        logger.info("stage %s: cached (%s)", name, done)
        lab.times[name] = {**times[name], "cached": True}
        return
    logger.info("stage %s: running", name)
    started = time.perf_counter()
    fn()
    times[name] = {"seconds": round(time.perf_counter() - started, 1)}
    write_json(path, times)
    lab.times[name] = {**times[name], "cached": False}
    logger.info("stage %s: done in %.1f s", name, times[name]["seconds"])


def run_script(lab: Lab, script: str, argv: list[str]) -> Any:
    """`python SCRIPT.py ARGV` through the script's own parser and main(), in this process (the library imports are
    paid once); the command goes to commands.sh."""
    command = f"python {script}.py {shlex.join(argv)}"
    logger.info("$ %s", command)
    lab.commands.append(command)
    if script == "fine_tune":
        result = fine_tune.main(*parse_fine_tune_args(argv))
    elif script == "rl_tune":
        result = rl_tune.main(*parse_rl_args(argv))
    else:
        result = evaluation.main(*parse_config(ARGUMENT_TYPES, argv))
    setup_logging()  # the scripts configure logging themselves; keep the lab's lines in the same format
    return result


# ---------------------------------------------------------------------------------------------
# Stage 1: disjoint halves of IMDB
# ---------------------------------------------------------------------------------------------
def clean(text: str) -> str:
    """IMDB's HTML line breaks as spaces, whitespace collapsed (as rl_tune.py's text prompts are)."""
    return " ".join(text.replace("<br />", " ").split())


def read_hub_reviews(source: str) -> list[dict]:
    """The labelled splits of a Hub dataset (stanfordnlp/imdb: train and test, not its unlabelled `unsupervised`), in
    split order; integer labels by the dataset's ClassLabel names, else IMDB's (0 = neg, 1 = pos)."""
    import datasets

    try:
        data = datasets.load_dataset(source)
    except Exception as err:  # the datasets library raises many types for a missing or unreadable source
        raise UsageError(f"cannot load --data {source}: {first_line(err)}; pass a "
                         "local file or a Hub dataset id (offline, one already in the datasets cache)") from None
    rows = []
    for split in sorted(data):
        if split == "unsupervised" or "label" not in data[split].column_names:
            continue
        feature = data[split].features["label"]
        names = getattr(feature, "names", None) or ["neg", "pos"]
        rows += [{"text": r["text"], "label": names[r["label"]] if isinstance(r["label"], int) else r["label"]}
                 for r in data[split] if not (isinstance(r["label"], int) and r["label"] < 0)]
    return rows


def read_reviews(path: str) -> list[dict]:
    if not looks_local(path):
        rows = read_hub_reviews(path)
        return [{"line": i, "label": row["label"], "text": clean(row["text"])} for i, row in enumerate(rows)
                if isinstance(row.get("text"), str) and row["text"].strip()]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    missing = [k for k in ("text", "label") if rows and k not in rows[0]]
    if missing:
        raise UsageError(f"--data {path} has no {', '.join(missing)} field (fields: {', '.join(rows[0])}); pass a "
                         "file of labelled reviews")
    # A review's identity is its line in the file (the shared file's ids restart in each of its splits).
    return [{"line": i, "label": row["label"], "text": clean(row["text"])} for i, row in enumerate(rows)
            if isinstance(row.get("text"), str) and row["text"].strip()]


def split_halves(rows: list[dict], profile: Profile, seed: int) -> dict[str, list[dict]]:
    """Shuffle, halve, and take from half A the reward rows, the RL prompts and the evaluation prompts (disjoint), from
    half B the judge rows. Too few rows is one error naming what is needed."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    a, b = [rows[i] for i in order[:half]], [rows[i] for i in order[half:]]
    need_a = profile.classifier_rows + profile.prompt_rows + profile.eval_prompts
    if len(a) < need_a or len(b) < profile.classifier_rows:
        raise UsageError(f"--data holds {len(rows)} reviews; the profile needs {need_a} in half A and "
                         f"{profile.classifier_rows} in half B; pass a larger file")
    n, p = profile.classifier_rows, profile.prompt_rows
    return {"reward": a[:n], "prompts_train": a[n:n + p], "prompts_eval": a[n + p:n + p + profile.eval_prompts],
            "judge": b[:n]}


def write_split(lab: Lab) -> None:
    import datasets

    parts = split_halves(read_reviews(lab.args.data), lab.profile, lab.args.seed)
    out = lab.path("split")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("reward", "judge"):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in parts[name]), encoding="utf-8")
    prompts = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"text": r["text"]} for r in parts["prompts_train"]]),
        "validation": datasets.Dataset.from_list([{"text": r["text"]} for r in parts["prompts_eval"]])})
    prompts.save_to_disk(str(out / "prompts"))
    ids = {name: {r["line"] for r in rows} for name, rows in parts.items()}
    overlap = sum(len(ids[x] & ids[y]) for i, x in enumerate(ids) for y in list(ids)[i + 1:])
    if overlap:
        raise RuntimeError(f"the split's parts share {overlap} reviews")  # a bug here, not the user's
    summary = {name: {"rows": len(rows), "labels": {k: sum(r["label"] == k for r in rows)
                                                    for k in sorted({str(r["label"]) for r in rows})}}
               for name, rows in parts.items()}
    write_json(out / "split.json", {"source": lab.args.data, "seed": lab.args.seed, "parts": summary,
                                    "shared_reviews": overlap})


# ---------------------------------------------------------------------------------------------
# Stages 2-3: the classifiers and the RL runs
# ---------------------------------------------------------------------------------------------
def classifier_arguments(lab: Lab, name: str) -> list[str]:
    """fine_tune.py: a sentiment classifier of the first tokens of a review, from S's weights (reward) or L's
    (judge)."""
    p = lab.profile
    start, lr = (lab.small, p.reward_lr) if name == "reward" else (lab.large, p.judge_lr)
    return ["--task", "classification", "--classification_input", "text", "--text_column", "text",
            "--label_column", "label", "--label_map", LABEL_MAP, "--model_name_or_path", start,
            "--dataset_path", str(lab.path("split", f"{name}.jsonl")), "--validation_split_percentage", "10",
            "--max_length", str(p.classifier_max_length), "--num_train_epochs", str(p.classifier_epochs),
            "--per_device_train_batch_size", str(p.classifier_batch), "--per_device_eval_batch_size", "64",
            "--learning_rate", str(lr), "--eval_strategy", "epoch", "--save_strategy", "epoch",
            "--logging_steps", "10", "--num_samples", "0", "--seed", str(lab.args.seed),
            "--dataloader_num_workers", "0", *QUIET, *precision_arguments(lab, "classifier"),
            "--output_dir", str(lab.path(name))]


def rl_arguments(lab: Lab, method: str, model: str, out: str) -> list[str]:
    """rl_tune.py from the reward classifier: RLOO samples rl_generations completions of rl_prompts prompts per step;
    PPO one completion of each of as many prompts, so both learn from the same number of completions a step."""
    p = lab.profile
    completions = p.rl_prompts * p.rl_generations
    argv = ["--method", method, "--model_name_or_path", model, "--text_dataset", str(lab.path("split", "prompts")),
            "--prompt_length", PROMPT_LENGTH, "--completion_length", COMPLETION_LENGTH,
            "--max_completion_length", COMPLETION_LENGTH.split(",")[1],
            "--reward_model", str(lab.path("reward", "final")), "--reward_label", POSITIVE,
            "--reward_score", "logit", "--per_device_train_batch_size", str(completions),
            "--max_steps", str(p.rl_steps), "--num_eval_examples", str(min(64, p.eval_prompts)),
            "--num_samples", "4", "--max_new_tokens", COMPLETION_LENGTH.split(",")[1],
            "--logging_steps", str(max(1, p.rl_steps // 30)), "--save_steps", str(max(1, p.rl_steps // 3)),
            "--seed", str(lab.args.seed), *QUIET, "--output_dir", out]
    if method == "rloo":
        argv += ["--num_generations", str(p.rl_generations), "--learning_rate", str(p.rloo_lr),
                 "--beta", str(p.rloo_beta), "--temperature", "1.0"]
    else:
        argv += ["--learning_rate", str(p.ppo_lr), "--init_kl_coef", str(p.ppo_init_kl)]
    return argv[:-2] + precision_arguments(lab, method) + argv[-2:] if lab.args.preset else argv


def precision_arguments(lab: Lab, script: str) -> list[str]:
    """--preset on a GPU: bf16 mixed precision (fp16 where the GPU has no bf16) for fine_tune.py's classifiers and TRL's
    RLOO over float32 master weights (as fine_tune.py advises for Pythia's float16 checkpoints); our PPO refuses
    --bf16/--fp16 and trains in float32. --device cpu keeps the Trainers off a GPU too. Nothing without --preset."""
    if not lab.args.preset:
        return []
    import torch

    if lab.device.startswith("cuda"):
        if script == "ppo":
            return []
        return ["--bf16", "true"] if torch.cuda.is_bf16_supported() else ["--fp16", "true"]
    return ["--use_cpu", "true"] if torch.cuda.is_available() else []


# ---------------------------------------------------------------------------------------------
# Stage 4: evaluation.py on the held-out prompts
# ---------------------------------------------------------------------------------------------
def eval_runs(lab: Lab) -> dict[str, tuple[str, float, list[str]]]:
    """run name -> (method, alpha, systems): the first run of each method holds its S_rl (and, for RLOO, S, L and
    L_rl); the others add L steered at another alpha."""
    runs = {}
    for method in METHODS:
        for alpha in ALPHAS:
            systems = ["steered"]
            if alpha == 1.0:
                systems = ["small_tuned", "steered"]
                if method == METHODS[0]:
                    systems = ["small_base", "small_tuned", "large", *(["large_tuned"] if lab.profile.large_rl
                                                                       else []), "steered"]
            runs[f"{method}_alpha{alpha:g}"] = (method, alpha, systems)
    return runs


def evaluation_arguments(lab: Lab, method: str, alpha: float, systems: list[str], out: Path) -> list[str]:
    p = lab.profile
    argv = ["--text_dataset", str(lab.path("split", "prompts")), "--num_examples", str(p.eval_prompts),
            "--prompt_length", PROMPT_LENGTH, "--completion_length", COMPLETION_LENGTH,
            "--max_new_tokens", COMPLETION_LENGTH.split(",")[1], "--do_sample", "true", "--temperature", "1.0",
            "--small_base_model", lab.small, "--small_tuned_model", str(lab.path(f"rl_{method}", "final")),
            "--large_model", lab.large, "--alpha", str(alpha), "--systems", *systems,
            "--reward_model", str(lab.path("reward", "final")), "--reward_label", POSITIVE,
            "--judge_classifier", str(lab.path("judge", "final")), "--fluency_model", lab.large,
            "--batch_size", str(p.eval_batch), "--bootstrap_samples", str(p.bootstrap_samples),
            "--seed", str(lab.args.seed), "--device", lab.device, "--pairwise", "none", "--output_dir", str(out)]
    if "large_tuned" in systems:
        argv += ["--large_tuned_model", str(lab.path("rl_large", "final"))]
    return argv


# ---------------------------------------------------------------------------------------------
# Stage 5: the report
# ---------------------------------------------------------------------------------------------
def system_labels(lab: Lab) -> list[tuple[str, str, str]]:
    """(label, evaluation run, system in that run) of every system in the report, in table order."""
    first = f"{METHODS[0]}_alpha1"
    rows = [("S", first, "small_base"), *[(f"S_rl ({m.upper()})", f"{m}_alpha1", "small_tuned") for m in METHODS],
            ("L", first, "large")]
    if lab.profile.large_rl:
        rows.append(("L_rl (RLOO on L)", first, "large_tuned"))
    rows += [(f"L steered by (S, S_{m}), alpha={a:g}", f"{m}_alpha{a:g}", "steered") for m in METHODS for a in ALPHAS]
    return rows


def read_predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def per_prompt(lab: Lab, evals: dict[str, dict]) -> dict[str, list[dict]]:
    """label -> that system's records, in one prompt order (the runs share their prompts: the same file, seed and
    draws)."""
    out = {}
    for label, run, system in system_labels(lab):
        recs = [r for r in evals[run]["predictions"] if r["system"] == system]
        out[label] = sorted(recs, key=lambda r: r["example_id"])
    ids = {tuple(r["example_id"] for r in recs) for recs in out.values()}
    if len(ids) != 1:
        raise RuntimeError("the evaluation runs continued different prompts")  # the runs' settings drifted apart
    return out


def paired_targets(records: dict[str, list[dict]], steered: str, confidence: float, samples: int, seed: int) -> dict:
    """The targets of one steered system, each with a paired percentile bootstrap over the prompts:
    gain_share = (judge rate of steered - of L) / (of L_rl - of L); fluency ratios = corpus perplexity of steered / of
    L, and of steered / of its S_rl."""
    import numpy as np

    n = len(records["L"])
    idx = resample_indices(n, samples, seed)
    judge = {k: np.array([float(r["judge_positive"]) for r in v]) for k, v in records.items()}
    nll = {k: np.array([r.get("fluency_nll") or 0.0 for r in v]) for k, v in records.items()}
    tokens = {k: np.array([float(r.get("fluency_tokens") or 0) for r in v]) for k, v in records.items()}

    def ppl(name, ix):
        return np.exp(nll[name][ix].sum(-1) / np.maximum(tokens[name][ix].sum(-1), 1))

    out = {}
    if "L_rl (RLOO on L)" in records:
        upper = "L_rl (RLOO on L)"

        def share(ix):
            gap = judge[upper][ix].mean(-1) - judge["L"][ix].mean(-1)
            gain = judge[steered][ix].mean(-1) - judge["L"][ix].mean(-1)
            return np.where(gap > 0, gain / np.where(gap > 0, gap, 1), np.nan)

        out["gain_share"] = bootstrap_interval(share, idx, confidence)
        out["upper_gap"] = bootstrap_interval(
            lambda ix: judge[upper][ix].mean(-1) - judge["L"][ix].mean(-1), idx, confidence)
    out["gain_over_L"] = bootstrap_interval(
        lambda ix: judge[steered][ix].mean(-1) - judge["L"][ix].mean(-1), idx, confidence)
    method = "RLOO" if "_rloo" in steered else "PPO"
    out["fluency_vs_L"] = bootstrap_interval(lambda ix: ppl(steered, ix) / ppl("L", ix), idx, confidence)
    out["fluency_vs_S_rl"] = bootstrap_interval(lambda ix: ppl(steered, ix) / ppl(f"S_rl ({method})", ix), idx,
                                                confidence)
    return out


def cell(summary: dict, key: str, digits: int = 2, scale: float = 1.0) -> str:
    m = summary.get(key)
    if not m:
        return "-"
    return f"{m['mean'] * scale:.{digits}f} [{m['ci_low'] * scale:.{digits}f}, {m['ci_high'] * scale:.{digits}f}]"


def interval_text(m: dict, digits: int = 2, pct: bool = False) -> str:
    if not math.isfinite(m["mean"]):
        return "undefined"
    f = (lambda x: f"{100 * x:.0f}%") if pct else (lambda x: f"{x:.{digits}f}")
    return f"{f(m['mean'])} [{f(m['ci_low'])}, {f(m['ci_high'])}]"


def target_lines(targets: dict[str, dict], large_rl: bool) -> list[str]:
    lines = []
    for label, t in targets.items():
        cells = []
        if "gain_share" in t:
            value = t["gain_share"]["mean"]
            status = ("undefined (L_rl gained nothing over L), missed" if not math.isfinite(value)
                      else "met" if value >= GAIN_TARGET else f"missed by {100 * (GAIN_TARGET - value):.0f} points")
            cells.append(f"judge gain over L {interval_text(t['gain_over_L'], pct=True)} = "
                         f"{interval_text(t['gain_share'], pct=True)} of L_rl's "
                         f"{interval_text(t['upper_gap'], pct=True)} (target >= {100 * GAIN_TARGET:.0f}%: {status})")
        else:
            cells.append(f"judge gain over L {interval_text(t['gain_over_L'], pct=True)}; the share of L_rl's gain is "
                         "not measured (no L_rl: --large_rl false)")
        ratio = t["fluency_vs_L"]["mean"]
        status = "met" if ratio <= FLUENCY_TARGET else f"missed by {ratio - FLUENCY_TARGET:.2f}x"
        cells.append(f"fluency perplexity {interval_text(t['fluency_vs_L'])}x L's (target <= {FLUENCY_TARGET:g}x: "
                     f"{status})")
        ratio = t["fluency_vs_S_rl"]["mean"]
        cells.append(f"{interval_text(t['fluency_vs_S_rl'])}x its S_rl's (target < 1: "
                     + ("met" if ratio < 1 else f"missed by {ratio - 1:.2f}x") + ")")
        lines.append(f"- {label}: " + "; ".join(cells) + ".")
    return lines


def continuation_lines(records: dict[str, list[dict]], n: int = 3) -> list[str]:
    """The first n prompts (in evaluation order) and every system's continuation of each."""
    lines = []
    first = sorted(next(iter(records.values())), key=lambda r: int(r["example_id"].split("-")[-1]))[:n]
    for prompt in first:
        lines.append(f"- prompt `{prompt['prompt']!r}`:")
        for label, recs in records.items():
            rec = next(r for r in recs if r["example_id"] == prompt["example_id"])
            judge = "positive" if rec.get("judge_positive") else "negative"
            lines.append(f"  - {label} (judge: {judge}): `{rec['prediction']!r}`")
    return lines


def plot(path: Path, summaries: dict[str, dict], title: str) -> None:
    """Judge positive rate against fluency perplexity under L, one point per system with its 95% intervals: the
    unsteered systems by marker, the steered ones by their pair's colour and labelled with their alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"S": ("tab:gray", "o"), "S_rl (RLOO)": ("tab:blue", "^"), "S_rl (PPO)": ("tab:green", "^"),
              "L": ("black", "s"), "L_rl (RLOO on L)": ("tab:red", "s")}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    legend = set()
    for label, s in summaries.items():
        x, y = s.get("fluency_perplexity"), s.get("judge_positive_rate")
        if not x or not y:
            continue
        steered = label.startswith("L steered")
        method = "RLOO" if "S_rloo" in label else "PPO"
        colour, marker = (("tab:blue" if method == "RLOO" else "tab:green"), "D") if steered else styles[label]
        name = f"L steered by (S, S_rl {method})" if steered else label
        ax.errorbar(x["mean"], y["mean"], xerr=[[x["mean"] - x["ci_low"]], [x["ci_high"] - x["mean"]]],
                    yerr=[[y["mean"] - y["ci_low"]], [y["ci_high"] - y["mean"]]], fmt=marker, color=colour,
                    capsize=3, ms=6, alpha=0.85, label=None if name in legend else name)
        legend.add(name)
        if steered:
            ax.annotate(label.rsplit(", ", 1)[1], (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=7, color=colour)
    ax.set_xlabel("fluency: perplexity of the continuation under L (lower is better)")
    ax.set_ylabel("positive rate (judge classifier)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def report(lab: Lab, evals: dict[str, dict], classifiers: dict[str, dict], rl: dict[str, dict],
           total_seconds: float) -> dict:
    p = lab.profile
    records = per_prompt(lab, evals)
    summaries = {label: evals[run]["metrics"]["systems"][system] for label, run, system in system_labels(lab)}
    n = len(records["L"])
    table = [(label, cell(s, "judge_positive_rate"), cell(s, "reward_positive_rate"),
              cell(s, "fluency_perplexity", 1), cell(s, "distinct_1"), cell(s, "distinct_2"),
              f"{s['new_tokens']['mean']:.1f}", f"{s['eos_share']['mean']:.2f}") for label, s in summaries.items()]
    header = ("system", "judge positive rate [95% CI]", "reward positive rate", "fluency ppl under L",
              "distinct-1", "distinct-2", "new tokens", "EOS share")
    targets = {label: paired_targets(records, label, 0.95, p.bootstrap_samples, lab.args.seed)
               for label, _, system in system_labels(lab) if system == "steered"}
    split = json.loads(lab.path("split", "split.json").read_text(encoding="utf-8"))["parts"]
    cls = "; ".join(
        f"{name} from {'S' if name == 'reward' else 'L'} on half {'A' if name == 'reward' else 'B'} "
        f"({m['train_examples']} reviews, held-out accuracy {m.get('eval_accuracy', float('nan')):.3f}, majority "
        f"{m.get('eval_majority_rate', float('nan')):.3f})" for name, m in classifiers.items())
    nan = float("nan")
    rl_text = "; ".join(
        f"{name}: held-out positive rate (reward) {m['before'].get('positive_rate', nan):.2f} -> "
        f"{m['after'].get('positive_rate', nan):.2f}, mean reward {m['before'].get('reward', nan):.2f} -> "
        f"{m['after'].get('reward', nan):.2f}" for name, m in rl.items())
    times = ", ".join(f"{k} {v['seconds']:.0f} s" + (" (cached)" if v.get("cached") else "")
                      for k, v in lab.times.items())
    models = (f"`{lab.small}` and `{lab.large}` from the Hub (Pythia, pretrained on the Pile; Pythia's tokenizer; "
              f"device {lab.device})" if lab.args.preset else
              f"the steering lab's IMDB-pretrained models (`{display(Path(lab.small))}`, `{display(Path(lab.large))}`)")
    source = display(Path(lab.args.data)) if looks_local(lab.args.data) else lab.args.data
    notes = [
        f"**Design** ({profile_name(lab.args)} profile). S and L: {models}. `{source}` "
        f"shuffled (seed {lab.args.seed}) into disjoint halves: {split['reward']['rows']} reviews of half A "
        f"for the reward classifier, {split['prompts_train']['rows']} for the RL prompts and "
        f"{split['prompts_eval']['rows']} held out for evaluation; {split['judge']['rows']} of half B "
        f"for the judge (no review shared). Classifiers (`fine_tune.py --task classification --classification_input "
        f"text`, reviews cut to {p.classifier_max_length} tokens, {p.classifier_epochs:g} epoch, lr {p.reward_lr:g} "
        f"(reward) and {p.judge_lr:g} (judge)): {cls}. RL: "
        f"{p.rl_steps} steps of {p.rl_prompts * p.rl_generations} completions (RLOO: {p.rl_prompts} prompts x "
        f"{p.rl_generations}, lr {p.rloo_lr:g}, beta {p.rloo_beta:g}; PPO: {p.rl_prompts * p.rl_generations} prompts, "
        f"lr {p.ppo_lr:g}, KL coefficient {p.ppo_init_kl:g} adapted toward 6), reward = the reward classifier's "
        f"'positive' logit of prompt + completion, prompts {PROMPT_LENGTH} tokens, completions {COMPLETION_LENGTH}; "
        f"{rl_text}." + ("" if p.large_rl else " L_rl not trained (--large_rl false)."),
        f"**Evaluation** (`evaluation.py --text_dataset`, {len(evals)} runs): {n} held-out prompts, every system "
        "sampled at temperature 1 with the same seed, continuations cut at their drawn length (4-16 tokens). Judge "
        "and reward positive rate = share whose top class is 'positive' (prompt + continuation read); fluency = "
        "corpus perplexity of the continuations given their prompts under L (L's own samples are its baseline, so "
        "L is favoured); distinct-n over all of a system's continuations. Intervals: 95% percentile bootstrap over "
        f"the prompts, {p.bootstrap_samples} resamples; the targets' intervals are paired across systems.",
        "**Targets** (issue 26): steered L's judge positive-rate gain over L >= 80% of L_rl's; fluency perplexity "
        "<= 1.5x L's and below its S_rl's.", "\n".join(target_lines(targets, p.large_rl)),
        "**Three continuations per system** (the same prompts):", "\n".join(continuation_lines(records)),
        f"**Wall time per stage** (torch threads {lab.args.threads or 'default'}, load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end): {times}; this invocation "
        f"{total_seconds / 60:.1f} min. Commands: `{display(lab.path('commands.sh'))}`."]
    title = f"Mini-ChatGPT recipe offline: RL on S, L steered by (S, S_rl) ({n} held-out IMDB prompts)"
    if lab.args.preset:
        title = f"Mini-ChatGPT recipe, pythia-70m + pythia-{lab.args.large}: RL on S, L steered by (S, S_rl) ({n} " \
                "held-out IMDB prompts)"
    plot(lab.figure, summaries, f"{title}\njudge positive rate vs fluency, 95% intervals")
    notes.append(f"![sentiment lab]({display(lab.figure)})")
    text = "\n\n".join(notes)
    for row in table:
        print(" | ".join(row))
    print(text)
    if not lab.args.no_record:
        record(title, table, header, text, results=lab.results_file, bench="sentiment_lab")
    summary = {"systems": summaries, "targets": targets, "times": lab.times, "classifiers": classifiers, "rl": rl}
    write_json(lab.path("report.json"), summary)
    return summary


def profile_name(args: SentimentLabArguments) -> str:
    return ("pythia-" if args.preset else "") + ("smoke" if args.smoke else "full")


def display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------
def main(args: SentimentLabArguments) -> dict:
    """Run (or reuse) every stage, then write the report. Returns report.json's content."""
    setup_logging()
    lab = resolve_lab(args)
    if not args.preset:  # --preset reads the Hub (its own offline setting decides)
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(key, "1")  # everything is local; never wait on the Hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    lab.work.mkdir(parents=True, exist_ok=True)
    logger.info("sentiment lab: profile %s, S and L from %s, work dir %s\n  %s", profile_name(args),
                lab.steering or f"the Hub ({lab.small}, {lab.large}; device {lab.device})", lab.work,
                json.dumps(asdict(lab.profile)))
    started = time.perf_counter()
    try:
        split = prepare(lab, "split", lab.path("split"), {"data": args.data, "seed": args.seed,
                                                          "profile": {k: getattr(lab.profile, k) for k in (
                                                              "classifier_rows", "prompt_rows", "eval_prompts")}})
        run_stage(lab, "split", lab.path("split", "split.json"), lambda: write_split(lab))
        configs, classifiers = {"split": split}, {}
        for name in ("reward", "judge"):
            argv = classifier_arguments(lab, name)
            configs[name] = prepare(lab, name, lab.path(name), {"argv": argv[:-2]}, split=split)
            run_stage(lab, name, lab.path(name, "final"), lambda a=argv: run_script(lab, "fine_tune", a))
            classifiers[name] = json.loads(lab.path(name, "final", "metrics.json").read_text(encoding="utf-8"))
        rl = {}
        models = [("rloo", lab.small, "rl_rloo"), ("ppo", lab.small, "rl_ppo")]
        if lab.profile.large_rl:
            models.append(("rloo", lab.large, "rl_large"))
        for method, model, name in models:
            argv = rl_arguments(lab, method, model, str(lab.path(name)))
            configs[name] = prepare(lab, name, lab.path(name), {"argv": argv[:-2]}, split=split,
                                    reward=configs["reward"])
            run_stage(lab, name, lab.path(name, "final"), lambda a=argv: run_script(lab, "rl_tune", a))
            rl[name] = json.loads(lab.path(name, "final", "metrics.json").read_text(encoding="utf-8"))
        evals = {}
        for run, (method, alpha, systems) in eval_runs(lab).items():
            out = lab.path("eval", run)
            argv = evaluation_arguments(lab, method, alpha, systems, out)
            upstream = {k: configs[k] for k in ("split", "reward", "judge", f"rl_{method}")}
            if "large_tuned" in systems:
                upstream["rl_large"] = configs["rl_large"]
            prepare(lab, f"eval/{run}", out, {"argv": argv[:-2]}, **upstream)
            run_stage(lab, f"eval/{run}", out / "metrics.json", lambda a=argv: run_script(lab, "evaluation", a))
            evals[run] = {"metrics": json.loads((out / "metrics.json").read_text(encoding="utf-8")),
                          "predictions": read_predictions(out / "predictions.jsonl")}
    finally:
        if lab.commands:
            with lab.path("commands.sh").open("a", encoding="utf-8") as f:
                f.write(f"# {time.strftime('%Y-%m-%d %H:%M')} (run from {ROOT})\n" + "\n".join(lab.commands) + "\n")
    return report(lab, evals, classifiers, rl, time.perf_counter() - started)


if __name__ == "__main__":
    run_cli(main, [SentimentLabArguments], __doc__)
