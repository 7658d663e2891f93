"""Tests for gpt2_jax/data/stdlib_docs.py: the stdlib-docs corpus (size, format, content, determinism, atomic
writes) and what it skips."""
from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest

from gpt2_jax.data import stdlib_docs
from gpt2_jax.data.rows import read_rows
from gpt2_jax.sample.keywords import keyword_coverage
from gpt2_jax.data.stdlib_docs import CORPUS_VERSION, MAX_TEXT_CHARS, MIN_TEXT_CHARS, build_stdlib_corpus

QUALIFIED = re.compile(r"[A-Za-z]\w*(\.\w+)*")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The real corpus of this interpreter's standard library, built once for the module."""
    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus") / "stdlib-docs.jsonl")


@pytest.fixture(scope="module")
def rows(built):
    return read_rows(built)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source), encoding="utf-8")
    return root


DOC = "Return the thing that this function computes, as described in the manual."
FAKE = {
    "alpha.py": f'''
        """The alpha module: a small module whose docstring is long enough to keep."""
        import sys

        def public(first_arg, other, *, flag=False):
            """{DOC} See `other_name` and os.path.join for details."""

        def _private():
            """{DOC}"""

        def short():
            """Too short."""

        def doctest_only():
            """
            >>> public(1, 2)
            3
            """

        if sys.platform == "win32":
            def conditional():
                """{DOC} (the Windows one)"""
        else:
            def conditional():
                """{DOC} (the POSIX one)"""

        class Widget(Base):
            """A widget, which has methods and a nested class that are documented too."""

            def __init__(self, size):
                """Make a widget of the given size, in pixels, measured along its longest side."""

            def _hidden(self):
                """{DOC}"""

            def draw(self, canvas):
                """Draw the widget on the canvas.

                >>> Widget(3).draw(canvas)
                """

            class Part:
                """One part of a widget: widgets are made of parts, and parts of pieces."""

                def helper(self):
                    def inner():
                        """{DOC} (nested in a function: not visited)"""
        ''',
    "pkg/__init__.py": '"""The package pkg, whose __init__ docstring documents the package itself."""\n',
    "pkg/sub.py": f'def run(x):\n    """{DOC}"""\n',
    "_private.py": f'"""{DOC}"""\n',
    "antigravity.py": f'"""{DOC}"""\nraise SystemExit("imported!")\n',
    "test/test_alpha.py": f'"""{DOC}"""\n',
    "notpkg/mod.py": f'"""{DOC}"""\n',  # no __init__.py: not importable, not documentation
    "broken.py": '"""A syntax error below: the file is skipped, not fatal."""\ndef (:\n',
}


@pytest.fixture
def fake_stdlib(tmp_path) -> Path:
    return write_tree(tmp_path / "lib", FAKE)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_at_least_one_megabyte(built):
    assert built.stat().st_size >= 1_000_000


def test_read_rows_parses_every_line(built, rows):
    assert rows.skipped == 0
    assert len(rows) == len(built.read_text(encoding="utf-8").splitlines()) > 3000


def test_titles_are_unique_qualified_names(rows):
    titles = [r.title for r in rows]
    assert len(set(titles)) == len(titles)
    assert all(QUALIFIED.fullmatch(t) for t in titles)
    assert not any(part.startswith("_") and not part.endswith("__") for t in titles for part in t.split("."))
    assert not any(t.split(".")[0] in ("test", "idlelib", "lib2to3", "antigravity", "this") for t in titles)


def test_texts_are_prose_of_bounded_length(rows):
    assert all(MIN_TEXT_CHARS <= len(r.text) <= MAX_TEXT_CHARS for r in rows)
    assert not any(">>>" in r.text for r in rows)
    assert all(1 <= len(r.keywords) <= stdlib_docs.MAX_KEYWORDS for r in rows)
    assert all(len({k.lower() for k in r.keywords}) == len(r.keywords) for r in rows)


def test_every_keyword_occurs_in_its_text(rows):
    """The corpus teaches writing with the keywords: each one is a whole word of its row's text."""
    assert sum(keyword_coverage(r.text, r.keywords) for r in rows) == len(rows)
    assert sum(len(r.keywords) >= stdlib_docs.MIN_KEYWORDS for r in rows) > 0.8 * len(rows)
    stop = stdlib_docs._STOP_WORDS
    assert not any(k.lower() in stop or len(k) < 3 or k.isdigit() for r in rows for k in r.keywords)
    # Not the title's own words: the keywords add to what the title says.
    assert not any(k.lower() in r.title.lower().split(".") for r in rows for k in r.keywords)


