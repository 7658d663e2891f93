"""Tests for gpt2_jax/data/batches.py's windows and packing: segment ids, restarting positions, labels that never
cross examples, every label trained exactly once, loss_on per example, a pure function of the step, and
packed losses equal to each example alone (our model unpacked, and transformers' GPT2LMHeadModel)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_hf_model
from gpt2_jax.data.rows import Row
from gpt2_jax.data.batches import Batches
from gpt2_jax.data.split_stats import unigram_entropy
from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.data.token_writer import tokenize_corpus
from test_batches import CHAR, IDS, CrossSpaceTokenizer


class SmallTokenizer(CHAR.__class__):
    """One id per character below 97 (the tiny model's vocabulary): letters, digits, space, the rest one id."""

    kind = "small-char"
    base_vocab_size = vocab_size = 97

    def encode_batch(self, texts):
        def one(c):
            if "a" <= c <= "z":
                return 10 + ord(c) - ord("a")
            if "A" <= c <= "Z":
                return 40 + ord(c) - ord("A")
            if "0" <= c <= "9":
                return 70 + ord(c) - ord("0")
            return 5 if c == " " else 6
        return [[one(c) for c in t] for t in texts]


def mixed_rows(n: int, seed: int = 0) -> list[Row]:
    """Title/keyword rows and text-only rows, short and (every fifth) longer than a 32-token window."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=int(rng.integers(1, 4 if i % 5 else 25))))
        if i % 3 == 2:
            rows.append(Row("", (), text))
        else:
            rows.append(Row(f"T{i}", tuple(rng.choice(words, size=int(rng.integers(0, 5)))), text))
    return rows


def example_sequence(tok, row: Row) -> list[int]:
    """S as data.batches defines it: [EOS] text [EOS] for a text-only row, else format_example."""
    if not row.title and not row.keywords:
        return [tok.eos_id, *tok.encode(row.text), tok.eos_id]
    return tok.format_example(row.title, row.keywords, row.text)


def make(rows, tok, tmp_path, **kw) -> Batches:
    args = dict(bos_id=tok.bos_id, sep_id=tok.sep_id, eos_id=tok.eos_id, pad_id=tok.pad_id, max_length=16,
                batch_size=4, seed=1, packing=True)
    args.update(kw)
    indices = args.pop("indices", range(len(rows)))
    return Batches(tokenize_corpus(rows, tok, tmp_path / "cache"), indices, **args)


def epoch_labels(b: Batches, steps) -> dict:
    """{(example, epoch): [(window, [counted labels], [inputs of the window])]} over `steps`, all rows of micro-batch 0."""
    got: dict = {}
    for s in steps:
        batch = {k: v[0] for k, v in b.local_batch(s).items()}
        for r, windows in enumerate(b.row_windows(s)[0]):
            seg = batch["segment_ids"][r]
            assert seg.tolist() == sorted(seg[seg > 0].tolist()) + [0] * int((seg == 0).sum())  # 1, 1, 2, …, 0, 0
            assert seg.max(initial=0) == len(windows)
            for n, (i, e, k) in enumerate(windows, 1):
                at = seg == n
                assert batch["positions"][r, at].tolist() == list(range(int(at.sum())))  # restart at 0
                mask = batch["loss_mask"][r, at] > 0
                got.setdefault((i, e), []).append((k, batch["labels"][r, at][mask].tolist(),
                                                   batch["input_ids"][r, at].tolist()))
            pad = seg == 0
            assert (batch["loss_mask"][r, pad] == 0).all() and (batch["input_ids"][r, pad] == b.pad_id).all()
            assert (batch["positions"][r, pad] == 0).all()
    return got


def test_packed_rows_hand_checked(tmp_path):
    # [BOS] T [SEP] k [SEP] x y [EOS]: 7 labels; [EOS] a b [EOS]: 3; [BOS] U [SEP] [SEP] z [EOS]: 5.
    rows = [Row("T", ("k",), "xy"), Row("", (), "ab"), Row("U", (), "z")]
    b = make(rows, CHAR, tmp_path, batch_size=1, shuffle=False, keyword_augment=False, loss_on="text")
    assert b.num_rows(0) == 1 and b.row_windows(0) == [[[(0, 0, 0), (1, 0, 0), (2, 0, 0)]]]
    batch = {k: v[0, 0].tolist() for k, v in b.local_batch(0).items()}
    T, k, x, y, a, bb, U, z = map(ord, "TkxyabUz")
    assert batch["input_ids"] == [1, T, 2, k, 2, x, y, 3, a, bb, 1, U, 2, 2, z, 0]
    assert batch["labels"] == [T, 2, k, 2, x, y, 3, a, bb, 3, U, 2, 2, z, 3, 0]
    assert batch["segment_ids"] == [1] * 7 + [2] * 3 + [3] * 5 + [0]
    assert batch["positions"] == [*range(7), *range(3), *range(5), 0]
    assert batch["loss_mask"] == [0, 0, 0, 0, 1, 1, 1] + [1, 1, 1] + [0, 0, 0, 1, 1] + [0]
    assert b.real_tokens(0) == 15 and b.padding_share() == pytest.approx(1 / 16)


@pytest.mark.parametrize("loss_on,augment", [("all", False), ("text", True)])
def test_every_label_once_per_epoch_and_never_across_examples(tmp_path, loss_on, augment):
    rows = mixed_rows(40)
    b = make(rows, CHAR, tmp_path, batch_size=4, max_length=32, loss_on=loss_on, keyword_augment=augment)
    steps = range(int(np.ceil(b.num_rows(0) / 4)) + 2 * int(np.ceil(b.num_rows(1) / 4)))
    got = epoch_labels(b, steps)
    assert b.packing and b.padding_share(0) < 0.1 < Batches(b.corpus, range(40), **IDS, pad_id=0, max_length=32,
                                                            batch_size=4, packing=False).padding_share(0)
    for epoch in (0, 1):
        assert {i for i, e in got if e == epoch} == set(range(40))
    long_ones = 0
    for (i, e), windows in got.items():
        order = b.keyword_order(i, e)
        kws = rows[i].keywords if order is None else [rows[i].keywords[j] for j in order]
        S = example_sequence(CHAR, rows[i])
        if S[0] != 3:  # the keywords chosen by augmentation, cut to half the window as format_prompt cuts them
            S = CHAR.format_prompt(rows[i].title, kws, max_tokens=16) + CHAR.encode(rows[i].text) + [3]
        P = 1 if S[0] == 3 else S.index(2, S.index(2) + 1) + 1
        windows.sort()
        assert [k for k, _, _ in windows] == list(range(len(windows)))
        long_ones += len(windows) > 1
        labels = [t for _, counted, _ in windows for t in counted]
        assert labels == S[1 if loss_on == "all" else P:], (i, e)  # each label once, in order, none foreign
        for k, _, inputs in windows[1:]:  # a continuation repeats the prompt (not a text-only row's EOS)
            assert inputs[:P] == S[:P] if S[0] != 3 else inputs[0] != 3 or k == 0
    assert long_ones >= 5


def test_keywords_that_do_not_compose_keep_the_plan_exact(tmp_path):
    """The plan's vectorised prompt lengths equal TokenizedCorpus.sequence's (a mismatch would raise)."""
    tok = CrossSpaceTokenizer()
    rows = [Row("T", ("o", "o", "oo", "o o"), "x" * 40), Row("U", ("o", "p") * 4, "y" * 9), Row("", (), "z" * 50)]
    for augment in (False, True):
        b = make(rows, tok, tmp_path, batch_size=2, max_length=16, keyword_augment=augment)
        for s in range(12):
            b.local_batch(s)
    b = make(rows, tok, tmp_path, batch_size=1, max_length=16, keyword_augment=False, shuffle=False, repeat=False,
             loss_on="text")
    labels = np.concatenate([x["labels"][x["loss_mask"] > 0] for x in map(b.local_batch, range(b.num_batches))])
    p = np.bincount(labels)[np.bincount(labels) > 0] / len(labels)
    assert unigram_entropy(b) == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)


def test_no_repeat_covers_each_example_once_and_the_stream_is_pure(tmp_path):
    rows = mixed_rows(30, seed=2)
    b = make(rows, CHAR, tmp_path, batch_size=4, max_length=32, shuffle=False, repeat=False, grad_accum=2,
             process_count=2, process_index=1)
    everyone = make(rows, CHAR, tmp_path, batch_size=4, max_length=32, shuffle=False, repeat=False)
    seen = [w for s in range(everyone.num_batches) for row in everyone.row_windows(s)[0] for w in row]
    assert sorted({i for i, _, k in seen if k == 0}) == list(range(30)) and len(seen) == len(set(seen))
    assert b.num_batches == everyone.num_batches
    with pytest.raises(IndexError):
        b.local_batch(b.num_batches)
    walked = make(rows, CHAR, tmp_path, batch_size=4, max_length=32, grad_accum=2)
    history = [walked.local_batch(s) for s in range(40)]  # several epochs
    assert len(walked._plans) <= 3 and len(walked._orders) <= 3  # the memos stay bounded
    fresh = make(rows, CHAR, tmp_path, batch_size=4, max_length=32, grad_accum=2)
    for s in (37, 3, 21, 0):
        for key, value in fresh.local_batch(s).items():
            np.testing.assert_array_equal(value, history[s][key])
    assert fresh.epoch(37) > 2


def test_packed_losses_equal_each_example_alone_and_transformers(tmp_path):
    tok = SmallTokenizer()
    hf = make_hf_model(n_positions=48)
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(str(tmp_path / "hf"))
    rows = mixed_rows(12, seed=3)
    kw = dict(max_length=32, batch_size=4, shuffle=False, keyword_augment=False, loss_on="text", repeat=False)
    packed = make(rows, tok, tmp_path, **kw)
    alone = make(rows, tok, tmp_path, packing=False, **kw)

    def token_losses(batch, segments: bool):
        extra = dict(position_ids=batch["positions"], segment_ids=batch["segment_ids"]) if segments else {}
        h = model.hidden_states(batch["input_ids"], **extra)[0]
        logits = np.asarray(model.logits(h), np.float64)
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.take_along_axis(logits, batch["labels"][..., None], -1)[..., 0]
        return (lse - target) * batch["loss_mask"]

    want: dict = {}
    for s in range(alone.num_batches):
        batch = {k: v[0] for k, v in alone.local_batch(s).items()}
        loss = token_losses(batch, segments=False)
        for r, windows in enumerate(alone.row_windows(s)[0]):
            if not windows:
                continue
            n = int((batch["segment_ids"][r] > 0).sum())
            ids = torch.as_tensor(batch["input_ids"][r:r + 1, :n].astype(np.int64))
            with torch.no_grad():
                lp = torch.log_softmax(hf(ids).logits.double(), -1)[0].numpy()
            ref = -lp[np.arange(n), batch["labels"][r, :n]] * batch["loss_mask"][r, :n]
            np.testing.assert_allclose(loss[r, :n], ref, atol=2e-4)
            want[windows[0]] = loss[r].sum()
    got: dict = {}
    for s in range(packed.num_batches):
        batch = {k: v[0] for k, v in packed.local_batch(s).items()}
        loss = token_losses(batch, segments=True)
        for r, windows in enumerate(packed.row_windows(s)[0]):
            for n, w in enumerate(windows, 1):
                got[w] = loss[r][batch["segment_ids"][r] == n].sum()
    assert packed.num_batches < alone.num_batches and set(got) == set(want) and len(got) > len(rows)
    assert max(abs(got[w] - want[w]) for w in want) < 2e-3 and min(want.values()) > 0
    assert max(len(w) for s in range(packed.num_batches) for w in packed.row_windows(s)[0]) >= 2


def test_batches_pack_by_default_as_a_run_does(tmp_path):
    """Batches built without ``packing`` packs, as a run does with the config's default data.packing."""
    from gpt2_jax.train.config import load_train_config

    corpus = tokenize_corpus([Row("", (), "ab"), Row("", (), "cd")], CHAR, tmp_path)
    b = Batches(corpus, range(2), **IDS, pad_id=0, max_length=16, batch_size=1)
    assert b.packing == load_train_config(None, []).data.packing
    assert b.num_rows(0) == 1 and sorted(b.row_windows(0)[0][0]) == [(0, 0, 0), (1, 0, 0)]  # both in one row
