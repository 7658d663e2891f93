"""A continuous-batching engine: requests queue, take a free slot of a preallocated KV cache, decode together.

`Engine.add` checks and queues a request; each `Engine.step` admits queued requests into free slots
(prompts bucketed by length and prefilled together, sample/engine_programs.py's `prefill` then `insert`),
decodes `steps_per_call` tokens for every active slot in one jitted call, and returns what each request
produced. A slot frees on EOS, at `max_new_tokens` or on `cancel` (the caller's stop strings), and the
next step refills it. Synchronous, single-threaded: the server drives it from one loop, sample/file.py
directly. Every per-request setting is a traced per-slot value: a new mix of requests never recompiles;
the compiled programs are one prefill per (prompt bucket, row bucket), one insert per those, one decode.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sample import engine_programs as programs
from gpt2_jax.sample.generate import MIN_BUCKET, bucket_length, check_sampling
from gpt2_jax.sample.processors import keyword_guidance, one_minus_top_p
from gpt2_jax.sharding import BATCH_AXES, data_parallel_size, named_shardings, replicated

log = logging.getLogger(__name__)

TOP_LOGPROBS = programs.TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: a prompt of token ids and generate's settings (sample/generate.py)."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0
    penalize_prompt: bool = True
    min_new_tokens: int = 0
    seed: int = 0
    keywords: tuple[tuple[int, ...], ...] = ()  # keyword token-id sequences (text.keyword_token_ids)
    keyword_boost: float = 0.0
    keyword_wait: Any = None  # keyword guidance that waits for a natural place (generate's keyword_wait)
    logprobs: Optional[int] = None  # None: none; 0..5: the chosen token's logprob and this many alternatives


@dataclasses.dataclass
class Output:
    """What one step produced for one request."""

    rid: int
    tokens: list[int]  # new tokens since its last Output (EOS not included)
    logprobs: Optional[list[float]]  # per token: log-softmax of the model's raw logits
    top_logprobs: Optional[list[dict[int, float]]]
    finished: bool
    finish_reason: Optional[str]  # "stop" (EOS) | "length" | "cancelled" | "error"
    error: Optional[str] = None


@dataclasses.dataclass
class _Live:
    rid: int
    request: Request
    emitted: int = 0


def shard_model(model, mesh):
    """The model with its parameters laid out on `mesh` by their logical axes (sharding.RULES), as training."""
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    logical = {k: (v.get_metadata().get("out_sharding") if isinstance(v, nnx.Param) else None) for k, v in flat.items()}
    shardings = named_shardings(logical, {k: v[...] for k, v in flat.items()}, mesh)
    placed = {k: v.replace(jax.device_put(v[...], shardings[k])) for k, v in flat.items()}
    return nnx.merge(graphdef, nnx.from_flat_state(placed))


class Engine:
    """Continuous batching over `slots` slots of `max_length` cache positions (default: n_positions).

    `mesh`: the parameters are sharded over it by the training rules and the slots split over its batch
    axes (when they divide). `steps_per_call`: tokens decoded per host round trip. `max_keywords` keywords of
    at most `max_keyword_tokens` tokens per request. `max_prefill`: rows prefilled together at most.
    `glue_ids` (processors.glue_ids of the tokenizer): tokens that `keyword_wait` keeps from gluing onto a
    keyword just written.
    """

    def __init__(self, model, *, slots: int, eos_ids, pad_id: int, mesh=None, max_length: Optional[int] = None,
                 steps_per_call: int = 1, max_keywords: int = 16, max_keyword_tokens: int = 8,
                 max_prefill: Optional[int] = None, glue_ids: Sequence[int] = ()):
        cfg = model.config
        self.config = cfg
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
            raise GPT2JaxError(f"slots must be a positive integer, got {slots!r}")
        self.max_length = cfg.n_positions if max_length is None else int(max_length)
        if not 2 <= self.max_length <= cfg.n_positions:
            raise GPT2JaxError(f"max_length must be in [2, n_positions={cfg.n_positions}], got {max_length}")
        self.slots, self.steps_per_call = int(slots), int(steps_per_call)
        self.eos_ids = [int(e) for e in ([eos_ids] if isinstance(eos_ids, (int, np.integer)) else eos_ids or [])]
        self.pad_id = int(pad_id)
        self.max_keywords, self.max_keyword_tokens = int(max_keywords), int(max_keyword_tokens)
        self.max_prefill = min(self.slots, max_prefill or self.slots)
        if mesh is not None:
            model = shard_model(model, mesh)
        self.mesh = mesh
        self._graphdef, self._state = nnx.split(model)
        eos_mask_V = np.zeros((cfg.vocab_size,), bool)
        eos_mask_V[self.eos_ids] = True
        glue_mask_V = np.zeros((cfg.vocab_size,), bool)
        glue_mask_V[[int(i) for i in glue_ids if 0 <= i < cfg.vocab_size]] = True
        self._masks = programs.TokenMasks(eos_V=self._place(eos_mask_V, batched=False),
                                          glue_V=self._place(glue_mask_V, batched=False))
        self._table = self._new_table()
        self._queue: deque[tuple[int, Request]] = deque()
        self._slot: list[Optional[_Live]] = [None] * self.slots
        self._cancelled: set[int] = set()
        self._next_rid = 0

    # --- placement ------------------------------------------------------------------------------------------

    def _place(self, x, batched: bool):
        if self.mesh is None:
            return jnp.asarray(x)
        split = batched and self.slots % data_parallel_size(self.mesh) == 0
        spec = PartitionSpec(BATCH_AXES) if split else PartitionSpec()
        return jax.device_put(x, NamedSharding(self.mesh, spec) if split else replicated(self.mesh))

    def _new_table(self) -> programs.Table:
        table = programs.empty_table(self.config, self.slots, self.max_length, self.max_keywords,
                                     self.max_keyword_tokens)
        return jax.tree.map(lambda x: self._place(x, batched=True), table)

    # --- requests -------------------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """Raise GPT2JaxError (one line) if `request` cannot run on this engine."""
        if not isinstance(request, Request):
            raise GPT2JaxError(f"expected an engine Request, got {type(request).__name__}")
        V, n_pos = self.config.vocab_size, self.config.n_positions
        prompt = request.prompt
        if not isinstance(prompt, (tuple, list)) or not prompt:
            raise GPT2JaxError("empty prompt: a request needs at least one prompt token")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise GPT2JaxError("the prompt must hold integer token ids")
        bad = [int(t) for t in prompt if not 0 <= t < V]
        if bad:
            raise GPT2JaxError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        check_sampling(max_new_tokens=request.max_new_tokens, do_sample=request.do_sample,
                       temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                       repetition_penalty=request.repetition_penalty, min_new_tokens=request.min_new_tokens,
                       seed=request.seed, keyword_boost=request.keyword_boost,
                       keyword_wait=request.keyword_wait, penalize_prompt=bool(request.penalize_prompt))
        total = len(prompt) + request.max_new_tokens
        if total > n_pos:
            raise GPT2JaxError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) = "
                               f"{total} exceeds the model's n_positions ({n_pos})")
        if total > self.max_length:
            raise GPT2JaxError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) = "
                               f"{total} exceeds the engine's max_length ({self.max_length})")
        kws = request.keywords
        if not isinstance(kws, (tuple, list)) or len(kws) > self.max_keywords:
            raise GPT2JaxError(f"keywords: at most {self.max_keywords} keyword token-id sequences, got "
                               f"{len(kws) if isinstance(kws, (tuple, list)) else repr(kws)}")
        for k, seq in enumerate(kws):
            if (not isinstance(seq, (tuple, list)) or not seq or len(seq) > self.max_keyword_tokens
                    or not all(isinstance(t, (int, np.integer)) and 0 <= t < V for t in seq)):
                raise GPT2JaxError(f"keywords[{k}] must be 1 to {self.max_keyword_tokens} token ids in "
                                   f"[0, {V}), got {seq!r}")
        lp = request.logprobs
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, (int, np.integer))
                               or not 0 <= lp <= TOP_LOGPROBS):
            raise GPT2JaxError(f"logprobs must be None or an integer in [0, {TOP_LOGPROBS}], got {lp!r}")

    def add(self, request: Request) -> int:
        """Check and queue `request`; its request id."""
        self.check(request)
        rid = self._next_rid
        self._next_rid += 1
        self._queue.append((rid, request))
        return rid

    def cancel(self, rid: int) -> None:
        """Free the request's slot (or drop it from the queue) before the next step; it reports "cancelled"."""
        self._cancelled.add(rid)

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slot)

    # --- one step -------------------------------------------------------------------------------------------

    def step(self) -> list[Output]:
        """Admit queued requests into free slots, decode for every active slot; this step's Outputs."""
        outs: list[Output] = []
        self._drop_cancelled(outs)
        self._admit(outs)
        if self.active:
            self._decode(outs)
        return outs

    def _drop_cancelled(self, outs: list[Output]) -> None:
        if not self._cancelled:
            return
        cancelled = lambda rid: Output(rid, [], None, None, True, "cancelled")
        kept = deque()
        for rid, req in self._queue:
            (outs.append(cancelled(rid)) if rid in self._cancelled else kept.append((rid, req)))
        self._queue = kept
        for s, live in enumerate(self._slot):
            if live is not None and live.rid in self._cancelled:
                outs.append(cancelled(live.rid))
                self._slot[s] = None
        self._cancelled.clear()

    def _admit(self, outs: list[Output]) -> None:
        free = [s for s, live in enumerate(self._slot) if live is None]
        take = []
        while self._queue and len(take) < len(free):
            take.append(self._queue.popleft())
        groups: dict[int, list] = {}
        for item in take:
            groups.setdefault(self._prompt_bucket(len(item[1].prompt)), []).append(item)
        for P, items in sorted(groups.items()):
            for i in range(0, len(items), self.max_prefill):
                chunk = items[i:i + self.max_prefill]
                slots, free = free[:len(chunk)], free[len(chunk):]
                self._prefill_or_fail(P, chunk, slots, outs)

    def _prompt_bucket(self, n: int) -> int:
        return min(bucket_length(n, MIN_BUCKET), self.max_length)

    def _prefill_or_fail(self, P: int, chunk, slots, outs: list[Output]) -> None:
        """Prefill a chunk together; if that fails, each request alone, so that a bad one fails by itself."""
        try:
            self._prefill(P, chunk, slots, outs)
        except Exception as e:  # noqa: BLE001 - a request's failure is reported, the engine goes on
            if len(chunk) > 1:
                for item, slot in zip(chunk, slots):
                    self._prefill_or_fail(P, [item], [slot], outs)
                return
            log.exception(f"request {chunk[0][0]} failed in prefill")
            outs.append(Output(chunk[0][0], [], None, None, True, "error", error=f"{type(e).__name__}: {e}"))
            self._table = self._table if _alive(self._table) else self._new_table_keeping(outs)

    def _prefill(self, P: int, chunk, slots, outs: list[Output]) -> None:
        n = len(chunk)
        B = min(bucket_length(n, 1), self.max_prefill)  # row buckets: powers of two, up to max_prefill
        V = self.config.vocab_size
        ids_BP = np.full((B, P), self.pad_id, np.int32)
        len_B = np.zeros((B,), np.int32)
        rows = programs.empty_rows(B, V, self.max_keywords, self.max_keyword_tokens)
        for b, (rid, req) in enumerate(chunk):
            ids_BP[b, :len(req.prompt)] = req.prompt
            len_B[b] = len(req.prompt)
            _set_row(rows, b, req, V)
        slot_B = np.full((B,), self.slots, np.int32)  # padding rows: dropped by insert
        slot_B[:n] = slots
        k, v, valid, rows_B, chosen = programs.prefill(self._state, ids_BP, len_B, rows, self._masks,
                                                       graphdef=self._graphdef)
        self._table = programs.insert(self._table, k, v, valid, rows_B, slot_B)
        chosen = jax.device_get(chosen)
        for b, (rid, req) in enumerate(chunk):
            live = _Live(rid, req)
            self._slot[slots[b]] = live
            out = self._output(live, [int(chosen.token[b])], [float(chosen.logprob[b])],
                               [chosen.top_ids_RA[b]], [chosen.top_logprobs_RA[b]])
            outs.append(out)
            if out.finished:
                self._slot[slots[b]] = None

    def _decode(self, outs: list[Output]) -> None:
        occupied_S = np.array([s is not None for s in self._slot])
        try:
            self._table, chosen = programs.decode(self._state, self._table, self._place(occupied_S, batched=True),
                                                  self._masks, graphdef=self._graphdef,
                                                  steps=self.steps_per_call)
            # Only the tokens come back unless a request asked for logprobs.
            want_lp = any(live is not None and live.request.logprobs is not None for live in self._slot)
            chosen = jax.device_get(chosen if want_lp else chosen.replace(logprob=None, top_ids_RA=None,
                                                                          top_logprobs_RA=None))
        except Exception as e:  # noqa: BLE001 - every active request fails; the engine goes on
            log.exception("decode failed")
            for s, live in enumerate(self._slot):
                if live is not None:
                    outs.append(Output(live.rid, [], None, None, True, "error", error=f"{type(e).__name__}: {e}"))
                    self._slot[s] = None
            self._table = self._new_table()
            return
        for s, live in enumerate(self._slot):
            if live is None:
                continue
            toks = chosen.token[s]
            n = int(np.sum(toks >= 0))
            if live.request.logprobs is None:
                out = self._output(live, toks[:n].tolist(), None, None, None)
            else:
                out = self._output(live, toks[:n].tolist(), chosen.logprob[s, :n], chosen.top_ids_RA[s, :n],
                                   chosen.top_logprobs_RA[s, :n])
            outs.append(out)
            if out.finished:
                self._slot[s] = None

    def _output(self, live: _Live, toks: list[int], lps, top_ids, top_lps) -> Output:
        """The Output of a request's new tokens: cut at EOS, finished at EOS or at max_new_tokens."""
        req, eos = live.request, self.eos_ids
        reason = None
        for i, t in enumerate(toks):
            live.emitted += 1
            if t in eos:
                toks, reason = toks[:i], "stop"
                break
            if live.emitted >= req.max_new_tokens:
                toks, reason = toks[:i + 1], "length"
                break
        n = len(toks)
        logprobs = top = None
        if req.logprobs is not None:
            logprobs = [float(x) for x in lps[:n]]
            top = [{int(i): float(x) for i, x in zip(top_ids[j][:req.logprobs], top_lps[j][:req.logprobs])}
                   for j in range(n)]
        return Output(live.rid, toks, logprobs, top, reason is not None, reason)

    def _new_table_keeping(self, outs):  # pragma: no cover - the table died with a donated buffer
        for s, live in enumerate(self._slot):
            if live is not None:
                outs.append(Output(live.rid, [], None, None, True, "error", error="the engine's state was lost"))
                self._slot[s] = None
        return self._new_table()


