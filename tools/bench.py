"""Benchmarks that print one JSON object per measurement.

    python tools/bench.py generate [--preset tiny gpt2] [--batch 1 8] [--impl jax torch flax]
    python tools/bench.py train [--shapes tiny,gpt2] [--batch 4] [--seq 128] [--steps 5] [--dtype float32]
                                [--impls jax,jax-last6,jax-head,flax,gemm] [--interleave]

`generate` times sampling (prompt 32, 64 new tokens, top-k 50, top-p 0.9 by default) for gpt2-jax and,
on the same randomly initialised weights, transformers' PyTorch `generate` and its Flax `generate`
wrapped in `jax.jit`. Each implementation runs in its own process, so peak RSS is its own.
Fields: impl, preset, batch, prompt, new_tokens, compile_s (first call minus a steady call), steady_s
(median of --repeats calls), tokens_per_s (batch * new_tokens / steady_s), peak_rss_mb.

`train` times one optimiser step on one device, on the same random token batches (every token counted),
for gpt2-jax's train step (AdamW with the default config, dropout 0) training every parameter (`jax`),
the top half of the blocks (`jax-last6`: 6 of GPT-2's 12) or the tied head alone (`jax-head`), and for
transformers' FlaxGPT2LMHeadModel under a jitted value_and_grad + optax AdamW step written the usual way
(`flax`), and for the step's matmuls alone (`gemm`: every product of a full gpt2-jax step, same shapes,
operands laid out as each product wants, one jitted program), the floor that no step built on this XLA's
matmuls goes below. Each runs in its own process, or with --interleave all in one process, a step of each
in turn, so that a noisy machine slows them alike. Fields: impl, shape, trainable, batch, seq, dtype, platform,
device, compile_s (first step minus the median), step_s (median of --steps steps), tokens_per_s,
mfu (flops.flops_per_token: 6N + 12LHQT, less the gradients that frozen parameters skip, over
peak_tflops from flops.peak_flops), peak_rss_mb; ratio_to_full (step_s / jax's) on jax-last6, jax-head and gemm, jax_speedup (jax's tokens_per_s /
flax's) on flax. The CPU defaults finish in minutes; on an accelerator try `--batch 8 --seq 1024
--dtype bfloat16 --steps 20`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from itertools import cycle

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=256, bos_token_id=999, eos_token_id=999),
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
}


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


def _child(args) -> None:
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
        impl={"jax": "gpt2-jax", "jax-warm": "gpt2-jax-warm-cache", "torch": "transformers-pytorch",
              "flax": "transformers-flax-jit"}[args.impl[0]],
        preset=args.preset, batch=args.batch[0], prompt=args.prompt, new_tokens=args.new_tokens,
        compile_s=round(compile_s, 3), steady_s=round(steady_s, 4),
        tokens_per_s=round(args.batch[0] * args.new_tokens / steady_s, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))), flush=True)


def _run_child_rows(cmd: list[str], ident: dict) -> list[dict]:
    """The JSON lines a child benchmark process printed, or [`ident` with the error that stopped it]."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode or not lines:
        return [dict(ident, error=(res.stderr.strip().splitlines() or ["no output"])[-1])]
    return [json.loads(l) for l in lines]


def _run_child(cmd: list[str], ident: dict) -> dict:
    """The last JSON line a child benchmark process printed, or `ident` with the error that stopped it."""
    return _run_child_rows(cmd, ident)[-1]


def generate_bench(args) -> None:
    if args.child:
        return _child(args)
    root = args.cache_dir or tempfile.mkdtemp(prefix="gpt2-jax-bench-")
    for preset in args.preset:
        weights = _weights_dir(preset, root)
        for batch in args.batch:
            for impl in args.impl:
                cmd = [sys.executable, __file__, "generate", "--child", "--weights", weights, "--preset", preset,
                       "--batch", str(batch), "--impl", impl, "--prompt", str(args.prompt),
                       "--new-tokens", str(args.new_tokens), "--top-k", str(args.top_k), "--top-p", str(args.top_p),
                       "--temperature", str(args.temperature), "--repeats", str(args.repeats)]
                if impl == "jax-warm":
                    # A second process over a persistent compilation cache that a first one filled.
                    cmd += ["--compile-cache", tempfile.mkdtemp(prefix="xla-", dir=root)]
                    subprocess.run(cmd, capture_output=True, text=True)
                print(json.dumps(_run_child(cmd, dict(impl=impl, preset=preset, batch=batch))), flush=True)


