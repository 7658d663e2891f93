"""PEFT LoRA adapter directories both ways, checked by real peft and transformers: ours load in PeftModel with
no missing-key warning and give our logits; adapters made by torch PEFT load into our model with torch's."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from conftest import TINY, torch_logits
from gpt2_jax.checkpoints.hf import load_hf_config, save_pretrained
from gpt2_jax.checkpoints.peft import read_adapter, write_adapter
from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.lora import LoraConfig, adapter_shapes

TOL = 1e-4
CHECK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "peft_check.py")
IDS = np.random.default_rng(1).integers(0, TINY["vocab_size"], size=(2, 24))


def random_adapters(config, lora, seed=0) -> dict:
    """Adapters whose update is of the order of the weights, so that one ignored or transposed tensor shows."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
            for k, shape in adapter_shapes(config, lora).items()}


def peft_model(base_dir, adapter_dir):
    """PeftModel.from_pretrained as a user calls it, failing on any warning (a wrong key prefix is only one)."""
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir, attn_implementation="eager").eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    adapter_warnings = [str(w.message) for w in caught if "adapter" in str(w.message).lower()
                        or "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not adapter_warnings, adapter_warnings
    return model


@pytest.mark.parametrize("lora", [LoraConfig(rank=4, alpha=8.0),
                                  LoraConfig(rank=2, alpha=3.0, targets=("c_attn",)),
                                  LoraConfig(rank=3, alpha=5.0, targets=("c_proj", "c_fc"), use_rslora=True)],
                         ids=["all", "c_attn", "rslora"])
def test_export_loads_in_peft_with_our_logits(hf_dir, tmp_path, lora):
    base_dir, ref = hf_dir()
    config = load_hf_config(base_dir)
    out = write_adapter(str(tmp_path / "adapter"), config, lora, random_adapters(config, lora), base_name=base_dir)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (cfg["r"], cfg["lora_alpha"], cfg["fan_in_fan_out"], cfg["target_modules"], cfg["use_rslora"]) == \
        (lora.rank, lora.alpha, True, list(lora.targets), lora.use_rslora)
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    if "c_attn" in lora.targets:
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (lora.rank, 32)
        assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, lora.rank)

    ours = np.asarray(load_pretrained(base_dir, adapter=out)(IDS))
    pm = peft_model(base_dir, out)
    assert pm.peft_config["default"].fan_in_fan_out
    np.testing.assert_allclose(torch_logits(pm, IDS), ours, atol=TOL, rtol=0)
    # The adapter matters: without it the logits are far off.
    assert np.abs(torch_logits(ref, IDS) - ours).max() > 0.1


def test_import_of_an_adapter_torch_peft_made(hf_dir, tmp_path):
    base_dir, ref = hf_dir()
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                          init_lora_weights=False, task_type="CAUSAL_LM")  # random non-zero B
    pm = peft.get_peft_model(ref, cfg).eval()
    pm.save_pretrained(tmp_path / "adapter")
    want = torch_logits(pm, IDS)
    with pm.disable_adapter():
        assert np.abs(want - torch_logits(pm, IDS)).max() > 0.1
    lora, adapters = read_adapter(str(tmp_path / "adapter"), load_hf_config(base_dir))
    assert (lora.rank, lora.alpha, lora.targets) == (4, 12.0, ("c_attn", "c_proj", "c_fc"))
    model = load_pretrained(base_dir, adapter=str(tmp_path / "adapter"))
    np.testing.assert_allclose(np.asarray(model(IDS)), want, atol=TOL, rtol=0)


def test_keys_with_adapter_name_and_without_prefix_and_bf16(hf_dir, tmp_path):
    """State dicts saved by hand keep PEFT's adapter name (`lora_A.default.weight`); GPT2Model adapters lack
    `transformer.`; adapters are often bfloat16."""
    import ml_dtypes

    base_dir, _ = hf_dir()
    config = load_hf_config(base_dir)
    lora = LoraConfig(rank=4, alpha=8.0)
    out = write_adapter(str(tmp_path / "a"), config, lora, random_adapters(config, lora))
    st = os.path.join(out, "adapter_model.safetensors")
    tensors = load_file(st)
    renamed = {k.replace("base_model.model.transformer.", "base_model.model.").replace(".weight", ".default.weight"):
               v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    save_file(renamed, st)
    _, got = read_adapter(out, config)
    for k, v in random_adapters(config, lora).items():
        np.testing.assert_array_equal(got[k], v.astype(ml_dtypes.bfloat16))


def test_fan_in_fan_out_false_is_read_as_peft_does(hf_dir, tmp_path, caplog):
    """PEFT sets fan_in_fan_out to true on Conv1D targets (with a warning) and reads the same tensors: so do we."""
    base_dir, _ = hf_dir()
    config = load_hf_config(base_dir)
    lora = LoraConfig(rank=2, alpha=4.0)
    out = write_adapter(str(tmp_path / "a"), config, lora, random_adapters(config, lora))
    _edit_config(out, fan_in_fan_out=False)
    ours = np.asarray(load_pretrained(base_dir, adapter=out)(IDS))
    assert "fan_in_fan_out is false" in caplog.text
    base = transformers.GPT2LMHeadModel.from_pretrained(base_dir, attn_implementation="eager").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, out).eval()
    np.testing.assert_allclose(torch_logits(pm, IDS), ours, atol=TOL, rtol=0)


