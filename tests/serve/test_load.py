"""The server under load and failure, on the real engine: a full queue answers 429 with Retry-After and stays
bounded, a client that goes away frees its slot within one step, a request that fails inside the engine (or in
the server's handling of its text) fails alone."""
import concurrent.futures
import contextlib
import threading
import time

import httpx
import openai
import pytest

from gpt2_jax.sample import engine_programs
from gpt2_jax.serve.detokenize import TextTracker

LONG = {"model": "tiny", "prompt": "the", "max_tokens": 200, "min_tokens": 200, "temperature": 0.8, "seed": 1}


def post(server, body, timeout=120):
    return httpx.post(server.url + "/v1/completions", json=body, timeout=timeout)


def wait_idle(service, timeout=60, cancels=0):
    """Until the engine is idle and the scheduler has applied `cancels` cancels (a step may be compiling)."""
    deadline = time.monotonic() + timeout
    while service.engine.active or service.engine.pending or len(service.scheduler.cancels) < cancels:
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.01)


@contextlib.contextmanager
def engine_paused(scheduler):
    """The engine's thread held between steps (by a call that waits), so requests pile up as they arrive."""
    release = threading.Event()
    scheduler.call(release.wait)
    try:
        yield
    finally:
        release.set()


def wait_in_flight(server, n):
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").json()["in_flight"] != n:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_full_queue_answers_429_and_stays_bounded(server, client, monkeypatch):
    scheduler = server.service.scheduler
    wait_idle(server.service)
    monkeypatch.setattr(scheduler, "max_queue", 2)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        with engine_paused(scheduler):
            calls = [pool.submit(post, server, LONG) for _ in range(16)]
            for i, _ in enumerate(concurrent.futures.as_completed(calls)):  # ten are refused at once
                if i == 9:
                    break
            wait_in_flight(server, 6)  # 4 slots and a queue of 2
            # The OpenAI client sees a RateLimitError (it would retry after Retry-After with max_retries > 0).
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model="tiny", prompt="the", max_tokens=5)
            assert e.value.response.headers["Retry-After"] == "1" and e.value.code == "rate_limit_exceeded"
        replies = [f.result() for f in calls]
    codes = [r.status_code for r in replies]
    assert sorted(codes) == [200] * 6 + [429] * 10, codes
    for r in replies:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
            assert "4 slots are taken and 2 requests wait for one (at most 2)" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 200


def test_a_client_gone_mid_stream_frees_its_slot_within_one_step(server):
    service = server.service
    wait_idle(service)
    before = len(service.scheduler.cancels)
    with httpx.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # three events and their blank lines
    assert all(g.startswith("data: {") for g in got[::2])
    wait_idle(service, timeout=60, cancels=before + 1)
    asked, applied = service.scheduler.cancels[-1]
    assert len(service.scheduler.cancels) == before + 1 and applied - asked <= 1
    # The same holds for a client that gives up waiting for a whole completion.
    with pytest.raises(httpx.ReadTimeout):
        post(server, {**LONG, "n": 2}, timeout=0.3)
    wait_idle(service, timeout=60, cancels=before + 2)
    asked, applied = service.scheduler.cancels[-1]
    assert len(service.scheduler.cancels) == before + 2 and applied - asked <= 1


POISON = 299  # a token id the other prompts do not hold


@pytest.fixture
def poisoned_prefill(monkeypatch):
    """The engine's prefill fails for any batch holding the POISON token (a value slipping past check)."""
    real = engine_programs.prefill

    def prefill(state, ids_BP, *args, **kwargs):
        if (ids_BP == POISON).any():
            raise ValueError("poisoned prompt")
        return real(state, ids_BP, *args, **kwargs)

    monkeypatch.setattr(engine_programs, "prefill", prefill)


@pytest.fixture
def poisoned_text(monkeypatch):
    """The server's detokenizing fails for a request with the stop string "<poison>"."""
    real = TextTracker.feed

    def feed(self, tokens):
        if "<poison>" in self.stops:
            raise RuntimeError("poisoned text")
        return real(self, tokens)

    monkeypatch.setattr(TextTracker, "feed", feed)


@pytest.mark.parametrize("where, bad, message", [
    ("engine", {"prompt": [POISON, 5, 6]}, "poisoned prompt"),
    ("server", {"prompt": "the lazy", "stop": "<poison>"}, "poisoned text")])
def test_a_request_that_fails_fails_alone(server, tokenizer, hf_greedy, poisoned_prefill, poisoned_text, where,
                                          bad, message):
    prompts = ["the quick", "a title", "jax compiles one", "keywords"]
    good = [{"model": "tiny", "prompt": p, "max_tokens": 12, "temperature": 0} for p in prompts]
    bodies = good[:2] + [{"model": "tiny", "max_tokens": 12, "temperature": 0, **bad}] + good[2:]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: post(server, b), bodies))
    failed = replies.pop(2)
    assert failed.status_code == 500 and message in failed.json()["error"]["message"]
    for p, r in zip(prompts, replies):
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == tokenizer.decode(hf_greedy(tokenizer.encode(p), 12)[0])
    streamed = httpx.post(server.url + "/v1/completions", json={**bodies[2], "stream": True}, timeout=60)
    events = [e for e in streamed.text.split("\n\n") if e]
    assert message in events[-2] and '"error"' in events[-2] and events[-1] == "data: [DONE]"
    assert httpx.get(server.url + "/health").status_code == 200
    assert post(server, good[0]).json()["choices"][0]["text"] == replies[0].json()["choices"][0]["text"]


def test_a_failing_engine_step_fails_what_is_in_flight_and_the_server_goes_on(server, monkeypatch):
    engine, calls = server.service.engine, []
    real = engine.step

    def step():  # an engine bug outside any one request: the first step raises
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the step exploded")
        return real()

    wait_idle(server.service)
    monkeypatch.setattr(engine, "step", step)
    r = post(server, {"prompt": "the", "max_tokens": 5})
    assert r.status_code == 500 and r.json()["error"]["message"] == "the engine failed: the step exploded"
    r = post(server, {"prompt": "the", "max_tokens": 5, "min_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    wait_idle(server.service)
    assert server.service.scheduler.in_flight == 0
