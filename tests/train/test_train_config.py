"""Training config: YAML, dotted overrides, type checks, validation and the lists of allowed values."""
from pathlib import Path

import pytest

from gpt2_jax.train import config as train_config
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.train.config import TrainConfig, load_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


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


# Each list of allowed values, the key validation checks against it, and overrides that make the rest valid.
CHOICES = [(train_config.FORMATS, "data.format", []), (train_config.LOSS_ON, "data.loss_on", []),
           (train_config.TRAINABLE, "freeze.trainable", ["freeze.patterns=[ln_f]"]),
           (train_config.SCHEDULES, "optim.schedule", [])]


@pytest.mark.parametrize("known, key, extra", CHOICES, ids=[c[1] for c in CHOICES])
def test_validation_uses_the_allowed_values(known, key, extra):
    """Every value of the list is accepted, one outside it is refused by name with the list spelled out."""
    section, name = key.split(".")
    for value in known:
        assert getattr(getattr(load_train_config(None, [f"{key}={value}", *extra]), section), name) == value
    with pytest.raises(GPT2JaxError) as e:
        load_train_config(None, [f"{key}=nope", *extra])
    assert str(e.value) == f"config key {key} is 'nope'; known: {', '.join(known)}"


def test_allowed_values_today():
    """The values users write in YAML today; a change here is a change of the config contract."""
    assert train_config.FORMATS == ("csv", "jsonl", "text", "bin")
    assert train_config.LOSS_ON == ("all", "text")
    assert train_config.TRAINABLE == ("all", "head", "last_n_blocks", "patterns")
    assert train_config.SCHEDULES == ("cosine", "linear", "constant")
    assert {"none", "block", "dots_saveable", "dots_with_no_batch_dims_saveable"} <= set(train_config.REMAT)


def test_remat_accepts_every_checkpoint_policy_name():
    """model.remat takes any jax.checkpoint_policies policy by name, as documented (it took two); names in that
    namespace that build a policy from arguments are refused at load, with the list."""
    import jax

    for name in ("nothing_saveable", "everything_saveable", "checkpoint_dots", "dots_saveable"):
        assert load_train_config(None, [f"model.remat={name}"]).model.remat == name
        assert callable(getattr(jax.checkpoint_policies, name))
    for name in ("save_only_these_names", "save_from_both_policies", "nope"):
        with pytest.raises(GPT2JaxError, match=f"config key model.remat is '{name}'.*known: none, block, "):
            load_train_config(None, [f"model.remat={name}"])


@pytest.mark.parametrize("override, message", [
    ("sample.top_p=0", "config key sample.top_p must be in (0, 1] (1 turns it off), got 0.0"),
    ("sample.top_p=1.5", "config key sample.top_p must be in (0, 1] (1 turns it off), got 1.5"),
    ("sample.temperature=0", "config key sample.temperature must be positive, got 0.0"),
    ("sample.top_k=-1", "config key sample.top_k must not be negative (0 turns it off), got -1"),
    ("sample.repetition_penalty=0", "config key sample.repetition_penalty must be positive, got 0.0"),
    ("sample.max_new_tokens=0", "config key sample.max_new_tokens must be at least 1, got 0"),
    ("sample.num=-1", "config key sample.num must not be negative"),
])
def test_sample_settings_checked_at_load(override, message):
    """Checked when the config loads, not when the samples are written after training."""
    with pytest.raises(GPT2JaxError) as e:
        load_train_config(None, [override])
    assert str(e.value) == message


def test_sample_settings_edges_accepted():
    cfg = load_train_config(None, ["sample.top_p=1", "sample.top_k=0", "sample.num=0", "sample.max_new_tokens=1"])
    assert (cfg.sample.top_p, cfg.sample.top_k, cfg.sample.num, cfg.sample.max_new_tokens) == (1.0, 0, 0, 1)


@pytest.mark.parametrize("yaml_text, shown", [("model: 3\n", "3"), ("model: []\n", "[]"), ("model: 0\n", "0"),
                                              ("[1, 2]\n", None)])
def test_section_that_is_not_a_mapping_names_it(tmp_path, yaml_text, shown):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(GPT2JaxError) as e:
        load_train_config(str(path))
    if shown is None:
        assert str(e.value) == f"{path} must hold a mapping of sections (model, data, train, ...)"
    else:  # "model", not "model."; and an empty list or 0 is no longer read as the defaults
        assert str(e.value) == f"config section model must be a mapping, got {shown}"
    path.write_text("model:\n")
    assert load_train_config(str(path)).model == TrainConfig().model


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 10\nfreeze:\n  patterns: [ln_f, h/0\nmodel:\n  n_layer: 2\n")
    with pytest.raises(GPT2JaxError, match=rf"^{path}:5:\d+: not valid YAML \(while parsing a flow sequence "
                                           r"expected ',' or '\]', but got"):
        load_train_config(str(path))