def _edit_config(adapter_dir, **changes):
    path = os.path.join(adapter_dir, "adapter_config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


def _edit_tensors(adapter_dir, edit):
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


A0 = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"


def _drop_layer_2(t):
    for k in [k for k in t if ".h.2." in k]:
        del t[k]


BAD = [
    ("another base: wider", None, lambda t: t.update({A0: np.zeros((4, 64), np.float32)}),
     "lora_A.weight has shape (4, 64), but this base model (n_embd=32) needs (4, 32): an adapter for another base"),
    ("another base: more layers", None,
     lambda t: t.update({A0.replace("h.0", "h.5"): t[A0]}), "is for layer 5, but the base model has 3 layers"),
    ("another base: fewer layers", None, _drop_layer_2, "h.2.attn.c_attn.lora_A.weight (8 of 24 tensors missing)"),
    ("rank mismatch", dict(r=8), None, "h.0.attn.c_attn.lora_A.weight has rank 4 (shape (4, 32)), but "
                                        "adapter_config.json has r=8"),
    ("unknown target", dict(target_modules=["c_attn", "q_proj"]), None,
     "target_modules: unknown module 'q_proj' for GPT-2; known: c_attn, c_proj, c_fc"),
    ("tensor of an untargeted module", dict(target_modules=["c_attn", "c_fc"]), None,
     "attn.c_proj.lora_A.weight: its module is not in target_modules ['c_attn', 'c_fc']"),
    ("regex targets", dict(target_modules=".*attn.*"), None, "a regular expression is not supported"),
    ("dora", dict(use_dora=True), None, "adapter_config.json: use_dora: True is not supported"),
    ("bias", dict(bias="lora_only"), None, "adapter_config.json: bias: 'lora_only' is not supported"),
    ("modules_to_save", dict(modules_to_save=["lm_head"]), None, "modules_to_save: ['lm_head'] is not supported"),
    ("rank_pattern", dict(rank_pattern={"c_fc": 2}), None, "rank_pattern: {'c_fc': 2} is not supported"),
    ("layers_to_transform", dict(layers_to_transform=[0]), None, "layers_to_transform: [0] is not supported"),
    ("pissa", dict(init_lora_weights="pissa_niter_4"), None, "init_lora_weights: 'pissa_niter_4' changes the base's "
                                                              "weights where PEFT loads the adapter"),
    ("not lora", dict(peft_type="IA3"), None, "peft_type: 'IA3' is not supported, only 'LORA'"),
    ("extra tensor", None, lambda t: t.update({"base_model.model.lm_head.weight": np.zeros((97, 32), np.float32)}),
     "unexpected tensor base_model.model.lm_head.weight"),
    ("duplicate", None, lambda t: t.update({A0.replace(".weight", ".default.weight"): t[A0]}),
     "h.0.attn.c_attn.lora_A.default.weight and base_model.model.transformer.h.0.attn.c_attn.lora_A.weight are "
     "the same tensor"),
]


@pytest.mark.parametrize("change,edit,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_adapters_are_one_line(hf_dir, tmp_path, change, edit, message):
    base_dir, _ = hf_dir()
    config = load_hf_config(base_dir)
    lora = LoraConfig(rank=4, alpha=8.0)
    out = write_adapter(str(tmp_path / "a"), config, lora, random_adapters(config, lora))
    if change:
        _edit_config(out, **change)
    if edit:
        _edit_tensors(out, edit)
    with pytest.raises(GPT2JaxError) as e:
        load_pretrained(base_dir, adapter=out)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert out in str(e.value)


def test_adapter_of_another_base_made_by_peft(hf_dir, tmp_path):
    """An adapter torch PEFT trained on a wider GPT-2 is refused against our smaller base, in one line."""
    other_dir, other = hf_dir("other", n_embd=48)
    base_dir, _ = hf_dir("base")
    lora = peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True)
    peft.get_peft_model(other, lora).save_pretrained(tmp_path / "ad")
    with pytest.raises(GPT2JaxError, match=r"needs \(2, 32\): an adapter for another base"):
        load_pretrained(base_dir, adapter=str(tmp_path / "ad"))
    load_pretrained(other_dir, adapter=str(tmp_path / "ad"))  # and it is fine on its own base


def test_missing_files_are_one_line(hf_dir, tmp_path):
    base_dir, _ = hf_dir()
    with pytest.raises(GPT2JaxError, match="adapter directory does not exist"):
        load_pretrained(base_dir, adapter=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GPT2JaxError, match="no adapter_config.json: not a PEFT adapter directory"):
        load_pretrained(base_dir, adapter=str(tmp_path / "empty"))
    (tmp_path / "empty" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True}))
    with pytest.raises(GPT2JaxError, match="no adapter weights: looked for adapter_model.safetensors"):
        load_pretrained(base_dir, adapter=str(tmp_path / "empty"))
    (tmp_path / "empty" / "adapter_config.json").write_text("{")
    with pytest.raises(GPT2JaxError, match="adapter_config.json is not valid JSON"):
        load_pretrained(base_dir, adapter=str(tmp_path / "empty"))


