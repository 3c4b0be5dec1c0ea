"""Helpers shared by the scripts: config cascade, the prompt template, model/tokenizer loading, CLI errors.

Everything here is small on purpose: the scripts (`processing_meta_review.py`, `fine_tune.py`,
`steer.py`, `evaluation.py`) import it so that training and inference build prompts the same way
and every script reads its configuration the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)
# bitsandbytes, which peft and the Trainer import whenever it is installed, logs at import that an optional kernel from
# the Hub is missing (its built-in CPU kernel runs instead), and LLM.int8 logs that it casts inputs to float16 (its
# design) on every matrix product: noise on stderr, before logging is even set up.
for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
    logging.getLogger(_name).setLevel(logging.ERROR)

# ---------------------------------------------------------------------------------------------
# The prompt. One template, imported by every script, so training and inference never disagree.
# The target is " " + meta-review + EOS: the leading space keeps the token boundary after the cue
# clean, and the EOS is what teaches the model to stop.
# ---------------------------------------------------------------------------------------------
PROMPT_TEMPLATE = "Peer reviews of a paper:\n\n{reviews}\n\nMeta-review:"
REVIEW_JOINER = "\n\n"
# The models the README's pipeline uses when no flag names one (fine_tune.py's default output_dir for the tuned
# one); steer.py and evaluation.py fill missing model flags from these, after a blend file's record.
DEFAULT_MODELS = {"large": "EleutherAI/pythia-410m", "small_base": "EleutherAI/pythia-70m",
                  "small_tuned": "outputs/pythia-70m-meta-review/final"}


class UsageError(ValueError):
    """A mistake in the user's input (flag, file, model path). Printed as one line, exit code 2."""


def render_prompt(reviews: Sequence[str]) -> str:
    """Fill the template. `render_prompt(["Good paper.", "Weak baselines."])` gives
    'Peer reviews of a paper:\\n\\nGood paper.\\n\\nWeak baselines.\\n\\nMeta-review:'."""
    return PROMPT_TEMPLATE.format(reviews=REVIEW_JOINER.join(reviews))


def render_target(meta_review: str, eos_token: str) -> str:
    """The training target: `render_target("Accept.", "<|endoftext|>")` -> ' Accept.<|endoftext|>'."""
    return " " + meta_review + eos_token


def encode_target(meta_review: str, tokenizer) -> list[int]:
    """The training target's ids: " " + meta-review, then the EOS id. The EOS is appended as an id, not as text,
    so a tokenizer that would split "<|endoftext|>" cannot change it. Training, tuning and evaluation all use this."""
    return tokenizer(" " + meta_review, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def allocate_budget(lengths: Sequence[int], budget: int) -> list[int]:
    """Share `budget` tokens among reviews of the given lengths, max-min fair ("water filling").

    Short reviews keep all their tokens; what they leave is shared equally by the long ones, so no
    review is cut to nothing because it came last. `allocate_budget([10, 100, 100], 110)` -> [10, 50, 50].
    """
    budget = max(budget, 0)
    alloc = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    remaining = budget
    for rank, i in enumerate(order):
        left = len(order) - rank
        share = remaining // left
        alloc[i] = min(lengths[i], share)
        remaining -= alloc[i]
    # Integer division may leave up to (n - 1) tokens; give them to truncated reviews, longest first.
    for i in sorted(order, key=lambda i: -lengths[i]):
        if remaining == 0:
            break
        if alloc[i] < lengths[i]:
            alloc[i] += 1
            remaining -= 1
    return alloc


def build_prompt(reviews: Sequence[str], tokenizer, max_prompt_tokens: int | None) -> tuple[str, bool]:
    """Render the prompt so that `tokenizer(prompt)` has at most `max_prompt_tokens` tokens.

    The reviews are cut token-wise (the head of each review is kept) with the budget shared fairly
    between reviews; the template itself is never cut. Returns (prompt, was_truncated).
    """
    prompt = render_prompt(reviews)
    if max_prompt_tokens is None:
        return prompt, False
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n_prompt <= max_prompt_tokens:
        return prompt, False
    overhead = len(tokenizer(render_prompt([""] * len(reviews)), add_special_tokens=False)["input_ids"])
    if overhead >= max_prompt_tokens:
        raise UsageError(
            f"the prompt template alone needs {overhead} tokens but only {max_prompt_tokens} are available; "
            "raise --max_length (or lower --max_new_tokens)"
        )
    review_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in reviews]
    budget = max_prompt_tokens - overhead
    # Decoding cut ids and re-encoding the text can merge tokens differently at the cut, so the
    # count is checked again and the budget shaved until the rendered prompt really fits.
    while True:
        alloc = allocate_budget([len(ids) for ids in review_ids], budget)
        cut = [tokenizer.decode(ids[:n]).strip() for ids, n in zip(review_ids, alloc)]
        prompt = render_prompt(cut)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt <= max_prompt_tokens or budget <= 0:
            return prompt, True
        budget -= max(1, n_prompt - max_prompt_tokens)


