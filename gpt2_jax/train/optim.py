"""The Optax optimiser: warm-up + decay schedule, global-norm clipping, AdamW with decay on matrices only.

It is built over the trainable parameters alone (a flat `{path: array}` dict), so frozen parameters have
no optimiser state at all. Gradient accumulation happens in the train step (train/step.py), which sums the
micro-batch gradients before one update, so a step is one optimiser update whatever grad_accum is.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule: the decay after warm-up


def learning_rate(cfg: "OptimSection", total_steps: int) -> optax.Schedule:
    """Linear warm-up to cfg.lr, then cosine / linear decay to lr * min_lr_ratio at total_steps (or constant).

    `cfg` is the run config's `optim` section, validated at load (`schedule` is one of SCHEDULES).
    """
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    decay = {"cosine": lambda: optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio),
             "linear": lambda: optax.linear_schedule(cfg.lr, end, decay_steps),
             "constant": lambda: optax.constant_schedule(cfg.lr)}[cfg.schedule]()
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params: dict) -> dict:
    """Weight decay on tensors of rank >= 2 (kernels, embeddings), not on biases or LayerNorm parameters."""
    return {k: v.ndim >= 2 for k, v in params.items()}


class AdamWState(NamedTuple):
    count: jax.Array  # updates done so far (int32)
    mu: Any  # first moments, one per trainable parameter
    nu: Any  # second moments


def make_optimizer(cfg: "OptimSection", total_steps: int) -> optax.GradientTransformationExtraArgs:
    """Clip by global norm (cfg.clip > 0), then AdamW with the schedule and the rank >= 2 decay mask.

    `update(grads, state, params, grad_scale=1.0)` treats `grads * grad_scale` as the gradient: the train
    step passes token-summed gradients and 1 / tokens, and the scale then folds into the clipping factor
    instead of costing a pass over every gradient (on GPT-2 124M, 1 GB of memory traffic a step).

    The numbers of `optax.chain(optax.clip_by_global_norm(clip), optax.adamw(schedule, b1, b2, eps,
    weight_decay, mask=decay_mask))` (tested), written as one element-wise expression per parameter so that
    XLA fuses the scaling, clipping, decay and step into the moment updates. XLA:CPU, which has no
    multi-output fusion, still makes three passes per parameter (first moment, second moment, parameter),
    where optax's chain adds one per transformation.
    """
    schedule = learning_rate(cfg, total_steps)
    b1, b2, eps, wd, clip = cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.clip

    def init(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return AdamWState(jnp.zeros([], jnp.int32), zeros(), zeros())

    def update(grads, state, params, grad_scale=1.0):
        scale = jnp.asarray(grad_scale, jnp.float32)
        if clip > 0:  # optax.clip_by_global_norm: g * clip / |g| when |g| >= clip
            norm = optax.global_norm(grads) * scale
            scale = scale * jnp.where(norm < clip, 1.0, clip / norm)
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        count = state.count + 1
        lr = schedule(state.count)
        bc1, bc2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
        nu = jax.tree.map(lambda n, g: b2 * n + (1 - b2) * jnp.square(g), state.nu, grads)
        mask = decay_mask(params)

        def step(m, n, p, decay):
            u = (m / bc1) / (jnp.sqrt(n / bc2) + eps)
            if decay and wd:
                u = u + wd * p
            return (-lr * u).astype(p.dtype)

        updates = {k: step(mu[k], nu[k], params[k], mask[k]) for k in params}
        return updates, AdamWState(count, mu, nu)

    return optax.GradientTransformationExtraArgs(init, update)
