"""Process-wide JAX settings for the command-line tools."""
from __future__ import annotations

import os
from typing import Optional

import jax


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
