"""FLOPs per token against two references: GPT-2's published parameter count, and XLA's own count of the
compiled forward + backward under each freezing preset."""
from functools import partial

import jax
import numpy as np
import pytest

from gpt2_jax import sharding

from gpt2_jax.train import step as train_step
from gpt2_jax.model.layout import ModelLayout
from gpt2_jax.model.config import ModelConfig, preset
from gpt2_jax.train.config import load_train_config
from gpt2_jax.train.flops import flops_per_token


def test_gpt2_124m_is_6n_plus_attention():
    cfg = preset("gpt2")
    # 124,439,808 parameters (transformers' GPT2LMHeadModel), less the 1024 x 768 position embedding.
    n = 124_439_808 - 1024 * 768
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
    layout = ModelLayout.of(cfg)
    assert flops_per_token(cfg, 1024, set(layout.shapes)) == flops_per_token(cfg, 1024)
    assert flops_per_token(cfg, 1024, set()) == 2 * n + 4 * 12 * 12 * 64 * 1024  # nothing trains: forward only


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["freeze.trainable=all"], ["freeze.trainable=head"],
                                       ["freeze.trainable=last_n_blocks", "freeze.last_n_blocks=1"],
                                       ["freeze.trainable=patterns", "freeze.patterns=[h/2/mlp]"]])
def test_frozen_counts_match_xla(overrides):
    """Wide enough that matmuls dominate XLA's count (which also counts element-wise work): within 6%."""
    cfg = ModelConfig(vocab_size=512, n_positions=16, n_embd=256, n_head=4, n_layer=4, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0)
    setup = train_step.build_setup(cfg, load_train_config(None, overrides), sharding.make_mesh(1, 1, jax.devices()[:1]))
    state = train_step.init_state(setup)
    B, T = 4, 16
    batch = {"input_ids": np.zeros((B, T), np.int32), "labels": np.zeros((B, T), np.int32),
             "loss_mask": np.ones((B, T), np.float32)}
    grad = jax.jit(jax.grad(partial(train_step.loss_sums, setup.layout, train=True), has_aux=True))
    xla = grad.lower(state.params, state.frozen, state.rng, batch).compile().cost_analysis()["flops"] / (B * T)
    ours = flops_per_token(cfg, T, set(state.params))
    assert abs(ours - xla) <= 0.06 * xla, (ours, xla)
