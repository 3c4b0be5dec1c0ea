"""The rewards of GRPO, RLOO and PPO: built-in (ROUGE, EOS, length, repetition) and a sequence classifier's score of
one named class (or a one-output reward model: proxytune.training.classifier_scores), weighted."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

from proxytune.foundation.errors import UsageError, raise_problems
from proxytune.preference.arguments import BUILTIN_REWARDS, DEFAULT_REWARD
from proxytune.task.text_metrics import make_rouge_scorer, repetition_rate, score_rouge


# Rewards. TRL (and proxytune.preference.ppo_trainer) calls each as f(prompts=..., completions=...,
# completion_ids=..., <dataset columns>) with the completion text decoded without special tokens, so the EOS is seen
# in completion_ids: TRL keeps the ids up to and including the first EOS (GRPOTrainer._generate), so a completion that
# stopped ends with an EOS id.
def parse_reward_spec(spec: str, reward_model: str | None) -> list[tuple[str, float]]:
    """`parse_reward_spec("rouge:1,eos:0.5", None)` -> [('rouge', 1.0), ('eos', 0.5)]; a name alone weighs 1."""
    rewards, problems = [], []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, weight_text = item.partition(":")
        name = name.strip()
        if name not in BUILTIN_REWARDS:
            close = difflib.get_close_matches(name, BUILTIN_REWARDS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(BUILTIN_REWARDS)}"
            problems.append(f"--reward: unknown reward '{name}'; {hint}")
            continue
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            problems.append(f"--reward: weight '{weight_text}' of '{name}' is not a number; write name:weight, e.g. "
                            f"{name}:0.5")
            continue
        if not math.isfinite(weight) or weight < 0:
            problems.append(f"--reward: weight {weight_text} of '{name}' must be a finite number >= 0")
            continue
        if name in dict(rewards):
            problems.append(f"--reward names '{name}' twice; give each reward once")
            continue
        rewards.append((name, weight))
    raise_problems(problems)
    if not rewards and not reward_model:
        raise UsageError(f"--reward '{spec}' names no reward and there is no --reward_model; pass e.g. --reward "
                         f"{DEFAULT_REWARD}")
    if rewards and not reward_model and not any(w > 0 for _, w in rewards):
        raise UsageError(f"--reward '{spec}' gives every reward weight 0; give at least one a positive weight")
    return rewards


def parse_length_range(text: str) -> tuple[int, int]:
    """`parse_length_range("20,200")` -> (20, 200)."""
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--length_range '{text}' is not two whole numbers of words 'low,high', e.g. 20,200") from None
    if not 0 <= low <= high:
        raise UsageError(f"--length_range {text}: need 0 <= low <= high")
    return low, high


def length_score(words: int, low: int, high: int) -> float:
    """1 inside [low, high], falling linearly to 0 at 0 words and at 2 * high: `length_score(10, 20, 200)` -> 0.5."""
    if words < low:
        return words / low
    if words > high:
        return max(0.0, 1 - (words - high) / max(high, 1))
    return 1.0


def make_reward_functions(rewards: list[tuple[str, float]], eos_ids: Sequence[int], length_range: tuple[int, int],
                          ngram: int) -> list:
    """The built-in rewards as TRL reward functions, named after the reward (TRL logs rewards/<name>/mean)."""

    scorer = make_rouge_scorer()
    eos = set(eos_ids)

    def rouge(completions, reference, **_):
        return [score_rouge(scorer, c, r)["rougeL"] / 100 for c, r in zip(completions, reference)]

    def eos_reward(completions, completion_ids, **_):
        return [float(bool(ids) and ids[-1] in eos) for ids in completion_ids]

    def length(completions, **_):
        return [length_score(len(c.split()), *length_range) for c in completions]

    def repetition(completions, **_):
        return [-repetition_rate(c, ngram) for c in completions]

    eos_reward.__name__ = "eos"
    functions = {"rouge": rouge, "eos": eos_reward, "length": length, "repetition": repetition}
    return [functions[name] for name, _ in rewards]
