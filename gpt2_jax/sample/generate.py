"""Generation: one jitted prefill + decode loop over a KV cache, and the Python API around it.

Shape letters: B batch (rows after `num_return_sequences`), P prompt slots (bucketed), N new-token slots
(bucketed), S cache slots (P + N), V vocabulary, D n_embd, K keywords per row and L tokens per keyword
(both bucketed).

`generate` left-pads the prompts to a bucketed length, prefills them in one pass into a KV cache, then
decodes one token per row per step in a `lax.while_loop` inside the same `jax.jit`, stopping once every
row has emitted EOS. The cache is allocated inside that jit for prompt + new slots and carried through
the loop, where XLA updates it in place: no copy per step and no buffer to donate. Every sampling setting
travels in `SamplingParams`, whose fields are all traced: only the model's graph, `do_sample`,
`num_return_sequences`, the batch size and the two bucketed lengths are static, so changing temperature,
top-k, top-p, the penalty, `min_new_tokens`, `max_new_tokens` (within a bucket), the special ids or the
seed reuses the compiled program. Each token is chosen by the processors of sample/processors.py.

Keyword-guided sampling (`keywords`, `keyword_boost`): each row's keywords travel as token ids [B, K, L],
and the loop's state tracks, per row and keyword, how much of it the text ends with and whether it has been
written whole, so the boost moves from a keyword's first token to its next ones and stops once it is done,
all inside the compiled loop.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from gpt2_jax.model.kv_cache import KVCache, init_cache
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.text import keyword_token_ids
from gpt2_jax.sample.processors import (apply_keyword_boost, apply_min_new_tokens, apply_repetition_penalty,
                                 apply_temperature, glue_ids, keyword_array, keyword_guidance, one_minus_top_p,
                                 sample_tokens, token_presence, update_keyword_match)

# Smallest bucket for the prompt and for the new tokens; buckets are powers of two above it.
MIN_BUCKET = 16
# Smallest buckets for the keywords per row and the tokens per keyword.
MIN_KEYWORD_BUCKET = 4


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """The compiled length for `n` slots: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@struct.dataclass
class SamplingParams:
    """The settings of one `generate` call. Every field is a traced leaf: new values reuse the compiled loop."""

    temperature: jax.Array  # float32 scalar; 1 when greedy
    top_k: jax.Array  # int32 scalar; 0: off
    top_p: jax.Array  # float32 scalar; 1: off
    top_p_cut: jax.Array  # float32 scalar: 1 - top_p rounded as HF rounds it (one_minus_top_p)
    repetition_penalty: jax.Array  # float32 scalar; 1: off
    penalize_prompt: jax.Array  # bool scalar: the penalty counts the prompt's tokens (HF's default) or only new ones
    min_new_tokens: jax.Array  # int32 scalar: EOS is blocked before this many new tokens
    max_new_tokens: jax.Array  # int32 scalar: the loop stops after this many (<= the N slots)
    pad_token_id: jax.Array  # int32 scalar: what finished rows emit
    eos_mask_V: jax.Array  # bool [V]: which tokens end a row
    seed: jax.Array  # uint32 scalar
    keyword_boost: jax.Array  # float32 scalar: added to the keywords' next tokens (processors.apply_keyword_boost)
    keyword_window: jax.Array  # float32 scalar: a keyword starts only within this of the best score (inf: off)
    keyword_ramp: jax.Array  # float32 scalar: the window's widening per keyword behind the even pace
    keyword_lead: jax.Array  # float32 scalar: keywords a row may write ahead of the pace (inf: off)
    keyword_hold: jax.Array  # float32 scalar: > 0: no EOS while a keyword is missing, no glue after one
    glue_mask_V: jax.Array  # bool [V]: tokens that continue the word before them (processors.glue_mask)

    @classmethod
    def of(cls, *, vocab_size: int, do_sample: bool, temperature, top_k, top_p, repetition_penalty,
           min_new_tokens, max_new_tokens, pad_token_id: int, eos_ids: Sequence[int], seed,
           keyword_boost=0.0, keyword_wait=None, glue_ids=(), penalize_prompt=True) -> "SamplingParams":
        """From checked Python values, as fixed-dtype numpy scalars (so no value becomes a constant)."""
        eos_mask_V = np.zeros((vocab_size,), bool)
        eos_mask_V[list(eos_ids)] = True
        glue_mask_V = np.zeros((vocab_size,), bool)
        glue_mask_V[[i for i in glue_ids if i < vocab_size]] = True
        return cls(temperature=np.float32(temperature if do_sample else 1.0),
                   top_k=np.int32(min(top_k, vocab_size)), top_p=np.float32(top_p),
                   top_p_cut=one_minus_top_p(top_p), repetition_penalty=np.float32(repetition_penalty),
                   penalize_prompt=np.bool_(penalize_prompt),
                   min_new_tokens=np.int32(min(min_new_tokens, 2**30)), max_new_tokens=np.int32(max_new_tokens),
                   pad_token_id=np.int32(pad_token_id), eos_mask_V=eos_mask_V, seed=np.uint32(seed % 2**32),
                   keyword_boost=np.float32(keyword_boost), glue_mask_V=glue_mask_V,
                   **{f"keyword_{k}": np.float32(v) for k, v in keyword_guidance(keyword_wait).items()})


