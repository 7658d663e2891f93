"""The frozen base of a LoRA run: named in each checkpoint's meta instead of stored, and verified.

A LoRA run's checkpoints hold the adapters, whatever else trains (`freeze`) and their optimiser state, not
the frozen base. The meta names the base (`model.init_from`'s absolute path, or the seed of a random
initialisation) and holds a checksum of the frozen parameters as the run used them (after the embedding grew
to the tokenizer and the cast to `model.param_dtype`). Resume and load rebuild the base and compare: a moved,
edited or swapped base is one line, never a model that silently computes something else.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax import sharding
from gpt2_jax.checkpoints.hf import load_hf_config, params_from_state_dict, read_hf_state_dict
from gpt2_jax.checkpoints.orbax import array_checksum, host_checksum
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2LMHeadModel, grow_embedding
from gpt2_jax.model.layout import param_shapes, path_key
from gpt2_jax.model.lora import LoraConfig, is_adapter, merged

BASE = "lora_base"  # meta key: {"init_from": path or None, "seed": int, "checksum": hex}


def digest(checksums: dict[str, int]) -> str:
    """One hex digest of per-array checksums {key: uint32}."""
    return hashlib.sha256(json.dumps(sorted(checksums.items())).encode()).hexdigest()[:32]


@jax.jit
def _device_checksums(tree: dict) -> dict:
    return jax.tree.map(array_checksum, tree)


def device_digest(frozen: dict) -> str:
    """The digest of the frozen parameters {key: jax.Array}, computed where they live (sharded stays sharded;
    only one uint32 per array reaches the host)."""
    return digest({k: int(sharding.local_value(v)) for k, v in _device_checksums(frozen).items()})


def host_digest(params: dict[str, np.ndarray], keys: Iterable[str]) -> str:
    return digest({k: host_checksum(params[k]) for k in keys})


def record(init_from: Optional[str], seed: int, checksum: str) -> dict:
    """What a checkpoint's meta says of its base."""
    return {"init_from": os.path.abspath(init_from) if init_from else None, "seed": seed, "checksum": checksum}


def base_params(init_from: Optional[str], config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """The base as a run starts from it, on the host: `init_from`'s parameters with the embedding grown to
    `config.vocab_size` (new rows the mean), or the random initialisation of `seed`; each cast to
    `config.param_dtype`."""
    dtype = jnp.dtype(config.param_dtype)
    if init_from is None:  # as train/step.py initialises it: one jit, the same random bits
        flat = jax.jit(lambda: {path_key(p): v[...] for p, v in nnx.to_flat_state(
            nnx.split(GPT2LMHeadModel(config, seed=seed), nnx.Param, ...)[1])})()
        flat = {k: np.asarray(v) for k, v in flat.items()}
    else:
        if not os.path.isdir(init_from):
            raise GPT2JaxError(f"the LoRA base {init_from} is not there (it was the run's model.init_from)")
        fmt, state = read_hf_state_dict(init_from)
        flat = params_from_state_dict(load_hf_config(init_from), state, os.path.join(init_from, fmt))
        wte = flat["transformer/wte/embedding"]
        if config.vocab_size > wte.shape[0]:
            flat["transformer/wte/embedding"] = grow_embedding(wte, config.vocab_size)
    return {k: np.asarray(v, dtype=dtype) for k, v in flat.items()}


def check(saved: Optional[dict], got: str, where: str) -> None:
    """Raise unless the base digest `got` is the one a checkpoint's meta `saved` (its BASE record) holds."""
    if not saved:
        raise GPT2JaxError(f"{where}: the checkpoint names no LoRA base (written without lora.rank?)")
    if saved.get("checksum") != got:
        name = saved.get("init_from") or f"the random initialisation of seed {saved.get('seed')}"
        raise GPT2JaxError(f"{where}: the LoRA base {name} has changed since the checkpoint was written "
                           f"(checksum {got}, the checkpoint's {saved.get('checksum')}); its adapters belong to "
                           f"that base: restore it, or train new adapters in another train.out_dir")


def verified_base(saved: Optional[dict], config: ModelConfig, frozen_keys: Iterable[str],
                  where: str) -> dict[str, np.ndarray]:
    """The base a checkpoint's meta names (its BASE record `saved`), checked against its checksum over
    `frozen_keys` (the base parameters the checkpoint does not hold)."""
    if not saved:
        raise GPT2JaxError(f"{where}: the checkpoint names no LoRA base (written without lora.rank?)")
    params = base_params(saved.get("init_from"), config, int(saved.get("seed") or 0))
    check(saved, host_digest(params, frozen_keys), where)
    return params


def run_lora(meta: dict) -> LoraConfig:
    """The adapters of the run that wrote a checkpoint (its meta's `config.lora`; none before LoRA existed)."""
    section = (meta.get("config") or {}).get("lora") or {}
    if not section.get("rank"):
        return LoraConfig()
    return LoraConfig(rank=int(section["rank"]), alpha=float(section["alpha"]), targets=tuple(section["targets"]),
                      dropout=float(section["dropout"]), use_rslora=bool(section.get("use_rslora")))


def merged_run_params(flat: dict[str, np.ndarray], meta: dict, config: ModelConfig,
                      where: str) -> dict[str, np.ndarray]:
    """A checkpoint's parameters `flat` as the plain GPT-2 they stand for: unchanged without LoRA; with it,
    the verified base (meta's BASE record) under what trained, the adapters merged in (`merged`)."""
    lora = run_lora(meta)
    if not lora.rank:
        return flat
    frozen = [k for k in param_shapes(config) if k not in flat]
    base = verified_base(meta.get(BASE), config, frozen, where)
    trained = {k: v for k, v in flat.items() if not is_adapter(k)}
    return merged({**base, **trained}, {k: v for k, v in flat.items() if is_adapter(k)}, lora)