# --- train ----------------------------------------------------------------------------------------

# GPT2Config fields of the `train` shapes; --seq may not exceed n_positions.
TRAIN_SHAPES = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=4000, n_positions=1024),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}
TRAIN_IMPLS = ("jax", "jax-last6", "jax-head", "flax", "gemm")
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _train_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """`n` random next-token batches shaped [1, B, T] (one micro-batch), every token counted."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, size=(1, batch, seq + 1)).astype(np.int32)
        out.append({"input_ids": ids[..., :-1], "labels": ids[..., 1:], "loss_mask": np.ones((1, batch, seq), np.float32)})
    return out


def _jax_train(impl: str, shape: dict, args, batches):
    """(a no-argument callable that runs one gpt2-jax train step on the next batch and waits, what trains)."""
    import jax
    from gpt2_jax import sharding
    from gpt2_jax.train import step as steps
    from gpt2_jax.model.config import ModelConfig
    from gpt2_jax.train.config import load_train_config

    half = shape["n_layer"] // 2  # jax-last6: the top half of the blocks, 6 of GPT-2's 12
    overrides, trainable = {
        "jax": (["freeze.trainable=all"], "all"),
        "jax-last6": (["freeze.trainable=last_n_blocks", f"freeze.last_n_blocks={half}"],
                      f"last {half} of {shape['n_layer']} blocks"),
        "jax-head": (["freeze.trainable=head"], "head"),
    }[impl]
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    setup = steps.build_setup(ModelConfig(**shape, **NO_DROPOUT, dtype=args.dtype), load_train_config(None, overrides),
                                mesh)
    state = steps.init_state(setup)
    train_step, _ = steps.compile_steps(setup)
    placed = cycle([sharding.global_batch(b, mesh) for b in batches])

    def run():
        nonlocal state
        state, metrics = train_step(state, next(placed))
        jax.block_until_ready((state, metrics))

    return run, trainable, set(state.params)


def _flax_train(shape: dict, args, batches):
    """The reference: transformers' FlaxGPT2LMHeadModel with a jitted train step written the standard way."""
    import jax
    import jax.numpy as jnp
    import optax
    import transformers

    model = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(**shape, **NO_DROPOUT), seed=0,
                                             dtype=jnp.dtype(args.dtype))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.1))

    def loss_fn(params, batch, dropout_rng):
        logits = model(batch["input_ids"], params=params, dropout_rng=dropout_rng, train=False).logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
        return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch, dropout_rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, dropout_rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.params
    opt_state = tx.init(params)
    placed = cycle([jax.device_put({k: v[0] for k, v in b.items()}) for b in batches])
    dropout_rng = jax.random.PRNGKey(0)

    def run():
        nonlocal params, opt_state
        params, opt_state, loss = train_step(params, opt_state, next(placed), dropout_rng)
        jax.block_until_ready((params, opt_state, loss))

    return run, "all", None


def _gemm_shapes(shape: dict, batch: int, seq: int) -> list[tuple]:
    """(batch dims, m, k, n) of every matmul in one full train step of gpt2-jax: per block, the forward,
    input-gradient and weight-gradient products of c_attn, attn.c_proj, c_fc and mlp.c_proj, and attention's
    two forward and four backward products over causal query blocks as model.py computes them (the rows of
    a block against the keys up to its last row); then the tied head's three."""
    from gpt2_jax.model.attention import QUERY_CHUNK

    d, h, V, L = shape["n_embd"], shape["n_head"], shape["vocab_size"], shape["n_layer"]
    k, m = d // h, batch * seq
    out = []
    for _ in range(L):
        for din, dout in ((d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)):
            out += [((), m, din, dout), ((), m, dout, din), ((), din, m, dout)]
        for start in range(0, seq, QUERY_CHUNK):
            t = min(start + QUERY_CHUNK, seq) - start
            keys = start + t
            bh = (batch, h)
            out += [(bh, t, k, keys), (bh, t, keys, k),  # scores, probabilities @ values
                    (bh, t, k, keys), (bh, keys, t, k), (bh, t, keys, k), (bh, keys, t, k)]  # dP, dV, dQ, dK
    return out + [((), m, d, V), ((), m, V, d), ((), V, m, d)]


