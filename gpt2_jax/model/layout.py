"""The model as flat `{key: array}` dicts, as the jitted steps and checkpoints hold it.

A parameter's key is its nnx state path joined by '/' (`transformer/h/0/attn/c_attn/kernel`, Hugging Face's
state-dict name with '/' for '.'). `ModelLayout` maps such dicts onto the NNX model and back, and holds each
parameter's logical axis names (sharding.RULES maps them to the mesh) and shape.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import Execution, GPT2LMHeadModel
from gpt2_jax.model.lora import LoraConfig


def abstract_model(config: ModelConfig, execution: Execution = Execution(),
                   lora: LoraConfig = LoraConfig()) -> GPT2LMHeadModel:
    """The model with ShapeDtypeStructs for parameters: shapes and counts without allocating."""
    return nnx.eval_shape(lambda: GPT2LMHeadModel(config, execution=execution, lora=lora))


def path_key(path) -> str:
    """An nnx state path ('transformer', 'h', 0, 'ln_1', 'scale') -> 'transformer/h/0/ln_1/scale'.

    That string is the one parameter key everywhere (flat dicts, freezing, optimiser masks, checkpoints),
    as Hugging Face's state-dict names are, with '/' for '.'."""
    return "/".join(map(str, path))


def param_shapes(config: ModelConfig, lora: LoraConfig = LoraConfig()) -> dict[str, tuple[int, ...]]:
    """{key: shape} of every parameter (adapters included with `lora`), computed abstractly."""
    flat = nnx.to_flat_state(nnx.state(abstract_model(config, lora=lora), nnx.Param))
    return {path_key(path): tuple(var.shape) for path, var in flat}


def model_from_params(config: ModelConfig, params: dict[str, jax.Array], *, seed: int = 0,
                      lora: LoraConfig = LoraConfig()) -> GPT2LMHeadModel:
    """A model holding `params` ({key: array} for every key of `param_shapes(config, lora)`), without
    random-initialising them."""
    layout = ModelLayout.of(config, lora=lora)
    # Only the non-parameter state (dropout RNG keys) is built for real; XLA drops the unused initialisers.
    rng = jax.jit(lambda: rng_arrays(nnx.split(GPT2LMHeadModel(config, seed=seed, lora=lora), nnx.Param, ...)[2]))()
    flat = {}
    for k, want in layout.shapes.items():
        flat[k] = jnp.asarray(params[k], dtype=want.dtype)  # the base's param_dtype; adapters float32
        if flat[k].shape != want.shape:
            raise GPT2JaxError(f"parameter {k} has shape {flat[k].shape}, expected {want.shape}")
    return layout.model(flat, rng, train=False)


@dataclasses.dataclass
class ModelLayout:
    """How flat `{key: array}` dicts map onto the NNX model, plus each parameter's logical axes and shape.

    Steps take plain dicts at the jit boundary and rebuild the model inside with `model(...)`."""

    config: ModelConfig
    execution: Execution
    lora: LoraConfig  # the adapters (rank 0: none)
    graphdef_train: Any  # dropout on
    graphdef_eval: Any  # dropout off
    abstract_params: Any  # nnx.State of ShapeDtypeStruct Params: the template that flat dicts fill
    abstract_rng: Any  # nnx.State of the dropout RNG keys and counts
    logical: dict[str, Optional[tuple]]  # {key: logical axis names} (sharding.RULES maps them to mesh axes)
    shapes: dict[str, jax.ShapeDtypeStruct]

    @classmethod
    def of(cls, config: ModelConfig, execution: Execution = Execution(),
           lora: LoraConfig = LoraConfig()) -> "ModelLayout":
        model = abstract_model(config, execution, lora)
        graphdef_eval, abstract_params, abstract_rng = nnx.split(model, nnx.Param, ...)
        model.train()
        graphdef_train = nnx.split(model, nnx.Param, ...)[0]
        logical, shapes = {}, {}
        for path, var in nnx.to_flat_state(abstract_params):
            k = path_key(path)
            logical[k] = var.get_metadata().get("out_sharding")
            shapes[k] = jax.ShapeDtypeStruct(var.shape, var.dtype)
        return cls(config, execution, lora, graphdef_train, graphdef_eval, abstract_params, abstract_rng, logical, shapes)

    def state(self, flat: dict) -> nnx.State:
        """The nnx.State of parameters holding the arrays of `flat` (every key)."""
        leaves = [(path, var.replace(flat[path_key(path)])) for path, var in nnx.to_flat_state(self.abstract_params)]
        return nnx.from_flat_state(leaves)

    def rng_state(self, flat: dict) -> nnx.State:
        """The nnx RNG state from plain arrays (typed keys travel as uint32 key data, which Orbax stores)."""
        leaves = []
        for path, var in nnx.to_flat_state(self.abstract_rng):
            value = flat[path_key(path)]
            if jax.dtypes.issubdtype(var.dtype, jax.dtypes.prng_key):
                value = jax.random.wrap_key_data(value)
            leaves.append((path, var.replace(value)))
        return nnx.from_flat_state(leaves)

    def model(self, flat: dict, rng: dict, train: bool) -> GPT2LMHeadModel:
        return nnx.merge(self.graphdef_train if train else self.graphdef_eval, self.state(flat), self.rng_state(rng))


def rng_arrays(state: nnx.State) -> dict:
    """Plain arrays of an nnx RNG state: the inverse of ModelLayout.rng_state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var[...]
        out[path_key(path)] = jax.random.key_data(value) if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) \
            else value
    return out
