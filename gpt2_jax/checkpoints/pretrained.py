"""A model source: a Hugging Face directory or a training run's directory, read or exported.

This module sits above `checkpoints.hf` (Hugging Face files) and `checkpoints.orbax` (Orbax), so neither
knows the other: a run directory is `model_config.json`, `tokenizer/` and `checkpoints/` (train.out_dir).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional, TypeVar

import yaml

from gpt2_jax.checkpoints.hf import load_hf_config, params_from_state_dict, read_hf_state_dict, write_pretrained
from gpt2_jax.checkpoints.lora_base import merged_run_params
from gpt2_jax.checkpoints.orbax import Checkpointer, CorruptCheckpoint, checkpoint_dir
from gpt2_jax.checkpoints import lora_base
from gpt2_jax.checkpoints.peft import read_adapter, write_adapter
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import GPT2LMHeadModel
from gpt2_jax.model.layout import model_from_params, param_shapes
from gpt2_jax.model.lora import is_adapter, merged
from gpt2_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
T = TypeVar("T")


def load_pretrained(path: str, *, adapter: Optional[str] = None, dtype: Optional[str] = None,
                    seed: int = 0) -> GPT2LMHeadModel:
    """Load a Hugging Face GPT-2 directory (safetensors, Flax msgpack or pytorch_model.bin, sharded or not),
    or a training run's directory (its latest complete checkpoint).

    `adapter`: a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) for this base,
    merged into the weights once (`kernel + scale * A @ B`): the model then runs at the base's speed.
    `dtype` ("float32", "bfloat16", "float16") sets both the compute and the parameter dtype.
    The model comes back in evaluation mode (dropout off).
    """
    if is_run_dir(path):
        config, flat = run_params(path)
    else:
        config = load_hf_config(path)
        fmt, state = read_hf_state_dict(path)
        flat = params_from_state_dict(config, state, os.path.join(path, fmt))
    if adapter is not None:
        flat = merge_adapter(config, flat, adapter)
    return model_from_params(_with_dtype(config, dtype), flat, seed=seed)


def merge_adapter(config: ModelConfig, flat: dict, adapter_dir: str) -> dict:
    """The base's flat parameters with a PEFT adapter directory's LoRA folded in (checked against `config`)."""
    lora, adapters = read_adapter(adapter_dir, config)
    log.info(f"adapter {adapter_dir}: LoRA rank {lora.rank} on {', '.join(lora.targets)}, scale {lora.scale:g}, "
             f"merged into the base")
    return merged(flat, adapters, lora)


def is_run_dir(path: str) -> bool:
    """A training run's output directory (train.out_dir): model_config.json beside checkpoints/."""
    return os.path.isdir(checkpoint_dir(path)) and os.path.isfile(os.path.join(path, "model_config.json"))


def open_run(run_dir: str) -> tuple[ModelConfig, Checkpointer]:
    """(ModelConfig, read-only Checkpointer) of a run directory; the caller closes the Checkpointer."""
    config = ModelConfig.from_json(os.path.join(run_dir, "model_config.json"))
    ckpt = Checkpointer(run_dir, read_only=True)
    if not ckpt.all_steps():
        ckpt.close()
        raise GPT2JaxError(f"{run_dir}: no complete checkpoint in {checkpoint_dir(run_dir)}")
    return config, ckpt


def newest_good(run_dir: str, ckpt: Checkpointer, step: Optional[int], use: Callable[[int], T]) -> T:
    """`use(step)`, or without `step`, `use` of the newest step it succeeds on: a step that raises
    CorruptCheckpoint is skipped with one warning. Only when none succeeds does it raise, one line."""
    steps = sorted(ckpt.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise GPT2JaxError(f"{run_dir}: no checkpoint of step {step}; there are: {', '.join(map(str, sorted(steps)))}")
        try:
            return use(step)
        except CorruptCheckpoint as e:
            raise GPT2JaxError(f"{run_dir}: checkpoint step {step} is damaged: {e}") from None
    reasons = []
    for s in steps:
        try:
            return use(s)
        except CorruptCheckpoint as e:
            log.warning(f"{run_dir}: checkpoint step {s} skipped: {e}")
            reasons.append(f"step {s}: {e}")
    raise GPT2JaxError(f"{run_dir}: no checkpoint verifies ({'; '.join(reasons)})")


def run_params(run_dir: str, *, step: Optional[int] = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, flat parameters on the host) of a run directory's checkpoint (`step`, default the newest
    that verifies)."""
    config, ckpt = open_run(run_dir)
    try:  # a LoRA run's checkpoint: its base, verified, with the adapters merged in
        flat = newest_good(run_dir, ckpt, step,
                           lambda s: merged_run_params(ckpt.restore_params(s), ckpt.meta(s), config, run_dir))
    finally:
        ckpt.close()
    missing = sorted(set(param_shapes(config)) - set(flat))
    if missing:
        raise GPT2JaxError(f"{run_dir}: its checkpoint lacks {missing[0]} (model_config.json mismatch?)")
    return config, flat


def load_run(run_dir: str, *, step: Optional[int] = None, dtype: Optional[str] = None,
             seed: int = 0) -> GPT2LMHeadModel:
    """The model of a run directory's checkpoint (`step`, default the newest that verifies), in eval mode."""
    config, flat = run_params(run_dir, step=step)
    return model_from_params(_with_dtype(config, dtype), flat, seed=seed)


