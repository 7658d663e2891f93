"""A model directory served over HTTP: the model and tokenizer loaded, the engine compiled, uvicorn run with
a graceful SIGTERM (new requests refused, those in flight finished, then exit 0).
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import time
from typing import Optional

import uvicorn

from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.errors import GPT2JaxError, first_line
from gpt2_jax.sample.engine import Request, run_all
from gpt2_jax.serve.app import create_app
from gpt2_jax.serve.protocol import ApiError, parse_completion
from gpt2_jax.serve.scheduler import Scheduler
from gpt2_jax.serve.service import Service
from gpt2_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


def load_service(model_path: str, *, adapter: Optional[str] = None, tokenizer: Optional[str] = None,
                 name: Optional[str] = None, slots: int = 8, max_queue: int = 64, dtype: Optional[str] = None,
                 max_length: Optional[int] = None, warmup: bool = True) -> Service:
    """A `Service` for a Hugging Face or run directory (with a PEFT LoRA `adapter` folded in), named `name`
    (default: the path as given, as vLLM names a model), with the directory's generation_config.json as request
    defaults. `warmup` compiles the engine's programs now rather than on the first request."""
    model = load_pretrained(model_path, dtype=dtype, adapter=adapter)
    service = Service(model, load_tokenizer(tokenizer or model_path), name=name or model_path, slots=slots,
                      max_queue=max_queue, max_length=max_length, defaults=generation_defaults(model_path))
    if service.defaults:
        log.info(f"request defaults from generation_config.json: {json.dumps(service.defaults)}")
    if warmup:
        start = time.perf_counter()
        run_all(service.engine, [Request(prompt=(service.eos_id,), max_new_tokens=2)])
        log.info(f"engine compiled in {time.perf_counter() - start:.1f}s ({slots} slots, context {service.context})")
    return service


# generation_config.json's sampling fields that become request defaults (vLLM's --generation-config auto),
# under the request's names.
GENERATION_FIELDS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                     "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_path: str) -> dict:
    """The request defaults a Hugging Face directory's generation_config.json sets (an exported run's sampling
    settings), checked as a request would be: {} without the file."""
    path = os.path.join(model_path, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            gen = json.load(f)
    except (OSError, ValueError) as e:
        raise GPT2JaxError(f"{path}: unreadable ({first_line(e)})") from None
    defaults = {ours: gen[theirs] for theirs, ours in GENERATION_FIELDS.items() if gen.get(theirs) is not None}
    try:
        parse_completion({"prompt": "", **defaults}, "")
    except ApiError as e:
        raise GPT2JaxError(f"{path}: {e}") from None
    return defaults


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or Ctrl-C first makes the scheduler refuse new requests (503): uvicorn
    then stops accepting connections and waits for the responses in flight, streams included."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            log.info("shutting down: new requests are refused; finishing those in flight")
        self.scheduler.drain()
        super().handle_exit(sig, frame)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve(service: Service, *, host: str = DEFAULT_HOST, port: int = 8000) -> None:
    """Serve until SIGTERM or Ctrl-C (both graceful; a second Ctrl-C forces the exit)."""
    if not is_loopback(host):
        log.warning(f"binding {host}: the API has no authentication; anyone who can reach this address can use it")
    log.info(f"serving {service.name} at http://{host}:{port}/v1 ({service.slots} slots, queue of "
             f"{service.scheduler.max_queue})")
    config = uvicorn.Config(create_app(service), host=host, port=port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=None)
    # uvicorn re-raises the signal it shut down for once it is done: a SIGTERM after a clean drain exits 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        Server(config, service.scheduler).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
