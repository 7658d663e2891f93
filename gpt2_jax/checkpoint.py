"""Orbax checkpoints of a training run, and nothing else: `RUN_DIR/checkpoints/<step>/{state, meta}`.

`state` is the whole TrainState (step, trainable and frozen parameters, optimiser state, dropout RNG);
`meta` is JSON: the resolved training config, the model config and the data position (the step: batches
are a pure function of the step, data.py). Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a process killed mid-save leaves nothing that `latest_step` picks up.
Restoring targets the current mesh's shardings, whatever mesh wrote the checkpoint.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gpt2_jax.errors import GPT2JaxError

CHECKPOINT_DIR = "checkpoints"
# Config keys that may change between a run and its resumption: they do not touch the state's layout,
# the tokenizer or the order of the data. Any other change is refused.
RESUMABLE_CHANGES = ("train.steps", "train.eval_every", "train.eval_batches", "train.log_every",
                     "train.peak_flops", "train.out_dir", "checkpoint.", "sample.", "mesh.", "data.cache_dir",
                     "model.dropout", "model.dtype", "optim.")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR)


class Checkpointer:
    """Saves every `every` steps (and when asked), keeps the last `keep`, restores into a sharded target."""

    def __init__(self, run_dir: str, *, every: int = 0, keep: int = 3, read_only: bool = False):
        self.every = every
        # A reader is this process alone (the end-of-run export runs on process 0 only); a writer is every
        # process of the job, which Orbax synchronises.
        me = jax.process_index()
        multiprocessing = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}) \
            if read_only else ocp.options.MultiprocessingOptions()
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else keep or None,
                                               save_interval_steps=0 if read_only else 1, create=not read_only,
                                               read_only=read_only, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=not read_only,
                                               multiprocessing_options=multiprocessing)
        if read_only:  # readers restore parts of the state (parameters only), which the PyTree handler allows
            handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
            absl, level = logging.getLogger("absl"), logging.getLogger("absl").level
            absl.setLevel(logging.ERROR)  # Orbax warns "Given directory is read only": what a reader asked for
            try:
                self.manager = ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, item_handlers=handlers)
            finally:
                absl.setLevel(level)
        else:
            self.manager = ocp.CheckpointManager(checkpoint_dir(run_dir), options=options,
                                                 item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Start an asynchronous save of `state` (arrays are copied first, so training may go on)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(dict(state._asdict())),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: Any) -> Any:
        """The state of `step`, laid out as `target` (a pytree of jax.ShapeDtypeStruct with shardings)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(dict(target._asdict()))))
        return type(target)(**out["state"])

    def restore_params(self, step: int) -> dict:
        """Only the parameters of `step` (trainable and frozen, no optimiser state), as host numpy arrays.

        Needs a read-only Checkpointer."""
        tree = self.manager.item_metadata(step)["state"]
        out = self._restore_to_host(step, {part: {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                                  for k, v in tree[part].items()} for part in ("params", "frozen")})
        return {**out["params"], **out["frozen"]}

    def param_reader(self, step: int) -> tuple[dict[str, tuple], Callable[[str], np.ndarray]]:
        """({path: (shape, dtype)}, read(path)) over the parameters of `step`: `read` restores that one
        tensor, to host memory, from whatever mesh wrote it. Needs a read-only Checkpointer."""
        tree = self.manager.item_metadata(step)["state"]
        where = {k: part for part in ("params", "frozen") for k in tree[part]}
        shapes = {k: (tuple(tree[part][k].shape), np.dtype(tree[part][k].dtype)) for k, part in where.items()}

        def read(key: str) -> np.ndarray:
            part = where[key]
            return self._restore_to_host(step, {part: {key: jax.ShapeDtypeStruct(*shapes[key])}})[part][key]

        return shapes, read

    def _restore_to_host(self, step: int, item: dict) -> dict:
        """The part of the state of `step` that `item` names (a subtree of ShapeDtypeStructs), as numpy."""
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(changes that break resumption, harmless changes) between two TrainConfig.to_dict()s, as dotted keys."""
    breaking, harmless = [], []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                dotted = f"{section}.{key}"
                (harmless if dotted.startswith(RESUMABLE_CHANGES) else breaking).append(
                    f"{dotted}: {a.get(key)!r} -> {b.get(key)!r}")
    return breaking, harmless


def check_resumable(saved: dict, current: dict, run_dir: str) -> list[str]:
    """Raise if the config changed in a way the checkpoint cannot continue from; return the harmless changes."""
    breaking, harmless = config_changes(saved, current)
    if breaking:
        raise GPT2JaxError(f"cannot resume {run_dir}: the config changed in a way its checkpoint cannot continue "
                           f"from ({'; '.join(breaking)}); use another train.out_dir, or checkpoint.resume=false "
                           f"to start over")
    return harmless
