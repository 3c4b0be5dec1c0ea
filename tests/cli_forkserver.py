"""Run the scripts' command lines fast: each one in a forked copy of a process that imported torch & co. once.

`python fine_tune.py ...` spends 5-15 s importing transformers' Trainer on a busy 2-core machine, which would
make a table of 30 bad inputs or a kill-and-resume test take minutes. A server started once imports the heavy
libraries; every command then runs in a fresh fork of it, as `python SCRIPT ARGS` would: the script file
executes as `__main__` (so the `if __name__ == "__main__":` entry point and its error handling are what run),
with its own argv, cwd and stdin (/dev/null), stdout/stderr captured to files, and its exit status returned
(negative for a signal, as `subprocess` reports it). Only the imports are shared; environment variables given
per command are set in the child, after those imports (variables read at import time belong in the server's
environment, given at start).

A command can carry a test hook that stops it at a chosen point, so that a test can SIGKILL it exactly there:
  {"kind": "pause", "target": "module:Attr.path", "match": "checkpoint-4"}
      on the first call whose arguments mention `match`, create the marker file and sleep (never returns);
  {"kind": "half_write", "target": "torch:save", "dest": 1, "match": "optimizer.pt"}
      the same, after writing only the first half of what the call would have written to argument `dest`.

Server side (started by ForkServer): `python tests/cli_forkserver.py`, one JSON request per stdin line.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the scripts import at the top or on their main path; importing them once is the whole point.
PRELOAD = ["torch", "transformers", "datasets", "peft", "openpyxl", "rouge_score.rouge_scorer", "optuna",
           "safetensors.torch", "matplotlib.pyplot", "proxytune.foundation.cli", "processing_meta_review", "steer",
           "evaluation", "fine_tune", "trl", "rl_tune"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


@dataclass
class Started:
    pid: int
    stdout: Path
    stderr: Path


class ForkServer:
    """Client: `server.run("fine_tune.py", [...], logs_dir)` -> Result; start()/wait() for commands to kill."""

    def __init__(self, env: dict[str, str], log: Path):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT, env=env)
        reply = self._ask({"op": "ping"})
        assert reply == {"ok": True}, reply

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died; its log:\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def start(self, script: str, argv: list[str], logs: Path, *, env: dict[str, str] | None = None,
              cwd: Path | None = None, hook: dict | None = None) -> Started:
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.stderr")))
        out, err = logs / f"{n:03d}-{Path(script).stem}.stdout", logs / f"{n:03d}-{Path(script).stem}.stderr"
        reply = self._ask({"op": "start", "script": str(ROOT / script), "argv": [str(a) for a in argv],
                           "cwd": str(cwd or ROOT), "env": env or {}, "stdout": str(out), "stderr": str(err),
                           "hook": hook})
        return Started(reply["pid"], out, err)

    def wait(self, started: Started, timeout: float = 300) -> Result:
        reply = self._ask({"op": "wait", "pid": started.pid, "timeout": timeout})
        return Result(reply["returncode"], started.stdout.read_text(errors="replace"),
                      started.stderr.read_text(errors="replace"), reply["timed_out"])

    def run(self, script: str, argv: list[str], logs: Path, timeout: float = 300, **kw) -> Result:
        return self.wait(self.start(script, argv, logs, **kw), timeout)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------
def resolve(target: str):
    """'torch:save' -> (torch, 'save'); 'transformers.trainer:Trainer._save_rng_state' -> (Trainer, name)."""
    import importlib

    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def install_hook(hook: dict) -> None:
    owner, name = resolve(hook["target"])
    original = getattr(owner, name)
    marker = Path(hook["marker"])

    def stop_here():
        marker.write_text(str(os.getpid()))
        time.sleep(600)  # the test kills this process long before; a forgotten one still ends
        os._exit(3)

    def wrapper(*args, **kwargs):
        if hook.get("match") and hook["match"] not in repr(args) + repr(kwargs):
            return original(*args, **kwargs)
        if hook["kind"] == "pause":
            stop_here()
        dest = args[hook["dest"]]
        if isinstance(dest, (str, os.PathLike)):
            with tempfile.TemporaryDirectory() as tmp:
                whole = Path(tmp) / "whole"
                original(*args[:hook["dest"]], str(whole), *args[hook["dest"] + 1:], **kwargs)
                data = whole.read_bytes()
            with open(dest, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
        else:
            buffer = io.BytesIO()
            original(*args[:hook["dest"]], buffer, *args[hook["dest"] + 1:], **kwargs)
            data = buffer.getvalue()
            dest.write(data[: len(data) // 2])
            dest.flush()
        stop_here()

    setattr(owner, name, staticmethod(wrapper) if isinstance(owner.__dict__.get(name), staticmethod) else wrapper)


def run_child(request: dict) -> int:
    """In the forked child: become `python SCRIPT ARGV` and return its exit code."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    os.chdir(request["cwd"])
    os.environ.update(request["env"])
    script = request["script"]
    sys.argv = [script, *request["argv"]]
    sys.path[0] = str(Path(script).parent)  # as `python SCRIPT` sets it
    try:
        if request.get("hook"):
            install_hook(request["hook"])
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        return 1


def wait_child(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False}
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            _, status = os.waitpid(pid, 0)
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": True}
        time.sleep(0.01)


def serve() -> None:
    import importlib

    sys.path.insert(0, str(ROOT))
    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "ping":
            reply = {"ok": True}
        elif request["op"] == "start":
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = run_child(request)
                finally:
                    for stream in (sys.stdout, sys.stderr):
                        try:
                            stream.flush()
                        except Exception:  # a closed or broken stream must not change the exit code
                            pass
                    os._exit(code)
            reply = {"pid": pid}
        else:
            reply = wait_child(request["pid"], request["timeout"])
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
