"""Tests for gpt2_jax/data/token_store.py's on-disk format (token_writer.py writes it): the token dtype by
vocabulary size, one-line errors for a broken prepared directory, and llm.c / nanoGPT .bin token files read in
place (bin_files.py). A run's cache and the tokenizer round trip are tested in tests/data/test_batches.py,
streamed preparation in tests/data/test_prepare.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax.data.bin_files import GPT2_EOT, LLMC_MAGIC
from gpt2_jax.data.rows import Row
from gpt2_jax.data.token_store import TokenizedCorpus, open_corpus
from gpt2_jax.data.token_writer import token_dtype, tokenize_corpus
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.tokenizer import Tokenizer

EOT = GPT2_EOT


class CodeTokenizer(Tokenizer):
    """One id per character, shifted by `base`: a vocabulary of any size, checkable by hand."""

    kind = "code"
    special_ids = {"[BOS]": 1, "[SEP]": 2, "[EOS]": 3, "[PAD]": 0}

    def __init__(self, base: int, vocab_size: int):
        self.base, self.vocab_size = base, vocab_size
        self.base_vocab_size = vocab_size

    def encode_batch(self, texts):
        return [[self.base + ord(c) for c in t] for t in texts]

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "code.txt").write_text(f"{self.base} {self.vocab_size}\n")
        return out


ROWS = [Row("Tea", ("leaf", "cup"), "Steep it."), Row("", (), "plain"), Row("Z", ("z",), "")]


def test_dtype_by_vocabulary_size():
    assert token_dtype(50261) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


@pytest.mark.parametrize("base,vocab,dtype", [(100, 65536, "uint16"), (70000, 0x110000 + 70000, "uint32")])
def test_shards_hold_the_smallest_dtype_and_ids_come_back(tmp_path, base, vocab, dtype):
    tok = CodeTokenizer(base, vocab)
    corpus = tokenize_corpus(ROWS, tok, tmp_path)
    meta = json.loads((corpus.directory / "meta.json").read_text())
    assert meta["dtype"] == dtype and np.load(corpus.directory / "shard-00000" / "tokens.npy").dtype == dtype
    for r, row in enumerate(ROWS):
        assert corpus.title(r).tolist() == tok.encode(row.title) and corpus.text(r).tolist() == tok.encode(row.text)
        seq, _ = corpus.sequence(r, bos_id=1, sep_id=2, eos_id=3)
        assert seq.dtype == np.int32 and seq.tolist() == tok.format_example(row.title, row.keywords, row.text)
    assert corpus.keywords_in_order(0, [1, 0]).tolist() == tok.encode("cup leaf")
    row_lengths = np.diff(corpus.piece_off[::3])  # title + keywords + text
    assert row_lengths.tolist() == [len(r.title) + len(" ".join(r.keywords)) + len(r.text) for r in ROWS]
    assert not corpus.text_only


@pytest.fixture
def prepared(tmp_path) -> Path:
    return tokenize_corpus(ROWS, CodeTokenizer(100, 400), tmp_path).directory


def test_broken_directory_one_line_errors(prepared):
    shard = prepared / "shard-00000" / "tokens.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-4])  # truncated
    with pytest.raises(GPT2JaxError, match=r"broken tokenized-corpus cache \(mmap length is greater than file size\)"):
        TokenizedCorpus.load(prepared)
    a = np.load(prepared / "shard-00000" / "piece_off.npy")
    np.save(shard, np.zeros(int(a[-1]), np.uint32))  # the wrong dtype
    with pytest.raises(GPT2JaxError, match=r"shard-00000/tokens.npy holds uint32 \(\d+,\), expected uint16"):
        TokenizedCorpus.load(prepared)
    shard.unlink()  # a missing shard
    with pytest.raises(GPT2JaxError, match=r"broken tokenized-corpus cache \(.*No such file .*tokens.npy'\)"):
        TokenizedCorpus.load(prepared)
    shard.write_bytes(good)
    (prepared / "row_kw.npy").unlink()  # a missing index file
    with pytest.raises(GPT2JaxError, match=r"broken tokenized-corpus cache \(.*row_kw.npy'\); delete it"):
        TokenizedCorpus.load(prepared)


def test_vocabulary_mismatch_is_refused(prepared):
    assert len(TokenizedCorpus.load(prepared, vocab_size=400)) == 3
    with pytest.raises(GPT2JaxError, match=r"prepared with a vocabulary of 400 ids, more than the model's 300"):
        TokenizedCorpus.load(prepared, vocab_size=300)


DOCS = [[5, 6, 7], [8], [9, 10, 11, 12]]


def llmc_file(path: Path, stream: list[int], magic=LLMC_MAGIC, version=1, ntok=None) -> Path:
    header = np.zeros(256, np.int32)
    header[:3] = magic, version, len(stream) if ntok is None else ntok
    path.write_bytes(header.tobytes() + np.array(stream, np.uint16).tobytes())
    return path


def check_docs(corpus: TokenizedCorpus, docs) -> None:
    assert len(corpus) == len(docs) and corpus.text_only
    for r, d in enumerate(docs):
        assert corpus.text(r).tolist() == d and len(corpus.title(r)) == 0 and len(corpus.keywords(r)) == 0
        # Plain text is trained as [EOS] doc [EOS] (Batches, tokenizer.format_example).
        assert corpus.sequence(r, bos_id=1, sep_id=2, eos_id=3)[0].tolist() == [3, *d, 3]
    flat = [t for d in docs for t in d]
    idx = np.array([[0, len(flat) - 1], [3, 4]])
    np.testing.assert_array_equal(corpus.tokens[idx], np.array(flat)[idx])  # a gather across documents
    assert corpus.tokens[2:5].tolist() == flat[2:5]


def test_llmc_and_nanogpt_files_read_in_place(tmp_path):
    llmc = llmc_file(tmp_path / "train.bin", [t for d in DOCS for t in [EOT, *d]])  # llm.c: EOT before each
    corpus = open_corpus(llmc, vocab_size=50257)
    check_docs(corpus, DOCS)
    assert corpus.meta["format"] == "llm.c" and isinstance(corpus.tokens.base, np.memmap)  # mapped, not copied
    nano = tmp_path / "val.bin"
    np.array([t for d in DOCS for t in [*d, EOT]] + [EOT], np.uint16).tofile(nano)  # nanoGPT: EOT after each
    corpus = open_corpus(nano, vocab_size=50257)
    check_docs(corpus, DOCS)
    assert corpus.meta["format"] == "nanogpt"


@pytest.mark.parametrize("make,message", [
    (lambda p: llmc_file(p, [EOT, 5], magic=20240326), r"llm.c header magic 20240326, expected 20240520"),
    (lambda p: llmc_file(p, [EOT, 5], version=2), r"llm.c token file version 2, expected 1"),
    (lambda p: llmc_file(p, [EOT, 5], ntok=3), r"truncated or padded: its header says 3 tokens \(1030 bytes\), the file "
                                               r"has 1028 bytes"),
    (lambda p: p.write_bytes(b"\x05\x00\x06"), r"3 bytes, an odd count: not a headerless uint16 token file"),
    (lambda p: np.array([5, 50300, EOT], np.uint16).tofile(p), r"token id 50300 is not below the model's vocabulary "
                                                               r"of 50257"),
    (lambda p: np.array([EOT, EOT], np.uint16).tofile(p), r"no tokens besides <\|endoftext\|>"),
    (lambda p: p.write_bytes(b""), r"an empty file: no tokens"),
    (lambda p: np.array([5, 6, EOT] * 30, np.int32).tofile(p), r"every other uint16 word is 0: it looks like int32 "
                                                              r"token ids without llm.c's header"),
])
def test_bin_errors_are_one_line(tmp_path, make, message):
    path = tmp_path / "bad.bin"
    make(path)
    with pytest.raises(GPT2JaxError, match=message) as e:
        open_corpus(path, vocab_size=50257)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def flip(shard: Path, position: int, mask: int) -> None:
    a = np.load(shard)
    a[position] ^= mask
    np.save(shard, a)


@pytest.mark.parametrize("mask,message", [
    (0x8000, r"shard-00000/tokens\.npy: token id \d+ at position 4 is not below the vocabulary of 400 ids"),
    (0x1, r"shard-00000/tokens\.npy does not match the sha256 that meta\.json records"),  # an id still in range
])
def test_a_damaged_shard_is_refused_on_open(tmp_path, mask, message):
    """A run's cache (tokenize_corpus) and a prepared directory are the same format: either, once damaged, is
    one line naming the shard, loaded again or not."""
    tok = CodeTokenizer(100, 400)
    corpus = tokenize_corpus(ROWS, tok, tmp_path)
    flip(corpus.directory / "shard-00000" / "tokens.npy", 4, mask)
    with pytest.raises(GPT2JaxError, match=message) as e:
        tokenize_corpus(ROWS, tok, tmp_path)
    assert "\n" not in str(e.value) and str(corpus.directory) in str(e.value)
    with pytest.raises(GPT2JaxError, match=message):
        open_corpus(corpus.directory, vocab_size=400)


def test_shards_are_hashed_once_while_unchanged(prepared, monkeypatch):
    from gpt2_jax.data import token_store

    hashed = []
    real = token_store.tokens_sha256
    monkeypatch.setattr(token_store, "tokens_sha256", lambda path, **kw: hashed.append(path) or real(path, **kw))
    TokenizedCorpus.load(prepared)  # the fixture's load recorded the verified shard
    assert hashed == []
    shard = prepared / "shard-00000" / "tokens.npy"
    shard.write_bytes(shard.read_bytes())  # same bytes, a new modification time: hashed again, once
    TokenizedCorpus.load(prepared)
    TokenizedCorpus.load(prepared)
    assert hashed == [shard]
    stamp = prepared / token_store.VERIFIED
    stamp.unlink()
    stamp.mkdir()  # unwritable (a read-only directory, which root could still write): verified on each open
    TokenizedCorpus.load(prepared)
    TokenizedCorpus.load(prepared)
    assert len(hashed) == 3
