"""Training: the train state, the jitted train and eval steps, and the loop.

Shape letters: A micro-batches per step, B examples, T positions, D width, V vocabulary.

The model is split once (`nnx.split`) into a graph definition and flat `{path: array}` dicts: `params`
(what trains), `frozen` (what does not) and `rng` (dropout key state). The train step differentiates with
respect to `params` only, so frozen parameters get no weight gradients and no optimiser state, and pass
through the step untouched (bit-identical). Parameters are sharded over the mesh by their logical axes
(sharding.py) from the moment they exist: the model is built abstractly, then initialised by a jit whose
out_shardings are the target layout.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gpt2_jax import sharding
from gpt2_jax.config import ModelConfig, TrainConfig
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.freeze import trainable_paths
from gpt2_jax.model import GPT2LMHeadModel, grow_embedding, path_key
from gpt2_jax.optim import learning_rate, make_optimizer

log = logging.getLogger(__name__)


class TrainState(NamedTuple):
    """Everything a step changes (and a checkpoint holds): a plain pytree."""

    step: jax.Array  # int32 scalar: optimiser steps taken
    params: dict  # trainable parameters {path: array}
    frozen: dict  # frozen parameters {path: array}
    opt_state: Any  # optax state over `params` only
    rng: dict  # the dropout layers' RNG state {path: array}, keys as raw uint32 key data


@dataclasses.dataclass
class ModelLayout:
    """How flat `{path: array}` dicts map back onto the NNX model, plus per-parameter sharding metadata."""

    config: ModelConfig
    graphdef_train: Any  # dropout on
    graphdef_eval: Any  # dropout off
    abstract_params: Any  # nnx.State of ShapeDtypeStruct Params: the template that flat dicts fill
    abstract_rng: Any  # nnx.State of the dropout RNG keys and counts
    paths: dict[str, tuple]
    logical: dict[str, Optional[tuple]]
    shapes: dict[str, jax.ShapeDtypeStruct]

    @classmethod
    def of(cls, config: ModelConfig) -> "ModelLayout":
        model = nnx.eval_shape(lambda: GPT2LMHeadModel(config))
        graphdef_eval, abstract_params, abstract_rng = nnx.split(model, nnx.Param, ...)
        model.train()
        graphdef_train = nnx.split(model, nnx.Param, ...)[0]
        paths, logical, shapes = {}, {}, {}
        for path, var in nnx.to_flat_state(abstract_params):
            k = path_key(path)
            paths[k] = tuple(path)
            logical[k] = var.get_metadata().get("out_sharding")
            shapes[k] = jax.ShapeDtypeStruct(var.shape, var.dtype)
        return cls(config, graphdef_train, graphdef_eval, abstract_params, abstract_rng, paths, logical, shapes)

    def state(self, flat: dict) -> nnx.State:
        """The nnx.State of parameters holding the arrays of `flat` (every path)."""
        leaves = [(path, var.replace(flat[path_key(path)])) for path, var in nnx.to_flat_state(self.abstract_params)]
        return nnx.from_flat_state(leaves)

    def rng_state(self, flat: dict) -> nnx.State:
        """The nnx RNG state from plain arrays (typed keys travel as uint32 key data, which Orbax stores)."""
        leaves = []
        for path, var in nnx.to_flat_state(self.abstract_rng):
            value = flat[path_key(path)]
            if jax.dtypes.issubdtype(var.dtype, jax.dtypes.prng_key):
                value = jax.random.wrap_key_data(value)
            leaves.append((path, var.replace(value)))
        return nnx.from_flat_state(leaves)

    def model(self, flat: dict, rng: dict, train: bool) -> GPT2LMHeadModel:
        return nnx.merge(self.graphdef_train if train else self.graphdef_eval, self.state(flat), self.rng_state(rng))


def rng_arrays(state: nnx.State) -> dict:
    """Plain arrays of an nnx RNG state: the inverse of ModelLayout.rng_state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var[...]
        out[path_key(path)] = jax.random.key_data(value) if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key) \
            else value
    return out


