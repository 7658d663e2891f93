"""Reading a corpus file into rows (title, keywords, text), and resolving a config's corpus name to a file.

Formats: ``csv`` (title,keywords,text; optional header), ``jsonl`` (one object per line, or a JSON
array of objects), ``text`` (plain text for unconditional language modelling) and ``parquet`` (columns
title, keywords, text, or text alone; needs pyarrow); ``.gz`` for all but Parquet. ``read_rows`` reads a
file whole; ``iter_rows`` streams the same rows, through the same parsers, in bounded memory (for
``data.prepare``); ``data.lines`` turns the file into lines. ``builtin:NAME`` names a bundled corpus, built once
into a cache directory (``data.stdlib_docs``).
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

from gpt2_jax.data.lines import open_lines, read_text, split_lines
from gpt2_jax.data.stdlib_docs import build_stdlib_corpus
from gpt2_jax.errors import GPT2JaxError, first_line, suggest

log = logging.getLogger(__name__)

_EXTENSIONS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "text", ".parquet": "parquet"}
_COLUMNS = ("title", "keywords", "text")
# "builtin:NAME" in a config: the corpus that BUILTIN_CORPORA[NAME](path) builds at path.
# data.format: the corpus formats a run reads ("bin": llm.c / nanoGPT token files).
FORMATS = ("csv", "jsonl", "text", "bin")
# Row formats (FORMATS less the token files "bin", plus Parquet, which tools/prepare_data.py reads).
ROW_FORMATS = (*(f for f in FORMATS if f != "bin"), "parquet")
BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA: dict[str, Callable[[Path], Path]] = {"stdlib-docs": build_stdlib_corpus}


@dataclass(frozen=True)
class Row:
    """One training example: the model learns ``[BOS] title [SEP] keywords [SEP] text [EOS]``."""

    title: str
    keywords: tuple[str, ...]
    text: str


class Rows(list):
    """A ``list[Row]`` that also says which bad rows ``skip_bad_rows`` dropped (``.bad``: "file:line: why")."""

    def __init__(self, rows: list[Row], bad: Sequence[str] = ()):
        super().__init__(rows)
        self.bad = list(bad)

    @property
    def skipped(self) -> int:
        return len(self.bad)


def row_texts(rows: Sequence[Row]) -> list[str]:
    """The non-empty titles, keyword lists (joined by spaces) and texts of `rows`: what a tokenizer trains on."""
    return [s for r in rows for s in (r.title, " ".join(r.keywords), r.text) if s]


class _BadRow(Exception):
    """A malformed row: read_rows raises it as a GPT2JaxError or skips it."""


# Each format's parser yields (location, Row or _BadRow), so that one loop decides whether to raise or skip.
_Parsed = Iterator[tuple[Union[int, str], Union[Row, _BadRow]]]


def read_rows(path: str | Path, format: str | None = None, *, skip_bad_rows: bool = False,
              with_text: bool = True) -> Rows:
    """Read a corpus file into rows; ``format=None`` infers it from the extension.

    A malformed row raises GPT2JaxError naming ``file:line``; with ``skip_bad_rows`` it is dropped,
    listed in the result's ``.bad`` and reported in one logged warning. ``with_text=False`` reads
    prompts for generation: CSV rows may have two columns (title,keywords) and JSONL rows no "text".
    """
    path = Path(path)
    format = corpus_format(path, format)
    if format == "parquet":
        parsed = _parquet(path, with_text)
    else:
        content = read_text(path)
        lines = io.StringIO(content, newline="")
        parsed = {"csv": lambda: _csv(lines, with_text, str(path)),
                  "jsonl": lambda: _json_array(content, with_text) if _is_json_array(content) else _jsonl(lines, with_text),
                  "text": lambda: _text(lines, _has_paragraphs(content))}[format]()
    rows: list[Row] = []
    bad: list[str] = []
    for where, row in parsed:
        if isinstance(row, Row):
            rows.append(row)
        elif skip_bad_rows:
            bad.append(f"{path}:{where}: {row}")
        else:
            raise GPT2JaxError(f"{path}:{where}: {row} (skip_bad_rows skips such rows)")
    if bad:
        log.warning("skipped %d bad row(s) of %s; the first: %s", len(bad), path, bad[0])
    if not rows:
        raise GPT2JaxError(f"{path}: empty corpus" + (f" (all {len(bad)} rows were bad)" if bad else ""))
    return Rows(rows, bad)


def corpus_format(path: Path, format: str | None) -> str:
    """The row format of ``path``: ``format`` checked, or inferred from the extension (under a ``.gz``)."""
    if format is None:
        suffix = Path(path.stem).suffix if path.suffix.lower() == ".gz" else path.suffix
        format = _EXTENSIONS.get(suffix.lower())
        if format is None:
            raise GPT2JaxError(f"{path}: cannot infer the corpus format from the extension "
                               f"{path.suffix or '(none)'!r}; give the format, one of: {', '.join(ROW_FORMATS)}")
    elif format not in ROW_FORMATS:
        raise GPT2JaxError(f"unknown corpus format {format!r}{suggest(format, ROW_FORMATS)}; known: "
                           f"{', '.join(ROW_FORMATS)}")
    if not path.is_file():
        raise GPT2JaxError(f"corpus file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    if format == "parquet" and path.suffix.lower() == ".gz":
        raise GPT2JaxError(f"{path}: a gzipped Parquet file; Parquet compresses itself, give the .parquet file")
    return format


def iter_rows(path: Path, format: str) -> _Parsed:
    """Stream the rows of the corpus file ``path`` of ``format`` (as ``corpus_format`` checked them) as
    ``(location, Row or _BadRow)`` in bounded memory (``read_rows`` for files of any size): lines are read
    lazily, from ``.gz`` too; a JSON array is the one shape read whole."""
    if format == "parquet":
        yield from _parquet(path, True)
        return
    if format == "text":
        paragraphs = _has_paragraphs_stream(path)
        with open_lines(path) as lines:
            yield from _text(lines, paragraphs)
        return
    with open_lines(path) as lines:
        if format == "jsonl" and _is_json_array(lines.peek_text()):
            yield from _json_array("".join(lines), True)
        else:
            yield from (_csv(lines, True, str(path)) if format == "csv" else _jsonl(lines, True))


class _Record:
    """The lines csv.reader pulls, numbered from 1: remembers the current record's lines and can push some back."""

    def __init__(self, lines: Iterable[str]):
        self._it = iter(lines)
        self._back: list[str] = []  # pushed back, last first
        self.number = 0  # the number of the last line handed out
        self.lines: list[str] = []  # the lines of the record being read

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self._back.pop() if self._back else next(self._it)
        self.number += 1
        self.lines.append(line)
        return line

    def at_end(self) -> bool:
        if not self._back:
            try:
                self._back.append(next(self._it))
            except StopIteration:
                return True
        return False

    def read_again(self, lines: list[str], after: int) -> None:
        """Hand out ``lines`` again, numbered from ``after + 1``."""
        self._back.extend(reversed(lines))
        self.number = after


