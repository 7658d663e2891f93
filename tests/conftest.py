"""Shared test helpers: tiny random Hugging Face GPT-2 models built and saved locally; damaged checkpoint steps."""
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CI installs libtpu (the TPU compile tests); on a machine without TPUs it would log initialisation errors
# into every subprocess's stderr. Ahead-of-time TPU compiles do not need the TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Test processes compile for TPU side by side (pytest -n 2); libtpu otherwise takes a lock file per machine.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# libtpu reads its log levels once, when the first test of a worker loads it: keep its warnings (the SPMD
# partitioner's involuntary-rematerialisation line, which tpu_compile counts) on stderr in every worker.
os.environ.setdefault("TPU_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "1")
# Training tests compile the same small programs in many runs and subprocesses: share them through JAX's
# persistent compilation cache (inherited by subprocesses through the environment).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gpt2-jax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest
import torch
import transformers

TINY = dict(vocab_size=97, n_positions=48, n_embd=32, n_layer=3, n_head=4)


def make_hf_model(seed: int = 0, attn_gain: float = 25.0, **overrides) -> transformers.GPT2LMHeadModel:
    """A random PyTorch GPT2LMHeadModel (eager attention) whose attention is far from uniform.

    A fresh init gives near-uniform attention (the largest weight of the last row is 0.026 against a
    uniform 0.025), which would hide mask and scaling bugs, so the query/key projections are scaled by
    `attn_gain` (25: the largest weight averages 0.6); LayerNorm parameters and biases are randomised too, so a
    transposed or swapped tensor cannot pass.
    """
    # Eager attention: the SDPA path silently ignores scale_attn_by_inverse_layer_idx.
    cfg = transformers.GPT2Config(**{**TINY, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert model.config._attn_implementation == "eager"
    d = cfg.n_embd
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_attn.weight"):
                p[:, : 2 * d] *= attn_gain
            elif name.endswith("c_fc.weight"):
                p *= 10.0  # MLP inputs of order 1: gelu and gelu_new logits then differ by ~4e-4
            elif name.endswith("wte.weight"):
                p *= 10.0  # logits of order 1-10, so that an absolute tolerance means something
            elif name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def torch_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    as_t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
    with torch.no_grad():
        out = model(as_t(input_ids), attention_mask=as_t(attention_mask), position_ids=as_t(position_ids))
    return out.logits.float().numpy()


def damage(step_dir: Path, how: str) -> None:
    """Damage a saved step as disks and copies do: a bit flipped in 37 places of each data file (as the issue
    did; one flip may land in bytes no array uses), the largest data file cut in half, the step directory
    emptied, or its meta JSON garbled."""
    if how == "empty":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
        return
    if how == "meta":
        meta = next(p for p in (step_dir / "meta").rglob("*") if p.is_file())
        meta.write_text('{"step": 2, "checksums": {')
        return
    files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if how == "bitflip":
        for data in (p for p in files if p.stat().st_size >= 1024):
            raw = bytearray(data.read_bytes())
            for at in np.linspace(len(raw) // 8, len(raw) - 1, 37).astype(int):
                raw[at] ^= 0x04
            data.write_bytes(bytes(raw))
    else:
        files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])


@pytest.fixture
def hf_dir(tmp_path):
    """Factory: save a tiny random HF GPT-2 and return (directory, torch model)."""

    def make(name="hf", safe=True, **overrides):
        model = make_hf_model(**overrides)
        path = tmp_path / name
        model.save_pretrained(path, safe_serialization=safe)
        return str(path), model

    return make


# The default path runs in the fast tier; the other two are the same checks again, so they are slow.
@pytest.fixture(params=["materialised", pytest.param("query-blocks", marks=pytest.mark.slow),
                        pytest.param("dot_product_attention", marks=pytest.mark.slow)])
def attention_path(request, monkeypatch):
    """Runs a test with each CPU attention implementation: the default (materialised, one block of queries
    for these short sequences), blocks of 16 queries with a ragged last one, and dot_product_attention."""
    from gpt2_jax.model import attention

    if request.param == "dot_product_attention":
        monkeypatch.setattr(attention, "default_impl", lambda platform, dropout: "materialised" if dropout else "xla")
    if request.param == "query-blocks":
        monkeypatch.setattr(attention, "QUERY_CHUNK", 16)
    return request.param


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def transformers5_python() -> str:
    """The python of a second virtual environment with the latest transformers 5 and the CPU torch
    (tests/requirements-transformers5.txt), made on first use in .venv-tf5 and reused while that file is
    unchanged: exports must load in what most users run, and transformers 5 cannot share a venv with the
    4.57 reference (the last with Flax)."""
    import fcntl
    import subprocess
    import sys

    venv = os.path.join(ROOT, ".venv-tf5")
    python = os.path.join(venv, "bin", "python")
    requirements = os.path.join(ROOT, "tests", "requirements-transformers5.txt")
    stamp = os.path.join(venv, "installed-requirements.txt")
    with open(requirements) as f:
        wanted = f.read()
    # pytest-xdist workers may ask at once: one builds, the others wait for it.
    with open(venv + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.isfile(python) and os.path.isfile(stamp) and open(stamp).read() == wanted):
            subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True, timeout=300)
            subprocess.run([python, "-m", "pip", "install", "-q", "-r", requirements], check=True, timeout=1200)
            with open(stamp, "w") as f:
                f.write(wanted)
    return python


# The server's tests' fixtures (tests/serve/, tests/tools/test_serve.py): here, so each is made once a session.
from serve_fixtures import client, hf_greedy, hf_model, model_dir, server, tokenizer  # noqa: E402,F401
