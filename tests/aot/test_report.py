"""gpt2_jax/aot/report.py: what a compiled program needs (HBM, rematerialisations, an HBM overflow as a result)."""
import jax
import jax.numpy as jnp
import pytest

from gpt2_jax import sharding
from gpt2_jax.aot import report, slices
from gpt2_jax.errors import GPT2JaxError

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install -e ".[tpu]"); CI installs it')


@pytest.mark.slow
def test_involuntary_full_rematerialization_is_caught():
    """A reshard XLA:TPU can only do by replicating ([4,1,1] tiles to [1,1,2] with the data axis replicated):
    its warning must reach the report (libtpu keeps warnings off stderr unless told)."""
    devices = slices.topology_devices("v5e:2x2")
    mesh = sharding.make_mesh(2, 2, devices=devices)
    spec = lambda *s: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*s))
    f = jax.jit(lambda x: jax.lax.with_sharding_constraint(x * 2, spec(None, None, "fsdp")) + 1)
    x = jax.ShapeDtypeStruct((8, 4, 8), jnp.float32, sharding=spec(("data", "fsdp"), None, None))
    r = report.compile_report(f, (x,), chip=slices.chip_of(devices[0]), chips=4,
                                   model_flops_per_chip=None, tokens_per_chip=1)
    assert r["involuntary_remat"] == 1 and "{devices=[4,1,1]" in r["first_remat"]


@pytest.mark.slow
def test_a_program_too_big_for_hbm_is_a_result():
    devices = slices.topology_devices("v5e:2x2")
    mesh = sharding.make_mesh(4, 1, devices=devices)
    x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=sharding.replicated(mesh))
    f = jax.jit(lambda x: jnp.tile(x, (5 * 1024, 1)) + 1.0, out_shardings=sharding.replicated(mesh))  # 20 GiB
    r = report.compile_report(f, (x,), chip=slices.chip_of(devices[0]), chips=4,
                                   model_flops_per_chip=None, tokens_per_chip=1)
    assert r["fits"] is False and r["needed_bytes"] == 20 * 2 ** 30 and r["hbm_share"] == 1.25
    assert r["error"].startswith("RESOURCE_EXHAUSTED")


def test_exhausted_message():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
           "(20.00G) exceeds available HBM (15.75G).")  # what XLA:TPU says for a 20 GiB output on a v5e
    assert report.exhausted_bytes(msg) == 20 * 2 ** 30


def test_remat_lines_drop_libtpu_noise():
    log = ["E0000 00:00:17.2 common_lib.cc:554] INVALID_ARGUMENT: Error: unexpected worker hostname",
           "W1202 spmd_partitioner.cc:652] [spmd] Involuntary full rematerialization. The compiler was not able "
           "to go from sharding {devices=[2,2]<=[4]} to {devices=[4,1]<=[4]} without doing a full "
           "rematerialization of the tensor"]
    assert report.remat_lines(log) == [log[1].strip()]