def loss_sums(layout: ModelLayout, params: dict, frozen: dict, rng, batch: dict, train: bool):
    """(sum of token losses, (number of counted tokens, new rng state)) for one micro-batch [B, T]."""
    model = layout.model({**params, **frozen}, rng, train)
    h_BTD, _ = model.hidden_states(batch["input_ids"])
    loss, count = masked_cross_entropy(model.logits(h_BTD), batch["labels"], batch["loss_mask"])
    return loss, (count, rng_arrays(nnx.state(model, nnx.RngState)))


def masked_cross_entropy(logits_BTV, labels_BT, mask_BT):
    """(sum of -log p(label) over positions where mask is 1, number of such positions)."""
    # The [B, T, V] logits exist in the compute dtype only; the float32 log-sum-exp fuses with the upcast.
    lse_BT = jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, labels_BT[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return jnp.sum((lse_BT - target_BT) * mask_BT), jnp.sum(mask_BT)


def make_train_step(layout: ModelLayout, optimizer: optax.GradientTransformation, schedule: optax.Schedule):
    """The train step: gradients summed over the A micro-batches of `batch` [A, B, T], one optimiser update.

    The loss is the mean over every counted token of the whole batch, so grad_accum does not change it.
    """
    grad_fn = jax.value_and_grad(partial(loss_sums, layout, train=True), has_aux=True)

    def step(state: TrainState, batch: dict):
        def micro(carry, mb):
            grads, loss, count, rng = carry
            (l, (n, rng)), g = grad_fn(state.params, state.frozen, rng, mb)
            return (jax.tree.map(jnp.add, grads, g), loss + l, count + n, rng), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = (zeros, jnp.float32(0), jnp.float32(0), state.rng)
        A = batch["input_ids"].shape[0]
        if A == 1:
            carry, _ = micro(carry, jax.tree.map(lambda x: x[0], batch))
        else:
            carry, _ = jax.lax.scan(micro, carry, batch)
        grads, loss, count, rng = carry
        count = jnp.maximum(count, 1.0)
        # `grads` are sums over tokens; the optimiser applies the 1 / count of the mean within its own pass.
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, grad_scale=1.0 / count)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss / count, "grad_norm": optax.global_norm(grads) / count, "lr": schedule(state.step),
                   "tokens": count}
        return TrainState(state.step + 1, params, state.frozen, opt_state, rng), metrics

    return step


def make_eval_step(layout: ModelLayout):
    """(sum of token losses, token count) over an eval batch [A, B, T], dropout off."""

    def step(params, frozen, rng, batch):
        flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
        loss, (count, _) = loss_sums(layout, params, frozen, rng, flat, train=False)
        return loss, count

    return step


@dataclasses.dataclass
class Setup:
    """The pieces of a run that the steps close over."""

    layout: ModelLayout
    mesh: jax.sharding.Mesh
    trainable: set[str]
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    param_shardings: dict
    state_shardings: Any = None


def build_setup(model_config: ModelConfig, cfg: TrainConfig, mesh) -> Setup:
    layout = ModelLayout.of(model_config)
    trainable = trainable_paths(layout.paths, cfg.freeze.trainable, n_layer=model_config.n_layer,
                                last_n_blocks=cfg.freeze.last_n_blocks, patterns=cfg.freeze.patterns)
    schedule = learning_rate(cfg.optim, cfg.train.steps)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    shardings = sharding.named_shardings(layout.logical, layout.shapes, mesh)
    return Setup(layout, mesh, trainable, optimizer, schedule, shardings)


def _split(flat: dict, trainable: set[str]) -> tuple[dict, dict]:
    return ({k: v for k, v in flat.items() if k in trainable}, {k: v for k, v in flat.items() if k not in trainable})


