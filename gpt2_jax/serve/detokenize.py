"""One choice's text as its tokens arrive: the text released so far and stop strings found in it.

Incrementally, as vLLM does: each new piece is the decoded window of the last tokens (the previous piece's
tokens as context, so that spaces and merges come out as in the whole text) minus the decoded context, so a
token costs the same however long the text is. A piece waits while it ends in half a character (U+FFFD), and
with stop strings the last `len(longest stop) - 1` characters wait until they cannot start one. Without
streaming and stop strings the text is decoded once, whole, at the end (exactly `generate_text`'s).
"""
from __future__ import annotations

from typing import Optional, Sequence

REPLACEMENT = "\ufffd"


class TextTracker:
    """Feeds a choice's new tokens; says what text to release and whether a stop string ended it."""

    def __init__(self, tokenizer, *, stops: Sequence[str] = (), include_stop: bool = False, min_tokens: int = 0,
                 incremental: bool = True):
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.include_stop = include_stop
        self.min_tokens = min_tokens
        # Without streaming and stop strings, the text is decoded once, at the end.
        self.incremental = incremental or bool(self.stops)
        self.hold = max(map(len, self.stops), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window's context starts at ids[prefix]; ids[read:] are not decoded yet
        self.text = ""  # the decoded text so far, up to the stop string (if one was found)
        self.released = 0  # characters of `text` handed out so far
        self.scanned = 0  # characters of `text` already searched for stop strings
        self.stop_reason: Optional[str] = None

    def feed(self, tokens: Sequence[int]) -> str:
        """Add new tokens; returns the text to release now (maybe ''). After a stop string `stop_reason` is set
        and the text ends at it (or after it, with include_stop); later tokens are ignored."""
        if self.stop_reason is not None:
            return ""
        self.ids.extend(tokens)
        if not self.incremental:
            return ""
        self.text += self._piece(final=False)
        if self.stops and len(self.ids) >= self.min_tokens and self._find_stop():
            return self._release(len(self.text))
        self.scanned = len(self.text)  # stop strings count only once min_tokens are written (as vLLM)
        return self._release(len(self.text) - self.hold if self.stops else len(self.text))

    def finish(self) -> str:
        """The rest of the text, once the choice has ended (EOS, max_tokens, a stop string)."""
        if self.stop_reason is None:
            if self.incremental:
                self.text += self._piece(final=True)
            else:
                self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._release(len(self.text))

    def _piece(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        context, window = decode(self.ids[self.prefix:self.read]), decode(self.ids[self.prefix:])
        if len(window) <= len(context) or (window.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return window[len(context):]

    def _find_stop(self) -> bool:
        start = max(0, self.scanned - self.hold)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        if not hits:
            return False
        at, stop = min(hits)
        self.text = self.text[:at + len(stop) if self.include_stop else at]
        self.stop_reason = stop
        return True

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out = self.text[self.released:upto]
        self.released = upto
        return out