def test_pytorch_bin_adapter(hf_dir, tmp_path):
    """Older PEFT versions saved adapter_model.bin."""
    base_dir, ref = hf_dir()
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True,
                                                  init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "ad", safe_serialization=False)
    assert os.path.isfile(tmp_path / "ad" / "adapter_model.bin")
    model = load_pretrained(base_dir, adapter=str(tmp_path / "ad"))
    np.testing.assert_allclose(np.asarray(model(IDS)), torch_logits(pm, IDS), atol=TOL, rtol=0)


def test_merged_export_equals_merge_and_unload(hf_dir, tmp_path):
    """A base with an adapter merged (`load_pretrained(base, adapter=)`, then saved) is a plain GPT-2 whose
    weights are PEFT's merge_and_unload()'s."""
    base_dir, _ = hf_dir()
    config = load_hf_config(base_dir)
    lora = LoraConfig(rank=4, alpha=8.0)
    adapter = write_adapter(str(tmp_path / "adapter"), config, lora, random_adapters(config, lora))
    model = load_pretrained(base_dir, adapter=adapter)
    merged_dir = save_pretrained(model, str(tmp_path / "merged"))
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged_dir, attn_implementation="eager").eval()
    assert type(plain) is transformers.GPT2LMHeadModel
    ref = peft_model(base_dir, adapter).merge_and_unload().state_dict()
    ours = plain.state_dict()
    for name, value in ref.items():
        torch.testing.assert_close(ours[name], value, atol=1e-6, rtol=0, msg=name)
    np.testing.assert_allclose(torch_logits(plain, IDS), np.asarray(model(IDS)), atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("version", ["4", "5"])
def test_round_trip_in_both_transformers_versions(hf_dir, tmp_path, version, request):
    """Our export loads in PeftModel (no key warning, our logits) and merges as merge_and_unload() does, and an
    adapter PEFT makes loads into our model with its logits: under transformers 4.57 and 5 with their peft."""
    python = sys.executable if version == "4" else request.getfixturevalue("transformers5_python")
    base_dir, _ = hf_dir()
    config = load_hf_config(base_dir)
    lora = LoraConfig(rank=4, alpha=8.0, use_rslora=True)
    adapter = write_adapter(str(tmp_path / "adapter"), config, lora, random_adapters(config, lora), base_dir)
    model = load_pretrained(base_dir, adapter=adapter)
    merged_dir = save_pretrained(model, str(tmp_path / "merged"))
    expected = {"ids": IDS.tolist(), "logits": np.asarray(model(IDS)).tolist()}
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    res = subprocess.run([python, CHECK, "load", base_dir, adapter, str(tmp_path / "expected.json"), merged_dir],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.splitlines()[-1])["transformers"].startswith(version)

    (tmp_path / "ids.json").write_text(json.dumps(IDS.tolist()))
    res = subprocess.run([python, CHECK, "make", base_dir, str(tmp_path / "theirs"), str(tmp_path / "ids.json"),
                          str(tmp_path / "theirs.json")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    want = np.asarray(json.loads((tmp_path / "theirs.json").read_text()), np.float32)
    ours = np.asarray(load_pretrained(base_dir, adapter=str(tmp_path / "theirs"))(IDS))
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
    assert np.abs(ours - np.asarray(load_pretrained(base_dir)(IDS))).max() > 0.1
