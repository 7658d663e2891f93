"""The bundled ``stdlib-docs`` corpus, made on the fly from what every machine has, with no download.

One row per documented public module, class, function and method of the CPython standard library
installed on this machine: title = its qualified name (``json.dumps``), keywords = the text's most
distinctive words by tf-idf over the corpus (so every keyword occurs in its text, and the model learns to
use the keywords it is given), text = its docstring. The text
is the standard library's own, under the Python Software Foundation License
(https://docs.python.org/3/license.html), which allows copying and derived works. The sources are
parsed with ``ast`` and never imported (importing runs module code: ``antigravity`` opens a browser).

A config names it as ``data.train: "builtin:stdlib-docs"``; ``data.rows.resolve_corpus`` turns that into a
cached JSONL file that ``data.rows.read_rows`` reads.
"""
from __future__ import annotations

import ast
import json
import math
import os
import re
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator

from gpt2_jax.text import keyword_occurs

MIN_TEXT_CHARS = 40  # shorter docstrings ("Return self==value.") teach little
MAX_TEXT_CHARS = 2000  # longer ones are cut at a paragraph boundary: rows suit max_length 128-256 tokens
MIN_KEYWORDS, MAX_KEYWORDS = 3, 6  # per row: 3 for texts under 50 words, one more per 50 words, at most 6
# Written beside the cached corpus; a cache without the current version is rebuilt. Bump it whenever the
# rows change. 2: tf-idf keywords taken from the text.
CORPUS_VERSION = "2"
# Directories and modules that are tests, tools or vendored code rather than the documented library.
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
                        "turtledemo", "pydoc_data", "ensurepip", "venv", "msilib",
                        "encodings"})  # generated codec tables, whose docstrings are authorship boilerplate
_SKIP_MODULES = frozenset({"antigravity", "this", "__main__"})
# Keyword candidates: words and identifiers (json_dumps, OrderedDict) of 3+ characters starting with a letter.
_TERM = re.compile(r"(?<![\w.])[A-Za-z][A-Za-z0-9_]{2,}(?![\w])")
# Function words, and the words every docstring uses: no keyword tells a text apart by them (idf would rank
# them low anyway; listing them keeps short texts from falling back on them).
_STOP_WORDS = frozenset("""
about above after again against all also although among and another any are aren because been before being
below between both but can cannot could did does doesn doing don down during each either else etc even ever
every few for from further had has have having her here hers him his how however into its itself just least
less let like may might more most much must neither nor not now off once one only other otherwise our ours out
over own per rather same shall she should since some still such than that the their theirs them then there
these they this those though through thus too under until upon use used uses using very via was way were what
when where whether which while who whom whose why will with within without would yet you your
return returns returned value values default true false none object objects argument arguments function
functions method methods class instance given specified see note also""".split())
_WORD = re.compile(r"[A-Za-z]{2,}")
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
_SURROGATE = re.compile("[\ud800-\udfff]")  # from escapes in string literals: not encodable as UTF-8


def build_stdlib_corpus(out_path: str | Path, *, stdlib: str | Path | None = None) -> Path:
    """Write the stdlib-docs corpus to ``out_path`` (JSONL) unless it exists with ``<out_path>.version``
    saying CORPUS_VERSION (a cache of older rows is rebuilt); return the path.

    ``stdlib``: the source tree to read (default: this interpreter's standard library). Written to a
    temporary file beside ``out_path`` and renamed, so a failed or concurrent build never leaves a
    partial file under the final name; the version file is written after the rename.
    """
    out_path = Path(out_path)
    stamp = out_path.with_name(out_path.name + ".version")
    if out_path.exists() and stamp.is_file() and stamp.read_text().strip() == CORPUS_VERSION:
        return out_path
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"] if stdlib is None else stdlib)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in stdlib_rows(stdlib):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the corpus is not
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stamp.write_text(CORPUS_VERSION + "\n")
    return out_path


def stdlib_rows(stdlib: Path) -> Iterator[dict[str, str]]:
    """The corpus rows of the sources under ``stdlib``, in sorted path order; each title and each text
    once (an override that repeats its base's docstring adds nothing). Rows without a keyword are dropped."""
    docs = list(_documents(stdlib))
    df = Counter(t for _, text in docs for t in set(_terms(text)))
    for title, text in docs:
        keywords = _keywords(title, text, df, len(docs))
        if keywords:
            yield {"title": title, "keywords": " ".join(keywords), "text": text}


def _documents(stdlib: Path) -> Iterator[tuple[str, str]]:
    """(title, cleaned text) of each documented name, without repeated titles or texts."""
    seen: set[str] = set()
    for path, module in _stdlib_modules(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))  # bytes: honours coding declarations
        except (SyntaxError, ValueError):
            continue  # a file of another Python version's syntax (or a template): not documentation
        for title, doc in _documented(tree, module):
            text = _clean_text(doc)
            if text is None or title in seen or text in seen:
                continue
            seen.update((title, text))
            yield title, text


