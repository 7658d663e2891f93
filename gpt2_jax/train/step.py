"""The functional core of training: the train state, the loss, the jitted train and eval steps, and their
shardings, derived from abstract shapes before anything is allocated.

Shape letters: A micro-batches per step, B examples, T positions, D width, V vocabulary.

The model travels as flat `{key: array}` dicts (model.gpt2.ModelLayout): `params` (what trains), `frozen` (what
does not) and `rng` (dropout key state). The train step differentiates with respect to `params` only, so
frozen parameters get no weight gradients and no optimiser state, and pass through the step untouched
(bit-identical). Abstract first (nanodo): `jax.eval_shape` gives the state's shapes, the logical axes give
their shardings, and the state is then initialised by a jit whose out_shardings are that layout, or
restored straight onto it (`Setup.abstract_state` is the Orbax restore target).
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpt2_jax import sharding
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.train.freeze import trainable_paths
from gpt2_jax.train.loss import lm_head_cross_entropy
from gpt2_jax.model.gpt2 import Execution, GPT2LMHeadModel
from gpt2_jax.model.layout import ModelLayout, path_key, rng_arrays
from gpt2_jax.model.lora import LoraConfig, is_adapter
from gpt2_jax.train.optim import learning_rate, make_optimizer
from gpt2_jax.train.config import TrainConfig


class TrainState(NamedTuple):
    """Everything a step changes (and a checkpoint holds): a plain pytree."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: dict  # trainable parameters {key: array}
    frozen: dict  # frozen parameters {key: array}
    opt_state: Any  # optax state over `params` only
    rng: dict  # the dropout layers' RNG state {key: array}, keys as raw uint32 key data


def loss_sums(layout: ModelLayout, params: dict, frozen: dict, rng, batch: dict, train: bool, packed: bool = False,
              loss_chunk: int = 0):
    """(sum of token losses, (number of counted tokens, new rng state)) for one micro-batch [B, T].

    `packed`: the rows hold several examples, told apart by `batch["segment_ids"]`, with `batch["positions"]`
    restarting in each. `loss_chunk` > 0: the head's cross-entropy in chunks of that many positions."""
    model = layout.model({**params, **frozen}, rng, train)
    if packed:
        h_BTD, _ = model.hidden_states(batch["input_ids"], position_ids=batch["positions"],
                                       segment_ids=batch["segment_ids"])
    else:
        h_BTD, _ = model.hidden_states(batch["input_ids"])
    if loss_chunk > 0:
        loss, count = lm_head_cross_entropy(h_BTD, model.transformer.wte.embedding[...], batch["labels"],
                                            batch["loss_mask"], positions_per_chunk=loss_chunk,
                                            dtype=layout.config.dtype, mesh=layout.execution.mesh)
    else:
        loss, count = masked_cross_entropy(model.logits(h_BTD), batch["labels"], batch["loss_mask"])
    return loss, (count, rng_arrays(nnx.state(model, nnx.RngState)))


def masked_cross_entropy(logits_BTV, labels_BT, mask_BT):
    """(sum of -log p(label) over positions where mask is 1, number of such positions)."""
    # The [B, T, V] logits exist in the compute dtype only; the float32 log-sum-exp fuses with the upcast.
    lse_BT = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, labels_BT[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return jnp.sum((lse_BT - target_BT) * mask_BT), jnp.sum(mask_BT)


def make_train_step(layout: ModelLayout, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    packed: bool = False, loss_chunk: int = 0):
    """The train step: gradients summed over the A micro-batches of `batch` [A, B, T], one optimiser update.

    The loss is the mean over every counted token of the whole batch, so grad_accum does not change it.
    """
    grad_fn = jax.value_and_grad(partial(loss_sums, layout, train=True, packed=packed, loss_chunk=loss_chunk),
                                 has_aux=True)

    def step(state: TrainState, batch: dict):
        def micro(carry, mb):
            grads, loss, count, rng = carry
            (l, (n, rng)), g = grad_fn(state.params, state.frozen, rng, mb)
            return (jax.tree.map(jnp.add, grads, g), loss + l, count + n, rng), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = (zeros, jnp.float32(0), jnp.float32(0), state.rng)
        A = batch["input_ids"].shape[0]
        if A == 1:
            carry, _ = micro(carry, jax.tree.map(lambda x: x[0], batch))
        else:
            carry, _ = jax.lax.scan(micro, carry, batch)
        grads, loss, count, rng = carry
        count = jnp.maximum(count, 1.0)
        # `grads` are sums over tokens; the optimiser applies the 1 / count of the mean within its own pass.
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, grad_scale=1.0 / count)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss / count, "grad_norm": optax.global_norm(grads) / count, "lr": schedule(state.step),
                   "tokens": count}
        return TrainState(state.step + 1, params, state.frozen, opt_state, rng), metrics

    return step


def make_eval_step(layout: ModelLayout, packed: bool = False, loss_chunk: int = 0):
    """(sum of token losses, token count) over an eval batch [A, B, T], dropout off."""

    def step(params, frozen, rng, batch):
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
        loss, (count, _) = loss_sums(layout, params, frozen, rng, flat, train=False, packed=packed,
                                     loss_chunk=loss_chunk)
        return loss, count

    return step


