"""Writing the token store (``data.token_store``'s format): shards tokenized from rows, the global index and
``meta.json`` over them, each published atomically; and ``tokenize_corpus``, a run's small corpus written once
as one shard into a cache keyed by its rows and tokenizer. ``data.prepare`` writes large corpora through
``write_shard`` + ``finish`` too.
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
from typing import Iterable, Sequence

import numpy as np

from gpt2_jax.data.rows import Row
from gpt2_jax.data.token_store import (ARRAYS, FORMAT_VERSION, TokenizedCorpus, flat_ranges, tokenizer_digest,
                                       tokens_sha256)
from gpt2_jax.errors import GPT2JaxError, first_line

log = logging.getLogger(__name__)

# Strings and characters per encode_batch call: bound the Python lists of ids held at once (about 100
# bytes a token while they are Python ints).
_CHUNK, _CHUNK_CHARS = 4096, 1 << 20
SHARD_DONE = "shard.json"  # written last into a shard: the shard is complete


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (2 bytes a token, as llm.c and nanoGPT store GPT-2's), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


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
    key = hashlib.sha256(f"v{FORMAT_VERSION} {rows_digest(rows)} {digest}".encode())
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
        for name in ARRAYS:
            if not (d / f"{name}.npy").is_file():
                return f"{record['name']}/{name}.npy is missing"
        if (d / "tokens.npy").stat().st_size != record["bytes"]:
            return f"{record['name']}/tokens.npy has {(d / 'tokens.npy').stat().st_size} bytes, expected {record['bytes']}"
        tokens = np.load(d / "tokens.npy", mmap_mode="r")
        if len(tokens) != record["tokens"] or tokens_sha256(d / "tokens.npy") != record["sha256"]:
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
    meta = dict(version=FORMAT_VERSION, rows=n, keywords=int(kw_start[-1]), tokens=int(tok_start[-1]),
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
