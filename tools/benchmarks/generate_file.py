"""`tools/bench.py generate-file`: tools/generate.py --input's tokens/s at each batch size, interleaved over
rounds after a warm-up round (which compiles every bucket), on a model and a file of rows; side by side, the
engine (`generate_file`: finished slots refilled) and the batched path it replaced (`batched_file` below:
each planned batch decoded by `generate` until its longest row ends)."""
from __future__ import annotations

import json
import os
import tempfile
import time

from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.data.rows import read_rows
from gpt2_jax.sample.file import generate_file, plan_batches
from gpt2_jax.sample.generate import generate_tokens
from gpt2_jax.tokenizer import load_tokenizer


def batched_file(model, tok, input_path: str, batch_size: int, max_new_tokens: int, **sampling) -> dict:
    """The batched path before the engine: generate over each planned batch; its new tokens and seconds."""
    rows = read_rows(input_path, skip_bad_rows=True, with_text=False)
    prompts = [tok.format_prompt(r.title, r.keywords) for r in rows]
    budget = [min(max_new_tokens, model.config.n_positions - len(p)) for p in prompts]
    ok = [i for i, b in enumerate(budget) if b >= 1]
    t0, generated = time.perf_counter(), 0
    for b, batch in enumerate(plan_batches([len(prompts[i]) for i in ok], [budget[i] for i in ok], batch_size)):
        batch = [ok[j] for j in batch]
        new = generate_tokens(model, tok, [prompts[i] for i in batch], max_new_tokens=budget[batch[0]], seed=b,
                              **sampling)
        generated += sum(map(len, new))
    seconds = time.perf_counter() - t0
    return {"written": len(ok), "new_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


def bench(model_path: str, input_path: str, batch_sizes: list[int], max_new_tokens: int, min_new_tokens: int,
          rounds: int, paths=("engine", "batched")) -> None:
    """One JSON line per batch size and timed round (`generate_file`'s counts and tokens/s)."""
    model, tok = load_pretrained(model_path), load_tokenizer(model_path)
    sampling = dict(do_sample=True, top_k=30, top_p=0.7, temperature=0.9, repetition_penalty=2.0,
                    min_new_tokens=min_new_tokens)
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(rounds + 1):
            for bs, path in ((bs, path) for bs in batch_sizes for path in paths):
                out = os.path.join(d, f"{rnd}-{bs}-{path}.jsonl")
                stats = (generate_file(model, tok, input_path, out, batch_size=bs, max_new_tokens=max_new_tokens,
                                       progress=False, **sampling) if path == "engine" else
                         batched_file(model, tok, input_path, bs, max_new_tokens, **sampling))
                if rnd:  # round 0 compiles
                    print(json.dumps({"bench": "generate_file", "path": path, "model": model_path,
                                      "input": input_path, "batch_size": bs, "min_new_tokens": min_new_tokens, "round": rnd,
                                      "rows": stats["written"],
                                      "new_tokens": stats["new_tokens"], "seconds": round(stats["seconds"], 3),
                                      "tokens_per_s": round(stats["tokens_per_s"], 1)}), flush=True)
