"""Metrics on generated text: against the reference meta-review (ROUGE, sentences), and on its own (repetition,
distinct n-grams)."""

from __future__ import annotations

import re
from collections import Counter

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


def word_ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """`word_ngrams("the cat sat", 2)` -> [('the', 'cat'), ('cat', 'sat')]."""
    words = text.split()
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of `texts` (words): `distinct_n(["a a", "a b"], 1)` -> 0.5."""
    grams = [g for t in texts for g in word_ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_shares(texts: list[str], n: int) -> tuple[list[float], list[int]]:
    """distinct_n as a ratio of per-text sums, so that texts can be resampled: (shares, counts), where counts[i] is
    text i's number of n-grams and shares[i] gives each of its n-grams 1/c, c the n-gram's count over all `texts`.
    sum(shares) is the number of distinct n-grams, sum(counts) the number of n-grams, and their ratio distinct_n.

    `distinct_shares(["a a", "a b"], 1)` -> ([2/3, 4/3], [2, 2]): 'a' occurs 3 times, 'b' once; 2/4 = 0.5."""
    grams = [word_ngrams(t, n) for t in texts]
    count = Counter(g for gs in grams for g in gs)
    return [sum(1 / count[g] for g in gs) for gs in grams], [len(gs) for gs in grams]
