"""Keywords in text, by script: the one table of scripts written without spaces between words, whether a
keyword occurs in a text, and a keyword's token ids as it appears in running text.

Scripts written without spaces (Chinese, Japanese, Thai, ...; Korean too, whose particles attach to the word)
have no word boundaries to match: a keyword with such characters counts where it occurs as a substring. Every
other keyword must occur as a whole word (not inside a longer word or identifier), case-insensitively.
"""
from __future__ import annotations

import re
from typing import Sequence

# The characters a BERT-style (WordPiece) tokenizer splits one by one: CJK radicals, punctuation, kana,
# bopomofo, ideographs (with extension A and the compatibility forms), full- and half-width forms, the
# supplementary ideograph planes. Decoding joins them again (no space between two of them).
CJK = "\u2e80-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003ffff"
# Every script without spaces between words: CJK above, and Thai, Lao, Myanmar, Khmer, Hangul jamo and
# syllables (spaced between phrases, but a keyword is a substring of its phrase).
UNSPACED = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u1100-\u11ff\uac00-\ud7af" + CJK
_UNSPACED = re.compile(f"[{UNSPACED}]")


def is_unspaced(keyword: str) -> bool:
    """Whether `keyword` is written in a script without spaces (any of its characters is): matched as a substring."""
    return _UNSPACED.search(keyword) is not None


def _word_char(c: str) -> bool:
    return (c.isalnum() or c == "_") and not _UNSPACED.match(c)


def keyword_occurs(text: str, keyword: str) -> bool:
    """Whether `keyword` occurs in `text`: as a whole word, case-insensitively (a substring for unspaced scripts)."""
    # str.find rather than a regex per keyword: compiling one costs more than searching a text.
    text, keyword = text.lower(), keyword.lower()
    if not keyword or is_unspaced(keyword):
        return bool(keyword) and keyword in text
    i = text.find(keyword)
    while i >= 0:
        j = i + len(keyword)
        if not (i and _word_char(text[i - 1])) and not (j < len(text) and _word_char(text[j])):
            return True
        i = text.find(keyword, i + 1)
    return False


def keyword_token_ids(tokenizer, keywords: Sequence[str]) -> list[list[int]]:
    """Each keyword's token ids as it appears in running text, for `sample.generate.generate(keywords=...)`.

    A word of a spaced script follows a space mid-text (GPT-2 BPE "Ġword", SentencePiece "▁word"); a word of
    an unspaced script (Chinese) follows another character directly. So the keyword is encoded after a
    context ("a " or "的") and the context's own tokens are cut off; where the two do not split cleanly (the
    keyword's first token merges with the context), it is encoded alone, after a space where spaced.
    """
    out = []
    for word in keywords:
        sep, context = ("", "的") if is_unspaced(word) else (" ", "a")
        head, ids = tokenizer.encode(context), tokenizer.encode(context + sep + word)
        if ids[:len(head)] == head and len(ids) > len(head):
            out.append(ids[len(head):])
        else:
            out.append(tokenizer.encode(sep + word))
    return [ids for ids in out if ids]