def _gemm_train(shape: dict, args):
    """The matmuls of one gpt2-jax train step and nothing else, operands already in the layout each product
    wants, in one jitted program: a floor under any train step built on this XLA's matmuls."""
    import jax
    import jax.numpy as jnp

    dims = _gemm_shapes(shape, args.batch, args.seq)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 2 * len(dims)))
    normal = lambda s: jax.random.normal(next(keys), s, jnp.dtype(args.dtype))
    pairs = [(normal((*b, m, k)), normal((*b, k, n))) for b, m, k, n in dims]
    gemms = jax.jit(lambda pairs: [a @ b for a, b in pairs])

    def run():
        jax.block_until_ready(gemms(pairs))

    return run, "all (matmuls only)", None


def _train_child(args) -> None:
    """Build every impl of args.impls on one shape, time each one's first (compiling) step, then run
    args.steps rounds of one step of each in turn, and print a row per impl."""
    import jax
    from gpt2_jax.model.config import ModelConfig
    from gpt2_jax.train.flops import flops_per_token, peak_flops

    shape_name = args.shapes[0]
    shape = TRAIN_SHAPES[shape_name]
    batches = _train_batches(args.steps + 1, args.batch, args.seq, shape["vocab_size"])
    runners, first, times = {}, {}, {}
    for impl in dict.fromkeys(args.impls):
        runners[impl] = (_flax_train(shape, args, batches) if impl == "flax"
                         else _gemm_train(shape, args) if impl == "gemm"
                         else _jax_train(impl, shape, args, batches))
        t0 = time.perf_counter()
        runners[impl][0]()  # the very first call: it compiles
        first[impl], times[impl] = time.perf_counter() - t0, []
    for _ in range(args.steps):
        for impl, (run, _, _) in runners.items():
            t0 = time.perf_counter()
            run()
            times[impl].append(time.perf_counter() - t0)
    device = jax.devices()[0]
    peak = peak_flops(device, args.dtype)  # on CPU a measured matmul peak, which varies by ±20% run to run
    for impl, (_, trainable, paths) in runners.items():
        step_s = statistics.median(times[impl])
        tokens_per_s = args.batch * args.seq / step_s
        mfu = tokens_per_s * flops_per_token(ModelConfig(**shape), args.seq, paths) / peak
        print(json.dumps(dict(
            impl=impl, shape=shape_name, trainable=trainable, batch=args.batch, seq=args.seq, dtype=args.dtype,
            platform=device.platform, device=device.device_kind, steps=args.steps,
            compile_s=round(max(first[impl] - step_s, 0.0), 3), step_s=round(step_s, 4),
            tokens_per_s=round(tokens_per_s, 1), mfu=round(mfu, 4), peak_tflops=round(peak / 1e12, 3),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))), flush=True)


