"""Model configuration with Hugging Face `GPT2Config` field names, presets and config.json I/O.

The run's YAML configuration (sections, overrides, validation) lives in train/config.py.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Optional

from gpt2_jax.errors import GPT2JaxError, suggest

ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu", "swish", "tanh",
               "sigmoid", "linear")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """GPT-2 hyper-parameters; every field but the last two means what it means in `transformers.GPT2Config`."""

    # Size of the token vocabulary (rows of the tied embedding / LM head).
    vocab_size: int = 50257
    # Maximum sequence length (rows of the position embedding).
    n_positions: int = 1024
    # Width of the residual stream.
    n_embd: int = 768
    # Number of transformer blocks.
    n_layer: int = 12
    # Number of attention heads; n_embd must divide evenly.
    n_head: int = 12
    # Width of the MLP; None means 4 * n_embd.
    n_inner: Optional[int] = None
    # MLP activation, a key of Hugging Face's ACT2FN (see ACTIVATIONS).
    activation_function: str = "gelu_new"
    # Dropout on each block's residual branches.
    resid_pdrop: float = 0.1
    # Dropout on the summed token + position embeddings.
    embd_pdrop: float = 0.1
    # Dropout on the attention probabilities.
    attn_pdrop: float = 0.1
    # LayerNorm epsilon.
    layer_norm_epsilon: float = 1e-5
    # Standard deviation of the normal initialiser.
    initializer_range: float = 0.02
    # Divide attention scores by sqrt(head_dim).
    scale_attn_weights: bool = True
    # Also divide attention scores of layer i by (i + 1).
    scale_attn_by_inverse_layer_idx: bool = False
    # Compute attention scores and softmax in float32 whatever the compute dtype.
    reorder_and_upcast_attn: bool = False
    # Special-token ids written to config.json / generation_config.json.
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    pad_token_id: Optional[int] = None
    # Dtype of activations and matmuls (not a GPT2Config field).
    dtype: str = "float32"
    # Dtype the parameters are stored in (not a GPT2Config field).
    param_dtype: str = "float32"

    def __post_init__(self):
        # Types first: a config.json with "n_head": 0 or "n_embd": "256" must not fail as a division or a TypeError.
        for name in _SIZES:
            value = getattr(self, name)
            if value is None and name == "n_inner":
                continue
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
                raise GPT2JaxError(f"{name} must be a positive integer, got {value!r}")
        for name in _FLOATS:
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise GPT2JaxError(f"{name} must be a number, got {value!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise GPT2JaxError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise GPT2JaxError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise GPT2JaxError(f"unknown activation_function {self.activation_function!r}"
                               f"{suggest(self.activation_function, ACTIVATIONS)}; known: {', '.join(ACTIVATIONS)}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise GPT2JaxError(f"unknown {name} {getattr(self, name)!r}; known: {', '.join(DTYPES)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def replace(self, **changes) -> "ModelConfig":
        unknown = [k for k in changes if k not in _FIELDS]
        if unknown:
            raise GPT2JaxError(f"unknown ModelConfig field {unknown[0]!r}{suggest(unknown[0], _FIELDS)}")
        return dataclasses.replace(self, **changes)

    # --- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config") -> "ModelConfig":
        """Build from a Hugging Face GPT-2 config dict; keys that GPT2Config does not model are ignored."""
        model_type = d.get("model_type")
        if model_type != "gpt2":
            raise GPT2JaxError(f"{source}: model_type is {model_type!r}, not 'gpt2'; gpt2-jax loads GPT-2 models only")
        kwargs = {k: d[k] for k in _HF_FIELDS if k in d}
        if "n_ctx" in d and "n_positions" not in d:
            kwargs["n_positions"] = d["n_ctx"]
        try:
            return cls(**kwargs)
        except GPT2JaxError as e:
            raise GPT2JaxError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json Hugging Face writes for `GPT2LMHeadModel`."""
        d = {k: getattr(self, k) for k in _HF_FIELDS}
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions,
                 tie_word_embeddings=True, torch_dtype=self.param_dtype, summary_type="cls_index",
                 summary_use_proj=True, summary_activation=None, summary_proj_to_labels=True,
                 summary_first_dropout=0.1, use_cache=True)
        return d

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if not os.path.isfile(path):
            raise GPT2JaxError(f"config file not found: {path}")
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise GPT2JaxError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise GPT2JaxError(f"{path} must hold a JSON object")
        cfg = cls.from_hf_dict(d, source=path)
        # Our own extra fields, when the file was written by gpt2-jax.
        extra = {k: d[k] for k in ("dtype", "param_dtype") if k in d and isinstance(d[k], str)}
        return cfg.replace(**extra) if extra else cfg

    def save_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2, sort_keys=True)
            f.write("\n")


# The fields __post_init__ checks by type (the strings are checked against their lists of values).
_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
_FLOATS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range")
_FLAGS = ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
_HF_FIELDS = tuple(f for f in _FIELDS if f not in ("dtype", "param_dtype"))

PRESETS = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": dict(n_embd=1600, n_layer=48, n_head=25),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The configuration of a released GPT-2 size, with optional field overrides."""
    if name not in PRESETS:
        raise GPT2JaxError(f"unknown model preset {name!r}{suggest(name, PRESETS)}; known: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name]).replace(**overrides)
