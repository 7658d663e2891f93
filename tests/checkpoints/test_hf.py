"""Hugging Face checkpoints in (three formats, sharded, prefix-less) and out (checked by transformers)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from conftest import TINY, make_hf_model, torch_logits
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.checkpoints.hf import save_pretrained
from gpt2_jax.checkpoints.pretrained import load_pretrained

TOL = 1e-5
IDS = np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(2, 24))


def _flax_dir(pt_dir, out):
    """Hugging Face's own Flax conversion and save: a flax_model.msgpack written by transformers."""
    fx = transformers.FlaxGPT2LMHeadModel.from_pretrained(pt_dir, from_pt=True)
    fx.save_pretrained(out)
    assert os.listdir(out) and "flax_model.msgpack" in os.listdir(out)
    return fx


def _params(model):
    from flax import nnx
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.slow
def test_three_formats_give_the_same_model(hf_dir, tmp_path):
    st_dir, ref = hf_dir("st")
    bin_dir = tmp_path / "bin"
    ref.save_pretrained(bin_dir, safe_serialization=False)
    assert os.path.isfile(bin_dir / "pytorch_model.bin")
    fx_dir = tmp_path / "flax"
    _flax_dir(st_dir, fx_dir)
    models = {name: load_pretrained(str(d)) for name, d in
              (("safetensors", st_dir), ("bin", bin_dir), ("msgpack", fx_dir))}
    base = _params(models["safetensors"])
    for name, m in models.items():
        for path, value in _params(m).items():
            np.testing.assert_array_equal(value, base[path], err_msg=f"{name} {path}")
    np.testing.assert_allclose(np.asarray(models["bin"](IDS)), torch_logits(ref, IDS), atol=TOL, rtol=0)


@pytest.mark.parametrize("safe", [True, False])
def test_sharded_checkpoints(tmp_path, safe):
    ref = make_hf_model()
    ref.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size="20KB")
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    assert os.path.isfile(tmp_path / index)
    np.testing.assert_allclose(np.asarray(load_pretrained(str(tmp_path))(IDS)), torch_logits(ref, IDS),
                               atol=TOL, rtol=0)


def test_base_model_checkpoint_without_transformer_prefix(tmp_path):
    ref = make_hf_model()
    ref.transformer.save_pretrained(tmp_path)  # a GPT2Model: keys `h.0...`, `wte.weight`, no head
    np.testing.assert_allclose(np.asarray(load_pretrained(str(tmp_path))(IDS)), torch_logits(ref, IDS),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("overrides", [{}, dict(activation_function="gelu", n_inner=40)])
def test_export_loads_in_transformers_with_same_logits(hf_dir, tmp_path, overrides):
    src, ref = hf_dir(**overrides)
    model = load_pretrained(src)
    out = save_pretrained(model, str(tmp_path / "export"))
    assert {"model.safetensors", "flax_model.msgpack", "config.json", "generation_config.json"} <= set(os.listdir(out))
    ours = np.asarray(model(IDS))
    want = torch_logits(ref, IDS)
    pt = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(torch_logits(pt, IDS), want, atol=TOL, rtol=0)
    fx = transformers.FlaxGPT2LMHeadModel.from_pretrained(out)
    np.testing.assert_allclose(np.asarray(fx(IDS).logits), ours, atol=TOL, rtol=0)
    # and back again
    np.testing.assert_allclose(np.asarray(load_pretrained(out)(IDS)), ours, atol=TOL, rtol=0)


def test_export_keeps_numerics_options_for_pytorch(hf_dir, tmp_path):
    # FlaxGPT2LMHeadModel ignores these two options; PyTorch honours them, so check them there.
    src, ref = hf_dir(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
    out = save_pretrained(load_pretrained(src), str(tmp_path / "export"))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["scale_attn_by_inverse_layer_idx"] is True and cfg["reorder_and_upcast_attn"] is True
    pt = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    np.testing.assert_allclose(torch_logits(pt, IDS), torch_logits(ref, IDS), atol=TOL, rtol=0)


def test_export_bfloat16_round_trip(hf_dir, tmp_path):
    src, _ = hf_dir()
    model = load_pretrained(src, dtype="bfloat16")
    out = save_pretrained(model, str(tmp_path / "bf16"))
    again = load_pretrained(out, dtype="bfloat16")
    for path, value in _params(again).items():
        np.testing.assert_array_equal(value, _params(model)[path])
    # config.json records the dtype, so transformers' torch_dtype="auto" keeps bfloat16.
    pt = transformers.GPT2LMHeadModel.from_pretrained(out, torch_dtype="auto")
    assert pt.transformer.wte.weight.dtype == torch.bfloat16


def test_export_writes_special_token_ids(hf_dir, tmp_path):
    src, _ = hf_dir()

    class Tok:  # the attributes export reads from a tokenizer
        bos_id, sep_id, eos_id, pad_id = 93, 94, 95, 96

        def save(self, d):
            open(os.path.join(d, "tok.txt"), "w").write("x")

    out = save_pretrained(load_pretrained(src), str(tmp_path / "e"), tokenizer=Tok())
    cfg = json.load(open(os.path.join(out, "config.json")))
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (93, 95, 96)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (93, 95, 96)
    assert os.path.isfile(os.path.join(out, "tok.txt"))
    assert transformers.GenerationConfig.from_pretrained(out).pad_token_id == 96


def test_failed_export_leaves_nothing(hf_dir, tmp_path):
    src, _ = hf_dir()

    class Broken:
        bos_id = sep_id = eos_id = pad_id = 1

        def save(self, d):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_pretrained(load_pretrained(src), str(tmp_path / "e"), tokenizer=Broken())
    assert os.listdir(tmp_path) == ["hf"]  # neither the target nor a temporary directory


# --- bad input: one clear line, no traceback from inside JAX ----------------------------------------

def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_missing_directory(tmp_path):
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(str(tmp_path / "nope"))
    assert "does not exist" in _one_line(e) and "nope" in _one_line(e)


def test_config_of_another_model_type(hf_dir):
    src, _ = hf_dir()
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["model_type"] = "bert"
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(src)
    assert "'bert'" in _one_line(e) and "gpt2" in _one_line(e)


def test_weight_shapes_disagree_with_config(hf_dir):
    src, _ = hf_dir()
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["vocab_size"] = 120
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(src)
    assert "transformer.wte.weight has shape (97, 32)" in _one_line(e) and "(120, 32)" in _one_line(e)


def test_fewer_layers_in_weights_than_config(hf_dir):
    src, _ = hf_dir()
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["n_layer"] = 4
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(src)
    assert "missing" in _one_line(e) and "h.3" in _one_line(e)


def test_directory_without_weights(hf_dir):
    src, _ = hf_dir()
    os.remove(os.path.join(src, "model.safetensors"))
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(src)
    assert "no weights" in _one_line(e) and "model.safetensors" in _one_line(e)


def test_directory_without_config(tmp_path):
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(str(tmp_path))
    assert "no config.json" in _one_line(e)


def test_corrupt_weights(hf_dir):
    src, _ = hf_dir()
    with open(os.path.join(src, "model.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(src)
    assert "cannot read" in _one_line(e)


def test_pickle_with_code_is_refused(tmp_path, hf_dir):
    src, ref = hf_dir()
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(str(tmp_path))
    assert "safely" in _one_line(e)


def test_pytorch_bin_without_torch(hf_dir, tmp_path, monkeypatch):
    ref = make_hf_model()
    ref.save_pretrained(tmp_path, safe_serialization=False)
    import builtins
    real_import = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(str(tmp_path))
    assert "needs PyTorch" in _one_line(e)
