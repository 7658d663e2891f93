"""Hugging Face PEFT LoRA adapter directories in and out: `adapter_config.json` + `adapter_model.safetensors`.

Shape letters: I a projection's input width, O its output width, R the rank.

GPT-2's projections are `transformers.Conv1D` layers, so PEFT's GPT-2 adapters have `fan_in_fan_out: true`
and store `base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight` [R, I] and `lora_B.weight` [O, R]:
the transposes of our `.../c_attn/lora_a` [I, R] and `.../lora_b` [R, O] (model/lora.py). PEFT's update,
`(B @ A).T * scale`, is then our `scale * A @ B`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Mapping, Optional

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors reads bf16 adapters)
import numpy as np
from safetensors.numpy import save_file

from gpt2_jax.checkpoints.hf import _read_safetensors, _read_torch_bin
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.lora import TARGETS, LoraConfig, adapter_shapes

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."

# PEFT's tensor names for GPT-2 (GPT2LMHeadModel; GPT2Model's adapters lack `transformer.`), with or without
# an adapter name after lora_A/lora_B (PEFT strips "default" when it saves; state dicts saved by hand keep it).
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|"
                  r"mlp\.c_proj)\.lora_([AB])(?:\.([^.]+))?\.weight$")
# `target_modules` entries PEFT's suffix match makes equal to ours (module paths end with them).
_TARGET_ALIASES = {"c_attn": "c_attn", "attn.c_attn": "c_attn", "c_fc": "c_fc", "mlp.c_fc": "c_fc",
                   "c_proj": "c_proj"}
# Config keys for features our adapters do not have: a value other than these defaults is refused.
_UNSUPPORTED = {"use_dora": (False, None), "modules_to_save": (None, []), "rank_pattern": ({}, None),
                "alpha_pattern": ({}, None), "layers_to_transform": (None, []), "exclude_modules": (None, []),
                "layer_replication": (None, []), "trainable_token_indices": (None, {}, []),
                "target_parameters": (None, []), "lora_bias": (False, None), "use_qalora": (False, None),
                "alora_invocation_tokens": (None, []), "use_bdlora": (None, False), "megatron_config": (None,)}

# init_lora_weights that rewrite the base's weights when PEFT builds the adapter (PiSSA, OLoRA, CorDA, LoftQ,
# LoRA-GA): our merge onto the unchanged base would compute something else.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def peft_name(key: str) -> str:
    """'transformer/h/0/attn/c_attn/lora_a' -> 'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight'."""
    *module, leaf = key.split("/")
    return _PREFIX + ".".join(module) + {"lora_a": ".lora_A.weight", "lora_b": ".lora_B.weight"}[leaf]


def adapter_config_dict(lora: LoraConfig, base_name: Optional[str]) -> dict:
    """adapter_config.json as PEFT writes it for GPT-2 (fields older and newer peft versions read alike)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": list(lora.targets), "fan_in_fan_out": True, "bias": "none",
            "use_rslora": lora.use_rslora, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
            "inference_mode": True, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "revision": None}


