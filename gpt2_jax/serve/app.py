"""The OpenAI-compatible HTTP API over a `Service`: `POST /v1/completions` (whole or streamed), `GET /v1/models`,
`GET /health`; every refusal is OpenAI's error object.

The handlers run on the server's event loop and never touch the engine: they check and tokenize a request,
`submit` its ticket to the scheduler's thread and wait on a queue that thread fills. A client that goes away
(a closed stream, or a disconnect while waiting for a whole completion) cancels its ticket, which frees the
slots before the engine's next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gpt2_jax.errors import first_line
from gpt2_jax.serve.logprobs import prompt_logprobs
from gpt2_jax.serve.protocol import ApiError, CompletionRequest, error_body, parse_completion, parse_json
from gpt2_jax.serve.responses import DONE, ChoiceState, completion, echo_logprobs, new_id, now, sse, usage
from gpt2_jax.serve.scheduler import Event, Ticket
from gpt2_jax.serve.service import Prompt, Service

log = logging.getLogger(__name__)

# Requests still running this long after shutdown began are failed (uvicorn waits for them first).
STOP_TIMEOUT_S = 600.0


def create_app(service: Service) -> FastAPI:
    """The FastAPI app; its lifespan starts the scheduler's thread and, at shutdown, drains and stops it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        yield
        await asyncio.to_thread(service.scheduler.stop, STOP_TIMEOUT_S)

    app = FastAPI(title="gpt2-jax", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown paths, wrong methods
        return JSONResponse(error_body(str(e.detail), e.status_code), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"the server failed: {first_line(e)}", 500), status_code=500)

    @app.get("/health")
    async def health():
        if not service.scheduler.alive:
            return JSONResponse(error_body("the server is not serving (shutting down or its engine stopped)", 503),
                                status_code=503)
        return {"status": "ok", "slots": service.slots, "max_queue": service.scheduler.max_queue,
                "in_flight": service.scheduler.in_flight}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "gpt2-jax", "root": service.name,
                                            "max_model_len": service.context}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(parse_json(await request.body()), service.name, service.defaults)
        prompts = service.prompts(req)
        choices = service.choices(req, prompts)  # every check done: what follows costs model time
        states = await _choice_states(service, req, prompts)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        ticket = Ticket(choices, lambda events: loop.call_soon_threadsafe(queue.put_nowait, events))
        service.scheduler.submit(ticket)
        reply = Reply(service, req, prompts, states, ticket, queue)
        if req.stream:
            return StreamingResponse(reply.stream(), media_type="text/event-stream")
        return await reply.whole(request)

    return app


async def _choice_states(service: Service, req: CompletionRequest, prompts: list[Prompt]) -> list[ChoiceState]:
    """Each choice's starting state: with `echo`, its prompt's text (and with `logprobs`, the prompt's own,
    computed on the engine's thread)."""
    echoed: list[Optional[dict]] = [None] * len(prompts)
    if req.echo and req.logprobs is not None:
        k = req.logprobs

        def score():
            return [echo_logprobs(service.tokenizer, p.ids, *prompt_logprobs(service.model, p.ids, k), k)
                    for p in prompts]

        echoed = await asyncio.wrap_future(service.scheduler.call(score))
    return [ChoiceState(j * req.n + i, service.tokenizer, req.logprobs, p.text if req.echo else "", echoed[j])
            for j, p in enumerate(prompts) for i in range(req.n)]


class Reply:
    """One request's answer from its queue of events: a whole completion, or a stream of chunks."""

    def __init__(self, service: Service, req: CompletionRequest, prompts: list[Prompt], states: list[ChoiceState],
                 ticket: Ticket, queue: asyncio.Queue):
        self.service, self.req, self.states, self.ticket, self.queue = service, req, states, ticket, queue
        self.prompt_tokens = sum(len(p.ids) for p in prompts)
        self.id, self.created = new_id(), now()

    def _usage(self) -> dict:
        return usage(self.prompt_tokens, sum(s.tokens for s in self.states))

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.states)

    async def whole(self, request: Request) -> JSONResponse:
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while not self.finished:
                get = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    log.info("client went away: request %s cancelled", self.id)
                    return JSONResponse(error_body("the client disconnected", 499), status_code=499)
                for ev in get.result():
                    if ev.error is not None:
                        raise ApiError(ev.error, status=ev.status)
                    self.states[ev.index].add(ev)
            return JSONResponse(completion(self.id, self.created, self.service.name,
                                           [s.whole() for s in self.states], self._usage()))
        finally:
            gone.cancel()
            if not self.finished:
                self.service.scheduler.cancel(self.ticket)

    async def stream(self) -> AsyncIterator[str]:
        name = self.service.name
        try:
            if self.req.echo:
                for s in self.states:
                    yield sse(completion(self.id, self.created, name, [s.whole()], None, chunk=True))
            while not self.finished:
                for ev in await self.queue.get():
                    if ev.error is not None:  # as vLLM: the error as an event, then the end of the stream
                        yield sse(error_body(ev.error, ev.status))
                        yield DONE
                        return
                    chunk = self._chunk(ev)
                    if chunk is not None:
                        yield sse(completion(self.id, self.created, name, [chunk], None, chunk=True))
            if self.req.include_usage:
                yield sse(completion(self.id, self.created, name, [], self._usage(), chunk=True))
            yield DONE
        finally:  # also when the client goes away: Starlette cancels this generator
            if not self.finished:
                self.service.scheduler.cancel(self.ticket)

    def _chunk(self, ev: Event) -> Optional[dict]:
        s = self.states[ev.index]
        part = s.add(ev)
        if not ev.text and part is None and ev.finish_reason is None:
            return None
        return {"index": ev.index, "text": ev.text, "logprobs": part, "finish_reason": ev.finish_reason,
                "stop_reason": ev.stop_reason}


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (after the body, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
