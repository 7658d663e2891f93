"""The batches of training data from a tokenized corpus (``data.token_store``): keyword augmentation, the
prompt limit, windows for long texts, packing with segment ids, shuffling, per-process slices, loss masks.
The train/validation split and the measures of a split (its unigram baseline) are in ``data.split_stats``.

Shape letters: A micro-batches per step (grad_accum), M rows of a micro-batch held by this process, T
tokens per row (max_length), R rows, E examples, N windows.

An example's sequence S is ``[BOS] title [SEP] keywords [SEP] text [EOS]`` (keywords augmented and cut to
`prompt_limit`), or ``[EOS] text [EOS]`` for a text-only row (empty title, no keywords: plain LM, documents
separated by EOS). Its prompt is S[:P] (P = ``[BOS] title [SEP] keywords [SEP]``, or the leading EOS) and its
labels are S[1:]. A window trains labels S[c + 1 : c + m + 1] from inputs S[c : c + m], after a context prefix
S[:p]: the first window has c = p = 0; a long title/keywords row continues in windows that repeat its prompt
(p = P, as context: no loss) and carry on where the last labels stopped, and a long text-only row in plain
consecutive windows (p = 0). So no text is cut and every label is trained exactly once. Windows are packed
into rows (best fit) or, without packing, each is a row of its own.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from gpt2_jax.data.token_store import TokenizedCorpus
from gpt2_jax.errors import GPT2JaxError, suggest

LOSS_ON = ("all", "text")  # data.loss_on: which tokens get loss

log = logging.getLogger(__name__)

# The first word of each seed sequence, so that the streams of randomness never coincide (data.split_stats
# takes 2 and 3).
_SHUFFLE, _AUGMENT = 0, 1
_PLANS_KEPT = 3  # epochs whose packing plans stay in memory (a batch straddles at most two)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One epoch's windows and rows: metadata only (no tokens)."""

    example_N: np.ndarray  # example id of each window, in epoch order
    window_N: np.ndarray  # which window of its example (0 = the first)
    start_N: np.ndarray  # c: its first input's position in S
    body_N: np.ndarray  # m: inputs taken from S[c:], and labels S[c + 1 : c + m + 1]
    prefix_N: np.ndarray  # p: context tokens S[:p] before the body (0 or P)
    prompt_N: np.ndarray  # P of its example
    text_only_N: np.ndarray  # bool: S is [EOS] text [EOS]
    row_off: np.ndarray  # [R + 1]: row r holds windows row_windows[row_off[r]:row_off[r + 1]], in order
    row_windows: np.ndarray
    row_len_R: np.ndarray  # real (non-padding) tokens of each row

    @property
    def num_rows(self) -> int:
        return len(self.row_len_R)


