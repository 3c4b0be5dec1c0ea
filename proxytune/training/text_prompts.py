"""Prompts from plain text (the Mini-ChatGPT recipe): the first N tokens of a text, N and the completion's length
drawn per text from ranges; rl_tune.py's policy continues each prompt and a reward scores the continuation, and
evaluation.py --text_dataset has every system continue them."""

from __future__ import annotations

import random
from types import SimpleNamespace

from proxytune.foundation.errors import UsageError
from proxytune.training.data import load_text_dataset


def parse_token_range(text: str, flag: str) -> tuple[int, int]:
    """`parse_token_range("2,8", "--prompt_length")` -> (2, 8); a single number is a fixed length: "8" -> (8, 8)."""
    try:
        parts = [int(x) for x in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise UsageError(f"{flag} '{text}' is not a number of tokens 'N' or a range 'low,high', e.g. 2,8")
    low, high = parts
    if not 1 <= low <= high:
        raise UsageError(f"{flag} {text}: need 1 <= low <= high")
    return low, high


def load_prompt_texts(args, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of --text_dataset's --text_column (a Hub id or a local file; the held-out
    ones are its validation split, else --validation_split_percentage of it), at most --max_train_samples for
    training. IMDB's HTML line breaks (`<br />`) become spaces."""
    data_args = SimpleNamespace(dataset_path=args.text_dataset, text_column=args.text_column,
                                validation_split_percentage=args.validation_split_percentage,
                                max_train_samples=args.max_train_samples, max_eval_samples=None)
    try:
        dataset = load_text_dataset(data_args, seed)
    except UsageError as err:  # its messages name fine_tune.py's flags
        raise UsageError(str(err).replace("--dataset_path", "--text_dataset")) from None
    clean = lambda texts: [" ".join(t.replace("<br />", " ").split()) for t in texts]  # noqa: E731
    return clean(dataset["train"]["text"]), clean(dataset["validation"]["text"])


def text_prompt_rows(texts: list[str], tokenizer, prompt_range: tuple[int, int], completion_range: tuple[int, int],
                     seed: int, id_prefix: str = "") -> list[dict]:
    """Rows {prompt, completion_length, example_id}: the first N tokens of each text (N uniform in prompt_range,
    decoded back to text; a text shorter than the range's low end is skipped) and a completion length uniform in
    completion_range. Seeded: the same texts and seed give the same prompts.

    `text_prompt_rows(["I loved this film"], tok, (2, 2), (4, 4), 0)` -> [{"prompt": "I loved", "completion_length":
    4, "example_id": "0"}] (with a tokenizer that splits on words)."""
    rng = random.Random(seed)
    rows = []
    head_chars = 64 * prompt_range[1]  # far more than N tokens need: only a text's head is tokenized (speed)
    for i, text in enumerate(texts):
        ids = tokenizer(text[:head_chars], add_special_tokens=False)["input_ids"]
        n = rng.randint(*prompt_range)
        length = rng.randint(*completion_range)
        if len(ids) < prompt_range[0]:
            continue
        rows.append({"prompt": tokenizer.decode(ids[:n]), "completion_length": length,
                     "example_id": f"{id_prefix}{i}"})
    return rows


def length_summary(rows: list[dict], tokenizer) -> dict:
    """The prompt and completion lengths actually drawn (final/metrics.json records them)."""
    prompt = [len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    completion = [r["completion_length"] for r in rows]
    if not rows:
        return {}
    return {"prompts": len(rows), "prompt_tokens_min": min(prompt), "prompt_tokens_max": max(prompt),
            "prompt_tokens_mean": sum(prompt) / len(prompt), "completion_tokens_min": min(completion),
            "completion_tokens_max": max(completion), "completion_tokens_mean": sum(completion) / len(completion)}
