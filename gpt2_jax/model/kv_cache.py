"""The key/value cache: an explicit pytree allocated once for prompt + new tokens.

Shape letters: L layers, B batch, S cache slots, H heads, K head width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from gpt2_jax.model.config import ModelConfig


@struct.dataclass
class KVCache:
    """Per-layer keys and values, which slots hold a real token, and how many slots are filled."""

    k: tuple[jax.Array, ...]  # L arrays [B, S, H, K]
    v: tuple[jax.Array, ...]  # L arrays [B, S, H, K]
    valid_BS: jax.Array  # bool [B, S]: slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: slots [0, index) are filled

    @property
    def max_length(self) -> int:
        return self.valid_BS.shape[1]


def init_cache(config: ModelConfig, batch: int, max_length: int) -> KVCache:
    """An empty cache for `batch` rows of up to `max_length` tokens (prompt + new), in the compute dtype."""
    dtype = jnp.dtype(config.dtype)
    shape = (batch, max_length, config.n_head, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layer)),
                   valid_BS=jnp.zeros((batch, max_length), bool), index=jnp.zeros((), jnp.int32))
