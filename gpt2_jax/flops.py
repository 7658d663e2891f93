"""FLOPs per token and per-device peak FLOP/s, for tokens/s → MFU."""
from __future__ import annotations

import time
from functools import lru_cache

import jax
import jax.numpy as jnp

from gpt2_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures). float32 compute on GPUs runs at the TF32 rate, half this.
_PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12·L·H·Q·T (PaLM's formula; N excludes the position embedding as
    nanoGPT counts it, the tied head's matmul is in N through the token embedding)."""
    d, L, V, F = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.inner_dim
    per_block = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * F + F) + (F * d + d)
    n = V * d + L * per_block + 2 * d
    return 6.0 * n + 12.0 * L * cfg.n_head * cfg.head_dim * seq_len


@lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """The best FLOP/s of a float32 n×n matmul on the default device: a CPU's practical peak."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops(device=None, dtype: str = "bfloat16") -> float:
    """Peak FLOP/s of one device: the vendor figure for known accelerators, a measured matmul peak on CPU."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measured_matmul_peak()
    kind = getattr(device, "device_kind", "")
    for name, peak in _PEAK_BF16:
        if name.lower() in kind.lower():
            return peak / 2 if dtype == "float32" and device.platform == "gpu" else peak
    return measured_matmul_peak()
