"""FLOPs per token and per-device peak FLOP/s, for tokens/s → MFU."""
from __future__ import annotations

import math
import time
from functools import lru_cache
from typing import Iterable, Optional

import jax
import jax.numpy as jnp

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.layout import param_shapes

# Dense bf16 peak FLOP/s per device (vendor figures). float32 compute on GPUs runs at the TF32 rate, half this.
_PEAK_BF16 = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12),
    ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def flops_per_token(cfg: ModelConfig, seq_len: int, trainable: Optional[Iterable[str]] = None) -> float:
    """Training FLOPs per token: 6N + 12·L·H·Q·T when everything trains (PaLM's formula; N excludes the
    position embedding as nanoGPT counts it; the tied head's matmul is in N through the token embedding).

    `trainable`: the parameter paths that train (default: all). Frozen parameters skip their weight
    gradients (2 FLOPs per parameter and token), and the layers below the lowest trainable one skip their
    activation gradients (2 per parameter, 8·H·Q·T per attention), so MFU stays the fraction of peak used by
    the work that was needed.
    """
    L = cfg.n_layer
    attn_fwd = 4.0 * cfg.n_head * cfg.head_dim * seq_len  # QKᵀ and PV of one layer, per token
    shapes = param_shapes(cfg)
    units = _units(cfg, shapes)
    n = sum(size for prefix, size in units[1:])  # all but the position embedding
    forward = 2.0 * n + L * attn_fwd
    if trainable is None:
        return 3.0 * forward
    trainable = set(trainable)
    order = [prefix for prefix, _ in units]
    # Bottom to top: the input embeddings (0), each block's ln_1, c_attn, attention, c_proj, ln_2, c_fc,
    # c_proj, then ln_f and the tied head. The activation gradient runs down from the loss to just above the
    # lowest unit with a trainable parameter; the tied embedding trains through its input use too.
    lowest = min((0 if p.startswith(("transformer/wte/", "transformer/wpe/")) else
                  order.index(next(u for u in order if p.startswith(u))) for p in trainable), default=len(order))
    backward = sum(2.0 * size + (2 * attn_fwd if prefix.endswith("/attention") else 0.0)
                   for i, (prefix, size) in enumerate(units) if i > lowest)
    weight_grads = 2.0 * sum(math.prod(shape) for p, shape in shapes.items()
                             if p in trainable and not p.startswith("transformer/wpe/"))
    return forward + backward + weight_grads


def _units(cfg: ModelConfig, shapes: dict[str, tuple]) -> list[tuple[str, int]]:
    """(path prefix, parameter elements) of each unit, bottom to top: the position embedding standing for
    the input embeddings, the blocks' parts ("…/attention" is the parameter-free core), ln_f, and the
    head, which is the token embedding. `shapes`: {path: shape} of every parameter."""

    def size(prefix):
        return sum(math.prod(s) for p, s in shapes.items() if p.startswith(prefix))

    units = [("transformer/wpe/", size("transformer/wpe/"))]
    for i in range(cfg.n_layer):
        h = f"transformer/h/{i}/"
        for part in ("ln_1/", "attn/c_attn/", "attention", "attn/c_proj/", "ln_2/", "mlp/c_fc/", "mlp/c_proj/"):
            units.append((h + part, 0 if part == "attention" else size(h + part)))
    units += [("transformer/ln_f/", size("transformer/ln_f/")), ("transformer/wte/", size("transformer/wte/"))]
    return units


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