@struct.dataclass
class DecodeState:
    """The `while_loop` carry (as flax's gemma sampler's `_SamplingState`)."""

    step: jax.Array  # int32 scalar: new tokens emitted so far (the slot the next one fills)
    token_B: jax.Array  # int32 [B]: the last token emitted, fed to the next step
    finished_B: jax.Array  # bool [B]: the row has emitted EOS
    out_BN: jax.Array  # int32 [B, N]: the new tokens, padding after EOS
    seen_BV: jax.Array  # bool [B, V]: tokens in the prompt or emitted, for the repetition penalty
    cache: KVCache  # S = P + N slots
    kw_BKL: jax.Array  # int32 [B, K, L]: the keywords' token ids, -1 padded (K = 0: no keywords)
    kw_match_BK: jax.Array  # int32 [B, K]: how many tokens of each keyword the generated text ends with
    kw_done_BK: jax.Array  # bool [B, K]: the keyword has been generated whole: no longer boosted
    kw_ended_B: jax.Array  # bool [B]: the last token finished a keyword


# --- the compiled loop --------------------------------------------------------------------------------

def _choose(key, logits_BV, s: DecodeState, num_new, p: SamplingParams, do_sample: bool):
    """The next token per row: HF's processors (and the keyword boost), then argmax or a draw."""
    scores_BV = apply_repetition_penalty(logits_BV, s.seen_BV, p.repetition_penalty)
    if s.kw_BKL.shape[1]:  # static: without keywords the program is exactly the one without the boost
        scores_BV = apply_keyword_boost(scores_BV, s.kw_BKL, s.kw_match_BK, s.kw_done_BK, p.keyword_boost,
                                        num_new=num_new, max_new=p.max_new_tokens, window=p.keyword_window,
                                        ramp=p.keyword_ramp, lead=p.keyword_lead, hold=p.keyword_hold,
                                        eos_mask_V=p.eos_mask_V, ended_B=s.kw_ended_B, glue_mask_V=p.glue_mask_V)
    scores_BV = apply_min_new_tokens(scores_BV, p.eos_mask_V, num_new, p.min_new_tokens)
    if not do_sample:
        return jnp.argmax(scores_BV, axis=-1).astype(jnp.int32)  # first index among ties, as torch.argmax
    scores_BV = apply_temperature(scores_BV, p.temperature)
    return sample_tokens(jax.random.fold_in(key, num_new), scores_BV, p.top_k, p.top_p, top_p_cut=p.top_p_cut)


def _emit(s: DecodeState, tok_B, p: SamplingParams) -> DecodeState:
    """Write the chosen tokens into slot `s.step` (padding for finished rows) and advance one step."""
    tok_B = jnp.where(s.finished_B, p.pad_token_id, tok_B)
    rows_B = jnp.arange(tok_B.shape[0])
    if s.kw_BKL.shape[1]:
        match_BK, done_BK = update_keyword_match(s.kw_BKL, s.kw_match_BK, s.kw_done_BK, tok_B)
        s = s.replace(kw_match_BK=match_BK, kw_done_BK=done_BK, kw_ended_B=jnp.any(done_BK & ~s.kw_done_BK, axis=1))
    return s.replace(step=s.step + 1, token_B=tok_B, finished_B=s.finished_B | p.eos_mask_V[tok_B],
                     out_BN=jax.lax.dynamic_update_slice_in_dim(s.out_BN, tok_B[:, None], s.step, axis=1),
                     seen_BV=s.seen_BV.at[rows_B, tok_B].set(True))


