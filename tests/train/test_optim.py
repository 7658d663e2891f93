"""The optimiser: the weight-decay mask, the learning-rate schedule, the fused AdamW against optax's chain."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gpt2_jax.train import config as train_config
from gpt2_jax.train.optim import decay_mask, learning_rate, make_optimizer
from gpt2_jax.train.config import OptimSection


def test_weight_decay_only_on_matrices():
    params = {"k": jnp.ones((3, 4)), "e": jnp.ones((5, 4)), "b": jnp.ones((4,)), "s": jnp.ones((4,))}
    assert decay_mask(params) == {"k": True, "e": True, "b": False, "s": False}
    opt = make_optimizer(OptimSection(lr=0.5, warmup_steps=0, schedule="constant", weight_decay=0.1, clip=0.0), 10)
    zero = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = opt.update(zero, opt.init(params), params)
    # AdamW with zero gradients: only the decay moves a parameter, by -lr * wd * p.
    np.testing.assert_allclose(updates["k"], -0.05 * np.ones((3, 4)), rtol=1e-6)
    np.testing.assert_allclose(updates["e"], -0.05 * np.ones((5, 4)), rtol=1e-6)
    assert not np.any(updates["b"]) and not np.any(updates["s"])


def test_schedule_warmup_then_cosine_to_min():
    sched = learning_rate(OptimSection(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 60, 110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    lin = learning_rate(OptimSection(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100)
    np.testing.assert_allclose([float(lin(s)) for s in (0, 50, 100)], [1.0, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("clip", [0.0, 1.0, 1e-3])
@pytest.mark.parametrize("grad_scale", [1.0, 1 / 37])
def test_fused_adamw_is_optax_chain(clip, grad_scale):
    """make_optimizer's fused AdamW gives optax's clip + adamw(mask) numbers over several steps, with the
    gradient's scale (the train step's 1 / tokens) passed separately."""
    cfg = OptimSection(lr=1e-2, warmup_steps=2, schedule="cosine", weight_decay=0.1, clip=clip)
    ours = make_optimizer(cfg, 6)
    adamw = optax.adamw(learning_rate(cfg, 6), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    ref = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw
    rng = np.random.default_rng(0)
    params = {"k": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
    p1, s1, p2, s2 = params, ours.init(params), params, ref.init(params)
    for _ in range(5):
        grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
        u1, s1 = ours.update(grads, s1, p1, grad_scale=grad_scale)
        u2, s2 = ref.update({k: g * grad_scale for k, g in grads.items()}, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        for k in params:
            np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_every_schedule_ends_where_it_should():
    """Each name in SCHEDULES is its own schedule."""
    end = {"cosine": 0.25, "linear": 0.25, "constant": 1.0}
    assert set(end) == set(train_config.SCHEDULES)
    for name in train_config.SCHEDULES:
        sched = learning_rate(OptimSection(lr=1.0, warmup_steps=2, schedule=name, min_lr_ratio=0.25), 10)
        np.testing.assert_allclose([float(sched(s)) for s in (0, 1, 2, 10)], [0.0, 0.5, 1.0, end[name]], atol=1e-6)
