"""The model's own perplexity of texts it wrote: teacher-forced log-probabilities of the generated tokens given
their prompt, scored without any guidance, in one jitted pass per batch.

Shape letters: B rows per pass (fixed, padded with empty rows), T tokens (prompt + text, right-padded to a
bucketed length), V vocabulary.

A guided text (sample.generate's `keyword_boost`) is sampled from scores the model did not give; what the
model itself thinks of the result is its fluency. Compared with the perplexity of unguided samples from the
same prompts, it says what the guidance costs.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax.errors import GPT2JaxError

# Rows scored per pass: a fixed size, so that any number of rows reuses one compiled program per length.
BATCH = 16
MIN_BUCKET = 16


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_program(state, ids_BT, mask_BT, scored_BT, *, graphdef):
    """(sum of log p(token | what precedes it) over the `scored_BT` positions, their count), per row, float32.

    Rows are right-padded (`mask_BT` 0 after the last token), so positions count from 0 and padding sits after
    every real token, where the causal mask keeps it out of their scores."""
    model = nnx.merge(graphdef, state)
    pos_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)
    logits_BTV = model(ids_BT, mask_BT, pos_BT).astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    tok_logp_BT = jnp.take_along_axis(logp_BTV, ids_BT[:, 1:, None], axis=-1)[..., 0]
    scored_BT = scored_BT[:, 1:]
    return jnp.sum(jnp.where(scored_BT, tok_logp_BT, 0.0), axis=1), jnp.sum(scored_BT, axis=1)


def token_log_likelihoods(model, prompts: Sequence[Sequence[int]], texts: Sequence[Sequence[int]],
                          batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood [rows], tokens scored [rows]): each text's tokens given its prompt (and the text's tokens
    before them), float64 sums of the model's float32 log-probabilities. A text may be empty (0, 0)."""
    if len(prompts) != len(texts):
        raise GPT2JaxError(f"{len(prompts)} prompts but {len(texts)} texts to score")
    n_ctx = model.config.n_positions
    seqs = [list(p) + list(t) for p, t in zip(prompts, texts)]
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        if not p:
            raise GPT2JaxError(f"row {i}: an empty prompt (the first token is scored given something before it)")
        if len(s) > n_ctx:
            raise GPT2JaxError(f"row {i}: prompt + text of {len(s)} tokens exceed the model's context ({n_ctx})")
    graphdef, state = nnx.split(model)
    ll, count = np.zeros(len(seqs)), np.zeros(len(seqs), np.int64)
    for lo in range(0, len(seqs), batch):
        chunk = seqs[lo:lo + batch]
        longest = max(map(len, chunk))
        T = min(max(MIN_BUCKET, 1 << (longest - 1).bit_length()), max(n_ctx, longest))
        ids, mask, scored = (np.zeros((batch, T), np.int32) for _ in range(3))
        for b, s in enumerate(chunk):
            ids[b, :len(s)], mask[b, :len(s)] = s, 1
            scored[b, len(prompts[lo + b]):len(s)] = 1
        got_ll, got_n = score_program(state, ids, mask, scored, graphdef=graphdef)
        ll[lo:lo + len(chunk)] = np.asarray(got_ll, np.float64)[:len(chunk)]
        count[lo:lo + len(chunk)] = np.asarray(got_n)[:len(chunk)]
    return ll, count


def perplexity(model, prompts: Sequence[Sequence[int]], texts: Sequence[Sequence[int]]) -> float | None:
    """exp(mean negative log-likelihood per token) of the texts given their prompts; None if no token."""
    ll, count = token_log_likelihoods(model, prompts, texts)
    return math.exp(-ll.sum() / count.sum()) if count.sum() else None
