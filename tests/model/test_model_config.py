"""ModelConfig: Hugging Face field names, config.json in and out, validation."""
import json

import pytest
import transformers

from gpt2_jax.model.config import ModelConfig, preset
from gpt2_jax.errors import GPT2JaxError


def test_config_json_round_trip_through_transformers(tmp_path):
    cfg = ModelConfig(vocab_size=123, n_positions=64, n_embd=48, n_layer=3, n_head=6, n_inner=100,
                      activation_function="relu", scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True,
                      scale_attn_weights=False, layer_norm_epsilon=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg.save_json(str(tmp_path / "config.json"))
    hf = transformers.GPT2Config.from_pretrained(tmp_path)
    for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                  "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "scale_attn_weights",
                  "layer_norm_epsilon", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(hf, field) == getattr(cfg, field), field
    assert ModelConfig.from_json(str(tmp_path / "config.json")) == cfg


def test_transformers_config_reads_back(tmp_path):
    hf = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=None, resid_pdrop=0.0)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(str(tmp_path / "config.json"))
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.inner_dim, cfg.resid_pdrop) == (64, 2, 4, 256, 0.0)


def test_presets_match_released_sizes():
    assert (preset("gpt2-xl").n_embd, preset("gpt2-xl").n_layer, preset("gpt2-xl").n_head) == (1600, 48, 25)
    assert preset("gpt2", vocab_size=100).vocab_size == 100


def test_validation_names_the_problem(tmp_path):
    with pytest.raises(GPT2JaxError, match="n_embd=30 is not divisible by n_head=4"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(GPT2JaxError, match='did you mean "gelu_new"'):
        ModelConfig(activation_function="gelu_nwe")
    with pytest.raises(GPT2JaxError, match='did you mean "gpt2-medium"'):
        preset("gpt2-meduim")
    with pytest.raises(GPT2JaxError, match="unknown ModelConfig field .n_layers."):
        ModelConfig().replace(n_layers=3)
    with pytest.raises(GPT2JaxError, match="config file not found"):
        ModelConfig.from_json(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GPT2JaxError, match="not valid JSON"):
        ModelConfig.from_json(str(tmp_path / "bad.json"))
    (tmp_path / "llama.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(GPT2JaxError, match="model_type is 'llama', not 'gpt2'"):
        ModelConfig.from_json(str(tmp_path / "llama.json"))


@pytest.mark.parametrize("field, value, shown", [("n_head", 0, "0"), ("n_embd", "256", "'256'"),
                                                 ("vocab_size", None, "None"), ("n_layer", 2.0, "2.0"),
                                                 ("n_inner", -1, "-1"), ("n_positions", True, "True")])
def test_config_json_with_a_bad_size_names_file_and_field(tmp_path, field, value, shown):
    """Checked before n_embd % n_head: no ZeroDivisionError or TypeError traceback."""
    d = ModelConfig(n_embd=64, n_layer=2, n_head=4).to_hf_dict()
    d[field] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(GPT2JaxError) as e:
        ModelConfig.from_json(str(path))
    assert str(e.value) == f"{path}: {field} must be a positive integer, got {shown}"


def test_config_bad_types_of_other_fields():
    with pytest.raises(GPT2JaxError, match=r"^resid_pdrop must be a number, got '0.1'$"):
        ModelConfig(resid_pdrop="0.1")
    with pytest.raises(GPT2JaxError, match=r"^scale_attn_weights must be true or false, got 'false'$"):
        ModelConfig(scale_attn_weights="false")
    assert ModelConfig(n_inner=None).inner_dim == 4 * 768
