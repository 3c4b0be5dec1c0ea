"""Shared bits of the benchmarks: Pythia-shaped random models, timing, RESULTS.md records, and the settings a
lab's stage was made with (reused only when they are the same).

Shapes follow the published configs (https://huggingface.co/EleutherAI/pythia-70m/blob/main/config.json
and pythia-410m): random weights, real sizes, so timings reflect the real models without a download.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "RESULTS.md"

# name -> (hidden, layers, heads); Pythia: intermediate = 4 * hidden, rotary_pct 0.25, vocab 50,304.
PYTHIA_SHAPES = {
    "pythia-70m": (512, 6, 8),
    "pythia-160m": (768, 12, 12),
    "pythia-410m": (1024, 24, 16),
    "pythia-1b": (2048, 16, 8),
    "pythia-1.4b": (2048, 24, 16),
    "tiny": (64, 2, 4),
    "tiny-large": (128, 3, 4),
}
PYTHIA_VOCAB = 50304
TOKENIZER_VOCAB = 50277


def pythia_config(shape: str, vocab_size: int = PYTHIA_VOCAB):
    from transformers import GPTNeoXConfig

    hidden, layers, heads = PYTHIA_SHAPES[shape]
    return GPTNeoXConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False,
    )


def random_model(shape: str, seed: int = 0, vocab_size: int = PYTHIA_VOCAB):
    import torch
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(pythia_config(shape, vocab_size)).eval()


def timeit(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def wait_for_device(device) -> None:
    """Wait for a GPU's queued work before a timer is read (it would stop early); nothing on the CPU."""
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{os.cpu_count()} CPU cores ({cpu}){gpu}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def versions() -> str:
    import importlib.metadata as md

    names = ["torch", "transformers", "datasets", "trl", "peft"]
    out = []
    for n in names:
        try:
            out.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(out)


# The sections of bench/RESULTS.md: one per bench script (its file stem, which is also the section's heading and
# link anchor, e.g. bench/RESULTS.md#bench_speculative), in this order; a script not listed gets a section at the end.
BENCH_ORDER = ("bench_steering", "bench_speculative", "bench_process", "bench_fine_tune", "bench_adapters",
               "adapter_lab", "bench_evaluation",
               "bench_quantized",
               "bench_decision", "bench_hp_search", "lab_sizing", "steering_lab", "rl_lab", "rl_sweep",
               "sentiment_lab",
               "render_workbook", "bench_server", "harness_lab", "transfer_lab")

PREAMBLE = """# Benchmark results

The latest records of the scripts in `bench/`: one section per script, headed by its name (`## bench_speculative`,
linkable as `bench/RESULTS.md#bench_speculative`), in a fixed order (`BENCH_ORDER` in `bench/_util.py`). Each record
(`### <what was measured> — <date>`) is written by its script and never edited by hand. A run replaces the records
of its section that it measures again (same title, every row of the old table among the new one's) and keeps the
others, so a section can hold several records: other shapes, settings or stages. Every earlier record is in git:
`git log -p bench/RESULTS.md`.
"""


def _split_results(text: str) -> tuple[str, list[list[str]]]:
    """(preamble, sections): each section is its lines (newline-terminated), from its `## ` heading on.
    Headings inside fenced code blocks are text."""
    preamble, sections, fence = [], [], False
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("## "):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
        else:
            preamble.append(line)
    return "".join(preamble), sections


def _split_section(lines: list[str]) -> tuple[list[str], list[list[str]]]:
    """(heading and intro lines, records): each record is its lines, from its `### ` heading on."""
    head, records, fence = [], [], False
    for line in lines:
        if line.startswith("```"):
            fence = not fence
        if not fence and line.startswith("### "):
            records.append([line])
        elif records:
            records[-1].append(line)
        else:
            head.append(line)
    return head, records


def _record_title(lines: list[str]) -> str:
    """A record's title: its heading without the `### ` and the ` — <date>` the record function adds."""
    return lines[0][4:].strip().rsplit(" — ", 1)[0]


def _record_threads(lines: list[str]) -> str | None:
    """The torch thread count of a record's `Machine:` line (a run at 1 thread and one at 2 are two records)."""
    for line in lines[:6]:
        if line.startswith("Machine:"):
            found = re.search(r"(\d+) threads", line)
            return found.group(1) if found else None
    return None