@functools.partial(jax.jit, static_argnames=("graphdef", "do_sample", "num_return_sequences", "new_slots"))
def generate_program(state, ids_BP, mask_BP, prompt_start, kw_BKL, p: SamplingParams, *, graphdef,
                     do_sample: bool, num_return_sequences: int, new_slots: int):
    """The jitted program behind `generate` (aot/programs.py compiles it for TPU): new tokens [B * R, N] (pad after EOS
    and past max_new_tokens) for left-padded prompts [B, P] and their keywords [B, K, L] (K = 0: none)."""
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
    logits_BV = model.logits(h_BPD[:, -1]).astype(jnp.float32)
    # The repetition penalty sees the prompt as given (its padding included, as HF does), not our bucket padding;
    # or, with penalize_prompt off, none of it (HF's prompt_ignore_length = the prompt's padded length).
    seen_BV = token_presence(ids_BP, V, (jnp.arange(P)[None, :] >= prompt_start) & p.penalize_prompt)
    lengths_B = jnp.sum(mask_BP, axis=1, dtype=jnp.int32)

    # num_return_sequences: repeat each row R times (HF's order), and give the cache its N new slots.
    def grow(x, fill=0):
        x = jnp.repeat(x, R, axis=0) if R > 1 else x
        return jnp.pad(x, [(0, 0), (0, N)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

    cache = KVCache(k=tuple(grow(k) for k in pre.k), v=tuple(grow(v) for v in pre.v),
                    valid_BS=grow(pre.valid_BS, False), index=pre.index)
    rep = (lambda x: jnp.repeat(x, R, axis=0)) if R > 1 else (lambda x: x)
    logits_BV, seen_BV, lengths_B, kw_BKL = rep(logits_BV), rep(seen_BV), rep(lengths_B), rep(kw_BKL)
    BR, K = B * R, kw_BKL.shape[1]
    key = jax.random.key(p.seed)

    # Keywords count from the first new token: their copies in the prompt do not make them done.
    s = DecodeState(step=jnp.int32(0), token_B=jnp.zeros((BR,), jnp.int32), finished_B=jnp.zeros((BR,), bool),
                    out_BN=jnp.full((BR, N), p.pad_token_id, jnp.int32), seen_BV=seen_BV, cache=cache,
                    kw_BKL=kw_BKL, kw_match_BK=jnp.zeros((BR, K), jnp.int32), kw_done_BK=jnp.zeros((BR, K), bool),
                    kw_ended_B=jnp.zeros((BR,), bool))
    s = _emit(s, _choose(key, logits_BV, s, 0, p, do_sample), p)

    def cond(s: DecodeState):
        return (s.step < p.max_new_tokens) & ~jnp.all(s.finished_B)

    def body(s: DecodeState):
        # Feed the previous token: its position is the row's length plus the tokens generated before it.
        h_B1D, cache = model.hidden_states(s.token_B[:, None], None, (lengths_B + s.step - 1)[:, None], s.cache)
        logits_BV = model.logits(h_B1D[:, 0]).astype(jnp.float32)
        tok_B = _choose(key, logits_BV, s, s.step, p, do_sample)
        return _emit(s.replace(cache=cache), tok_B, p)

    return jax.lax.while_loop(cond, body, s).out_BN


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
    if isinstance(input_ids, (list, tuple)) and not input_ids:
        raise GPT2JaxError("empty prompt: no prompts to generate from")
    if isinstance(input_ids, (list, tuple)) and all(isinstance(r, (list, tuple)) for r in input_ids):
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


def check_sampling(*, max_new_tokens: int, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
                   repetition_penalty=1.0, min_new_tokens=0, num_return_sequences=1, seed=0, keyword_boost=0.0,
                   keyword_wait=None, penalize_prompt=True) -> None:
    """`generate`'s checks of its settings (with its defaults), for callers to run before they load or write."""
    for n, v, least in (("max_new_tokens", max_new_tokens, 1), ("top_k", top_k, 0), ("seed", seed, 0),
                        ("min_new_tokens", min_new_tokens, 0), ("num_return_sequences", num_return_sequences, 1)):
        _check_int(n, v, least)
    _check_number("top_p", top_p, lambda x: 0 < x <= 1, "in (0, 1]")
    _check_number("repetition_penalty", repetition_penalty, lambda x: x > 0, "> 0")
    _check_number("keyword_boost", keyword_boost, lambda x: x >= 0, ">= 0")
    keyword_guidance(keyword_wait)
    if do_sample:
        _check_number("temperature", temperature, lambda x: x > 0,
                      "> 0 when sampling (for greedy decoding use do_sample=False)")
    elif num_return_sequences > 1:
        raise GPT2JaxError(f"num_return_sequences={num_return_sequences} needs do_sample=True: greedy decoding "
                           f"gives the same sequence every time")


def special_ids(config, eos_token_id=None, pad_token_id=None) -> tuple[list[int], int]:
    """(EOS ids, pad id) as `generate` resolves them: by default the config's (pad: else the first EOS, else 0)."""
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [] if eos is None else _token_ids("eos_token_id", eos, config.vocab_size)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if not _is_int(pad_token_id):
        raise GPT2JaxError(f"pad_token_id must be one token id, got {pad_token_id!r}")
    return eos_ids, _token_ids("pad_token_id", pad_token_id, config.vocab_size)[0]


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             min_new_tokens: int = 0, num_return_sequences: int = 1, eos_token_id=None, pad_token_id=None,
             seed: int = 0, keyword_boost: float = 0.0, keyword_wait=None, keywords=None, glue_ids=(),
             penalize_prompt: bool = True) -> np.ndarray:
    """Continue each prompt by up to `max_new_tokens` tokens; every argument means what it means in HF `generate`.

    `input_ids`: a [batch, length] array (left-padded, with `attention_mask`) or a list of token-id lists
    of unequal length (left-padded here with `pad_token_id`). Returns int32 [batch * num_return_sequences,
    length + max_new_tokens]: the prompt as given, then the new tokens; rows that emitted EOS (or all rows,
    if all stopped early) are filled with `pad_token_id`. `eos_token_id` defaults to the model config's
    (an int or a list), `pad_token_id` to the config's, else the first EOS. top_k 0 and top_p 1 are off.
    Sampling with a fixed `seed` gives the same tokens every time.

    `keywords`: per prompt, a list of keyword token-id sequences (text.keyword_token_ids); each keyword's next
    token gets `keyword_boost` added to its score until the keyword has been generated whole (see
    processors.apply_keyword_boost). `keyword_wait` True lets a keyword start only where the model already
    ranks it high, paced over the text, and after one no token of `glue_ids` (processors.glue_ids: those that
    would extend its last word). All traced: new values reuse the compiled program.

    `penalize_prompt=False`: the repetition penalty counts only the new tokens, as HF's
    `RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=prompt length)`; with a title and keywords
    in the prompt, HF's default (True) penalises exactly the keywords the text should use. Traced too.
    """
    cfg = model.config
    V = cfg.vocab_size
    settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                    top_p=top_p, repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens, seed=seed,
                    keyword_boost=keyword_boost, keyword_wait=keyword_wait, penalize_prompt=bool(penalize_prompt))
    check_sampling(num_return_sequences=num_return_sequences, **settings)
    eos_ids, pad_id = special_ids(cfg, eos_token_id, pad_token_id)
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
    kw_BKL = (np.full((B, 0, 1), -1, np.int32) if keywords is None else
              keyword_array(keywords, B, V, lambda n: bucket_length(n, MIN_KEYWORD_BUCKET)))
    params = SamplingParams.of(vocab_size=V, pad_token_id=pad_id, eos_ids=eos_ids, glue_ids=glue_ids, **settings)
    graphdef, state = nnx.split(model)
    new_BN = generate_program(state, ids_b, mask_b, np.int32(P_b - P), kw_BKL, params, graphdef=graphdef,
                           do_sample=bool(do_sample), num_return_sequences=num_return_sequences, new_slots=N_b)
    prompt = np.repeat(ids, num_return_sequences, axis=0).astype(np.int32)
    return np.concatenate([prompt, np.asarray(new_BN)[:, :max_new_tokens]], axis=1)


