"""The tokenized corpus: every row's title, keywords and text tokenized once, into memory-mapped arrays
cached per (corpus, tokenizer), so that batches slice ids instead of running a tokenizer.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from gpt2_jax.corpus import Row
from gpt2_jax.errors import GPT2JaxError, first_line

log = logging.getLogger(__name__)

_CACHE_VERSION = 1
_CHUNK = 4096  # strings per encode_batch call: bounds the Python lists held at once
_ARRAYS = ("tokens", "piece_off", "kw_tokens", "kw_off", "row_kw", "row_kw_off")

class TokenizedCorpus:
    """Every row's title, keywords and text as token ids, memory-mapped from a cache directory.

    N rows, K distinct keywords. Piece p is ``tokens[piece_off[p]:piece_off[p + 1]]``; row r's pieces are
    3r (title), 3r + 1 (its keywords joined by spaces, in their order) and 3r + 2 (text), stored one
    after another. Keyword k is encoded once as a first keyword (``kw_tokens`` piece 2k: ``encode(k)``)
    and once as a later one (piece 2k + 1: ``encode(" " + k)``), so that any subset in any order
    assembles to ``encode(" ".join(subset))`` for tokenizers that split words at spaces.
    Row r's keywords are the ids ``row_kw[row_kw_off[r]:row_kw_off[r + 1]]``.
    """

    def __init__(self, directory: Path, arrays: dict, meta: dict):
        self.directory = directory
        self.meta = meta
        self.tokens, self.piece_off = arrays["tokens"], arrays["piece_off"]  # int32 [*], int64 [3N+1]
        self.kw_tokens, self.kw_off = arrays["kw_tokens"], arrays["kw_off"]  # int32 [*], int64 [2K+1]
        self.row_kw, self.row_kw_off = arrays["row_kw"], arrays["row_kw_off"]  # int32 [*], int64 [N+1]
        self.special_ids: dict[str, int] = meta["special_ids"]
        # Rows whose keywords tokenize differently one by one than joined (0 for space-splitting tokenizers).
        self.keyword_mismatches: int = meta["keyword_mismatches"]

    @classmethod
    def load(cls, directory: str | Path) -> "TokenizedCorpus":
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
            if meta.get("version") != _CACHE_VERSION:
                raise ValueError(f"version {meta.get('version')}, expected {_CACHE_VERSION}")
            arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r") for k in _ARRAYS}
            n, k = meta["rows"], meta["keywords"]
            if (len(arrays["piece_off"]) != 3 * n + 1 or len(arrays["row_kw_off"]) != n + 1
                    or len(arrays["kw_off"]) != 2 * k + 1 or len(arrays["tokens"]) != arrays["piece_off"][-1]):
                raise ValueError("array sizes disagree")
        except (OSError, ValueError, KeyError) as e:
            raise GPT2JaxError(f"{directory}: a broken tokenized-corpus cache ({first_line(e)}); delete it "
                               f"and it will be rebuilt") from None
        return cls(directory, arrays, meta)

    def __len__(self) -> int:
        return len(self.row_kw_off) - 1

    def _piece(self, p: int) -> np.ndarray:
        return self.tokens[self.piece_off[p]:self.piece_off[p + 1]]

    def title(self, r: int) -> np.ndarray:
        return self._piece(3 * r)

    def keywords(self, r: int) -> np.ndarray:
        """All of row r's keywords in their order: exactly ``encode(" ".join(keywords))``."""
        return self._piece(3 * r + 1)

    def text(self, r: int) -> np.ndarray:
        return self._piece(3 * r + 2)

    def num_keywords(self, r: int) -> int:
        return int(self.row_kw_off[r + 1] - self.row_kw_off[r])

    def keywords_in_order(self, r: int, order: Sequence[int]) -> np.ndarray:
        """Row r's keywords ``order`` (positions in the row's list) as ``encode(" ".join(chosen))`` gives them."""
        ids = self.row_kw[self.row_kw_off[r] + np.asarray(order, np.int64)]
        pieces = 2 * ids.astype(np.int64) + (np.arange(len(ids)) > 0)  # first keyword: no leading space
        return np.concatenate([self.kw_tokens[self.kw_off[p]:self.kw_off[p + 1]] for p in pieces] or
                              [np.zeros(0, np.int32)])

    def keyword_lengths(self, r: int, order: Sequence[int]) -> np.ndarray:
        """Tokens of each keyword of ``keywords_in_order(r, order)``, in that order."""
        ids = self.row_kw[self.row_kw_off[r] + np.asarray(order, np.int64)].astype(np.int64)
        pieces = 2 * ids + (np.arange(len(ids)) > 0)
        return (self.kw_off[pieces + 1] - self.kw_off[pieces]).astype(np.int64)

    def sequence(self, r: int, keyword_order: Sequence[int] | None = None, *, bos_id: int, sep_id: int,
                 eos_id: int, limit: int | None = None, prompt_limit: int | None = None) -> tuple[np.ndarray, int]:
        """``[BOS] title [SEP] keywords [SEP] text [EOS]`` of row r, cut to ``limit`` tokens (the text
        first), and the position of its first text token. ``keyword_order=None``: all, in order.

        ``prompt_limit``: the longest ``[BOS] title [SEP] keywords [SEP]``; keywords that would pass it
        are dropped from the end of the order (the title is kept whole)."""
        title = self.title(r)
        if prompt_limit is not None and len(title) + len(self.keywords(r)) + 3 > prompt_limit:
            order = np.arange(self.num_keywords(r)) if keyword_order is None else np.asarray(keyword_order)
            fits = len(title) + 3 + np.cumsum(self.keyword_lengths(r, order)) <= prompt_limit
            keyword_order = order[:int(np.count_nonzero(fits))]  # a prefix: the sums only grow
        kw = self.keywords(r) if keyword_order is None else self.keywords_in_order(r, keyword_order)
        text_start = len(title) + len(kw) + 3
        text = self.text(r)
        if limit is not None:
            text = text[:max(0, limit - text_start)]  # do not copy a long document only to cut it
        one = lambda i: np.array([i], np.int32)  # noqa: E731
        seq = np.concatenate([one(bos_id), title, one(sep_id), kw, one(sep_id), text, one(eos_id)])
        return (seq if limit is None else seq[:limit]), text_start


