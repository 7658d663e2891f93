"""Orbax checkpoints of a training run, and nothing else: `RUN_DIR/checkpoints/<step>/{state, meta}`.

`state` is the whole TrainState (step, trainable and frozen parameters, optimiser state, dropout RNG);
`meta` is JSON: the resolved training config, the model config, the tokenizer, the data position (the step:
batches are a pure function of the step, data/batches.py) and a checksum of every array. Orbax writes each
checkpoint into a temporary directory and renames it when complete, so a process killed mid-save leaves
nothing that `latest_step` picks up. Restoring targets the current mesh's shardings, whatever mesh wrote the
checkpoint. What a resumed run may change, and the step it resumes from, are checkpoints/resume.py's.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gpt2_jax import sharding
from gpt2_jax.errors import GPT2JaxError, first_line

CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(run_dir: str) -> str:
    """Where a run directory's checkpoints are: RUN_DIR/checkpoints/ (absolute)."""
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
        """Start an asynchronous save of `state` (arrays are copied first, so training may go on). The
        checksum of every array goes into `meta`, so that a restore can tell a damaged step."""
        if step in self.manager.all_steps():
            return
        tree = dict(state._asdict())
        meta = {**meta, CHECKSUMS: {k: int(sharding.local_value(v)) for k, v in _checksums(tree).items()}}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def meta(self, step: int) -> dict:
        """The JSON saved with `step`; a step without it, or with it unreadable, raises CorruptCheckpoint."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # Orbax raises KeyError, JSONDecodeError, FileNotFoundError, ... for a damaged step
            raise CorruptCheckpoint(f"its meta is unreadable ({first_line(e)})") from None
        if not isinstance(meta, dict):
            raise CorruptCheckpoint("its meta is not a JSON object")
        return meta

    def restore(self, step: int, target: Any) -> Any:
        """The state of `step`, laid out as `target` (a pytree of jax.ShapeDtypeStruct with shardings),
        verified against its checksums; a damaged step raises CorruptCheckpoint."""
        want = self.meta(step).get(CHECKSUMS, {})
        try:
            with _loops_finish_their_tasks():
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(dict(target._asdict()))))["state"]
        except Exception as e:
            raise CorruptCheckpoint(f"its state is unreadable ({first_line(e)})") from None
        got = {k: int(sharding.local_value(v)) for k, v in _checksums(out).items()}
        _verify(got, want)
        if not bool(sharding.local_value(_all_finite({"params": out["params"], "frozen": out["frozen"]}))):
            raise CorruptCheckpoint("its parameters are not all finite")
        return type(target)(**out)

    def restore_params(self, step: int) -> dict:
        """Only the parameters of `step` (trainable and frozen, no optimiser state), as verified host numpy
        arrays, in one restore. Needs a read-only Checkpointer."""
        shapes, read = self._param_reader(step)
        return read(list(shapes))

    def param_reader(self, step: int) -> tuple[dict[str, tuple], Callable[[str], np.ndarray]]:
        """({key: (shape, dtype)}, read(key)) over the parameters of `step`: `read` restores that one
        tensor, to host memory, from whatever mesh wrote it, and checks its checksum and that it is finite
        (CorruptCheckpoint otherwise). Needs a read-only Checkpointer."""
        shapes, read = self._param_reader(step)
        return shapes, lambda key: read([key])[key]

    def _param_reader(self, step: int) -> tuple[dict[str, tuple], Callable[[list[str]], dict[str, np.ndarray]]]:
        """({key: (shape, dtype)}, read(keys) -> {key: verified host array}) over the parameters of `step`."""
        want = self.meta(step).get(CHECKSUMS, {})
        try:
            tree = self.manager.item_metadata(step)["state"]
            where = {k: part for part in ("params", "frozen") for k in (tree[part] or {})}  # LoRA: no frozen
        except Exception as e:
            raise CorruptCheckpoint(f"its state is unreadable ({first_line(e)})") from None
        shapes = {k: (tuple(tree[part][k].shape), np.dtype(tree[part][k].dtype)) for k, part in where.items()}

        def read(keys: list[str]) -> dict[str, np.ndarray]:
            item: dict = {}
            for key in keys:
                item.setdefault(where[key], {})[key] = jax.ShapeDtypeStruct(*shapes[key])
            try:
                out = self._restore_to_host(step, item)
            except Exception as e:
                what = f"{keys[0]} is" if len(keys) == 1 else "parameters are"
                raise CorruptCheckpoint(f"its {what} unreadable ({first_line(e)})") from None
            values = {}
            for key in keys:
                value = values[key] = out[where[key]][key]
                name = jax.tree_util.keystr((jax.tree_util.DictKey(where[key]), jax.tree_util.DictKey(key)))
                _verify({name: host_checksum(value)}, want)
                if not np.isfinite(value).all():
                    raise CorruptCheckpoint(f"its {key} is not all finite")
            return values

        return shapes, read

    def _restore_to_host(self, step: int, item: dict) -> dict:
        """The part of the state of `step` that `item` names (a subtree of ShapeDtypeStructs), as numpy."""
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        with _loops_finish_their_tasks():
            return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True)))["state"]

    def set_aside(self, steps: list[int], run_dir: str) -> None:
        """Move damaged steps out of the checkpoint directory (to RUN_DIR/corrupt-checkpoints/), so that the
        run can write those steps again; nothing is deleted."""
        if jax.process_index() == 0:
            aside = os.path.join(os.path.abspath(run_dir), "corrupt-checkpoints")
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                src = os.path.join(checkpoint_dir(run_dir), str(step))
                if os.path.exists(src):
                    os.replace(src, os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
        sharding.sync("set_aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _TidyLoop(asyncio.SelectorEventLoop):
    """An event loop that, closed, first lets its pending tasks finish (for at most a minute)."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if pending:
                self.run_until_complete(asyncio.wait(pending, timeout=60))
        super().close()