def _alive(table) -> bool:
    return not any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(table))


def _set_row(rows: programs.Rows, b: int, req: Request, vocab_size: int) -> None:
    """Row b of numpy Rows from a checked request (generate's conversions: SamplingParams.of)."""
    p = rows.p
    p.do_sample[b] = bool(req.do_sample)
    p.temperature[b] = req.temperature if req.do_sample else 1.0
    p.top_k[b] = min(req.top_k, vocab_size)
    p.top_p[b] = req.top_p
    p.top_p_cut[b] = one_minus_top_p(req.top_p)
    p.repetition_penalty[b] = req.repetition_penalty
    p.penalize_prompt[b] = bool(req.penalize_prompt)
    p.min_new_tokens[b] = min(req.min_new_tokens, 2**30)
    p.max_new_tokens[b] = req.max_new_tokens
    p.seed[b] = req.seed % 2**32
    p.keyword_boost[b] = req.keyword_boost
    for k, v in keyword_guidance(req.keyword_wait).items():
        getattr(p, f"keyword_{k}")[b] = v
    p.logprobs[b] = req.logprobs is not None
    for k, seq in enumerate(req.keywords):
        rows.kw_RKL[b, k, :len(seq)] = seq


def run_all(engine: Engine, requests: Sequence[Request]) -> list[list[int]]:
    """Every request's new tokens (EOS cut), in order: add them all, step until done."""
    rids = [engine.add(r) for r in requests]
    got: dict[int, list[int]] = {rid: [] for rid in rids}
    left = set(rids)
    while left:
        for out in engine.step():
            got[out.rid].extend(out.tokens)
            if out.finished:
                left.discard(out.rid)
                if out.finish_reason == "error":
                    raise GPT2JaxError(f"request {out.rid} failed: {out.error}")
    return [got[rid] for rid in rids]
