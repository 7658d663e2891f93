"""Process set-up for the command-line entry points (train.py, tools/): the platform JAX starts on, where
the library's log lines go, the persistent compilation cache, and one-line errors. Importing the library
changes none of these; `run_cli` does, for the process it runs.
"""
from __future__ import annotations

import glob
import importlib.metadata
import logging
import os
import pkgutil
import sys
from typing import Callable, Optional

import jax

from gpt2_jax.errors import GPT2JaxError

# A Cloud TPU VM's chips: /dev/accel* (v4 and later) or VFIO devices (v5e, v6e).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


def has_tpu_devices() -> bool:
    """Whether this machine's TPU chips are visible (a Cloud TPU VM)."""
    return any(glob.glob(g) for g in TPU_DEVICE_GLOBS)


def accelerator_plugins() -> list[str]:
    """The PJRT plugins JAX would load (CUDA, ROCm, Metal, ...), found as JAX finds them: the `jax_plugins`
    namespace package and the `jax_plugins` entry points. libtpu is not one: it is JAX's own TPU backend."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins
        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    return sorted(set(names))


def configure_platform() -> Optional[str]:
    """Start JAX on the CPU where it could only find the CPU anyway, without libtpu's noise.

    libtpu (the `tpu` extra, for compiling for TPU slices anywhere) asks the Cloud TPU metadata server for its
    slice when JAX starts, and logs errors about the TPU it cannot find on every run (and holds a lock file
    that stops a TPU compile in another process). Off a TPU VM the query is skipped; and where no other
    accelerator plugin is installed either, JAX is started on "cpu", which is what it falls back to. Any
    plugin (CUDA, ROCm, ...) or an explicit JAX_PLATFORMS leaves the choice to JAX. Returns what it set.
    """
    if has_tpu_devices():
        return None
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or accelerator_plugins():
        return None
    os.environ["JAX_PLATFORMS"] = "cpu"  # for the processes this one starts
    jax.config.update("jax_platforms", "cpu")  # JAX read the environment when it was imported
    return "cpu"


class _Lines(logging.Formatter):
    """A log record as the line a user reads: info as is, warnings and errors after their level."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {line}"


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever `sys.stderr` is when a line is written (not the stream of the moment
    it was made, which a test's capture may have closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _shown(record: logging.LogRecord) -> bool:
    return record.name.startswith("gpt2_jax") or record.levelno >= logging.WARNING


def configure_logging(level: int = logging.INFO) -> None:
    """The library's log lines (loggers "gpt2_jax.*") on stderr from `level` up, and other libraries' warnings;
    once per process.

    The handler sits on the root logger, so records still propagate (pytest's caplog sees them), and the
    root has a handler before any library logs: Python's module-level `logging.info()` (Orbax's, through
    absl) would otherwise give the root a `basicConfig` handler that prints every line a second time.
    """
    logging.getLogger("gpt2_jax").setLevel(level)
    root = logging.getLogger()
    if not any(getattr(h, "_gpt2_jax", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(_Lines("%(message)s"))
        handler.addFilter(_shown)
        handler._gpt2_jax = True
        root.addHandler(handler)


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line main: platform and logging set up first; a GPT2JaxError becomes one line on stderr
    and exit status 2; Ctrl-C exit status 130."""
    configure_platform()
    configure_logging()
    try:
        main()
    except GPT2JaxError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpt2-jax", "xla")


def enable_compilation_cache(path: Optional[str] = None) -> str:
    """Keep compiled XLA programs on disk, so a tool's next process skips compilation.

    Each run of tools/generate.py is a new process; without this it compiles the generation loop anew
    every time (seconds on CPU for GPT-2 124M). Returns the cache directory.
    """
    path = path or default_cache_dir()
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache what takes noticeable time to compile, however small the executable.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
