"""`tools/bench.py train`: train-step speed and MFU against transformers' Flax GPT-2 and the step's matmuls.

Times one optimiser step on one device, on the same random token batches (every token counted), for gpt2-jax's
train step (AdamW with the default config, dropout 0) training every parameter (`jax`), the top half of the
blocks (`jax-last6`: 6 of GPT-2's 12), the tied head alone (`jax-head`) or LoRA adapters of rank 8 (alpha
16) on c_attn, c_proj and c_fc over the frozen model (`jax-lora`), and for transformers'
FlaxGPT2LMHeadModel under a jitted value_and_grad + optax AdamW step written the usual way (`flax`), and for
the step's matmuls alone (`gemm`: every product of a full gpt2-jax step, same shapes, operands laid out as
each product wants, one jitted program), the floor that no step built on this XLA's matmuls goes below. Each
runs in its own process, or with --interleave all in one process, a step of each in turn, so that a noisy
machine slows them alike. Fields: impl, shape, trainable, batch, seq, dtype, platform, device, compile_s
(first step minus the median), step_s (median of --steps steps), tokens_per_s, mfu (flops.flops_per_token:
6N + 12LHQT, less the gradients that frozen parameters skip, over peak_tflops from flops.peak_flops),
peak_rss_mb; on gpt2-jax's rows also opt_state_mb (the optimiser state) and, from XLA's memory analysis of
the compiled step (per impl, whatever else the process holds), state_mb (its arguments: parameters and
optimiser state) and temp_mb (the step's temporaries: activations, gradients); ratio_to_full (step_s / jax's) on jax-last6, jax-head, jax-lora and gemm, opt_state_ratio (opt_state_mb / jax's), jax_speedup (jax's tokens_per_s /
flax's) on flax. The CPU defaults finish in minutes; on an accelerator try `--batch 8 --seq 1024 --dtype
bfloat16 --steps 20`.
"""
from __future__ import annotations

import json
import resource
import statistics
import time
from functools import partial
from itertools import cycle

import numpy as np

from benchmarks.children import child_command, child_rows

# JAX, gpt2_jax and transformers are imported inside the functions that run in the child: the parent, which
# only starts children, loads none of them, and a child loads transformers only for `flax`.

# GPT2Config fields of the `train` shapes; --seq may not exceed n_positions.
TRAIN_SHAPES = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=4000, n_positions=1024),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
}
TRAIN_IMPLS = ("jax", "jax-last6", "jax-head", "jax-lora", "flax", "gemm")
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _train_batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """`n` random next-token batches shaped [1, B, T] (one micro-batch) as data.Batches gives them unpacked:
    one example a row (segment 1, positions from 0), every token counted."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, size=(1, batch, seq + 1)).astype(np.int32)
        out.append({"input_ids": ids[..., :-1], "labels": ids[..., 1:], "loss_mask": np.ones((1, batch, seq), np.float32),
                    "segment_ids": np.ones((1, batch, seq), np.int32),
                    "positions": np.tile(np.arange(seq, dtype=np.int32), (1, batch, 1))})
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
        "jax-lora": (["lora.rank=8", "lora.alpha=16"], "LoRA r=8 on c_attn, c_proj, c_fc"),
    }[impl]
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    setup = steps.build_setup(ModelConfig(**shape, **NO_DROPOUT, dtype=args.dtype), load_train_config(None, overrides),
                              mesh)
    state = steps.init_state(setup)
    train_step, _ = steps.compile_steps(setup)
    placed = [sharding.global_batch(b, mesh) for b in batches]
    compiled = train_step.lower(state, placed[0]).compile()  # compiled once, ahead: its memory analysis
    memory = compiled.memory_analysis()
    mb = lambda n: round(n / 2**20, 1)  # noqa: E731
    extra = dict(opt_state_mb=mb(steps.optimizer_state_bytes(state)), trainable_params=steps.count_params(state.params),
                 state_mb=mb(memory.argument_size_in_bytes), temp_mb=mb(memory.temp_size_in_bytes))
    placed = cycle(placed)

    def run():
        nonlocal state
        state, metrics = compiled(state, next(placed))
        jax.block_until_ready((state, metrics))

    return run, trainable, set(state.params), extra


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
    placed = cycle([jax.device_put({k: b[k][0] for k in ("input_ids", "labels", "loss_mask")}) for b in batches])
    dropout_rng = jax.random.PRNGKey(0)

    def run():
        nonlocal params, opt_state
        params, opt_state, loss = train_step(params, opt_state, next(placed), dropout_rng)
        jax.block_until_ready((params, opt_state, loss))

    return run, "all", None, {}


def _gemm_shapes(shape: dict, batch: int, seq: int) -> list[tuple]:
    """(batch dims, m, k, n) of every matmul in one full train step of gpt2-jax: per block, the forward,
    input-gradient and weight-gradient products of c_attn, attn.c_proj, c_fc and mlp.c_proj, and attention's
    two forward and four backward products over causal query blocks as model/attention.py computes them (the
    rows of a block against the keys up to its last row); then the tied head's three."""
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

    return run, "all (matmuls only)", None, {}


