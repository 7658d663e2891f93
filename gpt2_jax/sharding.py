"""The device mesh, the logical-to-mesh rules, the shardings of parameters and batches, and multi-process
start-up.

The mesh has two axes: `data` (batch split, parameters replicated) and `fsdp` (batch split, parameters and
optimiser state split too). Parameters carry logical axis names (model/gpt2.py; model/layout.py collects them
per key); `RULES` maps them to mesh axes. Code that runs on the mesh uses these names, BATCH_AXES and RULES
where it lives: the model pins its activations to the batch split (model/gpt2.py, `Execution`), and the Pallas
attention kernel (model/attention.py) and the chunked loss (train/loss.py) run per device under shard_map.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.runtime import has_tpu_devices

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # a batch's example dimension is split over every mesh axis
# Logical axis -> mesh axis. FSDP splits every matrix along its model-width ("embed") dimension; the other
# logical axes stay whole, so each device holds a 1/fsdp slice of every tensor that has an embed axis.
RULES: dict[str, Optional[str]] = {"embed": "fsdp", "vocab": None, "heads": None, "mlp": None}


def initialize_distributed(num_processes: Optional[int] = None, process_id: Optional[int] = None,
                           coordinator_address: Optional[str] = None) -> None:
    """`jax.distributed.initialize` when the arguments or the environment say there are several processes.

    Explicit arguments (mesh.num_processes, ...) win; otherwise JAX's own detection (TPU pods, SLURM,
    Open MPI) runs when a cluster environment is visible. A single process does nothing.
    """
    if jax.distributed.is_initialized():
        return
    if num_processes is not None and num_processes > 1:
        if coordinator_address is None or process_id is None:
            raise GPT2JaxError("mesh.num_processes > 1 needs mesh.coordinator_address (host:port of process 0) "
                               "and mesh.process_id")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif num_processes is None and _cluster_environment():
        jax.distributed.initialize()


def _cluster_environment() -> bool:
    # A Cloud TPU VM (its chips are /dev/accel* or VFIO devices; JAX then reads the slice's hosts from the
    # metadata server, and a single-host VM initialises as one process), SLURM with several tasks, Open MPI.
    tpu_vm = has_tpu_devices() or "TPU_WORKER_HOSTNAMES" in os.environ
    return (tpu_vm or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 or "OMPI_COMM_WORLD_SIZE" in os.environ)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Optional[list] = None) -> Mesh:
    """A `(data, fsdp)` mesh over all devices; one size may be -1 for "the rest"."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise GPT2JaxError("mesh.data and mesh.fsdp cannot both be -1")
    if -1 in sizes:
        other = sizes[1 - sizes.index(-1)]
        if n % other:
            raise GPT2JaxError(f"{n} devices cannot be split into mesh axes of size {other} and the rest")
        sizes[sizes.index(-1)] = n // other
    if sizes[0] * sizes[1] != n:
        raise GPT2JaxError(f"mesh.data={sizes[0]} × mesh.fsdp={sizes[1]} = {sizes[0] * sizes[1]} devices, "
                           f"but there are {n} ({devices[0].platform})")
    # Auto axes: XLA's sharding propagation places the activations; only inputs and state are pinned.
    return jax.make_mesh(tuple(sizes), AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def spec_for(logical: Optional[tuple], shape: tuple, mesh: Mesh, name: str = "a tensor") -> P:
    """The PartitionSpec of a tensor of `shape` whose dimensions have the logical axis names `logical`.

    Two dimensions mapped to one mesh axis, or a dimension that its mesh axis does not divide, raise:
    silently keeping such a dimension whole would replicate it on every device."""
    if not logical:
        return P()
    used, spec = {}, []
    for i, (logical_name, dim) in enumerate(zip(logical, shape)):
        axis = RULES[logical_name] if logical_name is not None else None
        if axis is not None:
            if axis in used:
                raise GPT2JaxError(f"{name}: dimensions {used[axis]} and {i} ({logical[used[axis]]!r}, "
                                   f"{logical_name!r}) both map to mesh axis {axis!r}; one mesh axis shards one "
                                   f"dimension (sharding.RULES)")
            if dim % mesh.shape[axis]:
                raise GPT2JaxError(f"{name}: dimension {i} ({logical_name!r}, size {dim}) does not divide over mesh "
                                   f"axis {axis!r} of size {mesh.shape[axis]}; choose a mesh.{axis} that divides {dim}")
            used[axis] = i
        spec.append(axis)
    return P(*spec)


def named_shardings(logical_axes: dict[str, Any], shapes: dict[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """NamedShardings for flat dicts of parameters given their logical names and shapes."""
    return {k: NamedSharding(mesh, spec_for(logical_axes[k], tuple(shapes[k].shape), mesh, k)) for k in shapes}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are [micro-batches, examples, time]: the example dimension is split over every mesh axis."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def data_parallel_size(mesh: Mesh) -> int:
    """How many shards a batch's example dimension is split into: the product of the BATCH_AXES sizes."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's rows of a batch into global arrays sharded by `batch_sharding`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def local_value(x: jax.Array) -> np.ndarray:
    """A replicated (or single-process) array's value on this host, without cross-process communication."""
    return np.asarray(x) if x.is_fully_addressable else np.asarray(x.addressable_data(0))


def host_values(tree: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """{key: numpy array} of sharded arrays, gathered one tensor at a time (every process must call this)."""
    return {k: local_value(v) if v.is_fully_addressable or v.is_fully_replicated else
            np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in tree.items()}


def sync(name: str) -> None:
    """A barrier across processes (nothing in a single process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
