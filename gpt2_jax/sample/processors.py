"""Hugging Face's logits processors as pure functions of [B, V] float32 scores and traced parameters.

Each parameter is a scalar for every row or a [B] array, one value per row (`_per_row`), with the same
results row by row (the engine's slots each carry their own settings).

Shape letters: B batch, V vocabulary, C top-k candidates, K keywords per row, L tokens per keyword.

They follow `transformers.generation.logits_process` exactly (order, ties, edge values): repetition
penalty -> min new tokens -> temperature -> top-k -> top-p, then softmax sampling (or argmax). Our one
addition, the keyword boost, sits right after the repetition penalty (see `apply_keyword_boost`).
Sorting the whole vocabulary is slow on CPU (~10 ms a row for GPT-2's 50,257 tokens), so sampling filters
the top-`C` candidates found by `lax.top_k` and only falls back to the exact full sort (under `lax.cond`,
so it costs nothing when not taken) when the candidates cannot decide the answer exactly: top-k off or
larger than C with a nucleus wider than C, or ties straddling the C-th value.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.text import UNSPACED

# Candidate counts for the fast top-k/top-p path, tried in order before the full sort. 64 covers the usual
# top_k (HF's default 50, the seed's 30); 1024 and 4096 cover most nuclei of pure top-p sampling. On CPU,
# top_k(64) of 8 x 50,257 scores takes ~0.7 ms, top_k(4096) ~11 ms, a full sort ~90 ms.
CANDIDATE_CAPS = (64, 1024, 4096)

_NEG_INF = -jnp.inf
_UNSPACED = re.compile(f"[{UNSPACED}]")
# Keyword guidance's even pace spreads a row's keywords over this share of its new tokens, leaving the rest as
# slack for a keyword the model places late.
PACE_END = 0.9
# keyword_wait=True: the window (nats below the row's best score), the ramp (nats per keyword behind the pace)
# and the lead (keywords ahead of it) chosen from the measurements in README "Keywords".
WAIT = {"window": 1.0, "ramp": 2.0, "lead": 0.5, "hold": 1.0}


def token_presence(ids_BT, vocab_size: int, valid_BT=None):
    """bool [B, V]: which tokens occur in each row of `ids_BT` (where `valid_BT`), for the repetition penalty."""
    ids_BT = jnp.asarray(ids_BT)
    B = ids_BT.shape[0]
    if valid_BT is not None:
        ids_BT = jnp.where(valid_BT, ids_BT, vocab_size)  # out of range: dropped by the scatter
    rows = jnp.arange(B)[:, None]
    return jnp.zeros((B, vocab_size), bool).at[rows, ids_BT].set(True, mode="drop")


def _per_row(x):
    """A per-row [B] parameter as [B, 1], to broadcast against [B, V] (or [B, K]); a scalar as it is."""
    x = jnp.asarray(x)
    return x[:, None] if x.ndim == 1 else x


def _div(x_BV, d):
    """x / d exactly as torch divides. XLA:CPU rewrites x / broadcast(d) as x * (1 / d), an ulp off at times,
    enough to move a top-p boundary; dividing by a materialised array (behind a barrier) keeps the division."""
    d_BV = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(d, x_BV.dtype), x_BV.shape))
    return x_BV / d_BV


def apply_repetition_penalty(scores_BV, seen_BV, penalty):
    """HF `RepetitionPenaltyLogitsProcessor`: seen tokens' scores are divided (>= 0) or multiplied (< 0).

    Applied once per token however often it occurred. `penalty == 1` is exactly the identity.
    """
    scores_BV = jnp.asarray(scores_BV, jnp.float32)
    penalty = _per_row(penalty)
    penalised = jnp.where(scores_BV < 0, scores_BV * penalty, _div(scores_BV, penalty))
    return jnp.where(seen_BV, penalised, scores_BV)


def keyword_lengths(kw_BKL):
    """int32 [B, K]: the tokens of each keyword (-1 pads keywords to L tokens and rows to K keywords)."""
    return jnp.sum(kw_BKL >= 0, axis=-1, dtype=jnp.int32)


def keyword_guidance(wait) -> dict[str, float]:
    """apply_keyword_boost's window, ramp and lead for `keyword_wait`: None or False, off (every keyword boosted
    from the first token on, as before guidance waited); True, WAIT; a dict, WAIT with some of them replaced."""
    if wait is None or wait is False:
        return {"window": math.inf, "ramp": 0.0, "lead": math.inf, "hold": 0.0}
    if wait is True:
        return dict(WAIT)
    if not isinstance(wait, dict) or set(wait) - set(WAIT):
        raise GPT2JaxError(f"keyword_wait must be true, false or a mapping of {', '.join(WAIT)}, got {wait!r}")
    for k, v in wait.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0 \
                or (k == "ramp" and math.isinf(v)):
            raise GPT2JaxError(f"keyword_wait's {k} must be a number >= 0{' (finite)' if k == 'ramp' else ''}, "
                               f"got {v!r}")
    return {**WAIT, **{k: float(v) for k, v in wait.items()}}


def keyword_array(keywords, batch: int, vocab_size: int, bucket) -> np.ndarray:
    """int32 [B, K, L]: each row's keyword token-id sequences, -1 padded to K and L as `bucket(n)` rounds them."""
    if not isinstance(keywords, (list, tuple)) or len(keywords) != batch:
        got = f"{len(keywords)} rows" if isinstance(keywords, (list, tuple)) else repr(type(keywords).__name__)
        raise GPT2JaxError(f"keywords must hold one list of keyword token-id sequences per prompt ({batch}), "
                           f"got {got}")
    for b, row in enumerate(keywords):
        if not isinstance(row, (list, tuple)):
            raise GPT2JaxError(f"keywords[{b}] must be a list of token-id sequences, got {row!r}")
        for k, seq in enumerate(row):
            if not isinstance(seq, (list, tuple, np.ndarray)) or len(seq) == 0 or not all(_is_int(t) for t in seq):
                raise GPT2JaxError(f"keywords[{b}][{k}] must be a non-empty list of token ids, got {seq!r}")
            bad = [int(t) for t in seq if not 0 <= t < vocab_size]
            if bad:
                raise GPT2JaxError(f"keywords[{b}][{k}] holds token id {bad[0]}, outside the vocabulary "
                                   f"[0, {vocab_size})")
    K, L = bucket(max(map(len, keywords))), bucket(max((len(q) for row in keywords for q in row), default=1))
    kw_BKL = np.full((batch, K, L), -1, np.int32)
    for b, row in enumerate(keywords):
        for k, seq in enumerate(row):
            kw_BKL[b, k, :len(seq)] = seq
    return kw_BKL


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def glue_ids(tokenizer) -> tuple[int, ...]:
    """The tokens that continue the word before them (decoded after "a", they start with a letter, digit or
    "_" of a spaced script): after a keyword's last token they would turn it into another word. Cached on the
    tokenizer."""
    cached = getattr(tokenizer, "_glue_ids", None)
    if cached is None:
        head = tokenizer.encode("a")
        cached = tuple(i for i in range(len(tokenizer)) if _glues(tokenizer.decode(head + [i])[1:2]))
        try:
            tokenizer._glue_ids = cached
        except AttributeError:  # a tokenizer without attributes to set: computed each time
            pass
    return cached