def child(args) -> None:
    """Build every impl of args.impls on one shape, time each one's first (compiling) step, then run
    args.steps rounds of one step of each in turn, and print a row per impl (`--child`)."""
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
        for impl, (run, *_) in runners.items():
            t0 = time.perf_counter()
            run()
            times[impl].append(time.perf_counter() - t0)
    device = jax.devices()[0]
    peak = peak_flops(device, args.dtype)  # on CPU a measured matmul peak, which varies by ±20% run to run
    for impl, (_, trainable, paths, extra) in runners.items():
        step_s = statistics.median(times[impl])
        tokens_per_s = args.batch * args.seq / step_s
        mfu = tokens_per_s * flops_per_token(ModelConfig(**shape), args.seq, paths) / peak
        print(json.dumps(dict(
            impl=impl, shape=shape_name, trainable=trainable, batch=args.batch, seq=args.seq, dtype=args.dtype,
            platform=device.platform, device=device.device_kind, steps=args.steps,
            compile_s=round(max(first[impl] - step_s, 0.0), 3), step_s=round(step_s, 4),
            tokens_per_s=round(tokens_per_s, 1), mfu=round(mfu, 4), peak_tflops=round(peak / 1e12, 3),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra)), flush=True)


def bench(args) -> None:
    """Each shape's impls in child processes; the rows compared with the shape's `jax` row."""
    # Own processes (each peak_rss_mb its own), or one process taking a step of each impl in turn, so that
    # the impls share whatever the machine is doing at the time (peak_rss_mb is then the whole process's).
    groups = [list(dict.fromkeys(args.impls))] if args.interleave else [[impl] for impl in args.impls]
    for shape in args.shapes:
        full = None  # the `jax` row of this shape, which the others are compared with
        for impls in groups:
            cmd = child_command("train", "--shapes", shape, "--impls", ",".join(impls), "--batch", str(args.batch),
                                "--seq", str(args.seq), "--steps", str(args.steps), "--dtype", args.dtype)
            for row in child_rows(cmd, dict(impl=",".join(impls), shape=shape, batch=args.batch, seq=args.seq)):
                if "error" not in row and row["impl"] == "jax":
                    full = row
                elif "error" not in row and full is not None:
                    if row["impl"] == "flax":
                        row["jax_speedup"] = round(full["tokens_per_s"] / row["tokens_per_s"], 3)
                    else:
                        row["ratio_to_full"] = round(row["step_s"] / full["step_s"], 3)
                        if "opt_state_mb" in row:
                            row["opt_state_ratio"] = round(row["opt_state_mb"] / full["opt_state_mb"], 5)
                print(json.dumps(row), flush=True)