def _row_labels(lines: list[str]) -> set[str]:
    """The first cells of the rows of a record's first Markdown table (its main table)."""
    labels, started = set(), False
    for i, line in enumerate(lines):
        line = line.strip()
        if not started:
            if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].strip().startswith("|---"):
                started = True
            continue
        if line.startswith("|---"):
            continue
        if not line.startswith("|"):
            break
        inner = line[1:-1] if line.endswith("|") else line[1:]
        labels.add(inner.split(" | ")[0].strip())
    return labels


def _block(lines: list[str]) -> str:
    """Lines as one block: no blank lines at either end, one newline at the end."""
    return "".join(lines).strip("\n") + "\n"


def _caller_bench() -> str:
    """The file stem of the script that called record() (bench_speculative for bench/bench_speculative.py)."""
    frame = sys._getframe(2)
    while frame is not None and Path(frame.f_code.co_filename).resolve() == Path(__file__).resolve():
        frame = frame.f_back
    name = Path(frame.f_code.co_filename).stem if frame is not None else ""
    if not name or name.startswith("<"):
        name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else ""
    return name or "misc"


def place_record(text: str, bench: str, record_text: str) -> str:
    """The RESULTS.md `text` with `record_text` (a `### ` record) in section `## bench`. The new record replaces
    the section's records it supersedes (same title, same torch thread count, every row label of their main table
    among its own) at the place of the first of them; with none, it goes at the end of the section. A missing
    section is made at its place in BENCH_ORDER. Everything else (preamble, other sections, other records) is kept
    as it is."""
    preamble, sections = _split_results(text)
    if not preamble.strip():
        preamble = PREAMBLE
    new = record_text.splitlines(keepends=True)
    title, labels = _record_title(new), _row_labels(new)
    names = [s[0][3:].strip() for s in sections]
    if bench not in names:
        rank = {n: i for i, n in enumerate(BENCH_ORDER)}
        mine = rank.get(bench, len(BENCH_ORDER))
        at = next((i for i, n in enumerate(names) if rank.get(n, len(BENCH_ORDER)) > mine), len(sections))
        sections.insert(at, [f"## {bench}\n", "\n", f"`bench/{bench}.py`.\n"])
        names.insert(at, bench)
    index = names.index(bench)
    head, records = _split_section(sections[index])
    threads = _record_threads(new)
    superseded = [i for i, r in enumerate(records)
                  if _record_title(r) == title and _record_threads(r) == threads and _row_labels(r) <= labels]
    if superseded:
        records[superseded[0]] = new
        records = [r for i, r in enumerate(records) if i not in superseded[1:]]
    else:
        records.append(new)
    blocks = [_block([preamble])]
    for i, lines in enumerate(sections):
        blocks.append("\n".join([_block(head)] + [_block(r) for r in records]) if i == index else _block(lines))
    return "\n".join(blocks)


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace: a reader, or a run killed
    mid-write, sees the old file or the new one, never half of one. The file keeps its permissions."""
    import tempfile

    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(title: str, table: list[tuple], header: tuple, notes: str = "", results: Path | None = None,
           bench: str | None = None) -> str:
    """Write a dated record (`### title — date`, machine, versions, a Markdown table, notes) into the section of its
    bench script (`## bench`; default: the stem of the calling script's file) of bench/RESULTS.md, or of `results`,
    replacing the records of that section it supersedes (see place_record), and return the record's text.
    A missing file is made with the preamble. Runs of two scripts at once take turns (an exclusive lock where
    the platform has fcntl)."""
    bench = bench or _caller_bench()
    lines = [f"### {title} — {dt.datetime.now():%Y-%m-%d %H:%M}", "",
             f"Machine: {machine()}. Versions: {versions()}.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in table:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    if notes:
        lines += ["", notes]
    text = "\n".join(lines) + "\n"
    path = Path(results or RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): read, place, replace
        fcntl = None
    while True:
        with path.open("a+", encoding="utf-8") as lock:  # creates a missing file (empty: the preamble is added)
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                if not path.exists() or os.stat(path).st_ino != os.fstat(lock.fileno()).st_ino:
                    continue  # another run replaced the file while this one waited: lock the new one
            old = path.read_text(encoding="utf-8")
            _write_atomic(path, place_record(old, bench, text))
            return text


# ---------------------------------------------------------------------------------------------
# Lab stages: reused only when made with the same settings (bench/rl_lab.py, bench/steering_lab.py)
# ---------------------------------------------------------------------------------------------
def argv_flags(argv: list[str]) -> dict:
    """A command line as {flag: value}: a flag's several values as a list, a flag with none as True, so that two
    command lines compare (and differ) by flag. argv_flags(["--a", "1", "--b", "x", "y", "--c"]) ==
    {"--a": "1", "--b": ["x", "y"], "--c": True}"""
    flags: dict = {"": []}  # "": the values before the first flag, if any
    flag = ""
    for token in argv:
        if token.startswith("--"):
            flags[token] = []
            flag = token
        else:
            flags[flag].append(token)
    return {k: v[0] if len(v) == 1 else (v or True) for k, v in flags.items() if k or v}


def as_json(config: dict) -> dict:
    """`config` as it reads back from JSON (tuples as lists, paths as text), so a recorded one compares equal."""
    return json.loads(json.dumps(config, default=str))


def stage_digest(config: dict) -> str:
    """A short fingerprint of a stage's settings; a later stage records its upstream's, so remaking one with other
    settings makes the stages after it run again too."""
    return hashlib.sha256(json.dumps(as_json(config), sort_keys=True).encode()).hexdigest()[:12]


_UNSET = object()


def setting_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'KEY OLD -> NEW' for every setting that differs (keys of nested settings joined with '.', a command line
    compared flag by flag, 'unset' for a missing one); [] when they are the same."""
    def show(value) -> str:
        if value is _UNSET:
            return "unset"
        return value if isinstance(value, str) and value else json.dumps(value)

    changes = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if all(isinstance(x, list) and x and all(isinstance(t, str) for t in x) and x[0].startswith("--")
               for x in (a, b)):
            a, b = argv_flags(a), argv_flags(b)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += setting_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key} {show(a)} -> {show(b)}")
    return changes


