"""`tools/bench.py generate-file`: tools/generate.py --input's tokens/s at each batch size, interleaved over
rounds after a warm-up round (which compiles every bucket), on a model and a file of rows."""
from __future__ import annotations

import json
import os
import tempfile

from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.sample.file import generate_file
from gpt2_jax.tokenizer import load_tokenizer


def bench(model_path: str, input_path: str, batch_sizes: list[int], max_new_tokens: int, min_new_tokens: int,
          rounds: int) -> None:
    """One JSON line per batch size and timed round (`generate_file`'s counts and tokens/s)."""
    model, tok = load_pretrained(model_path), load_tokenizer(model_path)
    sampling = dict(do_sample=True, top_k=30, top_p=0.7, temperature=0.9, repetition_penalty=2.0,
                    min_new_tokens=min_new_tokens)
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(rounds + 1):
            for bs in batch_sizes:
                out = os.path.join(d, f"{rnd}-{bs}.jsonl")
                stats = generate_file(model, tok, input_path, out, batch_size=bs, max_new_tokens=max_new_tokens,
                                      progress=False, **sampling)
                if rnd:  # round 0 compiles
                    print(json.dumps({"bench": "generate_file", "model": model_path, "input": input_path,
                                      "batch_size": bs, "min_new_tokens": min_new_tokens, "round": rnd,
                                      "rows": stats["written"],
                                      "new_tokens": stats["new_tokens"], "seconds": round(stats["seconds"], 3),
                                      "tokens_per_s": round(stats["tokens_per_s"], 1)}), flush=True)