def export_run(run_dir: str, out_dir: str, *, step: Optional[int] = None) -> str:
    """Write a run's checkpoint (`step`, default the newest that verifies) as a Hugging Face directory
    (hf.write_pretrained with the run's tokenizer), restoring and verifying one parameter at a time: host
    memory holds one tensor, never the model or optimiser state."""
    config, ckpt = open_run(run_dir)
    tok_dir = os.path.join(run_dir, "tokenizer")
    tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    expected = set(param_shapes(config))

    def export(s: int) -> str:
        shapes, read = ckpt.param_reader(s)
        if any(is_adapter(k) for k in shapes):  # LoRA: the base (verified) with the adapters merged in
            flat = merged_run_params(ckpt.restore_params(s), ckpt.meta(s), config, run_dir)
            shapes, read = {k: (v.shape, v.dtype) for k, v in flat.items()}, flat.__getitem__
        if expected != set(shapes):
            odd = sorted(expected ^ set(shapes))[0]
            raise GPT2JaxError(f"{run_dir}: checkpoint of step {s} and model_config.json disagree on {odd}")
        return write_pretrained(config, shapes, read, out_dir, tokenizer, generation=_sampling_defaults(run_dir))

    try:
        return newest_good(run_dir, ckpt, step, export)
    finally:
        ckpt.close()


def export_adapter(run_dir: str, out_dir: str, *, step: Optional[int] = None) -> str:
    """Write a LoRA run's adapters (checkpoint `step`, default the newest that verifies) as a PEFT adapter
    directory for its base, model.init_from (adapter_config.json names it). A run whose checkpoint trains
    more than adapters (freeze.trainable), or whose base is a random initialisation, is refused in one line:
    the adapter alone would not be the model."""
    config, ckpt = open_run(run_dir)

    def export(s: int) -> str:
        meta = ckpt.meta(s)
        lora = lora_base.run_lora(meta)
        if not lora.rank:
            raise GPT2JaxError(f"{run_dir}: not a LoRA run (lora.rank is 0): there is no adapter to export; "
                               f"export the model without --adapter-only")
        shapes, read = ckpt.param_reader(s)
        others = sorted(k for k in shapes if not is_adapter(k))
        if others:
            raise GPT2JaxError(f"{run_dir}: the run trained {others[0]} beside the adapters (freeze.trainable): "
                               f"an adapter alone would lose it; export the merged model without --adapter-only")
        base = (meta.get(lora_base.BASE) or {}).get("init_from")
        if base is None:
            raise GPT2JaxError(f"{run_dir}: its base is a random initialisation (model.init_from was null), which "
                               f"PEFT cannot load an adapter onto; export the merged model without --adapter-only")
        if os.path.isdir(base) and load_hf_config(base).vocab_size < config.vocab_size:
            log.warning(f"the run grew {base}'s vocabulary to {config.vocab_size} tokens (its tokenizer's special "
                        f"tokens): with PEFT, resize the base's embeddings to match before loading the adapter")
        return write_adapter(out_dir, config, lora, {k: read(k) for k in shapes}, base_name=base)

    try:
        return newest_good(run_dir, ckpt, step, export)
    finally:
        ckpt.close()


def _sampling_defaults(run_dir: str) -> Optional[dict]:
    """The run's `sample` settings in transformers' GenerationConfig names, from the config.yaml the run
    wrote (every key resolved, validated when the run started)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        sample = (yaml.safe_load(f) or {}).get("sample") or {}
    keys = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
    return {"do_sample": True, **{k: sample[k] for k in keys if k in sample}}


def _with_dtype(config: ModelConfig, dtype: Optional[str]) -> ModelConfig:
    return config if dtype is None else config.replace(dtype=str(dtype), param_dtype=str(dtype))
