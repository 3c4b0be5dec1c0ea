"""Number and range checks that name the flag, the value and the fix."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# Numbers: finite and in range, checked before any work. `x <= 0` lets NaN through, and a value that is finite
# in Python but not in float32 (`--alpha 1e39`) would only fail inside torch.
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


def number_problem(flag: str, value: float | int | None, spec: str = "(-inf, inf)",
                   hint: str | None = None) -> str | None:
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
DECODING_RANGES = {"max_new_tokens": ("[1, inf)", None),
                   "temperature": ("(0, inf)", "greedy decoding is do_sample false"),
                   "top_p": ("(0, 1]", None), "repetition_penalty": ("(0, inf)", "1.0 = off"),
                   "no_repeat_ngram_size": ("[0, inf)", "0 = off")}


def decoding_problems(settings: dict[str, Any], prefix: str = "--") -> list[str]:
    """Problems with one set of decoding settings (the keys of DECODING_RANGES); `prefix` goes before each name
    ("--" for flags, "--decoding_overrides large." for an override): `decoding_problems({..., "top_p": 2.0})` ->
    ['--top_p 2.0 must be in (0, 1]']."""
    problems = [number_problem(f"{prefix}{name}", settings[name], spec, hint)
                for name, (spec, hint) in DECODING_RANGES.items()]
    return [p for p in problems if p]
