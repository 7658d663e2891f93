"""llm.c and nanoGPT ``.bin`` token files, mapped in place as the token store's arrays: each run of GPT-2 ids
between ``<|endoftext|>`` separators is a text-only row (``TokenizedCorpus.from_bin``).

llm.c's file: a header of 256 int32 (magic 20240520, version 1, the token count), then uint16 ids;
nanoGPT's ``train.bin``: uint16 ids, no header.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2_jax.errors import GPT2JaxError, first_line

LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
GPT2_EOT = 50256  # <|endoftext|>: separates the documents
_SCAN = 1 << 24  # ids scanned at once for separators: one pass, bounded memory
_INT32_MIN_WORDS = 64  # a headerless file this long whose odd uint16 words are all 0 holds int32 ids


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


def map_bin_file(path: Path, vocab_size: int | None) -> tuple[dict, dict]:
    """The arrays and meta of ``TokenizedCorpus`` for the token file ``path``; ``vocab_size``: the model's, which
    every id must be below."""
    tokens, kind = _map_tokens(path)
    n = len(tokens)
    eot, top, odd_words = [], -1, False
    for a in range(0, n, _SCAN):  # _SCAN is even: chunk[1::2] are the file's odd words
        chunk = np.asarray(tokens[a:a + _SCAN])
        eot.append(np.flatnonzero(chunk == GPT2_EOT) + a)
        top = max(top, int(chunk.max()))
        odd_words = odd_words or bool(chunk[1::2].any())
    if kind == "nanogpt" and n >= _INT32_MIN_WORDS and not odd_words:
        # Little-endian int32 ids below 65,536 read as uint16: every other id 0, which would train silently.
        raise GPT2JaxError(f"{path}: every other uint16 word is 0: it looks like int32 token ids without llm.c's "
                           f"header, not uint16 ones (nanoGPT's train.bin)")
    if vocab_size is not None and top >= vocab_size:
        raise GPT2JaxError(f"{path}: token id {top} is not below the model's vocabulary of {vocab_size}")
    eot = np.concatenate(eot or [np.zeros(0, np.int64)]).astype(np.int64)
    start, end = np.concatenate([[0], eot + 1]), np.concatenate([eot, [n]])
    keep = end > start  # no empty documents (llm.c starts the file with a separator)
    start, length = start[keep], (end - start)[keep]
    if not len(start):
        raise GPT2JaxError(f"{path}: no tokens besides <|endoftext|>" if n else f"{path}: no tokens")
    view = DocTokens(tokens, start, length)
    # Each row's title and keywords are empty pieces at its text's start.
    piece_off = np.append(np.repeat(view.starts[:-1], 3), view.starts[-1]).astype(np.int64)
    z = np.zeros(0, np.int32)
    arrays = dict(tokens=view, piece_off=piece_off, kw_tokens=z, kw_off=np.zeros(1, np.int64), row_kw=z,
                  row_kw_off=np.zeros(len(start) + 1, np.int64))
    meta = dict(format=kind, rows=len(start), keywords=0, tokens=len(view), keyword_mismatches=0,
                vocab_size=top + 1, special_ids={"<|endoftext|>": GPT2_EOT}, text_only=True)
    return arrays, meta


def _map_tokens(path: Path) -> tuple[np.memmap, str]:
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
        if size == 0:
            raise GPT2JaxError(f"{path}: an empty file: no tokens")
        if size % 2:
            raise GPT2JaxError(f"{path}: {size} bytes, an odd count: not a headerless uint16 token file "
                               f"(nanoGPT's train.bin)")
        return np.memmap(path, np.uint16, "r", shape=(size // 2,)), "nanogpt"
    except OSError as e:
        raise GPT2JaxError(f"{path}: cannot map the token file ({first_line(e)})") from None