def _glues(c: str) -> bool:
    return bool(c) and (c.isalnum() or c == "_") and not _UNSPACED.match(c)


def _rows(x, B: int):
    """A traced parameter as float32 [B]: a scalar for every row, or already one value per row."""
    return jnp.broadcast_to(jnp.asarray(x, jnp.float32), (B,))


def apply_keyword_boost(scores_BV, kw_BKL, match_BK, done_BK, boost, *, num_new=0, max_new=1,
                        window=jnp.inf, ramp=0.0, lead=jnp.inf, hold=0.0, eos_mask_V=None, ended_B=None,
                        glue_mask_V=None):
    """Add `boost` to the score of the next token of every keyword not yet generated whole: its first token,
    where the guidance lets it start (below), or, once a keyword is under way (`match_BK` > 0 tokens of it end
    the text), its next one at 2 * boost.

    A traced processor of our own (not in HF), after the repetition penalty (which would shrink the boost of a
    keyword already in the prompt) and before temperature, top-k and top-p, so that the boosted tokens can
    survive their cut. Twice the boost for a continuation finishes a started keyword rather than starting
    another. A token that several keywords want gets the largest of their boosts, not their sum. `boost` 0 adds
    exactly 0: the scores and hence the tokens are those without keywords.

    Waiting for a natural place (`window` finite): a keyword may start only where the model already ranks its
    first token among its top candidates, within `window` of the row's best score (before the boost), and only
    while the row is at most `lead` keywords ahead of an even pace (its keywords spread over the first
    PACE_END of the `max_new` tokens; `num_new` written so far). When the row falls behind that pace the
    window widens by `ramp` per keyword behind over the share of the budget left, so that a keyword the model
    never ranks high is still written, late.
    `window` and `lead` inf (the defaults) start every keyword at once: the boost from the first token on.
    Every parameter is traced, a scalar or one value per row [B].
    """
    B, V = scores_BV.shape
    L = kw_BKL.shape[2]
    next_BK = jnp.take_along_axis(kw_BKL, jnp.clip(match_BK, 0, L - 1)[..., None], axis=2)[..., 0]
    pending_BK = ~done_BK & (next_BK >= 0)
    boost_B1 = _rows(boost, B)[:, None]
    rows_BK = jnp.broadcast_to(jnp.arange(B)[:, None], next_BK.shape)
    scores_BV = jnp.asarray(scores_BV, jnp.float32)
    next_score_BK = scores_BV[rows_BK, jnp.clip(next_BK, 0, V - 1)]
    # The pace: how many keywords the row should have written by now, against how many it has. Being behind
    # widens the window, the more so the less of the budget is left: near the end a missing keyword is forced.
    n_B, max_B = _rows(num_new, B) + 1, jnp.maximum(_rows(max_new, B), 1)
    expected_B = jnp.sum(keyword_lengths(kw_BKL) > 0, axis=1) * jnp.minimum(1.0, n_B / (PACE_END * max_B))
    behind_B = expected_B - jnp.sum(done_BK, axis=1)
    left_B = jnp.maximum(1 - n_B / max_B, 1 / max_B)  # the share of the budget left
    urgency_B1 = (_rows(ramp, B) * jnp.maximum(behind_B, 0.0) / left_B)[:, None]
    window_B = _rows(window, B) + urgency_B1[:, 0]
    fits_BK = jnp.max(scores_BV, axis=-1, keepdims=True) - next_score_BK <= window_B[:, None]
    may_start_BK = fits_BK & (behind_B >= -_rows(lead, B))[:, None]
    boosted_now_BK = pending_BK & ((match_BK > 0) | may_start_BK)
    # Behind the pace, the boost grows as the window does: a keyword far below the best is still written.
    strength_BK = jnp.where(match_BK > 0, 2 * boost_B1, boost_B1) + jnp.where(boost_B1 > 0, urgency_B1, 0.0)
    # Scatter-max of score + boost onto the K tokens only: no [B, V] bonus array to fill and add.
    scores_BV = scores_BV.at[rows_BK, jnp.where(boosted_now_BK, next_BK, V)].max(next_score_BK + strength_BK,
                                                                                 mode="drop")  # V: dropped
    if eos_mask_V is None:
        return scores_BV
    # `hold` > 0: no end while a keyword (with a boost) is missing, so the pace has its whole budget; and right
    # after a keyword, no token that would glue onto its last word ("dict" + "s"): it would not be the keyword.
    hold_B = (_rows(hold, B) > 0) & (boost_B1[:, 0] > 0)
    block_BV = (hold_B & jnp.any(pending_BK, axis=1))[:, None] & eos_mask_V[None, :]
    if ended_B is not None and glue_mask_V is not None:
        block_BV |= (hold_B & ended_B)[:, None] & glue_mask_V[None, :]
    return jnp.where(block_BV, _NEG_INF, scores_BV)


