"""A LoRA run's state around the loop: its checkpoints hold the adapters, whatever else trains and their
optimiser state, not the frozen base, which checkpoints/lora_base.py names and checks; on resume the base is
rebuilt onto its shardings and verified; for sampling the adapters are merged into the kernels once."""
from __future__ import annotations

from functools import partial

import jax

from gpt2_jax.checkpoints import lora_base
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.lora import merge_adapters
from gpt2_jax.train.config import TrainConfig
from gpt2_jax.train.step import Setup, TrainState


def saved(cfg: TrainConfig, state: TrainState) -> TrainState:
    """What a checkpoint holds of `state` (or of the abstract state, the restore target): all of it, or
    without the frozen base in a LoRA run."""
    return state._replace(frozen={}) if cfg.lora.rank else state


def base_record(cfg: TrainConfig, state: TrainState) -> dict:
    """The meta record that names a new run's base: model.init_from (or the seed) and its checksum."""
    return lora_base.record(cfg.model.init_from, cfg.train.seed, lora_base.device_digest(state.frozen))


def with_base(cfg: TrainConfig, setup: Setup, model_config: ModelConfig, state: TrainState,
              record: dict) -> TrainState:
    """A restored LoRA state (no frozen part) with its base rebuilt from model.init_from (or the seed) onto
    the frozen parameters' shardings, checked against the checkpoint's `record`: a changed base is one line."""
    base = lora_base.base_params(cfg.model.init_from, model_config, cfg.train.seed)
    shardings = setup.state_shardings.frozen
    frozen = {k: jax.device_put(base[k], shardings[k]) for k in shardings}
    del base
    lora_base.check(record, lora_base.device_digest(frozen), f"cannot resume {cfg.train.out_dir}")
    return state._replace(frozen=frozen)


@partial(jax.jit, static_argnums=1)
def merged(flat: dict, lora) -> dict:
    """`flat` with `lora`'s adapters folded into their kernels (model.lora.merge_adapters), on device."""
    return merge_adapters(flat, lora)
