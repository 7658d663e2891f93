"""gpt2_jax/model/attention.py: every impl against transformers' eager GPT-2 attention, packed segments, causality,
gradients through the Pallas kernel (interpreted on CPU), and the kernel compiled for a TPU slice."""
import math
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P
from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

from gpt2_jax.model import attention
from gpt2_jax.model.attention import IMPLS, attend, default_impl
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sharding import BATCH_AXES

# Compile-only libtpu needs no exclusive TPU: let parallel test workers load it at once (else the second
# fails on /tmp/libtpu_lockfile).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

B, T, H, K = 2, 128, 2, 64  # T: the Pallas kernels' smallest tile
SCALE = 1 / math.sqrt(K)
# Two examples and padding packed in row 0; row 1 is one example.
SEGMENTS = np.array([[1] * 50 + [2] * 60 + [0] * 18, [3] * T], np.int32)


def qkv(seed=0, t=T, s=None, b=B, gain=3.0):
    """Random q, k, v; `gain` makes attention far from uniform so that mask errors show."""
    r = np.random.default_rng(seed)
    s = t if s is None else s
    return (jnp.asarray(gain * r.standard_normal((b, t, H, K)), jnp.float32),
            jnp.asarray(r.standard_normal((b, s, H, K)), jnp.float32),
            jnp.asarray(r.standard_normal((b, s, H, K)), jnp.float32))


def hf_attention(q, k, v, layer_idx=0, by_layer=False, allowed_BTS=None):
    """transformers' GPT-2 eager attention; `allowed_BTS` becomes its additive 4-D mask."""
    S = k.shape[1]
    module = SimpleNamespace(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=by_layer,
                             layer_idx=layer_idx, is_cross_attention=False, attn_dropout=torch.nn.Identity(),
                             bias=torch.tril(torch.ones(S, S, dtype=torch.bool))[None, None])
    to_t = lambda a: torch.as_tensor(np.asarray(a)).transpose(1, 2)
    mask = None
    if allowed_BTS is not None:
        mask = torch.where(torch.as_tensor(np.asarray(allowed_BTS))[:, None], 0.0, torch.finfo(torch.float32).min)
    out, _ = eager_attention_forward(module, to_t(q), to_t(k), to_t(v), mask)
    return out.numpy()


def same_segment(seg_BT):
    return seg_BT[:, :, None] == seg_BT[:, None, :]


@pytest.fixture(params=IMPLS + ("query-blocks",))
def impl(request, monkeypatch):
    """Each impl; "query-blocks" is "materialised" in ragged blocks of 48 queries."""
    if request.param == "query-blocks":
        monkeypatch.setattr(attention, "QUERY_CHUNK", 48)
        return "materialised"
    return request.param


@pytest.mark.parametrize("packed", [False, True])
def test_matches_transformers_eager(impl, packed):
    q, k, v = qkv()
    seg = jnp.asarray(SEGMENTS) if packed else None
    scale = SCALE / 3  # scale_attn_by_inverse_layer_idx at layer 2
    out = attend(q, k, v, impl=impl, scale=scale, segment_ids_BT=seg)
    want = hf_attention(q, k, v, layer_idx=2, by_layer=True, allowed_BTS=same_segment(SEGMENTS) if packed else None)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)


def test_packed_examples_equal_each_example_alone(impl):
    q, k, v = qkv(1)
    out = np.asarray(attend(q, k, v, impl=impl, scale=SCALE, segment_ids_BT=jnp.asarray(SEGMENTS)))
    for lo, hi in ((0, 50), (50, 110)):
        alone = hf_attention(q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi])
        np.testing.assert_allclose(out[:1, lo:hi], alone, atol=2e-5, rtol=1e-4)
    # Without the segment ids the second example would see the first.
    plain = np.asarray(attend(q, k, v, impl=impl, scale=SCALE))
    assert np.abs(plain[0, 50:110] - out[0, 50:110]).max() > 1e-2