def update_keyword_match(kw_BKL, match_BK, done_BK, tok_B):
    """(match_BK, done_BK) after emitting `tok_B`: how many tokens of each keyword end the text now, and
    whether it has been generated whole (then done for good, its match reset to 0).

    A token that does not continue a match restarts it only if it is the keyword's first token (no KMP
    fallback: a keyword that repeats its own prefix, "a a b" in "a a a b", can be missed; keywords are words).
    """
    L = kw_BKL.shape[2]
    cur_BK = jnp.take_along_axis(kw_BKL, jnp.clip(match_BK, 0, L - 1)[..., None], axis=2)[..., 0]
    tok_B1 = tok_B[:, None]
    match_BK = jnp.where(cur_BK == tok_B1, match_BK + 1, jnp.where(kw_BKL[:, :, 0] == tok_B1, 1, 0))
    len_BK = keyword_lengths(kw_BKL)
    done_BK = done_BK | ((match_BK == len_BK) & (len_BK > 0))
    return jnp.where(done_BK, 0, match_BK).astype(jnp.int32), done_BK


def apply_min_new_tokens(scores_BV, eos_mask_V, num_new, min_new_tokens):
    """HF `MinNewTokensLengthLogitsProcessor`: EOS scores are -inf while fewer than `min_new_tokens` are out."""
    block = (_per_row(num_new) < _per_row(min_new_tokens)) & eos_mask_V  # [V], or [B, V] per row
    return jnp.where(block, _NEG_INF, scores_BV)