# ---------------------------------------------------------------------------------------------
# Configuration: dataclasses + HfArgumentParser, with JSON/YAML config files that cascade.
# ---------------------------------------------------------------------------------------------
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def _config_to_argv(key: str, value: Any) -> list[str]:
    """{'lr': 1e-4} -> ['--lr', '0.0001']; lists become several values, dicts JSON, None 'None'."""
    flag = f"--{key}"
    if isinstance(value, bool):
        return [flag, str(value).lower()]
    if isinstance(value, (list, tuple)):
        return [flag, *[str(v) for v in value]]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise UsageError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of flag names to values, not {type(data).__name__}")
    return data


def _check_config_value(parser, key: str, value: Any, source: Path) -> None:
    """Reject unknown keys and values argparse could not convert, naming the key and the file."""
    actions = {a.dest: a for a in parser._actions}
    if key not in actions or key == "help":
        close = difflib.get_close_matches(key, [d for d in actions if d != "help"], n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see --help for the known keys"
        raise UsageError(f"unknown key '{key}' in config file {source}; {hint}")
    action = actions[key]
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if v is None:
            continue
        text = json.dumps(v) if isinstance(v, dict) else (str(v).lower() if isinstance(v, bool) else str(v))
        try:
            converted = action.type(text) if action.type else text
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise UsageError(
                f"config file {source}: key '{key}' has value {v!r}, which is not a valid "
                f"{getattr(action.type, '__name__', 'value')}"
            ) from None
        if action.choices is not None and converted not in action.choices and text not in action.choices:
            raise UsageError(
                f"config file {source}: key '{key}' has value {v!r}; choose one of {list(action.choices)}"
            )


def parse_config(dataclass_types: Sequence[type], args: Sequence[str] | None = None, description: str | None = None):
    """Parse `[CONFIG ...] [--flag value ...]` into instances of `dataclass_types`.

    Config files (JSON/YAML, given first) cascade: later files override earlier ones and
    command-line flags override all. Unknown keys and ill-typed values raise UsageError naming
    the key and the file.
    """
    from transformers import HfArgumentParser

    args = list(sys.argv[1:] if args is None else args)
    parser = HfArgumentParser(dataclass_types, description=description)
    parser.usage = "%(prog)s [CONFIG.yaml|CONFIG.json ...] [--flag value ...]"
    parser.epilog = (
        "Config files come first and cascade: later files override earlier ones; "
        "command-line flags override all files."
    )
    config_files = []
    while args and not args[0].startswith("-") and args[0].endswith(CONFIG_SUFFIXES):
        config_files.append(Path(args.pop(0)))
    if args and not args[0].startswith("-"):
        raise UsageError(
            f"unexpected argument '{args[0]}': config files must end in {', '.join(CONFIG_SUFFIXES)} "
            "and come before the flags"
        )
    file_argv: list[str] = []
    for path in config_files:
        for key, value in read_config_file(path).items():
            _check_config_value(parser, key, value, path)
            file_argv += _config_to_argv(key, value)
    # Required fields given by a file are no longer required on the command line.
    given = {a.lstrip("-") for a in file_argv if a.startswith("--")}
    for action in parser._actions:
        if action.dest in given:
            action.required = False
    parser.error = _refuse_flags  # argparse would print its usage and exit; one line naming the flag instead
    *parsed, unknown = parser.parse_args_into_dataclasses(
        args=file_argv + args, look_for_args_file=False, return_remaining_strings=True
    )
    if unknown:
        flag = next((a for a in unknown if a.startswith("-")), unknown[0])
        close = difflib.get_close_matches(flag.lstrip("-"), [a.dest for a in parser._actions if a.dest != "help"], n=1)
        hint = f"did you mean '--{close[0]}'?" if close else "see --help for the flags"
        raise UsageError(f"unknown flag or stray value '{flag}'; {hint}")
    return tuple(parsed)


def _refuse_flags(message: str) -> None:
    """argparse's error(): `--max_length abc` -> UsageError("argument --max_length...: invalid int value: 'abc'")."""
    raise UsageError(f"{message}; see --help")


def to_jsonable(*objs) -> dict[str, Any]:
    """Merge dataclasses into one JSON-able dict (for `config.json`), tokens and secrets removed."""
    out: dict[str, Any] = {}
    for obj in objs:
        if obj is None:
            continue
        items = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        for k, v in items.items():
            # Secrets (hub_token, token, ...) go; tokenizer names and token counts are settings, not secrets.
            secret = "token" in k and not k.startswith("tokenizer") and k not in ("max_new_tokens", "max_prompt_tokens")
            if secret and isinstance(v, str):
                v = "<redacted>"
            out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out


# ---------------------------------------------------------------------------------------------
# Numbers: finite and in range, checked before any work. `x <= 0` lets NaN through, and a value that is finite
# in Python but not in float32 (`--alpha 1e39`) would only fail inside torch.
# ---------------------------------------------------------------------------------------------
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
SEED_MAX = 2**32 - 1  # numpy's legacy seeding, which transformers.set_seed calls, takes [0, 2**32)
_RANGE_RE = re.compile(r"^([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])$")


def describe_range(spec: str) -> str:
    """`describe_range("(0, inf)")` -> '> 0'; `describe_range("[0, 1)")` -> 'in [0, 1)'."""
    low_bracket, low, high, high_bracket = _RANGE_RE.match(spec).groups()
    if low == "-inf" and high == "inf":
        return "finite"
    if high == "inf":
        return f"{'>=' if low_bracket == '[' else '>'} {low}"
    if low == "-inf":
        return f"{'<=' if high_bracket == ']' else '<'} {high}"
    return f"in {spec}"


def number_problem(flag: str, value: float | int | None, spec: str = "(-inf, inf)", hint: str | None = None) -> str | None:
    """What is wrong with `value` for `flag`, or None. `spec` is an interval such as "(0, 1]" or "[1, inf)".

    NaN, infinities and floats beyond float32 (the widest type torch computes in here) are always refused; None
    (an optional flag left unset) and booleans pass. `number_problem("--top_p", 1.5, "(0, 1]")` ->
    '--top_p 1.5 must be in (0, 1]'; `number_problem("--alpha", 1e39, "[0, inf)")` ->
    '--alpha 1e+39 is not a finite float32 number (largest 3.4e+38); pass a number >= 0'.
    """
    if value is None or isinstance(value, bool):
        return None
    low_bracket, low, high, high_bracket = _RANGE_RE.match(spec).groups()
    wanted = describe_range(spec)
    wanted = ("a finite number" if wanted == "finite" else f"a number {wanted}") + (f" ({hint})" if hint else "")
    if isinstance(value, float):
        if math.isnan(value):
            return f"{flag} {value} is not a number; pass {wanted}"
        if abs(value) > FLOAT32_MAX:
            return f"{flag} {value} is not a finite float32 number (largest {FLOAT32_MAX:.2g}); pass {wanted}"
    low_v, high_v = float(low), float(high)
    below = value < low_v or (low_bracket == "(" and value == low_v)
    above = value > high_v or (high_bracket == ")" and value == high_v)
    if below or above:
        text = f"{flag} {value} must be {describe_range(spec)}"
        return f"{text} ({hint})" if hint else text
    return None


def number_problems(obj, ranges: dict[str, str | tuple[str, str]], prefix: str = "--") -> list[str]:
    """Problems with the numbers of the dataclass `obj`: every float field must be finite (in float32), and each
    field named in `ranges` must lie in its interval (a spec, or (spec, hint)). Errors name `prefix + field`."""
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        rule = ranges.get(f.name)
        if rule is None and not isinstance(value, float):
            continue
        spec, hint = (rule, None) if isinstance(rule, str) or rule is None else rule
        problem = number_problem(prefix + f.name, value, spec or "(-inf, inf)", hint)
        if problem:
            problems.append(problem)
    return problems


# Decoding settings, the same for every system and script (steer.py's flags, evaluation.py's flags and overrides).
DECODING_RANGES = {"max_new_tokens": ("[1, inf)", None), "temperature": ("(0, inf)", "greedy decoding is do_sample false"),
                   "top_p": ("(0, 1]", None), "repetition_penalty": ("(0, inf)", "1.0 = off"),
                   "no_repeat_ngram_size": ("[0, inf)", "0 = off")}


def decoding_problems(settings: dict[str, Any], prefix: str = "--") -> list[str]:
    """Problems with one set of decoding settings (the keys of DECODING_RANGES); `prefix` goes before each name
    ("--" for flags, "--decoding_overrides large." for an override): `decoding_problems({..., "top_p": 2.0})` ->
    ['--top_p 2.0 must be in (0, 1]']."""
    problems = [number_problem(f"{prefix}{name}", settings[name], spec, hint)
                for name, (spec, hint) in DECODING_RANGES.items()]
    return [p for p in problems if p]


def raise_problems(problems: Sequence[str]) -> None:
    """Collect every problem, raise once (as litgpt validates its arguments)."""
    if problems:
        raise UsageError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Data files, compressed or not: `.gz`, `.bz2`, `.xz`, `.zst` over a data extension, as the datasets library
# reads them (through fsspec; `.zst` needs the `zstandard` package).
# ---------------------------------------------------------------------------------------------
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
                    raise UsageError(f"{flag} {path} is not UTF-8 (line {i}); re-encode it, e.g. iconv -t UTF-8") from None
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


# ---------------------------------------------------------------------------------------------
# CLI plumbing.
# ---------------------------------------------------------------------------------------------
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
    return any(s in text for s in ("No space left on device", "StorageFull", "Disk quota exceeded", "file write failed"))


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


def write_error(path: str | Path, err: BaseException, flag: str = "--output_dir", needed: int | None = None) -> UsageError:
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


# ---------------------------------------------------------------------------------------------
# The Hub, reachable or not. huggingface_hub retries a failed request five times, 1 + 2 + 4 + 8 + 8 s apart
# (huggingface_hub/utils/_http.py; no setting changes it), and loading one tokenizer makes two such requests: without
# a network, ~48 s pass before the error. One probe with a short timeout tells within seconds, and offline mode then
# sends the libraries straight to their caches.
# ---------------------------------------------------------------------------------------------
HUB_PROBE_TIMEOUT_S = 3.0  # a slow link can set HF_HUB_ETAG_TIMEOUT, which the probe then uses instead


@functools.cache
def hub_is_unreachable() -> bool:
    """Whether the Hub endpoint fails to answer within HUB_PROBE_TIMEOUT_S (False under HF_HUB_OFFLINE, where nothing
    is asked). When it fails, this process is switched to offline mode, so that a cached model still loads at once."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return False
    timeout = HUB_PROBE_TIMEOUT_S
    if constants.HF_HUB_ETAG_TIMEOUT != constants.DEFAULT_ETAG_TIMEOUT:
        timeout = constants.HF_HUB_ETAG_TIMEOUT
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)  # any answer, even an error status, will do
        return False
    except Exception as err:  # httpx's connect/timeout/proxy errors, DNS failures: all mean "unreachable"
        logger.warning("the Hugging Face Hub (%s) is unreachable (%s); using the local cache only",
                       constants.ENDPOINT, first_line(err))
        go_offline()
        return True


def go_offline() -> None:
    """Offline mode for this process and its children, as HF_HUB_OFFLINE=1 at start would have set it."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers (is_offline_mode)
    if "datasets.config" in sys.modules:  # datasets copies the flag at import; a later import reads the one above
        sys.modules["datasets.config"].HF_HUB_OFFLINE = sys.modules["datasets.config"].HF_DATASETS_OFFLINE = True


def hub_offline_reason() -> str | None:
    """Call before loading a Hub id: None when the Hub will be asked; otherwise why only the local cache will be
    read ("the Hugging Face Hub (https://huggingface.co) is unreachable", or "HF_HUB_OFFLINE is set")."""
    from huggingface_hub import constants

    if hub_is_unreachable():
        return f"the Hugging Face Hub ({constants.ENDPOINT}) is unreachable"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    return None


def not_cached_error(what: str, name: str, flag: str, reason: str) -> UsageError:
    """`{reason} and {what} '{name}' is not in the local cache (...); pass a local path with {flag}, or ...`."""
    from huggingface_hub import constants

    fix = ("run once where the Hub is reachable to fill the cache (later runs then work offline, with HF_HUB_OFFLINE=1 "
           "to skip the network)" if "unreachable" in reason else "unset HF_HUB_OFFLINE where the Hub is reachable")
    return UsageError(f"{reason} and {what} '{name}' is not in the local cache ({constants.HF_HUB_CACHE}); pass a "
                      f"local path with {flag}, or {fix}")


def check_hub_for_push(flag: str = "--push_to_hub") -> None:
    """Refuse a push up front, before any work, when the Hub cannot be reached."""
    reason = hub_offline_reason()
    if reason:
        raise UsageError(f"{flag} needs the Hugging Face Hub, but {reason}; drop {flag} (push later with "
                         "`hf upload`) or run where the Hub is reachable")


# ---------------------------------------------------------------------------------------------
# Models and tokenizers.
# ---------------------------------------------------------------------------------------------
def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right",
                   flag: str = "--tokenizer_name"):
    """Load a tokenizer and make sure it can pad without touching EOS.

    Pythia's tokenizer has `<|padding|>` (id 1) in its vocabulary but older configs do not name it
    as the pad token; pad = eos would make masking by id hide the real EOS, so we use `<|padding|>`
    when it exists and fall back to EOS only for tokenizers that have no other choice (labels are
    masked by position, not by id, so that is still safe).
    """
    from transformers import AutoTokenizer

    if is_missing_local_path(name_or_path):
        raise UsageError(f"cannot load tokenizer '{name_or_path}': no such directory; pass a Hub id "
                         "(e.g. EleutherAI/pythia-70m) or a local directory with tokenizer.json")
    offline = None if Path(name_or_path).expanduser().exists() else hub_offline_reason()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if offline:
            raise not_cached_error("tokenizer", name_or_path, flag, offline) from None
        raise UsageError(
            f"cannot load tokenizer '{name_or_path}': {first_line(err)}; pass a Hub id or a local directory "
            "with tokenizer.json"
        ) from None
    if tokenizer.pad_token is None:
        if "<|padding|>" in tokenizer.get_vocab():
            tokenizer.pad_token = "<|padding|>"
        else:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise UsageError(f"tokenizer '{name_or_path}' has no EOS token; the target must end with one")
    tokenizer.padding_side = padding_side
    return tokenizer


