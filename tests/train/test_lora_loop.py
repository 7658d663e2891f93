"""Whole LoRA runs: checkpoints without the frozen base, the base checked by its checksum on resume and load,
the merged export, and a bitwise resume after SIGKILL."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from gpt2_jax.checkpoints import lora_base
from gpt2_jax.checkpoints.orbax import Checkpointer
from gpt2_jax.checkpoints.pretrained import load_run
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.lora import is_adapter
from gpt2_jax.train.config import load_train_config
from gpt2_jax.train.loop import train

from test_loop import ROOT, gpt2_like_dir, latest_state, overrides, shared_tokenizer  # noqa: F401 (fixtures)

LORA = dict(lora__rank=4, lora__alpha=8, lora__targets="[c_attn, c_fc]")


def hf_overrides(tmp: Path, base: Path, **extra) -> list[str]:
    return overrides(tmp, model__init_from=str(base), model__n_layer="null", model__n_embd="null",
                     model__n_head="null", model__n_positions="null", tokenizer__path="null", **{**LORA, **extra})


def test_digests_agree_on_host_and_device_and_a_change_is_one_line():
    rng = np.random.default_rng(0)
    host = {"a": rng.normal(size=(8, 3)).astype(np.float32), "b": rng.normal(size=5).astype(jnp.bfloat16)}
    d = lora_base.device_digest({k: jnp.asarray(v) for k, v in host.items()})
    assert d == lora_base.host_digest(host, host)
    host["a"][3, 1] = np.nextafter(host["a"][3, 1], 1)
    changed = lora_base.host_digest(host, host)
    with pytest.raises(GPT2JaxError, match=r"^here: the LoRA base /b has changed since the checkpoint"):
        lora_base.check({"init_from": "/b", "checksum": d}, changed, "here")


@pytest.mark.slow
def test_lora_run_checkpoints_adapters_only_and_exports_the_merged_model(tmp_path, gpt2_like_dir):
    path, hf_model = gpt2_like_dir
    out = train(load_train_config(None, hf_overrides(tmp_path, path, freeze__trainable="head",
                                                     checkpoint__every=0)))
    run_dir = tmp_path / "run"
    ckpt = Checkpointer(str(run_dir), read_only=True)
    meta = ckpt.meta(out["steps"])
    trained = ckpt.restore_params(out["steps"])
    ckpt.close()
    # The checkpoint: the adapters and the head (freeze.trainable=head), no frozen base; its meta names it.
    assert set(trained) == {k for k in trained if is_adapter(k)} | {"transformer/wte/embedding"}
    assert meta[lora_base.BASE]["init_from"] == str(Path(path).resolve())
    state = latest_state(run_dir)
    assert not any(k.startswith("['frozen']") for k in state)
    assert any(k.startswith("['opt_state']") and "lora_a" in k for k in state)
    # The end-of-run export is the merged model: transformers loads it as a plain GPT-2 with our logits.
    ids = np.array([[5, 17, 3, 60, 2, 9, 41]])
    ours = np.asarray(load_run(str(run_dir))(ids))
    exported = transformers.GPT2LMHeadModel.from_pretrained(run_dir / "hf").eval()
    import torch
    with torch.no_grad():
        theirs = exported(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
    base = {n: p.detach().numpy() for n, p in hf_model.named_parameters()}
    merged = dict(exported.named_parameters())
    assert not np.array_equal(merged["transformer.h.0.attn.c_attn.weight"].detach().numpy(),
                              base["transformer.h.0.attn.c_attn.weight"])  # the adapters are in
    np.testing.assert_array_equal(merged["transformer.h.0.attn.c_proj.weight"].detach().numpy(),
                                  base["transformer.h.0.attn.c_proj.weight"])  # not a target: the base


@pytest.mark.slow
def test_a_changed_base_is_one_line_on_resume_and_load(tmp_path, gpt2_like_dir):
    path, _ = gpt2_like_dir
    base = tmp_path / "base"
    shutil.copytree(path, base)
    train(load_train_config(None, hf_overrides(tmp_path, base, train__steps=3, checkpoint__every=0)))
    weights = base / "model.safetensors"
    tensors = load_file(weights)
    tensors["transformer.h.1.mlp.c_proj.weight"][0, 0] += 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(GPT2JaxError, match=r"cannot resume .*: the LoRA base .*base has changed since the "
                                           r"checkpoint was written \(checksum"):
        train(load_train_config(None, hf_overrides(tmp_path, base, train__steps=6, checkpoint__every=0)))
    with pytest.raises(GPT2JaxError, match=r"the LoRA base .* has changed"):
        load_run(str(tmp_path / "run"))
    shutil.rmtree(base)
    with pytest.raises(GPT2JaxError, match=r"the LoRA base .*base is not there"):
        load_run(str(tmp_path / "run"))


@pytest.mark.slow
def test_lora_run_resumes_bitwise_after_sigkill(tmp_path, gpt2_like_dir):
    path, _ = gpt2_like_dir
    steps = dict(train__steps=10, checkpoint__every=2, checkpoint__keep=2, model__dropout=0.1, lora__dropout=0.1)
    train(load_train_config(None, hf_overrides(tmp_path / "ref", path, **steps)))
    metrics = tmp_path / "x" / "run" / "metrics.jsonl"
    logged = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    rng, kills = np.random.default_rng(1), 0
    args = hf_overrides(tmp_path / "x", path, **steps)
    for attempt in range(8):
        before = logged()
        proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if kills < 2:
            target, deadline = rng.integers(2, 6), time.time() + 300
            while proc.poll() is None and logged() - before < target and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.2))
            if proc.poll() is None:
                proc.kill()
                kills += 1
                proc.communicate()
                continue
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        break
    assert kills >= 1
    a, b = latest_state(tmp_path / "ref" / "run"), latest_state(tmp_path / "x" / "run")
    assert a["step"] == b["step"] == 10
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def peft_adapter(tmp: Path, base: Path, r: int = 4, alpha: int = 8) -> Path:
    """A LoRA adapter made by torch PEFT on `base` (random A and B: init_lora_weights=False)."""
    import peft
    import torch

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel.from_pretrained(base)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["c_attn", "c_fc"],
                                                    fan_in_fan_out=True, init_lora_weights=False))
    pm.save_pretrained(tmp / "adapter")
    return tmp / "adapter"


@pytest.mark.slow
def test_lora_init_from_continues_a_peft_adapter(tmp_path, gpt2_like_dir):
    path, _ = gpt2_like_dir
    adapter = peft_adapter(tmp_path, Path(path))
    # lr so small that one step leaves float32 adapters as they were read
    out = train(load_train_config(None, hf_overrides(tmp_path, path, lora__init_from=str(adapter), train__steps=1,
                                                     optim__lr=1e-30, optim__warmup_steps=0, checkpoint__every=0)))
    ckpt = Checkpointer(str(tmp_path / "run"), read_only=True)
    trained = ckpt.restore_params(out["steps"])
    ckpt.close()
    theirs = load_file(adapter / "adapter_model.safetensors")
    a = theirs["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"]
    np.testing.assert_array_equal(trained["transformer/h/1/mlp/c_fc/lora_a"], a.T)
    with pytest.raises(GPT2JaxError, match=r"lora.init_from .* has rank=4 but the lora section rank=8"):
        train(load_train_config(None, hf_overrides(tmp_path / "b", path, lora__init_from=str(adapter),
                                                   lora__rank=8)))