def apply_temperature(scores_BV, temperature):
    """HF `TemperatureLogitsWarper`: scores / temperature (1 is exactly the identity)."""
    return _div(jnp.asarray(scores_BV, jnp.float32), _per_row(temperature))


def one_minus_top_p(top_p):
    """The top-p cut on cumulative probabilities, 1 - top_p, rounded as HF rounds it."""
    # HF compares float32 cumulative probabilities with the Python float `1 - top_p` (computed in double,
    # then rounded to float32 by torch); do the same when top_p is a concrete number.
    if isinstance(top_p, (int, float, np.floating, np.integer)):
        return np.float32(1.0 - float(top_p))
    return 1.0 - jnp.asarray(top_p, jnp.float32)


def _top_k_off(top_k, V):
    return (top_k <= 0) | (top_k >= V)


def full_filter(scores_BV, top_k, top_p_cut, top_p_on):
    """HF's `TopKLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep=1), exactly, over the whole vocabulary
    with one stable ascending sort: filtered scores are -inf. `top_k` 0 (or >= V) is off; `top_p_cut` is
    `one_minus_top_p(top_p)`, and `top_p_on` False (top_p 1, which generate skips) keeps even zero-probability
    tokens."""
    B, V = scores_BV.shape
    iota_BV = jax.lax.broadcasted_iota(jnp.int32, (B, V), 1)
    # Stable: equal scores keep index order. HF's torch.sort is not stable on CPU, so where tied tokens
    # straddle the nucleus boundary, which of them HF keeps is unspecified; we keep the highest ids.
    sorted_BV, order_BV = jax.lax.sort((scores_BV, iota_BV), dimension=1, num_keys=1, is_stable=True)
    # Top-k: drop every score below the k-th largest (ties at the threshold stay), as TopKLogitsWarper.
    kk = jnp.clip(top_k, 1, V)
    thr_B = jax.lax.dynamic_index_in_dim(sorted_BV, V - kk, axis=1, keepdims=False)
    thr_B = jnp.where(_top_k_off(top_k, V), _NEG_INF, thr_B)
    sorted_BV = jnp.where(sorted_BV < thr_B[:, None], _NEG_INF, sorted_BV)
    # Top-p: remove ascending-sorted tokens whose cumulative probability is <= 1 - top_p, keep the largest.
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    remove_BV = (cum_BV <= top_p_cut) & top_p_on
    remove_BV = remove_BV.at[:, -1].set(False)
    sorted_BV = jnp.where(remove_BV, _NEG_INF, sorted_BV)
    rows = jnp.arange(B)[:, None]
    return jnp.zeros_like(scores_BV).at[rows, order_BV].set(sorted_BV, unique_indices=True)


