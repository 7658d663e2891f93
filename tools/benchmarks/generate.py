"""`tools/bench.py generate`: sampling speed against transformers' PyTorch and jitted Flax `generate`.

Times sampling (prompt 32, 64 new tokens, top-k 50, top-p 0.9 by default) for gpt2-jax and, on the same
randomly initialised weights, transformers' PyTorch `generate` and its Flax `generate` wrapped in `jax.jit`.
Each implementation runs in its own process, so peak RSS is its own. Fields: impl, preset, batch, prompt,
new_tokens, compile_s (first call minus a steady call), steady_s (median of --repeats calls), tokens_per_s
(batch * new_tokens / steady_s), peak_rss_mb.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import tempfile
import time

import numpy as np

from benchmarks.children import child_command, child_rows

# The frameworks are imported inside the functions that run in the child: each child loads only its own
# implementation's (PyTorch, JAX, transformers; its peak RSS is its own), the parent none of them.

PRESETS = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=256, bos_token_id=999, eos_token_id=999),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
}
IMPLS = ("jax", "jax-warm", "torch", "flax")
IMPL_NAMES = {"jax": "gpt2-jax", "jax-warm": "gpt2-jax-warm-cache", "torch": "transformers-pytorch",
              "flax": "transformers-flax-jit"}


def _weights_dir(preset: str, root: str) -> str:
    """Random GPT-2 weights saved by transformers, shared by all implementations."""
    path = os.path.join(root, f"weights-{preset}")
    if not os.path.isdir(path):
        import torch
        import transformers
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(**PRESETS[preset])).save_pretrained(path)
    return path


def _prompts(batch: int, prompt: int, vocab: int, seed: int = 0):
    """Left-padded prompts of unequal length (the last row is full length)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab - 1, size=(batch, prompt)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(batch - 1):
        pad = int(rng.integers(0, prompt // 4))
        mask[row, :pad] = 0
        ids[row, :pad] = vocab - 1
    return ids, mask


def _time(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times)
    return max(first - steady, 0.0), steady


def _runner(impl: str, path: str, args, ids, mask):
    """A no-argument callable that generates `args.new_tokens` tokens for every row and waits for them."""
    pad = PRESETS[args.preset]["vocab_size"] - 1
    # min_new_tokens = new_tokens: every implementation produces exactly as many tokens.
    kw = dict(do_sample=True, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)
    if impl in ("jax", "jax-warm"):
        import gpt2_jax
        model = gpt2_jax.load_pretrained(path)
        return lambda: np.asarray(gpt2_jax.generate(model, ids, mask, max_new_tokens=args.new_tokens,
                                                    min_new_tokens=args.new_tokens, pad_token_id=pad, **kw))
    if impl == "torch":
        import torch
        import transformers
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
        t_ids, t_mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask)
        return lambda: model.generate(t_ids, attention_mask=t_mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, pad_token_id=pad, **kw).numpy()
    if impl == "flax":
        import jax
        import transformers
        model = transformers.FlaxGPT2LMHeadModel.from_pretrained(path, from_pt=True)
        total = ids.shape[1] + args.new_tokens

        # Plain Flax generate retraces its loop on every call; under jit it compiles once.
        @jax.jit
        def gen(params, ids, mask, key):
            return model.generate(ids, attention_mask=mask, params=params, prng_key=key, max_length=total,
                                  min_length=total, pad_token_id=pad, **kw).sequences

        keys = iter(jax.random.split(jax.random.PRNGKey(0), 1000))
        return lambda: np.asarray(gen(model.params, ids, mask, next(keys)))
    raise SystemExit(f"unknown impl {impl!r}")


def child(args) -> None:
    """One implementation on one preset and batch size (`--child`): one JSON line."""
    args.preset = args.preset[0]
    if args.compile_cache:
        from gpt2_jax.runtime import enable_compilation_cache
        enable_compilation_cache(args.compile_cache)
    ids, mask = _prompts(args.batch[0], args.prompt, PRESETS[args.preset]["vocab_size"])
    run = _runner(args.impl[0], args.weights, args, ids, mask)
    compile_s, steady_s = _time(run, args.repeats)  # the first timed call is the very first call
    out = run()
    assert out.shape == (ids.shape[0], ids.shape[1] + args.new_tokens), out.shape
    print(json.dumps(dict(
        impl=IMPL_NAMES[args.impl[0]],
        preset=args.preset, batch=args.batch[0], prompt=args.prompt, new_tokens=args.new_tokens,
        compile_s=round(compile_s, 3), steady_s=round(steady_s, 4),
        tokens_per_s=round(args.batch[0] * args.new_tokens / steady_s, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))), flush=True)


def bench(args) -> None:
    """A child process per (preset, batch, impl), one JSON line each."""
    root = args.cache_dir or tempfile.mkdtemp(prefix="gpt2-jax-bench-")
    for preset in args.preset:
        weights = _weights_dir(preset, root)
        for batch in args.batch:
            for impl in args.impl:
                cmd = child_command("generate", "--weights", weights, "--preset", preset, "--batch", str(batch),
                                    "--impl", impl, "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens),
                                    "--top-k", str(args.top_k), "--top-p", str(args.top_p),
                                    "--temperature", str(args.temperature), "--repeats", str(args.repeats))
                if impl == "jax-warm":
                    # A second process over a persistent compilation cache that a first one filled.
                    cmd += ["--compile-cache", tempfile.mkdtemp(prefix="xla-", dir=root)]
                    subprocess.run(cmd, capture_output=True, text=True)
                row = child_rows(cmd, dict(impl=impl, preset=preset, batch=batch))[-1]
                print(json.dumps(row), flush=True)