def is_missing_local_path(name_or_path: str) -> bool:
    """A Hub id is 'name' or 'org/name'; './x', '/x', '~/x', 'x/' and 'a/b/c' can only be local paths, so when they
    do not exist, say that rather than the Hub's "Repo id must be in the form ..."."""
    local = name_or_path.startswith((".", "/", "~")) or name_or_path.endswith("/") or name_or_path.count("/") > 1
    return local and not Path(name_or_path).expanduser().exists()


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str, device: str):
    """Pythia checkpoints declare float16; on CPU that is slow and lossy, so 'auto' means float32
    on CPU and bfloat16 on a GPU that supports it (float16 otherwise)."""
    import torch

    if dtype not in DTYPES:
        raise UsageError(f"dtype '{dtype}' is not one of {DTYPES}")
    if dtype != "auto":
        return getattr(torch, dtype)
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(
    name_or_path: str,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
    flag: str = "--model_name_or_path",
    quantize: int | None = None,
    quantize_prefix: str = "--",
    quantize_options: dict[str, Any] | None = None,
    head: dict | None = None,
):
    """Load a causal LM from a Hub id, a local directory, or a LoRA adapter directory from fine_tune.py.

    Weights load from safetensors only (no pickle). An adapter directory (adapter_config.json) is
    loaded on its base model and, by default, merged so decoding pays nothing for it. Errors name `flag`.
    `quantize` = 4 or 8 loads the linear layers of the (base) model with bitsandbytes (quantization_config); `dtype`
    is then the compute dtype and that of the layers left unquantised (`quantize_options`: bnb_config's
    compute_dtype, a DTYPES name, double_quant, quant_type). An adapter on a quantised base stays unmerged
    (merging would round its update into the 4-/8-bit grid); errors name the flag `{quantize_prefix}load_in_4bit`.
    `head` (config fields: num_labels, id2label, ...) loads a sequence classifier instead (classify.py).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **(head or {}))
    if quantize:
        check_bitsandbytes(device, f"{quantize_prefix}load_in_{quantize}bit")
        # Quantised weights cannot be moved after loading (.to() refuses), so they are placed at load.
        options = dict(quantize_options or {})
        compute = resolve_dtype(options.pop("compute_dtype", None) or dtype, device)
        kwargs.update(quantization_config=bnb_config(quantize, compute, **options), device_map={"": device})
        merge_adapter = False
    auto = AutoModelForCausalLM if head is None else AutoModelForSequenceClassification
    path = Path(name_or_path)
    if is_missing_local_path(name_or_path):
        raise UsageError(f"cannot load model '{name_or_path}': no such directory; pass a Hub id "
                         "(e.g. EleutherAI/pythia-70m) or a directory written by save_pretrained / fine_tune.py")
    hub_name = hub_model_of(name_or_path)
    offline = hub_offline_reason() if hub_name else None
    try:
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

            peft_auto = AutoPeftModelForCausalLM if head is None else AutoPeftModelForSequenceClassification
            model = peft_auto.from_pretrained(name_or_path, **kwargs)
            if merge_adapter:
                model = model.merge_and_unload()
        else:
            model = auto.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        if path.is_dir() and not list(path.glob("*.safetensors")) and list(path.glob("*.bin")):
            raise UsageError(
                f"model directory {name_or_path} holds only pickle weights (*.bin), which are not loaded (a pickle can "
                "run code); convert it once, from a source you trust: AutoModelForCausalLM.from_pretrained(DIR, "
                "use_safetensors=False).save_pretrained(DIR)"
            ) from None
        if offline:
            what = "model" if hub_name == name_or_path else "the adapter's base model"
            raise not_cached_error(what, hub_name, flag, offline) from None
        raise UsageError(
            f"cannot load model '{name_or_path}': {first_line(err)}; pass a Hub id (e.g. EleutherAI/pythia-70m), "
            "a directory written by save_pretrained, or a LoRA adapter directory from fine_tune.py"
        ) from None
    if quantize:
        fit_cpu_inference_kernel(model)
    warn_if_trained_quantized(name_or_path, quantize, flag, quantize_prefix)
    if not quantize:
        model.to(device)
    model.eval()
    return model


def hub_model_of(name_or_path: str) -> str | None:
    """The Hub id that loading `name_or_path` downloads from, or None: the id itself, or the base model of a local
    LoRA adapter directory when that base is not a local path."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path
    try:
        base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and not Path(base).expanduser().exists() else None


