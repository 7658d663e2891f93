"""LoRA runs and PEFT: a run's adapter exported alone (tools/export_hf.py --adapter-only, and at the end of
the run) loads in PeftModel with the run's logits, and its merged export is merge_and_unload()'s; a PEFT
adapter for lora.init_from that does not fit the lora section is one line."""
import importlib.util
import json
import sys
import warnings

import numpy as np
import peft
import pytest
import torch
import transformers

from gpt2_jax.checkpoints.pretrained import load_run
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.runtime import run_cli
from gpt2_jax.train.config import load_train_config
from gpt2_jax.train.loop import train

from test_loop import ROOT, gpt2_like_dir, overrides, shared_tokenizer  # noqa: F401 (fixtures)

LORA = dict(lora__rank=4, lora__alpha=8, lora__targets="[c_attn, c_proj, c_fc]")
IDS = np.array([[5, 17, 3, 60, 2, 9, 41, 300, 7]])


def hf_overrides(tmp, base, **extra) -> list[str]:
    return overrides(tmp, model__init_from=str(base), model__n_layer="null", model__n_embd="null",
                     model__n_head="null", model__n_positions="null", tokenizer__path="null", **{**LORA, **extra})


def peft_logits(base_dir, adapter_dir) -> np.ndarray:
    """PeftModel's logits, failing on any warning about the adapter's keys."""
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir, attn_implementation="eager").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    bad = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in ("adapter", "missing"))]
    assert not bad, bad
    with torch.no_grad():
        return pm(torch.as_tensor(IDS)).logits.numpy()


def export_cli(args, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "tools" / "export_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, "argv", ["export_hf.py", *map(str, args)])
    capsys.readouterr()  # the training run's output
    try:
        run_cli(tool.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, *capsys.readouterr()


@pytest.mark.slow
def test_adapter_only_export_loads_in_peft_with_the_runs_logits(tmp_path, gpt2_like_dir, monkeypatch, capsys):
    path, _ = gpt2_like_dir
    train(load_train_config(None, hf_overrides(tmp_path, path, train__steps=4, checkpoint__every=0)))
    run_dir = tmp_path / "run"
    code, out, err = export_cli(["--checkpoint", run_dir, "--adapter-only", "--out", tmp_path / "adapter"],
                                monkeypatch, capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (4, 8, str(path.resolve()))
    # The run grew the vocabulary by its 4 special tokens; the base's own tokens give the same logits.
    ours = np.asarray(load_run(str(run_dir))(IDS))
    theirs = peft_logits(path, tmp_path / "adapter")
    np.testing.assert_allclose(theirs, ours[..., :theirs.shape[-1]], atol=1e-4, rtol=0)
    with torch.no_grad():
        plain = transformers.GPT2LMHeadModel.from_pretrained(path).eval()(torch.as_tensor(IDS)).logits.numpy()
    assert np.abs(plain - theirs).max() > 1e-3  # four steps moved the adapters: it is not the base
    # The end of the run wrote the same adapter.
    end = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert end == (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    # The run's default export (RUN/hf, a plain GPT-2) holds merge_and_unload()'s weights.
    base = transformers.GPT2LMHeadModel.from_pretrained(path, attn_implementation="eager")
    ref = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload().state_dict()
    merged = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").state_dict()
    for name, value in ref.items():
        rows = value.shape[0] if name in ("transformer.wte.weight", "lm_head.weight") else None  # grown by 4
        torch.testing.assert_close(merged[name][:rows], value, atol=1e-6, rtol=0, msg=name)


@pytest.mark.slow
def test_adapter_only_is_refused_when_the_adapter_is_not_the_whole_change(tmp_path, gpt2_like_dir, monkeypatch,
                                                                          capsys):
    path, _ = gpt2_like_dir
    train(load_train_config(None, hf_overrides(tmp_path, path, train__steps=2, checkpoint__every=0,
                                               freeze__trainable="head")))
    assert not (tmp_path / "run" / "adapter").exists()
    code, _, err = export_cli(["--checkpoint", tmp_path / "run", "--adapter-only", "--out", tmp_path / "a"],
                              monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "the run trained transformer/wte/embedding beside the adapters (freeze.trainable)" in err


@pytest.mark.parametrize("extra, message", [
    (dict(lora__rank=8), r"lora.init_from .*theirs has rank=4 but the lora section rank=8"),
    (dict(lora__alpha=16), r"lora.init_from .*theirs has alpha=8.0 but the lora section alpha=16.0"),
    (dict(lora__targets="[c_attn]"), r"theirs has targets=\('c_attn', 'c_proj', 'c_fc'\) but the lora section "
                                     r"targets=\('c_attn',\)"),
], ids=["rank", "alpha", "targets"])
def test_lora_init_from_mismatch_is_one_line(tmp_path, gpt2_like_dir, extra, message):
    path, _ = gpt2_like_dir
    pm = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    pm.save_pretrained(tmp_path / "theirs")
    args = hf_overrides(tmp_path, path, train__steps=1, lora__init_from=str(tmp_path / "theirs"), **extra)
    with pytest.raises(GPT2JaxError, match=message):
        train(load_train_config(None, args))


def test_lora_init_from_needs_a_base(tmp_path):
    with pytest.raises(GPT2JaxError, match="lora.init_from needs model.init_from: the base model"):
        load_train_config(None, overrides(tmp_path, lora__init_from=str(tmp_path), **LORA))