def init_state(setup: Setup, seed: int, params: Optional[dict] = None) -> TrainState:
    """The initial state, sharded on the mesh: random (`params=None`) or from host arrays `{path: array}`.

    Random initialisation runs inside a jit whose out_shardings are the parameters' shardings, so no
    device ever holds a whole large model.
    """
    layout, mesh = setup.layout, setup.mesh
    repl = sharding.replicated(mesh)

    def random_init():
        model = GPT2LMHeadModel(layout.config, seed=seed)
        _, p, rng = nnx.split(model, nnx.Param, ...)
        return {path_key(path): var[...] for path, var in nnx.to_flat_state(p)}, rng_arrays(rng)

    rng_abstract = jax.eval_shape(lambda: random_init()[1])
    rng_sharding = jax.tree.map(lambda _: repl, rng_abstract)
    if params is None:
        flat, rng = jax.jit(random_init, out_shardings=(setup.param_shardings, rng_sharding))()
    else:
        dtype = layout.config.params_dtype
        flat = {k: jax.device_put(np.asarray(params[k], dtype=dtype), setup.param_shardings[k]) for k in layout.paths}
        rng = jax.jit(lambda: random_init()[1], out_shardings=rng_sharding)()
    train, frozen = _split(flat, setup.trainable)
    opt_state = jax.jit(setup.optimizer.init, out_shardings=_opt_shardings(setup, train))(train)
    state = TrainState(jax.device_put(jnp.int32(0), repl), train, frozen, opt_state, rng)
    setup.state_shardings = jax.tree.map(lambda x: x.sharding, state)
    return state


def _opt_shardings(setup: Setup, params: dict):
    """Optimiser-state leaves that mirror a parameter (Adam's moments) take its sharding; the rest replicate."""
    abstract = jax.eval_shape(setup.optimizer.init, params)
    repl = sharding.replicated(setup.mesh)

    def pick(path, leaf):
        key = getattr(path[-1], "key", None) if path else None
        if key in setup.param_shardings and leaf.shape == setup.layout.shapes[key].shape:
            return setup.param_shardings[key]
        return repl

    return jax.tree_util.tree_map_with_path(pick, abstract)


def compile_steps(setup: Setup) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step."""
    batch_sh = sharding.batch_sharding(setup.mesh)
    train_step = jax.jit(make_train_step(setup.layout, setup.optimizer, setup.schedule),
                         in_shardings=(setup.state_shardings, batch_sh),
                         out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                         donate_argnums=0)
    eval_step = jax.jit(make_eval_step(setup.layout))
    return train_step, eval_step


def host_params(state: TrainState) -> dict[str, np.ndarray]:
    """All parameters as host numpy arrays, one tensor gathered at a time (every process must call this)."""
    from jax.experimental import multihost_utils

    out = {}
    for k, v in {**state.params, **state.frozen}.items():
        out[k] = _local(v) if v.is_fully_addressable or v.is_fully_replicated else \
            np.asarray(multihost_utils.process_allgather(v, tiled=True))
    return out


def _local(x: jax.Array) -> np.ndarray:
    """A replicated (or single-process) array's value on this host, without cross-process communication."""
    return np.asarray(x) if x.is_fully_addressable else np.asarray(x.addressable_data(0))


def optimizer_state_bytes(state: TrainState) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(state.opt_state) if hasattr(x, "nbytes"))


def count_params(tree: dict) -> int:
    return sum(int(math.prod(v.shape)) for v in tree.values())


# --- the run: corpus, tokenizer, model, loop ----------------------------------------------------------


