"""LoRA adapters on GPT-2's Conv1D-style projections, as flat `{key: array}` dicts beside the base's.

Shape letters: I a projection's input width, O its output width, R the rank.

An adapted projection `transformer/h/{i}/attn/c_attn` computes `x @ kernel + bias + scale * (x @ A) @ B`
with `A = .../c_attn/lora_a` [I, R] and `B = .../c_attn/lora_b` [R, O]: the kernels' [in, out] layout, so
PEFT's `lora_A.weight` [R, I] and `lora_B.weight` [O, R] are their transposes (checkpoints/peft.py).
`scale` is `alpha / rank` as PEFT's, or `alpha / sqrt(rank)` with `use_rslora`. `B` starts at zero, so an
untrained adapter leaves the base model's numbers exactly.

`LoraLinear` is that projection as an NNX module. It is ours, not `nnx.LoRALinear`, because that one nests
its factors one level down (`c_attn/lora/lora_a`, not the flat keys beside `kernel` that checkpoints and PEFT
export read), has no `alpha / rank` scaling and no dropout on the adapter's input, and initialises `A` with
He-uniform where PEFT uses torch's Kaiming-uniform(a=sqrt(5)). The factors are `nnx.LoRAParam`s (a subclass
of `nnx.Param`: flat dicts and the optimiser see them as parameters, `nnx.LoRAParam` filters pick them out).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


ADAPTER_SUFFIXES = ("/lora_a", "/lora_b")


def is_adapter(key: str) -> bool:
    """Whether a flat parameter key is an adapter factor (`.../lora_a`, `.../lora_b`)."""
    return key.endswith(ADAPTER_SUFFIXES)


# PEFT's reset_lora_parameters with init_lora_weights=True: nn.init.kaiming_uniform_(lora_A.weight, a=sqrt(5)),
# i.e. U(-1/sqrt(I), 1/sqrt(I)) over lora_A.weight [R, I] (fan-in I). For our A [I, R] that is the variance
# scaling 1/3 over fan-in (bound sqrt(3 * (1/3) / I)).
a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=0, out_axis=1)

# The adapters' parameter dtype: float32 whatever the base's (a bfloat16 base trains float32 adapters, as
# PEFT's autocast_adapter_dtype does).
ADAPTER_DTYPE = jnp.float32


class LoraLinear(nnx.Linear):
    """`nnx.Linear` ([in, out] kernel, bias) plus `scale * dropout(x) @ lora_a @ lora_b`.

    `axes` are the kernel's logical axis names: `lora_a` shards like the kernel's input dimension and
    `lora_b` like its output dimension (the rank dimension stays whole). `lora_rngs` draws `A` and the
    adapter dropout's keys, so that the base's parameters and dropout keys are those of the model
    without adapters (its `rngs` draws them in the same order)."""

    def __init__(self, din: int, dout: int, *, lora: LoraConfig, axes: tuple, lora_rngs: nnx.Rngs, **kwargs):
        super().__init__(din, dout, **kwargs)
        named = lambda init, a: nnx.with_partitioning(init, a, eager_sharding=False)
        self.lora_a = nnx.LoRAParam(named(a_init, (axes[0], None))(lora_rngs.params(), (din, lora.rank),
                                                                      ADAPTER_DTYPE))
        self.lora_b = nnx.LoRAParam(named(nnx.initializers.zeros_init(), (None, axes[1]))(
            lora_rngs.params(), (lora.rank, dout), ADAPTER_DTYPE))
        self.lora_scale = lora.scale
        self.lora_dropout = nnx.Dropout(lora.dropout, deterministic=True, rngs=lora_rngs)

    def __call__(self, x):
        y = super().__call__(x)
        dtype = y.dtype
        h = self.lora_dropout(x) @ self.lora_a[...].astype(dtype)
        return y + (self.lora_scale * (h @ self.lora_b[...].astype(dtype))).astype(dtype)


def lora_rngs(seed: int) -> nnx.Rngs:
    """The adapters' own random streams (A's initialisation, adapter dropout), apart from the base's."""
    key = jax.random.fold_in(jax.random.key(seed), 0x4C6F5241)  # "LoRA"
    return nnx.Rngs(params=jax.random.fold_in(key, 0), dropout=jax.random.fold_in(key, 1))


def merge_adapters(params: Mapping[str, jax.Array], lora: LoraConfig) -> dict:
    """`merged` for device arrays inside or outside a jit: every adapted kernel becomes
    `kernel + scale * A @ B` (in float32, cast back), the `lora_*` keys dropped; for sampling, which then runs
    the base model's program at its speed."""
    out = {k: v for k, v in params.items() if not is_adapter(k)}
    for key in params:
        if key.endswith("/lora_a"):
            module = key[: -len("/lora_a")]
            kernel = out[f"{module}/kernel"]
            update = lora.scale * (params[key].astype(jnp.float32) @ params[f"{module}/lora_b"].astype(jnp.float32))
            out[f"{module}/kernel"] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
    return out
