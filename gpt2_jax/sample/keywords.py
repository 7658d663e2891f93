"""Does a generated text use its keywords? Keyword coverage (also against another row's keywords), distinct-n
and repeated 4-grams: pure Python, for generated files and evaluation during training.

A keyword occurs as `text.keyword_occurs` says (a whole word, or a substring in scripts without spaces).
For n-grams, text in such scripts is split into characters, other text into words.
"""
from __future__ import annotations

import re
from typing import Sequence

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.text import UNSPACED, keyword_occurs

# A token: one character of an unspaced script, or a run of other word characters (no punctuation).
_TOKEN = re.compile(f"[{UNSPACED}]|(?:(?![{UNSPACED}])\\w)+")


def keyword_coverage(text: str, keywords: Sequence[str]) -> float:
    """The share of `keywords` that occur in `text` (NaN for no keywords)."""
    keywords = [k for k in keywords if k]
    if not keywords:
        return float("nan")
    return sum(keyword_occurs(text, k) for k in keywords) / len(keywords)


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v == v]  # rows without keywords (NaN) do not count
    return sum(values) / len(values) if values else None


def mean_coverage(texts: Sequence[str], keyword_lists: Sequence[Sequence[str]]) -> float | None:
    """Mean keyword coverage over the rows that have keywords (None if none has)."""
    _check_rows(texts, keyword_lists)
    return _mean([keyword_coverage(t, k) for t, k in zip(texts, keyword_lists)])


def swapped_coverage(texts: Sequence[str], keyword_lists: Sequence[Sequence[str]]) -> float | None:
    """Mean coverage of text i by the keywords of row (i + n // 2) mod n: what a text scores for keywords it was
    not given (a model that ignores its keywords scores the same here as on its own; None for fewer than 2 rows).
    Half the file away rather than the next row: neighbours in a sorted file (one module's functions) share words."""
    _check_rows(texts, keyword_lists)
    n = len(texts)
    if n < 2:
        return None
    return _mean([keyword_coverage(texts[i], keyword_lists[(i + n // 2) % n]) for i in range(n)])


def tokens(text: str) -> list[str]:
    """Lower-cased words, and single characters of unspaced scripts; punctuation dropped."""
    return _TOKEN.findall(text.lower())


def _ngrams(toks: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n over all the texts: unique n-grams / all n-grams (n-grams within each text; 0 if none)."""
    grams = [g for t in texts for g in _ngrams(tokens(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(texts: Sequence[str], n: int = 4) -> float:
    """Of all the texts' n-grams, the share that already occurred earlier in the same text (0 if none):
    a measure of loops ("the the the", a sentence written twice)."""
    repeated = total = 0
    for t in texts:
        seen: set[tuple[str, ...]] = set()
        for g in _ngrams(tokens(t), n):
            repeated += g in seen
            seen.add(g)
            total += 1
    return repeated / total if total else 0.0


def summarise(texts: Sequence[str], keyword_lists: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """keyword_coverage and swapped_coverage (means over rows with keywords), distinct_1, distinct_2 and
    repeat_4gram (over all the texts' n-grams), and the row count."""
    return {"rows": len(texts), "keyword_coverage": mean_coverage(texts, keyword_lists),
            "swapped_coverage": swapped_coverage(texts, keyword_lists), "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2), "repeat_4gram": repeated_ngram_share(texts, 4)}


def _check_rows(texts, keyword_lists) -> None:
    if len(texts) != len(keyword_lists):
        raise GPT2JaxError(f"{len(texts)} texts but {len(keyword_lists)} keyword lists")
    bad = next((i for i, k in enumerate(keyword_lists) if isinstance(k, str)), None)
    if bad is not None:
        raise GPT2JaxError(f"keyword list {bad} is a string, not a list of keywords: {keyword_lists[bad]!r}")
