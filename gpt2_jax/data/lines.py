"""A corpus file's text as lines, whole or streamed: ``.gz`` decompressed, UTF-8 decoded (a leading byte-order
mark dropped) with an error that names the bad line, and lines split as ``open(newline="")`` splits them, so that
a parser's line numbers are the file's.
"""
from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import Iterable, Iterator

from gpt2_jax.errors import GPT2JaxError, first_line

# What reading a damaged .gz raises: a bad header (BadGzipFile, an OSError), a truncated stream, bad deflate data.
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


def read_text(path: Path) -> str:
    """The whole file's text."""
    raw = path.read_bytes()
    if path.suffix.lower() == ".gz":
        raw = _gunzip(path, raw)
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise GPT2JaxError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def _gunzip(path: Path, raw: bytes) -> bytes:
    try:
        return gzip.decompress(raw)
    except _GZIP_ERRORS as e:
        raise GPT2JaxError(f"{path}: not a valid gzip file ({first_line(e)})") from None


class StreamLines:
    """A file's lines decoded as UTF-8 and split as ``newline=""`` does, with a one-line-exact error for bad
    bytes; a context manager that closes the file."""

    def __init__(self, path: Path):
        self.path = path
        self.file = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")
        self.number = 0  # binary lines read
        self._lines = self._decode()

    def _read_error(self, e: Exception) -> GPT2JaxError:
        if self.path.suffix.lower() == ".gz":
            return GPT2JaxError(f"{self.path}: not a valid gzip file ({first_line(e)})")
        return GPT2JaxError(f"cannot read the corpus {self.path} ({first_line(e)})")

    def _raw_lines(self) -> Iterator[bytes]:
        try:
            yield from self.file
        except _GZIP_ERRORS as e:
            raise self._read_error(e) from None

    def _decode(self) -> Iterator[str]:
        for raw in self._raw_lines():
            self.number += 1
            try:
                line = raw.decode("utf-8-sig" if self.number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise GPT2JaxError(f"{self.path}:{self.number}: not UTF-8 text ({e.reason})") from None
            if "\r" in (line[:-2] if line.endswith("\r\n") else line[:-1]):  # old Mac line ends: split as newline="" does
                yield from io.StringIO(line, newline="").readlines()
            else:
                yield line

    def peek_text(self, size: int = 1 << 16) -> str:
        """The first ``size`` bytes decoded (for sniffing the shape), without consuming lines."""
        try:
            head = self.file.peek(size) if hasattr(self.file, "peek") else b""
        except _GZIP_ERRORS as e:
            raise self._read_error(e) from None
        return head[:size].decode("utf-8-sig", errors="replace")

    def __iter__(self):
        return self._lines

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def open_lines(path: Path) -> StreamLines:
    try:
        return StreamLines(path)
    except OSError as e:
        raise GPT2JaxError(f"cannot read the corpus {path} ({e.strerror or e})") from None


def split_lines(lines: Iterable[str]) -> Iterator[str]:
    """Lines as ``str.splitlines`` splits the whole text (it also splits at \\v, \\f, \\x1c-\\x1e, \\x85, U+2028/9)."""
    for line in lines:
        yield from line.splitlines()
