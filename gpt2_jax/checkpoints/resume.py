"""A run continued from its checkpoints: what a resumed run may change, the newest step that verifies, and
the earlier run's checkpoints set aside (checkpoint.resume=false) until the new run has one of its own.

Each checkpoint's meta holds the run that wrote it: `config` (TrainConfig.to_dict()), `model` (the model
config, as config.json plus dtype and param_dtype) and `tokenizer` (size, special ids). A resumption
compares them with the resuming run's: `RESUMABLE_CHANGES` is the one list of what may differ.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import jax

from gpt2_jax import sharding
from gpt2_jax.checkpoints.orbax import Checkpointer, CorruptCheckpoint, checkpoint_dir
from gpt2_jax.errors import GPT2JaxError

log = logging.getLogger(__name__)

# What may change between a run and its resumption: config keys (a trailing "." takes a whole section), each
# with the fields of the saved model config it sets. None of them touches the state's layout, the tokenizer
# or the order of the data. Any other change, to the config, the model or the tokenizer, is refused.
RESUMABLE_CHANGES: dict[str, tuple[str, ...]] = {
    "train.steps": (), "train.eval_every": (), "train.eval_batches": (), "train.log_every": (),
    "train.peak_flops": (), "train.out_dir": (), "checkpoint.": (), "sample.": (), "mesh.": (),
    "data.cache_dir": (), "optim.": (), "model.remat": (), "model.loss_chunk": (),
    "model.dropout": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "model.dtype": ("dtype",),
    "lora.dropout": (), "lora.init_from": (),  # the adapters' layout is rank and targets; a resume restores them
}
_RESUMABLE_KEYS = tuple(RESUMABLE_CHANGES)
_RESUMABLE_MODEL_FIELDS = frozenset(f for fields in RESUMABLE_CHANGES.values() for f in fields)


def resume_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(changes that stop a resumption, harmless changes) from a checkpoint's meta `saved` to the resuming
    run's meta `current`, each as "key: old -> new". Config keys are dotted (`optim.lr`). The model's and the
    tokenizer's fields ("the model's n_layer") are compared only when the config allows the resumption:
    they then differ through what the config does not name (model.init_from's files, the tokenizer)."""
    breaking, harmless = [], []
    for key, old, new in _differences(_flat(saved.get("config") or {}), _flat(current.get("config") or {})):
        (harmless if key.startswith(_RESUMABLE_KEYS) else breaking).append(f"{key}: {old!r} -> {new!r}")
    if breaking:
        return breaking, harmless
    for part in ("model", "tokenizer"):
        for key, old, new in _differences(saved.get(part) or {}, current.get(part) or {}):
            if not (part == "model" and key in _RESUMABLE_MODEL_FIELDS):
                breaking.append(f"the {part}'s {key}: {old!r} -> {new!r}")
    return breaking, harmless


def _flat(config: dict) -> dict:
    """{section: {key: value}} -> {"section.key": value}."""
    return {f"{section}.{key}": v for section, keys in config.items() for key, v in (keys or {}).items()}


def _differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """(key, a's value, b's value) for each key whose value differs, in key order."""
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_resumable(saved: dict, current: dict, run_dir: str) -> list[str]:
    """Raise if the run changed in a way its checkpoint (meta `saved`) cannot continue from; return the
    harmless changes."""
    breaking, harmless = resume_changes(saved, current)
    if breaking:
        raise GPT2JaxError(f"cannot resume {run_dir}: the run changed in a way its checkpoint cannot continue "
                           f"from ({'; '.join(breaking)}); use another train.out_dir, or checkpoint.resume=false "
                           f"to start over")
    return harmless


def resume_state(ckpt: Checkpointer, run_dir: str, target, meta: dict):
    """The state of the newest checkpoint that verifies, restored straight onto `target` (the abstract
    state with its shardings), if the run (its meta `meta`) may continue from it. Damaged newer steps are
    reported and set aside (RUN_DIR/corrupt-checkpoints/)."""
    damaged = []
    leader = jax.process_index() == 0
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            harmless = check_resumable(ckpt.meta(step), meta, run_dir)
            restored = ckpt.restore(step, target)
        except CorruptCheckpoint as e:
            if leader:
                log.warning(f"checkpoint step {step} of {run_dir} skipped: {e}")
            damaged.append(step)
            continue
        if damaged:
            ckpt.set_aside(damaged, run_dir)
            if leader:
                log.info(f"moved the damaged step(s) {', '.join(map(str, damaged))} to "
                         f"{run_dir}/corrupt-checkpoints/")
        if leader:
            log.info(f"resumed from step {step} of {run_dir}"
                     + (f" (changed: {'; '.join(harmless)})" if harmless else ""))
        return restored
    raise GPT2JaxError(f"cannot resume {run_dir}: no checkpoint verifies (steps {', '.join(map(str, damaged))}); "
                       f"checkpoint.resume=false starts over (the damaged steps are kept until it saves)")


def set_aside_replaced(run_dir: str) -> bool:
    """checkpoint.resume=false: move the earlier run's checkpoints aside, to be deleted by `drop_replaced`
    once this run has saved one (a run killed before then leaves them, and a resuming run takes them back:
    `restore_replaced`). Whether there are earlier checkpoints (these, or some set aside before) to drop."""
    old = checkpoint_dir(run_dir)
    present = os.path.isdir(old)
    earlier = bool(_set_asides(run_dir))
    sharding.sync("replace_checkpoints_seen")  # every process has looked before process 0 moves them
    if present and jax.process_index() == 0:
        aside = f"{old}{_REPLACED}{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(old, aside)
        log.info(f"checkpoint.resume=false: moved the earlier checkpoints of {run_dir} aside to {aside}; they are "
                 f"deleted once this run has written its first checkpoint")
    sharding.sync("replace_checkpoints")
    return present or earlier


def restore_replaced(run_dir: str) -> None:
    """checkpoint.resume=true in a run directory with no checkpoint of its own but the earlier checkpoints an
    interrupted checkpoint.resume=false run set aside: move them back (one line), to resume from."""
    current = checkpoint_dir(run_dir)
    if jax.process_index() == 0 and not _has_step(current):
        usable = [a for a in _set_asides(run_dir) if _has_step(a)]
        if usable:
            shutil.rmtree(current, ignore_errors=True)  # at most the temporary directory of an unfinished save
            os.replace(usable[0], current)
            log.info(f"{run_dir} had no checkpoint of its own but those an interrupted checkpoint.resume=false run "
                     f"set aside: moved {usable[0]} back to {current}, to resume from")
    sharding.sync("restore_replaced")


def drop_replaced(run_dir: str) -> None:
    """Delete the checkpoints that `set_aside_replaced` moved aside, now that the run has one of its own."""
    if jax.process_index() == 0:
        for aside in _set_asides(run_dir):
            shutil.rmtree(aside, ignore_errors=True)


_REPLACED = ".replaced-"  # checkpoints/ set aside: checkpoints.replaced-YYYYmmdd-HHMMSS


def _set_asides(run_dir: str) -> list[str]:
    """The checkpoint directories `set_aside_replaced` moved aside, newest first."""
    parent, name = os.path.split(checkpoint_dir(run_dir))
    if not os.path.isdir(parent):
        return []
    return sorted((os.path.join(parent, e) for e in os.listdir(parent) if e.startswith(name + _REPLACED)),
                  reverse=True)


def _has_step(directory: str) -> bool:
    """Whether a checkpoint directory holds a complete step (Orbax names an unfinished one <step>.orbax-...)."""
    return os.path.isdir(directory) and any(e.isdigit() for e in os.listdir(directory))
