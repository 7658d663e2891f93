"""The model against transformers' PyTorch GPT2LMHeadModel (eager attention), on CPU in float32."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import TINY, torch_logits
from gpt2_jax.model.config import ModelConfig, preset
from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.gpt2 import GPT2LMHeadModel, resize_token_embeddings
from gpt2_jax.model.layout import abstract_model, param_shapes

TOL = 1e-5
RNG = np.random.default_rng(0)
IDS = RNG.integers(0, TINY["vocab_size"], size=(3, 40))

CASES = {
    "default": {},
    "n_inner": dict(n_inner=48),
    "gelu": dict(activation_function="gelu"),
    "relu": dict(activation_function="relu"),
    "quick_gelu": dict(activation_function="quick_gelu"),
    "inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder_and_upcast": dict(reorder_and_upcast_attn=True),
    "no_scale_attn_weights": dict(scale_attn_weights=False, attn_gain=8.0),
    "layer_norm_epsilon": dict(layer_norm_epsilon=1e-3),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(hf_dir, case, attention_path):
    path, ref = hf_dir(**CASES[case])
    model = load_pretrained(path)
    want = torch_logits(ref, IDS)
    got = np.asarray(model(IDS))
    assert got.shape == want.shape
    assert np.abs(want).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_left_padding_and_attention_mask(hf_dir, attention_path):
    path, ref = hf_dir()
    model = load_pretrained(path)
    lengths = [40, 31, 17]
    ids = IDS.copy()
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, 40 - n:] = 1
        ids[row, : 40 - n] = 0
    # transformers' default position ids (0..T-1 whatever the mask): compare unmasked positions.
    want, got = torch_logits(ref, ids, mask), np.asarray(model(ids, mask))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=TOL, rtol=0)
    # Position ids counted from each row's first real token, as `generate` does: each row then equals
    # the same row run alone without padding.
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    want, got = torch_logits(ref, ids, mask, pos), np.asarray(model(ids, mask, pos))
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], atol=TOL, rtol=0)
    for row, n in enumerate(lengths):
        alone = np.asarray(model(ids[row:row + 1, 40 - n:]))[0]
        np.testing.assert_allclose(got[row, 40 - n:], alone, atol=TOL, rtol=0)
    assert np.isfinite(got).all()  # fully masked (padding) query rows must not produce NaN


@pytest.mark.slow
def test_causality():
    """The output at position t depends on no input after t: zero gradient and no change under edits."""
    model = GPT2LMHeadModel(ModelConfig(**TINY, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    x = jnp.asarray(IDS[:1])
    t = 20
    emb = model.transformer.wte(x)

    def out_t(delta_BTD):
        # Perturb the embeddings directly to take a gradient with respect to every position.
        h = model.transformer
        pos = h.wpe(jnp.arange(x.shape[1])[None])
        y = emb + delta_BTD + pos
        for block in h.h:
            y, _ = block(y, None)
        return model.logits(h.ln_f(y))[0, t].sum()

    grad = jax.grad(out_t)(jnp.zeros_like(emb))
    assert np.abs(np.asarray(grad[0, : t + 1])).max() > 0
    assert np.abs(np.asarray(grad[0, t + 1:])).max() == 0.0
    edited = IDS[:1].copy()
    edited[0, t + 1:] = (edited[0, t + 1:] + 1) % TINY["vocab_size"]
    a, b = np.asarray(model(IDS[:1])), np.asarray(model(edited))
    np.testing.assert_array_equal(a[0, : t + 1], b[0, : t + 1])
    assert np.abs(a[0, t + 1:] - b[0, t + 1:]).max() > 0


@pytest.mark.parametrize("name", ["gpt2", *(pytest.param(n, marks=pytest.mark.slow)
                                            for n in ("gpt2-medium", "gpt2-large", "gpt2-xl"))])
def test_preset_parameter_counts_equal_transformers(name):
    cfg = preset(name)
    with torch.device("meta"):
        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                                                                   n_head=cfg.n_head))
    want = sum(p.numel() for p in ref.parameters())  # the tied head is counted once
    assert sum(math.prod(shape) for shape in param_shapes(cfg).values()) == want
    if name == "gpt2":
        assert want == 124_439_808


def test_dropout_only_in_training_mode():
    model = GPT2LMHeadModel(ModelConfig(**TINY))
    a, b = np.asarray(model(IDS[:1])), np.asarray(model(IDS[:1]))
    np.testing.assert_array_equal(a, b)
    model.train()
    c, d = np.asarray(model(IDS[:1])), np.asarray(model(IDS[:1]))
    assert np.abs(c - a).max() > 1e-3 and np.abs(c - d).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(IDS[:1])), a)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(hf_dir, dtype):
    path, ref = hf_dir()
    want = torch_logits(ref, IDS)
    model = load_pretrained(path, dtype=dtype)
    got = np.asarray(jax.jit(lambda x: model(x))(IDS))
    assert got.dtype == np.dtype(dtype)
    # bf16 keeps ~3 significant digits, fp16 ~4; compare relative to the logit scale.
    assert np.abs(got.astype(np.float32) - want).max() < 0.05 * np.abs(want).max()


def test_resize_keeps_old_logits(hf_dir):
    path, _ = hf_dir()
    model = load_pretrained(path)
    before = np.asarray(model(IDS))
    old_emb = np.asarray(model.transformer.wte.embedding[...])
    resize_token_embeddings(model, TINY["vocab_size"] + 4)
    after = np.asarray(model(IDS))
    assert after.shape[-1] == TINY["vocab_size"] + 4 and model.config.vocab_size == TINY["vocab_size"] + 4
    np.testing.assert_array_equal(after[..., : TINY["vocab_size"]], before)
    new_emb = np.asarray(model.transformer.wte.embedding[...])
    np.testing.assert_array_equal(new_emb[: TINY["vocab_size"]], old_emb)
    np.testing.assert_allclose(new_emb[TINY["vocab_size"]:], np.broadcast_to(old_emb.mean(0), (4, old_emb.shape[1])),
                               atol=1e-7)
    # New tokens are usable as inputs.
    assert np.isfinite(np.asarray(model(np.array([[TINY["vocab_size"] + 3, 5]])))).all()
    # A bad size is refused (by the model config) before anything changes.
    with pytest.raises(GPT2JaxError, match="vocab_size must be a positive integer, got 0"):
        resize_token_embeddings(model, 0)
    assert model.transformer.wte.embedding[...].shape[0] == model.config.vocab_size == TINY["vocab_size"] + 4


def test_every_parameter_has_logical_axis_names():
    from flax import nnx
    known = {"vocab", "embed", "heads", "mlp", None}
    for path, var in nnx.to_flat_state(nnx.state(abstract_model(ModelConfig(**TINY)), nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.shape) and set(axes) <= known, (path, axes)


def test_cached_decoding_equals_full_forward(hf_dir, attention_path):
    """Left-padded prompts prefilled into a KV cache, then one token per step: every step's logits equal a
    full forward pass over the sequence so far, ours and transformers' (what generate's loop relies on)."""
    from gpt2_jax.model.kv_cache import init_cache

    path, ref = hf_dir()
    model = load_pretrained(path)
    lengths, N = [9, 4, 13], 12
    P = max(lengths)
    mask = np.concatenate([(np.arange(P)[None] >= P - np.array(lengths)[:, None]).astype(np.int64),
                           np.ones((3, N), np.int64)], axis=1)
    ids = np.where(mask == 1, IDS[:, : P + N], 0)
    pos = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)  # as generate counts them
    h_BPD, cache = model.hidden_states(ids[:, :P], mask[:, :P], pos[:, :P], init_cache(model.config, 3, P + N))
    steps = [model.logits(h_BPD[:, -1])]
    for t in range(P, P + N):
        h_B1D, cache = model.hidden_states(ids[:, t:t + 1], None, pos[:, t:t + 1], cache)
        steps.append(model.logits(h_B1D[:, 0]))
    cached_BNV = np.stack([np.asarray(x) for x in steps], axis=1)  # the predictions after positions P-1 .. P+N-1
    assert int(cache.index) == P + N
    np.testing.assert_allclose(cached_BNV, np.asarray(model(ids, mask, pos))[:, P - 1:], atol=TOL, rtol=0)
    np.testing.assert_allclose(cached_BNV, torch_logits(ref, ids, mask, pos)[:, P - 1:], atol=TOL, rtol=0)
