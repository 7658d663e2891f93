"""The batches of training data from a tokenized corpus (token_cache.py): keyword augmentation, the prompt
limit, shuffling, per-process slices, loss masks; the train/validation split and the unigram baseline.

Shape letters: A micro-batches per step (grad_accum), M examples of a micro-batch held by this
process, T tokens per sequence (max_length).
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from gpt2_jax.errors import GPT2JaxError, suggest
from gpt2_jax.token_cache import TokenizedCorpus, flat_ranges
from gpt2_jax.train_config import LOSS_ON

log = logging.getLogger(__name__)

# The first word of every seed sequence, so that the streams of randomness never coincide.
_SHUFFLE, _AUGMENT, _SPLIT = 0, 1, 2


class Batches:
    """The batches of one split, each a pure function of (seed, step): resuming needs only the step.

    The examples form an endless stream, epoch after epoch (epoch e: ``indices`` permuted by (seed, e),
    or in the given order without ``shuffle``); step s's global batch is stream examples
    ``s * batch_size`` to ``(s + 1) * batch_size - 1``, so batches may straddle epochs. It is split into
    ``grad_accum`` micro-batches of ``m`` consecutive examples, and process p holds rows
    ``p * m / P`` to ``(p + 1) * m / P - 1`` of each; it assembles only those. With ``repeat=False``
    the stream is one epoch, and the last batch is filled up with padding rows (no loss).
    """

    def __init__(self, corpus: TokenizedCorpus, indices: Sequence[int], *, bos_id: int, sep_id: int,
                 eos_id: int, pad_id: int, max_length: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 shuffle: bool = True, keyword_augment: bool = True, loss_on: str = "all", process_index: int = 0,
                 process_count: int = 1, repeat: bool = True):
        _check_loss_on(loss_on)
        _check_max_length(max_length)
        if batch_size < 1 or grad_accum < 1:
            raise GPT2JaxError(f"batch_size={batch_size} and grad_accum={grad_accum} must be at least 1")
        if batch_size % grad_accum:
            raise GPT2JaxError(f"batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
        micro = batch_size // grad_accum
        if not 0 <= process_index < process_count:
            raise GPT2JaxError(f"process_index={process_index} is not in [0, process_count={process_count})")
        if micro % process_count:
            raise GPT2JaxError(f"a micro-batch of {micro} examples (batch_size={batch_size} / grad_accum="
                               f"{grad_accum}) cannot be split evenly over {process_count} processes")
        self.corpus = corpus
        self.indices = _check_indices(indices, len(corpus))
        self.bos_id, self.sep_id, self.eos_id, self.pad_id = bos_id, sep_id, eos_id, pad_id
        self.max_length, self.batch_size, self.grad_accum = max_length, batch_size, grad_accum
        self.micro_batch, self.local_rows = micro, micro // process_count  # m, and M = m / P
        self.seed = int(seed) % 2**64  # seed sequences take non-negative words
        self.shuffle, self.keyword_augment, self.loss_on, self.repeat = shuffle, keyword_augment, loss_on, repeat
        self.process_index, self.process_count = process_index, process_count
        self._orders: dict[int, np.ndarray] = {}  # a memo of order(epoch), the only thing kept
        if keyword_augment and corpus.keyword_mismatches:
            log.warning("keyword augmentation: %d rows' keywords tokenize differently one by one than joined",
                        corpus.keyword_mismatches)

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    @property
    def steps_per_epoch(self) -> float:
        return self.num_examples / self.batch_size

    @property
    def num_batches(self) -> int:
        """Batches that cover one epoch (the last one partly, past the end)."""
        return -(-self.num_examples // self.batch_size)

    def examples_seen(self, step: int) -> int:
        """Examples in the batches before ``step`` (all processes together)."""
        return step * self.batch_size

    def epoch(self, step: int) -> float:
        """Epochs completed before ``step``, fractional."""
        return self.examples_seen(step) / self.num_examples

    def order(self, epoch: int) -> np.ndarray:
        """The example ids of ``epoch`` in the order they are trained on."""
        if not self.shuffle:
            return self.indices
        if epoch not in self._orders:
            if len(self._orders) >= 4:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = np.random.default_rng([_SHUFFLE, self.seed, epoch]).permutation(self.indices)
        return self._orders[epoch]

    def keyword_order(self, example_id: int, epoch: int) -> np.ndarray | None:
        """The positions of the example's keywords used in ``epoch``: a random subset of random size
        (at least one), shuffled; ``None`` (all, in order) without augmentation."""
        n = self.corpus.num_keywords(example_id)
        if not self.keyword_augment or n == 0:
            return None
        rng = np.random.default_rng([_AUGMENT, self.seed, epoch, int(example_id)])
        return rng.permutation(n)[:rng.integers(1, n + 1)]

    def _positions(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's (example ids, epochs), each [A, M]; id -1 past the end when not repeating."""
        if step < 0 or (not self.repeat and step >= self.num_batches):
            raise IndexError(f"step {step} is out of range" + ("" if self.repeat else f" [0, {self.num_batches})"))
        A, M, m = self.grad_accum, self.local_rows, self.micro_batch
        q_AM = (step * self.batch_size + np.arange(A)[:, None] * m + self.process_index * M
                + np.arange(M)[None, :])
        epoch_AM, j_AM = np.divmod(q_AM, self.num_examples)
        ids_AM = np.empty_like(q_AM)
        for e in np.unique(epoch_AM):
            at = epoch_AM == e
            ids_AM[at] = self.order(int(e))[j_AM[at]]
        if not self.repeat:
            ids_AM[epoch_AM > 0] = -1
        return ids_AM, epoch_AM

    def example_ids(self, step: int) -> np.ndarray:
        """The example ids of this process's rows of batch ``step``: [A, M], -1 for padding rows."""
        return self._positions(step)[0]

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of batch ``step``: ``input_ids``, ``labels`` (int32) and ``loss_mask``
        (float32, 1 where the label counts), each [A, M, T]."""
        ids_AM, epoch_AM = self._positions(step)
        shape = (*ids_AM.shape, self.max_length)
        input_AMT = np.full(shape, self.pad_id, np.int32)
        labels_AMT = np.full(shape, self.pad_id, np.int32)
        mask_AMT = np.zeros(shape, np.float32)
        for (a, r), i in np.ndenumerate(ids_AM):
            if i < 0:
                continue
            seq, text_start = self.corpus.sequence(
                i, self.keyword_order(i, int(epoch_AM[a, r])), bos_id=self.bos_id, sep_id=self.sep_id,
                eos_id=self.eos_id, limit=self.max_length + 1, prompt_limit=prompt_limit(self.max_length))
            n = len(seq) - 1
            input_AMT[a, r, :n] = seq[:-1]
            labels_AMT[a, r, :n] = seq[1:]
            # Label t is token t + 1: under "text" the first one counted is the first text token.
            mask_AMT[a, r, (0 if self.loss_on == "all" else text_start - 1):n] = 1.0
        return {"input_ids": input_AMT, "labels": labels_AMT, "loss_mask": mask_AMT}


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


def unigram_entropy(corpus: TokenizedCorpus, indices: Sequence[int], *, bos_id: int, sep_id: int, eos_id: int,
                    loss_on: str, max_length: int) -> float:
    """Entropy in nats of the counted labels' token frequencies over the (unaugmented) examples.

    The loss of a model that knows only how often each token occurs: a baseline for the training loss.
    Counted exactly as ``Batches`` counts them (truncation, ``loss_on``), without assembling sequences.
    ``bos_id`` is never a label; it is taken so that the call reads like ``Batches``'.
    """
    _check_loss_on(loss_on)
    _check_max_length(max_length)
    indices = _check_indices(indices, len(corpus))
    counts = np.zeros(max(sep_id, eos_id) + 1, np.int64)
    limit = max_length + 1
    for a in range(0, len(indices), 1 << 16):
        p = 3 * indices[a:a + (1 << 16)]
        t0, k0, x0, x1 = (corpus.piece_off[p + i].astype(np.int64) for i in range(4))
        lt, lk, lx = k0 - t0, x0 - k0, x1 - x0
        lk = _kept_keyword_tokens(corpus, indices[a:a + (1 << 16)], lt, lk, prompt_limit(max_length))
        S = lt + lk + lx + 4  # BOS title SEP keywords SEP text EOS
        s = np.minimum(S, limit)  # tokens kept; labels are positions 1 .. s-1
        first = np.ones_like(s) if loss_on == "all" else lt + lk + 3  # the first counted position
        for pos, start, length in ((1, t0, lt), (lt + 2, k0, lk), (lt + lk + 3, x0, lx)):
            lo, hi = np.maximum(pos, first), np.minimum(pos + length, s)
            ids = corpus.tokens[flat_ranges(start + lo - pos, np.maximum(hi - lo, 0))]
            c = np.bincount(ids)
            if len(c) > len(counts):
                counts = np.pad(counts, (0, len(c) - len(counts)))
            counts[:len(c)] += c
        for sep_pos in (lt + 1, lt + lk + 2):
            counts[sep_id] += np.count_nonzero((first <= sep_pos) & (sep_pos < s))
        counts[eos_id] += np.count_nonzero(S <= limit)
    total = counts.sum()
    if total == 0:
        raise GPT2JaxError(f"no label counts toward the loss: with loss_on={loss_on!r} and max_length={max_length} "
                           f"the titles and keywords leave no room for text")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def prompt_limit(max_length: int) -> int:
    """The longest ``[BOS] title [SEP] keywords [SEP]`` trained: half the window, so that a long keyword
    list (the seed's news rows carry about 30 words) leaves room for text. Keywords past it are dropped,
    after augmentation has chosen and shuffled them; titles are never cut."""
    return max_length // 2


def prompt_overflow(corpus: TokenizedCorpus, indices: Sequence[int], max_length: int) -> dict[str, int]:
    """How `prompt_limit` touches the rows `indices`: {"cut": rows whose keyword lists are cut,
    "no_text": rows whose title alone leaves no room for text, "longest": the longest full prompt}."""
    p = 3 * _check_indices(indices, len(corpus))
    lt = corpus.piece_off[p + 1] - corpus.piece_off[p]
    prompt = corpus.piece_off[p + 2] - corpus.piece_off[p] + 3  # BOS title SEP keywords SEP
    return {"cut": int(np.count_nonzero(prompt > prompt_limit(max_length))),
            "no_text": int(np.count_nonzero(lt + 3 >= max_length)), "longest": int(prompt.max())}


def _kept_keyword_tokens(corpus: TokenizedCorpus, rows: np.ndarray, lt: np.ndarray, lk: np.ndarray,
                         limit: int) -> np.ndarray:
    """The keyword tokens each row keeps in order under `prompt_limit` (vectorised `sequence`): `lk` where
    all fit, else the tokens of the longest prefix of its keywords that fits after the title."""
    counts = (corpus.row_kw_off[rows + 1] - corpus.row_kw_off[rows]).astype(np.int64)
    starts = np.cumsum(counts) - counts
    at = np.arange(counts.sum()) - np.repeat(starts, counts)  # each keyword's position in its row
    ids = corpus.row_kw[flat_ranges(corpus.row_kw_off[rows].astype(np.int64), counts)].astype(np.int64)
    pieces = 2 * ids + (at > 0)
    cum = np.cumsum(corpus.kw_off[pieces + 1] - corpus.kw_off[pieces])
    row = np.repeat(np.arange(len(rows)), counts)
    within = cum - np.concatenate([[0], cum])[np.repeat(starts, counts)]  # tokens up to and with this keyword
    kept = np.zeros(len(rows), np.int64)
    fits = lt[row] + 3 + within <= limit
    np.maximum.at(kept, row[fits], within[fits])
    return np.where(lt + lk + 3 <= limit, lk, kept)


def _check_loss_on(loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise GPT2JaxError(f"unknown loss_on {loss_on!r}{suggest(str(loss_on), LOSS_ON)}; known: {', '.join(LOSS_ON)}")


def _check_max_length(max_length: int) -> None:
    if max_length < 2:
        raise GPT2JaxError(f"max_length must be at least 2 (one input and one label), got {max_length}")


def _check_indices(indices: Sequence[int], n: int) -> np.ndarray:
    idx = np.array(indices, np.int64).reshape(-1)  # a copy: the caller may change theirs
    if not len(idx):
        raise GPT2JaxError("the split has no examples (check val_fraction and the corpus size)")
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise GPT2JaxError(f"example id {bad[0]} is out of range for a corpus of {n} rows")
    return idx