# ---------------------------------------------------------------------------------------------
# Quantisation (bitsandbytes): 4-bit NF4 with double quantisation (QLoRA, Dettmers et al. 2023, arXiv:2305.14314)
# or LLM.int8 (Dettmers et al. 2022). bitsandbytes >= 0.49 runs both on CPU too; what was measured where is in
# README.md ("Quantised models").
# ---------------------------------------------------------------------------------------------
QUANTIZATION_RECORD = "base_quantization.json"  # written beside an adapter trained on a quantised base


QUANTIZABLE_ROLES = ("large", "small_base", "small_tuned", "large_tuned")  # the model roles of steer.py/evaluation.py


def _role_flag(role: str, bits: int) -> dataclasses.Field:
    what = {4: "4-bit NF4 with double quantisation, computing in the role's dtype", 8: "8-bit LLM.int8"}[bits]
    return dataclasses.field(default=False, metadata={"help": f"Load the {role} model's linear layers in {what} "
                                                      "(bitsandbytes; an adapter stays unmerged on the quantised base)."})


@dataclasses.dataclass
class QuantizationArguments:
    """--{role}_load_in_4bit / --{role}_load_in_8bit for every model role; steer.py's and evaluation.py's
    ModelArguments inherit them, so one definition serves both scripts."""

    large_load_in_4bit: bool = _role_flag("large", 4)
    large_load_in_8bit: bool = _role_flag("large", 8)
    small_base_load_in_4bit: bool = _role_flag("small_base", 4)
    small_base_load_in_8bit: bool = _role_flag("small_base", 8)
    small_tuned_load_in_4bit: bool = _role_flag("small_tuned", 4)
    small_tuned_load_in_8bit: bool = _role_flag("small_tuned", 8)
    large_tuned_load_in_4bit: bool = _role_flag("large_tuned", 4)
    large_tuned_load_in_8bit: bool = _role_flag("large_tuned", 8)

    def __post_init__(self):
        for role in QUANTIZABLE_ROLES:
            self.quantization_of(role)

    def quantization_of(self, role: str) -> int | None:
        """4, 8 or None for `role`; both flags of one role -> UsageError."""
        return quantization_bits(getattr(self, f"{role}_load_in_4bit"), getattr(self, f"{role}_load_in_8bit"),
                                 prefix=f"--{role}_")


