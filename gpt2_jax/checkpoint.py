"""Orbax checkpoints of a training run: `RUN_DIR/checkpoints/<step>/{state, meta}`.

`state` is the whole TrainState (step, trainable and frozen parameters, optimiser state, dropout RNG);
`meta` is JSON: the resolved training config, the model config and the data position (the step: batches
are a pure function of the step, data.py). Orbax writes each checkpoint into a temporary directory and
renames it when complete, so a process killed mid-save leaves nothing that `latest_step` picks up.
Restoring targets the current mesh's shardings, whatever mesh wrote the checkpoint.
"""
from __future__ import annotations

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
        options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=not read_only,
                                               read_only=read_only, enable_async_checkpointing=True,
                                               cleanup_tmp_directories=not read_only)
        if read_only:  # readers restore parts of the state (parameters only), which the PyTree handler allows
            handlers = {"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
            self.manager = ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, item_handlers=handlers)
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


def abstract_target(state: Any) -> Any:
    """ShapeDtypeStructs with the shardings of `state` (a live or abstract state on the current mesh)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


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


def is_run_dir(path: str) -> bool:
    """A training run's output directory (train.out_dir): model_config.json beside checkpoints/."""
    return os.path.isdir(checkpoint_dir(path)) and os.path.isfile(os.path.join(path, "model_config.json"))


def open_run(run_dir: str, step: Optional[int] = None) -> tuple[Any, "Checkpointer", int]:
    """(ModelConfig, read-only Checkpointer, step) of a run directory; `step` defaults to the latest
    complete checkpoint. The caller closes the Checkpointer."""
    from gpt2_jax.config import ModelConfig

    config = ModelConfig.from_json(os.path.join(run_dir, "model_config.json"))
    ckpt = Checkpointer(run_dir, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        ckpt.close()
        raise GPT2JaxError(f"{run_dir}: no complete checkpoint in {checkpoint_dir(run_dir)}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        ckpt.close()
        raise GPT2JaxError(f"{run_dir}: no checkpoint of step {step}; there are: {', '.join(map(str, sorted(steps)))}")
    return config, ckpt, step


def load_run(run_dir: str, *, step: Optional[int] = None, dtype: Optional[str] = None, seed: int = 0):
    """The model of a run directory's checkpoint (`step`, default the latest complete one), in eval mode."""
    from gpt2_jax.model import model_from_params

    config, ckpt, step = open_run(run_dir, step)
    if dtype is not None:
        config = config.replace(dtype=str(dtype), param_dtype=str(dtype))
    flat = ckpt.restore_params(step)
    ckpt.close()
    paths = _param_keys(config)
    missing = sorted(set(paths) - set(flat))
    if missing:
        raise GPT2JaxError(f"{run_dir}: checkpoint of step {step} lacks {missing[0]} (model_config.json mismatch?)")
    return model_from_params(config, {paths[k]: flat[k] for k in paths}, seed=seed)


def export_run(run_dir: str, out_dir: str, *, step: Optional[int] = None) -> str:
    """Write a run's checkpoint as a Hugging Face directory (hf.write_pretrained with the run's tokenizer),
    restoring one parameter at a time: host memory holds one tensor, never the model or optimiser state."""
    from gpt2_jax.hf import write_pretrained
    from gpt2_jax.model import path_key
    from gpt2_jax.tokenizer import load_tokenizer

    config, ckpt, step = open_run(run_dir, step)
    try:
        shapes, read = ckpt.param_reader(step)
        paths = _param_keys(config)
        if set(paths) != set(shapes):
            odd = sorted(set(paths) ^ set(shapes))[0]
            raise GPT2JaxError(f"{run_dir}: checkpoint of step {step} and model_config.json disagree on {odd}")
        tok_dir = os.path.join(run_dir, "tokenizer")
        tokenizer = load_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
        return write_pretrained(config, {paths[k]: v for k, v in shapes.items()},
                                lambda p: read(path_key(p)), out_dir, tokenizer)
    finally:
        ckpt.close()


def _param_keys(config) -> dict[str, tuple]:
    """{flat key: parameter path} of every parameter of `config`."""
    from gpt2_jax.model import param_shapes, path_key

    return {path_key(p): p for p in param_shapes(config)}