def _top_k(x_BV, k: int):
    # XLA:CPU runs top_k as a partial sort only while its output is a plain slice of a sort; a second slice
    # of that output (x[:, -1:]) gets folded into the sort and turns it into a full sort, ~100x slower.
    # The barrier keeps the pattern intact. It holds a third value beside the two outputs: a barrier of exactly
    # top_k's tuple gets folded onto the top_k itself on a mesh, which XLA:CPU's TopkDecomposer cannot take (it
    # aborts the process).
    vals, ids, _ = jax.lax.optimization_barrier((*jax.lax.top_k(x_BV, k), jnp.zeros((), jnp.int32)))
    return vals, ids


def filter_candidates(scores_BV, top_k, top_p, cap: int, *, top_p_cut=None):
    """Top-k then top-p restricted to the `cap` largest scores: the fast path of `full_filter`.

    Returns (scores_BC, ids_BC, exact_B): the candidates' warped scores (-inf where filtered) and token ids,
    and per row whether they are exactly `full_filter`'s surviving tokens and scores. Exactness needs the answer
    to lie among the candidates with no tie straddling the cap: top-k on and <= cap, or top-k off and a
    nucleus narrower than the cap.
    """
    B, V = scores_BV.shape
    C = min(cap, V)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p_cut = one_minus_top_p(top_p) if top_p_cut is None else top_p_cut
    top_p_on = jnp.asarray(top_p) < 1
    vals_BC, ids_BC = _top_k(scores_BV, C)  # descending; equal values in index order
    low_B = vals_BC[:, -1]  # the smallest candidate
    k_off = _top_k_off(top_k, V)
    kth_B1 = jnp.broadcast_to(jnp.clip(top_k, 1, C) - 1, (B,))[:, None]  # top_k: a scalar or one per row
    thr_B = jnp.take_along_axis(vals_BC, kth_B1, axis=1)[:, 0]
    thr_B = jnp.where(k_off | (top_k > C), _NEG_INF, thr_B)
    vals_BC = jnp.where(vals_BC < thr_B[:, None], _NEG_INF, vals_BC)
    # HF's stable ascending order: by value, then by token id.
    vals_BC, ids_BC = jax.lax.sort((vals_BC, ids_BC), dimension=1, num_keys=2)

    # Softmax over the whole vocabulary after top-k. With top-k on, tokens outside have probability 0;
    # with it off, their total mass starts the cumulative sum.
    def mass_outside():
        m_B1 = jnp.max(scores_BV, axis=-1, keepdims=True)
        e_BV = jnp.exp(scores_BV - m_B1)
        z_B = jnp.sum(e_BV, axis=-1)
        return m_B1, z_B, jnp.sum(jnp.where(scores_BV < low_B[:, None], e_BV, 0.0), axis=-1) / z_B

    def no_mass_outside():
        m_B1 = jnp.max(vals_BC, axis=-1, keepdims=True)
        z_B = jnp.sum(jnp.exp(vals_BC - m_B1), axis=-1)
        return m_B1, z_B, jnp.zeros((B,), jnp.float32)

    def per_row():  # per-row settings: each row takes its own branch's values
        outside_B = jnp.broadcast_to(k_off & top_p_on, (B,))
        return tuple(jnp.where(outside_B.reshape((B,) + (1,) * (a.ndim - 1)), a, b)
                     for a, b in zip(mass_outside(), no_mass_outside()))

    if C == V:
        m_B1, z_B, mass_out_B = no_mass_outside()
    elif jnp.ndim(k_off & top_p_on) == 0:
        m_B1, z_B, mass_out_B = jax.lax.cond(k_off & top_p_on, mass_outside, no_mass_outside)
    else:
        m_B1, z_B, mass_out_B = jax.lax.cond(jnp.any(k_off & top_p_on), per_row, no_mass_outside)
    cum_BC = mass_out_B[:, None] + jnp.cumsum(jnp.exp(vals_BC - m_B1) / z_B[:, None], axis=-1)
    remove_BC = (cum_BC <= _per_row(top_p_cut)) & _per_row(top_p_on)
    remove_BC = remove_BC.at[:, -1].set(False)
    vals_BC = jnp.where(remove_BC, _NEG_INF, vals_BC)
    if C == V:
        exact_B = jnp.ones((B,), bool)
    else:
        # No score outside the candidates equals the smallest one (else which of them is in is ambiguous).
        separated_B = jnp.sum(scores_BV >= low_B[:, None], axis=-1) == C
        # Top-k on and <= C: exact unless the k-th value ties with a token outside the candidates.
        k_exact_B = ~k_off & (top_k <= C) & ((thr_B > low_B) | separated_B)
        # Top-k off: exact if top-p removes the smallest candidate, hence every token outside.
        p_exact_B = k_off & top_p_on & separated_B & remove_BC[:, 0]
        exact_B = k_exact_B | p_exact_B
    return vals_BC, ids_BC, exact_B