def tokenize_corpus(rows: Sequence[Row], tokenizer, cache_dir: str | Path) -> TokenizedCorpus:
    """Tokenize the rows once and cache them under ``cache_dir``; later calls load the cache.

    The cache directory is named by a hash of the rows and the tokenizer, and written atomically (a
    temporary directory renamed into place), so a killed run never leaves a half cache that is used.
    """
    if not len(rows):
        raise GPT2JaxError("no rows to tokenize (an empty corpus)")
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GPT2JaxError(f"cannot create the data cache directory {cache_dir} ({first_line(e)})") from None
    key = hashlib.sha256(f"v{_CACHE_VERSION} {rows_digest(rows)} {tokenizer_digest(tokenizer)}".encode())
    final = cache_dir / f"tokens-{key.hexdigest()[:24]}"
    if final.is_dir():
        log.info("tokenized corpus: loading the cache %s", final)
    else:
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
        try:
            _write_corpus(tmp, rows, tokenizer)
            tmp.chmod(0o755)  # mkdtemp makes it private; a shared cache is read by other users' runs too
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("tokenized %d rows in %.1f s into %s", len(rows), time.time() - t0, final)
    return TokenizedCorpus.load(final)


def rows_digest(rows: Sequence[Row]) -> str:
    """A hash of the rows' content (JSON escapes newlines, so one line per row is unambiguous)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.title, list(r.keywords), r.text], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """A hash of what decides a tokenizer's ids: the files it saves, and its special token ids.

    When it saves a ``tokenizer.json`` (a Hugging Face fast tokenizer), that file alone is hashed: it
    serializes everything that encodes, while the other files differ cosmetically between a freshly
    trained tokenizer and the same one loaded back, which would make a needless second cache.
    """
    h = hashlib.sha256(json.dumps([tokenizer.kind, tokenizer.special_ids], sort_keys=True).encode())
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        files = sorted(p for p in Path(d).rglob("*") if p.is_file())
        if any(p.name == "tokenizer.json" for p in files):
            files = [Path(d) / "tokenizer.json"]
        for p in files:
            content = p.read_bytes()
            h.update(f"\n{p.relative_to(d).as_posix()} {len(content)}\n".encode() + content)
    return h.hexdigest()


def _write_corpus(out: Path, rows: Sequence[Row], tokenizer) -> None:
    vocab: dict[str, int] = {}  # distinct keyword -> id
    row_kw = np.fromiter((vocab.setdefault(k, len(vocab)) for r in rows for k in r.keywords), np.int32)
    row_kw_off = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r.keywords) for r in rows], out=row_kw_off[1:])
    kw_chunks, kw_len = _encode(tokenizer, [s for k in vocab for s in (k, " " + k)])
    kw_tokens = np.concatenate(kw_chunks)
    tok_chunks, tok_len = _encode(tokenizer, [s for r in rows for s in (r.title, " ".join(r.keywords), r.text)])
    piece_off, kw_off = _offsets(tok_len), _offsets(kw_len)

    tokens = np.lib.format.open_memmap(out / "tokens.npy", mode="w+", dtype=np.int32, shape=(int(piece_off[-1]),))
    for chunk, start in zip(tok_chunks, itertools.accumulate((len(c) for c in tok_chunks), initial=0)):
        tokens[start:start + len(chunk)] = chunk
    tokens.flush()
    mismatches = _keyword_mismatches(tokens, piece_off, kw_tokens, kw_off, row_kw, row_kw_off)
    del tokens
    if mismatches:
        log.warning("%d of %d rows' keywords tokenize differently one by one than joined by spaces (the "
                    "tokenizer does not split words at spaces): keyword augmentation uses the one-by-one "
                    "ids for them", mismatches, len(rows))
    for name, a in (("piece_off", piece_off), ("kw_tokens", kw_tokens), ("kw_off", kw_off),
                    ("row_kw", row_kw), ("row_kw_off", row_kw_off)):
        np.save(out / f"{name}.npy", a)
    meta = dict(version=_CACHE_VERSION, rows=len(rows), keywords=len(vocab), tokens=int(piece_off[-1]),
                keyword_mismatches=mismatches, special_ids=dict(tokenizer.special_ids), kind=tokenizer.kind)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for p in out.iterdir():  # on disk before the rename publishes them, even if the machine fails
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; if another process got there first, keep its copy."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _encode(tokenizer, strings: list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """``encode_batch`` in chunks: the ids as int32 chunks, and each string's length."""
    chunks, lengths = [np.zeros(0, np.int32)], np.zeros(len(strings), np.int64)
    for a in range(0, len(strings), _CHUNK):
        ids = tokenizer.encode_batch(strings[a:a + _CHUNK])
        lengths[a:a + len(ids)] = [len(x) for x in ids]
        chunks.append(np.fromiter(itertools.chain.from_iterable(ids), np.int32,
                                  count=int(lengths[a:a + len(ids)].sum())))
    return chunks, lengths