def lab_stage_times(lab_dir: Path, stages: tuple[str, ...]) -> dict:
    """When the steering lab in `lab_dir` finished each of `stages` (its stages.json), so that a stage built on them
    runs again after the steering lab rebuilt one."""
    path = lab_dir / "stages.json"
    made = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {name: made[name].get("finished") for name in stages if name in made}


def fit_stage(name: str, directory: Path, config: dict, upstream: dict[str, dict], log: logging.Logger) -> dict:
    """`config` with the digests of the stages it reads (`upstream`: stage name -> its settings), and the stage's
    outputs fit to it (prepare_stage), with one line on `log` when they are made again; returns the full config."""
    if upstream:
        config["upstream"] = {stage: stage_digest(settings) for stage, settings in upstream.items()}
    reason = prepare_stage(directory, config)
    if reason:
        log.info("stage %s: made with other settings (%s); running it again", name, reason)
    return config


def stage_record(directory: Path) -> Path:
    """Where the settings of the stage that writes `directory` are recorded: beside it, <directory>.stage.json
    (not inside: fine_tune.py and rl_tune.py refuse an output_dir that holds files that are not theirs)."""
    return directory.with_name(f"{directory.name}.stage.json")


def prepare_stage(directory: Path, config: dict) -> str | None:
    """Make a stage's outputs (`directory`) fit `config`, the settings that make them (the stage's command line,
    its inputs, the digests of the stages it reads). Outputs made with the same settings are kept: reused when
    finished, resumed when not. Outputs made with other settings, or by an older version that recorded none, are
    deleted so the stage runs again; the reason is returned ('--flag OLD -> NEW, ...'), else None. An unrecorded
    stage is redone rather than refused: nothing shows it matches, and refusing would stop bench/rl_sweep.py's
    unattended runs for a stage that takes minutes. `config` is recorded before the stage runs, so an interrupted
    stage resumes only with its own settings."""
    record, config = stage_record(directory), as_json(config)
    old = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
    if old == config:
        return None
    reason = None
    if directory.exists():
        reason = (", ".join(setting_changes(old, config)) if old is not None
                  else "made by an older version that recorded no settings")
        if directory.is_dir():
            shutil.rmtree(directory)
        else:
            directory.unlink()
    directory.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(record, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return reason
