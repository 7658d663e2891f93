"""gpt2-jax: GPT-2 in JAX/Flax NNX with Hugging Face-exact numerics.

Top-level API: `load_pretrained`, `save_pretrained`, `load_tokenizer`, `generate`. Names are imported on
first use, so `import gpt2_jax.model.config` does not pull in transformers or the sampler.
"""
import glob
import importlib
import os

# libtpu (the `tpu` extra, for compiling for TPU slices anywhere) asks the Cloud TPU metadata server for its
# slice when JAX starts, and logs errors about it on a machine that has no TPU. A TPU VM has /dev/accel* or
# VFIO devices; elsewhere the query is skipped.
# Where there is no accelerator device at all, JAX would still start libtpu to look for TPU chips, and libtpu
# logs errors about the TPU it cannot find on every run; JAX_PLATFORMS=cpu is what JAX falls back to anyway
# (compiling for a TPU topology still loads libtpu on its own).
if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if not glob.glob("/dev/nvidia[0-9]*"):
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

_EXPORTS = {
    "GPT2JaxError": "gpt2_jax.errors",
    "GPT2LMHeadModel": "gpt2_jax.model.gpt2",
    "ModelConfig": "gpt2_jax.model.config",
    "generate": "gpt2_jax.sample.generate",
    "load_pretrained": "gpt2_jax.checkpoints.pretrained",
    "load_tokenizer": "gpt2_jax.tokenizer",
    "preset": "gpt2_jax.model.config",
    "resize_token_embeddings": "gpt2_jax.model.gpt2",
    "save_pretrained": "gpt2_jax.checkpoints.hf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gpt2_jax' has no attribute {name!r}")


def __dir__():
    return __all__
