"""TPU slices on any machine: a topology's compile-only devices (libtpu, no TPU needed) and each chip's
public HBM, peak-compute and bandwidth figures."""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from typing import Iterator, NamedTuple

from jax.experimental import topologies

from gpt2_jax.errors import GPT2JaxError, first_line


class Chip(NamedTuple):
    name: str
    hbm_bytes: float  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip


GiB = 2 ** 30
# Google's public per-chip figures (https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: "System
# architecture" tables: HBM capacity, peak bf16 compute, HBM bandwidth). Keyed by jax's `device.device_kind`.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5e": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9),
    "TPU v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}


def chip_of(device) -> Chip:
    kind = device.device_kind
    if kind not in CHIPS:
        raise GPT2JaxError(f"no HBM / peak figures for TPU kind {kind!r}; known: {', '.join(sorted(CHIPS))}")
    return CHIPS[kind]


# --- the slice --------------------------------------------------------------------------------------

def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU topology such as "v5e:4x4", one per chip."""
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the chips it drives; compiling drives none,
    # so several compiling processes (tests, another bench) may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # The partitioner's involuntary-rematerialization line is a WARNING, which libtpu keeps off stderr by
    # default (ERROR and up); it reads these when it loads.
    for var in ("TPU_MIN_LOG_LEVEL", "TPU_STDERR_LOG_LEVEL"):
        os.environ[var] = str(min(int(os.environ.get(var) or 1), 1))
    dims = re.fullmatch(r"[^:]+:([0-9x]+)", topology)
    # A slice smaller than libtpu's default host (2x2 chips for v5e), e.g. a one-chip "v5e:1x1", is one host.
    single_host = dims is not None and math.prod(int(d) for d in dims.group(1).split("x")) < 4
    bounds = dict(chips_per_host_bounds=(1, 1, 1)) if single_host else {}
    try:
        with captured_stderr():  # libtpu logs initialisation errors about the missing TPU environment
            devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **bounds).devices)
    except RuntimeError as e:  # JaxRuntimeError is one too
        if "not installed" in str(e):
            raise GPT2JaxError('libtpu is not installed (TPU compiles need it): pip install -e ".[tpu]"') from None
        if "Invalid TPU" in str(e) or "INVALID_ARGUMENT" in str(e):
            raise GPT2JaxError(f"unknown TPU topology {topology!r} ({first_line(e)}); e.g. v5e:2x2, v5e:4x4, "
                               f"v5p:2x2x1, v6e:4x4") from None
        raise GPT2JaxError(f"libtpu could not describe topology {topology!r}: {first_line(e)}") from None
    chips = {_chip_coords(d) for d in devices}
    if len(chips) != len(devices):
        raise GPT2JaxError(f"topology {topology!r} gives {len(devices) // len(chips)} devices per chip (TPU cores "
                           f"of a {devices[0].device_kind}), which jax.make_mesh does not support; use a v5e, "
                           f"v5p or v6e topology (one device per chip)")
    return devices


def _chip_coords(device) -> tuple:
    return tuple(getattr(device, "coords", ())) + (getattr(device, "slice_index", 0),)


@contextlib.contextmanager
def captured_stderr() -> Iterator[list]:
    """Redirect file descriptor 2 (where absl/glog write, below Python) into a temporary file; the yielded
    list receives its lines on exit."""
    lines: list = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += tmp.read().decode("utf-8", "replace").splitlines()
