"""The tokenized corpus on disk, and its reader: token shards (uint16 when the vocabulary fits in 65,536 ids,
else uint32) plus index arrays and ``meta.json``, so that batches slice ids instead of running a tokenizer.

One format for every corpus size: ``tokenize_corpus`` (train.py's small corpora, one shard in a cache
keyed by rows + tokenizer) and ``prepare.py`` (any size, streamed, many shards) both write it through
``write_shard`` + ``finish``, and ``TokenizedCorpus.load`` reads it. llm.c and nanoGPT ``.bin`` token
files are read in place by ``TokenizedCorpus.from_bin`` as text-only rows.

A directory::

    meta.json                    written last: the directory is complete once it exists
    piece_off.npy kw_tokens.npy kw_off.npy row_kw.npy row_kw_off.npy   the index, global offsets
    shard-00000/tokens.npy ...   each shard: its tokens and its own (local) index, shard.json last

N rows, K keywords (a keyword repeated in two shards counts twice; within a shard each is stored once).
"""
from __future__ import annotations

import collections.abc
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from gpt2_jax.data.rows import Row
from gpt2_jax.errors import GPT2JaxError, first_line

log = logging.getLogger(__name__)

_FORMAT_VERSION = 2
# Strings and characters per encode_batch call: bound the Python lists of ids held at once (about 100
# bytes a token while they are Python ints).
_CHUNK, _CHUNK_CHARS = 4096, 1 << 20
_ARRAYS = ("tokens", "piece_off", "kw_tokens", "kw_off", "row_kw", "row_kw_off")
_INDEX = _ARRAYS[1:]  # the global index arrays at the top of a directory
SHARD_DONE = "shard.json"  # written last into a shard: the shard is complete
# llm.c and nanoGPT token files: GPT-2 ids, documents separated by <|endoftext|>.
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
GPT2_EOT = 50256


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (2 bytes a token, as llm.c and nanoGPT store GPT-2's), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class ShardedTokens:
    """The shards' tokens as one array with global offsets: ``tokens[a:b]`` and ``tokens[int_array]``.

    A document never crosses shards, so the slices callers take land in one shard (a view, no copy);
    gathers group their indices by shard. uint32 shards are viewed as int32 (ids < 2**31), uint16 ones
    stay uint16 (numpy promotes them to int32 next to the int32 special ids)."""

    def __init__(self, shards: Sequence[np.ndarray]):
        self.shards = list(shards)
        self.starts = np.zeros(len(self.shards) + 1, np.int64)
        np.cumsum([len(s) for s in self.shards], out=self.starts[1:])
        self.dtype = self.shards[0].dtype
        self.shape = (int(self.starts[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        return np.concatenate(self.shards).astype(dtype or self.dtype, copy=False)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                raise IndexError("ShardedTokens slices take no step")
            if b <= a:
                return np.zeros(0, self.dtype)
            s = int(np.searchsorted(self.starts, a, "right")) - 1
            if b <= self.starts[s + 1]:
                return self.shards[s][a - self.starts[s]:b - self.starts[s]]
            return np.concatenate([self[a:int(self.starts[s + 1])], self[int(self.starts[s + 1]):b]])
        idx = np.asarray(key)
        if idx.dtype.kind not in "iu":
            raise IndexError(f"ShardedTokens takes slices and integer arrays, got {idx.dtype}")
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for {n} tokens")
        shard = np.searchsorted(self.starts, idx, "right") - 1
        if idx.size and shard.min() == shard.max():  # the common case: one shard
            s = int(shard.flat[0])
            return self.shards[s][idx - self.starts[s]]
        out = np.empty(idx.shape, self.dtype)
        for s in np.unique(shard):
            m = shard == s
            out[m] = self.shards[s][idx[m] - self.starts[s]]
        return out


class DocTokens:
    """The documents of a token file without the separators between them, as one array: ``tokens[a:b]``
    within a document is a view of the file (no copy); ``tokens[int_array]`` maps indices in one gather."""

    def __init__(self, base: np.ndarray, start: np.ndarray, length: np.ndarray):
        self.base, self.file_start = base, np.asarray(start, np.int64)  # each document's first id in base
        self.starts = np.zeros(len(start) + 1, np.int64)  # ... and here
        np.cumsum(length, out=self.starts[1:])
        self.dtype, self.shape = base.dtype, (int(self.starts[-1]),)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        return self[np.arange(len(self))].astype(dtype or self.dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, slice):
            a, b, step = key.indices(len(self))
            if step != 1:
                raise IndexError("DocTokens slices take no step")
            if b <= a:
                return np.zeros(0, self.dtype)
            d = int(np.searchsorted(self.starts, a, "right")) - 1
            if b <= self.starts[d + 1]:
                shift = self.file_start[d] - self.starts[d]
                return self.base[a + shift:b + shift]
            key = np.arange(a, b)
        idx = np.asarray(key).astype(np.int64)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} tokens")
        d = np.searchsorted(self.starts, idx, "right") - 1
        return self.base[idx + (self.file_start - self.starts[:-1])[d]]


class TokenizedCorpus:
    """Every row's title, keywords and text as token ids, memory-mapped.

    N rows, K distinct keywords. Piece p is ``tokens[piece_off[p]:piece_off[p + 1]]``; row r's pieces are
    3r (title), 3r + 1 (its keywords joined by spaces, in their order) and 3r + 2 (text), stored one
    after another. Keyword k is encoded once as a first keyword (``kw_tokens`` piece 2k: ``encode(k)``)
    and once as a later one (piece 2k + 1: ``encode(" " + k)``), so that any subset in any order
    assembles to ``encode(" ".join(subset))`` for tokenizers that split words at spaces.
    Row r's keywords are the ids ``row_kw[row_kw_off[r]:row_kw_off[r + 1]]``.
    ``text_only``: no row has a title or keywords (plain text, ``.bin`` token files).
    """

    def __init__(self, directory: Path, arrays: dict, meta: dict):
        self.directory = directory
        self.meta = meta
        # tokens: uint16 or int32 [*] (a memmap, or a ShardedTokens over several)
        self.tokens, self.piece_off = arrays["tokens"], arrays["piece_off"]  # int64 [3N+1]
        self.kw_tokens, self.kw_off = arrays["kw_tokens"], arrays["kw_off"]  # int32 [*], int64 [2K+1]
        self.row_kw, self.row_kw_off = arrays["row_kw"], arrays["row_kw_off"]  # int32 [*], int64 [N+1]
        self.special_ids: dict[str, int] = meta["special_ids"]
        # Rows whose keywords tokenize differently one by one than joined (0 for space-splitting tokenizers).
        self.keyword_mismatches: int = meta["keyword_mismatches"]
        self.text_only: bool = bool(meta.get("text_only", False))

    @classmethod
    def load(cls, directory: str | Path, vocab_size: int | None = None) -> "TokenizedCorpus":
        """Memory-map a prepared directory; ``vocab_size``: the model's, which every id must be below."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
            if meta.get("version") != _FORMAT_VERSION:
                raise ValueError(f"version {meta.get('version')}, expected {_FORMAT_VERSION}")
            arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r") for k in _INDEX}
            shards = [_open_shard(directory / s["name"] / "tokens.npy", np.dtype(meta["dtype"]), s["tokens"])
                      for s in meta["shards"]]
            arrays["tokens"] = shards[0] if len(shards) == 1 else ShardedTokens(shards)
            n, k = meta["rows"], meta["keywords"]
            if (len(arrays["piece_off"]) != 3 * n + 1 or len(arrays["row_kw_off"]) != n + 1
                    or len(arrays["kw_off"]) != 2 * k + 1 or len(arrays["tokens"]) != arrays["piece_off"][-1]):
                raise ValueError("array sizes disagree")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GPT2JaxError(f"{directory}: a broken tokenized-corpus cache ({first_line(e)}); delete it and it "
                               f"will be rebuilt (by tools/prepare_data.py for a prepared directory)") from None
        if vocab_size is not None and meta["vocab_size"] > vocab_size:
            raise GPT2JaxError(f"{directory}: prepared with a vocabulary of {meta['vocab_size']} ids, more than the "
                               f"model's {vocab_size}")
        return cls(directory, arrays, meta)

    @classmethod
    def from_bin(cls, path: str | Path, vocab_size: int | None = None) -> "TokenizedCorpus":
        """An llm.c (256 int32 header, magic 20240520) or nanoGPT (headerless) uint16 token file, mapped in
        place: each run of ids between <|endoftext|> (50256) separators is a text-only row, without them."""
        path = Path(path)
        tokens, kind = _map_bin(path)
        n = len(tokens)
        eot, top = [], -1
        for a in range(0, n, 1 << 24):  # chunks: one pass, bounded memory
            chunk = np.asarray(tokens[a:a + (1 << 24)])
            eot.append(np.flatnonzero(chunk == GPT2_EOT) + a)
            top = max(top, int(chunk.max()))
        if vocab_size is not None and top >= vocab_size:
            raise GPT2JaxError(f"{path}: token id {top} is not below the model's vocabulary of {vocab_size}")
        eot = np.concatenate(eot or [np.zeros(0, np.int64)]).astype(np.int64)
        start, end = np.concatenate([[0], eot + 1]), np.concatenate([eot, [n]])
        keep = end > start  # no empty documents (llm.c starts the file with a separator)
        start, length = start[keep], (end - start)[keep]
        if not len(start):
            raise GPT2JaxError(f"{path}: no tokens besides <|endoftext|>" if n else f"{path}: no tokens")
        view = DocTokens(tokens, start, length)
        piece_off = np.append(np.repeat(view.starts[:-1], 3), view.starts[-1]).astype(np.int64)
        z = np.zeros(0, np.int32)
        arrays = dict(tokens=view, piece_off=piece_off, kw_tokens=z, kw_off=np.zeros(1, np.int64), row_kw=z,
                      row_kw_off=np.zeros(len(start) + 1, np.int64))
        meta = dict(format=kind, rows=len(start), keywords=0, tokens=len(view), keyword_mismatches=0,
                    vocab_size=top + 1, special_ids={"<|endoftext|>": GPT2_EOT}, text_only=True)
        return cls(path, arrays, meta)

    def __len__(self) -> int:
        return len(self.row_kw_off) - 1

    def doc_lengths(self) -> np.ndarray:
        """Tokens of each row (title + keywords + text), int64 [N]."""
        return np.diff(self.piece_off[::3]).astype(np.int64)

    def _piece(self, p: int) -> np.ndarray:
        return self.tokens[int(self.piece_off[p]):int(self.piece_off[p + 1])]

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
                              [np.zeros(0, np.int32)]).astype(np.int32, copy=False)

    def keyword_lengths(self, r: int, order: Sequence[int]) -> np.ndarray:
        """Tokens of each keyword of ``keywords_in_order(r, order)``, in that order."""
        ids = self.row_kw[self.row_kw_off[r] + np.asarray(order, np.int64)].astype(np.int64)
        pieces = 2 * ids + (np.arange(len(ids)) > 0)
        return (self.kw_off[pieces + 1] - self.kw_off[pieces]).astype(np.int64)

    def sequence(self, r: int, keyword_order: Sequence[int] | None = None, *, bos_id: int, sep_id: int,
                 eos_id: int, limit: int | None = None, prompt_limit: int | None = None) -> tuple[np.ndarray, int]:
        """``[BOS] title [SEP] keywords [SEP] text [EOS]`` of row r (int32), cut to ``limit`` tokens (the text
        first), and the position of its first text token. ``keyword_order=None``: all, in order. A row with
        neither title nor keywords (plain text) is ``[EOS] text [EOS]``, as tokenizer.format_example gives it.

        ``prompt_limit``: the longest ``[BOS] title [SEP] keywords [SEP]``; keywords that would pass it
        are dropped from the end of the order (the title is kept whole)."""
        title = self.title(r)
        one = lambda i: np.array([i], np.int32)  # noqa: E731
        if len(title) == 0 and self.num_keywords(r) == 0:
            text = self.text(r) if limit is None else self.text(r)[:max(0, limit - 1)]
            seq = np.concatenate([one(eos_id), text, one(eos_id)]).astype(np.int32)
            return (seq if limit is None else seq[:limit]), 1
        if prompt_limit is not None and len(title) + len(self.keywords(r)) + 3 > prompt_limit:
            order = np.arange(self.num_keywords(r)) if keyword_order is None else np.asarray(keyword_order)
            fits = len(title) + 3 + np.cumsum(self.keyword_lengths(r, order)) <= prompt_limit
            keyword_order = order[:int(np.count_nonzero(fits))]  # a prefix: the sums only grow
        kw = self.keywords(r) if keyword_order is None else self.keywords_in_order(r, keyword_order)
        text_start = len(title) + len(kw) + 3
        text = self.text(r)
        if limit is not None:
            text = text[:max(0, limit - text_start)]  # do not copy a long document only to cut it
        seq = np.concatenate([one(bos_id), title, one(sep_id), kw, one(sep_id), text, one(eos_id)]).astype(np.int32)
        return (seq if limit is None else seq[:limit]), text_start


def open_corpus(path: str | Path, vocab_size: int | None = None) -> TokenizedCorpus:
    """A prepared directory or an llm.c / nanoGPT ``.bin`` file."""
    path = Path(path)
    if path.is_dir():
        if not (path / "meta.json").is_file():
            raise GPT2JaxError(f"{path}: not a prepared data directory (no meta.json: unfinished? re-run "
                               f"tools/prepare_data.py to finish it)")
        return TokenizedCorpus.load(path, vocab_size)
    if not path.is_file():
        raise GPT2JaxError(f"token file {path} does not exist")
    return TokenizedCorpus.from_bin(path, vocab_size)


def _open_shard(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    a = np.load(path, mmap_mode="r")  # a truncated file fails here ("mmap length is greater than file size")
    if a.dtype != dtype or a.shape != (count,):
        raise ValueError(f"{path.parent.name}/{path.name} holds {a.dtype} {a.shape}, expected {dtype} ({count},)")
    return a.view(np.int32) if dtype == np.uint32 else a


def _map_bin(path: Path) -> tuple[np.memmap, str]:
    """The uint16 tokens of an llm.c or nanoGPT token file, and which of the two it is."""
    size = path.stat().st_size
    head = np.fromfile(path, np.int32, count=LLMC_HEADER_INTS) if size >= 4 * LLMC_HEADER_INTS else np.zeros(0)
    # llm.c's header: magic, version, ntok, then zeros. A headerless file's first ints are pairs of ids, so
    # only a date-like magic (llm.c's are dates) with zero padding is taken for a header.
    header = len(head) and (head[0] == LLMC_MAGIC or (20_200_000 <= head[0] < 20_300_000 and not head[3:].any()))
    try:
        if header:
            magic, version, ntok = (int(x) for x in head[:3])
            if magic != LLMC_MAGIC:
                raise GPT2JaxError(f"{path}: llm.c header magic {magic}, expected {LLMC_MAGIC} (a token file; "
                                   f"20240326 is a model file)")
            if version != LLMC_VERSION:
                raise GPT2JaxError(f"{path}: llm.c token file version {version}, expected {LLMC_VERSION}")
            if size != 4 * LLMC_HEADER_INTS + 2 * ntok:
                raise GPT2JaxError(f"{path}: truncated or padded: its header says {ntok} tokens "
                                   f"({4 * LLMC_HEADER_INTS + 2 * ntok} bytes), the file has {size} bytes")
            return np.memmap(path, np.uint16, "r", offset=4 * LLMC_HEADER_INTS, shape=(ntok,)), "llm.c"
        if size % 2:
            raise GPT2JaxError(f"{path}: {size} bytes, an odd count: not a headerless uint16 token file "
                               f"(nanoGPT's train.bin)")
        return np.memmap(path, np.uint16, "r", shape=(size // 2,)), "nanogpt"
    except OSError as e:
        raise GPT2JaxError(f"{path}: cannot map the token file ({first_line(e)})") from None


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
    digest = tokenizer_digest(tokenizer)
    key = hashlib.sha256(f"v{_FORMAT_VERSION} {rows_digest(rows)} {digest}".encode())
    final = cache_dir / f"tokens-{key.hexdigest()[:24]}"
    if final.is_dir():
        log.info("tokenized corpus: loading the cache %s", final)
    else:
        t0 = time.time()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
        try:
            shard = write_shard(tmp, 0, rows, tokenizer)
            finish(tmp, [shard], tokenizer, digest, source=None)
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


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def write_shard(out: Path, index: int, rows: Sequence[Row], tokenizer, bad: Sequence[str] = ()) -> dict:
    """Tokenize ``rows`` into ``out/shard-NNNNN`` (written under a temporary name, renamed when complete) and
    return its record (rows, tokens, bytes, sha256, ...), which ``shard.json`` also holds."""
    final = out / shard_name(index)
    tmp = out / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    vocab: dict[str, int] = {}  # distinct keyword -> id
    row_kw = np.fromiter((vocab.setdefault(k, len(vocab)) for r in rows for k in r.keywords), np.int32)
    row_kw_off = _offsets(np.array([len(r.keywords) for r in rows], np.int64))
    kw_chunks, kw_len = _encode(tokenizer, [s for k in vocab for s in (k, " " + k)], np.int32)
    kw_tokens = np.concatenate(kw_chunks)
    tok_chunks, tok_len = _encode(tokenizer, [s for r in rows for s in (r.title, " ".join(r.keywords), r.text)], dtype)
    tokens = np.concatenate(tok_chunks)
    del tok_chunks
    piece_off, kw_off = _offsets(tok_len), _offsets(kw_len)
    mismatches = _keyword_mismatches(tokens, piece_off, kw_tokens, kw_off, row_kw, row_kw_off)
    for name, a in (("tokens", tokens), ("piece_off", piece_off), ("kw_tokens", kw_tokens), ("kw_off", kw_off),
                    ("row_kw", row_kw), ("row_kw_off", row_kw_off)):
        np.save(tmp / f"{name}.npy", a)
    record = dict(name=final.name, rows=len(rows), tokens=len(tokens), keywords=len(vocab),
                  keyword_mismatches=mismatches, bytes=(tmp / "tokens.npy").stat().st_size,
                  sha256=hashlib.sha256(tokens.data).hexdigest(),
                  text_only=not any(r.title or r.keywords for r in rows), bad_rows=len(bad), bad_first=list(bad[:5]))
    (tmp / SHARD_DONE).write_text(json.dumps(record) + "\n")
    _fsync_all(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return record


def check_shard(out: Path, record: dict) -> str:
    """Why the finished shard of ``record`` is not intact ("" when it is): sizes and the token checksum."""
    d = out / record["name"]
    try:
        for name in _ARRAYS:
            if not (d / f"{name}.npy").is_file():
                return f"{record['name']}/{name}.npy is missing"
        if (d / "tokens.npy").stat().st_size != record["bytes"]:
            return f"{record['name']}/tokens.npy has {(d / 'tokens.npy').stat().st_size} bytes, expected {record['bytes']}"
        tokens = np.load(d / "tokens.npy", mmap_mode="r")
        if len(tokens) != record["tokens"] or hashlib.sha256(np.ascontiguousarray(tokens).data).hexdigest() != record["sha256"]:
            return f"{record['name']}/tokens.npy does not match its checksum"
    except (OSError, ValueError) as e:
        return f"{record['name']}: {first_line(e)}"
    return ""


def finish(out: Path, shards: Sequence[dict], tokenizer, digest: str, source: dict | None,
           extra: dict | None = None, more_bad_rows: int = 0) -> dict:
    """Write the global index from the shards (one shard at a time: bounded memory) and ``meta.json`` last;
    ``more_bad_rows``: skipped rows no shard recorded."""
    shard_dirs = [out / s["name"] for s in shards]
    n = sum(s["rows"] for s in shards)
    local = lambda name: (np.load(d / f"{name}.npy", mmap_mode="r") for d in shard_dirs)  # noqa: E731
    tok_start = _offsets(np.array([s["tokens"] for s in shards], np.int64))
    kw_start = _offsets(np.array([s["keywords"] for s in shards], np.int64))
    kwtok_start = _offsets(np.array([len(a) for a in local("kw_tokens")], np.int64))
    occ_start = _offsets(np.array([len(a) for a in local("row_kw")], np.int64))
    # Offsets: each shard's, less its final one, shifted by what the shards before it hold; then the total.
    _write_concat(out / "piece_off.npy", np.int64, 3 * n + 1, (a[:-1] + t for a, t in zip(local("piece_off"), tok_start)),
                  tok_start[-1])
    _write_concat(out / "row_kw_off.npy", np.int64, n + 1, (a[:-1] + t for a, t in zip(local("row_kw_off"), occ_start)),
                  occ_start[-1])
    _write_concat(out / "row_kw.npy", np.int32, int(occ_start[-1]), (a + k for a, k in zip(local("row_kw"), kw_start)))
    _write_concat(out / "kw_tokens.npy", np.int32, int(kwtok_start[-1]), local("kw_tokens"))
    _write_concat(out / "kw_off.npy", np.int64, 2 * int(kw_start[-1]) + 1,
                  (a[:-1] + t for a, t in zip(local("kw_off"), kwtok_start)), kwtok_start[-1])
    mismatches = sum(s["keyword_mismatches"] for s in shards)
    if mismatches:
        log.warning("%d of %d rows' keywords tokenize differently one by one than joined by spaces (the "
                    "tokenizer does not split words at spaces): keyword augmentation uses the one-by-one "
                    "ids for them", mismatches, n)
    meta = dict(version=_FORMAT_VERSION, rows=n, keywords=int(kw_start[-1]), tokens=int(tok_start[-1]),
                keyword_mismatches=mismatches, text_only=all(s["text_only"] for s in shards),
                dtype=token_dtype(tokenizer.vocab_size).name, vocab_size=int(tokenizer.vocab_size),
                tokenizer_digest=digest, special_ids=dict(tokenizer.special_ids), kind=tokenizer.kind,
                bad_rows=more_bad_rows + sum(s["bad_rows"] for s in shards), source=source, **(extra or {}),
                shards=[{k: s[k] for k in ("name", "rows", "tokens", "bytes", "sha256")} for s in shards])
    _fsync_all(out)
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def _write_concat(path: Path, dtype, total: int, parts: Iterable[np.ndarray], last=None) -> None:
    """``concatenate(parts + [last])`` written as ``.npy`` one part at a time."""
    a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(int(total),))
    at = 0
    for p in parts:
        a[at:at + len(p)] = p
        at += len(p)
    if last is not None:
        a[at] = last
        at += 1
    if at != total:
        raise ValueError(f"{path.name}: wrote {at} values, expected {total}")
    a.flush()
    del a


def _fsync_all(d: Path) -> None:
    """On disk before a rename publishes them, even if the machine fails."""
    for p in d.rglob("*"):
        if p.is_file():
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


def _encode(tokenizer, strings: list[str], dtype=np.int32) -> tuple[list[np.ndarray], np.ndarray]:
    """``encode_batch`` in chunks: the ids as ``dtype`` chunks, and each string's length (empty strings,
    such as plain text's titles, are not sent to the tokenizer)."""
    chunks, lengths = [np.zeros(0, dtype)], np.zeros(len(strings), np.int64)
    at, size = [], 0
    for i, s in enumerate(strings + [""]):
        if s:
            at.append(i)
            size += len(s)
        if at and (len(at) == _CHUNK or size >= _CHUNK_CHARS or i == len(strings)):
            ids = tokenizer.encode_batch([strings[j] for j in at])
            n = [len(x) for x in ids]
            lengths[at] = n
            chunks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype, count=sum(n)))
            at, size = [], 0
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


class DecodedRows(collections.abc.Sequence):
    """Rows ``indices`` of a corpus as ``Row``s decoded on demand (held-out samples of a prepared corpus,
    whose text is not otherwise kept)."""

    def __init__(self, corpus: TokenizedCorpus, indices: Sequence[int], tokenizer):
        self.corpus, self.indices, self.tokenizer = corpus, np.asarray(indices, np.int64), tokenizer

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        r, dec = int(self.indices[i]), self.tokenizer.decode
        return Row(dec(self.corpus.title(r)), tuple(dec(self.corpus.keywords(r)).split()), dec(self.corpus.text(r)))
