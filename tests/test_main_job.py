"""The README's main job, run exactly as the README writes it, on a warm Hugging Face cache.

A user with internet runs the line against the Hub; here the Hub is simulated offline: tiny random GPT-NeoX
models saved under the real ids (EleutherAI/pythia-70m, EleutherAI/pythia-410m) and the zqz979/meta-review
dataset prepared into the datasets cache of a temporary HF_HOME, with HF_HUB_OFFLINE=1. The line is read from
the README between the MAIN-JOB markers (as .ci/run reads the test command) and run in a copy of the scripts,
so its outputs/ never land in the working tree. No size is changed: every step runs at its defaults.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_rows, train_tiny_tokenizer
from hub_cache import build_hub_cache, offline_env

SYSTEMS = {"small_base", "small_tuned", "large", "steered"}


def main_job_line() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- MAIN-JOB -->\s*```\n(.*?)\n```\s*<!-- /MAIN-JOB -->", text, re.S)
    assert block, "README.md lost its MAIN-JOB markers around the main job's command"
    (line,) = [ln for ln in block.group(1).splitlines() if ln.strip()]
    return line


def test_readme_main_job_line_is_the_whole_pipeline():
    line = main_job_line()
    steps = [s.strip() for s in line.split("&&")]
    assert steps == ["pip install -r requirements.txt", "python processing_meta_review.py", "python fine_tune.py",
                     "python steer.py --tune", "python evaluation.py"], line


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf_home")
    tok = train_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    build_hub_cache(home, tok, datasets={"zqz979/meta-review": make_rows(40)})
    return home


def test_main_job_runs_as_the_readme_writes_it(warm_cache, tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    for path in [*ROOT.glob("*.py"), ROOT / "requirements.txt"]:
        shutil.copy(path, work / path.name)
    shutil.copytree(ROOT / "proxytune", work / "proxytune", ignore=shutil.ignore_patterns("__pycache__"))
    env = offline_env(warm_cache)
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(["bash", "-c", main_job_line()], cwd=work, env=env, capture_output=True, text=True,
                         timeout=1500)
    log = res.stdout + res.stderr
    (tmp_path / "main_job.log").write_text(log)
    assert res.returncode == 0, log[-6000:]
    assert "Traceback" not in log, log[-6000:]

    out = work / "outputs"
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["systems"]) == SYSTEMS
    assert metrics["run"]["dataset_path"] == "outputs/meta_review" and metrics["run"]["split"] == "test"
    blend = json.loads((out / "steer" / "blend.json").read_text())
    # The evaluation used the models the blend was tuned with, which are the pipeline's own.
    assert blend["models"]["small_tuned"]["name_or_path"] == "outputs/pythia-70m-meta-review/final"
    assert blend["models"]["large"]["name_or_path"] == "EleutherAI/pythia-410m"
    assert "EleutherAI/pythia-410m" in metrics["run"]["systems"]["steered"]["model"]
    preds = [json.loads(line) for line in (out / "evaluation" / "predictions.jsonl").read_text().splitlines()]
    assert {p["system"] for p in preds} == SYSTEMS
    assert len(preds) == len(SYSTEMS) * metrics["n_examples"] and metrics["n_examples"] > 0

    from openpyxl import load_workbook

    wb = load_workbook(out / "evaluation" / "eval_examples.xlsx", read_only=True)
    text = "\n".join(str(v) for ws in wb.worksheets for row in ws.iter_rows(values_only=True) for v in row if v)
    for system in SYSTEMS:
        assert system in text
    # The steered system is labelled by what its blend really runs ("small_tuned alone" for a blend without L).
    from proxytune.steering.blend import Blend, describe_blend

    label = describe_blend(Blend.load(out / "steer" / "blend.json"))
    assert metrics["run"]["systems"]["steered"]["model"].startswith(label)

    # Clean logs: no deprecation of our own calls, no library chatter, no line printed twice by two handlers.
    assert "past_key_values" not in log and "FutureWarning" not in log
    assert "INFO absl" not in log and "Using default tokenizer" not in log
    lines = log.splitlines()
    logged = [m.group(1) for m in map(re.compile(r"^\d\d:\d\d:\d\d \w+ [\w.]+: (.*)$").match, lines) if m]
    bare = set(lines)
    assert not [m for m in logged if m in bare], "lines logged twice (a library handler and ours)"
