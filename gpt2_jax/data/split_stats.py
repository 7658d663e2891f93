"""A corpus split into training and validation ids, and what training on a split's batches sees, measured from
the token index alone (no batch assembled): the unigram baseline loss, how the prompt limit cuts its rows, and
its padding with and without packing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gpt2_jax.data.batches import Batches, example_lengths, prompt_limit
from gpt2_jax.data.token_store import TokenizedCorpus, flat_ranges
from gpt2_jax.errors import GPT2JaxError

# The first words of these seed sequences: after data.batches' (0: shuffle, 1: keyword augmentation), so that
# the streams of randomness never coincide.
_SPLIT, _UNIGRAM = 2, 3
_UNIGRAM_TOKENS = 1 << 24  # text tokens the unigram baseline counts at most (a seeded sample of rows past it)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(n)`` into sorted (train, validation) ids.

    With ``val_fraction > 0`` and at least two rows, each side gets at least one.
    """
    if n < 1:
        raise GPT2JaxError("cannot split an empty corpus")
    if not 0 <= val_fraction < 1:  # also rejects NaN
        raise GPT2JaxError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    perm = np.random.default_rng([_SPLIT, int(seed) % 2**64]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def unigram_entropy(batches: Batches) -> float:
    """Entropy in nats of the token frequencies of the labels ``batches`` trains, over its unaugmented examples.

    The loss of a model that knows only how often each token occurs: a baseline for the training loss.
    Counted exactly as ``Batches`` counts them (windows, ``loss_on``), without assembling sequences, over
    every example, or, when they hold more than ``_UNIGRAM_TOKENS`` tokens, over a seeded random sample of
    examples of about that many (a pod corpus's baseline in seconds, not minutes; the estimate's bias is
    about vocabulary / (2 × tokens) nats).
    """
    corpus, indices, sep_id, eos_id = batches.corpus, batches.indices, batches.sep_id, batches.eos_id
    text_len = np.diff(corpus.piece_off)[2::3]  # each row's text tokens: most of its labels
    if text_len[indices].sum() > _UNIGRAM_TOKENS:
        indices = np.random.default_rng([_UNIGRAM]).permutation(indices)
        indices = indices[:max(1, int(np.searchsorted(np.cumsum(text_len[indices]), _UNIGRAM_TOKENS)))]
    counts = np.zeros(max(sep_id, eos_id) + 1, np.int64)
    for a in range(0, len(indices), 1 << 16):
        ids = indices[a:a + (1 << 16)]
        P, first, end, text_only = _trained_label_range(corpus, ids, loss_on=batches.loss_on,
                                                        max_length=batches.max_length)
        p = 3 * ids
        t0, k0, x0, x1 = (corpus.piece_off[p + i].astype(np.int64) for i in range(4))
        lt, lx = k0 - t0, x1 - x0
        lk = np.where(text_only, 0, P - lt - 3)  # the keyword tokens kept
        stop = end + 1  # labels are positions first .. end of S
        for pos, start, length in ((1, t0, lt), (lt + 2, k0, lk), (P, x0, lx)):
            lo, hi = np.maximum(pos, first), np.minimum(pos + length, stop)
            got = corpus.tokens[flat_ranges(start + lo - pos, np.maximum(hi - lo, 0))]
            c = np.bincount(got)
            if len(c) > len(counts):
                counts = np.pad(counts, (0, len(c) - len(counts)))
            counts[:len(c)] += c
        for sep_pos in (lt + 1, P - 1):
            counts[sep_id] += np.count_nonzero(~text_only & (first <= sep_pos) & (sep_pos < stop))
        counts[eos_id] += np.count_nonzero(end == P + lx)
    total = counts.sum()
    if total == 0:
        raise GPT2JaxError(f"no label counts toward the loss: with loss_on={batches.loss_on!r} and max_length="
                           f"{batches.max_length} the titles and keywords leave no room for text")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def prompt_overflow(batches: Batches) -> dict[str, int]:
    """How `prompt_limit` touches the examples of ``batches`` (unaugmented): {"cut": rows whose keyword lists are
    cut, "no_text": rows whose title alone leaves no room for text, "truncated": rows whose text is cut (a title
    over half the window leaves no room to continue it), "longest": the longest full prompt}."""
    corpus, ids, max_length = batches.corpus, batches.indices, batches.max_length
    p = 3 * ids
    lt = corpus.piece_off[p + 1] - corpus.piece_off[p]
    prompt = corpus.piece_off[p + 2] - corpus.piece_off[p] + 3  # BOS title SEP keywords SEP
    P, _, end, text_only = _trained_label_range(corpus, ids, loss_on="all", max_length=max_length)
    full = P + (corpus.piece_off[p + 3] - corpus.piece_off[p + 2])
    return {"cut": int(np.count_nonzero(~text_only & (prompt > prompt_limit(max_length)))),
            "no_text": int(np.count_nonzero(~text_only & (lt + 3 >= max_length))),
            "truncated": int(np.count_nonzero(end < full)), "longest": int(prompt.max())}


def padding_stats(corpus: TokenizedCorpus, indices: Sequence[int], *, max_length: int, bos_id: int, sep_id: int,
                  eos_id: int, pad_id: int, seed: int = 0) -> list[dict]:
    """Padding share (padded slots ÷ all slots) and truncated share (labels never trained ÷ all labels) of
    epoch 0 for: "cut" (one row per example, cut to the window: ``Batches`` before windows), "windows"
    (``packing=False``) and "packed". Metadata only, vectorised but for the packing plan."""
    modes = {packing: Batches(corpus, indices, bos_id=bos_id, sep_id=sep_id, eos_id=eos_id, pad_id=pad_id,
                              max_length=max_length, batch_size=1, seed=seed, packing=packing)
             for packing in (False, True)}
    ids = modes[False].indices
    _, labels, _ = example_lengths(corpus, ids, max_length=max_length)
    _, _, end, _ = _trained_label_range(corpus, ids, loss_on="all", max_length=max_length)
    cut = np.minimum(labels, max_length)
    out = [{"mode": "cut", "rows": len(ids), "padding_share": 1 - cut.sum() / (len(ids) * max_length),
            "truncated_share": 1 - cut.sum() / labels.sum()}]
    for packing, b in modes.items():
        out.append({"mode": "packed" if packing else "windows", "rows": b.num_rows(0),
                    "padding_share": b.padding_share(0), "truncated_share": 1 - end.sum() / labels.sum()})
    return [{k: round(float(v), 4) if isinstance(v, float) else v for k, v in r.items()} for r in out]


def _trained_label_range(corpus: TokenizedCorpus, ids: np.ndarray, *, loss_on: str, max_length: int):
    """(P, first, end, text-only) per unaugmented example: `Batches` trains labels S[first..end] (inclusive)
    of each example across its windows; ``end`` falls short of S's last label only when a title over half
    the window leaves no room for continuation windows."""
    P, labels, text_only = example_lengths(corpus, ids, max_length=max_length)
    goes_on = text_only | (P <= prompt_limit(max_length))
    end = np.where(goes_on, labels, np.minimum(labels, max_length))
    first = np.ones_like(P) if loss_on == "all" else P
    return P, first, end, text_only
