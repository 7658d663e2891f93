"""The OpenAI completions request: its JSON body checked once into a `CompletionRequest`, every bad value one
`ApiError` naming the field, and OpenAI's error object.

Fields are OpenAI's `/v1/completions` ones; the extensions are vLLM's names where vLLM has one (`top_k`,
`repetition_penalty`, `min_tokens`, `include_stop_str_in_output`) and this project's for its prompts (`title`,
`keywords`, `keyword_boost`, `keyword_wait`, `penalize_prompt`). As vLLM does, fields neither knows are ignored with a warning.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any, Optional, Union

from gpt2_jax.errors import GPT2JaxError

log = logging.getLogger(__name__)

MAX_LOGPROBS = 5  # OpenAI's limit for the completions API
MAX_STOPS = 16
# OpenAI fields this server accepts only at their neutral value (vLLM implements them; the engine does not).
NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None, "suffix": None}
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class ApiError(GPT2JaxError):
    """A request the server refuses: an HTTP status and OpenAI's error object, one line naming the field."""

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.param, self.code, self.retry_after = status, param, code, retry_after

    @property
    def body(self) -> dict:
        return error_body(str(self), self.status, self.param, self.code)

    @property
    def headers(self) -> dict:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


def error_body(message: str, status: int, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


# A prompt as sent: one text, or one list of token ids.
Prompt = Union[str, list[int]]


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """A checked `/v1/completions` body. Sampling settings are as OpenAI means them (temperature 0: greedy)."""

    model: Optional[str]
    prompts: tuple[Prompt, ...]  # each prompt gets `n` choices
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    echo: bool = False
    logprobs: Optional[int] = None
    top_k: int = 0  # extensions (vLLM's names): 0 or -1 off
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    title: Optional[str] = None  # this project's prompts: [BOS] title [SEP] keywords [SEP] prompt
    keywords: tuple[str, ...] = ()
    keyword_boost: float = 0.0
    keyword_wait: bool = True  # the boost waits for a natural place (sample.keyword_wait); false: from the start
    penalize_prompt: Optional[bool] = None  # None: True for plain prompts (HF, vLLM), False with a title

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def titled(self) -> bool:
        return self.title is not None or bool(self.keywords)


# --- checks of one field --------------------------------------------------------------------------------

def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, default, least: int, most: Optional[int] = None):
    v = body.get(name, default)
    if v is None and default is None:
        return None
    if not _is_int(v):
        raise ApiError(f"'{name}' must be an integer, got {_show(v)}", param=name)
    if v < least or (most is not None and v > most):
        want = f">= {least}" if most is None else f"between {least} and {most}"
        raise ApiError(f"'{name}' must be {want}, got {v}", param=name)
    return v


def _number(body: dict, name: str, default: float, ok, want: str) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ApiError(f"'{name}' must be a number, got {_show(v)}", param=name)
    if not math.isfinite(v) or not ok(v):
        raise ApiError(f"'{name}' must be {want}, got {v}", param=name)
    return float(v)


def _bool(body: dict, name: str, default: Optional[bool]) -> Optional[bool]:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"'{name}' must be true or false, got {_show(v)}", param=name)
    return v


def _prompts(value) -> tuple[Prompt, ...]:
    """OpenAI's four prompt forms: a string, a list of strings, token ids, a list of token-id lists."""
    want = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value:
        raise ApiError(f"'prompt' must be {want}, got {_show(value)}", param="prompt")
    if all(isinstance(p, str) for p in value):
        return tuple(value)
    if all(_is_int(t) for t in value):
        return (list(value),)
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
        return tuple(list(p) for p in value)
    raise ApiError(f"'prompt' must be {want}, got {_show(value)}", param="prompt")


