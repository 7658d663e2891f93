"""The one exception type for bad user input, and helpers for its one-line messages.

Entry points (runtime.run_cli) catch it and print its message instead of a traceback.
"""
import difflib
from typing import Callable, Iterable


class GPT2JaxError(ValueError):
    """Bad input (a missing file, a wrong config, a malformed row, ...): the message says what and where."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), for one-line error messages."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def suggest(name: str, known: Iterable[str]) -> str:
    """' (did you mean "x"?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""
