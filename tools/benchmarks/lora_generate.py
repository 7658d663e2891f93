"""`tools/bench.py lora-generate`: sampling with a LoRA adapter, merged once or applied inside the loop.

On random GPT-2 weights saved by transformers and a random PEFT adapter for them (rank --rank on c_attn,
c_proj and c_fc), in one process, rounds interleaved so that a noisy machine slows every variant alike:
- `base`: the base model alone;
- `merged`: `load_pretrained(base, adapter=DIR)`, the adapter folded into the kernels once (what
  tools/generate.py --adapter runs);
- `in-loop`: the base with `LoraLinear` layers, `scale * (x @ A) @ B` computed at every step of the jitted loop.
Fields: impl, preset, batch, prompt, new_tokens, rank, load_s (load with the adapter, merge included),
compile_s (first call minus a steady call), steady_s (median of --repeats rounds), min_s (the fastest
round: on a shared machine the least disturbed), tokens_per_s (from steady_s), vs_base and min_vs_base
(steady_s and min_s over base's). Then one line of sizes on disk: the adapter directory against the merged
export (the Hugging Face directory hf.save_pretrained writes, and its model.safetensors alone).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks.generate import PRESETS, _prompts, _weights_dir


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _models(weights: str, adapter: str, lora, config):
    """{impl: (model, load seconds)}."""
    from gpt2_jax.checkpoints.hf import load_hf_config, params_from_state_dict, read_hf_state_dict
    from gpt2_jax.checkpoints.peft import read_adapter
    from gpt2_jax.checkpoints.pretrained import load_pretrained
    from gpt2_jax.model.layout import model_from_params

    out = {}
    t0 = time.perf_counter()
    out["base"] = (load_pretrained(weights), time.perf_counter() - t0)
    t0 = time.perf_counter()
    out["merged"] = (load_pretrained(weights, adapter=adapter), time.perf_counter() - t0)
    t0 = time.perf_counter()
    fmt, state = read_hf_state_dict(weights)
    flat = params_from_state_dict(load_hf_config(weights), state, os.path.join(weights, fmt))
    _, adapters = read_adapter(adapter, config)
    out["in-loop"] = (model_from_params(config, {**flat, **adapters}, lora=lora), time.perf_counter() - t0)
    return out


def bench(args) -> None:
    import jax

    from gpt2_jax.checkpoints.hf import load_hf_config, save_pretrained
    from gpt2_jax.checkpoints.peft import write_adapter
    from gpt2_jax.model.lora import LoraConfig, adapter_shapes
    from gpt2_jax.sample.generate import generate

    root = args.cache_dir or tempfile.mkdtemp(prefix="gpt2-jax-bench-")
    weights = _weights_dir(args.preset, root)
    config = load_hf_config(weights)
    lora = LoraConfig(rank=args.rank, alpha=2.0 * args.rank)
    rng = np.random.default_rng(0)
    adapters = {k: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
                for k, s in adapter_shapes(config, lora).items()}
    adapter = write_adapter(os.path.join(root, f"adapter-{args.preset}-r{args.rank}"), config, lora, adapters)
    models = _models(weights, adapter, lora, config)
    pad = PRESETS[args.preset]["vocab_size"] - 1
    for batch in args.batch:
        ids, mask = _prompts(batch, args.prompt, PRESETS[args.preset]["vocab_size"])

        def run(model):
            out = generate(model, ids, mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=True, top_k=50, top_p=0.9, pad_token_id=pad, seed=0)
            return np.asarray(jax.block_until_ready(out))

        first, times = {}, {impl: [] for impl in models}
        for impl, (model, _) in models.items():
            t0 = time.perf_counter()
            run(model)
            first[impl] = time.perf_counter() - t0
        for _ in range(args.repeats):
            for impl, (model, _) in models.items():
                t0 = time.perf_counter()
                run(model)
                times[impl].append(time.perf_counter() - t0)
        base, base_min = statistics.median(times["base"]), min(times["base"])
        for impl, (_, load_s) in models.items():
            steady = statistics.median(times[impl])
            print(json.dumps(dict(impl=impl, preset=args.preset, batch=batch, prompt=args.prompt,
                                  new_tokens=args.new_tokens, rank=args.rank, load_s=round(load_s, 2),
                                  compile_s=round(max(first[impl] - steady, 0.0), 2), steady_s=round(steady, 4),
                                  min_s=round(min(times[impl]), 4),
                                  tokens_per_s=round(batch * args.new_tokens / steady, 1),
                                  vs_base=round(steady / base, 3),
                                  min_vs_base=round(min(times[impl]) / base_min, 3))), flush=True)
    merged_dir = save_pretrained(models["merged"][0], os.path.join(root, f"merged-{args.preset}-r{args.rank}"))
    print(json.dumps(dict(sizes=args.preset, rank=args.rank, targets=list(lora.targets),
                          adapter_bytes=_dir_bytes(adapter),
                          merged_export_bytes=_dir_bytes(merged_dir),
                          merged_safetensors_bytes=os.path.getsize(os.path.join(merged_dir, "model.safetensors")),
                          ratio=round(_dir_bytes(adapter) / _dir_bytes(merged_dir), 5))), flush=True)
