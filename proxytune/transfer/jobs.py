"""Batch-job scripts for the real matrix, one per worker, from a template with named fields (as IPA-GPT's generator
writes cluster jobs): `{job_name}`, `{cpus}`, `{gpus}`, `{timeout}`, `{args}` (what follows `python transfer.py`)
and `{workdir}` (the directory the command was run from). Literal braces are written `{{` and `}}`.

Each job runs `python transfer.py JOB_CONFIG --step real --worker K --num_workers N`: worker K trains and scores the
cells K, K + N, K + 2N, ... of the plan; every cell is a resumable fine_tune.py run, so a job killed at its time
limit is continued by submitting it again.
"""

from __future__ import annotations

import shlex
import string
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError

FIELDS = ("job_name", "cpus", "gpus", "timeout", "args", "workdir")


# Slurm, the common case; --job_template replaces it.
DEFAULT_TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --cpus-per-task={cpus}
#SBATCH --gres=gpu:{gpus}
#SBATCH --time={timeout}
#SBATCH --output={job_name}-%j.log
cd {workdir}
python transfer.py {args}
"""


def read_template(path: str | None) -> str:
    """The template's text (DEFAULT_TEMPLATE for None), with its fields checked: an unknown one is an error naming
    it, and `{args}` must be there (the job would not know what to run)."""
    if path is None:
        return DEFAULT_TEMPLATE
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--job_template {path} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as err:
        raise UsageError(f"--job_template {path}: {err}; write literal braces as {{{{ and }}}}") from None
    unknown = sorted(n for n in names if n not in FIELDS)
    if unknown:
        raise UsageError(f"--job_template {path}: unknown field(s) {', '.join('{' + n + '}' for n in unknown)}; the "
                         f"fields are {', '.join('{' + f + '}' for f in FIELDS)} (literal braces: {{{{ }}}})")
    if "args" not in names:
        raise UsageError(f"--job_template {path} has no {{args}} field: a job would not know what to run")
    return text


def write_jobs(out: Path, template: str, config: Path, num_workers: int, fields: dict[str, Any],
               job_name: str) -> list[Path]:
    """jobs/<job_name>-<k>.sh for k < num_workers (executable); returns their paths."""
    jobs = out / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(num_workers):
        name = f"{job_name}-{k}"
        args = shlex.join([str(config), "--step", "real", "--worker", str(k), "--num_workers", str(num_workers)])
        text = template.format(job_name=name, args=args, workdir=shlex.quote(str(Path.cwd())), **fields)
        path = jobs / f"{name}.sh"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o755)
        tmp.replace(path)
        paths.append(path)
    return paths
