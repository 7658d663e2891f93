"""LoRA training: only the adapters (and what `freeze` adds) train and hold optimiser state, the base stays
bit-identical, step 0 is the base's loss, and the adapters train the same on any mesh, with gradient
accumulation, remat and bf16 compute; the `lora:` section is checked once."""
import jax
import numpy as np
import pytest

from gpt2_jax import sharding
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.lora import is_adapter
from gpt2_jax.train import step as train_step
from gpt2_jax.train.config import load_train_config

from test_step import MC, assert_close_params, batches, run

LORA = ["lora.rank=4", "lora.alpha=8", "optim.weight_decay=0.0"]


@pytest.fixture(scope="module")
def lora_single():
    return run(LORA)


@pytest.mark.parametrize("extra, base_trainable", [
    ([], set()),
    pytest.param(["freeze.trainable=head"], {"transformer/wte/embedding"}, marks=pytest.mark.slow),
])
def test_only_adapters_train_and_the_base_stays_bit_identical(extra, base_trainable):
    _, start, end, state = run([*LORA, *extra])
    adapters = {k for k in start if is_adapter(k)}
    assert len(adapters) == 2 * 4 * MC.n_layer  # A and B on c_attn, attn c_proj, c_fc, mlp c_proj
    assert set(state.params) == adapters | base_trainable
    for k in start:
        if k in state.params and not k.endswith("/lora_a"):  # B (and the head) must have moved from start
            assert not np.array_equal(start[k], end[k]), f"{k} should have trained"
        elif k not in state.params:
            assert np.array_equal(start[k], end[k]), f"{k} is frozen but changed"
    # Adam's two moments for exactly the trainable parameters, plus the step counter.
    moments = 2 * sum(end[k].nbytes for k in state.params)
    assert moments <= train_step.optimizer_state_bytes(state) <= moments + 64
    assert set(state.opt_state.mu) == set(state.params)


def test_step_0_loss_is_the_base_models():
    """The first step's loss (computed before its update) with fresh adapters equals the base's exactly."""
    base_losses, start, _, _ = run(steps=1)
    params = {k: v for k, v in start.items()}
    lora_losses, *_ = run(LORA, steps=1, params=params)
    assert lora_losses[0] == base_losses[0]


def test_a_and_b_both_train_after_the_first_step(lora_single):
    """Step 1 moves only B (A's gradient is zero while B is); later steps move A too."""
    _, start, end, _ = lora_single
    assert not np.array_equal(start["transformer/h/0/attn/c_attn/lora_a"], end["transformer/h/0/attn/c_attn/lora_a"])


@pytest.mark.slow
@pytest.mark.parametrize("data, fsdp", [(2, 4), (1, 8)])
def test_lora_step_on_8_devices_equals_1(lora_single, data, fsdp):
    losses, _, end, state = run(LORA, data=data, fsdp=fsdp, n_devices=8)
    np.testing.assert_allclose(losses, lora_single[0], rtol=1e-5)
    assert_close_params(end, lora_single[2])
    if fsdp > 1:  # the adapters are split like their kernels' dimensions, their Adam moments too
        a = state.params["transformer/h/0/mlp/c_fc/lora_a"]
        assert a.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
        assert state.opt_state.mu["transformer/h/0/mlp/c_fc/lora_a"].sharding.spec == a.sharding.spec


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["model.remat=block"], ["data.packing=false"], ["model.loss_chunk=5"]],
                         ids=["remat", "unpacked", "chunked-loss"])
def test_lora_trains_the_same_with(lora_single, overrides):
    losses, _, end, _ = run([*LORA, *overrides])
    np.testing.assert_allclose(losses, lora_single[0], rtol=1e-5)
    assert_close_params(end, lora_single[2])


@pytest.mark.slow
def test_lora_gradient_accumulation_is_one_big_batch(lora_single):
    losses, _, end, _ = run(LORA, accum=4)
    np.testing.assert_allclose(losses, lora_single[0], rtol=1e-5)
    assert_close_params(end, lora_single[2])


@pytest.mark.slow
def test_lora_over_a_bfloat16_base():
    """Base in bfloat16 (parameters and compute), adapters in float32: it trains, the base is untouched."""
    same = batches(1, 1) * 6  # one batch again and again: its loss must fall
    losses, start, end, state = run(LORA, steps=6, data_batches=same,
                                    mc=MC.replace(dtype="bfloat16", param_dtype="bfloat16"))
    f32_losses, *_ = run(LORA, steps=6, data_batches=same)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05
    np.testing.assert_allclose(losses, f32_losses, rtol=2e-2)
    assert state.frozen["transformer/h/0/attn/c_attn/kernel"].dtype == "bfloat16"
    assert state.params["transformer/h/0/attn/c_attn/lora_a"].dtype == "float32"
    assert all(np.array_equal(start[k], end[k]) for k in state.frozen)


@pytest.mark.parametrize("overrides, message", [
    (["lora.ranks=4"], "unknown config key lora.ranks"),
    (["lora.rank=4", "lora.targets=[c_attn, q_proj]"], "lora.targets is 'q_proj'"),
    (["lora.rank=-2"], "lora.rank must be an integer >= 0"),
    (["lora.rank=4", "lora.dropout=1.5"], r"lora.dropout must be in \[0, 1\)"),
    (["lora.init_from=some/dir"], "lora.init_from needs lora.rank > 0"),
    (["lora.rank=4", "lora.targets=[]"], "lora.targets is empty"),
])
def test_bad_lora_sections_are_one_line(overrides, message):
    with pytest.raises(GPT2JaxError, match=message):
        load_train_config(None, overrides)


def test_lora_section_from_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lora: {rank: 8, alpha: 16, targets: [c_attn, c_proj], dropout: 0.05, use_rslora: true}\n"
                 "freeze: {trainable: head}\n")
    cfg = load_train_config(str(f))
    lc = cfg.lora.adapters()
    assert (lc.rank, lc.targets, lc.dropout) == (8, ("c_attn", "c_proj"), 0.05)
    assert lc.scale == 16 / np.sqrt(8)