@pytest.mark.parametrize("packed", [False, True])
def test_causal_and_segment_isolation_of_gradients(impl, packed):
    """d out[t] / d (q, k, v)[s] is zero for s > t, and across segments."""
    q, k, v = qkv(2)
    seg = jnp.asarray(SEGMENTS) if packed else None
    t = 70  # inside the second example of row 0
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, impl=impl, scale=SCALE, segment_ids_BT=seg), q, k, v)
    cotangent = jnp.zeros_like(out).at[:, t].set(1.0)
    dq, dk, dv = (np.abs(np.asarray(g)) for g in vjp(cotangent))
    for g in (dq, dk, dv):
        assert g[:, t + 1:].max() == 0.0
        assert g[:, t].max() > 0.0
    first_example = (dk[0, :50].max(), dv[0, :50].max())
    if packed:
        assert first_example == (0.0, 0.0)
        assert dq[0, :t].max() == 0.0
    else:
        assert min(first_example) > 0.0


def test_gradients_match_materialised(impl):
    q, k, v = qkv(3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)
    seg = jnp.asarray(SEGMENTS)

    def grads(name):
        loss = lambda q, k, v: jnp.sum(attend(q, k, v, impl=name, scale=SCALE, segment_ids_BT=seg) * w)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for got, want in zip(grads(impl), grads("materialised")):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5, rtol=1e-4)


def test_cache_mask_matches_transformers(impl):
    """One decode step (T=1) against 16 cache slots, some of them left padding or not yet written."""
    q, k, v = qkv(5, t=1, s=16)
    valid_BS = np.ones((B, 16), bool)
    valid_BS[0, :3] = False  # left padding
    valid_BS[:, 12:] = False  # slots after this step
    mask_BTS = jnp.asarray(valid_BS[:, None, :])
    out = attend(q, k, v, impl=impl, scale=SCALE, mask_BTS=mask_BTS)
    want = hf_attention(q, k, v, allowed_BTS=valid_BS[:, None, :])
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)


def test_padding_mask_with_segments(impl):
    """A dense mask (T == S) and segment ids together: both apply."""
    q, k, v = qkv(6)
    allowed = np.tril(np.ones((T, T), bool))[None].repeat(B, 0)
    allowed[1, :, :5] = False
    allowed[1, :5, :5] = np.eye(5, dtype=bool)  # padded positions see themselves: no empty rows
    out = attend(q, k, v, impl=impl, scale=SCALE, mask_BTS=jnp.asarray(allowed), segment_ids_BT=jnp.asarray(SEGMENTS))
    want = hf_attention(q, k, v, allowed_BTS=allowed & same_segment(SEGMENTS))
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)


def test_float16_and_bfloat16_keep_their_dtype(impl):
    q, k, v = qkv(7)
    want = hf_attention(q, k, v)
    for dtype, tol in ((jnp.float16, 1e-2), (jnp.bfloat16, 6e-2)):
        out = attend(*(a.astype(dtype) for a in (q, k, v)), impl=impl, scale=SCALE)
        assert out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, atol=tol)


def test_dropout_applies_to_probabilities():
    q, k, v = qkv(8)
    plain = attend(q, k, v, impl="materialised", scale=SCALE)
    doubled = attend(q, k, v, impl="materialised", scale=SCALE, dropout=lambda p_BHTS: 2.0 * p_BHTS)
    np.testing.assert_allclose(np.asarray(doubled), 2.0 * np.asarray(plain), rtol=1e-5, atol=1e-6)
    with pytest.raises(GPT2JaxError, match='needs impl "materialised"'):
        attend(q, k, v, impl="xla", scale=SCALE, dropout=lambda p: p)