def _out(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def prepare_tokenizer(cfg: TrainConfig, rows):
    """The run's tokenizer: tokenizer.path, else init_from's, else a SentencePiece model trained on the corpus
    (once: a later run in the same out_dir reuses it)."""
    from gpt2_jax.data import row_texts
    from gpt2_jax.tokenizer import load_tokenizer, train_sentencepiece

    if cfg.tokenizer.path is not None:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.model.init_from is not None:
        return load_tokenizer(cfg.model.init_from)
    tok_dir = os.path.join(cfg.train.out_dir, "tokenizer")
    if not os.path.isdir(tok_dir):
        if jax.process_index() == 0:
            tmp = tok_dir + ".tmp"
            train_sentencepiece(row_texts(rows), tmp, cfg.tokenizer.sentencepiece_vocab_size)
            os.replace(tmp, tok_dir)
        _sync("tokenizer")
    return load_tokenizer(tok_dir)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def initial_params(cfg: TrainConfig, tokenizer) -> tuple[ModelConfig, Optional[dict]]:
    """(model config, host parameters or None for random init); init_from's embedding grows for added tokens."""
    from gpt2_jax.hf import load_hf_config, params_from_state_dict, read_hf_state_dict

    vocab = len(tokenizer)
    if cfg.model.init_from is None:
        mc = cfg.model_config(vocab)
        return mc.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id), None
    src = cfg.model.init_from
    base = load_hf_config(src)
    if not (vocab == base.vocab_size or tokenizer.base_vocab_size <= base.vocab_size < vocab):
        raise GPT2JaxError(
            f"model.init_from {src} has a vocabulary of {base.vocab_size} tokens but the tokenizer has "
            f"{tokenizer.base_vocab_size} (+{vocab - tokenizer.base_vocab_size} added): they do not belong together")
    fmt, state = read_hf_state_dict(src)
    flat = {path_key(p): v for p, v in params_from_state_dict(base, state, os.path.join(src, fmt)).items()}
    wte = flat["transformer/wte/embedding"]
    if vocab > wte.shape[0]:  # new rows = the mean embedding, as resize_token_embeddings does
        flat["transformer/wte/embedding"] = grow_embedding(wte, vocab)
    if cfg.data.max_length > base.n_positions:
        raise GPT2JaxError(f"data.max_length={cfg.data.max_length} exceeds the n_positions={base.n_positions} "
                           f"of {src}")
    mc = cfg.model_config(vocab, base)
    return mc.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id), flat


def prepare_data(cfg: TrainConfig, process_index: int, process_count: int):
    """(rows, tokenizer, train Batches, val Batches or None, val rows)."""
    from gpt2_jax import data
    from gpt2_jax.corpus import resolve_corpus

    cache_dir = os.path.expanduser(cfg.data.cache_dir)
    train_path = resolve_corpus(cfg.data.train, cache_dir)
    rows = data.read_rows(train_path, cfg.data.format, skip_bad_rows=cfg.data.skip_bad_rows)
    if rows.skipped:
        _out(f"data: skipped {rows.skipped} malformed row(s) of {train_path}")
    if cfg.data.val is not None:
        val_rows = data.read_rows(resolve_corpus(cfg.data.val, cache_dir), cfg.data.format,
                                  skip_bad_rows=cfg.data.skip_bad_rows)
        all_rows = data.Rows(list(rows) + list(val_rows))
        train_idx, val_idx = np.arange(len(rows)), np.arange(len(rows), len(all_rows))
    else:
        all_rows = rows
        train_idx, val_idx = data.split_indices(len(rows), cfg.data.val_fraction, cfg.train.seed)
    tokenizer = prepare_tokenizer(cfg, [all_rows[i] for i in train_idx])
    corpus = data.tokenize_corpus(all_rows, tokenizer, cache_dir)
    common = dict(bos_id=tokenizer.bos_id, sep_id=tokenizer.sep_id, eos_id=tokenizer.eos_id,
                  pad_id=tokenizer.pad_id, max_length=cfg.data.max_length, loss_on=cfg.data.loss_on,
                  process_index=process_index, process_count=process_count, seed=cfg.train.seed)
    train = data.Batches(corpus, train_idx, batch_size=cfg.train.batch_size, grad_accum=cfg.optim.grad_accum,
                         shuffle=True, keyword_augment=cfg.data.keyword_augment, **common)
    val = None
    if len(val_idx):
        val = data.Batches(corpus, val_idx, batch_size=cfg.train.batch_size, grad_accum=1, shuffle=False,
                           keyword_augment=False, repeat=False, **common)
    unigram = data.unigram_entropy(corpus, train_idx, bos_id=tokenizer.bos_id, sep_id=tokenizer.sep_id,
                                   eos_id=tokenizer.eos_id, loss_on=cfg.data.loss_on, max_length=cfg.data.max_length)
    return tokenizer, train, val, [all_rows[i] for i in val_idx], len(train_idx), unigram


