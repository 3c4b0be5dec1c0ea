"""Every script is a real command-line tool: --help works, importing does no work, CI runs the README command."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPTS = ["processing_meta_review", "fine_tune", "steer", "evaluation", "rl_tune", "transfer", "serve",
           "convert_nanogpt"]

NO_OUTPUT_DIR = {"serve"}  # writes nothing: it answers HTTP requests


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_documents_flags(script):
    res = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert ("--output_dir" in res.stdout or script in NO_OUTPUT_DIR) and "CONFIG" in res.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_import_does_no_work(script, tmp_path):
    """Importing a script parses no argv, loads nothing and writes nothing (STYLE.md, principle 3)."""
    code = (f"import sys; sys.argv = ['x', '--definitely-not-a-flag']; sys.path.insert(0, {str(ROOT)!r}); "
            f"import {script}; print('imported')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "imported", res.stderr
    assert list(tmp_path.iterdir()) == []


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- TEST-COMMAND -->\s*```\s*\n(.+?)\n```\s*<!-- /TEST-COMMAND -->", readme, re.S)
    assert block, "README lacks the TEST-COMMAND block .ci/run reads"
    command = block.group(1).strip()
    assert "pytest" in command and "requirements.txt" in command
    extracted = subprocess.run(
        ["bash", "-c",
         "sed -n '/<!-- TEST-COMMAND -->/,/<!-- \\/TEST-COMMAND -->/p' README.md | grep -v -e '<!--' -e '```'"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.strip()
    assert extracted == command
    assert "README.md" in (ROOT / ".ci" / "run").read_text()


FLAG_RUNS = {"processing_meta_review": [], "fine_tune": [], "steer": [], "evaluation": [], "workbook": [],
             "rl_tune --method dpo": ["--method", "dpo"], "rl_tune --method grpo": ["--method", "grpo"],
             "rl_tune --method rloo": ["--method", "rloo"], "rl_tune --method ppo": ["--method", "ppo"],
             "transfer": [], "serve": [], "convert_nanogpt": []}


def help_flags(text: str) -> list[str]:
    """The option strings of an argparse --help text (the first column of each option line)."""
    found = set()
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("-"):
            head = re.split(r"\s{2,}", stripped)[0]
            found.update(re.findall(r"(?<![\w-])--?[A-Za-z][\w-]*", head))
    return sorted(found)


@pytest.mark.parametrize("run", FLAG_RUNS)
def test_help_lists_the_flags_recorded_before_the_redesign(run):
    """tests/data/cli_flags.json was written from each script's --help before the library moved into proxytune/:
    the move changed no flag, and a later change that drops or renames one must say so by updating the record."""
    recorded = json.loads((ROOT / "tests" / "data" / "cli_flags.json").read_text())[run]
    script = run.split()[0]
    res = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *FLAG_RUNS[run], "--help"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    flags = help_flags(res.stdout)
    assert [f for f in recorded if f not in flags] == [], "flags gone"
    assert [f for f in flags if f not in recorded] == [], "flags added: record them in tests/data/cli_flags.json"


def project_modules() -> set[str]:
    return {p.stem for p in ROOT.glob("*.py")} | {"proxytune"}


@pytest.mark.parametrize("folder", ["proxytune", ".", "bench"])
def test_project_modules_are_imported_at_the_top(folder):
    """No function-local import of a project module: such imports hid two import loops before the redesign.
    (Heavy optional third-party libraries may still be imported where they are used.)"""
    import ast

    own = project_modules() | {p.stem for p in (ROOT / "bench").glob("*.py")}
    files = sorted((ROOT / folder).rglob("*.py") if folder == "proxytune" else (ROOT / folder).glob("*.py"))
    local = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n.split(".")[0] in own for n in names):
                    local.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert local == []