def test_default_impl_and_bad_input():
    assert default_impl("cpu", dropout=False) == "materialised"
    assert default_impl("gpu", dropout=False) == "xla"
    assert default_impl("tpu", dropout=False) == "splash"
    assert {default_impl(p, dropout=True) for p in ("cpu", "gpu", "tpu")} == {"materialised"}
    q, k, v = qkv(9, t=4, s=8)
    with pytest.raises(GPT2JaxError, match='"splsh" is not one of .*did you mean "splash"'):
        attend(q, k, v, impl="splsh", scale=SCALE, mask_BTS=jnp.ones((B, 4, 8), bool))
    with pytest.raises(GPT2JaxError, match="4 queries against 8 keys need a mask_BTS"):
        attend(q, k, v, impl="xla", scale=SCALE)
    with pytest.raises(GPT2JaxError, match="need T == S"):
        attend(q, k, v, impl="xla", scale=SCALE, mask_BTS=jnp.ones((B, 4, 8), bool),
               segment_ids_BT=jnp.ones((B, 4), jnp.int32))
    with pytest.raises(GPT2JaxError, match="multiple of 128, got 200"):
        attention.pallas_block(200)
    assert [attention.pallas_block(t) for t in (128, 256, 384, 1024, 2048)] == [128, 256, 128, 512, 512]


def test_splash_on_a_cpu_mesh_splits_the_batch():
    """With a mesh the kernel runs per device under shard_map; a batch that does not split is refused."""
    mesh = jax.make_mesh((2, 1), BATCH_AXES, devices=jax.devices()[:2])
    q, k, v = qkv(10)
    seg = jnp.asarray(SEGMENTS)
    run = jax.jit(lambda q, k, v, s: attend(q, k, v, impl="splash", scale=SCALE, segment_ids_BT=s, mesh=mesh))
    sharded = run(*(jax.device_put(a, NamedSharding(mesh, P(BATCH_AXES))) for a in (q, k, v, seg)))
    np.testing.assert_allclose(np.asarray(sharded), hf_attention(q, k, v, allowed_BTS=same_segment(SEGMENTS)),
                               atol=2e-5, rtol=1e-4)
    with pytest.raises(GPT2JaxError, match="a batch of 1 does not split over the mesh's 2 batch shards"):
        attend(q[:1], k[:1], v[:1], impl="splash", scale=SCALE, mesh=mesh)


def test_splash_kernel_cache_survives_jit_traces():
    """The cached kernel first made inside one jit's trace is reused by the next jit (no leaked tracer)."""
    attention._splash_kernel.cache_clear()
    q, k, v = qkv(11, b=1)
    once = jax.jit(lambda q: attend(q, k, v, impl="splash", scale=SCALE))(q)
    twice = jax.jit(lambda q: 2 * attend(q, k, v, impl="splash", scale=SCALE))(q)
    np.testing.assert_allclose(np.asarray(twice), 2 * np.asarray(once), rtol=1e-6)


def test_tpu_default_compiles_for_a_v5e_slice_with_segment_ids():
    """Forward + backward of the TPU default with packed rows, compiled by libtpu for 4 v5e chips under
    shard_map: the Mosaic kernel itself is lowered and compiled, not interpreted."""
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    mesh = jax.make_mesh((4, 1), BATCH_AXES, devices=devices)
    impl = default_impl("tpu", dropout=False)
    assert impl in attention.PALLAS_IMPLS
    batch = NamedSharding(mesh, P(BATCH_AXES))
    x = jax.ShapeDtypeStruct((4, 256, H, K), jnp.bfloat16, sharding=batch)
    seg = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=batch)

    def loss(q, k, v, seg):
        return jnp.sum(attend(q, k, v, impl=impl, scale=SCALE, segment_ids_BT=seg, mesh=mesh).astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile()
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 3  # forward, dq and dkv kernels
    assert compiled.output_shardings[1][0].spec[0] == BATCH_AXES  # dq stays split over the batch
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    # Without a mesh (one chip), platform="tpu" is what makes a CPU host compile the kernel, not interpret it.
    one = jax.sharding.SingleDeviceSharding(devices[0])
    x1 = jax.ShapeDtypeStruct((1, 256, H, K), jnp.bfloat16, sharding=one)
    run = lambda q, k, v: attend(q, k, v, impl=impl, scale=SCALE, platform="tpu")
    assert 'custom_call_target="tpu_custom_call"' in jax.jit(run).lower(x1, x1, x1).compile().as_text()
