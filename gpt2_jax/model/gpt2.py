"""GPT-2 in Flax NNX whose parameter tree and numbers are Hugging Face's.

Shape letters: B batch, T query positions, S key positions (cache slots), D n_embd, H heads,
K head width, F MLP width, V vocabulary.

Parameter paths read like Hugging Face's (`transformer/h/0/attn/c_attn/kernel`). Kernels are stored
[in, out], as in PyTorch's `Conv1D.weight`, so safetensors import is a key copy and only the Flax
msgpack format needs transposes (checkpoints/hf.py). The flat `{key: array}` view of the
parameters that jitted steps and checkpoints use: model/layout.py.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt2_jax.model import attention
from gpt2_jax.model.kv_cache import KVCache
from gpt2_jax.model.lora import LoraConfig, LoraLinear, lora_rngs
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sharding import BATCH_AXES, RULES

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# Hugging Face's ACT2FN, formula for formula.
ACT_FNS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: 0.5 * x * (1.0 + jnp.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def _named(init, axes: tuple):
    # Logical axis names ride along as metadata; sharding.py maps them to a mesh when there is one,
    # so building the model never needs a mesh (eager_sharding=False).
    return nnx.with_partitioning(init, axes, eager_sharding=False)


def _normal(std: float, axes: tuple):
    return _named(nnx.initializers.normal(std), axes)


def _zeros(axes: tuple):
    return _named(nnx.initializers.zeros_init(), axes)


@dataclasses.dataclass(frozen=True)
class Adapters:
    """The LoRA adapters a model is built with (model/lora.py) and the random streams that draw them."""

    config: LoraConfig
    rngs: Any  # nnx.Rngs

    def on(self, target: str) -> Optional["Adapters"]:
        """These adapters if the projection `target` (c_attn, c_proj, c_fc) carries one, else None."""
        return self if self.config.rank and target in self.config.targets else None


def _linear(cfg: ModelConfig, din: int, dout: int, axes: tuple, std: float, rngs: nnx.Rngs,
            adapters: Optional[Adapters] = None) -> nnx.Linear:
    kwargs = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  kernel_init=_normal(std, axes), bias_init=_zeros(axes[1:]), rngs=rngs)
    if adapters is None:
        return nnx.Linear(din, dout, **kwargs)
    return LoraLinear(din, dout, lora=adapters.config, axes=axes, lora_rngs=adapters.rngs, **kwargs)


class LayerNorm(nnx.Module):
    """PyTorch's LayerNorm: variance as E[(x - mean)²], statistics in float32, output in the compute dtype.

    Written out with a hand-written backward: with nnx.LayerNorm(use_fast_variance=False), or autodiff of
    the forward below, a GPT-2 124M forward + backward on CPU (batch 4 × 128) took 3.2 s instead of 2.6 s.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        shape = (cfg.n_embd,)
        self.scale = nnx.Param(_named(nnx.initializers.ones_init(), ("embed",))(rngs.params(), shape, jnp.dtype(cfg.param_dtype)))
        self.bias = nnx.Param(_zeros(("embed",))(rngs.params(), shape, jnp.dtype(cfg.param_dtype)))
        self.epsilon = cfg.layer_norm_epsilon
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x):
        y = _layer_norm_f32(x.astype(jnp.float32), self.scale[...].astype(jnp.float32),
                            self.bias[...].astype(jnp.float32), self.epsilon)
        return y.astype(self.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_f32(x, scale, bias, epsilon):
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    xhat = centred * rstd
    return xhat * scale + bias, (xhat, rstd, scale)


def _layer_norm_bwd(epsilon, res, dy):
    # The textbook backward: two row reductions, fused by XLA, where autodiff's takes several passes.
    xhat, rstd, scale = res
    g = dy * scale
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    reduce = tuple(range(dy.ndim - 1))
    return dx, jnp.sum(dy * xhat, axis=reduce), jnp.sum(dy, axis=reduce)


_layer_norm_f32.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _policy_names() -> tuple[str, ...]:
    """The policies in `jax.checkpoint_policies` (`dots_saveable`, ...): a policy takes the primitive and its
    params (`**params`); the rest of that namespace builds policies from arguments (`save_only_these_names`)."""
    out = []
    for name in sorted(vars(jax.checkpoint_policies)):
        f = getattr(jax.checkpoint_policies, name)
        if not name.startswith("_") and callable(f):
            params = inspect.signature(f).parameters.values()
            if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
                out.append(name)
    return tuple(out)


# model.remat: none, block (keep each block's input only), or any jax.checkpoint_policies policy.
REMAT = ("none", "block", *_policy_names())


@dataclasses.dataclass(frozen=True)
class Execution:
    """How the model runs, not what it computes: static, so it lives in the graph definition and every jit
    that traces the model is specialised to it.

    `platform` picks the attention kernel (None: the default backend when traced); a program compiled ahead of
    time for TPU devices from a CPU host must name "tpu". `mesh`: activations are pinned to the batch
    split of sharding.BATCH_AXES at every block boundary, so FSDP gathers each layer's weights instead of
    letting XLA partition the matmuls over the weights' sharded width. `remat`: "none", "block" (keep only
    each block's input) or a `jax.checkpoint_policies` name such as "dots_with_no_batch_dims_saveable".
    """

    platform: Optional[str] = None
    remat: str = "none"
    mesh: Optional[Any] = None

    @classmethod
    def on(cls, mesh, remat: str = "none") -> "Execution":
        """The execution for programs running on `mesh`'s devices."""
        return cls(mesh.devices.flat[0].platform, remat, mesh)

    def remat_policy(self):
        """The `jax.checkpoint` policy of `remat` (None for "block": save nothing inside a block)."""
        return None if self.remat == "block" else getattr(jax.checkpoint_policies, self.remat)

    def constrain(self, x_BTD):
        """`x_BTD` pinned to the batch split (nothing without a mesh)."""
        if self.mesh is None:
            return x_BTD
        return jax.lax.with_sharding_constraint(x_BTD, NamedSharding(self.mesh, P(BATCH_AXES)))

    def constrain_lookup(self, x_BTD):
        """An embedding lookup's output [B, T, D] split like its table (D over fsdp) and the batch over data.

        Its gradient, scattered into the D-sharded table, then arrives split the same way: pinned to the
        batch split over every axis instead, XLA could only reach the table's layout by replicating it
        ("involuntary full rematerialization", compiled for TPU with data x fsdp)."""
        if self.mesh is None:
            return x_BTD
        return jax.lax.with_sharding_constraint(x_BTD, NamedSharding(self.mesh, P("data", None, RULES["embed"])))

    @property
    def current_platform(self) -> str:
        return self.platform or jax.default_backend()


class Attention(nnx.Module):
    """Causal multi-head self-attention with an optional KV cache."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs, execution: Execution = Execution(),
                 adapters: Optional[Adapters] = None):
        self.cfg = cfg
        self.execution = execution
        self.layer_idx = layer_idx
        proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        on = (lambda t: adapters.on(t)) if adapters is not None else (lambda t: None)
        self.c_attn = _linear(cfg, cfg.n_embd, 3 * cfg.n_embd, ("embed", "heads"), cfg.initializer_range, rngs,
                              on("c_attn"))
        self.c_proj = _linear(cfg, cfg.n_embd, cfg.n_embd, ("heads", "embed"), proj_std, rngs, on("c_proj"))
        self.attn_dropout = nnx.Dropout(cfg.attn_pdrop, deterministic=True, rngs=rngs)
        self.resid_dropout = nnx.Dropout(cfg.resid_pdrop, deterministic=True, rngs=rngs)

    @property
    def scale(self) -> float:
        scale = 1.0 / math.sqrt(self.cfg.head_dim) if self.cfg.scale_attn_weights else 1.0
        if self.cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        return scale

    def __call__(self, x_BTD, mask_BTS, kv=None, index=None, segment_ids_BT=None):
        """Returns the output [B, T, D] and, with a cache, this layer's updated (k, v)."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        q_BTHK, k_BTHK, v_BTHK = (a.reshape(B, T, cfg.n_head, cfg.head_dim)
                                  for a in jnp.split(self.c_attn(x_BTD), 3, axis=-1))
        if kv is not None:
            k_cache, v_cache = kv
            k_BSHK = jax.lax.dynamic_update_slice_in_dim(k_cache, k_BTHK.astype(k_cache.dtype), index, axis=1)
            v_BSHK = jax.lax.dynamic_update_slice_in_dim(v_cache, v_BTHK.astype(v_cache.dtype), index, axis=1)
            kv = (k_BSHK, v_BSHK)
        else:
            k_BSHK, v_BSHK = k_BTHK, v_BTHK
        out_BTHK = self._attend(q_BTHK, k_BSHK.astype(q_BTHK.dtype), v_BSHK.astype(q_BTHK.dtype), mask_BTS,
                                segment_ids_BT)
        out_BTD = self.resid_dropout(self.c_proj(out_BTHK.reshape(B, T, cfg.n_embd)))
        return out_BTD, kv

    def _attend(self, q_BTHK, k_BSHK, v_BSHK, mask_BTS, segment_ids_BT):
        dtype = q_BTHK.dtype
        if self.cfg.reorder_and_upcast_attn:
            q_BTHK, k_BSHK, v_BSHK = (a.astype(jnp.float32) for a in (q_BTHK, k_BSHK, v_BSHK))
        dropout = not (self.attn_dropout.deterministic or self.cfg.attn_pdrop == 0.0)
        ex = self.execution
        impl = attention.default_impl(ex.current_platform, dropout=dropout)
        out = attention.attend(q_BTHK, k_BSHK, v_BSHK, impl=impl, scale=self.scale, mask_BTS=mask_BTS,
                               segment_ids_BT=segment_ids_BT, dropout=self.attn_dropout if dropout else None,
                               mesh=ex.mesh, platform=ex.current_platform)
        return out.astype(dtype)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, adapters: Optional[Adapters] = None):
        proj_std = cfg.initializer_range / math.sqrt(2 * cfg.n_layer)
        on = (lambda t: adapters.on(t)) if adapters is not None else (lambda t: None)
        self.c_fc = _linear(cfg, cfg.n_embd, cfg.inner_dim, ("embed", "mlp"), cfg.initializer_range, rngs, on("c_fc"))
        self.c_proj = _linear(cfg, cfg.inner_dim, cfg.n_embd, ("mlp", "embed"), proj_std, rngs, on("c_proj"))
        self.act = ACT_FNS[cfg.activation_function]
        self.dropout = nnx.Dropout(cfg.resid_pdrop, deterministic=True, rngs=rngs)

    def __call__(self, x_BTD):
        return self.dropout(self.c_proj(self.act(self.c_fc(x_BTD))))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rngs: nnx.Rngs, execution: Execution = Execution(),
                 adapters: Optional[Adapters] = None):
        self.ln_1 = LayerNorm(cfg, rngs)
        self.attn = Attention(cfg, layer_idx, rngs, execution, adapters)
        self.ln_2 = LayerNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs, adapters)

    def __call__(self, x_BTD, mask_BTS, kv=None, index=None, segment_ids_BT=None):
        a_BTD, kv = self.attn(self.ln_1(x_BTD), mask_BTS, kv, index, segment_ids_BT)
        x_BTD = x_BTD + a_BTD
        x_BTD = x_BTD + self.mlp(self.ln_2(x_BTD))
        return x_BTD, kv


