"""Reading data files, plain or compressed (.gz, .bz2, .xz, .zst), with errors that name the file."""

from __future__ import annotations

import io
from pathlib import Path

from proxytune.foundation.errors import UsageError, first_line

# Data files, compressed or not: `.gz`, `.bz2`, `.xz`, `.zst` over a data extension, as the datasets library
# reads them (through fsspec; `.zst` needs the `zstandard` package).
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstandard"}


def split_compression(path: str | Path) -> tuple[str, str | None]:
    """The data extension and the compression suffix: `split_compression("mred.jsonl.gz")` -> ('.jsonl', '.gz');
    `split_compression("mred.jsonl")` -> ('.jsonl', None)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        return Path(path.stem).suffix.lower(), suffix
    return suffix, None


def open_data_file(path: str | Path, flag: str = "data file"):
    """Open a data file for reading bytes, decompressing it by its suffix. Errors name `flag` and the file."""
    import bz2
    import gzip
    import lzma

    path = Path(path)
    compression = split_compression(path)[1]
    try:
        if compression == ".gz":
            return gzip.open(path, "rb")
        if compression == ".bz2":
            return bz2.open(path, "rb")
        if compression == ".xz":
            return lzma.open(path, "rb")
        if compression == ".zst":
            try:
                import zstandard
            except ImportError:
                raise UsageError(f"{flag} {path} is zstandard-compressed, which needs the zstandard package; "
                                 "pip install zstandard, or decompress it (zstd -d)") from None
            return zstandard.ZstdDecompressor().stream_reader(path.open("rb"))
        return path.open("rb")
    except OSError as err:
        raise UsageError(f"cannot read {flag} {path}: {err.strerror or first_line(err)}") from None


def _corrupt_archive(err: BaseException) -> bool:
    import lzma

    zstd_error = ()
    try:
        import zstandard

        zstd_error = (zstandard.ZstdError,)
    except ImportError:
        pass
    return isinstance(err, (EOFError, lzma.LZMAError, *zstd_error)) or (
        isinstance(err, OSError) and not isinstance(err, FileNotFoundError))


def iter_data_lines(path: str | Path, flag: str = "data file"):
    """(line number, text) of a data file, decompressed; a line that is not UTF-8 or a corrupt archive raises a
    UsageError naming `flag`, the file and the line."""
    path = Path(path)
    compression = split_compression(path)[1]
    with open_data_file(path, flag) as raw:
        i = 0
        try:
            for i, line in enumerate(io.BufferedReader(raw) if compression == ".zst" else raw, 1):
                try:
                    yield i, line.decode("utf-8")
                except UnicodeDecodeError:
                    raise UsageError(f"{flag} {path} is not UTF-8 (line {i}); "
                                     "re-encode it, e.g. iconv -t UTF-8") from None
        except UsageError:
            raise
        except Exception as err:
            if compression is None or not _corrupt_archive(err):
                raise
            raise UsageError(f"{flag} {path} is not a valid {COMPRESSIONS[compression]} file ({first_line(err)}, "
                             f"after line {i}); re-compress it, or drop the {compression} suffix if it is not "
                             "compressed") from None


def read_data_text(path: str | Path, flag: str = "data file") -> str:
    """The whole data file as text, decompressed by its suffix (see iter_data_lines for the errors)."""
    return "".join(text for _, text in iter_data_lines(path, flag))


def read_data_head(path: str | Path, n: int, flag: str = "data file") -> bytes:
    """The first `n` decompressed bytes of a data file (b"" for an empty one)."""
    path = Path(path)
    compression = split_compression(path)[1]
    with open_data_file(path, flag) as f:
        try:
            return f.read(n)
        except Exception as err:
            if not _corrupt_archive(err) or compression is None:
                raise
            raise UsageError(f"{flag} {path} is not a valid {COMPRESSIONS[compression]} file ({first_line(err)}); "
                             f"re-compress it, or drop the {compression} suffix if it is not compressed") from None
