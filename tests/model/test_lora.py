"""LoRA adapters in the model: exactly the base at step 0, the formula x @ W + b + scale * (x @ A) @ B
against merged weights and against torch (PEFT's GPT-2 layers), PEFT's initialisation, and no change at
rank 0."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gpt2_jax.checkpoints.hf import load_hf_config, params_from_state_dict, read_hf_state_dict
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2LMHeadModel
from gpt2_jax.model.layout import ModelLayout, model_from_params, param_shapes
from gpt2_jax.model.lora import LoraConfig, LoraLinear, adapter_shapes, is_adapter, merged

LORA = LoraConfig(rank=4, alpha=8.0)
IDS = np.array([[5, 17, 3, 60, 2, 9, 41, 88, 1, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])


def hf_params(hf_dir, **overrides):
    path, tmodel = hf_dir(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides)
    mc = load_hf_config(path)
    fmt, sd = read_hf_state_dict(path)
    return mc, {k: np.asarray(v) for k, v in params_from_state_dict(mc, sd, fmt).items()}, tmodel


def flat_params(model) -> dict:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def with_adapters(mc, params, lora, seed=0, b_scale=0.0):
    """The base `params` plus `lora`'s adapters: A as initialised, B zero or random (b_scale > 0)."""
    fresh = flat_params(GPT2LMHeadModel(mc, seed=seed, lora=lora))
    rng = np.random.default_rng(seed)
    adapters = {k: (rng.normal(0, b_scale, v.shape).astype(np.float32) if k.endswith("/lora_b") and b_scale
                    else v) for k, v in fresh.items() if is_adapter(k)}
    return {**params, **adapters}, adapters


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_untrained_adapters_give_the_base_logits_exactly(hf_dir, dtype):
    mc, params, _ = hf_params(hf_dir)
    mc = mc.replace(dtype=dtype)
    full, adapters = with_adapters(mc, params, LORA)
    assert set(adapters) == set(adapter_shapes(mc, LORA))
    base = np.asarray(model_from_params(mc, params)(IDS).astype(jnp.float32))
    adapted = np.asarray(model_from_params(mc, full, lora=LORA)(IDS).astype(jnp.float32))
    assert np.array_equal(base, adapted)


def test_trained_adapters_equal_the_merged_weights(hf_dir):
    mc, params, _ = hf_params(hf_dir)
    lora = LoraConfig(rank=3, alpha=5.0, targets=("c_attn", "c_fc"), use_rslora=True)
    full, adapters = with_adapters(mc, params, lora, b_scale=0.3)
    adapted = np.asarray(model_from_params(mc, full, lora=lora)(IDS))
    base = np.asarray(model_from_params(mc, params)(IDS))
    want = np.asarray(model_from_params(mc, merged(params, adapters, lora))(IDS))
    assert np.abs(adapted - base).max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(adapted, want, atol=2e-4 * np.abs(want).max())


def test_logits_and_adapter_gradients_equal_torch_peft(hf_dir):
    """Our adapted model against PEFT's LoRA layers on transformers' GPT-2 (fan_in_fan_out: Conv1D's
    [in, out] weights), the same A and B: the logits, and the gradients of A and B by torch autograd."""
    import peft

    mc, params, tmodel = hf_params(hf_dir)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("c_attn", "c_proj", "c_fc"))
    full, adapters = with_adapters(mc, params, lora, b_scale=0.2)
    pmodel = peft.get_peft_model(tmodel, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.targets),
                                                         fan_in_fan_out=True, lora_dropout=0.0))
    named = dict(pmodel.named_parameters())

    def torch_name(key, which):  # transformer/h/0/attn/c_attn/lora_a -> PEFT's lora_A.default.weight
        module = key.rsplit("/", 1)[0].replace("/", ".")
        return f"base_model.model.{module}.lora_{which}.default.weight"

    with torch.no_grad():
        for k, v in adapters.items():
            named[torch_name(k, k[-1].upper())].copy_(torch.as_tensor(np.array(v.T)))
    ids, labels = torch.as_tensor(IDS), torch.as_tensor(IDS)
    out = pmodel(ids, labels=labels)
    out.loss.backward()

    layout = ModelLayout.of(mc, lora=lora)
    base = {k: jnp.asarray(v) for k, v in full.items() if not is_adapter(k)}
    rng = flat_rng(mc, lora)

    def loss(ad):
        model = layout.model({**base, **ad}, rng, train=False)
        logits = model(IDS).astype(jnp.float32)[:, :-1]
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.mean(jnp.take_along_axis(lp, IDS[:, 1:, None], -1)), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)({k: jnp.asarray(v) for k, v in adapters.items()})
    want_logits = out.logits.detach().numpy()[:, :-1]
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4 * np.abs(want_logits).max())
    np.testing.assert_allclose(float(value), out.loss.item(), rtol=1e-5)
    for k, g in grads.items():
        want = named[torch_name(k, k[-1].upper())].grad.numpy().T
        assert np.abs(want).max() > 0, k
        np.testing.assert_allclose(np.asarray(g), want, atol=1e-4 * np.abs(want).max(), rtol=0, err_msg=k)


