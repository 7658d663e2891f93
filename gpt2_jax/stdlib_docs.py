"""The bundled ``stdlib-docs`` corpus, made on the fly from what every machine has, with no download.

One row per documented public module, class, function and method of the CPython standard library
installed on this machine: title = its qualified name (``json.dumps``), keywords = a few identifiers
related to it (module, class, parameters, names the docstring mentions), text = its docstring. The text
is the standard library's own, under the Python Software Foundation License
(https://docs.python.org/3/license.html), which allows copying and derived works. The sources are
parsed with ``ast`` and never imported (importing runs module code: ``antigravity`` opens a browser).

A config names it as ``data.train: "builtin:stdlib-docs"``; ``corpus.resolve_corpus`` turns that into a
cached JSONL file that ``corpus.read_rows`` reads.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

MIN_TEXT_CHARS = 40  # shorter docstrings ("Return self==value.") teach little
MAX_TEXT_CHARS = 2000  # longer ones are cut at a paragraph boundary: rows suit max_length 128-256 tokens
MAX_KEYWORDS = 8
# Directories and modules that are tests, tools or vendored code rather than the documented library.
_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
                        "turtledemo", "pydoc_data", "ensurepip", "venv", "msilib",
                        "encodings"})  # generated codec tables, whose docstrings are authorship boilerplate
_SKIP_MODULES = frozenset({"antigravity", "this", "__main__"})
_SKIP_PARAMS = frozenset({"self", "cls", "args", "kwargs", "kwds", "kw"})
# Identifiers a docstring mentions: ``x``/`x`, dotted names (os.path.join), names_with_underscores, f().
_MENTION = re.compile(r"`+([A-Za-z_][\w.]*)(?:\(\))?`+|\b([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)\b(?!\.\w)"
                      r"|\b([a-z]\w*_\w+)\b|\b([A-Za-z_]\w*)\(\)")
_NOT_NAMES = frozenset({"py", "txt", "html", "com", "org", "net", "edu", "cfg", "ini", "gz", "zip", "tar"})
_WORD = re.compile(r"[A-Za-z]{2,}")
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
_SURROGATE = re.compile("[\ud800-\udfff]")  # from escapes in string literals: not encodable as UTF-8


def build_stdlib_corpus(out_path: str | Path, *, stdlib: str | Path | None = None) -> Path:
    """Write the stdlib-docs corpus to ``out_path`` (JSONL) unless it exists; return the path.

    ``stdlib``: the source tree to read (default: this interpreter's standard library). Written to a
    temporary file beside ``out_path`` and renamed, so a failed or concurrent build never leaves a
    partial file under the final name.
    """
    out_path = Path(out_path)
    if out_path.exists():
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
    return out_path


def stdlib_rows(stdlib: Path) -> Iterator[dict[str, str]]:
    """The corpus rows of the sources under ``stdlib``, in sorted path order; each title and each text
    once (an override that repeats its base's docstring adds nothing)."""
    seen: set[str] = set()
    for path, module in _stdlib_modules(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))  # bytes: honours coding declarations
        except (SyntaxError, ValueError):
            continue  # a file of another Python version's syntax (or a template): not documentation
        for title, keywords, doc in _documented(tree, module):
            text = _clean_text(doc)
            if text is None or title in seen or text in seen:
                continue
            seen.update((title, text))
            # The first keyword (the module) always stays; a member's own name is in its title already.
            own = "" if title == module else title.rsplit(".", 1)[-1]
            keywords = _dedup(keywords[:1] + [w for w in keywords[1:] + _mentions(text) if w != own])
            yield {"title": title, "keywords": " ".join(keywords[:MAX_KEYWORDS]), "text": text}


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


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, list[str], str]]:
    """(qualified name, starting keywords, raw docstring) of the module and its public classes,
    functions and methods, in source order. Nested functions are implementation detail: not visited."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, module.split("."), doc
    yield from _members(tree.body, module, module, None)


def _members(body: list[ast.stmt], prefix: str, module: str, cls: str | None) -> Iterator[tuple[str, list[str], str]]:
    for node in body:
        if isinstance(node, (ast.If, ast.Try, ast.With)):  # platform- or import-dependent definitions
            for block in (getattr(node, "body", []), getattr(node, "orelse", []), getattr(node, "finalbody", []),
                          *(h.body for h in getattr(node, "handlers", []))):
                yield from _members(block, prefix, module, cls)
            continue
        if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = node.name
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            continue  # private; dunders (__init__, __enter__) are public protocol
        title = f"{prefix}.{name}"
        doc = ast.get_docstring(node, clean=True)
        if isinstance(node, ast.ClassDef):
            if doc:
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                yield title, [module, *bases], doc
            yield from _members(node.body, title, module, name)
        elif doc:
            a = node.args
            params = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)
                      if p.arg not in _SKIP_PARAMS and not p.arg.startswith("_") and len(p.arg) > 1]
            yield title, [module, *([cls] if cls else []), *params[:4]], doc


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


def _mentions(text: str) -> list[str]:
    """Identifiers the text mentions, in order: backticked names, dotted names, snake_case names, calls."""
    out = []
    for m in _MENTION.finditer(text):
        word = next(g for g in m.groups() if g).strip(".").removeprefix("self.")
        parts = word.split(".")
        # Not abbreviations (e.g., i.e.), file names, host names or one-letter variables (d.keys).
        if (not word.startswith("_") and min(map(len, parts)) > 1 and parts[0] != "www"
                and (len(parts) == 1 or parts[-1] not in _NOT_NAMES)):
            out.append(word)
    return out


def _dedup(words: list[str]) -> list[str]:
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