def _csv(lines: Iterable[str], with_text: bool = True, source: str = "") -> _Parsed:
    # Long articles exceed the csv module's default 128 KiB field limit; the limit is process-wide.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    # Lines come split as StringIO(newline="") splits them, so line numbers count them (from 1).
    src = _Record(lines)
    index, width, first = (0, 1, 2), 3, True
    while True:
        reader = csv.reader(src)  # a new reader after a stray quote: the quote's state is dropped
        restart = False
        while True:
            src.lines, start = [], src.number + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield start, _BadRow(f"malformed CSV ({e})")
                continue
            line = start  # a quoted field may span lines: report where it began
            if not any(c.strip() for c in cells):
                continue
            if first:
                first = False
                names = [c.strip().lower() for c in cells]
                if set(_COLUMNS) <= set(names) or (not with_text and set(_COLUMNS[:2]) <= set(names)):
                    # a header row; its columns may come in any order
                    index = tuple(names.index(c) if c in names else None for c in _COLUMNS)
                    width = len(names)
                    continue
                if not with_text and len(cells) == 2:
                    index, width = (0, 1, None), 2
                if _looks_like_header(names):
                    log.warning("%s:%d: the first row %s looks like a misspelt header (expected %s); it is read as "
                                "a data row", source, line, ",".join(cells), ",".join(_COLUMNS[:width]))
            if any("\n" in c or "\r" in c for c in cells):
                record = src.lines
                swallowed = _swallowed_rows(record, line, width, at_end=src.at_end())
                if swallowed:
                    # Skip only the line that opened the stray quote, and read the lines it swallowed again.
                    yield line, _BadRow(swallowed)
                    src.read_again(record[1:], after=line)
                    restart = True
                    break
            if len(cells) != width:
                yield line, _BadRow(f"expected {width} CSV columns ({','.join(_COLUMNS[:width])}), got {len(cells)}")
                continue
            title, keywords, text = (cells[i] if i is not None else "" for i in index)
            yield line, Row(title.strip(), tuple(keywords.split()), text.strip())
        if not restart:
            return


