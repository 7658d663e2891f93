"""Hugging Face checkpoints in and out: safetensors, pytorch_model.bin and flax_model.msgpack.

Every format is read into one canonical form, PyTorch's names and layouts
(`transformer.h.0.attn.c_attn.weight`, Conv1D kernels [in, out]), then mapped to our parameter paths.
The only transposes are Flax msgpack's kernels, which Hugging Face stores [out, in].
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

import ml_dtypes
import msgpack
import numpy as np
from flax import nnx, serialization
from safetensors import SafetensorError
from safetensors.numpy import load_file

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.errors import GPT2JaxError, first_line
from gpt2_jax.model.gpt2 import GPT2LMHeadModel
from gpt2_jax.model.layout import param_shapes, path_key

# Our leaf name -> PyTorch leaf name. Flax msgpack keeps our leaf names.
_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Hugging Face Flax stores Conv1D kernels transposed relative to PyTorch's Conv1D.weight (and ours).
_FLAX_TRANSPOSED_LEAVES = ("kernel",)
# Buffers (the causal-mask `attn.bias`, `attn.masked_bias`) and the tied head, absent from our tree.
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$")

WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")


def torch_name(key: str) -> str:
    """'transformer/h/0/ln_1/scale' -> 'transformer.h.0.ln_1.weight'."""
    *module, leaf = key.split("/")
    return ".".join(module) + "." + _TO_TORCH_LEAF[leaf]


# --- reading -------------------------------------------------------------------------------------

def _weight_files(model_dir: str) -> tuple[str, list[str]]:
    """The preferred weight format present in `model_dir` and its file(s), following *.index.json."""
    for name in WEIGHT_FILES:
        single, index = os.path.join(model_dir, name), os.path.join(model_dir, name + ".index.json")
        if os.path.isfile(single):
            return name, [single]
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GPT2JaxError(f"{index} is not a valid index file (no 'weight_map')") from None
            files = [os.path.join(model_dir, f) for f in sorted(set(weight_map.values()))]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise GPT2JaxError(f"{index} names shard {os.path.basename(missing[0])}, which is missing")
            return name, files
    raise GPT2JaxError(f"no weights in {model_dir}: looked for {', '.join(WEIGHT_FILES)} (or sharded *.index.json)")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise GPT2JaxError(f"cannot read {path}: {first_line(e)}") from None


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise GPT2JaxError(f"{path} is a PyTorch pickle: reading it needs PyTorch (pip install torch), "
                           "or convert the checkpoint to model.safetensors") from None
    try:
        # weights_only: never execute code from a pickle.
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise GPT2JaxError(f"cannot read {path} safely: {first_line(e)}") from None
    out = {}
    for k, t in sd.items():
        if t.dtype == torch.bfloat16:
            out[k] = t.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def _read_flax_msgpack(path: str) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            tree = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several types for truncated or foreign files
        raise GPT2JaxError(f"cannot read {path} as Flax msgpack: {first_line(e)}") from None
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + (k,))
            else:
                leaf = np.asarray(v)
                if k in _FLAX_TRANSPOSED_LEAVES:
                    leaf = leaf.T
                out[".".join(prefix + (_TO_TORCH_LEAF.get(k, k),))] = leaf

    walk(tree, ())
    return out


_READERS = {"model.safetensors": _read_safetensors, "pytorch_model.bin": _read_torch_bin,
            "flax_model.msgpack": _read_flax_msgpack}


def read_hf_state_dict(model_dir: str) -> tuple[str, dict[str, np.ndarray]]:
    """(format, {PyTorch name: array}) with every name prefixed `transformer.` and buffers dropped."""
    fmt, files = _weight_files(model_dir)
    state: dict[str, np.ndarray] = {}
    for f in files:
        state.update(_READERS[fmt](f))
    out = {}
    for name, value in state.items():
        if _IGNORED.search(name):
            continue
        # GPT2Model checkpoints (e.g. the original `gpt2`) have no `transformer.` prefix.
        out[name if name.startswith("transformer.") else "transformer." + name] = value
    return fmt, out


def params_from_state_dict(config: ModelConfig, state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """Map a canonical state dict onto our parameter keys, checking names and shapes against `config`."""
    shapes = param_shapes(config)
    params, expected = {}, set()
    for key, shape in shapes.items():
        name = torch_name(key)
        expected.add(name)
        if name not in state:
            continue
        value = state[name]
        if tuple(value.shape) != shape:
            raise GPT2JaxError(f"{source}: {name} has shape {tuple(value.shape)} but config.json implies {shape}")
        params[key] = value
    missing = sorted(expected - set(state))
    if missing:
        raise GPT2JaxError(f"{source}: {len(missing)} parameters missing, e.g. {missing[0]} "
                           f"(does config.json match the weights? n_layer={config.n_layer})")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise GPT2JaxError(f"{source}: {len(unexpected)} unexpected tensors, e.g. {unexpected[0]} "
                           f"(does config.json match the weights? n_layer={config.n_layer})")
    return params


def load_hf_config(model_dir: str) -> ModelConfig:
    if not os.path.exists(model_dir):
        raise GPT2JaxError(f"model path does not exist: {model_dir}")
    if not os.path.isdir(model_dir):
        raise GPT2JaxError(f"model path is not a directory: {model_dir}")
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise GPT2JaxError(f"no config.json in {model_dir}: not a Hugging Face model directory")
    return ModelConfig.from_json(path)


# --- writing -------------------------------------------------------------------------------------

def model_tensors(model: GPT2LMHeadModel) -> tuple[dict[str, tuple], Callable[[str], np.ndarray]]:
    """({key: (shape, dtype)}, read(key) -> numpy array) of the model's parameters, for write_pretrained."""
    flat = {path_key(path): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return {p: (tuple(v.shape), np.dtype(v.dtype)) for p, v in flat.items()}, lambda p: np.asarray(flat[p][...])


_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def _hf_config_dict(config: ModelConfig, tokenizer) -> dict:
    d = config.to_hf_dict()
    if tokenizer is not None:
        d.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                 sep_token_id=tokenizer.sep_id)
    return d


