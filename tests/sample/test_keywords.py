"""Tests for gpt2_jax/sample/keywords.py, on examples small enough to count by hand."""
import math

import pytest

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.text import is_unspaced, keyword_occurs
from gpt2_jax.sample.keywords import (distinct_n, keyword_coverage, mean_coverage,
                                      repeated_ngram_share, summarise, swapped_coverage, tokens)


def test_whole_words_case_insensitive_with_punctuation():
    text = "The Cat sat on the mat. Cats, however, prefer json.dumps()!"
    assert keyword_occurs(text, "cat") and keyword_occurs(text, "MAT") and keyword_occurs(text, "json.dumps")
    assert not keyword_occurs(text, "ca")  # part of a word
    assert not keyword_occurs(text, "at")
    assert not keyword_occurs(text, "json.dump")
    assert keyword_occurs(text, "however")  # between commas
    assert not keyword_occurs("a json_dumps b", "json")  # inside an identifier
    assert keyword_coverage(text, ["cat", "dog", "mat", "prefer"]) == 0.75
    assert keyword_coverage("Über alles", ["über"]) == 1.0


def test_unspaced_scripts_count_substrings():
    assert is_unspaced("经济") and is_unspaced("경제") and is_unspaced("けいざい") and not is_unspaced("économie")
    assert keyword_coverage("中国经济持续发展", ["经济", "发展"]) == 1.0
    assert keyword_coverage("中国经济持续发展。", ["经济", "增长", "中国", "政策"]) == 0.5
    assert keyword_coverage("한국 경제가 성장했다", ["경제", "성장"]) == 1.0  # particles attach to words
    # A Latin keyword in Chinese text is a whole word even without spaces around it.
    assert keyword_occurs("我们用Python写代码", "python") and not keyword_occurs("我们用Pythonic写", "python")


def test_no_keywords():
    assert math.isnan(keyword_coverage("text", []))
    assert mean_coverage(["a b", "c d"], [[], ["c", "x"]]) == 0.5  # the row without keywords does not count
    assert mean_coverage(["a"], [[]]) is None


def test_swap_uses_the_next_rows_keywords():
    texts = ["the cat sat", "a dog ran", "birds fly"]
    kws = [["cat", "sat"], ["dog", "birds"], ["fly", "ran"]]
    assert mean_coverage(texts, kws) == pytest.approx((1 + 0.5 + 0.5) / 3)
    # Shift 3 // 2 = 1: text 0 vs row 1's keywords: 0/2; text 1 vs row 2's: ran -> 1/2; text 2 vs row 0's: 0/2.
    assert swapped_coverage(texts, kws) == pytest.approx(0.5 / 3)
    assert swapped_coverage(["only one"], [["one"]]) is None
    # Four rows: shift 2, text i against row i + 2's keywords (never its own, nor its neighbour's).
    texts4 = ["w0 w2", "w1", "w2 w0", "w3"]
    assert swapped_coverage(texts4, [["w0"], ["w1"], ["w2"], ["w3"]]) == 0.5  # texts 0 and 2 hold each other's


def test_tokens_distinct_and_repeats():
    assert tokens("Hello, World! 中国经济 x_y 42") == ["hello", "world", "中", "国", "经", "济", "x_y", "42"]
    # "a b a b": 1-grams a b a b -> 2 unique of 4; 2-grams ab ba ab -> 2 of 3.
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # Pooled over texts: "a b" and "a c" have 1-grams a b a c: 3 unique of 4.
    assert distinct_n(["a b", "a c"], 1) == 0.75
    assert distinct_n(["", "x"], 2) == 0.0
    # "a b c d a b c d": 4-grams abcd bcda cdab dabc abcd -> the last one repeats: 1 of 5.
    assert repeated_ngram_share(["a b c d a b c d"], 4) == pytest.approx(1 / 5)
    # Only within a text: the same 4-gram in two texts is no repeat.
    assert repeated_ngram_share(["a b c d", "a b c d"], 4) == 0.0
    assert repeated_ngram_share(["我爱我爱我"], 4) == 0.0  # 我爱我爱, 爱我爱我: no repeat yet
    assert repeated_ngram_share(["我爱我爱我爱"], 4) == pytest.approx(1 / 3)  # then 我爱我爱 again


def test_summarise():
    got = summarise(["the cat sat", "a dog ran"], [["cat"], ["dog", "cat"]])
    assert got == {"rows": 2, "keyword_coverage": 0.75, "swapped_coverage": 0.5 * (0.5 + 0.0),
                   "distinct_1": 1.0, "distinct_2": 1.0, "repeat_4gram": 0.0}


def test_bad_input():
    with pytest.raises(GPT2JaxError, match="2 texts but 1 keyword lists"):
        summarise(["a", "b"], [["a"]])
    with pytest.raises(GPT2JaxError, match="keyword list 0 is a string"):
        mean_coverage(["a"], ["a b"])
