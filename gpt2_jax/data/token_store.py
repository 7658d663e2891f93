"""The tokenized corpus on disk and its memory-mapped reader: token shards (uint16 when the vocabulary fits in
65,536 ids, else uint32) plus index arrays and ``meta.json``, so that batches slice ids instead of running a
tokenizer.

One format for every corpus size: ``data.token_writer`` writes it (``tokenize_corpus``: a run's small corpus, one
shard in a cache keyed by rows + tokenizer; ``data.prepare``: any size, streamed, many shards) and
``TokenizedCorpus.load`` reads it. llm.c and nanoGPT ``.bin`` token files are read in place by
``TokenizedCorpus.from_bin`` (``data.bin_files``) as text-only rows.

A directory::

    meta.json                    written last: the directory is complete once it exists
    verified.json                the shards whose sha256 a load verified, by size, mtime and inode (not hashed again)
    piece_off.npy kw_tokens.npy kw_off.npy row_kw.npy row_kw_off.npy   the index, global offsets
    shard-00000/tokens.npy ...   each shard: its tokens and its own (local) index, shard.json last

N rows, K keywords (a keyword repeated in two shards counts twice; within a shard each is stored once).

Loading verifies the shards: every id below the tokenizer's vocabulary (on each load: about 0.2 s a GB), and each
shard's sha256 against meta.json's (once, while its size, mtime and inode stay those verified.json records: about
0.9 s a GB), so that damaged data is one line naming the shard, never a silently different corpus.
"""
from __future__ import annotations

import collections.abc
import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from gpt2_jax.data.bin_files import map_bin_file
from gpt2_jax.data.rows import Row, corpus_dir_problem
from gpt2_jax.errors import GPT2JaxError, first_line

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
ARRAYS = ("tokens", "piece_off", "kw_tokens", "kw_off", "row_kw", "row_kw_off")  # each shard's
INDEX_ARRAYS = ARRAYS[1:]  # the global index at the top of a directory
VERIFIED = "verified.json"
_SCAN_BYTES = 1 << 25  # of a shard, checked or hashed at once: one pass, bounded memory


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
            if meta.get("version") != FORMAT_VERSION:
                raise ValueError(f"version {meta.get('version')}, expected {FORMAT_VERSION}")
            arrays = {k: np.load(directory / f"{k}.npy", mmap_mode="r") for k in INDEX_ARRAYS}
            shards = [_open_shard(directory / s["name"] / "tokens.npy", np.dtype(meta["dtype"]), s["tokens"],
                                  meta["vocab_size"]) for s in meta["shards"]]
            arrays["tokens"] = shards[0] if len(shards) == 1 else ShardedTokens(shards)
            n, k = meta["rows"], meta["keywords"]
            if (len(arrays["piece_off"]) != 3 * n + 1 or len(arrays["row_kw_off"]) != n + 1
                    or len(arrays["kw_off"]) != 2 * k + 1 or len(arrays["tokens"]) != arrays["piece_off"][-1]):
                raise ValueError("array sizes disagree")
            _verify_checksums(directory, meta["shards"])
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
        return cls(path, *map_bin_file(path, vocab_size))

    def __len__(self) -> int:
        return len(self.row_kw_off) - 1

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
        if corpus_dir_problem(path):
            raise GPT2JaxError(corpus_dir_problem(path))
        return TokenizedCorpus.load(path, vocab_size)
    if not path.is_file():
        raise GPT2JaxError(f"token file {path} does not exist")
    return TokenizedCorpus.from_bin(path, vocab_size)


def _open_shard(path: Path, dtype: np.dtype, count: int, vocab_size: int) -> np.ndarray:
    """The shard's ids, mapped, each checked to be below ``vocab_size`` (the tokenizer's)."""
    a = np.load(path, mmap_mode="r")  # a truncated file fails here ("mmap length is greater than file size")
    name = f"{path.parent.name}/{path.name}"
    if a.dtype != dtype or a.shape != (count,):
        raise ValueError(f"{name} holds {a.dtype} {a.shape}, expected {dtype} ({count},)")
    step = _SCAN_BYTES // dtype.itemsize
    for at in range(0, count, step):  # max() of a mapped chunk reads it in place: no copy
        chunk = a[at:at + step]
        if chunk.max() >= vocab_size:
            i = at + int(np.argmax(chunk >= vocab_size))
            raise ValueError(f"{name}: token id {int(a[i])} at position {i} is not below the vocabulary of "
                             f"{vocab_size} ids")
    return a.view(np.int32) if dtype == np.uint32 else a


def tokens_sha256(path: Path) -> str:
    """The sha256 of a shard's ids (its ``tokens.npy`` less the header), as ``write_shard`` records it."""
    a = np.load(path, mmap_mode="r")
    raw = a.reshape(-1).view(np.uint8) if a.size else np.zeros(0, np.uint8)
    h = hashlib.sha256()
    for at in range(0, len(raw), _SCAN_BYTES):
        h.update(raw[at:at + _SCAN_BYTES])
    return h.hexdigest()


def _verify_checksums(directory: Path, shards: Sequence[dict]) -> None:
    """Hash each shard not verified before as it is now (size, mtime, inode and meta.json's sha256, as
    ``VERIFIED`` lists them) and compare it with meta.json's sha256; then record them all as verified."""
    stamp_file = directory / VERIFIED
    try:
        before = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        before = None
    before = before if isinstance(before, dict) else {}
    now = {}
    for s in shards:
        path = directory / s["name"] / "tokens.npy"
        st = path.stat()
        now[s["name"]] = [st.st_size, st.st_mtime_ns, st.st_ino, s["sha256"]]
        if before.get(s["name"]) != now[s["name"]]:
            if tokens_sha256(path) != s["sha256"]:
                raise ValueError(f"{s['name']}/tokens.npy does not match the sha256 that meta.json records")
    if now != before:
        tmp = directory / f".{VERIFIED}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(now) + "\n")
            os.replace(tmp, stamp_file)
        except OSError as e:  # a read-only directory: verified on each load
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.info("%s: cannot record its verified shards (%s); they are hashed on each load", directory,
                     first_line(e))


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


def flat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + c)`` over (starts, counts): index arrays for vectorised gathers."""
    counts = np.asarray(counts, np.int64)
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(np.asarray(starts, np.int64) - ends + counts, counts)


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