class _TidyLoops(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _TidyLoop()


@contextlib.contextmanager
def _loops_finish_their_tasks():
    """Orbax runs a restore in a new event loop that it closes as soon as the restore returns or raises
    (asyncio_utils.run_sync, without asyncio.run's cancelling of what is left): a failed read leaves the other
    reads' tasks pending, and TensorStore, completing them later, calls into the closed loop from its threads,
    each printing a traceback ("RuntimeError: Event loop is closed"). In this block, a new loop finishes its
    pending tasks before it closes."""
    policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_TidyLoops())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(policy)


class CorruptCheckpoint(GPT2JaxError):
    """A checkpoint step that is incomplete, unreadable or fails its checksums."""


CHECKSUMS = "checksums"  # meta key: {array path: checksum} of the saved state


def array_checksum(x: jax.Array) -> jax.Array:
    """uint32 sum of every 32-bit (or narrower) word of `x` times an odd weight from its flat position: any
    changed bit changes it. Computed where the array lives (sharded arrays stay sharded)."""
    words = _words(x, jnp)
    flat = sum(jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * np.uint32(math.prod(x.shape[d + 1:]))
               for d in range(x.ndim)) if x.ndim else jnp.uint32(0)
    return jnp.sum(words * (flat * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


def host_checksum(x: np.ndarray) -> int:
    """`array_checksum` of a host array, with the same wrap-around arithmetic."""
    words = _words(np.asarray(x), np).reshape(-1)
    return int(np.sum(words * (np.arange(words.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)),
                      dtype=np.uint32))


def _words(x, xp):
    """`x`'s bits as uint32 words: 4-byte types bit for bit, narrower ones zero-extended."""
    size = np.dtype(x.dtype).itemsize if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else 4
    view = {4: xp.uint32, 2: xp.uint16, 1: xp.uint8}.get(size)
    if view is None:
        raise GPT2JaxError(f"cannot checksum an array of {x.dtype}")
    if xp is jnp:
        return jax.lax.bitcast_convert_type(x, view).astype(jnp.uint32) if x.dtype != jnp.bool_ else \
            x.astype(jnp.uint32)
    return (x.view(view) if x.dtype != np.bool_ else x.astype(np.uint8)).astype(np.uint32)


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@jax.jit
def _checksum_tree(tree):
    return jax.tree.map(array_checksum, tree)


def _checksums(tree: dict) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_leaves_with_path(_checksum_tree(tree))
    return {jax.tree_util.keystr(path): v for path, v in leaves}


def _verify(got: dict[str, int], want: dict[str, int]) -> None:
    """Raise if a checksum differs from the saved one (checkpoints written before checksums have none)."""
    if not want:
        return
    for name, value in got.items():
        if want.get(name) != value:
            raise CorruptCheckpoint(f"{name} fails its checksum ({value} != {want.get(name)})")

