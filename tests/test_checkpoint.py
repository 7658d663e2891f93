"""Orbax checkpoints without a whole run: a state saved on one mesh restores bitwise onto another, parameters
read back one tensor at a time, and config changes that a checkpoint cannot continue from are refused."""
import jax
import numpy as np
import pytest

from gpt2_jax import sharding, train_step
from gpt2_jax.checkpoint import Checkpointer, check_resumable, config_changes
from gpt2_jax.config import ModelConfig
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.train_config import load_train_config

MC = ModelConfig(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def setup_on(data, fsdp, n_devices, overrides=()):
    cfg = load_train_config(None, ["freeze.trainable=last_n_blocks", "freeze.last_n_blocks=1", *overrides])
    return train_step.build_setup(MC, cfg, sharding.make_mesh(data, fsdp, jax.devices()[:n_devices]))


def flat(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


def test_a_state_saved_on_fsdp8_restores_bitwise_on_one_device_and_on_data2_fsdp4(tmp_path):
    src = setup_on(1, 8, 8)
    state = train_step.init_state(src)
    # One real step, so the optimiser moments and the step counter hold something.
    step, _ = train_step.compile_steps(src)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, MC.vocab_size, (1, 8, 9)).astype(np.int32)
    batch = {"input_ids": ids[..., :-1], "labels": ids[..., 1:], "loss_mask": np.ones((1, 8, 8), np.float32)}
    state, _ = step(state, sharding.global_batch(batch, src.mesh))
    saved = flat(state)
    host = sharding.host_values({**state.params, **state.frozen})
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(1, state, {"step": 1})
    ckpt.close()

    for data, fsdp, n in [(1, 1, 1), (2, 4, 8)]:
        dst = setup_on(data, fsdp, n)
        ckpt = Checkpointer(str(tmp_path))
        assert ckpt.latest_step() == 1 and ckpt.meta(1) == {"step": 1}
        restored = ckpt.restore(1, dst.abstract_state)
        ckpt.close()
        got = flat(restored)
        assert got.keys() == saved.keys()
        for k in saved:
            np.testing.assert_array_equal(got[k], saved[k], err_msg=k)
        # Restored straight into the target layout: every leaf has the sharding the abstract state names.
        for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(dst.abstract_state)):
            assert leaf.sharding == want.sharding

    reader = Checkpointer(str(tmp_path), read_only=True)
    params = reader.restore_params(1)
    shapes, read = reader.param_reader(1)
    reader.close()
    assert set(params) == set(shapes) == set(src.layout.shapes)
    for k, (shape, dtype) in shapes.items():
        value = read(k)
        assert value.shape == shape and value.dtype == dtype and isinstance(value, np.ndarray)
        np.testing.assert_array_equal(value, params[k])
        np.testing.assert_array_equal(value, host[k])


def test_frozen_parameters_have_no_optimiser_state_in_the_checkpoint(tmp_path):
    setup = setup_on(1, 1, 1)
    state = train_step.init_state(setup)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(0, state, {})
    ckpt.close()
    tree = Checkpointer(str(tmp_path), read_only=True).manager.item_metadata(0)["state"]
    assert set(tree["params"]) == set(setup.trainable) and not set(tree["params"]) & set(tree["frozen"])
    moments = {getattr(p[-1], "key", None) for p, _ in jax.tree_util.tree_leaves_with_path(tree["opt_state"])}
    assert set(tree["frozen"]).isdisjoint(moments)


def test_config_changes_split_into_breaking_and_harmless():
    base = load_train_config(None, []).to_dict()
    changed = load_train_config(None, ["train.steps=99", "optim.lr=1e-2", "mesh.fsdp=2", "model.n_embd=64",
                                       "data.max_length=64"]).to_dict()
    breaking, harmless = config_changes(base, changed)
    assert [c.split(":")[0] for c in breaking] == ["data.max_length", "model.n_embd"]
    assert [c.split(":")[0] for c in harmless] == ["mesh.fsdp", "optim.lr", "train.steps"]
    harmless = check_resumable(base, load_train_config(None, ["train.steps=99"]).to_dict(), "RUN")
    assert harmless == [f"train.steps: {base['train']['steps']!r} -> 99"]
    with pytest.raises(GPT2JaxError, match=r"cannot resume RUN: .*data.max_length: \d+ -> 64; model.n_embd"):
        check_resumable(base, changed, "RUN")
