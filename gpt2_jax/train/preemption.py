"""How a run is asked to stop early: SIGTERM (TPU preemption, schedulers) or SIGINT (Ctrl-C), agreed on by
every process, and the saves already started let complete however the loop ends."""
from __future__ import annotations

import contextlib
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """SIGTERM (how TPU preemption and schedulers stop a job) and SIGINT (Ctrl-C) ask the loop to checkpoint
    and leave. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal: str | None = None  # the name of the signal that asked
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job ignores Ctrl-C
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def now(self, step: int) -> bool:
        if jax.process_count() > 1:  # every process must stop at the same step
            return multihost_utils.reached_preemption_sync_point(step) or self.requested
        return self.requested


@contextlib.contextmanager
def finishing(ckpt):
    """However the loop ends (an error included), let the saves already started complete."""
    try:
        yield
    finally:
        ckpt.wait()
