"""gpt2_jax/aot/programs.py: the run's programs compiled by XLA:TPU (libtpu, ahead of time, on this CPU machine)."""
import math

import jax
import jax.numpy as jnp
import pytest

from gpt2_jax import sharding

from gpt2_jax.aot import programs, slices
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.train.config import load_train_config
from gpt2_jax.train.step import build_setup

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install -e ".[tpu]"); CI installs it')

TINY = ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.n_positions=64", "model.dropout=0.0",
        "data.max_length=64", "train.batch_size=8", "mesh.data=2", "mesh.fsdp=2", "sample.num=0"]


@pytest.fixture(scope="module")
def tiny_train():
    cfg = load_train_config(None, TINY)
    (report,) = programs.compile_programs(cfg, "v5e:2x2", ["train"], vocab_size=300)
    return cfg, report


@pytest.mark.slow
def test_tiny_train_step_fits_and_counts_its_flops(tiny_train):
    cfg, r = tiny_train
    assert (r["chips"], r["chip"], r["mesh"]) == (4, "v5e", {"data": 2, "fsdp": 2})
    assert r["fits"] and 0 < r["hbm_bytes"]["total"] < 16 * 2 ** 30
    # The compiler's per-chip arguments hold at least this chip's shards of the state and the batch.
    setup_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(_abstract_state(cfg)))
    assert r["hbm_bytes"]["argument"] >= setup_bytes
    assert r["hbm_bytes"]["alias"] > 0  # the state is donated
    assert r["xla_flops_per_chip"] > 0 and r["model_flops_per_chip"] > 0
    assert math.isfinite(r["flops_ratio"]) and 0.5 < r["flops_ratio"] < 4
    assert r["estimate"] in ("cost_model", "roofline") and r["step_s"] > 0 and 0 < r["mfu"] < 1
    # FSDP gathers the parameters' shards: all-gathers must be there, moving bytes.
    assert r["collectives"]["all-gather"]["count"] > 0 and r["collectives"]["all-gather"]["bytes"] > 0


@pytest.mark.slow
def test_fsdp_layout_needs_no_involuntary_full_rematerialization(tiny_train):
    _, r = tiny_train
    assert r["involuntary_remat"] == 0, r["first_remat"]


@pytest.mark.slow
def test_eval_and_generate_compile_on_a_data_parallel_mesh():
    cfg = load_train_config(None, TINY[:-3] + ["mesh.data=4", "mesh.fsdp=1", "sample.num=2",
                                               "sample.max_new_tokens=20"])
    ev, gen = programs.compile_programs(cfg, "v5e:2x2", ["eval", "generate"], vocab_size=300)
    assert ev["program"] == "eval" and ev["batch"] == [1, 8, 64] and ev["fits"]
    assert 0.5 < ev["flops_ratio"] < 4  # no loop in the forward pass: XLA's count is the whole step
    # Data parallel: the eval step reduces its loss sums; nothing needs gathering.
    assert ev["collectives"]["all-reduce"]["count"] > 0 and ev["collectives"]["all-gather"]["count"] == 0
    assert gen["program"] == "generate" and gen["prompt"] == [2, 32] and gen["new_slots"] == 32 and gen["fits"]
    assert gen["tokens_per_step"] == 2 * 20
    # The decode loop stops on EOS: its trip count is unknown and XLA counts its body once.
    assert gen["while_loops"] == {"unknown": 1} and gen["xla_cost_counts_loop_bodies_once"]
    assert gen["xla_flops_per_chip"] > 0 and gen["model_flops_per_chip"] > 0


def _abstract_state(cfg):
    devices = slices.topology_devices("v5e:2x2")
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=devices)
    return build_setup(cfg.model_config(300), cfg, mesh).abstract_state


def test_one_line_errors():
    cfg = load_train_config(None, TINY[:-3] + ["mesh.data=8", "mesh.fsdp=1"])
    with pytest.raises(GPT2JaxError, match="mesh.data=8 × mesh.fsdp=1 = 8 devices, but there are 4"):
        next(programs.compile_programs(cfg, "v5e:2x2", ["train"], vocab_size=300))