def generate_tokens(model, tokenizer, prompts: Sequence[Sequence[int]], *,
                    keywords: Sequence[Sequence[str]] | None = None, keyword_boost: float = 0.0,
                    **kwargs) -> list[list[int]]:
    """`generate` from token-id prompts; each row's new tokens up to its first EOS.

    Returns `len(prompts) * num_return_sequences` rows, each prompt's samples together. EOS and padding
    default to the tokenizer's ids. `keywords`: per prompt, keyword strings; they reach `generate` only with a
    `keyword_boost` (and some keyword), so that without one the program and the tokens are plain sampling's.
    """
    kwargs = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, **kwargs}
    prompts = [list(p) for p in prompts]
    ids = [keyword_token_ids(tokenizer, k) for k in keywords] if keywords is not None and keyword_boost else None
    glue = glue_ids(tokenizer) if ids and any(ids) and kwargs.get("keyword_wait") else ()
    out = generate(model, prompts, keywords=ids if ids and any(ids) else None, keyword_boost=keyword_boost,
                   glue_ids=glue, **kwargs)
    return new_tokens(out[:, max(map(len, prompts)):], kwargs["eos_token_id"])


def generate_text(model, tokenizer, prompts: Sequence[Sequence[int]], **kwargs) -> list[str]:
    """`generate_tokens` decoded, special tokens skipped: one string per row."""
    new = generate_tokens(model, tokenizer, prompts, **kwargs)
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in new]


def new_tokens(new_BN: np.ndarray, eos_token_id) -> list[list[int]]:
    """Each row's generated tokens up to (not including) its first EOS."""
    eos = {eos_token_id} if _is_int(eos_token_id) else set(eos_token_id or ())
    return [row[:next((i for i, t in enumerate(row) if t in eos), len(row))] for row in np.asarray(new_BN).tolist()]