def categorical(key, scores_BV, block: int = 256):
    """One draw per row from softmax(scores_BV), like `jax.random.categorical` but with O(V / block + block)
    random numbers: first a block of `block` tokens by its total probability, then a token inside it.
    Gumbel noise for all 50,257 GPT-2 tokens costs more than a small model's decode step on CPU."""
    B, V = scores_BV.shape
    if V <= block:
        return jax.random.categorical(key, scores_BV, axis=-1)
    nb = -(-V // block)
    s_BNG = jnp.pad(scores_BV, ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf).reshape(B, nb, block)
    m_B11 = jnp.max(s_BNG, axis=(1, 2), keepdims=True)
    mass_BN = jnp.sum(jnp.exp(s_BNG - m_B11), axis=-1)
    key_block, key_token = jax.random.split(key)
    blk_B = jax.random.categorical(key_block, jnp.log(mass_BN), axis=-1)
    s_BG = jnp.take_along_axis(s_BNG, blk_B[:, None, None], axis=1)[:, 0]
    return blk_B * block + jax.random.categorical(key_token, s_BG, axis=-1)


def sample_tokens(key, scores_BV, top_k, top_p, *, top_p_cut=None, caps: Sequence[int] = CANDIDATE_CAPS):
    """Draw one token per row from softmax of the scores (already divided by the temperature) after top-k and
    top-p, as `full_filter` leaves them.

    Tries the candidate path for each cap in turn and falls back to the full sort; each fallback sits in a
    `lax.cond` branch, so only the path taken runs.
    """
    B, V = scores_BV.shape
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    top_p_cut = one_minus_top_p(top_p) if top_p_cut is None else top_p_cut

    def from_candidates(vals_BC, ids_BC):
        j_B = jax.random.categorical(key, vals_BC, axis=-1)
        return jnp.take_along_axis(ids_BC, j_B[:, None], axis=-1)[:, 0]

    def full():
        return categorical(key, full_filter(scores_BV, top_k, top_p_cut, top_p < 1))

    def unfiltered():
        return categorical(key, scores_BV)

    def tier(i):
        if i == len(caps):
            return full()
        vals_BC, ids_BC, exact_B = filter_candidates(scores_BV, top_k, top_p, caps[i], top_p_cut=top_p_cut)
        return jax.lax.cond(jnp.all(exact_B), lambda: from_candidates(vals_BC, ids_BC), lambda: tier(i + 1))

    if not caps:
        return full().astype(jnp.int32)
    vals_BC, ids_BC, exact_B = filter_candidates(scores_BV, top_k, top_p, caps[0], top_p_cut=top_p_cut)
    no_filter = _top_k_off(top_k, V) & (top_p >= 1)
    branch = jnp.where(jnp.all(exact_B), 0, jnp.where(no_filter, 1, 2))
    tok_B = jax.lax.switch(branch, [lambda: from_candidates(vals_BC, ids_BC), unfiltered, lambda: tier(1)])
    return tok_B.astype(jnp.int32)
