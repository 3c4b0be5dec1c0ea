"""Progress that reads as a log when stderr is not a terminal (CI, nohup, `> log 2>&1`).

On a terminal, bars are tqdm's, redrawn in place. Written to a file, the same redraws become a '\\r' per update
and, for nested bars, cursor-up sequences (`\\x1b[A`): unreadable in a log. So `configure_progress` (called by
`cli.setup_logging`, once per process) decides: when stderr is not a terminal, `progress_bar` makes `LineBar`s
(a plain line every LINE_INTERVAL seconds and one with the final count) and the libraries' own bars follow.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm as terminal_tqdm
from tqdm.std import tqdm as text_tqdm

# On a log, a bar writes at most one line per LINE_INTERVAL seconds, and one more when it closes.
LINE_INTERVAL = 10.0

_as_lines = False  # set by configure_progress


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a stream replaced by one without isatty, or closed
        return False


class LineBar(text_tqdm):
    """A tqdm bar for a log: whole lines of ASCII, no '\\r' redraw and no cursor movement.

    A line when the count has moved and LINE_INTERVAL seconds (or the caller's longer `mininterval`) have passed
    since the last one; at close a last line with the final count and the overall rate, unless the last line
    already showed that count (whatever `leave` says: a log keeps everything). A bar opened while another LineBar
    is open stays silent: nested bars collapse to the outer one. `position` is ignored (a log has no rows).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if any(isinstance(bar, LineBar) and bar is not self and not getattr(bar, "disable", True)
               for bar in list(self._instances)):
            kwargs["disable"] = True
        kwargs.pop("position", None)
        kwargs.update(ascii=True, dynamic_ncols=False, leave=True,
                      mininterval=max(LINE_INTERVAL, kwargs.get("mininterval") or 0))
        self._line_n = kwargs.get("initial", 0)  # the count the last line showed: no line for a bar just opened
        self._line_t, self._wrote = 0.0, False
        super().__init__(*args, **kwargs)
        self._line_t = getattr(self, "start_t", 0.0)  # the first line LINE_INTERVAL after the start at the soonest

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing the bar's row: a log has none
            return False
        if self.n == self._line_n or self._time() - self._line_t < self.mininterval:
            return False  # nothing new, or too soon (a refresh after tqdm.write, the monitor thread)
        self._write_line(msg or str(self))
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear on a log (tqdm.write calls this before printing a message)."""

    def moveto(self, n: int) -> None:
        """No cursor to move on a log."""

    def close(self) -> None:
        if not getattr(self, "disable", True) and hasattr(self, "start_t") and (
                self.n != self._line_n or not self._wrote):  # the final count, unless the last line shows it
            self._ema_dt = lambda: None  # the final line shows the overall rate, as tqdm's own last redraw does
            self._write_line(str(self))
        self.leave = False  # the last line is written: tqdm's close then only forgets the bar
        super().close()

    def _write_line(self, line: str) -> None:
        self.fp.write(line + "\n")
        getattr(self.fp, "flush", lambda: None)()
        self._line_n, self._line_t, self._wrote = self.n, self._time(), True


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> text_tqdm:
    """A progress bar with tqdm's arguments: tqdm.auto's own on a terminal, a LineBar on a log."""
    return (LineBar if _as_lines else terminal_tqdm)(iterable, **kwargs)


def progress_as_lines() -> bool:
    """Whether this process shows progress as lines for a log (configure_progress decided so)."""
    return _as_lines


def configure_progress(as_lines: bool | None = None) -> bool:
    """Decide how this process shows progress; `as_lines=None`: as lines exactly when stderr is not a terminal.
    Returns the decision.

    As lines, the libraries' bars follow: transformers' (loading and writing weights) become LineBars through
    its tqdm hook; datasets' (map, filter) and huggingface_hub's (downloads), which offer no hook, are turned
    off, unless HF_DATASETS_DISABLE_PROGRESS_BARS / HF_HUB_DISABLE_PROGRESS_BARS say otherwise. The Trainer's bar
    is training.trainer.LogProgressCallback's. On a terminal nothing is changed.
    """
    global _as_lines
    _as_lines = not stderr_is_terminal() if as_lines is None else as_lines
    if _as_lines:
        _libraries_as_lines()
    return _as_lines


def _libraries_as_lines() -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        pass
    else:
        if hasattr(hf_logging, "set_tqdm_hook"):
            hf_logging.set_tqdm_hook(lambda factory, args, kwargs: LineBar(*args, **kwargs)
                                     if hf_logging.is_progress_bar_enabled() else factory(*args, **kwargs))
        else:
            hf_logging.disable_progress_bar()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        try:
            from huggingface_hub.utils import disable_progress_bars
        except ImportError:
            pass
        else:
            disable_progress_bars()
    if os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is None:
        if "datasets" in sys.modules:
            sys.modules["datasets"].disable_progress_bars()
        else:  # datasets reads it at import (the scripts import it only when they need it)
            os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