def write_adapter(out_dir: str, config: ModelConfig, lora: LoraConfig, adapters: Mapping[str, np.ndarray],
                  base_name: Optional[str] = None) -> str:
    """Write a PEFT adapter directory from flat adapters ({key: array} in our layout, every key of
    `adapter_shapes(config, lora)`); `base_name`: adapter_config.json's base_model_name_or_path. The
    files appear whole or not at all (an existing directory's two files are replaced)."""
    shapes = adapter_shapes(config, lora)
    if not shapes:
        raise GPT2JaxError("no adapters to export: lora.rank is 0")
    tensors = {}
    for key, shape in shapes.items():
        if key not in adapters:
            raise GPT2JaxError(f"cannot export the adapter: {key} is missing")
        value = np.asarray(adapters[key])
        if value.shape != shape:
            raise GPT2JaxError(f"cannot export the adapter: {key} has shape {value.shape}, expected {shape}")
        tensors[peft_name(key)] = np.ascontiguousarray(value.T)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=os.path.dirname(out_dir))
    try:
        save_file(tensors, os.path.join(tmp, WEIGHT_FILES[0]), metadata={"format": "pt"})
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(adapter_config_dict(lora, base_name), f, indent=2, sort_keys=True)
            f.write("\n")
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)
        else:
            for name in os.listdir(tmp):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def read_adapter_config(adapter_dir: str) -> tuple[LoraConfig, dict]:
    """(LoraConfig, the raw adapter_config.json) of a PEFT directory, refusing what our adapters cannot
    express, in one line naming the directory and the key."""
    if not os.path.isdir(adapter_dir):
        raise GPT2JaxError(f"adapter directory does not exist: {adapter_dir}")
    path = os.path.join(adapter_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise GPT2JaxError(f"{adapter_dir}: no {CONFIG_FILE}: not a PEFT adapter directory")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GPT2JaxError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise GPT2JaxError(f"{path}: expected a JSON object")

    def bad(key: str, why: str) -> GPT2JaxError:
        return GPT2JaxError(f"{path}: {key}: {why}")

    if raw.get("peft_type") != "LORA":
        raise bad("peft_type", f"{raw.get('peft_type')!r} is not supported, only 'LORA'")
    if raw.get("bias", "none") != "none":
        raise bad("bias", f"{raw['bias']!r} is not supported (LoRA adapters here train no biases): only 'none'")
    for key, defaults in _UNSUPPORTED.items():
        if key in raw and not any(raw[key] == d for d in defaults):
            raise bad(key, f"{raw[key]!r} is not supported")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(_BASE_CHANGING_INITS):
        raise bad("init_lora_weights", f"{init!r} changes the base's weights where PEFT loads the adapter, which "
                                       f"is not supported: convert it to a plain LoRA adapter (PEFT's "
                                       f"path_initial_model_for_weight_conversion)")
    targets = _targets(raw.get("target_modules"), lambda why: bad("target_modules", why))
    if not raw.get("fan_in_fan_out", False):
        # PEFT itself sets it to True on Conv1D targets (all of GPT-2's) and reads the tensors the same way.
        log.warning(f"{path}: fan_in_fan_out is false, but GPT-2's targets are Conv1D layers: read as true, "
                    f"as PEFT does")
    rank, alpha, dropout = raw.get("r"), raw.get("lora_alpha", 8), raw.get("lora_dropout", 0.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise bad("r", f"must be an integer > 0, got {rank!r}")
    for key, value in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise bad(key, f"must be a number, got {value!r}")
    try:
        lora = LoraConfig(rank=rank, alpha=float(alpha), targets=targets, dropout=float(dropout),
                          use_rslora=bool(raw.get("use_rslora", False)))
    except GPT2JaxError as e:
        raise GPT2JaxError(f"{path}: {e}") from None
    return lora, raw


def _targets(value, bad) -> tuple[str, ...]:
    """PEFT's target_modules as our target names (TARGETS order)."""
    if value == "all-linear":  # PEFT: every linear/Conv1D layer but the output head
        return TARGETS
    if isinstance(value, str):
        if value in _TARGET_ALIASES:
            return (_TARGET_ALIASES[value],)
        raise bad(f"{value!r}: a regular expression is not supported; list module names ({', '.join(TARGETS)})")
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise bad(f"expected a non-empty list of module names, got {value!r}")
    out = set()
    for name in value:
        if name not in _TARGET_ALIASES:
            hint = (" (attention-only or MLP-only c_proj adapters are not supported: use c_proj)"
                    if name in ("attn.c_proj", "mlp.c_proj") else "")
            raise bad(f"unknown module {name!r} for GPT-2; known: {', '.join(TARGETS)}{hint}")
        out.add(_TARGET_ALIASES[name])
    return tuple(t for t in TARGETS if t in out)


def _read_tensors(adapter_dir: str) -> tuple[str, dict[str, np.ndarray]]:
    for name in WEIGHT_FILES:
        path = os.path.join(adapter_dir, name)
        if os.path.isfile(path):
            return path, (_read_safetensors if name.endswith(".safetensors") else _read_torch_bin)(path)
    raise GPT2JaxError(f"{adapter_dir}: no adapter weights: looked for {', '.join(WEIGHT_FILES)}")


def read_adapter(adapter_dir: str, config: ModelConfig) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """(LoraConfig, flat adapters in our layout) of a PEFT LoRA directory, checked against the base model's
    `config`: every adapted module present once, shapes of this base and rank, nothing else."""
    lora, _ = read_adapter_config(adapter_dir)
    path, state = _read_tensors(adapter_dir)
    expected = adapter_shapes(config, lora)
    out, names, adapter_names = {}, {}, set()
    for name, value in state.items():
        m = _KEY.match(name)
        if m is None:
            raise GPT2JaxError(f"{path}: unexpected tensor {name} (only LoRA A/B weights of "
                               f"{', '.join(TARGETS)} are supported)")
        layer, module, ab, adapter_name = int(m[1]), m[2], m[3], m[4]
        if adapter_name is not None:
            adapter_names.add(adapter_name)
        if layer >= config.n_layer:
            raise GPT2JaxError(f"{path}: {name} is for layer {layer}, but the base model has {config.n_layer} "
                               f"layers: an adapter for another base")
        key = f"transformer/h/{layer}/{module.replace('.', '/')}/lora_{ab.lower()}"
        if key not in expected:
            raise GPT2JaxError(f"{path}: {name}: its module is not in target_modules "
                               f"{list(lora.targets)} of {CONFIG_FILE}")
        if key in out:
            first, second = sorted((name, names[key]))
            raise GPT2JaxError(f"{path}: {first} and {second} are the same tensor: one adapter is supported")
        if value.ndim != 2:
            raise GPT2JaxError(f"{path}: {name} has shape {tuple(value.shape)}, expected a matrix")
        rank = value.shape[0] if ab == "A" else value.shape[1]
        if rank != lora.rank:
            raise GPT2JaxError(f"{path}: {name} has rank {rank} (shape {tuple(value.shape)}), but "
                               f"{CONFIG_FILE} has r={lora.rank}")
        want = expected[key][::-1]
        if tuple(value.shape) != want:
            raise GPT2JaxError(f"{path}: {name} has shape {tuple(value.shape)}, but this base model "
                               f"(n_embd={config.n_embd}) needs {want}: an adapter for another base")
        out[key], names[key] = np.ascontiguousarray(np.asarray(value).T), name
    if len(adapter_names) > 1:
        raise GPT2JaxError(f"{path}: holds several adapters ({', '.join(sorted(adapter_names))}): one is supported")
    missing = [k for k in expected if k not in out]
    if missing:
        raise GPT2JaxError(f"{path}: lacks {peft_name(missing[0])} ({len(missing)} of {len(expected)} tensors "
                           f"missing): an adapter for another base, or fewer layers than its {config.n_layer}")
    return lora, out

