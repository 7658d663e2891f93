"""The engine's jitted programs: a table of S slots over a preallocated KV cache; prefill, insert, decode.

Shape letters: S slots, M cache positions per slot, B prefill rows (bucketed), R rows of either kind
(B or S), P prompt positions (bucketed), V vocabulary, D n_embd, K keywords per slot and L tokens per
keyword (fixed per engine), T decode steps per call, A top-logprob alternatives.

Each slot holds one request: its cache rows, where its next token goes, what it has emitted, its keyword
state and its sampling settings, every one a traced [S] leaf, so a new mix of requests reuses the compiled
programs. A slot's prompt sits at cache positions [0, p) (right-padded prefill) and its new tokens follow,
so positions equal cache indices; the decode step runs the model once per slot under `jax.vmap` (a batch of
one each, with that slot's own cache index), so slots of any lengths decode together and a slot's tokens do
not depend on its neighbours. Tokens are chosen as `generate` chooses them (sample/generate.py): the same
processors in the same order, argmax when greedy, and when sampling `sample_tokens` row by row
(`lax.map`, one row at a time, so its `lax.cond` fallbacks stay real branches) with the key
`fold_in(key(seed), tokens emitted so far)`: a seeded request samples exactly what a one-prompt `generate`
call with that seed samples.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from gpt2_jax.model.kv_cache import KVCache, init_cache
from gpt2_jax.sample.processors import (CANDIDATE_CAPS, apply_keyword_boost, apply_min_new_tokens,
                                        apply_repetition_penalty, apply_temperature, filter_candidates,
                                        sample_tokens, token_presence, update_keyword_match)

TOP_LOGPROBS = 5  # the most alternatives a request may ask logprobs of (OpenAI's completions limit)


@struct.dataclass
class RowParams:
    """Per-request sampling settings, each a traced [R] array (see sample/generate.py's SamplingParams)."""

    do_sample: jax.Array  # bool
    temperature: jax.Array  # float32; 1 when greedy
    top_k: jax.Array  # int32; 0: off
    top_p: jax.Array  # float32; 1: off
    top_p_cut: jax.Array  # float32: processors.one_minus_top_p(top_p)
    repetition_penalty: jax.Array  # float32; 1: off
    penalize_prompt: jax.Array  # bool
    min_new_tokens: jax.Array  # int32
    max_new_tokens: jax.Array  # int32
    seed: jax.Array  # uint32
    keyword_boost: jax.Array  # float32; 0: off
    keyword_window: jax.Array  # float32: keyword guidance's window, ramp, lead and hold (processors.keyword_guidance)
    keyword_ramp: jax.Array  # float32
    keyword_lead: jax.Array  # float32
    keyword_hold: jax.Array  # float32
    logprobs: jax.Array  # bool: compute the chosen token's logprob and the top alternatives


@struct.dataclass
class Rows:
    """The decoding state of R requests: prefilled rows [B] or the slot table's [S]."""

    token: jax.Array  # int32 [R]: the last token emitted, fed next
    pos: jax.Array  # int32 [R]: its position (= cache index): prompt length + tokens fed since
    num_new: jax.Array  # int32 [R]: tokens emitted so far
    active: jax.Array  # bool [R]: still decoding
    seen_RV: jax.Array  # bool [R, V]: tokens penalised by the repetition penalty
    kw_RKL: jax.Array  # int32 [R, K, L]: keyword token ids, -1 padded
    kw_match_RK: jax.Array  # int32 [R, K]
    kw_done_RK: jax.Array  # bool [R, K]
    kw_ended_R: jax.Array  # bool [R]: the last token finished a keyword
    p: RowParams


@struct.dataclass
class TokenMasks:
    """The engine's fixed token sets."""

    eos_V: jax.Array  # bool [V]: tokens that end a request
    glue_V: jax.Array  # bool [V]: tokens that continue the word before them (processors.glue_ids)


@struct.dataclass
class Table:
    """The engine's device state: S slots' rows and their cache (k, v: L layers of [S, M, H, head width])."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid_SM: jax.Array  # bool [S, M]: the position holds a real token
    rows: Rows


@struct.dataclass
class Chosen:
    """One chosen token per row, with its logprob and the top alternatives' (zeros unless asked for)."""

    token: jax.Array  # int32 [R]
    logprob: jax.Array  # float32 [R]
    top_ids_RA: jax.Array  # int32 [R, A]
    top_logprobs_RA: jax.Array  # float32 [R, A]


def empty_rows(n: int, vocab_size: int, keywords: int, keyword_tokens: int) -> Rows:
    """R = n idle rows (numpy)."""
    z = lambda dtype: np.zeros((n,), dtype)
    p = RowParams(do_sample=z(bool), temperature=np.ones((n,), np.float32), top_k=z(np.int32),
                  top_p=np.ones((n,), np.float32), top_p_cut=z(np.float32),
                  repetition_penalty=np.ones((n,), np.float32), penalize_prompt=z(bool),
                  min_new_tokens=z(np.int32), max_new_tokens=z(np.int32), seed=z(np.uint32),
                  keyword_boost=z(np.float32), keyword_window=np.full((n,), np.inf, np.float32),
                  keyword_ramp=z(np.float32), keyword_lead=np.full((n,), np.inf, np.float32),
                  keyword_hold=z(np.float32), logprobs=z(bool))
    return Rows(token=z(np.int32), pos=z(np.int32), num_new=z(np.int32), active=z(bool),
                seen_RV=np.zeros((n, vocab_size), bool), kw_RKL=np.full((n, keywords, keyword_tokens), -1, np.int32),
                kw_match_RK=np.zeros((n, keywords), np.int32), kw_done_RK=np.zeros((n, keywords), bool),
                kw_ended_R=z(bool), p=p)


def empty_table(config, slots: int, max_length: int, keywords: int, keyword_tokens: int) -> Table:
    cache = init_cache(config, slots, max_length)
    return Table(k=cache.k, v=cache.v, valid_SM=cache.valid_BS,
                 rows=jax.tree.map(jnp.asarray, empty_rows(slots, config.vocab_size, keywords, keyword_tokens)))


# --- choosing a token -------------------------------------------------------------------------------------

def keyword_scores(scores_RV, rows: Rows, masks: TokenMasks):
    """The one place the engine applies keyword guidance (processors.apply_keyword_boost), per-row settings."""
    p = rows.p
    return apply_keyword_boost(scores_RV, rows.kw_RKL, rows.kw_match_RK, rows.kw_done_RK, p.keyword_boost,
                               num_new=rows.num_new, max_new=p.max_new_tokens, window=p.keyword_window,
                               ramp=p.keyword_ramp, lead=p.keyword_lead, hold=p.keyword_hold, eos_mask_V=masks.eos_V,
                               ended_B=rows.kw_ended_R, glue_mask_V=masks.glue_V)


def _sample(scores_RV, rows: Rows, want_R):
    """Sampled tokens (0 where not wanted), each row's as a one-prompt `generate` draws it. When the first
    candidate cap decides every wanted row exactly (sample_tokens' fast path), the candidates are filtered for
    all rows at once and each row draws from them with its own key; otherwise row by row (`_sample_rows`)."""
    p = rows.p
    vals_RC, ids_RC, exact_R = filter_candidates(scores_RV, p.top_k, p.top_p, CANDIDATE_CAPS[0], top_p_cut=p.top_p_cut)

    def fast():
        keys = jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.key(seed), n))(p.seed, rows.num_new)
        j_R = jax.vmap(lambda key, v_C: jax.random.categorical(key, v_C[None], axis=-1)[0])(keys, vals_RC)
        return jnp.take_along_axis(ids_RC, j_R[:, None], axis=1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(jnp.all(exact_R | ~want_R), fast, lambda: _sample_rows(scores_RV, rows, want_R))


def _sample_rows(scores_RV, rows: Rows, want_R):
    """Sampled tokens, one row at a time (generate's draw for a batch of one), 0 where not wanted."""
    p = rows.p

    def one(x):
        s_V, seed, n, top_k, top_p, cut, want = x

        def draw():
            key = jax.random.fold_in(jax.random.key(seed), n)
            return sample_tokens(key, s_V[None], top_k, top_p, top_p_cut=cut)[0]

        return jax.lax.cond(want, draw, lambda: jnp.int32(0))

    return jax.lax.map(one, (scores_RV, p.seed, rows.num_new, p.top_k, p.top_p, p.top_p_cut, want_R))


def _logprobs(logits_RV, tok_R, want_R) -> Chosen:
    R = tok_R.shape[0]

    def compute():
        lp_RV = jax.nn.log_softmax(logits_RV, axis=-1)
        top_RA, ids_RA = jax.lax.top_k(lp_RV, TOP_LOGPROBS)
        return jnp.take_along_axis(lp_RV, tok_R[:, None], axis=1)[:, 0], ids_RA.astype(jnp.int32), top_RA

    def skip():
        return (jnp.zeros((R,), jnp.float32), jnp.zeros((R, TOP_LOGPROBS), jnp.int32),
                jnp.zeros((R, TOP_LOGPROBS), jnp.float32))

    lp_R, ids_RA, top_RA = jax.lax.cond(jnp.any(want_R), compute, skip)
    return Chosen(token=tok_R, logprob=lp_R, top_ids_RA=ids_RA, top_logprobs_RA=top_RA)


def choose(logits_RV, rows: Rows, masks: TokenMasks, live_R) -> Chosen:
    """The next token of each live row: generate's processors, then argmax or a seeded draw."""
    p = rows.p
    scores_RV = apply_repetition_penalty(logits_RV, rows.seen_RV, p.repetition_penalty)
    scores_RV = keyword_scores(scores_RV, rows, masks)
    scores_RV = apply_min_new_tokens(scores_RV, masks.eos_V, rows.num_new, p.min_new_tokens)
    greedy_R = jnp.argmax(scores_RV, axis=-1).astype(jnp.int32)  # first index among ties, as torch.argmax
    want_R = live_R & p.do_sample
    sampled_R = jax.lax.cond(jnp.any(want_R),
                             lambda: _sample(apply_temperature(scores_RV, p.temperature), rows, want_R),
                             lambda: jnp.zeros_like(greedy_R))
    tok_R = jnp.where(p.do_sample, sampled_R, greedy_R)
    return _logprobs(logits_RV, tok_R, live_R & p.logprobs)


def emit(rows: Rows, tok_R, live_R, masks: TokenMasks) -> Rows:
    """Rows after the live ones emitted `tok_R`: one more token, its keyword matches, finished on EOS or max."""
    match_RK, done_RK = update_keyword_match(rows.kw_RKL, rows.kw_match_RK, rows.kw_done_RK, tok_R)
    num_new = rows.num_new + 1
    R = tok_R.shape[0]
    ended_R = masks.eos_V[tok_R] | (num_new >= rows.p.max_new_tokens)
    keep = lambda new, old: jnp.where(live_R.reshape((R,) + (1,) * (new.ndim - 1)), new, old)
    return rows.replace(token=keep(tok_R, rows.token), num_new=keep(num_new, rows.num_new),
                        active=keep(~ended_R, rows.active),
                        seen_RV=rows.seen_RV.at[jnp.arange(R), jnp.where(live_R, tok_R, rows.seen_RV.shape[1])]
                        .set(True, mode="drop"),
                        kw_match_RK=keep(match_RK, rows.kw_match_RK), kw_done_RK=keep(done_RK, rows.kw_done_RK),
                        kw_ended_R=keep(jnp.any(done_RK & ~rows.kw_done_RK, axis=1), rows.kw_ended_R))


# --- the programs ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef",))
def prefill(state, ids_BP, len_B, rows: Rows, masks: TokenMasks, *, graphdef):
    """Prompts right-padded to [B, P] (rows of length 0 are padding) through the model into a cache of P
    positions, and their first tokens chosen. Returns (k, v, valid_BP, rows after the first token, Chosen)."""
    model = nnx.merge(graphdef, state)
    B, P = ids_BP.shape
    mask_BP = jnp.arange(P)[None, :] < len_B[:, None]
    pos_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    h_BPD, cache = model.hidden_states(ids_BP, mask_BP, pos_BP, init_cache(model.config, B, P))
    h_BD = jnp.take_along_axis(h_BPD, jnp.maximum(len_B - 1, 0)[:, None, None], axis=1)[:, 0]
    logits_BV = model.logits(h_BD).astype(jnp.float32)
    live_B = len_B > 0
    # The repetition penalty sees the prompt (penalize_prompt, HF's default) or only the new tokens.
    seen_BV = token_presence(ids_BP, model.config.vocab_size, mask_BP & rows.p.penalize_prompt[:, None])
    rows = rows.replace(seen_RV=seen_BV, pos=len_B.astype(jnp.int32), active=live_B)
    chosen = choose(logits_BV, rows, masks, live_B)
    return cache.k, cache.v, cache.valid_BS, emit(rows, chosen.token, live_B, masks), chosen


@functools.partial(jax.jit, donate_argnames=("table",))
def insert(table: Table, k, v, valid_BP, rows: Rows, slot_B) -> Table:
    """Write prefilled rows into slots `slot_B` (S or more: a padding row, dropped)."""
    P = valid_BP.shape[1]
    put = lambda t, x: t.at[slot_B, :P].set(x, mode="drop")
    return Table(k=tuple(map(put, table.k, k)), v=tuple(map(put, table.v, v)), valid_SM=put(table.valid_SM, valid_BP),
                 rows=jax.tree.map(lambda t, x: t.at[slot_B].set(x, mode="drop"), table.rows, rows))


def _forward(model, table: Table):
    """Feed each slot's last token at its position: the logits [S, V] and the table with the cache written."""

    def one(tok, pos, k, v, valid_M):  # a batch of one, with this slot's own cache index
        cache = KVCache(k=tuple(x[None] for x in k), v=tuple(x[None] for x in v), valid_BS=valid_M[None], index=pos)
        h_11D, cache = model.hidden_states(tok[None, None], None, pos[None, None], cache)
        return h_11D[0, 0], tuple(x[0] for x in cache.k), tuple(x[0] for x in cache.v), cache.valid_BS[0]

    r = table.rows
    h_SD, k, v, valid_SM = jax.vmap(one)(r.token, r.pos, table.k, table.v, table.valid_SM)
    return model.logits(h_SD).astype(jnp.float32), table.replace(k=k, v=v, valid_SM=valid_SM)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnames=("table",))
