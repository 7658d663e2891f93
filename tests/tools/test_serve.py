"""tools/serve.py: its defaults and one-line errors in-process; as a real process: it binds 127.0.0.1 only, a
SIGTERM refuses new requests and finishes those in flight, and its memory stays flat over thousands of requests."""
import concurrent.futures
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gpt2_jax.runtime import run_cli

ROOT = Path(__file__).resolve().parents[2]
from serve_fixtures import free_port, save_tiny_model  # the server tests' tiny model

spec = importlib.util.spec_from_file_location("serve_cli", ROOT / "tools" / "serve.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def test_binds_loopback_unless_asked():
    args = cli.parse_args(["--model", "m"])
    assert (args.host, args.port, args.slots, args.max_queue) == ("127.0.0.1", 8000, 8, 64)
    assert cli.parse_args(["--model", "m", "--host", "0.0.0.0"]).host == "0.0.0.0"


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/missing"], "missing"),
    (["--model", "{model}", "--max-length", "1000"], "max_length must be in [2, n_positions=256]"),
    (["--model", "{model}", "--adapter", "{tmp}/no-adapter"], "adapter")])
def test_errors_are_one_line(tmp_path, model_dir, monkeypatch, capsys, args, message):
    import gpt2_jax.serve.server

    monkeypatch.setattr(gpt2_jax.serve.server, "serve", lambda *a, **k: pytest.fail("served a bad set-up"))
    args = [a.format(tmp=tmp_path, model=model_dir) for a in args]
    monkeypatch.setattr(sys, "argv", ["serve.py", "--no-compile-cache", *args])
    with pytest.raises(SystemExit) as e:
        run_cli(cli.main)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("serve_cli") / "model")


class Process:
    """tools/serve.py in a subprocess on a free port, up once /health answers."""

    def __init__(self, model_dir, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "serve.py"), "--model", model_dir,
                                      "--served-model-name", "tiny", "--port", str(self.port), "--no-compile-cache",
                                      *args], env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.mark.slow
def test_sigterm_refuses_new_requests_and_finishes_those_in_flight(model_dir):
    server = Process(model_dir, "--slots", "1")
    try:
        with pytest.raises(httpx.ConnectError):  # bound to 127.0.0.1 only, not every loopback address
            httpx.get(f"http://127.0.0.2:{server.port}/health")
        body = {"model": "tiny", "prompt": "the", "max_tokens": 240, "min_tokens": 240, "n": 3, "stream": True}
        events, first, done = [], threading.Event(), {}

        def read():
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        events.append(line)
                        first.set()
            done["at"] = time.monotonic()

        reader = threading.Thread(target=read)
        reader.start()
        assert first.wait(120)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:
            refused = httpx.post(server.url + "/v1/completions", json={"prompt": "a"}, timeout=30).status_code
        except httpx.TransportError:
            refused = "connection refused"
        refused_at = time.monotonic()
        reader.join(120)
        assert refused in (503, "connection refused") and done["at"] > refused_at  # refused while in flight
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:])["choices"][0] for e in events[:-1]]
        assert sorted(c["index"] for c in chunks if c["finish_reason"] == "length") == [0, 1, 2]
        assert server.proc.wait(60) == 0
        err = server.proc.stderr.read()
        assert f"at http://127.0.0.1:{server.port}/v1" in err and "shutting down" in err and "Traceback" not in err
    finally:
        server.stop()


SOAK_REQUESTS = 3000


@pytest.mark.slow
def test_memory_stays_flat_over_thousands_of_requests(model_dir):
    server = Process(model_dir, "--slots", "4", "--max-queue", "64")
    bodies = [  # a mix: short and streamed, several choices, stop strings, logprobs, echo, a bad one
        {"model": "tiny", "prompt": "the quick", "max_tokens": 8},
        {"model": "tiny", "prompt": "a title", "max_tokens": 6, "stream": True},
        {"model": "tiny", "prompt": ["jax", "keywords"], "max_tokens": 4, "n": 2, "seed": 3},
        {"model": "tiny", "prompt": "the", "max_tokens": 8, "stop": ["e", "o"], "logprobs": 2, "echo": True},
        {"model": "tiny", "title": "foxes", "keywords": "dog", "keyword_boost": 2.0, "max_tokens": 8},
        {"model": "tiny", "prompt": "x", "max_tokens": 1000}]

    def run(n: int):
        with httpx.Client(timeout=120) as c:
            for i in range(n):
                r = c.post(server.url + "/v1/completions", json=bodies[i % len(bodies)])
                assert r.status_code == (400 if i % len(bodies) == 5 else 200), r.text

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(run, [25] * 8))  # warm-up: every program compiled, the allocators settled
            start_mb, start = server.rss_mb(), time.monotonic()
            list(pool.map(run, [SOAK_REQUESTS // 8] * 8))
        end_mb = server.rss_mb()
        print(json.dumps({"soak_requests": SOAK_REQUESTS, "rss_start_mb": round(start_mb, 1),
                          "rss_end_mb": round(end_mb, 1), "seconds": round(time.monotonic() - start, 1)}))
        assert end_mb - start_mb < 24.0, (start_mb, end_mb)  # a leak of 8 KB a request would fail
        assert httpx.get(server.url + "/health").json()["in_flight"] == 0
    finally:
        server.stop()
