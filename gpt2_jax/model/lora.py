"""LoRA adapters on GPT-2's Conv1D-style projections, as flat `{key: array}` dicts beside the base's.

Shape letters: I a projection's input width, O its output width, R the rank.

An adapted projection `transformer/h/{i}/attn/c_attn` computes `x @ kernel + bias + scale * (x @ A) @ B`
with `A = .../c_attn/lora_a` [I, R] and `B = .../c_attn/lora_b` [R, O]: the kernels' [in, out] layout, so
PEFT's `lora_A.weight` [R, I] and `lora_B.weight` [O, R] are their transposes (checkpoints/peft.py).
`scale` is `alpha / rank` as PEFT's, or `alpha / sqrt(rank)` with `use_rslora`. `B` starts at zero, so an
untrained adapter leaves the base model's numbers exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig

# The projections an adapter can target, by PEFT's module names: `c_proj` is both attn.c_proj and mlp.c_proj,
# as PEFT's suffix match of `target_modules` makes it.
TARGETS = ("c_attn", "c_proj", "c_fc")
_MODULES = {"c_attn": ("attn/c_attn",), "c_proj": ("attn/c_proj", "mlp/c_proj"), "c_fc": ("mlp/c_fc",)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The adapters of a run or of a PEFT directory."""

    # Rank R of every adapter; 0: no adapters.
    rank: int = 0
    # Scaling numerator: the update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora).
    alpha: float = 16.0
    # Which projections carry adapters (names in TARGETS).
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    # Dropout on the adapter's input while training (PEFT's lora_dropout).
    dropout: float = 0.0
    # Rank-stabilised scaling (PEFT's use_rslora).
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise GPT2JaxError(f"lora.rank must be an integer >= 0, got {self.rank!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise GPT2JaxError(f"lora.targets: unknown module {unknown[0]!r}; known: {', '.join(TARGETS)}")
        if self.rank and not self.targets:
            raise GPT2JaxError("lora.targets is empty: name at least one of " + ", ".join(TARGETS))
        if not 0.0 <= float(self.dropout) < 1.0:
            raise GPT2JaxError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        """The factor on `(x @ A) @ B`."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def adapted_modules(config: ModelConfig, lora: LoraConfig) -> list[str]:
    """Module paths (`transformer/h/0/attn/c_attn`) that carry an adapter, in layer order."""
    if not lora.rank:
        return []
    return [f"transformer/h/{i}/{m}" for i in range(config.n_layer)
            for t in TARGETS if t in lora.targets for m in _MODULES[t]]


def adapter_shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """{key: shape} of every adapter parameter: `<module>/lora_a` [I, R] and `<module>/lora_b` [R, O]."""
    widths = {"attn/c_attn": (config.n_embd, 3 * config.n_embd), "attn/c_proj": (config.n_embd, config.n_embd),
              "mlp/c_fc": (config.n_embd, config.inner_dim), "mlp/c_proj": (config.inner_dim, config.n_embd)}
    out = {}
    for module in adapted_modules(config, lora):
        i, o = widths[module.split("/", 3)[3]]
        out[f"{module}/lora_a"] = (i, lora.rank)
        out[f"{module}/lora_b"] = (lora.rank, o)
    return out


def merged(params: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], lora: LoraConfig) -> dict:
    """The base parameters with every adapter folded in: `kernel + scale * A @ B` (computed in float32, cast
    back to the kernel's dtype); the `lora_*` keys are not in the result."""
    out = {k: v for k, v in params.items() if not k.endswith(("/lora_a", "/lora_b"))}
    for key in adapters:
        if key.endswith("/lora_a"):
            module = key[: -len("/lora_a")]
            kernel = np.asarray(out[f"{module}/kernel"])
            a = np.asarray(adapters[key], np.float32)
            b = np.asarray(adapters[f"{module}/lora_b"], np.float32)
            out[f"{module}/kernel"] = (kernel.astype(np.float32) + lora.scale * (a @ b)).astype(kernel.dtype)
    return out
