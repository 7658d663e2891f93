"""Does a generated text use its keywords, and where? Keyword coverage (also against another row's keywords),
placement (where each keyword first occurs, the share in the text's first 10%, runs of keywords in a row),
distinct-n and repeated 4-grams: pure Python, for generated files and evaluation during training.

A keyword occurs as `text.keyword_occurs` says (a whole word, or a substring in scripts without spaces).
For n-grams and positions, text in such scripts is split into characters, other text into words: a keyword's
position is the index of its first word (or character) over the text's count of them.
"""
from __future__ import annotations

import bisect
import re
from typing import Sequence

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.text import UNSPACED, is_unspaced, keyword_occurs

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


def _word_char(c: str) -> bool:
    # As text.keyword_occurs: a keyword must not continue a word (letters, digits, "_") of a spaced script.
    return (c.isalnum() or c == "_") and not is_unspaced(c)


def _spans(text: str, keyword: str) -> list[tuple[int, int]]:
    """Character spans of every occurrence of `keyword` in `text` (both lower-cased) that `keyword_occurs` counts."""
    if not keyword:
        return []
    unspaced, out = is_unspaced(keyword), []
    i = text.find(keyword)
    while i >= 0:
        j = i + len(keyword)
        if unspaced or (not (i and _word_char(text[i - 1])) and not (j < len(text) and _word_char(text[j]))):
            out.append((i, j))
        i = text.find(keyword, i + 1)
    return out


def keyword_places(text: str, keywords: Sequence[str]) -> tuple[list[float], int, int]:
    """(first, run, words): each occurring keyword's first position as a fraction of the text's words (the index
    of its first word over the count, so 0 for the first word), the longest run of keyword occurrences in a row
    (nothing but spaces or punctuation between them; a keyword repeated counts again), and the word count."""
    text = text.lower()
    bounds = [(m.start(), m.end()) for m in _TOKEN.finditer(text)]
    starts, ends = [a for a, _ in bounds], [b for _, b in bounds]
    n, first, occ = len(bounds), [], []
    for kw in dict.fromkeys(k.lower() for k in keywords if k):  # each distinct keyword once
        words = [(bisect.bisect_right(ends, a), bisect.bisect_left(starts, b)) for a, b in _spans(text, kw)]
        words = [(w0, w1) for w0, w1 in words if w1 > w0]  # a keyword of punctuation alone has no place
        if words:
            first.append(words[0][0] / n)
            occ += words
    run_to: dict[int, int] = {}  # word index -> longest run of occurrences ending just before it
    longest = 0
    for w0, w1 in sorted(occ):
        r = run_to.get(w0, 0) + 1
        run_to[w1], longest = max(run_to.get(w1, 0), r), max(longest, r)
    return first, longest, n


def cut_words(text: str, n: int) -> str:
    """`text` (lower-cased) up to the end of its `n`-th word or character (as `tokens` splits it)."""
    text = text.lower()
    ends = [m.end() for m in _TOKEN.finditer(text)]
    return text[:ends[n - 1]] if 0 < n <= len(ends) else text if n > len(ends) else ""


def placement(texts: Sequence[str], keyword_lists: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """Where the keywords are, over the rows with keywords: first_position (mean first position of the keywords
    that occur, as a fraction of the text), first_10pct (the share of them first written in the text's first
    10%), longest_run (the longest run of keywords in a row in any text) and run3_rows (the share of rows with a
    run of 3 or more). None where nothing occurs."""
    _check_rows(texts, keyword_lists)
    firsts, runs = [], []
    for t, k in zip(texts, keyword_lists):
        if any(k):
            first, run, _ = keyword_places(t, k)
            firsts += first
            runs.append(run)
    return {"first_position": sum(firsts) / len(firsts) if firsts else None,
            "first_10pct": sum(f < 0.1 for f in firsts) / len(firsts) if firsts else None,
            "longest_run": float(max(runs)) if runs else None,
            "run3_rows": sum(r >= 3 for r in runs) / len(runs) if runs else None}


def reference_placement(texts: Sequence[str], references: Sequence[str],
                        keyword_lists: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """`placement` of the reference texts, each cut to its generated text's word count, as reference_* keys;
    and run3_unlike_reference: the share of rows whose text has a run of 3 or more keywords where its cut
    reference has none."""
    _check_rows(texts, keyword_lists)
    cut = [cut_words(r, len(tokens(t))) for t, r in zip(texts, references)]
    out = {f"reference_{k}": v for k, v in placement(cut, keyword_lists).items()}
    rows = [(keyword_places(t, k)[1], keyword_places(c, k)[1]) for t, c, k in zip(texts, cut, keyword_lists) if any(k)]
    out["run3_unlike_reference"] = sum(g >= 3 > r for g, r in rows) / len(rows) if rows else None
    return out


def summarise(texts: Sequence[str], keyword_lists: Sequence[Sequence[str]],
              references: Sequence[str] | None = None) -> dict[str, float | None]:
    """keyword_coverage and swapped_coverage (means over rows with keywords), distinct_1, distinct_2 and
    repeat_4gram (over all the texts' n-grams), `placement`'s figures, the row count, and with `references`
    (the rows' own texts) `reference_placement`'s."""
    out = {"rows": len(texts), "keyword_coverage": mean_coverage(texts, keyword_lists),
           "swapped_coverage": swapped_coverage(texts, keyword_lists), "distinct_1": distinct_n(texts, 1),
           "distinct_2": distinct_n(texts, 2), "repeat_4gram": repeated_ngram_share(texts, 4),
           **placement(texts, keyword_lists)}
    if references is not None:
        if len(references) != len(texts):
            raise GPT2JaxError(f"{len(texts)} texts but {len(references)} reference texts")
        out.update(reference_placement(texts, references, keyword_lists))
    return out


def _check_rows(texts, keyword_lists) -> None:
    if len(texts) != len(keyword_lists):
        raise GPT2JaxError(f"{len(texts)} texts but {len(keyword_lists)} keyword lists")
    bad = next((i for i, k in enumerate(keyword_lists) if isinstance(k, str)), None)
    if bad is not None:
        raise GPT2JaxError(f"keyword list {bad} is a string, not a list of keywords: {keyword_lists[bad]!r}")
