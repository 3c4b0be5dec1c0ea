"""The meta-review prompt: the template, the target, and fitting several reviews into a token budget."""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxytune.foundation.errors import UsageError

# The prompt. One template, imported by every script, so training and inference never disagree.
# The target is " " + meta-review + EOS: the leading space keeps the token boundary after the cue
# clean, and the EOS is what teaches the model to stop.
PROMPT_TEMPLATE = "Peer reviews of a paper:\n\n{reviews}\n\nMeta-review:"


REVIEW_JOINER = "\n\n"


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


def clean_whitespace(text: str) -> str:
    """`clean_whitespace("a  <sep> b\\t c ")` -> 'a\\nb c': MReD's `<sep>` markers become line breaks,
    runs of spaces collapse, and blank lines are kept at most one deep."""
    text = text.replace("<sep>", "\n")
    text = re.sub(r"[ \t\r\f\v\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