def decode(state, table: Table, occupied_S, masks: TokenMasks, *, graphdef, steps: int):
    """`steps` tokens for every active slot (slots not `occupied_S` are first deactivated). Returns the table and
    Chosen with [S, T] leaves, token -1 where a slot was not live at that step."""
    model = nnx.merge(graphdef, state)
    table = table.replace(rows=table.rows.replace(active=table.rows.active & occupied_S))
    S = occupied_S.shape[0]
    out = Chosen(token=jnp.full((S, steps), -1, jnp.int32), logprob=jnp.zeros((S, steps), jnp.float32),
                 top_ids_RA=jnp.zeros((S, steps, TOP_LOGPROBS), jnp.int32),
                 top_logprobs_RA=jnp.zeros((S, steps, TOP_LOGPROBS), jnp.float32))

    def body(t, carry):
        table, out = carry
        live_S = table.rows.active
        logits_SV, table = _forward(model, table)
        chosen = choose(logits_SV, table.rows, masks, live_S)
        chosen = chosen.replace(token=jnp.where(live_S, chosen.token, -1))
        rows = emit(table.rows, chosen.token, live_S, masks)
        rows = rows.replace(pos=jnp.where(live_S, rows.pos + 1, rows.pos))
        out = jax.tree.map(lambda o, c: o.at[:, t].set(c), out, chosen)
        return table.replace(rows=rows), out

    return jax.lax.fori_loop(0, steps, body, (table, out))
