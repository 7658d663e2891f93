"""A served model: its tokenizer, the engine over its slots and the scheduler driving it, and how a checked
completions request becomes prompts and engine requests.

Prompts: a string is encoded as is (as `tools/generate.py --prompt`; an empty one is `[EOS]`, the start of a
plain-text document as trained); token ids are taken as they are; `title` and `keywords` build this project's
`[BOS] title [SEP] keywords [SEP]` (tokenizer.format_prompt), continued by the prompt's text or ids if any.
"""
from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from typing import Optional

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sample.engine import Engine, Request
from gpt2_jax.sample.processors import glue_ids
from gpt2_jax.serve.detokenize import TextTracker
from gpt2_jax.serve.protocol import ApiError, CompletionRequest
from gpt2_jax.serve.scheduler import Choice, Scheduler
from gpt2_jax.text import keyword_token_ids


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt as the engine sees it, and its text for `echo`."""

    ids: tuple[int, ...]
    text: str


def choice_seed(seed: Optional[int], i: int) -> int:
    """The engine seed of a request's choice i: `seed` itself for the first, a hash of (seed, i) for the
    others (so the n choices differ, and each is the same every time); a fresh seed without one."""
    if seed is None:
        return secrets.randbelow(2**32)
    if i == 0:
        return seed % 2**32
    return int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=4).digest(), "little")


class Service:
    """The model behind the HTTP API: `name` is what `model` must say; `context` bounds prompt + max_tokens."""

    def __init__(self, model, tokenizer, *, name: str, slots: int, max_queue: int, max_length: Optional[int] = None,
                 mesh=None, defaults: Optional[dict] = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.defaults = dict(defaults or {})  # request fields' defaults (protocol.parse_completion)
        self.created = int(time.time())
        cfg = model.config
        self.vocab = cfg.vocab_size
        # A stock GPT-2 with our tokenizer: the added special tokens lie past its vocabulary, so EOS is the
        # model's (as tools/generate.py).
        self.eos_id = tokenizer.eos_id if tokenizer.eos_id < self.vocab else cfg.eos_token_id
        pad_id = tokenizer.pad_id if tokenizer.pad_id < self.vocab else self.eos_id
        self.slots = slots
        self.engine = Engine(model, slots=slots, eos_ids=[self.eos_id], pad_id=pad_id, mesh=mesh,
                             max_length=max_length, glue_ids=glue_ids(tokenizer))  # it checks max_length against n_positions
        self.context = self.engine.max_length
        self.scheduler = Scheduler(self.engine, max_queue=max_queue)

    def prompts(self, req: CompletionRequest) -> list[Prompt]:
        """Each prompt's token ids, checked against the vocabulary and the context (400s naming the limits)."""
        head: list[int] = []
        if req.titled:
            tok = self.tokenizer
            if tok.bos_id >= self.vocab or tok.sep_id >= self.vocab:
                raise ApiError(f"'title' and 'keywords' need a model trained with [BOS] and [SEP]; this model's "
                               f"vocabulary ({self.vocab}) lacks their ids ({tok.bos_id}, {tok.sep_id})",
                               param="title")
            head = tok.format_prompt(req.title or "", list(req.keywords))
        out = []
        for p in req.prompts:
            if isinstance(p, str):
                ids = head + self.tokenizer.encode(p) if head or p else [self.eos_id]
            else:
                bad = [t for t in p if not 0 <= t < self.vocab]
                if bad:
                    raise ApiError(f"'prompt' holds token id {bad[0]}, outside the model's vocabulary "
                                   f"[0, {self.vocab})", param="prompt")
                ids = head + list(p)
            text = p if isinstance(p, str) and not head else self.tokenizer.decode(ids, skip_special_tokens=False)
            self.check_length(len(ids), req.max_tokens)
            out.append(Prompt(tuple(ids), text))
        return out

    def check_length(self, prompt: int, max_tokens: int) -> None:
        if prompt + max_tokens > self.context:
            raise ApiError(f"This model's maximum context length is {self.context} tokens. However, you requested "
                           f"{prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} for the "
                           f"completion). Please reduce the length of the prompt or max_tokens.",
                           param="prompt" if prompt >= self.context else "max_tokens",
                           code="context_length_exceeded")

    def choices(self, req: CompletionRequest, prompts: list[Prompt]) -> list[Choice]:
        """`n` engine requests per prompt, indexed as OpenAI's choices (prompt-major)."""
        keywords = ()
        if req.keyword_boost:
            keywords = tuple(tuple(ids) for ids in keyword_token_ids(self.tokenizer, req.keywords))
        penalize = req.penalize_prompt if req.penalize_prompt is not None else not req.titled
        out = []
        for j, p in enumerate(prompts):
            for i in range(req.n):
                request = Request(
                    prompt=p.ids, max_new_tokens=req.max_tokens, do_sample=not req.greedy,
                    temperature=1.0 if req.greedy else req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p,
                    repetition_penalty=req.repetition_penalty, penalize_prompt=penalize,
                    min_new_tokens=req.min_tokens, seed=choice_seed(req.seed, i), keywords=keywords,
                    keyword_boost=req.keyword_boost, keyword_wait=req.keyword_wait, logprobs=req.logprobs)
                tracker = TextTracker(self.tokenizer, stops=req.stop, include_stop=req.include_stop_str_in_output,
                                      min_tokens=req.min_tokens, incremental=req.stream)
                out.append(Choice(j * req.n + i, request, tracker))
        try:  # the engine's own limits (keywords per request, ...), as a 400 before anything streams
            for c in out[::req.n]:  # one per prompt: the n choices differ only in their seeds
                self.engine.check(c.request)
        except GPT2JaxError as e:
            raise ApiError(str(e)) from None
        return out