def quantization_flags_last(cls):
    """Class decorator for a dataclass inheriting QuantizationArguments: dataclass fields put a base class's first,
    so `--help` (HfArgumentParser walks dataclasses.fields) would open with eight quantisation flags; this moves
    them after the class's own fields (the model paths), in the field table both read."""
    own = {name: f for name, f in cls.__dataclass_fields__.items()
           if name not in QuantizationArguments.__dataclass_fields__}
    cls.__dataclass_fields__ = {**own, **{name: f for name, f in cls.__dataclass_fields__.items() if name not in own}}
    return cls


def quantization_bits(load_in_4bit: bool, load_in_8bit: bool, prefix: str = "--") -> int | None:
    """`quantization_bits(True, False)` -> 4; (False, False) -> None; both -> UsageError naming the two flags."""
    if load_in_4bit and load_in_8bit:
        raise UsageError(f"give {prefix}load_in_4bit or {prefix}load_in_8bit, not both")
    return 4 if load_in_4bit else 8 if load_in_8bit else None


def check_bitsandbytes(device: str, flag: str) -> None:
    """Refuse `flag` in one line when bitsandbytes is not installed or has no backend for `device`'s type
    (0.49+ runs on cpu and cuda; older builds need CUDA)."""
    try:
        import bitsandbytes
    except ImportError:
        raise UsageError(f"{flag} needs bitsandbytes, which is not installed; `pip install bitsandbytes` "
                         f"(see requirements.txt) or drop {flag}") from None
    except Exception as err:  # a broken CUDA setup fails inside the import with its own errors
        raise UsageError(f"{flag}: bitsandbytes cannot be imported here ({first_line(err)}); drop {flag}") from None
    kind = str(device).split(":")[0]
    supported = set(getattr(bitsandbytes, "supported_torch_devices", {"cuda"}))
    if kind not in supported:
        raise UsageError(f"{flag}: bitsandbytes {bitsandbytes.__version__} cannot run on {kind} (it supports "
                         f"{', '.join(sorted(supported))}); use a device it supports, a newer bitsandbytes (0.49+ "
                         f"runs on CPU), or drop {flag}")


