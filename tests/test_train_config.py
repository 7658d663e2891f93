"""Training config (YAML, overrides, validation), freeze presets and the optimiser's masks and schedule."""
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.config import OptimSection, TrainConfig, load_train_config
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.freeze import trainable_paths
from gpt2_jax.optim import decay_mask, learning_rate, make_optimizer

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bundled_configs_load(path):
    cfg = load_train_config(str(path))
    assert isinstance(cfg, TrainConfig)
    assert {c.name for c in CONFIGS} >= {"demo.yaml", "gpt2-finetune.yaml", "gpt2-tpu-pod.yaml"}


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1.0e-3, grad_accum: 2}\ntrain: {steps: 7, batch_size: 8}\n")
    cfg = load_train_config(str(path), ["optim.lr=3e-4", "freeze.patterns=[ln_f, 'h/1/']", "model.init_from=null",
                                        "data.keyword_augment=false", "train.out_dir=runs/x"])
    assert cfg.optim.lr == 3e-4 and cfg.optim.grad_accum == 2 and cfg.train.steps == 7
    assert cfg.freeze.patterns == ("ln_f", "h/1/") and cfg.model.init_from is None
    assert cfg.data.keyword_augment is False and cfg.train.out_dir == "runs/x"
    # What to_dict writes reads back to the same config.
    cfg.save_yaml(str(tmp_path / "back.yaml"))
    assert load_train_config(str(tmp_path / "back.yaml")) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], 'unknown config key optim.lrr (did you mean "optim.lr"?)'),
    (["trian.steps=3"], 'unknown config key trian.steps (did you mean "train.steps"?)'),
    (["optim.lr=fast"], "config key optim.lr must be a number, got 'fast'"),
    (["train.steps=1.5"], "config key train.steps must be an integer, got 1.5"),
    (["data.keyword_augment=maybe"], "config key data.keyword_augment must be true or false"),
    (["freeze.trainable=haed"], 'freeze.trainable is \'haed\' (did you mean "head"?)'),
    (["data.loss_on=txt"], '(did you mean "text"?)'),
    (["train.batch_size=6", "optim.grad_accum=4"], "train.batch_size=6 is not divisible by optim.grad_accum=4"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "cannot both be -1"),
    (["steps=3"], "must look like section.key=value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(GPT2JaxError) as e:
        load_train_config(None, overrides)
    assert message in str(e.value)


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decy: 0.1\n")
    with pytest.raises(GPT2JaxError, match='unknown config key optim.weight_decy \\(did you mean "optim.weight_decay"'):
        load_train_config(str(path))
    path.write_text("optimizer:\n  lr: 0.1\n")
    with pytest.raises(GPT2JaxError, match="unknown config key optimizer"):
        load_train_config(str(path))
    with pytest.raises(GPT2JaxError, match="config file not found"):
        load_train_config(str(tmp_path / "missing.yaml"))
    path.write_text("optim: [1, 2\n")
    with pytest.raises(GPT2JaxError, match="not valid YAML"):
        load_train_config(str(path))


def test_model_config_from_sections():
    cfg = load_train_config(None, ["model.n_layer=2", "model.n_embd=64", "model.n_head=4", "model.dropout=0.0",
                                   "model.dtype=bfloat16"])
    mc = cfg.model_config(vocab_size=123)
    assert (mc.n_layer, mc.n_embd, mc.n_head, mc.vocab_size, mc.dtype, mc.param_dtype) == (2, 64, 4, 123, "bfloat16",
                                                                                          "float32")
    assert mc.resid_pdrop == mc.attn_pdrop == mc.embd_pdrop == 0.0
    with pytest.raises(GPT2JaxError, match="cannot change the shape"):
        cfg.model_config(123, base=mc)


PATHS = ["transformer/wte/embedding", "transformer/wpe/embedding", "transformer/ln_f/scale", "transformer/ln_f/bias"] + [
    f"transformer/h/{i}/{leaf}" for i in range(12) for leaf in ("ln_1/scale", "attn/c_attn/kernel", "mlp/c_fc/bias")]


def test_freeze_presets():
    assert trainable_paths(PATHS, "all", n_layer=12) == set(PATHS)
    assert trainable_paths(PATHS, "head", n_layer=12) == {"transformer/wte/embedding"}
    last6 = trainable_paths(PATHS, "last_n_blocks", n_layer=12, last_n_blocks=6)
    assert last6 == {p for p in PATHS if p.startswith("transformer/ln_f/")
                     or any(p.startswith(f"transformer/h/{i}/") for i in range(6, 12))}
    # h/1 must not catch h/10 and h/11.
    assert trainable_paths(PATHS, "last_n_blocks", n_layer=12, last_n_blocks=1) == {
        "transformer/ln_f/scale", "transformer/ln_f/bias", "transformer/h/11/ln_1/scale",
        "transformer/h/11/attn/c_attn/kernel", "transformer/h/11/mlp/c_fc/bias"}
    pat = trainable_paths(PATHS, "patterns", n_layer=12, patterns=[r"h/1/", r"ln_f/bias$"])
    assert pat == {"transformer/h/1/ln_1/scale", "transformer/h/1/attn/c_attn/kernel", "transformer/h/1/mlp/c_fc/bias",
                   "transformer/ln_f/bias"}


def test_freeze_errors():
    with pytest.raises(GPT2JaxError, match="between 1 and n_layer=12"):
        trainable_paths(PATHS, "last_n_blocks", n_layer=12, last_n_blocks=13)
    with pytest.raises(GPT2JaxError, match="'h/99/' matches no parameter"):
        trainable_paths(PATHS, "patterns", n_layer=12, patterns=["h/99/"])
    with pytest.raises(GPT2JaxError, match="not a regular expression"):
        trainable_paths(PATHS, "patterns", n_layer=12, patterns=["h/("])


def test_weight_decay_only_on_matrices():
    params = {"k": jnp.ones((3, 4)), "e": jnp.ones((5, 4)), "b": jnp.ones((4,)), "s": jnp.ones((4,))}
    assert decay_mask(params) == {"k": True, "e": True, "b": False, "s": False}
    opt = make_optimizer(OptimSection(lr=0.5, warmup_steps=0, schedule="constant", weight_decay=0.1, clip=0.0), 10)
    zero = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = opt.update(zero, opt.init(params), params)
    # AdamW with zero gradients: only the decay moves a parameter, by -lr * wd * p.
    np.testing.assert_allclose(updates["k"], -0.05 * np.ones((3, 4)), rtol=1e-6)
    np.testing.assert_allclose(updates["e"], -0.05 * np.ones((5, 4)), rtol=1e-6)
    assert not np.any(updates["b"]) and not np.any(updates["s"])


def test_schedule_warmup_then_cosine_to_min():
    sched = learning_rate(OptimSection(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), 110)
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 60, 110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    lin = learning_rate(OptimSection(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), 100)
    np.testing.assert_allclose([float(lin(s)) for s in (0, 50, 100)], [1.0, 0.5, 0.0], atol=1e-6)


@pytest.mark.parametrize("clip", [0.0, 1.0, 1e-3])
@pytest.mark.parametrize("grad_scale", [1.0, 1 / 37])
def test_fused_adamw_is_optax_chain(clip, grad_scale):
    """make_optimizer's fused AdamW gives optax's clip + adamw(mask) numbers over several steps, with the
    gradient's scale (the train step's 1 / tokens) passed separately."""
    import optax

    cfg = OptimSection(lr=1e-2, warmup_steps=2, schedule="cosine", weight_decay=0.1, clip=clip)
    ours = make_optimizer(cfg, 6)
    adamw = optax.adamw(learning_rate(cfg, 6), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    ref = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw
    rng = np.random.default_rng(0)
    params = {"k": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.asarray(rng.normal(size=4), jnp.float32)}
    p1, s1, p2, s2 = params, ours.init(params), params, ref.init(params)
    for _ in range(5):
        grads = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in params.items()}
        u1, s1 = ours.update(grads, s1, p1, grad_scale=grad_scale)
        u2, s2 = ref.update({k: g * grad_scale for k, g in grads.items()}, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        for k in params:
            np.testing.assert_allclose(p1[k], p2[k], rtol=1e-6, atol=1e-7, err_msg=k)
