"""Writing outputs safely: atomic directories and JSON, output-dir checks, a full disk as a clear error."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from proxytune.foundation.errors import UsageError, first_line


@contextmanager
def atomic_directory(output_dir: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside `output_dir`; on success it replaces `output_dir`.

    A crash (or an exception) leaves `output_dir` as it was and removes the half-written copy.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise UsageError(f"output directory {output_dir} already exists and is not empty; use --overwrite_output_dir")
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    except OSError as err:
        raise UsageError(f"cannot write to {output_dir.parent}: {err.strerror}; choose another --output_dir") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output_dir.exists():
        old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(old)
        tmp.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output_dir)


def check_output_dir(path: str | Path, flag: str = "--output_dir") -> None:
    """Fail before any work if `path` could not be created or written; creates nothing.

    The nearest existing ancestor must be a writable directory: `check_output_dir("notes.txt/out")` raises,
    naming notes.txt, instead of a NotADirectoryError traceback after an hour of training.
    """
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:  # exists() is also False below a file (ENOTDIR)
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise UsageError(f"{flag} {path} {where}; choose a directory path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} is not writable ({probe}: permission denied or read-only); "
                         f"choose another {flag} or fix the permissions")


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` says the disk (or the quota) is full: an OSError with ENOSPC/EDQUOT, or the text of what
    safetensors (SafetensorError "... No space left on device") and torch.save (RuntimeError "... file write
    failed") raise instead of an OSError."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded",
                                   "file write failed"))


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or its nearest existing ancestor); None if unknown."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def format_bytes(n: float) -> str:
    """`format_bytes(1536)` -> '1.5 KB'; `format_bytes(3.2e9)` -> '3.2 GB' (powers of 1000, as `df -H`)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def write_error(path: str | Path, err: BaseException, flag: str = "--output_dir",
                needed: int | None = None) -> UsageError:
    """The one-line error for a write into `path` that failed midway: a full disk names the free space (and what
    was needed, when known); anything else its reason."""
    if is_disk_full(err):
        free = free_bytes(path)
        have = f" ({format_bytes(free)} free" + (f", about {format_bytes(needed)} needed)" if needed else ")") \
            if free is not None else ""
        return UsageError(f"no space left on the device of {path}{have}; free some space or choose another {flag}")
    reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err)
    return UsageError(f"cannot write to {path}: {reason}; choose another {flag} or fix the permissions")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
