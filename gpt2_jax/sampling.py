"""Generation: Hugging Face's logits processors as pure functions, and one jitted prefill + decode loop.

Shape letters: B batch (rows after `num_return_sequences`), P prompt slots (bucketed), N new-token slots
(bucketed), S cache slots (P + N), V vocabulary, C top-k candidates, D n_embd.

`generate` left-pads the prompts to a bucketed length, prefills them in one pass into a KV cache, then
decodes one token per row per step in a `lax.while_loop` inside the same `jax.jit`, stopping once every
row has emitted EOS. The cache is allocated inside that jit for prompt + new slots and carried through
the loop, where XLA updates it in place: no copy per step and no buffer to donate. Every sampling parameter is a traced argument: only the model's graph, `do_sample`,
`num_return_sequences`, the batch size and the two bucketed lengths are static, so changing temperature,
top-k, top-p, the penalty, `min_new_tokens`, `max_new_tokens` (within a bucket), the special ids or the
seed reuses the compiled program.

Processors follow `transformers.generation.logits_process` exactly (order, ties, edge values):
repetition penalty -> min new tokens -> temperature -> top-k -> top-p, then softmax sampling (or argmax).
Sorting the whole vocabulary is slow on CPU (~10 ms a row for GPT-2's 50,257 tokens), so sampling filters
the top-`C` candidates found by `lax.top_k` and only falls back to the exact full sort (under `lax.cond`,
so it costs nothing when not taken) when the candidates cannot decide the answer exactly: top-k off or
larger than C with a nucleus wider than C, or ties straddling the C-th value.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.cache import KVCache, init_cache
from gpt2_jax.errors import GPT2JaxError

# Candidate counts for the fast top-k/top-p path, tried in order before the full sort. 64 covers the usual
# top_k (HF's default 50, the seed's 30); 1024 and 4096 cover most nuclei of pure top-p sampling. On CPU,
# top_k(64) of 8 x 50,257 scores takes ~0.7 ms, top_k(4096) ~11 ms, a full sort ~90 ms.
CANDIDATE_CAPS = (64, 1024, 4096)
# Smallest bucket for the prompt and for the new tokens; buckets are powers of two above it.
MIN_BUCKET = 16

_NEG_INF = -jnp.inf


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The compiled length for `n` slots: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# --- logits processors: pure functions of [B, V] float32 scores and traced parameters ----------------

def token_presence(ids_BT, vocab_size: int, valid_BT=None):
    """bool [B, V]: which tokens occur in each row of `ids_BT` (where `valid_BT`), for the repetition penalty."""
    ids_BT = jnp.asarray(ids_BT)
    B = ids_BT.shape[0]
    if valid_BT is not None:
        ids_BT = jnp.where(valid_BT, ids_BT, vocab_size)  # out of range: dropped by the scatter
    rows = jnp.arange(B)[:, None]
    return jnp.zeros((B, vocab_size), bool).at[rows, ids_BT].set(True, mode="drop")


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
    penalised = jnp.where(scores_BV < 0, scores_BV * penalty, _div(scores_BV, penalty))
    return jnp.where(seen_BV, penalised, scores_BV)


def apply_min_new_tokens(scores_BV, eos_mask_V, num_new, min_new_tokens):
    """HF `MinNewTokensLengthLogitsProcessor`: EOS scores are -inf while fewer than `min_new_tokens` are out."""
    block = (num_new < min_new_tokens) & eos_mask_V
    return jnp.where(block[None, :], _NEG_INF, scores_BV)


def apply_temperature(scores_BV, temperature):
    """HF `TemperatureLogitsWarper`: scores / temperature (1 is exactly the identity)."""
    return _div(jnp.asarray(scores_BV, jnp.float32), temperature)


def _one_minus(top_p):
    # HF compares float32 cumulative probabilities with the Python float `1 - top_p` (computed in double,
    # then rounded to float32 by torch); do the same when top_p is a concrete number.
    if isinstance(top_p, (int, float, np.floating, np.integer)):
        return np.float32(1.0 - float(top_p))
    return 1.0 - jnp.asarray(top_p, jnp.float32)


def _top_k_off(top_k, V):
    return (top_k <= 0) | (top_k >= V)


def _full_filter(scores_BV, top_k, top_p_cut, top_p_on):
    """Exact top-k then top-p over the whole vocabulary with one stable ascending sort, as HF does."""
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


def top_k_filter(scores_BV, top_k):
    """HF `TopKLogitsWarper` (exact; ties with the k-th value are kept); `top_k` 0 (or >= V) is off."""
    scores_BV = jnp.asarray(scores_BV, jnp.float32)
    return _full_filter(scores_BV, jnp.asarray(top_k, jnp.int32), jnp.float32(0.0), False)


def top_p_filter(scores_BV, top_p):
    """HF `TopPLogitsWarper` with min_tokens_to_keep=1 (exact, stable sort); `top_p` 1 is off, as in generate."""
    scores_BV = jnp.asarray(scores_BV, jnp.float32)
    return _full_filter(scores_BV, jnp.int32(0), _one_minus(top_p), jnp.asarray(top_p) < 1)


def warp(scores_BV, temperature, top_k, top_p):
    """Temperature, top-k, top-p in HF's order, exactly, with one sort: what sampling draws from."""
    scores_BV = apply_temperature(jnp.asarray(scores_BV, jnp.float32), temperature)
    return _full_filter(scores_BV, jnp.asarray(top_k, jnp.int32), _one_minus(top_p), jnp.asarray(top_p) < 1)


