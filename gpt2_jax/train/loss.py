"""Cross-entropy over GPT-2's tied LM head without the whole [B, T, V] logits in memory.

Shape letters: B examples, T positions, D width, V vocabulary, N chunks, C positions per chunk.

`lm_head_cross_entropy` equals `train.step.masked_cross_entropy(h @ E.T, labels, mask)` with the logits in
the compute dtype and the log-sum-exp in float32, but scans over chunks of C positions: each step holds one
[B, C, V] block of logits. The chunks cut the T axis, not the flattened B*T tokens, so the batch dimension
stays whole and a batch split over "data" and "fsdp" stays split in every step. Its backward
(`jax.custom_vjp`) keeps only h, the embedding, labels, mask and the float32 per-token log-sum-exp, and
recomputes each chunk's logits.

With a `mesh`, both passes run per device under shard_map: the embedding is gathered once per pass and its
gradient is accumulated locally and reduced once at the end. Without one, XLA partitions the loop itself,
and (as compiled for TPU and CPU) reduces the embedding gradient inside every backward step.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sharding import BATCH_AXES, data_parallel_size, spec_for


def lm_head_cross_entropy(h_BTD, embedding_VD, labels_BT, mask_BT, *, positions_per_chunk: int, dtype,
                          mesh: Optional[Mesh] = None):
    """(sum of -log p(label) where mask is 1, number of such positions) for logits `h @ embedding.T`.

    dtype: the compute dtype of the logits (the model's `config.dtype`).
    positions_per_chunk: C; <= 0 or >= T computes all positions in one chunk (still without float32
      [B, T, V] logits).
    mesh: the batch is split over its batch axes and the embedding as sharding.RULES say; the loss then
      runs per device under shard_map (one gather and one reduction of the embedding per pass).
    The embedding's gradient flows to the caller, so passing the tied `wte.embedding` adds the head's share
    to the input embedding's.
    """
    # The train step calls this with model.loss_chunk > 0: the errors name that key.
    if not isinstance(positions_per_chunk, int) or isinstance(positions_per_chunk, bool):
        raise GPT2JaxError(f"model.loss_chunk must be an int (positions per chunk), got {positions_per_chunk!r}")
    if h_BTD.ndim != 3 or embedding_VD.ndim != 2 or h_BTD.shape[-1] != embedding_VD.shape[-1]:
        raise GPT2JaxError(f"model.loss_chunk: the LM head's cross-entropy takes hidden states [B, T, D] and an "
                           f"embedding [V, D], got {h_BTD.shape} and {embedding_VD.shape}")
    if labels_BT.shape != h_BTD.shape[:2] or mask_BT.shape != h_BTD.shape[:2]:
        raise GPT2JaxError(f"model.loss_chunk: the labels {labels_BT.shape} and loss mask {mask_BT.shape} must be "
                           f"{h_BTD.shape[:2]}, the [B, T] of the hidden states")
    B, T = h_BTD.shape[:2]
    C = T if positions_per_chunk <= 0 else min(positions_per_chunk, T)
    if mesh is not None and mesh.size == 1:
        mesh = None
    if mesh is not None and B % data_parallel_size(mesh):
        axes = " × ".join(f"{a}={mesh.shape[a]}" for a in BATCH_AXES)
        raise GPT2JaxError(f"model.loss_chunk: a micro-batch of {B} sequences does not split over the data-parallel "
                           f"size {data_parallel_size(mesh)} (mesh {axes})")
    loss = _chunked_loss(C, jnp.dtype(dtype), mesh, h_BTD, embedding_VD, labels_BT.astype(jnp.int32),
                         mask_BT.astype(jnp.float32))
    return loss, jnp.sum(mask_BT)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked_loss(C, dtype, mesh, h_BTD, embedding_VD, labels_BT, mask_BT):
    return _fwd(C, dtype, mesh, h_BTD, embedding_VD, labels_BT, mask_BT)[0]


def _fwd(C, dtype, mesh, h_BTD, embedding_VD, labels_BT, mask_BT):
    if mesh is None:
        loss, lse_BT = _forward(C, dtype, h_BTD, embedding_VD.astype(dtype), labels_BT, mask_BT)
    else:
        rows, emb = P(BATCH_AXES), _embedding_spec(embedding_VD, mesh)

        def local(h_BTD, emb_VD, labels_BT, mask_BT):
            loss, lse_BT = _forward(C, dtype, h_BTD, _gather(emb_VD.astype(dtype), emb), labels_BT, mask_BT)
            return jax.lax.psum(loss, BATCH_AXES), lse_BT

        loss, lse_BT = jax.shard_map(local, mesh=mesh, in_specs=(rows, emb, rows, rows), out_specs=(P(), rows),
                                     check_vma=False)(h_BTD, embedding_VD, labels_BT, mask_BT)
    return loss, (h_BTD, embedding_VD, labels_BT, mask_BT, lse_BT)


def _bwd(C, dtype, mesh, residuals, g):
    h_BTD, embedding_VD, labels_BT, mask_BT, lse_BT = residuals
    scale_BT = mask_BT * g
    if mesh is None:
        d_h_BTD, d_emb_VD = _backward(C, dtype, h_BTD, embedding_VD.astype(dtype), labels_BT, scale_BT, lse_BT)
    else:
        rows, emb = P(BATCH_AXES), _embedding_spec(embedding_VD, mesh)

        def local(h_BTD, emb_VD, labels_BT, scale_BT, lse_BT):
            d_h_BTD, d_emb_VD = _backward(C, dtype, h_BTD, _gather(emb_VD.astype(dtype), emb), labels_BT, scale_BT,
                                          lse_BT)
            return d_h_BTD, _reduce(d_emb_VD, emb)

        d_h_BTD, d_emb_VD = jax.shard_map(local, mesh=mesh, in_specs=(rows, emb, rows, rows, rows),
                                          out_specs=(rows, emb), check_vma=False)(
            h_BTD, embedding_VD, labels_BT, scale_BT, lse_BT)
    # Labels and mask are data: no cotangent.
    return d_h_BTD, d_emb_VD.astype(embedding_VD.dtype), None, None


_chunked_loss.defvjp(_fwd, _bwd)


def _forward(C, dtype, h_BTD, emb_VD, labels_BT, mask_BT):
    """(loss sum, float32 log-sum-exp [B, T]) with `emb_VD` already in the compute dtype."""

    def step(loss, xs):
        h_BCD, labels_BC, mask_BC = xs
        logits_BCV = jnp.dot(h_BCD.astype(dtype), emb_VD.T)  # as nnx.Embed.attend does
        lse_BC = jax.nn.logsumexp(logits_BCV.astype(jnp.float32), axis=-1)
        target_BC = jnp.take_along_axis(logits_BCV, labels_BC[..., None], axis=-1)[..., 0].astype(jnp.float32)
        return loss + jnp.sum((lse_BC - target_BC) * mask_BC), lse_BC

    loss, lse_NBC = _scan(step, jnp.float32(0), tuple(_chunks(x, C) for x in (h_BTD, labels_BT, mask_BT)))
    return loss, _unchunk(lse_NBC, h_BTD.shape[1])


def _backward(C, dtype, h_BTD, emb_VD, labels_BT, scale_BT, lse_BT):
    """(d h in h's dtype, float32 d embedding) for cotangent `scale` = mask × d loss, logits recomputed."""
    V = emb_VD.shape[0]

    def step(d_emb_VD, xs):
        h_BCD, labels_BC, scale_BC, lse_BC = xs
        hc_BCD = h_BCD.astype(dtype)
        logits_BCV = jnp.dot(hc_BCD, emb_VD.T)
        p_BCV = jnp.exp(logits_BCV.astype(jnp.float32) - lse_BC[..., None])
        onehot_BCV = jax.nn.one_hot(labels_BC, V, dtype=jnp.float32)
        # Back into the compute dtype, as autodiff of the full-logits loss does before the head's matmuls.
        d_logits_BCV = ((p_BCV - onehot_BCV) * scale_BC[..., None]).astype(dtype)
        d_h_BCD = jnp.dot(d_logits_BCV, emb_VD, preferred_element_type=jnp.float32).astype(h_BTD.dtype)
        d_emb_VD = d_emb_VD + jnp.einsum("bcv,bcd->vd", d_logits_BCV, hc_BCD, preferred_element_type=jnp.float32)
        return d_emb_VD, d_h_BCD

    xs = tuple(_chunks(x, C) for x in (h_BTD, labels_BT, scale_BT, lse_BT))
    d_emb_VD, d_h_NBCD = _scan(step, jnp.zeros(emb_VD.shape, jnp.float32), xs)
    return _unchunk(d_h_NBCD, h_BTD.shape[1]), d_emb_VD


def _embedding_spec(embedding_VD, mesh) -> P:
    return spec_for(("vocab", "embed"), embedding_VD.shape, mesh, "the tied embedding")


def _gather(x_VD, spec: P):
    """This device's slice of the embedding -> the whole embedding (inside shard_map)."""
    for dim, axis in enumerate(spec):
        if axis is not None:
            x_VD = jax.lax.all_gather(x_VD, axis, axis=dim, tiled=True)
    return x_VD


def _reduce(d_VD, spec: P):
    """Each device's whole float32 embedding gradient -> the sum over devices, sliced as `spec` (shard_map)."""
    for dim, axis in enumerate(spec):
        if axis is not None:
            d_VD = jax.lax.psum_scatter(d_VD, axis, scatter_dimension=dim, tiled=True)
    rest = tuple(a for a in BATCH_AXES if a not in tuple(spec))
    return jax.lax.psum(d_VD, rest) if rest else d_VD


def _chunks(x_BT, C):
    """[B, T, ...] -> [N, B, C, ...], T padded with zeros (mask 0, label 0) up to N * C."""
    B, T = x_BT.shape[:2]
    N = -(-T // C)
    x_BT = jnp.pad(x_BT, [(0, 0), (0, N * C - T)] + [(0, 0)] * (x_BT.ndim - 2))
    return jnp.moveaxis(x_BT.reshape(B, N, C, *x_BT.shape[2:]), 1, 0)


def _unchunk(x_NBC, T):
    """[N, B, C, ...] -> [B, T, ...], the padding dropped."""
    N, B, C = x_NBC.shape[:3]
    return jnp.moveaxis(x_NBC, 0, 1).reshape(B, N * C, *x_NBC.shape[3:])[:, :T]


def _scan(step, carry, xs):
    """jax.lax.scan, or one plain call when there is a single chunk (no loop for XLA to keep)."""
    if jax.tree.leaves(xs)[0].shape[0] == 1:
        carry, y = step(carry, jax.tree.map(lambda x: x[0], xs))
        return carry, jax.tree.map(lambda x: x[None], y)
    return jax.lax.scan(step, carry, xs)