class Batches:
    """The batches of one split, each a pure function of (seed, step): resuming needs only the step.

    Epoch e takes the examples ``indices`` permuted by (seed, e) (in the given order without ``shuffle``),
    cuts each into windows and packs those into rows of ``max_length`` tokens (its plan: a pure function of
    (seed, e), computed from lengths only). The rows form an endless stream, epoch after epoch; step s's
    global batch is stream rows ``s * batch_size`` to ``(s + 1) * batch_size - 1``, so batches may straddle
    epochs. It is split into ``grad_accum`` micro-batches of ``m`` consecutive rows, and process p holds rows
    ``p * m / P`` to ``(p + 1) * m / P - 1`` of each; it gathers tokens only for those. With ``repeat=False``
    the stream is one epoch, and the last batch is filled up with padding rows (no loss).
    """

    def __init__(self, corpus: TokenizedCorpus, indices: Sequence[int], *, bos_id: int, sep_id: int,
                 eos_id: int, pad_id: int, max_length: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 shuffle: bool = True, keyword_augment: bool = True, loss_on: str = "all", process_index: int = 0,
                 process_count: int = 1, repeat: bool = True, packing: bool = True):
        if loss_on not in LOSS_ON:
            raise GPT2JaxError(f"unknown loss_on {loss_on!r}{suggest(str(loss_on), LOSS_ON)}; known: "
                               f"{', '.join(LOSS_ON)}")
        if max_length < 2:
            raise GPT2JaxError(f"max_length must be at least 2 (one input and one label), got {max_length}")
        if batch_size < 1 or grad_accum < 1:
            raise GPT2JaxError(f"batch_size={batch_size} and grad_accum={grad_accum} must be at least 1")
        if batch_size % grad_accum:
            raise GPT2JaxError(f"batch_size={batch_size} is not divisible by grad_accum={grad_accum}")
        micro = batch_size // grad_accum
        if not 0 <= process_index < process_count:
            raise GPT2JaxError(f"process_index={process_index} is not in [0, process_count={process_count})")
        if micro % process_count:
            raise GPT2JaxError(f"a micro-batch of {micro} rows (batch_size={batch_size} / grad_accum="
                               f"{grad_accum}) cannot be split evenly over {process_count} processes")
        self.corpus = corpus
        self.indices = _check_indices(indices, len(corpus))
        self.bos_id, self.sep_id, self.eos_id, self.pad_id = bos_id, sep_id, eos_id, pad_id
        self.max_length, self.batch_size, self.grad_accum = max_length, batch_size, grad_accum
        self.micro_batch, self.local_rows = micro, micro // process_count  # m, and M = m / P
        self.seed = int(seed) % 2**64  # seed sequences take non-negative words
        self.shuffle, self.keyword_augment, self.loss_on, self.repeat = shuffle, keyword_augment, loss_on, repeat
        self.packing = packing
        self.process_index, self.process_count = process_index, process_count
        self._orders: dict[int, np.ndarray] = {}  # memos, each of a few epochs
        self._plans: dict[int, _Plan] = {}
        self._rows_before = [0]  # stream rows before epoch e: one int per epoch planned so far
        if keyword_augment and corpus.keyword_mismatches:
            log.warning("keyword augmentation: %d rows' keywords tokenize differently one by one than joined",
                        corpus.keyword_mismatches)

    @property
    def num_examples(self) -> int:
        return len(self.indices)

    def num_rows(self, epoch: int = 0) -> int:
        """Rows of ``epoch``'s plan (all processes together)."""
        return self.plan(epoch).num_rows

    @property
    def steps_per_epoch(self) -> float:
        return self.num_rows(0) / self.batch_size

    @property
    def num_batches(self) -> int:
        """Batches that cover one epoch (the last one partly, past the end)."""
        return -(-self.num_rows(0) // self.batch_size)

    def epoch(self, step: int) -> float:
        """Epochs completed before ``step``, fractional."""
        e, j = self._locate(np.array([step * self.batch_size]))
        return 1.0 if e[0] < 0 else float(e[0] + j[0] / self.num_rows(int(e[0])))

    def order(self, epoch: int) -> np.ndarray:
        """The example ids of ``epoch`` in the order they are trained on."""
        if not self.shuffle:
            return self.indices
        if epoch not in self._orders:
            if len(self._orders) >= _PLANS_KEPT:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = np.random.default_rng([_SHUFFLE, self.seed, epoch]).permutation(self.indices)
        return self._orders[epoch]

    def keyword_order(self, example_id: int, epoch: int) -> np.ndarray | None:
        """The positions of the example's keywords used in ``epoch``: a random subset of random size
        (at least one), shuffled; ``None`` (all, in order) without augmentation."""
        if not self.keyword_augment or self.corpus.num_keywords(example_id) == 0:
            return None
        return _augmented(self.corpus, np.array([example_id]), self.seed, epoch)[0]

    def plan(self, epoch: int) -> _Plan:
        """Epoch ``epoch``'s windows and rows (memoised for a few epochs)."""
        if epoch not in self._plans:
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = self._make_plan(epoch)
        return self._plans[epoch]

    def _make_plan(self, epoch: int) -> _Plan:
        ids_E = self.order(epoch)
        W = self.max_length
        P_E, labels_E, text_only_E = example_lengths(self.corpus, ids_E, max_length=W, seed=self.seed,
                                                     epoch=epoch if self.keyword_augment else None)
        goes_on_E = text_only_E | (P_E <= prompt_limit(W))  # else the title leaves no room to continue
        step_E = np.where(text_only_E, W, np.maximum(W - P_E, 1))  # labels per continuation window
        more_E = np.where(goes_on_E & (labels_E > W), -(-(labels_E - W) // step_E), 0)
        n_E = 1 + more_E
        e_N = np.repeat(np.arange(len(ids_E)), n_E)
        k_N = np.arange(len(e_N)) - np.repeat(np.cumsum(n_E) - n_E, n_E)
        text_only_N, P_N, labels_N = text_only_E[e_N], P_E[e_N], labels_E[e_N]
        start_N = np.where(k_N == 0, 0, W + (k_N - 1) * step_E[e_N])
        prefix_N = np.where((k_N > 0) & ~text_only_N, P_N, 0)
        body_N = np.minimum(W - prefix_N, labels_N - start_N)
        length_N = prefix_N + body_N
        if self.packing:
            row_N, n_rows = _best_fit(length_N, W)
        else:
            row_N, n_rows = np.arange(len(length_N)), len(length_N)
        windows = np.argsort(row_N, kind="stable")  # each row's windows in the order they were placed
        row_off = np.zeros(n_rows + 1, np.int64)
        np.cumsum(np.bincount(row_N, minlength=n_rows), out=row_off[1:])
        return _Plan(ids_E[e_N], k_N, start_N, body_N, prefix_N, P_N, text_only_N, row_off, windows,
                     np.bincount(row_N, weights=length_N, minlength=n_rows).astype(np.int64))

    def _locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, row within it) of stream rows ``q``; epoch -1 past the end when not repeating."""
        while q.max() >= self._rows_before[-1] and (self.repeat or len(self._rows_before) == 1):
            e = len(self._rows_before) - 1
            self._rows_before.append(self._rows_before[-1] + self.plan(e).num_rows)
        before = np.asarray(self._rows_before)
        e = np.searchsorted(before, q, side="right") - 1
        e[e >= len(before) - 1] = -1
        return e, q - before[np.maximum(e, 0)]

    def _stream_rows(self, step: int, everyone: bool = False) -> np.ndarray:
        """Stream row numbers of batch ``step``: this process's [A, M], or with ``everyone`` all [A, m]."""
        if step < 0 or (not self.repeat and step >= self.num_batches):
            raise IndexError(f"step {step} is out of range" + ("" if self.repeat else f" [0, {self.num_batches})"))
        A, m = self.grad_accum, self.micro_batch
        M, first = (m, 0) if everyone else (self.local_rows, self.process_index * self.local_rows)
        return step * self.batch_size + np.arange(A)[:, None] * m + first + np.arange(M)[None, :]

    def row_windows(self, step: int) -> list[list[list[tuple[int, int, int]]]]:
        """(example id, epoch, window number) of each segment of this process's rows of batch ``step``, [A][M]."""
        e_AM, j_AM = self._locate(self._stream_rows(step).reshape(-1))
        out = []
        for e, j in zip(e_AM.tolist(), j_AM.tolist()):
            if e < 0:
                out.append([])
                continue
            plan = self.plan(e)
            w = plan.row_windows[plan.row_off[j]:plan.row_off[j + 1]]
            out.append([(i, e, k) for i, k in zip(plan.example_N[w].tolist(), plan.window_N[w].tolist())])
        A, M = self.grad_accum, self.local_rows
        return [out[a * M:(a + 1) * M] for a in range(A)]

    def real_tokens(self, step: int) -> int:
        """Non-padding input tokens of the whole batch ``step`` (all processes), from the plan alone."""
        e_R, j_R = self._locate(self._stream_rows(step, everyone=True).reshape(-1))
        return int(sum(self.plan(e).row_len_R[j] for e, j in zip(e_R.tolist(), j_R.tolist()) if e >= 0))

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of batch ``step``, each [A, M, T]: ``input_ids``, ``labels``, ``segment_ids``
        (1, 2, … the windows of the row in order, 0 padding), ``positions`` (restarting at 0 in each
        window) (int32) and ``loss_mask`` (float32, 1 where the label counts)."""
        e_R, j_R = self._locate(self._stream_rows(step).reshape(-1))
        shape = (len(e_R), self.max_length)
        out = {"input_ids": np.full(shape, self.pad_id, np.int32), "labels": np.full(shape, self.pad_id, np.int32),
               "loss_mask": np.zeros(shape, np.float32), "segment_ids": np.zeros(shape, np.int32),
               "positions": np.zeros(shape, np.int32)}
        for r, (e, j) in enumerate(zip(e_R.tolist(), j_R.tolist())):
            if e >= 0:
                self._fill_row(out, r, self.plan(e), e, j)
        A, M = self.grad_accum, self.local_rows
        return {k: v.reshape(A, M, self.max_length) for k, v in out.items()}

    def _fill_row(self, out: dict, r: int, plan: _Plan, epoch: int, j: int) -> None:
        t = 0
        for seg, w in enumerate(plan.row_windows[plan.row_off[j]:plan.row_off[j + 1]].tolist(), 1):
            i, P = int(plan.example_N[w]), int(plan.prompt_N[w])
            c, m, p = int(plan.start_N[w]), int(plan.body_N[w]), int(plan.prefix_N[w])
            prompt = self._prompt(i, epoch, P) if (p or c < P) else None
            tok = np.concatenate([prompt[:p] if p else np.zeros(0, np.int32),
                                  _span(self.corpus, i, prompt, P, c, c + m + 1, self.eos_id)])
            n = p + m
            out["input_ids"][r, t:t + n] = tok[:-1]
            out["labels"][r, t:t + n] = tok[1:]
            out["segment_ids"][r, t:t + n] = seg
            out["positions"][r, t:t + n] = np.arange(n)
            # Body position u predicts S[c + 1 + u]: under "text" from the first text token on. The prefix is
            # context: its labels were trained in the first window, and its last one is no real next token.
            first = 1 if self.loss_on == "all" else P
            out["loss_mask"][r, t + p + max(0, first - c - 1):t + n] = 1.0
            t += n

    def _prompt(self, i: int, epoch: int, P: int) -> np.ndarray:
        """S[:P] of example i in ``epoch``."""
        order = self.keyword_order(i, epoch)
        seq, text_start = self.corpus.sequence(i, order, bos_id=self.bos_id, sep_id=self.sep_id, eos_id=self.eos_id,
                                               limit=P, prompt_limit=prompt_limit(self.max_length))
        if text_start != P:
            raise RuntimeError(f"row {i}: the plan's prompt of {P} tokens disagrees with sequence()'s {text_start}")
        return seq

    def padding_share(self, epoch: int = 0) -> float:
        """Padding slots ÷ all slots of ``epoch``'s rows."""
        plan = self.plan(epoch)
        return 1.0 - plan.row_len_R.sum() / (plan.num_rows * self.max_length)


def _span(corpus: TokenizedCorpus, i: int, prompt: np.ndarray | None, P: int, a: int, b: int, eos_id: int) -> np.ndarray:
    """S[a:b] of example i (S = prompt, text, EOS), slicing only the text it needs."""
    text = corpus.text(i)
    parts = [prompt[a:min(b, P)]] if a < P else []
    lo, hi = max(a, P) - P, min(b - P, len(text))
    if hi > lo:
        parts.append(text[lo:hi])
    if b > P + len(text):
        parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts).astype(np.int32, copy=False)


def _best_fit(length_N: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """Each window's row when placed, in order, into the open row whose free room fits it most tightly
    (a new row when none does): (row of each window, number of rows). Python over N windows; a bit set
    over the room sizes finds the tightest in a few integer operations."""
    by_room: list[list[int]] = [[] for _ in range(width + 1)]  # open rows by free slots
    rooms = 0  # bit r set while some open row has r free slots
    row_of, n_rows = [], 0
    for n in length_N.tolist():
        fits = rooms >> n
        if fits:
            room = n + (fits & -fits).bit_length() - 1
            row = by_room[room].pop()
            if not by_room[room]:
                rooms &= ~(1 << room)
        else:
            room, row, n_rows = width, n_rows, n_rows + 1
        row_of.append(row)
        if room > n:
            by_room[room - n].append(row)
            rooms |= 1 << (room - n)
    return np.array(row_of, np.int64), n_rows


_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: independent-looking 64-bit words from counters, vectorised."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def _augmented(corpus: TokenizedCorpus, rows: np.ndarray, seed: int, epoch: int) -> list[np.ndarray]:
    """Keyword augmentation of ``rows`` in ``epoch``: each row's kept keyword positions, a random subset of
    random size (at least one; none for rows without keywords), shuffled. A hash of (seed, epoch, row,
    position), so any row is drawn alone or a whole epoch at once, in numpy."""
    flat, counts = _augmented_flat(corpus, rows, seed, epoch)
    return np.split(flat, np.cumsum(counts)[:-1])


def _augmented_flat(corpus, rows, seed, epoch) -> tuple[np.ndarray, np.ndarray]:
    n_R = (corpus.row_kw_off[rows + 1] - corpus.row_kw_off[rows]).astype(np.int64)
    base_R = _mix(_mix(_mix(np.uint64(_AUGMENT) ^ np.uint64(seed)) ^ np.uint64(epoch)) ^ rows.astype(np.uint64))
    size_R = np.where(n_R > 0, 1 + (base_R % np.maximum(n_R, 1).astype(np.uint64)).astype(np.int64), 0)
    start_R = np.cumsum(n_R) - n_R
    row_K = np.repeat(np.arange(len(rows)), n_R)
    at_K = np.arange(len(row_K)) - start_R[row_K]
    with np.errstate(over="ignore"):
        key_K = _mix(base_R[row_K] + at_K.astype(np.uint64) + np.uint64(1))
    shuffled = np.lexsort((key_K, row_K))  # by row, then by key
    keep = at_K < size_R[row_K]  # rank within the row after the shuffle (rows keep their places)
    return at_K[shuffled][keep], size_R


def example_lengths(corpus: TokenizedCorpus, ids: np.ndarray, *, max_length: int, seed: int = 0,
                    epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, labels, text-only) of examples ``ids`` as `Batches` builds them: the prompt length after
    `prompt_limit` (with ``epoch``: after that epoch's keyword augmentation), the number of labels of the
    whole sequence S, and whether S is ``[EOS] text [EOS]``. Vectorised."""
    ids = np.asarray(ids, np.int64)
    p = 3 * ids
    t0, k0, x0, x1 = (corpus.piece_off[p + i].astype(np.int64) for i in range(4))
    lt, lk, lx = k0 - t0, x0 - k0, x1 - x0
    n_kw = (corpus.row_kw_off[ids + 1] - corpus.row_kw_off[ids]).astype(np.int64)
    text_only = (lt == 0) & (n_kw == 0)
    limit = prompt_limit(max_length)
    if epoch is None or not len(ids):
        counts = n_kw
        starts = np.cumsum(counts) - counts
        at = np.arange(counts.sum()) - np.repeat(starts, counts)
    else:
        at, counts = _augmented_flat(corpus, ids, seed, epoch)
    row = np.repeat(np.arange(len(ids)), counts)
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(row)) - starts[row]
    kw = corpus.row_kw[corpus.row_kw_off[ids][row].astype(np.int64) + at].astype(np.int64)
    pieces = 2 * kw + (rank > 0)  # the first keyword without a leading space
    cum = np.cumsum(corpus.kw_off[pieces + 1] - corpus.kw_off[pieces]).astype(np.int64)
    within = cum - np.concatenate([[0], cum])[starts[row]]  # tokens up to and with this keyword
    kept = np.zeros(len(ids), np.int64)
    fits = lt[row] + 3 + within <= limit
    np.maximum.at(kept, row[fits], within[fits])
    assembled = np.bincount(row, weights=corpus.kw_off[pieces + 1] - corpus.kw_off[pieces],
                            minlength=len(ids)).astype(np.int64)
    # As TokenizedCorpus.sequence: the whole list fits (by its joined length) or is cut to a fitting prefix.
    used = np.where(lt + lk + 3 <= limit, lk if epoch is None else assembled, kept)
    P = np.where(text_only, 1, lt + used + 3)
    return P, P + lx, text_only


def prompt_limit(max_length: int) -> int:
    """The longest ``[BOS] title [SEP] keywords [SEP]`` trained: half the window, so that a long keyword
    list (the seed's news rows carry about 30 words) leaves room for text. Keywords past it are dropped,
    after augmentation has chosen and shuffled them; titles are never cut."""
    return max_length // 2


def _check_indices(indices: Sequence[int], n: int) -> np.ndarray:
    idx = np.array(indices, np.int64).reshape(-1)  # a copy: the caller may change theirs
    if not len(idx):
        raise GPT2JaxError("the split has no examples (check val_fraction and the corpus size)")
    bad = idx[(idx < 0) | (idx >= n)]
    if len(bad):
        raise GPT2JaxError(f"example id {bad[0]} is out of range for a corpus of {n} rows")
    return idx