def _terms(text: str) -> list[str]:
    """The text's keyword candidates, lower-cased, in order: no stop words."""
    return [w for w in map(str.lower, _TERM.findall(text)) if w not in _STOP_WORDS]


def _keywords(title: str, text: str, df: Counter, n_docs: int) -> list[str]:
    """The text's most distinctive words, best first, as they first appear in it: tf-idf ((1 + log tf) *
    log(n / df)), ties to the earlier word. Words of the title are left out: the title already says them."""
    words = _TERM.findall(text)
    tf = Counter(w.lower() for w in words)
    title_parts = {p.lower() for p in title.split(".")}
    first: dict[str, tuple[int, str]] = {}
    for i, w in enumerate(words):
        first.setdefault(w.lower(), (i, w))
    ranked = sorted((t for t in tf if t not in _STOP_WORDS and t not in title_parts),
                    key=lambda t: (-(1 + math.log(tf[t])) * math.log(n_docs / df[t]), first[t][0]))
    want = min(MAX_KEYWORDS, MIN_KEYWORDS + len(words) // 50)
    # By construction each occurs in the text as a whole word; the check keeps it so if _TERM changes.
    return [first[t][1] for t in ranked if keyword_occurs(text, first[t][1])][:want]


def _stdlib_modules(stdlib: Path) -> Iterator[tuple[Path, str]]:
    """(file, dotted module name) of the public modules under ``stdlib``, sorted."""
    for dirpath, dirnames, filenames in os.walk(stdlib):
        here = Path(dirpath)
        rel = here.relative_to(stdlib).parts
        # Only packages (identifier names with __init__.py) below the top level; never private ones.
        dirnames[:] = sorted(d for d in dirnames if d.isidentifier() and not d.startswith("_")
                             and d not in _SKIP_DIRS and (here / d / "__init__.py").is_file())
        for name in sorted(filenames):
            stem = name[:-3]
            if not name.endswith(".py") or not stem.isidentifier():
                continue
            if stem == "__init__":
                if rel:
                    yield here / name, ".".join(rel)
            elif not stem.startswith("_") and stem not in _SKIP_MODULES:
                yield here / name, ".".join(rel + (stem,))


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(qualified name, raw docstring) of the module and its public classes, functions and methods, in
    source order. Nested functions are implementation detail: not visited."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc
    yield from _members(tree.body, module)


def _members(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    for node in body:
        if isinstance(node, (ast.If, ast.Try, ast.With)):  # platform- or import-dependent definitions
            for block in (getattr(node, "body", []), getattr(node, "orelse", []), getattr(node, "finalbody", []),
                          *(h.body for h in getattr(node, "handlers", []))):
                yield from _members(block, prefix)
            continue
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = node.name
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            continue  # private; dunders (__init__, __enter__) are public protocol
        title = f"{prefix}.{name}"
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield title, doc
        if isinstance(node, ast.ClassDef):
            yield from _members(node.body, title)


def _clean_text(doc: str) -> str | None:
    """The (``inspect.cleandoc``-cleaned) docstring as training text: doctest blocks dropped, cut at a
    paragraph boundary to MAX_TEXT_CHARS; None when too short or mostly code."""
    # Characters that str.splitlines (and so the JSONL reader) treats as line breaks become newlines.
    lines = re.sub(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", "\n", doc).split("\n")
    kept: list[str] = []
    in_doctest = False
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_doctest = True
        elif not stripped:
            in_doctest = False
        if not in_doctest:
            kept.append(line.rstrip())
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", "\n".join(kept)) if p.strip()]
    while paragraphs and paragraphs[-1].rstrip().endswith(":"):  # "Example:" whose example was dropped
        paragraphs.pop()
    text = ""
    for p in paragraphs:
        joined = f"{text}\n\n{p}" if text else p
        if len(joined) > MAX_TEXT_CHARS:
            if not text:  # one huge first paragraph: cut it after its last whole sentence that fits
                ends = [m.end() for m in _SENTENCE_END.finditer(p, 0, MAX_TEXT_CHARS)]
                text = p[:ends[-1]] if ends else ""
            break
        text = joined
    if len(text) < MIN_TEXT_CHARS or _prose_fraction(text) < 0.6 or _SURROGATE.search(text):
        return None
    return text


def _prose_fraction(text: str) -> float:
    """The fraction of non-space characters that belong to plain words: low for code, grammars, tables."""
    chars = sum(not c.isspace() for c in text)
    return sum(len(w) for w in _WORD.findall(text)) / max(chars, 1)