def _top_k(x_BV, k: int):
    # XLA:CPU runs top_k as a partial sort only while its output is a plain slice of a sort; a second slice
    # of that output (x[:, -1:]) gets folded into the sort and turns it into a full sort, ~100x slower.
    # The barrier keeps the pattern intact.
    return jax.lax.optimization_barrier(jax.lax.top_k(x_BV, k))


def filter_candidates(scores_BV, top_k, top_p, cap: int, *, top_p_cut=None):
    """Top-k then top-p restricted to the `cap` largest scores: the fast path of `warp` (after temperature).

    Returns (scores_BC, ids_BC, exact_B): the candidates' warped scores (-inf where filtered) and token ids,
    and per row whether they are exactly `warp`'s surviving tokens and scores. Exactness needs the answer
    to lie among the candidates with no tie straddling the cap: top-k on and <= cap, or top-k off and a
    nucleus narrower than the cap.
    """
    B, V = scores_BV.shape
    C = min(cap, V)
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p_cut = _one_minus(top_p) if top_p_cut is None else top_p_cut
    top_p_on = jnp.asarray(top_p) < 1
    vals_BC, ids_BC = _top_k(scores_BV, C)  # descending; equal values in index order
    low_B = vals_BC[:, -1]  # the smallest candidate
    k_off = _top_k_off(top_k, V)
    thr_B = jax.lax.dynamic_index_in_dim(vals_BC, jnp.clip(top_k, 1, C) - 1, axis=1, keepdims=False)
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

    if C == V:
        m_B1, z_B, mass_out_B = no_mass_outside()
    else:
        m_B1, z_B, mass_out_B = jax.lax.cond(k_off & top_p_on, mass_outside, no_mass_outside)
    cum_BC = mass_out_B[:, None] + jnp.cumsum(jnp.exp(vals_BC - m_B1) / z_B[:, None], axis=-1)
    remove_BC = (cum_BC <= top_p_cut) & top_p_on
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
    """Draw one token per row from softmax(warp(scores)) (scores already divided by the temperature).

    Tries the candidate path for each cap in turn and falls back to the full sort; each fallback sits in a
    `lax.cond` branch, so only the path taken runs.
    """
    B, V = scores_BV.shape
    top_k = jnp.asarray(top_k, jnp.int32)
    top_p = jnp.asarray(top_p, jnp.float32)
    top_p_cut = _one_minus(top_p) if top_p_cut is None else top_p_cut

    def from_candidates(vals_BC, ids_BC):
        j_B = jax.random.categorical(key, vals_BC, axis=-1)
        return jnp.take_along_axis(ids_BC, j_B[:, None], axis=-1)[:, 0]

    def full():
        return categorical(key, _full_filter(scores_BV, top_k, top_p_cut, top_p < 1))

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


# --- the compiled loop --------------------------------------------------------------------------------

def _process(scores_BV, seen_BV, num_new, p, eos_mask_V):
    """Repetition penalty and min-new-tokens: the processors HF applies before the warpers."""
    scores_BV = apply_repetition_penalty(scores_BV, seen_BV, p["repetition_penalty"])
    return apply_min_new_tokens(scores_BV, eos_mask_V, num_new, p["min_new_tokens"])


def _choose(key, logits_BV, seen_BV, num_new, p, eos_mask_V, do_sample: bool):
    scores_BV = _process(logits_BV, seen_BV, num_new, p, eos_mask_V)
    if not do_sample:
        return jnp.argmax(scores_BV, axis=-1).astype(jnp.int32)  # first index among ties, as torch.argmax
    scores_BV = apply_temperature(scores_BV, p["temperature"])
    return sample_tokens(jax.random.fold_in(key, num_new), scores_BV, p["top_k"], p["top_p"],
                         top_p_cut=p["top_p_cut"])