def bnb_config(bits: int, compute_dtype, double_quant: bool = True, quant_type: str = "nf4"):
    """transformers' BitsAndBytesConfig: 4-bit NF4 with double quantisation (the quantisation constants quantised
    too, ~0.4 bit per parameter saved) computing in `compute_dtype`, or 8-bit LLM.int8. The output layer
    (embed_out) and the embeddings stay unquantised (transformers skips them), so logits keep their precision."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UsageError(f"quantisation to {bits} bits is not supported; use 4 or 8")


def quantization_record(bits: int, compute_dtype: str, double_quant: bool, quant_type: str) -> dict[str, Any]:
    """What QUANTIZATION_RECORD holds: how the base was quantised while the adapter beside it was trained."""
    return {"bits": bits, **({"quant_type": quant_type, "double_quant": double_quant, "compute_dtype": compute_dtype}
                             if bits == 4 else {})}


def linear_4bit_layers(model) -> list:
    """The bitsandbytes 4-bit linear layers of `model`; none (and no bitsandbytes import) unless it loaded in 4 bits."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return []
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def fit_cpu_inference_kernel(model) -> None:
    """bitsandbytes 0.50 repacks a 4-bit layer, on its first inference call on a CPU with AVX512-BF16, for a fused
    bfloat16 kernel; the repacking needs in_features to be a multiple of the block size (64) and out_features of 32,
    and fails with a reshape error otherwise (tiny models). Such layers keep the general path (dequantise, then a
    matmul in the compute dtype). Every Pythia size fits."""
    for layer in linear_4bit_layers(model):
        blocksize = getattr(layer.weight.quant_state, "blocksize", 64)
        if layer.in_features % blocksize or layer.out_features % 32:
            layer.support_avx512bf16_for_cpu = False


