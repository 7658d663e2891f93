"""TextTracker with a real byte-level BPE tokenizer: streamed pieces add up to decode(all tokens), never end in a
half character, and stop strings are found across token boundaries and held back until decided."""
from gpt2_jax.serve.detokenize import TextTracker

TEXT = "the quick ünïcödé 漢字 fox jumps"


def pieces(tracker, ids):
    out = [tracker.feed([t]) for t in ids]
    return out + [tracker.finish()]


def test_streamed_pieces_add_up_to_the_decoded_text(tokenizer):
    ids = tokenizer.encode(TEXT)
    got = pieces(TextTracker(tokenizer), ids)
    assert "".join(got) == tokenizer.decode(ids) == TEXT
    assert not any(p.endswith("\ufffd") for p in got)
    assert len(ids) > len(TEXT.encode()) // 2  # byte-level pieces: characters do split across tokens
    whole = TextTracker(tokenizer, incremental=False)
    assert pieces(whole, ids)[:-1] == [""] * len(ids) and whole.text == TEXT


def test_stop_strings_across_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    for stop, include in (("ck ü", False), ("漢字", True), ("jumps", False)):
        t = TextTracker(tokenizer, stops=["never", stop], include_stop=include)
        got = "".join(pieces(t, ids))
        at = TEXT.index(stop)
        assert got == TEXT[:at + len(stop) if include else at] and t.stop_reason == stop
    t = TextTracker(tokenizer, stops=["zzz"])
    assert "".join(pieces(t, ids)) == TEXT and t.stop_reason is None


def test_the_last_characters_are_held_back_while_they_may_start_a_stop_string(tokenizer):
    stop = "fox jumps over"
    t, ids, released = TextTracker(tokenizer, stops=[stop]), tokenizer.encode(TEXT), ""
    for i, tok in enumerate(ids):
        released += t.feed([tok])
        assert len(released) <= max(0, len(tokenizer.decode(ids[:i + 1])) - (len(stop) - 1))
    assert released == TEXT[:len(TEXT) - len(stop) + 1] and t.finish() == TEXT[len(released):]


def test_stop_strings_wait_for_min_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    t = TextTracker(tokenizer, stops=["the"], min_tokens=3)
    assert "".join(pieces(t, ids)) == TEXT and t.stop_reason is None  # "the" came before the third token
