"""`tools/bench.py serve`: the continuous-batching engine (sample/engine.py) under Poisson arrivals, in process.

Requests take the held-out rows' own lengths (prompt: `[BOS] title [SEP] keywords [SEP]` in the demo run's
tokenizer; output: the row's text, capped by --max-new and the context) and arrive at --rates requests/s
(exponential gaps, seeded), on the wall clock: the driver adds a request once its arrival time has passed
and steps the engine while anything is in flight. Models are random (greedy, no EOS, so every request runs
to its own length). Modes, side by side in one process:
- continuous: every step admits what has arrived into free slots;
- static: the same engine in static batches: wait until S requests have arrived (or none are left to
  come), run them until all finish, then the next S;
- transformers: torch's `generate` one request at a time (a streamer times each token), at the first rate.
- decode: tokens/s of the decode step alone with every slot busy, for each --steps-per-call (tokens per host
  round trip), interleaved over rounds.
One JSON line per (model, mode, slots, rate): throughput (new tokens/s over the run), p50/p99 time to first
token (arrival to first token) and p50/p99 per-token latency (time between a request's tokens after its first).
A warm-up pass over every prompt bucket and row bucket compiles the engine first (not timed).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.data.rows import read_rows, resolve_corpus
from gpt2_jax.data.split_stats import split_indices
from gpt2_jax.sample.engine import Engine, Request
from gpt2_jax.tokenizer import load_tokenizer

MODELS = {
    "demo": dict(n_embd=256, n_layer=4, n_head=4, n_positions=128, vocab_size=4000),  # configs/demo.yaml
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
}


def held_out_lengths(tokenizer_dir: str, cache_dir: str, n_ctx: int, max_new: int, count: int, seed: int = 0):
    """(prompt length, new tokens) of `count` held-out rows of builtin:stdlib-docs (cycled if fewer)."""
    tok = load_tokenizer(tokenizer_dir)
    rows = read_rows(resolve_corpus("builtin:stdlib-docs", cache_dir))
    _, val = split_indices(len(rows), 0.02, seed)
    out = []
    for i in val:
        p = min(len(tok.format_prompt(rows[i].title, rows[i].keywords)), n_ctx // 2)
        out.append((p, max(1, min(max_new, len(tok.encode(rows[i].text)), n_ctx - p))))
    return [out[j % len(out)] for j in range(count)]


def _model(name: str, root: str):
    import torch
    import transformers
    path = os.path.join(root, f"serve-{name}")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(**MODELS[name])).save_pretrained(path)
    return path


def _requests(lengths, vocab: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    return [Request(tuple(int(t) for t in rng.integers(0, vocab, p)), n) for p, n in lengths]


def _summary(arrive, first, done, counts, t_end, t0) -> dict:
    ttft = [first[i] - arrive[i] for i in first]
    per_tok = [(done[i] - first[i]) / (counts[i] - 1) for i in done if counts[i] > 1]
    pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 1) if xs else None  # noqa: E731
    return {"requests": len(done), "new_tokens": int(sum(counts.values())),
            "tokens_per_s": round(sum(counts.values()) / (t_end - t0), 1),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "per_token_p50_ms": pct(per_tok, 50), "per_token_p99_ms": pct(per_tok, 99)}


def drive(engine: Engine, requests: list[Request], gaps: np.ndarray, static: bool) -> dict:
    """Run `requests` arriving after `gaps` seconds each on the wall clock; the latency/throughput summary."""
    t0 = time.perf_counter()
    arrive = t0 + np.cumsum(gaps)
    first, done, counts, rid_of = {}, {}, {}, {}
    nxt, S = 0, engine.slots
    while len(done) < len(requests):
        now = time.perf_counter()
        arrived = int(np.searchsorted(arrive, now, side="right"))
        if static:  # a batch starts once S have arrived (or the rest), and only when the engine is empty
            if not engine.active and not engine.pending and (arrived - nxt >= S or arrived == len(requests)):
                for i in range(nxt, min(nxt + S, arrived)):
                    rid_of[engine.add(requests[i])] = i
                nxt = min(nxt + S, arrived)
        else:
            for i in range(nxt, arrived):
                rid_of[engine.add(requests[i])] = i
            nxt = max(nxt, arrived)
        if not engine.active and not engine.pending:
            if nxt < len(requests):
                time.sleep(max(0.0, arrive[min(nxt + (S - 1 if static else 0), len(requests) - 1)]
                               - time.perf_counter()))
            continue
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            i = rid_of[o.rid]
            if o.tokens:
                first.setdefault(i, now)
                counts[i] = counts.get(i, 0) + len(o.tokens)
            if o.finished:
                done[i] = now
    return _summary(arrive, first, done, counts, time.perf_counter(), t0)


def drive_transformers(path: str, requests: list[Request], gaps: np.ndarray) -> dict:
    """torch's `generate`, one request at a time in arrival order (greedy, exactly the request's length)."""
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    with torch.no_grad():  # warm-up
        model.generate(torch.tensor([requests[0].prompt]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    t0 = time.perf_counter()
    arrive = t0 + np.cumsum(gaps)
    first, done, counts = {}, {}, {}
    for i, r in enumerate(requests):
        time.sleep(max(0.0, arrive[i] - time.perf_counter()))
        clock = Clock()
        with torch.no_grad():
            model.generate(torch.tensor([r.prompt]), max_new_tokens=r.max_new_tokens, min_new_tokens=r.max_new_tokens,
                           do_sample=False, pad_token_id=0, streamer=clock)
        first[i], done[i], counts[i] = clock.times[1], clock.times[-1], len(clock.times) - 1  # times[0]: the prompt
    return _summary(arrive, first, done, counts, time.perf_counter(), t0)


def warm_up(engine: Engine, requests: list[Request]) -> None:
    """Compile every (prompt bucket, row bucket) prefill and the decode step before timing."""
    by_bucket = {}
    for r in requests:
        by_bucket.setdefault(engine._prompt_bucket(len(r.prompt)), r)
    for r in by_bucket.values():
        n = 1
        while True:
            for _ in range(min(n, engine.slots)):
                engine.add(Request(r.prompt, 2))
            while engine.active or engine.pending:
                engine.step()
            if n >= engine.slots:
                break
            n *= 2


def decode_speed(model, S: int, steps_list: list[int], prompt: int, new: int, rounds: int = 3) -> list[dict]:
    """Tokens/s of the engine with all S slots busy, for each steps-per-call, interleaved over rounds."""
    engines = {k: Engine(model, slots=S, eos_ids=[], pad_id=0, max_length=prompt + new, steps_per_call=k)
               for k in steps_list}
    reqs = _requests([(prompt, new)] * S, model.config.vocab_size)
    times = {k: [] for k in steps_list}
    for rnd in range(rounds + 1):
        for k, engine in engines.items():
            for r in reqs:
                engine.add(r)
            engine.step()  # admits all S (prefill) and decodes its first call
            t0, n = time.perf_counter(), 0
            while engine.active:
                n += sum(len(o.tokens) for o in engine.step())
            if rnd:  # round 0 compiles
                times[k].append(n / (time.perf_counter() - t0))
    return [{"slots": S, "steps_per_call": k, "decode_tokens_per_s": [round(t, 1) for t in times[k]]}
            for k in steps_list]


def bench(models: list[str], slots: list[int], rates: list[float], count: int, max_new: int, modes: list[str],
          tokenizer_dir: str, steps_per_call: list[int], seed: int = 0) -> None:
    cache = os.path.expanduser("~/.cache/gpt2-jax/data")
    with tempfile.TemporaryDirectory() as root:
        for name in models:
            path = _model(name, root)
            model = load_pretrained(path)
            cfg = model.config
            lengths = held_out_lengths(tokenizer_dir, cache, cfg.n_positions, max_new, count, seed)
            requests = _requests(lengths, cfg.vocab_size, seed)
            max_length = min(cfg.n_positions, max(p + n for p, n in lengths))
            ident = {"bench": "serve", "model": name, "requests": count,
                     "prompt_mean": round(float(np.mean([p for p, _ in lengths])), 1),
                     "new_mean": round(float(np.mean([n for _, n in lengths])), 1)}
            if "decode" in modes:
                for S in slots:
                    for row in decode_speed(model, S, steps_per_call, 32, max_new):
                        print(json.dumps({"bench": "serve", "model": name, "mode": "decode", **row}), flush=True)
            for S in (s for s in slots if set(modes) & {"continuous", "static"}):
                engine = Engine(model, slots=S, eos_ids=[], pad_id=0, max_length=max_length,
                                steps_per_call=steps_per_call[0])
                warm_up(engine, requests)
                for rate in rates:
                    gaps = np.random.default_rng([seed, int(rate * 1000)]).exponential(1 / rate, count)
                    for mode in (m for m in modes if m in ("continuous", "static")):
                        row = drive(engine, requests, gaps, static=mode == "static")
                        print(json.dumps({**ident, "mode": mode, "slots": S, "rate": rate, **row}), flush=True)
            if "transformers" in modes:
                gaps = np.random.default_rng([seed, int(rates[0] * 1000)]).exponential(1 / rates[0], count)
                row = drive_transformers(path, requests, gaps)
                print(json.dumps({**ident, "mode": "transformers", "slots": 1, "rate": rates[0], **row}), flush=True)