@functools.partial(jax.jit, static_argnames=("graphdef", "do_sample", "num_return_sequences", "new_slots",
                                             "with_logits"))
def _generate_jit(state, ids_BP, mask_BP, prompt_start, eos_mask_V, p, *, graphdef, do_sample: bool,
                  num_return_sequences: int, new_slots: int, with_logits: bool = False):
    """New tokens [B * R, N] (pad after EOS / past max_new_tokens) for left-padded prompts [B, P].

    `with_logits` (tests) also returns each step's raw logits [B * R, N, V].
    """
    model = nnx.merge(graphdef, state)
    B, P = ids_BP.shape
    R, N = num_return_sequences, new_slots
    V = model.config.vocab_size
    mask_BP = mask_BP.astype(bool)
    # Hugging Face's generate: positions count real tokens; padding gets position 1.
    pos_BP = jnp.where(mask_BP, jnp.cumsum(mask_BP, axis=1) - 1, 1).astype(jnp.int32)

    # Prefill each distinct prompt once, into a cache just as long as the prompt; only its last position
    # goes through the LM head (left padding puts every row's last token there).
    h_BPD, pre = model.hidden_states(ids_BP, mask_BP, pos_BP, init_cache(model.config, B, P))
    logits_BV = model.logits(h_BPD[:, -1])
    # The repetition penalty sees the prompt as given (its padding included, as HF does), not our bucket padding.
    seen_BV = token_presence(ids_BP, V, jnp.arange(P)[None, :] >= prompt_start)
    lengths_B = jnp.sum(mask_BP, axis=1, dtype=jnp.int32)

    # num_return_sequences: repeat each row R times (HF's order), and give the cache its N new slots.
    def grow(x, fill=0):
        x = jnp.repeat(x, R, axis=0) if R > 1 else x
        return jnp.pad(x, [(0, 0), (0, N)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

    cache = KVCache(k=tuple(grow(k) for k in pre.k), v=tuple(grow(v) for v in pre.v),
                    valid_BS=grow(pre.valid_BS, False), index=pre.index)
    rep = (lambda x: jnp.repeat(x, R, axis=0)) if R > 1 else (lambda x: x)
    logits_BV, seen_BV, lengths_B = rep(logits_BV), rep(seen_BV), rep(lengths_B)
    BR = B * R
    rows_B = jnp.arange(BR)
    key = jax.random.key(p["seed"])
    pad = p["pad_token_id"]

    def emit(i, tok_B, finished_B, out, seen_BV, logits_BV):
        tok_B = jnp.where(finished_B, pad, tok_B)  # finished rows emit padding
        out_BN = jax.lax.dynamic_update_slice_in_dim(out[0], tok_B[:, None], i, axis=1)
        if with_logits:
            out = (out_BN, jax.lax.dynamic_update_slice_in_dim(out[1], logits_BV[:, None], i, axis=1))
        else:
            out = (out_BN,)
        seen_BV = seen_BV.at[rows_B, tok_B].set(True)
        return tok_B, finished_B | eos_mask_V[tok_B], out, seen_BV

    logits_BV = logits_BV.astype(jnp.float32)
    tok_B = _choose(key, logits_BV, seen_BV, 0, p, eos_mask_V, do_sample)
    out = (jnp.full((BR, N), pad, jnp.int32),)
    if with_logits:
        out += (jnp.zeros((BR, N, V), jnp.float32),)
    tok_B, finished_B, out, seen_BV = emit(0, tok_B, jnp.zeros((BR,), bool), out, seen_BV, logits_BV)

    def cond(carry):
        i, _, finished_B, *_ = carry
        return (i < p["max_new_tokens"]) & ~jnp.all(finished_B)

    def body(carry):
        i, tok_B, finished_B, out, seen_BV, cache = carry
        # Feed the previous token: its position is the row's length plus the tokens generated before it.
        h_B1D, cache = model.hidden_states(tok_B[:, None], None, (lengths_B + i - 1)[:, None], cache)
        logits_BV = model.logits(h_B1D[:, 0]).astype(jnp.float32)
        tok_B = _choose(key, logits_BV, seen_BV, i, p, eos_mask_V, do_sample)
        tok_B, finished_B, out, seen_BV = emit(i, tok_B, finished_B, out, seen_BV, logits_BV)
        return i + 1, tok_B, finished_B, out, seen_BV, cache

    carry = (jnp.int32(1), tok_B, finished_B, out, seen_BV, cache)
    out = jax.lax.while_loop(cond, body, carry)[3]
    return out if with_logits else out[0]


# --- the Python API -----------------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_number(name, value, ok, want):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise GPT2JaxError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)) or not ok(float(value)):
        raise GPT2JaxError(f"{name} must be {want}, got {value}")


def _check_int(name, value, minimum):
    if not _is_int(value):
        raise GPT2JaxError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise GPT2JaxError(f"{name} must be >= {minimum}, got {value}")


def _token_ids(name, value, vocab_size) -> list[int]:
    ids = [value] if _is_int(value) else value
    if not isinstance(ids, (list, tuple)) or not all(_is_int(i) for i in ids):
        raise GPT2JaxError(f"{name} must be a token id or a list of token ids, got {value!r}")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise GPT2JaxError(f"{name} {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return [int(i) for i in ids]


def _prompt_arrays(input_ids, attention_mask, pad_id: int, infer_mask: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, P], mask [B, P]) as int64 numpy, left-padding lists of unequal length.

    `infer_mask`: without attention_mask, mask out `pad_id` wherever it occurs, as HF does when the pad
    token is set and is not an EOS token.
    """
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(r, (list, tuple)) for r in input_ids):
        if attention_mask is not None:
            raise GPT2JaxError("attention_mask is only for an array of input_ids; lists of unequal length "
                               "are padded by generate itself")
        if any(len(r) == 0 for r in input_ids):
            raise GPT2JaxError("empty prompt: every prompt needs at least one token")
        if not all(_is_int(t) for r in input_ids for t in r):
            raise GPT2JaxError("input_ids must hold integer token ids")
        P = max(len(r) for r in input_ids)
        ids = np.full((len(input_ids), P), pad_id, np.int64)
        mask = np.zeros((len(input_ids), P), np.int64)
        for b, r in enumerate(input_ids):
            ids[b, P - len(r):] = r
            mask[b, P - len(r):] = 1
        return ids, mask
    try:
        ids = np.asarray(input_ids)
    except (ValueError, TypeError):
        raise GPT2JaxError("input_ids must be a [batch, length] array or a list of token-id lists") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.size == 0:
        raise GPT2JaxError(f"empty prompt: input_ids has shape {ids.shape}")
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise GPT2JaxError(f"input_ids must be integer token ids of shape [batch, length], got shape "
                           f"{ids.shape} and dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    how = ""
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.ndim == 1:
            mask = mask[None]
        if mask.shape != ids.shape:
            raise GPT2JaxError(f"attention_mask has shape {mask.shape} but input_ids has shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise GPT2JaxError("attention_mask must hold only 0 and 1")
    elif infer_mask and (ids == pad_id).any():
        mask = ids != pad_id
        how = (f" (attention_mask inferred from pad_token_id={pad_id} in input_ids, as Hugging Face does; "
               f"pass one to override)")
    else:
        return ids, np.ones_like(ids)
    mask = mask.astype(np.int64)
    if (mask.sum(axis=1) == 0).any():
        raise GPT2JaxError(f"empty prompt: row {int(np.argmin(mask.sum(axis=1)))} of attention_mask is all 0{how}")
    if (np.diff(mask, axis=1) < 0).any():
        row = int(np.nonzero((np.diff(mask, axis=1) < 0).any(axis=1))[0][0])
        raise GPT2JaxError(f"attention_mask row {row} has padding after a real token: generate needs left "
                           f"padding (tokenizer.padding_side = 'left'){how}")
    return ids, mask


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             min_new_tokens: int = 0, num_return_sequences: int = 1, eos_token_id=None, pad_token_id=None,
             seed: int = 0) -> np.ndarray:
    """Continue each prompt by up to `max_new_tokens` tokens; every argument means what it means in HF `generate`.

    `input_ids`: a [batch, length] array (left-padded, with `attention_mask`) or a list of token-id lists
    of unequal length (left-padded here with `pad_token_id`). Returns int32 [batch * num_return_sequences,
    length + max_new_tokens]: the prompt as given, then the new tokens; rows that emitted EOS (or all rows,
    if all stopped early) are filled with `pad_token_id`. `eos_token_id` defaults to the model config's
    (an int or a list), `pad_token_id` to the config's, else the first EOS. top_k 0 and top_p 1 are off.
    Sampling with a fixed `seed` gives the same tokens every time.
    """
    return _generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                     min_new_tokens=min_new_tokens, num_return_sequences=num_return_sequences,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed)


def _generate(model, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
              repetition_penalty, min_new_tokens, num_return_sequences, eos_token_id, pad_token_id, seed,
              with_logits=False):
    cfg = model.config
    V = cfg.vocab_size
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("top_k", top_k, 0)
    _check_number("top_p", top_p, lambda x: 0 < x <= 1, "in (0, 1]")
    _check_number("repetition_penalty", repetition_penalty, lambda x: x > 0, "> 0")
    _check_int("min_new_tokens", min_new_tokens, 0)
    _check_int("num_return_sequences", num_return_sequences, 1)
    _check_int("seed", seed, 0)
    if do_sample:
        _check_number("temperature", temperature, lambda x: x > 0,
                      "> 0 when sampling (for greedy decoding use do_sample=False)")
    elif num_return_sequences > 1:
        raise GPT2JaxError(f"num_return_sequences={num_return_sequences} needs do_sample=True: greedy decoding "
                           f"gives the same sequence every time")
    eos_ids = [] if eos_token_id is None and cfg.eos_token_id is None else _token_ids(
        "eos_token_id", cfg.eos_token_id if eos_token_id is None else eos_token_id, V)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    pad_id = _token_ids("pad_token_id", pad_token_id, V)[0] if _is_int(pad_token_id) else None
    if pad_id is None:
        raise GPT2JaxError(f"pad_token_id must be one token id, got {pad_token_id!r}")

    ids, mask = _prompt_arrays(input_ids, attention_mask, pad_id, infer_mask=pad_id not in eos_ids)
    if ids.min() < 0 or ids.max() >= V:
        bad = int(ids[(ids < 0) | (ids >= V)][0])
        raise GPT2JaxError(f"input_ids holds token id {bad}, outside the vocabulary [0, {V})")
    B, P = ids.shape
    longest = int(mask.sum(axis=1).max())
    if longest + max_new_tokens > cfg.n_positions:
        raise GPT2JaxError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                           f"{longest + max_new_tokens} exceeds the model's n_positions ({cfg.n_positions})")

    # Bucketing: left-pad the prompt to a power-of-two width and round the new-token slots up likewise,
    # so nearby lengths share one compiled program (the loop still stops after max_new_tokens).
    P_b, N_b = bucket_length(P), bucket_length(max_new_tokens)
    ids_b = np.full((B, P_b), pad_id, np.int32)
    mask_b = np.zeros((B, P_b), np.int32)
    ids_b[:, P_b - P:], mask_b[:, P_b - P:] = ids, mask
    eos_mask = np.zeros((V,), bool)
    eos_mask[eos_ids] = True
    params = dict(  # every one traced: new values reuse the compiled program
        temperature=np.float32(temperature if do_sample else 1.0), top_k=np.int32(min(top_k, V)),
        top_p=np.float32(top_p), top_p_cut=_one_minus(top_p),
        repetition_penalty=np.float32(repetition_penalty), min_new_tokens=np.int32(min(min_new_tokens, 2**30)),
        max_new_tokens=np.int32(max_new_tokens), pad_token_id=np.int32(pad_id),
        seed=np.uint32(seed % 2**32))
    graphdef, state = nnx.split(model)
    out = _generate_jit(state, ids_b, mask_b, np.int32(P_b - P), eos_mask, params, graphdef=graphdef,
                        do_sample=bool(do_sample), num_return_sequences=num_return_sequences, new_slots=N_b,
                        with_logits=with_logits)
    new_BN = out[0] if with_logits else out
    prompt = np.repeat(ids, num_return_sequences, axis=0).astype(np.int32)
    seqs = np.concatenate([prompt, np.asarray(new_BN)[:, :max_new_tokens]], axis=1)
    return (seqs, np.asarray(out[1])[:, :max_new_tokens]) if with_logits else seqs


def generate_text(model, tokenizer, prompts: Sequence[Sequence[int]], **kwargs) -> list[str]:
    """Generate from token-id prompts and decode only the new tokens (up to EOS, special tokens skipped).

    Returns `len(prompts) * num_return_sequences` strings, each prompt's samples together. EOS and padding
    default to the tokenizer's ids.
    """
    kwargs.setdefault("eos_token_id", tokenizer.eos_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_id)
    if not prompts:
        raise GPT2JaxError("no prompts to generate from")
    prompts = [list(p) for p in prompts]
    out = generate(model, prompts, **kwargs)
    P = max(len(p) for p in prompts)
    eos = kwargs["eos_token_id"]
    eos = {eos} if _is_int(eos) else set(eos or ())
    texts = []
    for row in out[:, P:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts
