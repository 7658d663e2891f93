"""Tests for gpt2_jax/data/rows.py: reading CSV, JSONL and text corpora and their errors, and resolving
``builtin:`` corpus names."""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path

import pytest

from gpt2_jax.data.rows import BUILTIN_CORPORA, Row, read_rows, resolve_corpus
from gpt2_jax.errors import GPT2JaxError

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample.csv"


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_csv_with_header_quoted_multiline(tmp_path):
    path = write(tmp_path, "c.csv", 'title,keywords,text\nA title,one  two three,"Hello, world."\n'
                                    'B,x,"line one\nline two"\n')
    assert read_rows(path) == [Row("A title", ("one", "two", "three"), "Hello, world."),
                               Row("B", ("x",), "line one\nline two")]


def test_csv_without_header(tmp_path):
    path = write(tmp_path, "c.csv", "Title,k1 k2,Some text.\nOther,,More text.\n")
    assert read_rows(path) == [Row("Title", ("k1", "k2"), "Some text."), Row("Other", (), "More text.")]


def test_csv_header_in_another_order_with_bom(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("\ufeffText,Title,Keywords\nbody,head,a b\n".encode())
    assert read_rows(path) == [Row("head", ("a", "b"), "body")]


def test_csv_wrong_column_count_names_line(tmp_path):
    # The multi-line field in row 2 makes the bad row start on line 5, not record 3.
    path = write(tmp_path, "c.csv", 'title,keywords,text\nA,k,"x\ny"\n\nB,k\nC,k,z\n')
    with pytest.raises(GPT2JaxError, match=r"c\.csv:5: expected 3 CSV columns .*got 2"):
        read_rows(path)


def test_skip_bad_rows_counts_and_warns(tmp_path, caplog):
    path = write(tmp_path, "c.csv", "A,k,x\nB,k\nC,k,z,extra\nD,k,w\n")
    with caplog.at_level(logging.WARNING, logger="gpt2_jax.data.rows"):
        rows = read_rows(path, skip_bad_rows=True)
    assert [r.title for r in rows] == ["A", "D"]
    assert rows.skipped == 2
    assert "skipped 2 bad row(s)" in caplog.text and "c.csv:2:" in caplog.text


def test_jsonl_string_and_list_keywords(tmp_path):
    lines = [{"title": "T1", "keywords": "a b", "text": "x"},
             {"title": "T2", "keywords": ["c", "d e"], "text": "y", "extra": 1}]
    path = write(tmp_path, "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert read_rows(path) == [Row("T1", ("a", "b"), "x"), Row("T2", ("c", "d", "e"), "y")]


def test_json_array_file(tmp_path):
    path = write(tmp_path, "d.json", json.dumps([{"title": "T", "keywords": [], "text": "x"}], indent=2))
    assert read_rows(path) == [Row("T", (), "x")]


@pytest.mark.parametrize("line,message", [
    ('{"title": "T", "keywords": "k"', r"d\.jsonl:2: invalid JSON"),
    ('{"title": "T", "keywords": "k"}', r"d\.jsonl:2: missing key\(s\) 'text'"),
    ('{"title": 3, "keywords": "k", "text": "x"}', r"d\.jsonl:2: 'title' must be a string, got int"),
    ('{"title": "T", "keywords": [1], "text": "x"}', r"d\.jsonl:2: 'keywords' must be"),
    ('["T", "k", "x"]', r"d\.jsonl:2: expected a JSON object"),
])
def test_jsonl_bad_line_names_line(tmp_path, line, message):
    path = write(tmp_path, "d.jsonl", '{"title": "ok", "keywords": "k", "text": "x"}\n' + line + "\n")
    with pytest.raises(GPT2JaxError, match=message):
        read_rows(path)
    rows = read_rows(path, skip_bad_rows=True)
    assert len(rows) == 1 and rows.skipped == 1


def test_text_paragraphs_and_lines(tmp_path):
    paragraphs = write(tmp_path, "p.txt", "First para\nstill first.\n\n\nSecond.\n")
    assert read_rows(paragraphs) == [Row("", (), "First para\nstill first."), Row("", (), "Second.")]
    lines = write(tmp_path, "l.txt", "one\ntwo\nthree\n")
    assert [r.text for r in read_rows(lines)] == ["one", "two", "three"]


def test_explicit_format_overrides_extension(tmp_path):
    path = write(tmp_path, "corpus.dat", "T,k,x\n")
    assert read_rows(path, "csv") == [Row("T", ("k",), "x")]
    with pytest.raises(GPT2JaxError, match=r"cannot infer the corpus format from the extension '\.dat'"):
        read_rows(path)


def test_unknown_format_suggests(tmp_path):
    path = write(tmp_path, "c.csv", "T,k,x\n")
    with pytest.raises(GPT2JaxError, match=r"unknown corpus format 'json' \(did you mean \"jsonl\"\?\)"):
        read_rows(path, "json")


def test_missing_file(tmp_path):
    with pytest.raises(GPT2JaxError, match=r"corpus file .*nope\.csv does not exist"):
        read_rows(tmp_path / "nope.csv")


@pytest.mark.parametrize("name,content", [("e.csv", ""), ("h.csv", "title,keywords,text\n"),
                                          ("e.jsonl", "\n\n"), ("e.txt", "  \n")])
def test_empty_corpus(tmp_path, name, content):
    with pytest.raises(GPT2JaxError, match="empty corpus"):
        read_rows(write(tmp_path, name, content))


def test_all_rows_bad_is_empty_even_when_skipping(tmp_path):
    with pytest.raises(GPT2JaxError, match=r"empty corpus \(all 1 rows were bad\)"):
        read_rows(write(tmp_path, "c.csv", "only,two\n"), skip_bad_rows=True)


def test_not_utf8_names_line(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"T,k,x\nT,k,caf\xe9\n")
    with pytest.raises(GPT2JaxError, match=r"c\.csv:2: not UTF-8"):
        read_rows(path)


def test_rows_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Row("t", (), "x").title = "u"


def test_bundled_sample_corpus():
    assert 40_000 <= SAMPLE.stat().st_size <= 80_000
    with SAMPLE.open(newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == ["title", "keywords", "text"]
    rows = read_rows(SAMPLE)
    assert len(rows) >= 100 and rows.skipped == 0
    assert len({r.title for r in rows}) == len(rows)
    assert all(r.title and r.text and 3 <= len(r.keywords) <= 6 for r in rows)


def test_resolve_corpus_passthrough(tmp_path):
    assert resolve_corpus("data/sample.csv", tmp_path) == Path("data/sample.csv")
    assert resolve_corpus("/abs/c.jsonl", tmp_path) == Path("/abs/c.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_resolve_builtin_builds_into_cache_dir(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(BUILTIN_CORPORA, "stdlib-docs", lambda path: calls.append(path) or path)
    path = resolve_corpus("builtin:stdlib-docs", tmp_path / "cache")
    assert calls == [path] and path.parent == tmp_path / "cache" and path.suffix == ".jsonl"
    assert f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}" in path.name


def test_unknown_builtin(tmp_path):
    with pytest.raises(GPT2JaxError, match=r"unknown builtin corpus 'stdlib-doc' \(did you mean \"stdlib-docs\"\?\); "
                                           r"known: builtin:stdlib-docs$"):
        resolve_corpus("builtin:stdlib-doc", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_prompt_rows_for_generation_need_no_text(tmp_path):
    two = tmp_path / "two.csv"
    two.write_text("Soup,leek potato\nBread,flour yeast\n")
    assert read_rows(two, with_text=False) == [Row("Soup", ("leek", "potato"), ""), Row("Bread", ("flour", "yeast"), "")]
    with pytest.raises(GPT2JaxError, match=r"two.csv:1: expected 3 CSV columns \(title,keywords,text\), got 2"):
        read_rows(two)  # training rows need their text
    header = tmp_path / "header.csv"
    header.write_text("keywords,title\nleek potato,Soup\nonly one\n")
    rows = read_rows(header, with_text=False, skip_bad_rows=True)
    assert rows == [Row("Soup", ("leek", "potato"), "")]
    assert rows.bad == [f"{header}:3: expected 2 CSV columns (title,keywords), got 1"]
    three = tmp_path / "three.csv"
    three.write_text("Soup,leek potato,Text.\n")
    assert read_rows(three, with_text=False) == [Row("Soup", ("leek", "potato"), "Text.")]


# --- A stray quote, a misspelt header (issue 15) ---------------------------------------------------------------

ROWS_20 = [f"Title {i},kw{i} more,Text of row {i} here." for i in range(1, 21)]


def with_line(lines: list[str], n: int, line: str) -> str:
    """`lines` with line `n` (from 1) replaced, as file content."""
    return "\n".join(lines[: n - 1] + [line] + lines[n:]) + "\n"


@pytest.mark.parametrize("line12, where, taken", [
    (None, "to the end of the file", 15),  # no other quote: the field runs on to the end
    ('Title 12,kw12,He said "yes" to it.', "up to line 12", 7),  # a later quote closes it irregularly
    ('Title 12,kw12,a screen of 6"', "up to line 12", 7),  # ... or, by chance, cleanly
])
def test_csv_stray_quote_names_its_line_instead_of_swallowing_rows(tmp_path, caplog, line12, where, taken):
    lines = list(ROWS_20)
    if line12:
        lines[11] = line12
    path = write(tmp_path, "c.csv", with_line(lines, 5, 'Title 5,kw5 more,"Quoted start of text 5.'))
    why = (f"the quoted field that opens here runs {where} and takes in {taken} more line(s), {taken} shaped like "
           f"rows; a stray '\"'?")
    with pytest.raises(GPT2JaxError) as e:
        read_rows(path)
    assert str(e.value) == f"{path}:5: {why} (skip_bad_rows skips such rows)"
    # Skipping drops line 5 only: the rows it swallowed are read again.
    with caplog.at_level(logging.WARNING, logger="gpt2_jax.data.rows"):
        rows = read_rows(path, skip_bad_rows=True)
    assert [r.title for r in rows] == [f"Title {i}" for i in range(1, 21) if i != 5]
    assert rows.bad == [f"{path}:5: {why}"] and "skipped 1 bad row(s)" in caplog.text


def test_csv_multiline_articles_are_not_stray_quotes(tmp_path):
    """News articles: paragraphs on their own lines, commas (two of them in most paragraphs), doubled quotes."""
    articles = [
        ("Storm closes harbour", "storm harbour ferries",
         'The harbour closed on Monday, officials said, as the storm arrived.\n'
         'Ferries stayed in port, and fishermen, wisely, stayed home.\n\n'
         'A spokesman said: ""We will reopen, weather permitting, on Wednesday.""\n'
         'Traders, meanwhile, counted their losses.\n'
         'Prices rose to 3,000,000 in a day.'),
        ("Council approves budget", "council budget", 'Line one, with, commas.\nLine two, also, here.\n'
         'Line three, and, more.\nLine four, the, last.'),
        ("Short", "one", "single line, no newline"),
    ]
    content = "title,keywords,text\n" + "".join(
        f'{t},{k},"{x}"\n' for t, k, x in articles)
    path = write(tmp_path, "news.csv", content)
    rows = read_rows(path)
    assert rows.skipped == 0
    assert rows == [Row(t, tuple(k.split()), x.replace('""', '"')) for t, k, x in articles]


def test_csv_misspelt_header_warns_once_naming_the_file(tmp_path, caplog):
    path = write(tmp_path, "c.csv", "title,keyword,text\nA,k,x\nB,k,y\n")
    with caplog.at_level(logging.WARNING, logger="gpt2_jax.data.rows"):
        rows = read_rows(path)
    assert len(rows) == 3  # still read as data: only the user knows whether it is
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:1: the first row title,keyword,text looks like a misspelt header (expected title,keywords,text); "
        f"it is read as a data row"]


@pytest.mark.parametrize("first", ["Title,k1 k2,Some text.", "Soup,leek potato,Boil it.", "Text,tags,A row."])
def test_csv_data_rows_and_real_headers_do_not_warn(tmp_path, caplog, first):
    for content in (f"{first}\nB,k,y\n", "Title,Keywords,Text\nA,k,x\n"):
        path = write(tmp_path, "c.csv", content)
        with caplog.at_level(logging.WARNING, logger="gpt2_jax.data.rows"):
            read_rows(path)
    with caplog.at_level(logging.WARNING, logger="gpt2_jax.data.rows"):
        read_rows(SAMPLE)
    assert caplog.records == []


def test_jsonl_unterminated_string_message_reads_once(tmp_path):
    path = write(tmp_path, "d.jsonl", '{"title": "T", "keywords": "k\n')
    with pytest.raises(GPT2JaxError) as e:
        read_rows(path)
    assert str(e.value) == (f"{path}:1: invalid JSON (Unterminated string starting at column 28) "
                            f"(skip_bad_rows skips such rows)")


def test_resolve_corpus_refuses_a_directory_without_a_corpus(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(GPT2JaxError, match=r"d is an empty directory: it holds no corpus \(give a corpus file"):
        resolve_corpus(str(tmp_path / "d"), tmp_path)
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(GPT2JaxError, match=r"d: not a prepared data directory \(no meta\.json"):
        resolve_corpus(str(tmp_path / "d"), tmp_path)
    (tmp_path / "d" / "meta.json").write_text("{}")
    assert resolve_corpus(str(tmp_path / "d"), tmp_path) == tmp_path / "d"
