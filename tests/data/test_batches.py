"""Tests for gpt2_jax/data/token_writer.py's cache of a run's corpus (read back by token_store.py),
gpt2_jax/data/batches.py (keyword augmentation, the prompt limit, batches per process and per micro-batch,
resumable; loss masks) and gpt2_jax/data/split_stats.py (the split, the unigram baseline, prompt overflow), which
share their fixtures. Packing and windows: tests/data/test_packing.py."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax.data import token_writer
from gpt2_jax.data.rows import Row, read_rows
from gpt2_jax.data.batches import Batches, prompt_limit
from gpt2_jax.data.split_stats import prompt_overflow, split_indices, unigram_entropy
from gpt2_jax.data.token_store import ARRAYS, TokenizedCorpus, tokenizer_digest
from gpt2_jax.data.token_writer import tokenize_corpus
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.tokenizer import Tokenizer, train_bpe, train_sentencepiece

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample.csv"


class CharTokenizer(Tokenizer):
    """One id per character (its code point): examples small enough to check by hand."""

    kind = "char"
    special_ids = {"[BOS]": 1, "[SEP]": 2, "[EOS]": 3, "[PAD]": 0}
    base_vocab_size = vocab_size = 0x110000

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]

    def save(self, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "char.txt").write_text("one id per code point\n")
        return out


CHAR = CharTokenizer()
IDS = dict(bos_id=1, sep_id=2, eos_id=3)
# Keywords that try the per-keyword cache: punctuation, contractions, digits, accents, CJK, emoji,
# NFKC-normalised ligatures, special-token strings inside a keyword.
ODD_KEYWORDS = ("café", "naïve", "you're", "'s", "-dash", "x2", "42", "C++", "e.g.", "你好", "🌱", "[SEP]",
                "a[EOS]b", "ﬁne", "Ünïcödé", "end.")
ODD_ROWS = [Row("Odd keywords", ODD_KEYWORDS, "Some text, with [SEP] in it."),
            Row("", (), ""), Row("No keywords", (), "Just text.")]


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return list(read_rows(SAMPLE)[:40]) + ODD_ROWS


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Tokenizer]:
    texts = [s for r in read_rows(SAMPLE)[:25] for s in (r.title, " ".join(r.keywords), r.text)]  # ~10 KB
    root = tmp_path_factory.mktemp("tok")
    return {"sentencepiece": train_sentencepiece(texts, root / "sp", 400), "bpe": train_bpe(texts, root / "bpe", 400)}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, rows, tokenizers) -> dict[str, TokenizedCorpus]:
    root = tmp_path_factory.mktemp("cache")
    return {name: tokenize_corpus(rows, tok, root) for name, tok in tokenizers.items()}


def char_batches(rows, tmp_path, **kw) -> Batches:
    args = dict(IDS, pad_id=0, max_length=16, batch_size=8, seed=3, packing=False)  # one window a row: checkable
    args.update(kw)
    indices = args.pop("indices", range(len(rows)))
    return Batches(tokenize_corpus(rows, CHAR, tmp_path / "cache"), indices, **args)


def letter_rows(n: int) -> list[Row]:
    return [Row(f"T{i}", tuple(f"k{i}{j}" for j in range(i % 5)), "text " * (i % 4 + 1)) for i in range(n)]


@pytest.mark.parametrize("name", ["sentencepiece", "bpe"])
def test_assembled_keywords_equal_format_example(corpora, tokenizers, rows, name):
    corpus, tok = corpora[name], tokenizers[name]
    assert corpus.keyword_mismatches == 0 and len(corpus) == len(rows)
    ids = dict(bos_id=tok.bos_id, sep_id=tok.sep_id, eos_id=tok.eos_id)
    rng = np.random.default_rng(0)
    for r, row in enumerate(rows):
        seq, text_start = corpus.sequence(r, **ids)
        assert seq.dtype == np.int32 and seq.tolist() == tok.format_example(row.title, row.keywords, row.text)
        assert text_start == len(tok.format_prompt(row.title, row.keywords))
        n = len(row.keywords)
        for _ in range(5 if n else 0):
            order = rng.permutation(n)[:rng.integers(1, n + 1)]
            chosen = [row.keywords[j] for j in order]
            assert corpus.sequence(r, order, **ids)[0].tolist() == tok.format_example(row.title, chosen, row.text)
    whole = rows.index(ODD_ROWS[0])  # all sixteen in a random order
    order = rng.permutation(16)
    assert corpus.keywords_in_order(whole, order).tolist() == tok.encode(" ".join(ODD_ROWS[0].keywords[j]
                                                                                   for j in order))


def test_cache_hit_loads_without_encoding(tmp_path, rows, tokenizers, monkeypatch):
    tok = tokenizers["sentencepiece"]
    first = tokenize_corpus(rows, tok, tmp_path)
    other_rows = tokenize_corpus(rows[:-1], tok, tmp_path)
    other_tok = tokenize_corpus(rows, tokenizers["bpe"], tmp_path)
    assert len({first.directory, other_rows.directory, other_tok.directory}) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        c.directory.name for c in (first, other_rows, other_tok))  # no temporary directories left

    def refuse(texts):
        raise AssertionError("encoded again")

    monkeypatch.setattr(type(tok), "encode_batch", lambda self, texts: refuse(texts))
    again = tokenize_corpus(list(rows), tok, tmp_path)
    assert again.directory == first.directory and isinstance(again.tokens, np.memmap)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    with pytest.raises(AssertionError, match="encoded again"):  # a changed row is a miss
        tokenize_corpus(rows[:-1] + [Row("changed", (), "")], tok, tmp_path)


def test_cache_write_failure_leaves_nothing(tmp_path, monkeypatch):
    rows = letter_rows(5)
    save = np.save
    calls = []

    def failing_save(path, a):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        save(path, a)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        tokenize_corpus(rows, CHAR, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(np, "save", save)
    corpus = tokenize_corpus(rows, CHAR, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [corpus.directory.name]


def test_publish_keeps_the_first_finished_copy(tmp_path):
    final, tmp = tmp_path / "tokens-x", tmp_path / ".tokens-x.1.tmp"
    for d, mark in ((final, "first"), (tmp, "second")):
        d.mkdir()
        (d / "meta.json").write_text(mark)
    token_writer._publish(tmp, final)  # another process renamed its copy into place first
    assert [p.name for p in tmp_path.iterdir()] == ["tokens-x"] and (final / "meta.json").read_text() == "first"


def test_broken_cache_is_a_clear_error(tmp_path):
    corpus = tokenize_corpus(letter_rows(3), CHAR, tmp_path)
    (corpus.directory / "kw_off.npy").unlink()
    with pytest.raises(GPT2JaxError, match=r"tokens-\w+: a broken tokenized-corpus cache .*delete it"):
        tokenize_corpus(letter_rows(3), CHAR, tmp_path)


def test_tokenizer_digest_ignores_cosmetic_files(tokenizers, tmp_path):
    from gpt2_jax.tokenizer import load_tokenizer

    for tok in tokenizers.values():
        tok.save(tmp_path / tok.kind)
        assert tokenizer_digest(load_tokenizer(tmp_path / tok.kind)) == tokenizer_digest(tok)
    assert tokenizer_digest(tokenizers["bpe"]) != tokenizer_digest(tokenizers["sentencepiece"])


def test_keyword_augmentation_deterministic_and_varies_by_epoch(tmp_path):
    rows = [Row("T", ("a", "b", "c", "d", "e"), "x"), Row("U", (), "y"), Row("V", ("only",), "z")]
    b = char_batches(rows, tmp_path, batch_size=3, max_length=32)  # half of 32 holds all the keywords
    same = char_batches(rows, tmp_path, batch_size=3, max_length=32)
    orders = [b.keyword_order(0, e) for e in range(40)]
    assert all(np.array_equal(o, same.keyword_order(0, e)) for e, o in enumerate(orders))
    assert all(1 <= len(o) <= 5 and len(set(o.tolist())) == len(o) and set(o.tolist()) <= set(range(5))
               for o in orders)
    assert {len(o) for o in orders} == {1, 2, 3, 4, 5}
    assert len({tuple(o) for o in orders}) > 30  # differs across epochs
    other_seed = char_batches(rows, tmp_path, batch_size=3, seed=4, max_length=32)
    assert any(not np.array_equal(o, other_seed.keyword_order(0, e)) for e, o in enumerate(orders))
    assert b.keyword_order(1, 0) is None and b.keyword_order(2, 7).tolist() == [0]
    # In the batches: the keywords between the two SEPs are the epoch's subset, in its order.
    for step in range(4):
        windows, batch = b.row_windows(step), b.local_batch(step)
        for r, [(i, epoch, k)] in enumerate(windows[0]):
            if i == 0:
                a = 0
                seq = batch["input_ids"][a, r].tolist()
                kw = seq[seq.index(2) + 1:seq.index(2, seq.index(2) + 1)]
                assert kw == [ord(c) for c in " ".join(rows[0].keywords[j] for j in b.keyword_order(0, epoch))]
    off = char_batches(rows, tmp_path, batch_size=3, keyword_augment=False, max_length=32)
    assert off.keyword_order(0, 5) is None
    assert off.local_batch(0)["input_ids"][0, [w[0][0] for w in off.row_windows(0)[0]].index(0), :14].tolist() == \
        CHAR.format_example("T", rows[0].keywords, "x")[:14]


@pytest.mark.parametrize("packing", [False, True])
def test_global_batch_same_for_any_process_count_and_grad_accum(tmp_path, packing):
    rows = letter_rows(13)
    reference = char_batches(rows, tmp_path, packing=packing)
    for A, P in ((1, 2), (2, 1), (2, 4), (1, 8), (8, 1)):  # down to one row a process, a micro-batch
        parts = [char_batches(rows, tmp_path, grad_accum=A, process_count=P, process_index=p, packing=packing)
                 for p in range(P)]
        for step in (0, 1, 5, 9):  # batches straddle epochs
            local = [b.local_batch(step) for b in parts]
            assert sum(int((x["segment_ids"] > 0).sum()) for x in local) == reference.real_tokens(step)
            for key in ("input_ids", "labels", "loss_mask", "segment_ids", "positions"):
                assert local[0][key].shape == (A, 8 // A // P, 16)
                glob = np.concatenate([x[key] for x in local], axis=1).reshape(8, 16)
                np.testing.assert_array_equal(glob, reference.local_batch(step)[key][0])


def test_each_process_assembles_only_its_rows(tmp_path, monkeypatch):
    b = char_batches(letter_rows(13), tmp_path, grad_accum=2, process_count=4, process_index=3, max_length=64)
    calls = []
    sequence = type(b.corpus).sequence
    monkeypatch.setattr(type(b.corpus), "sequence",
                        lambda self, r, *a, **k: calls.append(r) or sequence(self, r, *a, **k))
    b.local_batch(2)
    everyone = char_batches(letter_rows(13), tmp_path, grad_accum=2, max_length=64).row_windows(2)
    assert calls == [everyone[0][3][0][0], everyone[1][3][0][0]]  # row 3 of each micro-batch of 4


def test_local_batch_is_a_pure_function_of_step(tmp_path):
    rows = letter_rows(11)
    walked = char_batches(rows, tmp_path, grad_accum=2)
    history = [walked.local_batch(s) for s in range(12)]
    fresh = char_batches(rows, tmp_path, grad_accum=2)
    for s in (9, 3, 11, 0):
        for key, value in fresh.local_batch(s).items():
            np.testing.assert_array_equal(value, history[s][key])


def first_examples(b: Batches, step: int) -> list[int]:
    """The example of each (unpacked, one-window) row of micro-batch 0; -1 for a padding row."""
    return [w[0][0] if w else -1 for w in b.row_windows(step)[0]]


def test_epochs_straddle_batches(tmp_path):
    b = char_batches(letter_rows(14), tmp_path, batch_size=4, indices=range(2, 12), max_length=64)
    stream = np.concatenate([first_examples(b, s) for s in range(10)])
    epochs = stream.reshape(4, 10)
    assert all(sorted(e) == list(range(2, 12)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    assert b.steps_per_epoch == 2.5 and b.epoch(5) == 2.0 and b.num_batches == 3
    in_order = char_batches(letter_rows(14), tmp_path, batch_size=4, indices=[5, 3, 9], shuffle=False, max_length=64)
    assert np.concatenate([first_examples(in_order, s) for s in range(3)]).tolist() == [5, 3, 9] * 4


def test_no_repeat_pads_the_last_batch(tmp_path):
    b = char_batches(letter_rows(14), tmp_path, batch_size=4, indices=range(6), shuffle=False, repeat=False,
                     process_count=2, process_index=1, max_length=64)
    assert b.num_batches == 2 and first_examples(b, 1) == [-1, -1]
    assert b.local_batch(1)["loss_mask"].sum() == 0 and (b.local_batch(1)["input_ids"] == 0).all()
    with pytest.raises(IndexError):
        b.local_batch(2)


def test_loss_mask_all_and_text_hand_checked(tmp_path):
    rows = [Row("T", ("k",), "xy")]  # [BOS] T [SEP] k [SEP] x y [EOS] = 1 84 2 107 2 120 121 3
    got = {on: char_batches(rows, tmp_path, batch_size=1, max_length=10, loss_on=on).local_batch(0)
           for on in ("all", "text")}
    for batch in got.values():
        assert batch["input_ids"][0, 0].tolist() == [1, 84, 2, 107, 2, 120, 121, 0, 0, 0]
        assert batch["labels"][0, 0].tolist() == [84, 2, 107, 2, 120, 121, 3, 0, 0, 0]
        assert batch["input_ids"].dtype == batch["labels"].dtype == np.int32
        assert batch["loss_mask"].dtype == np.float32
    assert got["all"]["loss_mask"][0, 0].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert got["text"]["loss_mask"][0, 0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0]  # x from the SEP, y, EOS


def test_long_rows_continue_and_only_long_titles_are_cut(tmp_path):
    """Changed from truncation: a long text continues in a second window (row) with the prompt repeated as
    context; only a title over half the window, which leaves no room for that, is still cut."""
    rows = [Row("T", ("k",), "xyzwvu"), Row("A long title", ("kw",), "long text " * 50)]
    b = char_batches(rows, tmp_path, batch_size=4, max_length=10, shuffle=False, loss_on="text")
    batch = {k: v[0] for k, v in b.local_batch(0).items()}
    text = [ord(c) for c in "xyzwvu"]
    assert b.row_windows(0)[0] == [[(0, 0, 0)], [(0, 0, 1)], [(1, 0, 0)], [(0, 1, 0)]]  # an epoch of three rows
    assert batch["input_ids"][0].tolist() == [1, 84, 2, 107, 2, *text[:5]]
    assert batch["labels"][0].tolist() == [84, 2, 107, 2, *text]
    assert batch["loss_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert batch["input_ids"][1].tolist() == [1, 84, 2, 107, 2, text[5], 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [84, 2, 107, 2, text[5], 3, 0, 0, 0, 0]  # the prompt's labels: context
    assert batch["loss_mask"][1].tolist() == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]  # EOS only: u was trained before
    assert batch["labels"][2].tolist() == [ord(c) for c in "A long tit"]  # not even the prompt fits: cut
    assert batch["loss_mask"][2].sum() == 0
    over = prompt_overflow(b)
    assert over["truncated"] == 1 and over["no_text"] == 1


def test_long_keyword_lists_are_cut_to_half_the_window(tmp_path):
    """A prompt longer than max_length // 2 drops its last keywords (after augmentation's shuffle); the
    title stays whole; the rest of the window is text, and continuation windows repeat the same prompt."""
    keywords = tuple(f"w{i}" for i in range(12))  # 12 keywords: 37 characters joined
    rows = [Row("Title", keywords, "t" * 100), Row("T", ("ab",), "u" * 100)]
    for augment in (False, True):
        b = char_batches(rows, tmp_path, batch_size=2, max_length=40, shuffle=False, loss_on="text",
                         keyword_augment=augment)
        for step in range(6):
            batch = b.local_batch(step)
            for r, [(i, epoch, k)] in enumerate(b.row_windows(step)[0]):
                seq = batch["input_ids"][0, r].tolist()
                first_text = int(batch["loss_mask"][0, r].argmax())
                prompt = seq[:first_text + (k == 0)]  # a continuation's first text input was a label before
                assert len(prompt) <= 20 and prompt[0] == 1 and prompt[-1] == 2
                order = b.keyword_order(i, epoch)
                chosen = [rows[i].keywords[j] for j in (range(len(rows[i].keywords)) if order is None else order)]
                title = rows[i].title
                kept = [w for n, w in enumerate(chosen) if len(title) + 3 + len(" ".join(chosen[:n + 1])) <= 20]
                assert prompt == CHAR.format_prompt(title, kept), (augment, step, r)
                text = [t for t in seq[len(prompt):] if t]
                assert text == [ord(rows[i].text[0])] * len(text) and (k > 0 or len(prompt) + len(text) == 40)
    over = prompt_overflow(b)
    assert over == {"cut": 1, "no_text": 0, "truncated": 0, "longest": 5 + 37 + 3}
    assert CHAR.format_prompt("Title", keywords, max_tokens=20) == CHAR.format_prompt("Title", keywords[:4])
    assert prompt_limit(40) == 20


def test_unigram_entropy_hand_checked_and_equal_to_batches(tmp_path, corpora, tokenizers, rows):
    one_row = {on: char_batches([Row("T", ("k",), "xy")], tmp_path, batch_size=1, max_length=10, loss_on=on)
               for on in ("all", "text")}
    assert unigram_entropy(one_row["all"]) == pytest.approx(
        -(2 / 7 * math.log(2 / 7) + 5 / 7 * math.log(1 / 7)))  # labels T SEP k SEP x y EOS
    assert unigram_entropy(one_row["text"]) == pytest.approx(math.log(3))
    tok, corpus = tokenizers["bpe"], corpora["bpe"]
    ids = dict(bos_id=tok.bos_id, sep_id=tok.sep_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    split = np.arange(3, len(rows))
    for loss_on, packing in (("all", False), ("text", True)):  # packing trains the same labels
        for max_length in (12, 48, 512):  # titles cut, windows and keywords cut, neither
            b = Batches(corpus, split, **ids, max_length=max_length, batch_size=8, shuffle=False,
                        keyword_augment=False, loss_on=loss_on, repeat=False, packing=packing)
            batches = [b.local_batch(s) for s in range(b.num_batches)]
            labels = np.concatenate([x["labels"][x["loss_mask"] > 0] for x in batches])
            p = np.bincount(labels)[np.bincount(labels) > 0] / len(labels)
            assert unigram_entropy(b) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
            assert (prompt_overflow(b)["cut"] > 0) == (max_length < 512)  # keywords cut
            assert (prompt_overflow(b)["truncated"] > 0) == (max_length < 512)  # titles
    with pytest.raises(GPT2JaxError, match="no label counts toward the loss"):
        unigram_entropy(Batches(corpus, [0], **ids, loss_on="text", max_length=3, batch_size=1))


def test_unigram_entropy_of_a_large_corpus_is_a_sample(tmp_path, corpora, tokenizers, rows, monkeypatch):
    """Past _UNIGRAM_TOKENS text tokens, a seeded sample of rows holding about that many: the exact entropy of
    those rows (checked against counting them in full), close to the whole split's, the same every call."""
    from gpt2_jax.data import split_stats

    tok, corpus = tokenizers["bpe"], corpora["bpe"]

    def entropy(split) -> float:
        return unigram_entropy(Batches(corpus, split, bos_id=tok.bos_id, sep_id=tok.sep_id, eos_id=tok.eos_id,
                                       pad_id=tok.pad_id, loss_on="text", max_length=512, batch_size=1))

    split = np.arange(len(rows) - 3)
    exact = entropy(split)
    text_len = np.diff(corpus.piece_off)[2::3]
    monkeypatch.setattr(split_stats, "_UNIGRAM_TOKENS", int(text_len[split].sum()) // 2)
    sampled = entropy(split)
    assert sampled == entropy(split) != exact
    assert abs(sampled - exact) < 0.15 * exact
    order = np.random.default_rng([split_stats._UNIGRAM]).permutation(split)
    kept = order[:int(np.searchsorted(np.cumsum(text_len[order]), split_stats._UNIGRAM_TOKENS))]
    assert 0.3 < text_len[kept].sum() / text_len[split].sum() <= 0.5
    monkeypatch.setattr(split_stats, "_UNIGRAM_TOKENS", 1 << 40)
    assert sampled == entropy(np.sort(kept))


def test_split_indices():
    train, val = split_indices(100, 0.1, seed=0)
    assert len(val) == 10 and sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert [a.tolist() for a in split_indices(100, 0.1, seed=0)] == [train.tolist(), val.tolist()]
    assert split_indices(100, 0.1, seed=1)[1].tolist() != val.tolist()
    assert [len(a) for a in split_indices(2, 0.001, 0)] == [1, 1]  # at least one on each side
    assert [len(a) for a in split_indices(2, 0.99, 0)] == [1, 1]
    assert [len(a) for a in split_indices(1, 0.5, 0)] == [1, 0]
    assert [len(a) for a in split_indices(5, 0.0, 0)] == [5, 0]
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(GPT2JaxError, match=r"val_fraction must be in \[0, 1\)"):
            split_indices(10, bad, 0)
    with pytest.raises(GPT2JaxError, match="cannot split an empty corpus"):
        split_indices(0, 0.1, 0)


@pytest.mark.parametrize("kw,message", [
    (dict(batch_size=8, grad_accum=3), r"batch_size=8 is not divisible by grad_accum=3"),
    (dict(batch_size=8, grad_accum=2, process_count=3), r"micro-batch of 4 rows .* over 3 processes"),
    (dict(process_count=2, process_index=2), r"process_index=2 is not in \[0, process_count=2\)"),
    (dict(batch_size=0), r"batch_size=0 and grad_accum=1 must be at least 1"),
    (dict(loss_on="txt"), r"unknown loss_on 'txt' \(did you mean \"text\"\?\); known: all, text"),
    (dict(max_length=1), r"max_length must be at least 2"),
    (dict(indices=[]), r"the split has no examples"),
    (dict(indices=[0, 7]), r"example id 7 is out of range for a corpus of 3 rows"),
])
def test_batches_errors(tmp_path, kw, message):
    with pytest.raises(GPT2JaxError, match=message):
        char_batches(letter_rows(3), tmp_path, **kw)


def test_tokenizing_no_rows_is_an_error(tmp_path):
    with pytest.raises(GPT2JaxError, match="no rows to tokenize"):
        tokenize_corpus([], CHAR, tmp_path)


class CrossSpaceTokenizer(CharTokenizer):
    """Merges "o o" into one id across the space: keywords then do not compose one by one."""

    kind = "cross-space"

    def encode_batch(self, texts):
        return [[999 if c == "\0" else ord(c) for c in t.replace("o o", "\0")] for t in texts]


def test_keywords_that_do_not_compose_are_counted_and_warned(tmp_path, caplog):
    tok = CrossSpaceTokenizer()
    with caplog.at_level(logging.WARNING, logger="gpt2_jax.data.token_writer"):
        corpus = tokenize_corpus([Row("T", ("o", "o"), "x"), Row("U", ("o", "p"), "y")], tok, tmp_path)
    assert corpus.keyword_mismatches == 1 and "1 of 2 rows' keywords tokenize differently" in caplog.text
    # Unaugmented examples use the joined ids, so they stay exact.
    assert corpus.sequence(0, **IDS)[0].tolist() == tok.format_example("T", ("o", "o"), "x")
    assert corpus.sequence(0, [0, 1], **IDS)[0].tolist() != tok.format_example("T", ("o", "o"), "x")