@dataclasses.dataclass(frozen=True)
class Setup:
    """The pieces of a run that the steps close over, all known before any array exists."""

    layout: ModelLayout
    mesh: jax.sharding.Mesh
    trainable: frozenset[str]
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    seed: int
    packed: bool  # batches carry several examples a row (segment ids)
    loss_chunk: int  # positions per chunk of the head's cross-entropy (0: whole)
    param_shardings: dict  # {key: NamedSharding}
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings: the init and restore target

    @property
    def state_shardings(self) -> TrainState:
        return jax.tree.map(lambda x: x.sharding, self.abstract_state)


def build_setup(model_config: ModelConfig, cfg: TrainConfig, mesh) -> Setup:
    """The layout, optimiser and the sharded abstract state of a run on `mesh` (whose devices may be a
    TPU topology's, for compiling ahead of time)."""
    layout = ModelLayout.of(model_config, Execution.on(mesh, cfg.model.remat), cfg.lora.adapters())
    trainable = frozenset(trainable_paths(layout.shapes, cfg.freeze.trainable, n_layer=model_config.n_layer,
                                          last_n_blocks=cfg.freeze.last_n_blocks, patterns=cfg.freeze.patterns))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    param_shardings = sharding.named_shardings(layout.logical, layout.shapes, mesh)
    repl = sharding.replicated(mesh)
    params, frozen = _split(layout.shapes, trainable)
    opt_state = jax.eval_shape(optimizer.init, params)
    rng = jax.eval_shape(lambda: _random_init(layout.config, cfg.train.seed, layout.lora)[1])

    def place(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    abstract = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
        params=place(params, {k: param_shardings[k] for k in params}),
        frozen=place(frozen, {k: param_shardings[k] for k in frozen}),
        opt_state=place(opt_state, _opt_shardings(opt_state, layout, param_shardings, repl)),
        rng=place(rng, jax.tree.map(lambda _: repl, rng)))
    return Setup(layout, mesh, trainable, optimizer, learning_rate(cfg.optim, cfg.train.steps), cfg.train.seed,
                 cfg.data.packing, cfg.model.loss_chunk, param_shardings, abstract)


def _split(flat: dict, trainable: frozenset[str]) -> tuple[dict, dict]:
    return ({k: v for k, v in flat.items() if k in trainable}, {k: v for k, v in flat.items() if k not in trainable})


def _random_init(config: ModelConfig, seed: int, lora: LoraConfig = LoraConfig()) -> tuple[dict, dict]:
    """({key: parameter}, {key: rng array}) of a freshly initialised model (with `lora`'s adapters)."""
    _, p, rng = nnx.split(GPT2LMHeadModel(config, seed=seed, lora=lora), nnx.Param, ...)
    return {path_key(path): var[...] for path, var in nnx.to_flat_state(p)}, rng_arrays(rng)


def _opt_shardings(abstract_opt_state, layout: ModelLayout, param_shardings: dict, repl):
    """Optimiser-state leaves that mirror a parameter (Adam's moments) take its sharding; the rest replicate."""

    def pick(path, leaf):
        key = getattr(path[-1], "key", None) if path else None
        if key in param_shardings and leaf.shape == layout.shapes[key].shape:
            return param_shardings[key]
        return repl

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def init_state(setup: Setup, params: Optional[dict] = None) -> TrainState:
    """The initial state in `setup.abstract_state`'s layout: random (`params=None`) or from host arrays
    `{key: array}` (LoRA adapters they lack start afresh). Random initialisation runs inside a jit whose
    out_shardings are the parameters' shardings, so no device ever holds a whole large model."""
    layout = setup.layout
    shardings = setup.state_shardings
    flat_shardings = {**shardings.params, **shardings.frozen}
    init = partial(_random_init, layout.config, setup.seed, layout.lora)
    if params is None:
        flat, rng = jax.jit(init, out_shardings=(flat_shardings, shardings.rng))()
    else:
        fresh = [k for k in layout.shapes if k not in params and is_adapter(k)]
        flat = {k: jax.device_put(np.asarray(params[k], dtype=layout.shapes[k].dtype), flat_shardings[k])
                for k in layout.shapes if k not in fresh}
        # Only the adapters (and the RNG state) are computed; XLA drops the base's unused initialisers.
        adapters, rng = jax.jit(lambda: ({k: v for k, v in init()[0].items() if k in fresh}, init()[1]),
                                out_shardings=({k: flat_shardings[k] for k in fresh}, shardings.rng))()
        flat.update(adapters)
    train, frozen = _split(flat, setup.trainable)
    opt_state = jax.jit(setup.optimizer.init, out_shardings=shardings.opt_state)(train)
    return TrainState(jax.device_put(jnp.int32(0), shardings.step), train, frozen, opt_state, rng)


def compile_steps(setup: Setup) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step."""
    train_step = jax.jit(make_train_step(setup.layout, setup.optimizer, setup.schedule, setup.packed,
                                         setup.loss_chunk),
                         in_shardings=(setup.state_shardings, sharding.batch_sharding(setup.mesh)),
                         out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                         donate_argnums=0)
    eval_step = jax.jit(make_eval_step(setup.layout, setup.packed, setup.loss_chunk))
    return train_step, eval_step


def optimizer_state_bytes(state: TrainState) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if hasattr(x, "nbytes"))


def count_params(tree: dict) -> int:
    return sum(int(math.prod(v.shape)) for v in tree.values())
