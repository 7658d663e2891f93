"""Orbax checkpoints without a whole run: a state saved on one mesh restores bitwise onto another, parameters
read back one tensor at a time, damaged steps refused."""
import json
import logging
import re

import jax
import numpy as np
import pytest

from gpt2_jax import sharding

from gpt2_jax.checkpoints.orbax import Checkpointer, CorruptCheckpoint, array_checksum, host_checksum
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.train import step as train_step
from gpt2_jax.train.config import load_train_config

from conftest import damage

MC = ModelConfig(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def setup_on(data, fsdp, n_devices, overrides=()):
    cfg = load_train_config(None, ["freeze.trainable=last_n_blocks", "freeze.last_n_blocks=1", *overrides])
    return train_step.build_setup(MC, cfg, sharding.make_mesh(data, fsdp, jax.devices()[:n_devices]))


def flat(state) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(state)}


@pytest.mark.slow
def test_a_state_saved_on_fsdp8_restores_bitwise_on_one_device_and_on_data2_fsdp4(tmp_path):
    src = setup_on(1, 8, 8)
    state = train_step.init_state(src)
    # One real step, so the optimiser moments and the step counter hold something.
    step, _ = train_step.compile_steps(src)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, MC.vocab_size, (1, 8, 9)).astype(np.int32)
    batch = {"input_ids": ids[..., :-1], "labels": ids[..., 1:], "loss_mask": np.ones((1, 8, 8), np.float32),
             "segment_ids": np.ones((1, 8, 8), np.int32),
             "positions": np.broadcast_to(np.arange(8, dtype=np.int32), (1, 8, 8)).copy()}
    state, _ = step(state, sharding.global_batch(batch, src.mesh))
    saved = flat(state)
    host = sharding.host_values({**state.params, **state.frozen})
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(1, state, {"step": 1})
    ckpt.close()

    for data, fsdp, n in [(1, 1, 1), (2, 4, 8)]:
        dst = setup_on(data, fsdp, n)
        ckpt = Checkpointer(str(tmp_path))
        assert ckpt.latest_step() == 1 and ckpt.meta(1)["step"] == 1 and len(ckpt.meta(1)["checksums"]) == len(saved)
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


@pytest.mark.slow
@pytest.mark.parametrize("how", ["bitflip", "truncated", "empty", "meta"])
def test_a_damaged_step_is_refused_and_the_previous_one_used(tmp_path, how, caplog):
    from gpt2_jax.checkpoints.pretrained import newest_good

    setup = setup_on(1, 1, 1)
    states = {s: train_step.init_state(setup)._replace(step=jax.numpy.int32(s)) for s in (1, 2)}
    states[2] = states[2]._replace(frozen={k: v + 1 for k, v in states[2].frozen.items()})
    ckpt = Checkpointer(str(tmp_path))
    for s, state in states.items():
        ckpt.save(s, state, {"step": s})
    ckpt.close()
    damage(tmp_path / "checkpoints" / "2", how)

    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(CorruptCheckpoint):
        ckpt.restore(2, setup.abstract_state)
    restored = ckpt.restore(1, setup.abstract_state)
    ckpt.close()
    assert int(restored.step) == 1
    reader = Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(CorruptCheckpoint):
        reader.restore_params(2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpt2_jax"):
        params = newest_good(str(tmp_path), reader, None, reader.restore_params)
    reader.close()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"{tmp_path}: checkpoint step 2 skipped: "), warned
    host = sharding.host_values({**states[1].params, **states[1].frozen})
    assert params.keys() == host.keys() and all(np.array_equal(params[k], host[k]) for k in host)


def test_no_step_verifies_is_one_line(tmp_path):
    from gpt2_jax.checkpoints.pretrained import newest_good

    setup = setup_on(1, 1, 1)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, train_step.init_state(setup), {"step": 1})
    ckpt.close()
    damage(tmp_path / "checkpoints" / "1", "bitflip")
    reader = Checkpointer(str(tmp_path), read_only=True)
    with pytest.raises(GPT2JaxError, match=rf"^{tmp_path}: no checkpoint verifies \(step 1: its "):
        newest_good(str(tmp_path), reader, None, reader.restore_params)
    with pytest.raises(GPT2JaxError, match=r"checkpoint step 1 is damaged: its "):
        newest_good(str(tmp_path), reader, 1, reader.restore_params)
    reader.close()


