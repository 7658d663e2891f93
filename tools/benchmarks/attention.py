"""`tools/bench.py attention`: one attention layer's forward + backward compiled for a TPU slice (libtpu, on
this machine), XLA's attention against the Pallas splash and flash kernels: the compiler's per-chip memory and
cost figures and a roofline estimate, one JSON line per (impl, sequence length). Estimates, not TPU timings;
the figures behind gpt2_jax.model.attention.TPU_DEFAULT."""
from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt2_jax.aot.slices import chip_of, topology_devices
from gpt2_jax.model import attention
from gpt2_jax.sharding import BATCH_AXES


def _flash(q_BTHK, k_BTHK, v_BTHK, seg_BT, *, scale):
    """The Pallas TPU flash-attention kernel (here only: splash beat it, see attention.TPU_DEFAULT)."""
    b = attention.pallas_block(q_BTHK.shape[1])
    blocks = pallas_flash.BlockSizes(block_q=b, block_k_major=b, block_k=b, block_b=1, block_q_major_dkv=b,
                                     block_k_major_dkv=b, block_k_dkv=b, block_q_dkv=b, block_k_major_dq=b,
                                     block_k_dq=b, block_q_dq=b)
    q_BHTK, k_BHTK, v_BHTK = (a.transpose(0, 2, 1, 3) for a in (q_BTHK, k_BTHK, v_BTHK))
    out_BHTK = pallas_flash.flash_attention(q_BHTK, k_BHTK, v_BHTK, segment_ids=pallas_flash.SegmentIds(seg_BT, seg_BT),
                                            causal=True, sm_scale=scale, block_sizes=blocks)
    return out_BHTK.transpose(0, 2, 1, 3)


def attention_report(topology: str = "v5e:2x2", seq_lens=(1024, 2048), batch_per_chip: int = 8, heads: int = 12,
                     head_dim: int = 64, impls=("xla", "splash", "flash")) -> list[dict]:
    """Forward + backward of one attention layer (bf16, packed-row segment ids) compiled ahead of time for
    a TPU slice with libtpu; one dict per (impl, T) with the compiler's per-chip memory and cost figures
    and a roofline estimate max(flops / peak, bytes / HBM bandwidth) at the chip's figures (an estimate, not a
    measurement). cost_analysis may not count a Pallas custom call's work: compare `flops` with
    `model_flops` (4·B·H·T²·K forward, ×3 with backward, halved for causal)."""
    devices = topology_devices(topology)
    chip = chip_of(devices[0])
    mesh = jax.make_mesh((len(devices), 1), BATCH_AXES, devices=devices)
    rows = []
    for T in seq_lens:
        B = batch_per_chip * len(devices)
        x = jax.ShapeDtypeStruct((B, T, heads, head_dim), jnp.bfloat16, sharding=NamedSharding(mesh, P(BATCH_AXES)))
        seg = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, P(BATCH_AXES)))
        for impl in impls:
            def loss(q, k, v, seg, impl=impl):
                if impl == "flash":
                    spec = P(BATCH_AXES)
                    out = jax.shard_map(functools.partial(_flash, scale=1 / math.sqrt(head_dim)), mesh=mesh,
                                        in_specs=(spec,) * 4, out_specs=spec, check_vma=False)(q, k, v, seg)
                else:
                    out = attention.attend(q, k, v, impl=impl, scale=1 / math.sqrt(head_dim), segment_ids_BT=seg, mesh=mesh)
                return jnp.sum(out.astype(jnp.float32) ** 2)

            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile()
            mem = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops, hbm = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
            model_flops = 3 * 4 * batch_per_chip * heads * T * T * head_dim / 2
            rows.append(dict(
                impl=impl, topology=topology, seq_len=T, batch_per_chip=batch_per_chip, heads=heads,
                head_dim=head_dim, dtype="bfloat16", temp_bytes=int(mem.temp_size_in_bytes),
                argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
                flops=flops, bytes_accessed=hbm, model_flops=model_flops,
                roofline_estimate_ms=1e3 * max(max(flops, model_flops) / chip.peak_flops, hbm / chip.hbm_bandwidth)))
    return rows


def bench(topology: str, seq_lens: tuple[int, ...]) -> None:
    """`attention_report`'s rows as JSON lines."""
    for row in attention_report(topology, seq_lens):
        print(json.dumps(row), flush=True)
