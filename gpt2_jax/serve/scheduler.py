"""The one thread that drives the engine: requests in through a bounded queue, each step's tokens out to the
HTTP handlers, stop strings and disconnects turned into cancels before the next step, a drain on shutdown.

The engine (sample/engine.py) is synchronous and single-threaded; the event loop of the HTTP server never calls
it. The handlers `submit` a `Ticket` (one HTTP request: its choices, each one engine request) and `cancel` it;
this thread adds, cancels and steps, and hands each ticket its `Event`s through the ticket's `deliver`
(which, for a handler, puts them on its event loop's queue).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import threading
from typing import Callable, Optional

from gpt2_jax.errors import GPT2JaxError, first_line
from gpt2_jax.serve.detokenize import TextTracker
from gpt2_jax.serve.protocol import ApiError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


@dataclasses.dataclass
class Event:
    """What one step produced for one choice: its new text and tokens, and how it ended (once it has)."""

    index: int
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[dict[int, float]]] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "error"
    stop_reason: Optional[str] = None  # the stop string that ended it
    error: Optional[str] = None
    status: int = 500  # with an error: the HTTP status it deserves
    eos: bool = False  # ended by EOS (a completion token not in `tokens`)


class Choice:
    """One engine request of a ticket and its text so far."""

    def __init__(self, index: int, request, tracker: TextTracker):
        self.index, self.request, self.tracker = index, request, tracker
        self.rid: Optional[int] = None

    def absorb(self, out) -> Event:
        """An engine Output as an Event; a stop string found in its text ends the choice here."""
        ev = Event(self.index, tokens=list(out.tokens), logprobs=out.logprobs, top_logprobs=out.top_logprobs)
        ev.text = self.tracker.feed(out.tokens)
        if self.tracker.stop_reason is not None:
            ev.finish_reason, ev.stop_reason = "stop", self.tracker.stop_reason
        elif out.finished:
            if out.finish_reason == "error":
                ev.finish_reason, ev.error = "error", out.error or "the engine failed"
            else:
                ev.finish_reason, ev.eos = ("stop", True) if out.finish_reason == "stop" else ("length", False)
        if ev.finish_reason in ("stop", "length"):
            ev.text += self.tracker.finish()
        return ev


class Ticket:
    """One HTTP request's choices; `deliver(events)` is called from the engine thread."""

    def __init__(self, choices: list[Choice], deliver: Callable[[list[Event]], None]):
        self.choices, self.deliver = choices, deliver

    def fail(self, message: str, status: int) -> None:
        _safe_deliver(self, [Event(c.index, finish_reason="error", error=message, status=status)
                             for c in self.choices])


def _safe_deliver(ticket: Ticket, events: list[Event]) -> None:
    try:
        ticket.deliver(events)
    except Exception as e:  # a closed event loop (the server stopping): nobody is listening any more
        log.debug("dropped events of a ticket: %s", first_line(e))


