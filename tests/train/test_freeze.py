"""Freeze presets: which parameter paths train, and the errors that name the bad setting."""
import pytest

from gpt2_jax.train import freeze

from gpt2_jax.train import config as train_config
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.train.freeze import trainable_paths

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


def test_presets_are_train_configs_list():
    """Every name in TRAINABLE is a preset, any other is refused."""
    for name in train_config.TRAINABLE:
        assert trainable_paths(PATHS, name, n_layer=12, last_n_blocks=2, patterns=["ln_f"])
    with pytest.raises(GPT2JaxError) as e:
        trainable_paths(PATHS, "nope", n_layer=12)
    assert str(e.value) == "unknown freeze.trainable 'nope'; known: all, head, last_n_blocks, patterns"
