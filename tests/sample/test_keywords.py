"""Tests for gpt2_jax/sample/keywords.py, on examples small enough to count by hand."""
import math

import pytest

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.text import is_unspaced, keyword_occurs
from gpt2_jax.sample.keywords import (cut_words, distinct_n, keyword_coverage, keyword_places, mean_coverage,
                                      placement, reference_placement, repeated_ngram_share, summarise,
                                      swapped_coverage, tokens)


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
    # Placement: "cat" is word 1 of 3, "dog" word 1 of 3 (row 2's "cat" does not occur); no run longer than 1.
    assert got == {"rows": 2, "keyword_coverage": 0.75, "swapped_coverage": 0.5 * (0.5 + 0.0),
                   "distinct_1": 1.0, "distinct_2": 1.0, "repeat_4gram": 0.0, "first_position": 1 / 3,
                   "first_10pct": 0.0, "longest_run": 1.0, "run3_rows": 0.0}
    with_ref = summarise(["the cat sat"], [["cat"]], references=["Cat food is good"])
    assert with_ref["reference_first_position"] == 0.0 and with_ref["run3_unlike_reference"] == 0.0


def test_placement_by_hand():
    # Words: casts(0) tackle(1) reinterpretation(2) method(3) for(4) word(5) and(6) x4is(7) gg(8) the(9):
    # "casts, tackle reinterpretation method" is 4 keywords in a row (punctuation between does not break it).
    text = "casts, tackle reinterpretation method for word and X4is, & GG the"
    first, run, n = keyword_places(text, ["reinterpretation", "Word", "tackle", "casts", "method", "absent"])
    assert n == 10 and run == 4
    assert first == [0.2, 0.5, 0.1, 0.0, 0.3]  # in the order of the keywords given, those that occur
    # A keyword of two words takes its first word's place and counts once in a run; repeats count again.
    assert keyword_places("a b the big data set big data x", ["big data", "set"]) == ([3 / 9, 5 / 9], 3, 9)
    assert keyword_places("data data data", ["data", "DATA"]) == ([0.0], 3, 3)  # one distinct keyword
    # Inside a longer word or identifier is not an occurrence (as keyword_occurs).
    assert keyword_places("json_dumps json", ["json"]) == ([0.5], 1, 2)
    assert keyword_places("", ["a"]) == ([], 0, 0)


def test_placement_unspaced_scripts():
    # Characters are the units: 中 国 经 济 持 续 发 展 (8); 经济 at 2, 发展 at 6; not adjacent.
    assert keyword_places("中国经济持续发展", ["经济", "发展"]) == ([2 / 8, 6 / 8], 1, 8)
    # 经济发展 written together: a run of 2; with 中国 first, 3 in a row.
    assert keyword_places("中国经济发展很快", ["经济", "发展", "中国"]) == ([2 / 8, 4 / 8, 0.0], 3, 8)
    # A Latin keyword in Chinese text: its own word, between characters. 我 们 用 python 写 代 码 (7).
    assert keyword_places("我们用Python写代码", ["python", "代码"]) == ([3 / 7, 5 / 7], 1, 7)
    assert cut_words("中国经济发展很快", 3) == "中国经" and cut_words("A b, c d", 3) == "a b, c"
    assert cut_words("a b", 5) == "a b" and cut_words("a b", 0) == ""


def test_placement_agrees_with_keyword_occurs():
    texts = ["The Cat sat on the mat. Cats, however, prefer json.dumps()!", "中国经济持续发展", "a json_dumps b",
             "我们用Python写代码", "Über alles"]
    for t in texts:
        for k in ["cat", "mat", "json.dumps", "ca", "json", "经济", "python", "über", "however", "Cats"]:
            first, _, _ = keyword_places(t, [k])
            assert bool(first) == keyword_occurs(t, k), (t, k)


def test_placement_over_rows_and_reference():
    texts = ["alpha beta gamma and more words here to make ten", "x y z", "nothing"]
    kws = [["alpha", "beta", "gamma"], ["z"], []]
    got = placement(texts, kws)
    # Row 1: 0, 0.1, 0.2 of 10 words; row 2: z at 2 of 3; row 3 has no keywords (not counted).
    assert got["first_position"] == pytest.approx((0 + 0.1 + 0.2 + 2 / 3) / 4)
    assert got["first_10pct"] == 0.25  # only alpha (0.1 is not inside the first 10%)
    assert got["longest_run"] == 3.0 and got["run3_rows"] == 0.5
    # The references are cut to each text's word count: row 1's to 10 words, where its keywords are spread.
    refs = ["words alpha more words beta here gamma then beyond the cut alpha beta gamma", "z", "n"]
    ref = reference_placement(texts, refs, kws)
    assert ref["reference_first_position"] == pytest.approx((0.1 + 0.4 + 0.6 + 0.0) / 4)
    assert ref["reference_first_10pct"] == 0.25 and ref["reference_longest_run"] == 1.0
    assert ref["reference_run3_rows"] == 0.0
    assert ref["run3_unlike_reference"] == 0.5  # row 1 has a run of 3, its reference none
    assert placement(["a"], [["b"]]) == {"first_position": None, "first_10pct": None, "longest_run": 0.0,
                                          "run3_rows": 0.0}


def test_bad_input():
    with pytest.raises(GPT2JaxError, match="2 texts but 1 keyword lists"):
        summarise(["a", "b"], [["a"]])
    with pytest.raises(GPT2JaxError, match="keyword list 0 is a string"):
        mean_coverage(["a"], ["a b"])
    with pytest.raises(GPT2JaxError, match="1 texts but 2 reference texts"):
        summarise(["a"], [["a"]], references=["a", "b"])
