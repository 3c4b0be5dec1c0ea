"""Every script is a real command-line tool: --help works, importing does no work, CI runs the README command."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = ["processing_meta_review", "fine_tune", "steer", "evaluation", "rl_tune"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_documents_flags(script):
    res = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "--output_dir" in res.stdout and "CONFIG" in res.stdout


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
        ["bash", "-c", "sed -n '/<!-- TEST-COMMAND -->/,/<!-- \\/TEST-COMMAND -->/p' README.md | grep -v -e '<!--' -e '```'"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout.strip()
    assert extracted == command
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