def save_pretrained(model: GPT2LMHeadModel, out_dir: str, tokenizer=None) -> str:
    """Write a Hugging Face directory: model.safetensors, flax_model.msgpack, config.json,
    generation_config.json and, given a tokenizer, its files. Loads in `transformers` as
    `GPT2LMHeadModel` and `FlaxGPT2LMHeadModel`. Files appear whole or not at all."""
    shapes, read = model_tensors(model)
    return write_pretrained(model.config, shapes, read, out_dir, tokenizer)


def write_pretrained(config: ModelConfig, shapes: dict[str, tuple], read: Callable[[str], np.ndarray],
                     out_dir: str, tokenizer=None, generation: Optional[dict] = None) -> str:
    """`save_pretrained` from `read(key)`, called once per parameter key of `shapes` ({key: (shape,
    dtype)}): each tensor goes into both weight files as it is read, so no more than one is held at a time
    (a checkpoint's export never gathers the whole model). `generation`: sampling defaults for
    generation_config.json (`do_sample`, `top_k`, ...), as transformers' `generate` reads them."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    cfg = _hf_config_dict(config, tokenizer)
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "_from_model_config": True}
    if cfg.get("pad_token_id") is not None:
        gen["pad_token_id"] = cfg["pad_token_id"]
    gen.update(generation or {})
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        with open(os.path.join(tmp, "model.safetensors"), "wb") as st, \
                open(os.path.join(tmp, "flax_model.msgpack"), "wb") as mp:
            _write_weights(shapes, read, st, mp)
        for name, content in (("config.json", cfg), ("generation_config.json", gen)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2, sort_keys=True)
                f.write("\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)  # the whole directory appears at once
        else:
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
            os.rmdir(tmp)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_weights(shapes: dict[str, tuple], read: Callable[[str], np.ndarray], st, mp) -> None:
    """Stream safetensors (PyTorch names and layouts; the header first, from the shapes) and Flax msgpack
    (a nested map, kernels transposed to [out, in]) in one pass over the tensors, in one order."""

    paths = sorted(shapes, key=lambda p: tuple(p.split("/")))
    header, offset = {}, 0
    for p in paths:
        shape, dtype = shapes[p]
        if np.dtype(dtype).name not in _SAFETENSORS_DTYPES:
            raise GPT2JaxError(f"cannot export {p} of dtype {np.dtype(dtype).name}")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[torch_name(p)] = {"dtype": _SAFETENSORS_DTYPES[np.dtype(dtype).name], "shape": list(shape),
                                 "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    st.write(len(blob).to_bytes(8, "little") + blob)

    tree: dict = {}  # the msgpack nesting: {key: subtree or path}
    for p in paths:
        *module, leaf = p.split("/")
        node = tree
        for key in module:
            node = node.setdefault(key, {})
        node[leaf] = p
    packer = msgpack.Packer(use_bin_type=True)

    def emit(node: dict) -> None:
        mp.write(packer.pack_map_header(len(node)))
        for key, child in node.items():
            mp.write(packer.pack(key))
            if isinstance(child, dict):
                emit(child)
                continue
            value = np.asarray(read(child))
            shape, dtype = shapes[child]
            if value.shape != tuple(shape) or value.dtype != np.dtype(dtype):
                raise GPT2JaxError(f"{child}: read {value.dtype}{list(value.shape)}, "
                                   f"expected {np.dtype(dtype)}{list(shape)}")
            st.write(np.ascontiguousarray(value).tobytes())
            if child.rsplit("/", 1)[-1] in _FLAX_TRANSPOSED_LEAVES:
                value = value.T
            mp.write(serialization.msgpack_serialize(np.ascontiguousarray(value)))
            del value  # before the next read: one tensor in memory at a time

    emit(tree)