# Header names a first row is compared with: a row of short words all close to these is a header with a typo.
_HEADER_WORDS = (*_COLUMNS, "keyword", "content", "body", "tags", "headline", "article")
# A stray quote's field that closes cleanly is caught only when it takes in this many lines, all shaped like rows.
_MIN_SHAPED = 3


def _looks_like_header(names: Sequence[str]) -> bool:
    """Every cell a short identifier-like word close to a column name (``title,keyword,text``)."""
    return len(names) >= 2 and all(
        re.fullmatch(r"[a-z_][a-z0-9_]{0,23}", n) and difflib.get_close_matches(n, _HEADER_WORDS, n=1, cutoff=0.75)
        for n in names)


def _swallowed_rows(record: list[str], first: int, width: int, at_end: bool) -> str:
    """Why the multi-line `record` (raw lines, from line `first`) is a stray quote that took in later rows, or "".

    A legitimate quoted text may span lines; a stray opening quote instead runs on to the end of the
    file, or until some later quote closes it irregularly (not before a comma or a line end), or, rarely,
    cleanly; the lines it takes in look like rows: ``width`` CSV cells, none but the first starting with
    a space (prose puts one after its commas; "x,y,z" rows do not).
    """
    rest = [ln for ln in record[1:] if ln.strip()]
    shaped = 0
    for ln in rest:
        cells = next(csv.reader([ln]), [])
        shaped += len(cells) == width and not any(c[:1].isspace() for c in cells[1:])
    try:
        list(csv.reader(io.StringIO("".join(record), newline=""), strict=True))
        closed = True
    except csv.Error:
        closed = False
    if closed and not (shaped >= _MIN_SHAPED and shaped == len(rest)):
        return ""
    if not closed and not at_end and not shaped:
        return ""
    where = "to the end of the file" if at_end and not closed else f"up to line {first + len(record) - 1}"
    return (f"the quoted field that opens here runs {where} and takes in {len(record) - 1} more line(s), "
            f"{shaped} shaped like rows; a stray '\"'?")


def _is_json_array(content: str) -> bool:
    return content.lstrip().startswith("[")  # a JSON array of objects (a common shape of .json files)


def _json_array(content: str, with_text: bool = True) -> _Parsed:
    try:
        items = json.loads(content)
    except json.JSONDecodeError as e:
        yield e.lineno, _BadRow(f"invalid JSON ({e.msg})")
        return
    for i, item in enumerate(items, 1):
        yield f"item {i}", _json_row(item, with_text)