def _block_call(block, x_BTD, mask_BTS, kv, index, segment_ids_BT):
    return block(x_BTD, mask_BTS, kv, index, segment_ids_BT)


class GPT2Model(nnx.Module):
    """Embeddings, blocks and the final LayerNorm: Hugging Face's `transformer`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, execution: Execution = Execution(),
                 adapters: Optional[Adapters] = None):
        std = cfg.initializer_range
        self.execution = execution
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                             embedding_init=_normal(std, ("vocab", "embed")), rngs=rngs)
        self.wpe = nnx.Embed(cfg.n_positions, cfg.n_embd, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                             embedding_init=_normal(std, (None, "embed")), rngs=rngs)
        self.drop = nnx.Dropout(cfg.embd_pdrop, deterministic=True, rngs=rngs)
        self.h = nnx.List([Block(cfg, i, rngs, execution, adapters) for i in range(cfg.n_layer)])
        self.ln_f = LayerNorm(cfg, rngs)

    def __call__(self, input_ids_BT, attention_mask_BT=None, position_ids_BT=None, cache: Optional[KVCache] = None,
                 segment_ids_BT=None):
        B, T = input_ids_BT.shape
        if segment_ids_BT is not None and (cache is not None or attention_mask_BT is not None):
            raise GPT2JaxError("segment_ids (packed rows) go without a cache and without an attention_mask")
        if cache is None:
            offset = 0
            if attention_mask_BT is None:
                mask_BTS = None  # plain causal (within segments, for packed rows): no [B, T, T] mask
            else:
                causal_TT = jnp.tril(jnp.ones((T, T), bool))
                mask_BTS = causal_TT[None] & attention_mask_BT.astype(bool)[:, None, :]
        else:
            offset = cache.index
            new_valid_BT = (jnp.ones((B, T), bool) if attention_mask_BT is None
                            else attention_mask_BT.astype(bool))
            valid_BS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BS, new_valid_BT, offset, axis=1)
            slot_S = jnp.arange(cache.max_length)
            causal_TS = slot_S[None, :] <= (offset + jnp.arange(T))[:, None]
            mask_BTS = causal_TS[None] & valid_BS[:, None, :]
        if position_ids_BT is None:
            position_ids_BT = jnp.broadcast_to(offset + jnp.arange(T, dtype=jnp.int32), (B, T))
        ex = self.execution
        x_BTD = ex.constrain(self.drop(ex.constrain_lookup(self.wte(input_ids_BT))
                                       + ex.constrain_lookup(self.wpe(position_ids_BT))))
        new_k, new_v = [], []
        run = _block_call if cache is not None or ex.remat == "none" else nnx.remat(_block_call, policy=ex.remat_policy())
        for i, block in enumerate(self.h):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x_BTD, kv = run(block, x_BTD, mask_BTS, kv, offset, segment_ids_BT)
            x_BTD = ex.constrain(x_BTD)
            if kv is not None:
                new_k.append(kv[0])
                new_v.append(kv[1])
        x_BTD = self.ln_f(x_BTD)
        if cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid_BS=valid_BS, index=offset + T)
        return x_BTD, cache


class GPT2LMHeadModel(nnx.Module):
    """GPT-2 with the LM head tied to the token embedding.

    `model(input_ids, attention_mask, position_ids)` gives the logits of `transformers.GPT2LMHeadModel`.
    With `cache=`, the tokens are written into the cache at `cache.index` and `(logits, cache)` comes back;
    `attention_mask` then marks which of the new tokens are real, and earlier slots keep their marks.
    Built in evaluation mode: `model.train()` turns dropout on. `lora` (rank > 0) adds LoRA adapters
    (model/lora.py) to its target projections, drawn from their own streams of `seed`: the base's
    parameters are those of the model without them.
    """

    def __init__(self, config: ModelConfig, *, rngs: Optional[nnx.Rngs] = None, seed: int = 0,
                 execution: Execution = Execution(), lora: LoraConfig = LoraConfig()):
        rngs = rngs if rngs is not None else nnx.Rngs(params=seed, dropout=seed + 1)
        self.config = config
        adapters = Adapters(lora, lora_rngs(seed)) if lora.rank else None
        self.transformer = GPT2Model(config, rngs, execution, adapters)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache=None, segment_ids=None):
        """The final-LayerNorm output [B, T, D] (and the cache), before the LM head.

        `segment_ids` [B, T] (packed rows, no cache): tokens attend only to earlier tokens of their own
        segment; pass `position_ids` restarting at 0 in each segment with them."""
        return self.transformer(jnp.asarray(input_ids), attention_mask, position_ids, cache, segment_ids)

    def logits(self, h_BTD):
        """The tied LM head: [..., D] -> [..., V] in the compute dtype."""
        return self.transformer.wte.attend(h_BTD)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, *, cache: Optional[KVCache] = None):
        h_BTD, new_cache = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        logits_BTV = self.logits(h_BTD)
        return logits_BTV if cache is None else (logits_BTV, new_cache)


def resize_token_embeddings(model: GPT2LMHeadModel, new_vocab_size: int) -> GPT2LMHeadModel:
    """Grow (or shrink) the tied embedding to `new_vocab_size` rows, in place.

    Old rows are kept exactly; new rows are the mean of the old ones, so the logits of old tokens do not
    change and new tokens start as an average token. Updates `model.config.vocab_size`.
    """
    config = model.config.replace(vocab_size=new_vocab_size)  # checks the size before anything changes
    wte = model.transformer.wte
    old = wte.embedding[...]
    new = old[:new_vocab_size] if new_vocab_size <= old.shape[0] else grow_embedding(old, new_vocab_size)
    wte.embedding = nnx.Param(new, **wte.embedding.get_metadata())
    wte.num_embeddings = new_vocab_size
    model.config = config
    return model


def grow_embedding(old, new_vocab_size: int):
    """`old` [V, D] with rows added up to `new_vocab_size`, each the mean of the old rows (computed in
    float32); a numpy input stays numpy."""
    xp = np if isinstance(old, np.ndarray) else jnp
    mean = xp.mean(old.astype(np.float32), axis=0, keepdims=True).astype(old.dtype)
    return xp.concatenate([old, xp.repeat(mean, new_vocab_size - old.shape[0], axis=0)], axis=0)
