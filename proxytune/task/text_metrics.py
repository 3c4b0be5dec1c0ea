"""Metrics on generated text against the reference meta-review: ROUGE, repetition, sentences."""

from __future__ import annotations

import re

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


SENTENCE_END = re.compile(r"(?<=[.!?][\"')\]])\s+|(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    """A stand-in for nltk's punkt (its data cannot be downloaded here): split after . ! ? and at line breaks.
    `split_sentences("Good paper. Weak baselines!\\nAccept")` -> ['Good paper.', 'Weak baselines!', 'Accept']."""
    return [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]


def make_rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def score_rouge(scorer, prediction: str, reference: str) -> dict[str, float]:
    """ROUGE F1 x 100; rougeLsum sees one sentence per line, as rouge-score expects."""
    scores = scorer.score("\n".join(split_sentences(reference)), "\n".join(split_sentences(prediction)))
    return {k: 100 * scores[k].fmeasure for k in ROUGE_TYPES}


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: `repetition_rate("a b a b a b", 2)` -> 0.6."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0
