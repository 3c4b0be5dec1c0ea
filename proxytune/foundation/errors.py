"""The one exception a user's mistake raises, and how errors are shown in one line."""

from __future__ import annotations

from collections.abc import Sequence


class UsageError(ValueError):
    """A mistake in the user's input (flag, file, model path). Printed as one line, exit code 2."""


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def raise_problems(problems: Sequence[str]) -> None:
    """Collect every problem, raise once (as litgpt validates its arguments)."""
    if problems:
        raise UsageError("; ".join(problems))
