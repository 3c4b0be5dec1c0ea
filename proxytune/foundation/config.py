"""Flags and config files: dataclasses parsed by HfArgumentParser, JSON/YAML files that cascade, flags last."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from proxytune.foundation.errors import UsageError

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


SPECIAL_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


def is_secret(name: str) -> bool:
    """Settings whose values are credentials: token, hub_token, api_key, ..._password, ..._secret. A name that
    merely mentions tokens (tokenizer_name, max_new_tokens, a string `stop_tokens`) or a special token is a setting.
    `is_secret("hub_token")` -> True, `is_secret("eos_token")` -> False."""
    if name.endswith(SPECIAL_TOKENS):
        return False
    return name in ("token", "api_key", "password", "secret") or name.endswith(
        ("_token", "_api_key", "_password", "_secret"))


def to_jsonable(*objs) -> dict[str, Any]:
    """Merge dataclasses into one JSON-able dict (for `config.json`), tokens and secrets removed."""
    out: dict[str, Any] = {}
    for obj in objs:
        if obj is None:
            continue
        items = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        for k, v in items.items():
            if is_secret(k) and isinstance(v, str):
                v = "<redacted>"
            out[k] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)
    return out
