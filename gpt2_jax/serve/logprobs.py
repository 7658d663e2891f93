"""Log-probabilities in OpenAI's completions form, and the prompt's own (for `echo` with `logprobs`).

OpenAI's (and vLLM's) completions `logprobs`: per token its text (`tokens`), its log-probability
(`token_logprobs`), a dict of the most likely tokens' texts to theirs (`top_logprobs`, holding the chosen
token too, as vLLM does), and where each token starts in the choice's text (`text_offset`). A prompt's first
token has no log-probability (None), as in vLLM. Values are the log-softmax of the model's raw logits.

Shape letters: T prompt length (bucketed), V vocabulary, K alternatives (MAX_LOGPROBS).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.sample.generate import bucket_length
from gpt2_jax.serve.protocol import MAX_LOGPROBS


def token_text(tokenizer, token_id: int) -> str:
    """One token as text, special tokens included (a token that is part of a character reads U+FFFD)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def logprobs_object(tokenizer, ids: Sequence[int], logprobs: Sequence[Optional[float]],
                    top: Optional[Sequence[Optional[dict[int, float]]]], k: int, offset: int = 0) -> dict:
    """OpenAI's logprobs object for `ids`; `top[i]` maps token ids to log-probabilities (None: no entry);
    `offset`: where the first token starts in the choice's text."""
    tokens, offsets, tops = [], [], []
    for i, t in enumerate(ids):
        text = token_text(tokenizer, t)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        entry = None
        if top is not None and top[i] is not None:
            # The chosen token is always listed (vLLM), first: where two tokens read the same (parts of one
            # character both read U+FFFD), the chosen one's value stands, then the likelier one's.
            entry = {} if logprobs[i] is None else {text: float(logprobs[i])}
            for j, v in sorted(top[i].items(), key=lambda kv: -kv[1])[:k]:
                entry.setdefault(token_text(tokenizer, j), float(v))
        tops.append(entry)
    return {"tokens": tokens, "token_logprobs": [None if v is None else float(v) for v in logprobs],
            "top_logprobs": tops, "text_offset": offsets}


def merge(a: Optional[dict], b: dict) -> dict:
    """Two logprobs objects of consecutive text as one."""
    if a is None:
        return b
    return {key: a[key] + b[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _prompt_scores(state, ids_1T, *, graphdef):
    """For each position t >= 1: log p(ids[t] | ids[:t]) and the K best (log-probability, id) pairs."""
    model = nnx.merge(graphdef, state)
    logp_TV = jax.nn.log_softmax(model(ids_1T)[0, :-1].astype(jnp.float32), axis=-1)
    chosen_T = jnp.take_along_axis(logp_TV, ids_1T[0, 1:, None], axis=-1)[:, 0]
    top_TK, top_ids_TK = jax.lax.top_k(logp_TV, min(MAX_LOGPROBS, logp_TV.shape[-1]))
    return chosen_T, top_TK, top_ids_TK


def prompt_logprobs(model, ids: Sequence[int], k: int) -> tuple[list[Optional[float]], list[Optional[dict]]]:
    """The prompt's log-probabilities (None for its first token) and each position's `k` best alternatives.

    One forward pass, the prompt right-padded to a bucketed length: causal attention keeps the padding out of
    the real positions, and a handful of lengths share the compiled programs."""
    T = bucket_length(len(ids))
    ids_1T = np.zeros((1, T), np.int32)
    ids_1T[0, :len(ids)] = ids
    graphdef, state = nnx.split(model)
    chosen_T, top_TK, top_ids_TK = jax.device_get(_prompt_scores(state, ids_1T, graphdef=graphdef))
    n = len(ids) - 1
    logprobs = [None] + chosen_T[:n].tolist()
    tops = [None] + [dict(zip(top_ids_TK[t, :k].tolist(), top_TK[t, :k].tolist())) for t in range(n)]
    return logprobs, tops