def test_known_rows(rows):
    by_title = {r.title: r for r in rows}
    dumps = by_title["json.dumps"]
    assert "JSON" in dumps.text and dumps.text.startswith("Serialize ``obj``")
    assert {"indent", "JSONEncoder"} <= set(dumps.keywords) and len(dumps.keywords) == stdlib_docs.MAX_KEYWORDS
    assert by_title["copy.copy"].keywords[0] == "Shallow"  # "Shallow copy operation on arbitrary Python objects."


@pytest.mark.slow
def test_deterministic(built, tmp_path):
    again = build_stdlib_corpus(tmp_path / "again.jsonl")
    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(built.read_bytes()).digest()


def test_existing_file_is_returned_as_is(tmp_path):
    out = tmp_path / "c.jsonl"
    out.write_text("not rebuilt\n")
    (tmp_path / "c.jsonl.version").write_text(CORPUS_VERSION + "\n")
    assert build_stdlib_corpus(out) == out
    assert out.read_text() == "not rebuilt\n"


@pytest.mark.parametrize("stamp", [None, "1"])
def test_cache_of_another_version_is_rebuilt(fake_stdlib, tmp_path, stamp):
    out = tmp_path / "c.jsonl"
    out.write_text("old rows\n")
    if stamp is not None:
        (tmp_path / "c.jsonl.version").write_text(stamp + "\n")
    build_stdlib_corpus(out, stdlib=fake_stdlib)
    assert len(read_jsonl(out)) == 8 and (tmp_path / "c.jsonl.version").read_text() == CORPUS_VERSION + "\n"


def test_what_is_kept_and_skipped(fake_stdlib, tmp_path):
    out = build_stdlib_corpus(tmp_path / "out" / "c.jsonl", stdlib=fake_stdlib)
    got = {r["title"]: r for r in read_jsonl(out)}
    assert list(got) == ["alpha", "alpha.public", "alpha.conditional", "alpha.Widget", "alpha.Widget.__init__",
                         "alpha.Widget.Part", "pkg", "pkg.sub.run"]
    assert got["alpha.conditional"]["text"].endswith("(the Windows one)")  # the first definition wins
    # tf-idf over these 8 texts: "module" twice and only here, then the words only here, in text order;
    # stop words ("whose"), the title's words ("alpha") and words of < 3 letters are never keywords.
    assert got["alpha"]["keywords"] == "module small long"
    # "thing" and "computes" are in three texts, "Windows" in one: rarer words first.
    assert got["alpha.conditional"]["keywords"] == "Windows thing computes"
    assert got["alpha.Widget"]["keywords"] == "nested documented"  # a short text: fewer than 3
    assert got["alpha.Widget.__init__"]["keywords"] == "Make size pixels"  # not "widget": in the title
    assert read_rows(out).skipped == 0


def test_doctests_dropped_and_long_text_cut_at_a_paragraph():
    para = "A sentence of plain words that explains something. " * 10
    doc = "Summary line that says what it does.\n\n>>> f(1)\n2\n>>> f(2)\n3\n\nAfter the example.\n\n" + \
        "\n\n".join([para.strip()] * 8)
    text = stdlib_docs._clean_text(doc)
    assert text.startswith("Summary line that says what it does.\n\nAfter the example.\n\nA sentence")
    assert ">>>" not in text and len(text) <= MAX_TEXT_CHARS and text.endswith("something.")
    assert len(stdlib_docs._clean_text(doc + "x")) == len(text)  # cut between paragraphs, not inside one
    assert stdlib_docs._clean_text("x = {'a': [1, 2], 'b': (3, 4)} -> {1: 2} [[0]] ++ -- == ** //") is None
    assert stdlib_docs._clean_text("Line one.\u2028Line two of a docstring with an odd separator.") == \
        "Line one.\nLine two of a docstring with an odd separator."


def test_failed_build_leaves_no_file(fake_stdlib, tmp_path, monkeypatch):
    real = stdlib_docs.stdlib_rows

    def failing(stdlib):
        rows = real(stdlib)
        yield next(rows)
        yield next(rows)
        raise OSError("disk full")

    monkeypatch.setattr(stdlib_docs, "stdlib_rows", failing)
    out = tmp_path / "out" / "c.jsonl"
    with pytest.raises(OSError, match="disk full"):
        build_stdlib_corpus(out, stdlib=fake_stdlib)
    assert list(out.parent.iterdir()) == []  # neither the target nor the temporary file
