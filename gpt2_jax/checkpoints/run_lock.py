"""One writer per run directory: an OS lock (flock) on RUN_DIR/.lock, held while a run writes there.

The kernel drops the lock when its process ends, however it ends (kill -9 included), so a crash leaves no
stale lock: the file stays, unlocked. The holder writes its pid and host into it, so that a second run can
say who holds the directory. Within one process the lock is re-entrant (a run inside a `hold_run_dir`).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from typing import Iterator

from gpt2_jax.errors import GPT2JaxError

LOCK_FILE = ".lock"
_held: set[str] = set()  # the lock files this process holds


@contextlib.contextmanager
def hold_run_dir(run_dir: str) -> Iterator[None]:
    """Hold `run_dir`'s writer lock for the block (`run_dir` exists). Another process holding it raises one
    line naming its pid and host, before anything in `run_dir` is touched."""
    path = os.path.realpath(os.path.join(run_dir, LOCK_FILE))
    if path in _held:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise GPT2JaxError(f"{run_dir} is in use by another run ({who}); a run directory has one writer: "
                               f"wait for it to end, or use another train.out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it would race a process opening it)
