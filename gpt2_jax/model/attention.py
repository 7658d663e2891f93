"""Causal softmax attention behind one call, `attend(q, k, v, impl=...)`, for every backend.

Shape letters: B batch, T query positions, S key positions (cache slots), H heads, K head width.

Implementations (`IMPLS`):
- "materialised": explicit float32 probabilities (the only one that takes dropout on them). Without a
  cache the queries go in blocks of QUERY_CHUNK rows, each against only the keys up to its last row, so
  the masked upper triangle is skipped: on XLA:CPU a GPT-2 124M train step at seq 1024 takes 6.1–6.8 s
  instead of 8.2–8.6 s through dot_product_attention.
- "xla": `jax.nn.dot_product_attention` with its default implementation, which in jax 0.10 is XLA's
  (cuDNN only when asked for by name).
- "splash": the Pallas TPU splash-attention kernel (causal block sparsity, segment ids, a custom VJP);
  interpreted on CPU, so tests check its numbers there.

Packed rows (`segment_ids_BT`): a query attends to earlier keys of its own segment only; 0 marks
padding, which attends to padding and is never read.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import Mesh, PartitionSpec as P

from gpt2_jax.errors import GPT2JaxError, suggest
from gpt2_jax.sharding import BATCH_AXES, data_parallel_size

IMPLS = ("materialised", "xla", "splash")
PALLAS_IMPLS = ("splash",)
# tools/benchmarks/attention.py, `tools/bench.py attention` (v5e, GPT-2 124M layer, fwd+bwd): splash needs the fewest
# temporaries (102 MB per chip at T=1024 against flash's 328 MB and XLA's 604 MB; 303 / 755 / 2451 MB at
# T=2048) and its roofline estimate is within 10% of flash's (XLA's is 3-7x both). Estimates from the
# compiler, not TPU timings.
TPU_DEFAULT = "splash"
QUERY_CHUNK = 128  # query rows per block of materialised causal attention
PALLAS_MIN_BLOCK = 128  # the TPU kernels' smallest tile along the sequence (one vreg's 128 lanes)


def default_impl(platform: str, *, dropout: bool) -> str:
    """The implementation for a platform ("cpu", "gpu", "tpu"): dropout on the probabilities needs them
    materialised; otherwise the fastest on that platform (measured on CPU, compiler estimates on TPU)."""
    if dropout:
        return "materialised"
    return {"cpu": "materialised", "tpu": TPU_DEFAULT}.get(platform, "xla")


def pallas_block(T: int) -> int:
    """The splash kernel's tile along the sequence for length T: the largest of 512, 256, 128 dividing T
    (512 is MaxText's default for these kernels; smaller tiles only for short T)."""
    for block in (512, 256, PALLAS_MIN_BLOCK):
        if T % block == 0:
            return block
    raise GPT2JaxError(f"attention: the TPU kernels need a sequence length that is a multiple of "
                       f"{PALLAS_MIN_BLOCK}, got {T}")


def attend(q_BTHK, k_BSHK, v_BSHK, *, impl: str, scale: float, mask_BTS=None, segment_ids_BT=None,
           dropout: Optional[Callable] = None, mesh: Optional[Mesh] = None, platform: Optional[str] = None):
    """softmax(scale · q kᵀ, masked) v in float32 softmax, returned in q's dtype.

    mask_BTS: bool, True = may attend (KV cache or padding); None = plain causal (T == S).
    segment_ids_BT: int32 segment of each position of packed rows (T == S): causal within a segment.
    dropout: applied to the probabilities ("materialised" only).
    mesh: the batch is split over its axes; the Pallas kernel (a custom call XLA cannot partition) then
      runs per device under shard_map.
    platform: what the program is compiled for (default: the mesh's devices', else the default backend);
      off TPU the Pallas kernel runs interpreted, so name "tpu" to compile for TPU from a CPU host.
    A Pallas impl with a dense mask (decode, padded batches) or a T that no tile divides runs as "xla":
    the kernels take only causal + segment masks over whole tiles.
    """
    if impl not in IMPLS:
        raise GPT2JaxError(f'attention impl "{impl}" is not one of {", ".join(IMPLS)}{suggest(impl, IMPLS)}')
    B, T, H, K = q_BTHK.shape
    S = k_BSHK.shape[1]
    if mask_BTS is None and T != S:
        raise GPT2JaxError(f"attention: {T} queries against {S} keys need a mask_BTS")
    if segment_ids_BT is not None and (T != S or segment_ids_BT.shape != (B, T)):
        raise GPT2JaxError(f"attention: segment ids of shape {tuple(segment_ids_BT.shape)} need T == S and "
                           f"shape {(B, T)} (packed training rows, no cache)")
    if dropout is not None and impl != "materialised":
        raise GPT2JaxError(f'attention: dropout on the probabilities needs impl "materialised", not "{impl}"')
    dtype = q_BTHK.dtype
    platform = platform or (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
    if impl in PALLAS_IMPLS and (mask_BTS is not None or T % PALLAS_MIN_BLOCK):
        impl = "xla"
    # XLA:CPU has no float16 matmul with float32 accumulation, which dot_product_attention asks for.
    if dtype == jnp.float16 and platform == "cpu":
        q_BTHK, k_BSHK, v_BSHK = (a.astype(jnp.float32) for a in (q_BTHK, k_BSHK, v_BSHK))
    if impl == "materialised":
        out = _materialised(q_BTHK, k_BSHK, v_BSHK, mask_BTS, segment_ids_BT, scale, dropout)
    elif impl == "xla":
        allowed_B1TS = None if mask_BTS is None else mask_BTS[:, None]
        if segment_ids_BT is not None:
            same_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
            allowed_B1TS = same_B1TT if allowed_B1TS is None else allowed_B1TS & same_B1TT
        out = jax.nn.dot_product_attention(q_BTHK, k_BSHK, v_BSHK, mask=allowed_B1TS, scale=scale,
                                           is_causal=mask_BTS is None)
    else:
        out = _pallas_sharded(q_BTHK, k_BSHK, v_BSHK, segment_ids_BT, scale, mesh, interpret=platform != "tpu")
    return out.astype(dtype)


def _materialised(q_BTHK, k_BSHK, v_BSHK, mask_BTS, segment_ids_BT, scale, dropout):
    T, S = q_BTHK.shape[1], k_BSHK.shape[1]
    outs = []
    for start in range(0, T, QUERY_CHUNK if T == S else T):
        end = min(start + QUERY_CHUNK, T) if T == S else T
        keys = end if T == S else S
        s_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK[:, start:end], k_BSHK[:, :keys]) * scale
        if mask_BTS is None:
            allowed = (jnp.arange(keys)[None, :] <= jnp.arange(start, end)[:, None])[None, None]
        else:
            allowed = mask_BTS[:, None, start:end, :keys]
        if segment_ids_BT is not None:
            allowed = allowed & (segment_ids_BT[:, None, start:end, None] == segment_ids_BT[:, None, None, :keys])
        s_BHTS = jnp.where(allowed, s_BHTS, jnp.finfo(s_BHTS.dtype).min)
        p_BHTS = jax.nn.softmax(s_BHTS.astype(jnp.float32), axis=-1).astype(v_BSHK.dtype)
        if dropout is not None:
            p_BHTS = dropout(p_BHTS)
        outs.append(jnp.einsum("bhts,bshk->bthk", p_BHTS, v_BSHK[:, :keys]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _pallas_sharded(q_BTHK, k_BTHK, v_BTHK, segment_ids_BT, scale, mesh, *, interpret):
    seg_BT = segment_ids_BT if segment_ids_BT is not None else jnp.ones(q_BTHK.shape[:2], jnp.int32)
    local = functools.partial(_splash, scale=scale, interpret=interpret, segments=segment_ids_BT is not None)
    if mesh is None or mesh.size == 1:
        return local(q_BTHK, k_BTHK, v_BTHK, seg_BT)
    shards = data_parallel_size(mesh)
    if q_BTHK.shape[0] % shards:
        raise GPT2JaxError(f"attention: a batch of {q_BTHK.shape[0]} does not split over the mesh's {shards} "
                           f"batch shards ({', '.join(BATCH_AXES)})")
    spec = P(BATCH_AXES)
    # Pallas calls carry no varying-manual-axes rule, hence check_vma=False.
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, spec), out_specs=spec,
                         check_vma=False)(q_BTHK, k_BTHK, v_BTHK, seg_BT)


@functools.lru_cache(maxsize=None)
def _splash_kernel(T: int, H: int, interpret: bool):
    b = pallas_block(T)
    blocks = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                               block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * H)
    # The kernel holds its block-sparsity tables as arrays; made under a jit trace they would be that
    # trace's tracers, and this cache would leak them into the next trace.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q_BTHK, k_BTHK, v_BTHK, seg_BT, *, scale, interpret, segments):
    _, T, H, _ = q_BTHK.shape
    kernel = _splash_kernel(T, H, interpret)
    # The kernel has no scale argument: scale q once, rounding once in its dtype.
    q_BTHK = (q_BTHK.astype(jnp.float32) * scale).astype(q_BTHK.dtype)
    q_BHTK, k_BHTK, v_BHTK = (a.transpose(0, 2, 1, 3) for a in (q_BTHK, k_BTHK, v_BTHK))
    if segments:
        out_BHTK = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
            q_BHTK, k_BHTK, v_BHTK, seg_BT)
    else:
        out_BHTK = jax.vmap(kernel)(q_BHTK, k_BHTK, v_BHTK)
    return out_BHTK.transpose(0, 2, 1, 3)