def train_bench(args) -> None:
    if args.child:
        return _train_child(args)
    # Own processes (each peak_rss_mb its own), or one process taking a step of each impl in turn, so that
    # the impls share whatever the machine is doing at the time (peak_rss_mb is then the whole process's).
    groups = [list(dict.fromkeys(args.impls))] if args.interleave else [[impl] for impl in args.impls]
    for shape in args.shapes:
        full = None  # the `jax` row of this shape, which the others are compared with
        for impls in groups:
            cmd = [sys.executable, __file__, "train", "--child", "--shapes", shape, "--impls", ",".join(impls),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--dtype", args.dtype]
            for row in _run_child_rows(cmd, dict(impl=",".join(impls), shape=shape, batch=args.batch, seq=args.seq)):
                if "error" not in row and row["impl"] == "jax":
                    full = row
                elif "error" not in row and full is not None:
                    if row["impl"] == "flax":
                        row["jax_speedup"] = round(full["tokens_per_s"] / row["tokens_per_s"], 3)
                    else:
                        row["ratio_to_full"] = round(row["step_s"] / full["step_s"], 3)
                print(json.dumps(row), flush=True)


def _names(known):
    """argparse type: comma-separated names from `known` (`--shapes tiny,gpt2`)."""

    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        for n in names:
            if n not in known:
                raise argparse.ArgumentTypeError(f"unknown {n!r}; known: {', '.join(known)}")
        return names

    return parse


def generate_file_bench(args) -> None:
    """tools/generate.py --input's tokens/s at each batch size, interleaved over rounds after a warm-up
    round (which compiles every bucket), on a model and a file of rows."""
    from gpt2_jax.sample.file import generate_file
    from gpt2_jax.checkpoints.pretrained import load_pretrained
    from gpt2_jax.tokenizer import load_tokenizer

    model, tok = load_pretrained(args.model), load_tokenizer(args.model)
    sampling = dict(do_sample=True, top_k=30, top_p=0.7, temperature=0.9, repetition_penalty=2.0,
                    min_new_tokens=args.min_new_tokens)
    with tempfile.TemporaryDirectory() as d:
        for rnd in range(args.rounds + 1):
            for bs in args.batch_sizes:
                out = os.path.join(d, f"{rnd}-{bs}.jsonl")
                stats = generate_file(model, tok, args.input, out, batch_size=bs, max_new_tokens=args.max_new_tokens,
                                      progress=False, **sampling)
                if rnd:  # round 0 compiles
                    print(json.dumps({"bench": "generate_file", "model": args.model, "input": args.input,
                                      "batch_size": bs, "min_new_tokens": args.min_new_tokens, "round": rnd,
                                      "rows": stats["written"],
                                      "new_tokens": stats["new_tokens"], "seconds": round(stats["seconds"], 3),
                                      "tokens_per_s": round(stats["tokens_per_s"], 1)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    g = sub.add_parser("generate", help="sampling speed against transformers (PyTorch and jitted Flax)")
    g.add_argument("--preset", nargs="+", default=["tiny", "gpt2"], choices=sorted(PRESETS))
    g.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    g.add_argument("--impl", nargs="+", default=["jax", "torch", "flax"], choices=["jax", "jax-warm", "torch", "flax"],
                   help="jax-warm: gpt2-jax in a second process over the persistent compilation cache that "
                        "tools/generate.py uses (compile_s is then what a repeated CLI run pays)")
    g.add_argument("--prompt", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--cache-dir", help="where the random weights are written (default: a temporary directory)")
    g.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--compile-cache", help=argparse.SUPPRESS)
    g.add_argument("--weights", help=argparse.SUPPRESS)
    f = sub.add_parser("generate-file", help="tools/generate.py --input's tokens/s at several batch sizes")
    f.add_argument("--model", default="runs/demo", help="a model or run directory (default: the demo's)")
    f.add_argument("--input", default="data/sample.csv", help="rows to write texts for")
    f.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    f.add_argument("--max-new-tokens", type=int, default=60)
    f.add_argument("--min-new-tokens", type=int, default=0,
                   help="EOS blocked before this many (= --max-new-tokens: every row decodes the same length)")
    f.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up one")
    t = sub.add_parser("train", help="train-step speed and MFU against transformers' Flax GPT-2")
    t.add_argument("--shapes", nargs="+", type=_names(TRAIN_SHAPES), default=[list(TRAIN_SHAPES)])
    t.add_argument("--impls", nargs="+", type=_names(TRAIN_IMPLS), default=[list(TRAIN_IMPLS)],
                   help="jax: all parameters train; jax-last6: the top half of the blocks (6 of 12); "
                        "jax-head: the tied head; flax: transformers' FlaxGPT2LMHeadModel; gemm: the step's matmuls alone")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--seq", type=int, default=128)
    t.add_argument("--steps", type=int, default=5, help="timed steps after the first (compiling) one")
    t.add_argument("--interleave", action="store_true",
                   help="run the impls of a shape in one process, a step of each in turn (each impl once; "
                        "all of them in memory together), rather than each in a process of its own")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    t.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    c = sub.add_parser("compile", help="the run's programs compiled for a TPU slice on this machine (libtpu): "
                                       "per-chip HBM, FLOPs against the model's, collectives, estimated step time")
    c.add_argument("--topology", help="a TPU slice, e.g. v5e:4x4, v5p:2x2x2, v6e:2x2")
    c.add_argument("--shipped", action="store_true", help="every shipped TPU config for the slice it names")
    c.add_argument("--config", help="a YAML file in configs/ (default: every key's default)")
    c.add_argument("overrides", nargs="*", metavar="section.key=value")
    c.add_argument("--programs", default="train,eval,generate", help="comma-separated: train, eval, generate")
    c.add_argument("--vocab-size", type=int, help="instead of len(tokenizer) (default: read from the run's tokenizer; "
                                                  "GPT-2's 50257 + 4 special tokens when its path is not here)")
    a = sub.add_parser("attention", help="one attention layer's forward + backward compiled for a TPU slice: "
                                         "XLA's attention against the Pallas splash and flash kernels")
    a.add_argument("--topology", default="v5e:2x2")
    a.add_argument("--seq-lens", default="1024,2048")
    d = sub.add_parser("data", help="corpus preparation (tools/prepare_data.py) against a nanoGPT-style prepare")
    d.add_argument("--prepare", action="store_true", required=True, help="time preparing a plain-text corpus")
    d.add_argument("--size-mb", type=int, default=1024, help="corpus size, built once from local Python sources")
    d.add_argument("--workers", type=int, default=2)
    pad = sub.add_parser("padding", help="padding and truncated shares before and after packing (data.py)")
    pad.add_argument("--tokenizer", default="runs/demo/tokenizer",
                     help="a tokenizer directory; missing: the demo's SentencePiece is trained on the corpus")
    gr = sub.add_parser("grain", help="Grain's loader (pip install grain) against data.Batches: speed, padding, resume")
    gr.add_argument("--demo-corpus", help="a tokenized demo corpus directory (default: tokenized here, cached)")
    gr.add_argument("--pod-docs", type=int, default=200_000)
    gr.add_argument("--quick", action="store_true")
    gr.add_argument("--setups", default="demo,pod", help="demo, pod or both (comma-separated)")
    kw = sub.add_parser("keywords", help="a trained run's keyword coverage with and without guidance, and how "
                                         "much it copies from its prompt (teacher-forced)")
    kw.add_argument("--run", default="runs/demo", help="a training run's directory")
    args = p.parse_args()
    if args.bench == "keywords":
        from bench_keywords import bench as keywords_bench  # tools/bench_keywords.py
        keywords_bench(args.run)
        return
    if args.bench == "grain":
        from bench_grain import bench as grain_bench  # tools/bench_grain.py; exits 2 without grain
        grain_bench(args.demo_corpus, args.pod_docs, args.quick, args.setups)
        return
    if args.bench == "padding":
        from bench_padding import bench as padding_bench  # tools/bench_padding.py
        padding_bench(args.tokenizer)
        return
    if args.bench == "data":
        from bench_data import bench  # tools/bench_data.py: this benchmark's logic
        bench(args.size_mb, args.workers)
        return
    if args.bench == "compile":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no TPU backend
        from gpt2_jax.runtime import run_cli
        from gpt2_jax.aot import print_reports, print_shipped
        programs = [n for n in args.programs.split(",") if n]
        if args.shipped:
            run_cli(lambda: sys.exit(print_shipped(ROOT, programs)))
        if not args.topology:
            p.error("compile needs --topology (or --shipped)")
        run_cli(lambda: sys.exit(print_reports(args.config, args.overrides, args.topology, programs,
                                               args.vocab_size)))
        return
    if args.bench == "attention":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from gpt2_jax.aot import attention_report
        for row in attention_report(args.topology, tuple(int(t) for t in args.seq_lens.split(","))):
            print(json.dumps(row), flush=True)
        return
    if args.bench == "generate":
        generate_bench(args)
        return
    if args.bench == "generate-file":
        generate_file_bench(args)
        return
    args.shapes, args.impls = sum(args.shapes, []), sum(args.impls, [])  # --shapes tiny,gpt2 or tiny gpt2
    longest = min(TRAIN_SHAPES[s]["n_positions"] for s in args.shapes)
    if not 1 <= args.seq <= longest:
        p.error(f"--seq must be between 1 and {longest} (n_positions)")
    train_bench(args)


if __name__ == "__main__":
    main()