class Scheduler:
    """Drives `engine` from its own thread. `max_queue` bounds the choices waiting for a slot: at most
    slots + max_queue are in flight; more are refused (429)."""

    def __init__(self, engine, *, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._inbox_choices = 0  # choices submitted, not yet added to the engine
        self._engine_pending = self._engine_active = 0  # the engine's queue and slots after the last add or step
        self._live: dict[int, tuple[Ticket, Choice]] = {}  # rid -> its ticket and choice
        self._draining = self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0
        self.cancels: collections.deque = collections.deque(maxlen=1024)  # (step asked, step applied)

    # --- called from the HTTP server's threads ------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="gpt2-jax-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._draining

    @property
    def in_flight(self) -> int:
        """Choices submitted and not finished: queued here, queued in the engine, or in its slots."""
        return self._inbox_choices + self._engine_pending + self._engine_active

    def submit(self, ticket: Ticket) -> None:
        """Queue a ticket, or refuse it: 503 while draining, 429 when the queue is full (both with Retry-After)."""
        with self._cv:
            if self._draining:
                raise ApiError("the server is shutting down", status=503, retry_after=RETRY_AFTER_S)
            if len(ticket.choices) > self.engine.slots + self.max_queue:
                raise ApiError(f"this request asks for {len(ticket.choices)} completions (prompts × n); this server "
                               f"takes at most {self.engine.slots + self.max_queue} at once ({self.engine.slots} "
                               f"slots, a queue of {self.max_queue})", param="n")
            in_flight = self.in_flight
            if in_flight + len(ticket.choices) > self.engine.slots + self.max_queue:
                raise ApiError(f"the server is busy: its {self.engine.slots} slots are taken and "
                               f"{max(0, in_flight - self.engine.slots)} requests wait for one (at most "
                               f"{self.max_queue}); retry later", status=429, code="rate_limit_exceeded",
                               retry_after=RETRY_AFTER_S)
            self._inbox.append(("add", ticket))
            self._inbox_choices += len(ticket.choices)
            self._cv.notify()

    def cancel(self, ticket: Ticket) -> None:
        """Free the ticket's slots before the engine's next step (a client gone, a stream closed)."""
        with self._cv:
            self._inbox.append(("cancel", ticket, self.steps))
            self._cv.notify()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between steps (model work that must not race the engine)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._stopping:
                raise ApiError("the server is shutting down", status=503, retry_after=RETRY_AFTER_S)
            self._inbox.append(("call", fn, future))
            self._cv.notify()
        return future

    def drain(self) -> None:
        """Refuse new tickets from now on; those in flight go on. Safe in a signal handler (takes no lock)."""
        self._draining = True

    def stop(self, timeout: Optional[float] = None) -> None:
        """Drain, finish what is in flight, then end the thread (whatever is left after `timeout` is failed)."""
        with self._cv:
            self._draining = self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("requests still in flight after %ss: stopping them", timeout)
                with self._cv:
                    self._inbox.append(("abort",))
                    self._cv.notify()
                self._thread.join()

    # --- the engine thread --------------------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self.engine.active or self.engine.pending)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self._busy() and not self._stopping:
                    self._cv.wait()
                work = list(self._inbox)
                self._inbox.clear()
            if any(item[0] == "abort" for item in work):
                message = "the server stopped before this request finished"
                self._fail_live(message, 503)
                for item in work:
                    if item[0] == "add":
                        item[1].fail(message, 503)
                return
            for item in work:
                try:
                    self._handle(item)
                except Exception as e:  # an engine bug on add or cancel: this ticket fails, the thread goes on
                    log.exception("the engine failed on %s", item[0])
                    if item[0] == "add":
                        self._forget(item[1])
                        item[1].fail(f"the engine failed: {first_line(e)}", 500)
            if self._busy():
                self._step()
            elif self._stopping and not work:
                with self._cv:
                    if not self._inbox:
                        return

    def _handle(self, item) -> None:
        kind, ticket = item[0], item[1]
        if kind == "call":
            fn, future = item[1], item[2]
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the waiting handler
                    future.set_exception(e)
            return
        if kind == "cancel":
            self._forget(ticket)
            self.cancels.append((item[2], self.steps))
            return
        try:
            for c in ticket.choices:
                self.engine.check(c.request)
        except GPT2JaxError as e:
            ticket.fail(str(e), 400)
        else:
            for c in ticket.choices:
                c.rid = self.engine.add(c.request)
                self._live[c.rid] = (ticket, c)
        finally:
            with self._cv:  # moved from the inbox to the engine at once, as `submit` counts them
                self._inbox_choices -= len(ticket.choices)
                self._engine_pending, self._engine_active = self.engine.pending, self.engine.active

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # an engine bug: the requests in flight fail, the server goes on
            log.exception("the engine's step failed")
            self._fail_live(f"the engine failed: {first_line(e)}", 500)
            return
        finally:
            self.steps += 1
            self._engine_pending, self._engine_active = self.engine.pending, self.engine.active
        batches: dict[int, tuple[Ticket, list[Event]]] = {}
        for out in outputs:
            entry = self._live.get(out.rid)
            if entry is None:  # cancelled since
                continue
            ticket, choice = entry
            try:
                ev = choice.absorb(out)
            except Exception as e:  # this request's text failed (a tokenizer error): it fails alone
                log.exception("request %s failed", out.rid)
                ev = Event(choice.index, finish_reason="error", error=f"the server failed: {first_line(e)}")
            if ev.finish_reason is not None:
                del self._live[out.rid]
                if not out.finished:
                    self.engine.cancel(out.rid)  # a stop string or an error: free the slot now
            batches.setdefault(id(ticket), (ticket, []))[1].append(ev)
        for ticket, events in batches.values():
            _safe_deliver(ticket, events)

    def _forget(self, ticket: Ticket) -> None:
        for c in ticket.choices:
            if c.rid is not None and self._live.pop(c.rid, None) is not None:
                self.engine.cancel(c.rid)

    def _fail_live(self, message: str, status: int) -> None:
        tickets = {id(t): t for t, _ in self._live.values()}
        for rid in list(self._live):
            try:
                self.engine.cancel(rid)
            except Exception:  # the engine is already broken; the slots are lost with it
                log.exception("cancel of request %s failed", rid)
        self._live.clear()
        for t in tickets.values():
            t.fail(message, status)
