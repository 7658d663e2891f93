"""The mesh and the logical-axis rules on 8 fake CPU devices, with the model's real axes and sharding.RULES."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gpt2_jax import sharding
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.layout import ModelLayout

MC = ModelConfig(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4)


@pytest.mark.parametrize("data, fsdp, want", [(-1, 1, (8, 1)), (2, 4, (2, 4)), (1, -1, (1, 8)), (-1, 2, (4, 2))])
def test_mesh_sizes(data, fsdp, want):
    mesh = sharding.make_mesh(data, fsdp)
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == want
    assert sharding.data_parallel_size(mesh) == 8


@pytest.mark.parametrize("data, fsdp, message", [(-1, -1, "cannot both be -1"), (3, -1, "cannot be split"),
                                                 (2, 2, "= 4 devices, but there are 8")])
def test_bad_mesh_is_refused(data, fsdp, message):
    with pytest.raises(GPT2JaxError, match=message):
        sharding.make_mesh(data, fsdp)


def test_rules_shard_every_embed_dimension_over_fsdp():
    layout = ModelLayout.of(MC)
    mesh = sharding.make_mesh(2, 4)
    shardings = sharding.named_shardings(layout.logical, layout.shapes, mesh)
    assert set(shardings) == set(layout.shapes)
    for key, s in shardings.items():
        logical = layout.logical[key] or ()
        want = tuple(sharding.RULES[name] if name is not None else None for name in logical)
        assert tuple(s.spec) == want, key
    assert shardings["transformer/h/0/mlp/c_fc/kernel"].spec == P("fsdp", None)
    assert shardings["transformer/h/0/attn/c_proj/kernel"].spec == P(None, "fsdp")
    assert shardings["transformer/wte/embedding"].spec == P(None, "fsdp")
    # Each device holds a quarter of every embed-sharded tensor.
    x = jax.device_put(np.zeros((32, 128), np.float32), shardings["transformer/h/0/mlp/c_fc/kernel"])
    assert {tuple(s.data.shape) for s in x.addressable_shards} == {(8, 128)}


def test_two_dimensions_on_one_mesh_axis_are_refused(monkeypatch):
    layout = ModelLayout.of(MC)
    monkeypatch.setitem(sharding.RULES, "mlp", "fsdp")
    with pytest.raises(GPT2JaxError, match=r"transformer/h/0/mlp/c_fc/kernel: dimensions 0 and 1 \('embed', 'mlp'\) "
                                           r"both map to mesh axis 'fsdp'"):
        sharding.named_shardings(layout.logical, layout.shapes, sharding.make_mesh(2, 4))


def test_a_dimension_the_mesh_axis_does_not_divide_is_refused():
    mc = ModelConfig(vocab_size=96, n_positions=32, n_embd=36, n_layer=1, n_head=4)
    layout = ModelLayout.of(mc)
    with pytest.raises(GPT2JaxError, match=r"dimension \d \('embed', size 36\) does not divide over mesh axis 'fsdp' "
                                           r"of size 8; choose a mesh.fsdp that divides 36"):
        sharding.named_shardings(layout.logical, layout.shapes, sharding.make_mesh(1, 8))
    sharding.named_shardings(layout.logical, layout.shapes, sharding.make_mesh(2, 4))  # 36 divides over 4


def test_global_batch_splits_examples_over_every_axis_and_host_values_gathers():
    mesh = sharding.make_mesh(2, 4)
    ids = np.arange(2 * 16 * 5, dtype=np.int32).reshape(2, 16, 5)  # [micro-batches, examples, time]
    batch = sharding.global_batch({"input_ids": ids}, mesh)["input_ids"]
    assert batch.sharding.spec == P(None, ("data", "fsdp"), None)
    assert {tuple(s.data.shape) for s in batch.addressable_shards} == {(2, 2, 5)}
    np.testing.assert_array_equal(sharding.host_values({"x": batch})["x"], ids)
    np.testing.assert_array_equal(sharding.local_value(jax.device_put(np.float32(3), sharding.replicated(mesh))), 3)