def test_an_array_that_differs_from_its_checksum_is_refused(tmp_path):
    """The values read back are checked against the checksums saved with them (here the saved checksum of
    one parameter is off by one, as a changed bit in that array would make it)."""
    setup = setup_on(1, 1, 1)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, train_step.init_state(setup), {"step": 1})
    ckpt.close()
    meta_file = next(p for p in (tmp_path / "checkpoints" / "1" / "meta").rglob("*") if p.is_file())
    meta = json.loads(meta_file.read_text())
    name = "['frozen']['transformer/wte/embedding']"
    meta["checksums"][name] = (meta["checksums"][name] + 1) % 2**32
    meta_file.write_text(json.dumps(meta))
    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(CorruptCheckpoint, match=re.escape(name) + " fails its checksum"):
        ckpt.restore(1, setup.abstract_state)
    ckpt.close()
    reader = Checkpointer(str(tmp_path), read_only=True)
    shapes, read = reader.param_reader(1)
    read("transformer/h/0/ln_1/scale")  # the other arrays verify
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        read("transformer/wte/embedding")
    reader.close()


def test_checksums_see_every_bit_and_agree_on_device_and_host():
    rng = np.random.default_rng(0)
    for x in (rng.standard_normal((33, 7)).astype(np.float32), rng.integers(0, 2**31, (5,)).astype(np.uint32),
              rng.standard_normal((4, 6)).astype(jax.numpy.bfloat16), np.int32(7)):
        base = host_checksum(x)
        assert int(jax.jit(array_checksum)(jax.numpy.asarray(x))) == base
        flat = np.ascontiguousarray(x).reshape(-1).view(np.uint8).copy()
        for byte in range(0, flat.size, max(1, flat.size // 9)):
            for bit in (0, 7):
                flipped = flat.copy()
                flipped[byte] ^= 1 << bit
                assert host_checksum(flipped.view(x.dtype).reshape(np.shape(x))) != base


def test_a_reader_prints_no_orbax_warnings(tmp_path, caplog):
    """generate and export open run directories read-only: Orbax's read-only notices stay quiet."""
    setup = setup_on(1, 1, 1)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, train_step.init_state(setup), {"step": 1})
    ckpt.close()
    with caplog.at_level("WARNING"):
        reader = Checkpointer(str(tmp_path), read_only=True)
        reader.restore_params(1)
        reader.close()
    assert not [r for r in caplog.records if "read_only" in r.getMessage() or "read only" in r.getMessage()]


@pytest.mark.slow  # fresh processes, about 15 s each on a shared CPU
def test_a_damaged_newest_step_is_skipped_with_one_line_and_no_traceback(tmp_path):
    """A failed restore leaves TensorStore reads in flight: loading a run whose newest step is cut short
    prints the one warning, in fresh processes, every time (the in-flight reads used to print up to 13
    "Event loop is closed" tracebacks, differently from run to run)."""
    import os
    import subprocess
    import sys

    mc = MC.replace(vocab_size=400, n_positions=64)  # a run's arrays: enough reads in flight when one fails
    cfg = load_train_config(None, [])
    state = train_step.init_state(train_step.build_setup(mc, cfg, sharding.make_mesh(8, 1, jax.devices()[:8])))
    mc.save_json(str(tmp_path / "model_config.json"))
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for step in (2, 4):
        ckpt.save(step, state, {"step": step})
    ckpt.close()
    damage(tmp_path / "checkpoints" / "4", "truncated")
    code = ("import sys\nfrom gpt2_jax.runtime import configure_logging\nconfigure_logging()\n"
            "from gpt2_jax import load_pretrained\nload_pretrained(sys.argv[1])\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"warning: {tmp_path}: checkpoint step 4 skipped: its "), \
            proc.stderr[-3000:]
