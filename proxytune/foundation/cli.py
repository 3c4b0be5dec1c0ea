"""What every script's `__main__` does: logging set up once, a UsageError as one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from proxytune.foundation.config import parse_config
from proxytune.foundation.errors import UsageError
from proxytune.foundation.progress import configure_progress

# Libraries that log routine INFO lines through the root logger ("Using default tokenizer", font caches, HTTP).
QUIET_LOGGERS = ("absl", "matplotlib", "PIL", "urllib3", "httpx", "httpcore", "filelock", "fsspec")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level, force=True
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # datasets prints through a handler of its own and also passes records up to ours: every line twice.
    logging.getLogger("datasets").propagate = False
    # Progress bars as plain lines when stderr is a log, not a terminal (proxytune.foundation.progress).
    configure_progress()


def cli(main: Callable[..., Any]) -> Callable[..., Any]:
    """Run `main` so that a UsageError ends in one line on stderr and exit code 2, no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def run_cli(main: Callable[..., Any], dataclass_types: Sequence[type], doc: str | None = None) -> Any:
    """The `if __name__ == "__main__":` body of every script: parse flags and config files, run
    `main(*parsed)`, and turn a UsageError into one line on stderr and exit code 2."""
    description = doc.strip().split("\n\n")[0] if doc else None
    return cli(lambda: main(*parse_config(dataclass_types, description=description)))()
