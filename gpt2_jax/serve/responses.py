"""OpenAI's completion objects, whole and streamed (server-sent events ending `data: [DONE]`), built from the
scheduler's events: one `ChoiceState` per choice gathers its text, tokens and log-probabilities.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Optional

from gpt2_jax.serve.logprobs import logprobs_object, merge
from gpt2_jax.serve.scheduler import Event

DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChoiceState:
    """One choice as it grows: its text (after the echoed prompt), token count, logprobs, how it ended."""

    def __init__(self, index: int, tokenizer, logprobs: Optional[int], echo_text: str = "",
                 echo_logprobs: Optional[dict] = None):
        self.index, self.tokenizer, self.k = index, tokenizer, logprobs
        self.text = echo_text
        self.logprobs = echo_logprobs
        self.offset = len(echo_text)  # where the next token's text starts (token texts, as vLLM counts)
        self.tokens = 0
        self.finish_reason: Optional[str] = None
        self.stop_reason: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, ev: Event) -> Optional[dict]:
        """Take an event; returns the logprobs object of its tokens (None without logprobs)."""
        self.text += ev.text
        self.tokens += len(ev.tokens) + ev.eos  # EOS is a completion token, though it has no text (vLLM)
        part = None
        if self.k is not None and ev.tokens:
            lps = ev.logprobs or [None] * len(ev.tokens)
            part = logprobs_object(self.tokenizer, ev.tokens, lps, ev.top_logprobs, self.k, self.offset)
            self.offset += sum(len(t) for t in part["tokens"])
            self.logprobs = merge(self.logprobs, part)
        self.finish_reason = ev.finish_reason or self.finish_reason
        self.stop_reason = ev.stop_reason or self.stop_reason
        return part

    def whole(self) -> dict:
        return choice(self.index, self.text, self.logprobs if self.k is not None else None, self.finish_reason,
                      self.stop_reason)


def choice(index: int, text: str, logprobs: Optional[dict], finish_reason: Optional[str],
           stop_reason: Optional[str] = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
            "stop_reason": stop_reason}


def completion(cid: str, created: int, model: str, choices: list[dict], usage_: Optional[dict],
               chunk: bool = False) -> dict:
    """A `text_completion` object (whole, or one streamed chunk: the same object, fewer choices, no usage)."""
    out = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        out["usage"] = usage_
    return out


def echo_logprobs(tokenizer, ids, logprobs, tops, k: int) -> dict:
    """The echoed prompt's logprobs object (its first token has none)."""
    return logprobs_object(tokenizer, ids, logprobs, tops, k, 0)


def now() -> int:
    return int(time.time())