def _jsonl(lines: Iterable[str], with_text: bool = True) -> _Parsed:
    for n, line in enumerate(split_lines(lines), 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                # Some messages end in "at" ("Unterminated string starting at"): no "at at column".
                yield n, _BadRow(f"invalid JSON ({e.msg.removesuffix(' at')} at column {e.colno})")
                continue
            yield n, _json_row(obj, with_text)


def _json_row(obj: object, with_text: bool = True) -> Row | _BadRow:
    columns = _COLUMNS if with_text else _COLUMNS[:2]
    if not isinstance(obj, dict):
        return _BadRow(f"expected a JSON object with keys {', '.join(columns)}, got {type(obj).__name__}")
    if not with_text:
        obj = {"text": "", **obj}
    missing = [k for k in columns if k not in obj]
    if missing:
        return _BadRow(f"missing key(s) {', '.join(map(repr, missing))}")
    for key in ("title", "text"):
        if not isinstance(obj[key], str):
            return _BadRow(f"{key!r} must be a string, got {type(obj[key]).__name__}")
    keywords = obj["keywords"]
    if isinstance(keywords, str):
        keywords = [keywords]
    elif not (isinstance(keywords, list) and all(isinstance(k, str) for k in keywords)):
        return _BadRow(f"'keywords' must be a string of space-separated words or a list of strings, "
                       f"got {type(keywords).__name__}")
    # Split list items too, so that a keyword is always one word, as in the CSV format.
    return Row(obj["title"].strip(), tuple(w for k in keywords for w in k.split()), obj["text"].strip())


def _has_paragraphs(content: str) -> bool:
    """Whether blank lines separate documents: a blank line between non-blank ones."""
    return not all(line.strip() for line in content.strip().splitlines())


def _has_paragraphs_stream(path: Path) -> bool:
    """``_has_paragraphs`` of a file, streamed: stops at the first blank line that has text after it."""
    seen_text, blank = False, False
    with open_lines(path) as lines:
        for line in split_lines(lines):
            if line.strip():
                if blank and seen_text:
                    return True
                seen_text = True
            else:
                blank = True
    return False


def _text(lines: Iterable[str], paragraphs: bool) -> _Parsed:
    # Blank lines separate documents when the file has any; otherwise each line is one document.
    if not paragraphs:
        yield from ((n, Row("", (), line.strip())) for n, line in enumerate(split_lines(lines), 1) if line.strip())
        return
    block: list[str] = []
    n = 0
    for n, line in enumerate(split_lines(lines), 1):
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield n - len(block), Row("", (), "\n".join(block).strip())
            block = []
    if block:
        yield n + 1 - len(block), Row("", (), "\n".join(block).strip())


def _parquet(path: Path, with_text: bool = True) -> _Parsed:
    """Parquet rows by record batch: columns title, keywords (a string or a list of strings) and text, or text alone."""
    try:
        import pyarrow.parquet as pq  # optional: only Parquet corpora need it
    except ImportError:
        raise GPT2JaxError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        f = pq.ParquetFile(path)
        names = set(f.schema_arrow.names)
        columns = [c for c in _COLUMNS if c in names]
        if "text" not in names and with_text:
            raise GPT2JaxError(f"{path}: a Parquet corpus needs a 'text' column (has: {', '.join(sorted(names))})")
        n = 0
        for batch in f.iter_batches(batch_size=4096, columns=columns):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                n += 1
                obj = {c: cols[c][i] for c in columns}
                obj.setdefault("title", "")
                obj.setdefault("keywords", [])
                yield f"row {n}", _json_row(obj, with_text)
    except OSError as e:
        raise GPT2JaxError(f"{path}: not a readable Parquet file ({first_line(e)})") from None


def resolve_corpus(spec: str, cache_dir: str | Path) -> Path:
    """``builtin:NAME`` -> the built corpus file (built once, cached in ``cache_dir``); anything else -> ``Path(spec)``."""
    if not spec.startswith(BUILTIN_PREFIX):
        if Path(spec).is_dir() and corpus_dir_problem(Path(spec)):  # not taken for token data, nor read as rows
            raise GPT2JaxError(corpus_dir_problem(Path(spec)))
        return Path(spec)
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_CORPORA:
        raise GPT2JaxError(f"unknown builtin corpus {name!r}{suggest(name, BUILTIN_CORPORA)}; known: "
                           + ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_CORPORA))
    # The content depends on the installed standard library, so the file name carries the Python version.
    version = f"{sys.implementation.name}{'.'.join(map(str, sys.version_info[:3]))}"
    return BUILTIN_CORPORA[name](Path(cache_dir) / f"{name}-{version}.jsonl")


def corpus_dir_problem(path: Path) -> str:
    """Why the directory ``path`` holds no prepared corpus ("" when it has one: its ``meta.json``, written last)."""
    if (path / "meta.json").is_file():
        return ""
    if any(path.iterdir()):
        return f"{path}: not a prepared data directory (no meta.json: unfinished? re-run tools/prepare_data.py)"
    return (f"{path} is an empty directory: it holds no corpus (give a corpus file, an llm.c / nanoGPT .bin token "
            f"file or a directory that tools/prepare_data.py prepared)")
