"""gpt2-jax: GPT-2 in JAX/Flax NNX with Hugging Face-exact numerics.

Top-level API: `load_pretrained`, `save_pretrained`, `load_tokenizer`, `generate`. Names are imported on
first use, so `import gpt2_jax.model.config` does not pull in transformers or the sampler.
"""
import importlib

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