def _stops(value) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(f"'stop' must be a string or a list of strings, got {_show(value)}", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' holds {len(stops)} strings; at most {MAX_STOPS}", param="stop")
    return tuple(s for s in stops if s)


def _keywords(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list) and all(isinstance(k, str) for k in value):
        return tuple(w for k in value for w in k.split())
    raise ApiError(f"'keywords' must be a string of space-separated keywords or a list of strings, got "
                   f"{_show(value)}", param="keywords")


def _stream_options(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise ApiError(f"'stream_options' must be an object, got {_show(opts)}", param="stream_options")
    if not stream:
        raise ApiError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    return bool(_bool(opts, "include_usage", False))


KNOWN = {f.name for f in dataclasses.fields(CompletionRequest)} - {"prompts", "include_usage"} | {
    "prompt", "stream_options", "best_of", "user", *NEUTRAL}


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or an ApiError saying where it is malformed."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(f"the request body is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ApiError(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(body, dict):
        kind = "null" if body is None else type(body).__name__
        raise ApiError(f"the request body must be a JSON object, got {kind}")
    return body


def parse_completion(body: dict, served: str, defaults: Optional[dict] = None) -> CompletionRequest:
    """A `/v1/completions` JSON object checked against OpenAI's rules (and the extensions'); `served` is the
    model name this server answers to (a request without `model` gets it); `defaults`: values of fields the
    body leaves out or null (the model's generation config, as vLLM)."""
    body = {**body, **{k: v for k, v in (defaults or {}).items() if body.get(k) is None}}
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(f"'model' must be a string, got {_show(model)}", param="model")
    if model is not None and model != served:
        raise ApiError(f"The model `{model}` does not exist: this server serves `{served}`", param="model",
                       code="model_not_found")
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral, {} if name == "logit_bias" else neutral):
            raise ApiError(f"'{name}' is not supported by this server (only {json.dumps(neutral)})", param=name)
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        log.warning("ignoring unknown fields of a completions request: %s", ", ".join(unknown))

    title = body.get("title")
    if title is not None and not isinstance(title, str):
        raise ApiError(f"'title' must be a string, got {_show(title)}", param="title")
    keywords = _keywords(body.get("keywords"))
    titled = title is not None or bool(keywords)
    if "prompt" not in body or body["prompt"] is None:
        if not titled:
            raise ApiError("'prompt' is required (or 'title' and 'keywords', which build this model's prompt)",
                           param="prompt")
        prompts: tuple[Prompt, ...] = ("",)
    else:
        prompts = _prompts(body["prompt"])

    n = _int(body, "n", 1, 1)
    best_of = _int(body, "best_of", None, 1)
    if best_of is not None and best_of != n:
        raise ApiError(f"'best_of' is not supported by this server (only equal to n = {n}), got {best_of}",
                       param="best_of")
    max_tokens = _int(body, "max_tokens", 16, 1)
    stream = bool(_bool(body, "stream", False))
    req = CompletionRequest(
        model=model, prompts=prompts, max_tokens=max_tokens, n=n, stream=stream,
        temperature=_number(body, "temperature", 1.0, lambda x: x >= 0, ">= 0 (0: greedy)"),
        top_p=_number(body, "top_p", 1.0, lambda x: 0 < x <= 1, "in (0, 1]"),
        stop=_stops(body.get("stop")), seed=_int(body, "seed", None, -2**63, 2**64 - 1),
        include_usage=_stream_options(body, stream), echo=bool(_bool(body, "echo", False)),
        logprobs=_int(body, "logprobs", None, 0, MAX_LOGPROBS),
        top_k=_int(body, "top_k", 0, -1), min_tokens=_int(body, "min_tokens", 0, 0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, lambda x: x > 0, "> 0 (1: off)"),
        include_stop_str_in_output=bool(_bool(body, "include_stop_str_in_output", False)),
        title=title, keywords=keywords,
        keyword_boost=_number(body, "keyword_boost", 0.0, lambda x: x >= 0, ">= 0 (0: off)"),
        keyword_wait=bool(_bool(body, "keyword_wait", True)),
        penalize_prompt=_bool(body, "penalize_prompt", None))
    if req.min_tokens > max_tokens:
        raise ApiError(f"'min_tokens' ({req.min_tokens}) must not exceed 'max_tokens' ({max_tokens})",
                       param="min_tokens")
    if req.keyword_boost and not req.keywords:
        raise ApiError("'keyword_boost' needs 'keywords'", param="keyword_boost")
    return req
