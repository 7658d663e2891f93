"""The Optax optimiser: warm-up + decay schedule, global-norm clipping, AdamW with decay on matrices only.

It is built over the trainable parameters alone (a flat `{path: array}` dict), so frozen parameters have
no optimiser state at all. Gradient accumulation happens in the train step (trainer.py), which sums the
micro-batch gradients before one update, so a step is one optimiser update whatever grad_accum is.
"""
from __future__ import annotations

import optax

from gpt2_jax.config import OptimSection


def learning_rate(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    """Linear warm-up to cfg.lr, then cosine / linear decay to lr * min_lr_ratio at total_steps (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params: dict) -> dict:
    """Weight decay on tensors of rank >= 2 (kernels, embeddings), not on biases or LayerNorm parameters."""
    return {k: v.ndim >= 2 for k, v in params.items()}


def make_optimizer(cfg: OptimSection, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm (cfg.clip > 0), then AdamW with the schedule and the rank >= 2 decay mask."""
    adamw = optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.clip), adamw) if cfg.clip > 0 else adamw