def flat_rng(mc, lora):
    from gpt2_jax.model.layout import rng_arrays
    return rng_arrays(nnx.split(GPT2LMHeadModel(mc, lora=lora), nnx.Param, ...)[2])


def test_a_is_initialised_as_peft_does():
    """PEFT: kaiming_uniform_(lora_A.weight, a=sqrt(5)) over [R, I], i.e. U(-1/sqrt(I), 1/sqrt(I)); B zero."""
    mc = ModelConfig(vocab_size=64, n_positions=16, n_embd=64, n_layer=1, n_head=4)
    p = flat_params(GPT2LMHeadModel(mc, lora=LoraConfig(rank=64)))
    a, b = p["transformer/h/0/mlp/c_proj/lora_a"], p["transformer/h/0/mlp/c_proj/lora_b"]
    fan_in = 4 * 64
    torch_a = torch.empty(64, fan_in)
    torch.nn.init.kaiming_uniform_(torch_a, a=np.sqrt(5))
    bound = 1 / np.sqrt(fan_in)
    assert a.dtype == np.float32 and a.shape == (fan_in, 64)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    assert np.abs(torch_a.numpy()).max() <= bound
    np.testing.assert_allclose(a.std(), torch_a.numpy().std(), rtol=0.03)
    assert not b.any() and b.shape == (64, 64)


def test_base_parameters_and_dropout_keys_do_not_depend_on_the_adapters():
    mc = ModelConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    plain, adapted = GPT2LMHeadModel(mc, seed=7), GPT2LMHeadModel(mc, seed=7, lora=LORA)
    a, b = flat_params(plain), flat_params(adapted)
    assert set(b) - set(a) == set(adapter_shapes(mc, LORA))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_rank_0_is_todays_model():
    mc = ModelConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    assert param_shapes(mc, LoraConfig()) == param_shapes(mc)
    model = GPT2LMHeadModel(mc, lora=LoraConfig(rank=0))
    assert not any(isinstance(m, LoraLinear) for _, m in nnx.iter_graph(model))
    assert nnx.graphdef(model) == nnx.graphdef(GPT2LMHeadModel(mc))


def test_adapter_dropout_applies_to_the_adapters_input_only():
    mc = ModelConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    lora = LoraConfig(rank=4, dropout=0.5)
    model = GPT2LMHeadModel(mc, lora=lora)
    ids = IDS % 64
    base = np.asarray(model(ids))
    model.train()
    assert np.array_equal(np.asarray(model(ids)), base)  # B = 0: nothing to drop
    layer = model.transformer.h[0].attn.c_attn
    layer.lora_b[...] = jnp.ones_like(layer.lora_b[...])
    model.eval()
    eval_out = np.asarray(model(ids))
    model.train()
    assert not np.allclose(np.asarray(model(ids)), eval_out)


def test_bad_lora_configs_are_one_line():
    with pytest.raises(GPT2JaxError, match="lora.targets: unknown module 'q_proj'"):
        LoraConfig(rank=4, targets=("q_proj",))
    with pytest.raises(GPT2JaxError, match="lora.rank"):
        LoraConfig(rank=-1)