def evaluate(eval_step, state: TrainState, val, n_batches: int, mesh) -> dict:
    loss, count = 0.0, 0.0
    for i in range(n_batches):
        l, c = eval_step(state.params, state.frozen, state.rng, sharding.global_batch(val.local_batch(i), mesh))
        loss, count = loss + float(_local(l)), count + float(_local(c))
    mean = loss / max(count, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


class _Preemption:
    """SIGTERM (how TPU preemption and schedulers stop a job) asks the loop to checkpoint and leave."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def now(self, step: int) -> bool:
        if jax.process_count() > 1:  # every process must stop at the same step
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step) or self.requested
        return self.requested


@contextlib.contextmanager
def _finishing(ckpt):
    """However the loop ends (an error included), let the saves already started complete."""
    try:
        yield
    finally:
        ckpt.wait()


def _run_meta(cfg: TrainConfig, model_config: ModelConfig, tokenizer, step: int) -> dict:
    return {"step": step, "config": cfg.to_dict(), "model": {**model_config.to_hf_dict(), "dtype": model_config.dtype,
                                                            "param_dtype": model_config.param_dtype},
            "tokenizer": {"size": len(tokenizer), "special_ids": dict(tokenizer.special_ids)}}


def _resume(ckpt, cfg: TrainConfig, setup: Setup, state: TrainState, model_config: ModelConfig, tokenizer):
    """The latest checkpoint's state (restored onto this mesh) if the run can continue from it, else `state`."""
    from gpt2_jax.checkpoint import abstract_target, check_resumable

    step = ckpt.latest_step()
    if step is None:
        return state
    meta = ckpt.meta(step)
    harmless = check_resumable(meta["config"], cfg.to_dict(), cfg.train.out_dir)
    want = _run_meta(cfg, model_config, tokenizer, step)
    for part in ("model", "tokenizer"):
        if meta[part] != want[part]:
            diff = sorted(k for k in set(meta[part]) | set(want[part]) if meta[part].get(k) != want[part].get(k))
            raise GPT2JaxError(f"cannot resume {cfg.train.out_dir}: its checkpoint's {part} differs ({', '.join(diff)});"
                               f" use another train.out_dir, or checkpoint.resume=false to start over")
    restored = ckpt.restore(step, abstract_target(state))
    _out(f"resumed from step {step} of {cfg.train.out_dir}" + (f" (changed: {'; '.join(harmless)})" if harmless else ""))
    return restored


def train(cfg: TrainConfig) -> dict:
    """Run the training described by `cfg`; returns the final metrics. Every process runs this.

    Re-running with the same out_dir continues from the latest checkpoint (checkpoint.resume).
    """
    from tqdm import tqdm

    from gpt2_jax.checkpoint import Checkpointer, checkpoint_dir
    from gpt2_jax.flops import flops_per_token, peak_flops
    from gpt2_jax.metrics import MetricsWriter

    t_start = time.time()
    sharding.initialize_distributed(cfg.mesh.num_processes, cfg.mesh.process_id, cfg.mesh.coordinator_address)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    dp = sharding.data_parallel_size(mesh)
    micro = cfg.train.batch_size // cfg.optim.grad_accum
    if micro % dp:
        raise GPT2JaxError(f"train.batch_size={cfg.train.batch_size} / optim.grad_accum={cfg.optim.grad_accum} = "
                           f"{micro} sequences per micro-batch is not divisible by the data-parallel size {dp} "
                           f"(mesh data={mesh.shape['data']} × fsdp={mesh.shape['fsdp']})")
    if cfg.model.init_from is not None:
        from gpt2_jax.hf import load_hf_config

        try:
            load_hf_config(cfg.model.init_from)
        except GPT2JaxError as e:
            raise GPT2JaxError(f"model.init_from: {e}") from None
    out_dir = cfg.train.out_dir
    leader = jax.process_index() == 0
    if not cfg.checkpoint.resume and os.path.isdir(checkpoint_dir(out_dir)) and leader:
        import shutil

        shutil.rmtree(checkpoint_dir(out_dir))
        _out(f"checkpoint.resume=false: removed the earlier checkpoints of {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    _sync("out_dir")

    tokenizer, train_batches, val_batches, val_rows, n_train, unigram = prepare_data(
        cfg, jax.process_index(), jax.process_count())
    model_config, params = initial_params(cfg, tokenizer)
    if cfg.data.max_length > model_config.n_positions:
        raise GPT2JaxError(f"data.max_length={cfg.data.max_length} exceeds model n_positions={model_config.n_positions}")
    ckpt = Checkpointer(out_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    resuming = ckpt.latest_step() is not None
    setup = build_setup(model_config, cfg, mesh)
    state = init_state(setup, cfg.train.seed, None if resuming else params)
    del params
    if resuming:
        state = _resume(ckpt, cfg, setup, state, model_config, tokenizer)
    if leader:
        cfg.save_yaml(os.path.join(out_dir, "config.yaml"))
        model_config.save_json(os.path.join(out_dir, "model_config.json"))
        if not os.path.isdir(os.path.join(out_dir, "tokenizer")):
            tokenizer.save(os.path.join(out_dir, "tokenizer"))
    train_step, eval_step = compile_steps(setup)

    n_all, n_train_params = count_params(setup.layout.shapes), count_params(state.params)
    tokens_per_step = cfg.train.batch_size * cfg.data.max_length
    flops_step = flops_per_token(model_config, cfg.data.max_length, state.params) * tokens_per_step
    peak = (cfg.train.peak_flops or peak_flops(jax.devices()[0], model_config.dtype)) * mesh.size
    _out(f"model: {n_all:,} parameters, {n_train_params:,} trainable ({cfg.freeze.trainable}); "
         f"optimiser state {optimizer_state_bytes(state) / 2**20:.1f} MiB; "
         f"{'from ' + cfg.model.init_from if cfg.model.init_from else 'from scratch'}")
    _out(f"data: {n_train} training / {len(val_rows)} validation examples, {tokens_per_step} tokens per step; "
         f"unigram baseline loss {unigram:.3f}")
    _out(f"mesh: {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} device(s), "
         f"{jax.process_count()} process(es)")

    writer = MetricsWriter(out_dir, enabled=leader)
    n_eval = 0
    if val_batches is not None:
        n_eval = max(1, min(cfg.train.eval_batches, val_batches.num_batches))
    start = int(_local(state.step))
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not leader, dynamic_ncols=True, unit="step")
    last = {"time": time.time(), "step": start}
    final: dict = {"preempted": False}

    def check_finite(metrics, step):
        loss, gnorm = float(_local(metrics["loss"])), float(_local(metrics["grad_norm"]))
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            good = ckpt.latest_step()
            raise GPT2JaxError(f"the training loss is {loss} (gradient norm {gnorm}) at step {step}: stopped; "
                               f"the latest good checkpoint is {'step ' + str(good) if good is not None else 'none'}"
                               f" (lower optim.lr, check the data)")

    with _Preemption() as preemption, _finishing(ckpt):
        for step in range(start, cfg.train.steps):
            batch = sharding.global_batch(train_batches.local_batch(step), mesh)
            state, metrics = train_step(state, batch)
            done = step + 1
            if done % max(cfg.train.log_every, 1) == 0 or done == cfg.train.steps:
                check_finite(metrics, done)
                m = {k: float(_local(v)) for k, v in metrics.items()}
                now = time.time()
                tok_s = (done - last["step"]) * tokens_per_step / max(now - last["time"], 1e-9)
                last.update(time=now, step=done)
                m.update(tokens_per_s=tok_s, mfu=tok_s * flops_step / tokens_per_step / peak)
                writer.write(done, {k: m[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu")})
                bar.set_postfix_str(f"loss {m['loss']:.3f} · {tok_s:,.0f} tok/s · MFU {100 * m['mfu']:.1f}%")
                final["train_loss"] = m["loss"]
            bar.update(1)
            if val_batches is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0 \
                    and done != cfg.train.steps:
                ev = evaluate(eval_step, state, val_batches, n_eval, mesh)
                writer.write(done, ev, split="val")
                if leader:
                    bar.write(f"step {done}: validation loss {ev['loss']:.3f}, perplexity {ev['perplexity']:.1f}")
            preempted = preemption.now(done)
            if ckpt.due(done) or done == cfg.train.steps or preempted:
                check_finite(metrics, done)  # never save a state that has gone non-finite
                ckpt.save(done, state, _run_meta(cfg, model_config, tokenizer, done))
            if preempted:
                ckpt.wait()
                bar.close()
                _out(f"SIGTERM: saved a checkpoint at step {done} and stopped; re-run the same command to resume")
                final.update(preempted=True, steps=done)
                writer.close()
                return final
    bar.close()
    if start == cfg.train.steps and ckpt.latest_step() != cfg.train.steps:
        ckpt.save(start, state, _run_meta(cfg, model_config, tokenizer, start))
    if val_batches is not None:
        ev = evaluate(eval_step, state, val_batches, n_eval, mesh)
        writer.write(int(_local(state.step)), ev, split="val")
        final.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
        _out(f"validation: loss {ev['loss']:.3f}, perplexity {ev['perplexity']:.1f} "
             f"(unigram baseline loss {unigram:.3f})")
    writer.close()
    ckpt.close()

    host = host_params(state)
    model_dir = os.path.join(out_dir, "hf")
    if leader:
        from gpt2_jax.hf import save_pretrained
        from gpt2_jax.model import model_from_params

        model = model_from_params(model_config, {setup.layout.paths[k]: v for k, v in host.items()})
        save_pretrained(model, model_dir, tokenizer=tokenizer)
        _out(f"saved the Hugging Face model to {model_dir}")
        if cfg.sample.num and val_rows:
            final["samples"] = print_samples(model, tokenizer, val_rows[: cfg.sample.num], cfg)
    final.update(steps=int(_local(state.step)), seconds=time.time() - t_start, params=host)
    _out(f"done in {time.time() - t_start:.0f} s")
    return final


def print_samples(model, tokenizer, rows, cfg: TrainConfig) -> list[str]:
    """Write text for held-out titles and keywords with the configured sampling settings."""
    from gpt2_jax.sampling import generate_text

    s = cfg.sample
    prompts = [tokenizer.format_prompt(r.title, r.keywords) for r in rows]
    texts = generate_text(model, tokenizer, prompts, max_new_tokens=s.max_new_tokens, do_sample=True,
                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                          repetition_penalty=s.repetition_penalty, seed=cfg.train.seed)
    for r, text in zip(rows, texts):
        _out(f"\n[held-out] title: {r.title}\n  keywords: {' '.join(r.keywords)}\n  text: {text}")
    return texts