def prepare_quantized_for_lora(model, gradient_checkpointing: bool):
    """peft's prepare_model_for_kbit_training (freeze the base, unquantised parameters to float32, grad-requiring
    inputs for checkpointing) for a model that will be trained and also evaluated in between: bitsandbytes' CPU
    inference repacking (fit_cpu_inference_kernel) is one-way and a later training step then fails, so it is
    switched off on every 4-bit layer of a model that trains."""
    from peft import prepare_model_for_kbit_training

    for layer in linear_4bit_layers(model):
        layer.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def warn_if_trained_quantized(name_or_path: str, bits: int | None, flag: str, quantize_prefix: str = "--") -> None:
    """An adapter fine_tune.py trained on a quantised base records it (QUANTIZATION_RECORD). Loaded on the
    full-precision base (and merged into it) the adapter sees weights a little different from those it was trained
    on; loaded with the other bit width, too. Either works, but say so once."""
    record = Path(name_or_path).expanduser() / QUANTIZATION_RECORD
    if not record.is_file():
        return
    try:
        trained = int(json.loads(record.read_text(encoding="utf-8")).get("bits"))
    except (OSError, ValueError, TypeError, AttributeError):
        return
    if trained != bits:
        now = f"{bits}-bit" if bits else "unquantised (the adapter merged into the full-precision base)"
        logger.warning("%s %s: this adapter was trained on a %d-bit base and is loaded %s; pass %sload_in_%dbit "
                       "to load it as it was trained", flag, name_or_path, trained, now, quantize_prefix, trained)