def _offsets(lengths: np.ndarray) -> np.ndarray:
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    return off


def flat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + c)`` over (starts, counts): index arrays for vectorised gathers."""
    counts = np.asarray(counts, np.int64)
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(np.asarray(starts, np.int64) - ends + counts, counts)


def _keyword_mismatches(tokens, piece_off, kw_tokens, kw_off, row_kw, row_kw_off) -> int:
    """How many rows' keywords, assembled from the per-keyword pieces, differ from the joined encoding."""
    n = len(row_kw_off) - 1
    occ_row = np.repeat(np.arange(n), np.diff(row_kw_off))  # the row of each keyword occurrence
    piece = 2 * row_kw.astype(np.int64) + (np.arange(len(row_kw)) != row_kw_off[occ_row])
    occ_len = kw_off[piece + 1] - kw_off[piece]
    assembled = kw_tokens[flat_ranges(kw_off[piece], occ_len)]
    a_len = np.bincount(occ_row, weights=occ_len, minlength=n).astype(np.int64)
    j_start, j_len = piece_off[1::3][:n], np.diff(piece_off)[1::3]
    same = np.flatnonzero(a_len == j_len)  # only rows of equal length need a token comparison
    differs = assembled[flat_ranges(_offsets(a_len)[same], a_len[same])] != tokens[flat_ranges(j_start[same], j_len[same])]
    bad_tokens = np.bincount(np.repeat(np.arange(len(same)), a_len[same]), weights=differs, minlength=len(same))
    return int(n - len(same) + np.count_nonzero(bad_tokens))
