"""lm_head_cross_entropy against the full-logits loss, torch autograd, the tied model, and the compiler."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt2_jax import sharding
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.train.loss import lm_head_cross_entropy
from gpt2_jax.model.gpt2 import GPT2LMHeadModel
from gpt2_jax.train.step import masked_cross_entropy

# Compile-only libtpu needs no TPU; let parallel test workers load it at once (as in test_attention.py).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _inputs(B=3, T=12, D=16, V=37, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h_BTD = jax.random.normal(k[0], (B, T, D))
    emb_VD = jax.random.normal(k[1], (V, D)) * 0.5
    labels_BT = jax.random.randint(k[2], (B, T), 0, V)
    mask_BT = (jax.random.uniform(k[3], (B, T)) > 0.2).astype(jnp.float32)
    mask_BT = mask_BT.at[1].set(0.0).at[0, 0].set(0.0).at[2, T - 1].set(0.0)  # a whole row, single tokens
    return h_BTD, emb_VD, labels_BT, mask_BT


def _full(dtype):
    def f(h_BTD, emb_VD, labels_BT, mask_BT):
        return masked_cross_entropy(h_BTD.astype(dtype) @ emb_VD.astype(dtype).T, labels_BT, mask_BT)
    return f


def _chunked(dtype, chunk):
    def f(h_BTD, emb_VD, labels_BT, mask_BT):
        return lm_head_cross_entropy(h_BTD, emb_VD, labels_BT, mask_BT, positions_per_chunk=chunk, dtype=dtype)
    return f


def _value_and_grads(f, *args):
    return jax.jit(jax.value_and_grad(lambda h, e, l, m: f(h, e, l, m)[0], argnums=(0, 1)))(*args)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk", [0, -1, 1, 4, 5, 100])  # 5 does not divide T = 12; 100 > T: one chunk
def test_equals_the_full_logits_loss(dtype, tol, chunk):
    args = _inputs()
    (want, (want_dh, want_de)) = _value_and_grads(_full(dtype), *args)
    (got, (dh, de)) = _value_and_grads(_chunked(dtype, chunk), *args)
    assert dh.dtype == args[0].dtype and de.dtype == args[1].dtype
    np.testing.assert_allclose(got, want, rtol=tol)
    for g, w in ((dh, want_dh), (de, want_de)):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * float(jnp.max(jnp.abs(w))))
    # The masked-out row gets no gradient at all.
    assert float(jnp.max(jnp.abs(dh[1]))) == 0.0
    assert _chunked(dtype, chunk)(*args)[1] == float(jnp.sum(args[3]))


def test_equals_torch_autograd():
    h_BTD, emb_VD, labels_BT, mask_BT = _inputs(B=2, T=9, D=8, V=23, seed=1)
    (got, (dh, de)) = _value_and_grads(_chunked(jnp.float32, 4), h_BTD, emb_VD, labels_BT, mask_BT)
    h = torch.tensor(np.asarray(h_BTD), requires_grad=True)
    e = torch.tensor(np.asarray(emb_VD), requires_grad=True)
    logits = (h @ e.T).reshape(-1, e.shape[0])
    per_token = torch.nn.functional.cross_entropy(logits, torch.tensor(np.asarray(labels_BT)).reshape(-1).long(),
                                                  reduction="none")
    loss = (per_token * torch.tensor(np.asarray(mask_BT)).reshape(-1)).sum()
    loss.backward()
    np.testing.assert_allclose(got, loss.item(), rtol=1e-5)
    np.testing.assert_allclose(dh, h.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(de, e.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_embedding_gets_both_gradients(dtype):
    """Through the real model: the head's gradient adds to the input embedding's, as with model.logits."""
    model = GPT2LMHeadModel(ModelConfig(vocab_size=41, n_positions=16, n_embd=16, n_layer=1, n_head=2, dtype=dtype))
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    labels_BT = jax.random.randint(jax.random.key(7), (2, 10), 0, 41)
    ids_BT, mask_BT = jnp.roll(labels_BT, 1, axis=1), jnp.ones((2, 10)).at[0, :3].set(0.0)

    def full(params):
        model = nnx.merge(graphdef, params, rest)
        return masked_cross_entropy(model.logits(model.hidden_states(ids_BT)[0]), labels_BT, mask_BT)[0]

    def chunked(params):
        model = nnx.merge(graphdef, params, rest)
        h_BTD, _ = model.hidden_states(ids_BT)
        return lm_head_cross_entropy(h_BTD, model.transformer.wte.embedding[...], labels_BT, mask_BT,
                                     positions_per_chunk=3, dtype=jnp.dtype(dtype))[0]

    want = dict(nnx.to_flat_state(jax.grad(full)(params)))
    got = dict(nnx.to_flat_state(jax.grad(chunked)(params)))
    tol = 1e-5 if dtype == "float32" else 3e-2
    wte = ("transformer", "wte", "embedding")
    for k in want:
        np.testing.assert_allclose(got[k][...], want[k][...], rtol=tol,
                                   atol=tol * float(jnp.max(jnp.abs(want[k][...]))), err_msg=str(k))
    # The embedding's gradient has both parts: the head's share alone would differ from the total.
    h_BTD = jax.lax.stop_gradient(model.hidden_states(ids_BT)[0])
    head_only = jax.grad(lambda e: lm_head_cross_entropy(h_BTD, e, labels_BT, mask_BT, positions_per_chunk=3,
                                                         dtype=jnp.dtype(dtype))[0])(model.transformer.wte.embedding[...])
    assert float(jnp.max(jnp.abs(head_only - want[wte][...]))) > 1e-3


@pytest.mark.parametrize("chunk", [2.0, "8", True, None])
def test_chunk_must_be_an_int(chunk):
    with pytest.raises(GPT2JaxError, match=r"model\.loss_chunk must be an int \(positions per chunk\), got "):
        lm_head_cross_entropy(*_inputs(), positions_per_chunk=chunk, dtype=jnp.float32)


def test_shapes_are_checked():
    h_BTD, emb_VD, labels_BT, mask_BT = _inputs()
    with pytest.raises(GPT2JaxError, match=r"model\.loss_chunk: the labels \(3, 11\) and loss mask \(3, 12\) must "
                                           r"be \(3, 12\)"):
        lm_head_cross_entropy(h_BTD, emb_VD, labels_BT[:, :-1], mask_BT, positions_per_chunk=4, dtype=jnp.float32)
    with pytest.raises(GPT2JaxError, match=r"model\.loss_chunk: .* hidden states \[B, T, D\] and an embedding"):
        lm_head_cross_entropy(h_BTD, emb_VD[:, :-1], labels_BT, mask_BT, positions_per_chunk=4, dtype=jnp.float32)


def _temp_bytes(f, *shapes, **jit_kwargs):
    compiled = jax.jit(jax.grad(lambda h, e, l, m: f(h, e, l, m)[0], argnums=(0, 1)), **jit_kwargs).lower(
        *shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes, compiled


MEMORY_SHAPE = dict(B=8, T=512, V=50257, D=64)


def _memory_shapes(shape, sharding=None):
    B, T, V, D = shape.values()
    S = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return S((B, T, D), jnp.float32), S((V, D), jnp.float32), S((B, T), jnp.int32), S((B, T), jnp.float32)


def _report_temps(backend, cases, shape, sharding=None):
    """{name: temp bytes} of each loss + grad compiled, printed as JSON lines."""
    B, T, V, D = shape.values()
    temps = {}
    for name, f in cases.items():
        temps[name] = _temp_bytes(f, *_memory_shapes(shape, sharding))[0]
        print(json.dumps({"what": "temp_bytes_loss_grad", "backend": backend, "name": name, **shape,
                          "temp_bytes": temps[name], "f32_logits_bytes": B * T * V * 4}))
    return temps


def test_chunked_temporaries_stay_below_float32_logits():
    B, T, V, D = MEMORY_SHAPE.values()
    temps = _report_temps("cpu", {"full_f32": _full(jnp.float32), "chunk64_f32": _chunked(jnp.float32, 64)},
                          MEMORY_SHAPE)
    assert temps["full_f32"] > B * T * V * 4
    assert temps["chunk64_f32"] < B * T * V * 4 / 2


@pytest.fixture
def no_persistent_cache():
    """TPU executables in the shared persistent cache cannot be read back on a CPU-only client: skip it."""
    old = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", old)


@pytest.mark.slow
def test_tpu_one_chunk_keeps_logits_in_bf16(no_persistent_cache):
    """Compiled by libtpu for one v5e chip (the CPU compiler upcasts bf16 dots, so it cannot show this): in
    one chunk the bf16 loss holds the logits in bf16 only, where the float32 full-logits loss needs them whole."""
    device = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
    mesh = jax.sharding.Mesh(np.array([device]), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    B, T, V, D = MEMORY_SHAPE.values()
    temps = _report_temps("tpu_v5e", {"full_f32": _full(jnp.float32), "one_chunk_bf16": _chunked(jnp.bfloat16, 0)},
                          MEMORY_SHAPE, NamedSharding(mesh, P()))
    assert temps["full_f32"] >= B * T * V * 4
    assert temps["one_chunk_bf16"] <= B * T * V * 2 * 1.01


COLLECTIVE = re.compile(r" (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")


def _collectives_in_loops(hlo: str) -> list[str]:
    """The collective ops inside the bodies of the while loops of compiled HLO text."""
    computations = {block.strip().split(" ")[0].lstrip("%"): block for block in hlo.split("\n\n") if block.strip()}
    bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    assert bodies and bodies <= set(computations)
    return [op for body in sorted(bodies) for op in COLLECTIVE.findall(computations[body])]


@pytest.mark.parametrize("use_mesh", [False, True])
def test_sharded_batch_stays_split_and_matches(use_mesh):
    """On a (data 2, fsdp 4) mesh with the embedding split on D: the same numbers; no device holds logits
    for more than its own rows of one chunk; with `mesh=` no collective runs inside the chunk loops."""
    mesh = sharding.make_mesh(data=2, fsdp=4)
    B, T, V, D, C = 16, 24, 211, 8, 8
    args = _inputs(B=B, T=T, D=D, V=V, seed=2)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    emb = NamedSharding(mesh, P(None, "fsdp"))
    placed = [jax.device_put(x, s) for x, s in zip(args, (rows, emb, rows, rows))]
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for x in placed]

    def compiled(f):
        loss = lambda h, e, l, m: f(h, e, l, m)[0]
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), out_shardings=(None, (rows, emb))).lower(
            *shapes).compile()

    def largest_with_vocab(c):
        dims = [[int(d) for d in s.split(",")] for s in re.findall(r"\w+\[([\d,]+)\]", c.as_text())]
        return max(int(np.prod(d)) for d in dims if V in d)

    def chunked_loss(*a):
        return lm_head_cross_entropy(*a, positions_per_chunk=C, dtype=jnp.float32, mesh=mesh if use_mesh else None)

    full, chunked = compiled(_full(jnp.float32)), compiled(chunked_loss)
    want, got = full(*placed), chunked(*placed)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))
    assert got[1][0].sharding.is_equivalent_to(rows, 3) and got[1][1].sharding.is_equivalent_to(emb, 2)
    rows_per_device = B // 8
    assert largest_with_vocab(chunked) <= rows_per_device * C * V
    assert largest_with_vocab(full) >= rows_per_device * T * V
    in_loops = _collectives_in_loops(chunked.as_text())
    # Without a mesh XLA reduces the embedding gradient in every backward step (the cost `mesh=` removes).
    assert (in_loops == []) if use_mesh else ("all-reduce" in in_loops or "reduce-scatter" in in_loops)


@pytest.mark.slow
def test_mesh_bf16_matches_one_device():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    args = _inputs(B=8, T=10, D=8, V=53, seed=3)
    want = _value_and_grads(_chunked(jnp.bfloat16, 4), *args)
    got = _value_and_grads(lambda *a: lm_head_cross_entropy(*a, positions_per_chunk=4, dtype=jnp.bfloat16, mesh=mesh),
                           *args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        assert g.dtype == w.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(w))))


def test_mesh_needs_a_batch_that_splits():
    mesh = sharding.make_mesh(data=2, fsdp=4)
    with pytest.raises(GPT2JaxError, match=r"model\.loss_chunk: a micro-batch of 3 sequences does not split over the "
                                           r"data-parallel size 8 \(mesh data=2 × fsdp=4\)"):
        lm_head_cross_entropy(*_inputs(), positions_per_chunk=4, dtype=jnp.float32, mesh=mesh)