def vocab_size_of(tokenizer) -> int:
    """Number of real tokens (Pythia: 50,277, while its embedding matrix has 50,304 padded rows)."""
    return len(tokenizer)


def check_same_vocab(tokenizers: dict[str, Any]) -> None:
    """Refuse to combine models whose tokenizers map text to different ids."""
    items = list(tokenizers.items())
    name0, tok0 = items[0]
    vocab0 = tok0.get_vocab()
    differ = [name for name, tok in items[1:] if tok.get_vocab() != vocab0]
    if differ:
        # Every model's size, not only the first pair's: with three models, the odd one out must be visible.
        sizes = ", ".join(f"{name} {len(tok)} tokens" for name, tok in items)
        raise UsageError(
            f"tokenizers of {name0} and {', '.join(differ)} differ ({sizes}); steering needs models that share "
            "one tokenizer (e.g. all Pythia): pass models of one family, each with the tokenizer it was trained with"
        )


def clean_whitespace(text: str) -> str:
    """`clean_whitespace("a  <sep> b\\t c ")` -> 'a\\nb c': MReD's `<sep>` markers become line breaks,
    runs of spaces collapse, and blank lines are kept at most one deep."""
    text = text.replace("<sep>", "\n")
    text = re.sub(r"[ \t\r\f\v\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
