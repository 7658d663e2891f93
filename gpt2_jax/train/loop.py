"""The training run: corpus, tokenizer and model prepared, the loop (progress, evaluation, checkpoints,
preemption, non-finite stops), and the export and samples at the end. The steps themselves are in
train_step.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from gpt2_jax import sharding

from gpt2_jax.data import batches as data

from gpt2_jax.data import token_store as token_cache
from gpt2_jax.checkpoints.orbax import Checkpointer, CorruptCheckpoint, check_resumable, checkpoint_dir
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.data.rows import Row, Rows, read_rows, resolve_corpus, row_texts
from gpt2_jax.errors import GPT2JaxError, first_line
from gpt2_jax.train.flops import flops_per_token, peak_flops
from gpt2_jax.train.held_out import format_metrics, sample_metrics, write_texts
from gpt2_jax.checkpoints.hf import load_hf_config, params_from_state_dict, read_hf_state_dict
from gpt2_jax.train.metrics import MetricsWriter
from gpt2_jax.model.gpt2 import grow_embedding
from gpt2_jax.model.layout import ModelLayout
from gpt2_jax.checkpoints.pretrained import export_run, load_run
from gpt2_jax.data.split_stats import prompt_overflow, split_indices, unigram_entropy
from gpt2_jax.data.token_writer import rows_digest, tokenize_corpus
from gpt2_jax.tokenizer import load_tokenizer, train_sentencepiece
from gpt2_jax.train.config import TrainConfig
from gpt2_jax.train.step import (Setup, TrainState, build_setup, compile_steps, count_params, init_state,
                                 optimizer_state_bytes)

TRAINED_WITH = "trained_with.json"  # beside a tokenizer a run trained: its settings and corpus digest


def _out(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def prepare_tokenizer(cfg: TrainConfig, rows):
    """The run's tokenizer: tokenizer.path, else init_from's, else a SentencePiece model trained on the corpus
    (a later run in the same out_dir reuses it while it was trained with the same settings and corpus)."""
    if cfg.tokenizer.path is not None:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.model.init_from is not None:
        return load_tokenizer(cfg.model.init_from)
    tok_dir = os.path.join(cfg.train.out_dir, "tokenizer")
    record_file = os.path.join(tok_dir, TRAINED_WITH)
    record = {"sentencepiece_vocab_size": cfg.tokenizer.sentencepiece_vocab_size, "corpus": rows_digest(rows)}
    saved = _read_record(record_file)
    resuming = cfg.checkpoint.resume and os.path.isdir(checkpoint_dir(cfg.train.out_dir))
    # A resumed run keeps the tokenizer its checkpoints were trained with (a changed vocab size is refused
    # with the other config changes); a new run trains one unless the saved one was trained as asked.
    if os.path.isdir(tok_dir) and (saved == record or resuming):
        return load_tokenizer(tok_dir)
    if jax.process_index() == 0:
        if os.path.isdir(tok_dir):
            changed = [k for k in record if (saved or {}).get(k) != record[k]]
            _out(f"tokenizer: retraining {tok_dir}: it was not trained with this run's "
                 f"{' and '.join('corpus' if k == 'corpus' else 'tokenizer.' + k for k in changed)}")
        tmp = tok_dir + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_sentencepiece(row_texts(rows), tmp, cfg.tokenizer.sentencepiece_vocab_size)
        with open(os.path.join(tmp, TRAINED_WITH), "w") as f:
            json.dump(record, f, indent=2)
        shutil.rmtree(tok_dir, ignore_errors=True)
        os.replace(tmp, tok_dir)
    sharding.sync("tokenizer")
    return load_tokenizer(tok_dir)


def _read_record(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_model_config(cfg: TrainConfig, tokenizer) -> ModelConfig:
    """The run's model: the config's, or model.init_from's with its vocabulary grown for added tokens."""
    vocab = len(tokenizer)
    base = None
    if cfg.model.init_from is not None:
        src = cfg.model.init_from
        base = load_hf_config(src)
        if not (vocab == base.vocab_size or tokenizer.base_vocab_size <= base.vocab_size < vocab):
            raise GPT2JaxError(
                f"model.init_from {src} has a vocabulary of {base.vocab_size} tokens but the tokenizer has "
                f"{tokenizer.base_vocab_size} (+{vocab - tokenizer.base_vocab_size} added): they do not belong "
                f"together")
        if cfg.data.max_length > base.n_positions:
            raise GPT2JaxError(f"data.max_length={cfg.data.max_length} exceeds the n_positions={base.n_positions} "
                               f"of {src}")
    mc = cfg.model_config(vocab, base)
    if cfg.data.max_length > mc.n_positions:
        raise GPT2JaxError(f"data.max_length={cfg.data.max_length} exceeds model n_positions={mc.n_positions}")
    return mc.replace(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)


def init_from_params(src: str, vocab: int) -> dict[str, np.ndarray]:
    """model.init_from's parameters on the host; the embedding grows to `vocab` rows (new rows = the mean
    embedding, as resize_token_embeddings does)."""
    fmt, state = read_hf_state_dict(src)
    flat = params_from_state_dict(load_hf_config(src), state, os.path.join(src, fmt))
    wte = flat["transformer/wte/embedding"]
    if vocab > wte.shape[0]:
        flat["transformer/wte/embedding"] = grow_embedding(wte, vocab)
    return flat


@dataclasses.dataclass
class RunData:
    """The run's tokenizer and batches."""

    tokenizer: object
    train: data.Batches
    val: Optional[data.Batches]
    val_rows: list[Row]
    n_train: int
    unigram: float  # the loss of predicting each token from the training tokens' frequencies alone


def prepare_data(cfg: TrainConfig, process_index: int, process_count: int) -> RunData:
    """The tokenizer (trained on the training rows if the run has none) and this process's batches, from a
    corpus file's rows (tokenized once into a cache), a directory that tools/prepare_data.py prepared, or an
    llm.c / nanoGPT ``.bin`` token file."""
    cache_dir = os.path.expanduser(cfg.data.cache_dir)
    train_path = resolve_corpus(cfg.data.train, cache_dir)
    if train_path.is_dir() or cfg.data.format == "bin" or (cfg.data.format is None and train_path.suffix == ".bin"):
        # Token ids already: the run must use the tokenizer that made them.
        if cfg.tokenizer.path is None and cfg.model.init_from is None:
            raise GPT2JaxError(f"data.train {train_path} holds token ids: set tokenizer.path to the tokenizer "
                               f"they were made with")
        if cfg.data.val is not None:
            raise GPT2JaxError(f"data.val is not read with the token data {train_path}: leave it null, "
                               f"data.val_fraction splits off the validation rows")
        tokenizer = prepare_tokenizer(cfg, [])
        corpus = token_cache.open_corpus(train_path, vocab_size=len(tokenizer))
        made_with = corpus.meta.get("tokenizer_digest")
        if made_with is not None and made_with != token_cache.tokenizer_digest(tokenizer):
            raise GPT2JaxError(f"{train_path} was prepared with another tokenizer than the run's "
                               f"({cfg.tokenizer.path or cfg.model.init_from}); prepare it again with this one")
        train_idx, val_idx = split_indices(len(corpus), cfg.data.val_fraction, cfg.train.seed)
        val_rows = token_cache.DecodedRows(corpus, val_idx, tokenizer)
    else:
        rows = read_rows(train_path, cfg.data.format, skip_bad_rows=cfg.data.skip_bad_rows)
        if rows.skipped:
            _out(f"data: skipped {rows.skipped} malformed row(s) of {train_path}")
        if cfg.data.val is not None:
            val_rows = read_rows(resolve_corpus(cfg.data.val, cache_dir), cfg.data.format,
                                 skip_bad_rows=cfg.data.skip_bad_rows)
            all_rows = Rows(list(rows) + list(val_rows))
            train_idx, val_idx = np.arange(len(rows)), np.arange(len(rows), len(all_rows))
        else:
            all_rows = rows
            train_idx, val_idx = split_indices(len(rows), cfg.data.val_fraction, cfg.train.seed)
        tokenizer = prepare_tokenizer(cfg, [all_rows[i] for i in train_idx])
        corpus = tokenize_corpus(all_rows, tokenizer, cache_dir)
        val_rows = [all_rows[i] for i in val_idx]
    common = dict(bos_id=tokenizer.bos_id, sep_id=tokenizer.sep_id, eos_id=tokenizer.eos_id,
                  pad_id=tokenizer.pad_id, max_length=cfg.data.max_length, loss_on=cfg.data.loss_on,
                  process_index=process_index, process_count=process_count, seed=cfg.train.seed,
                  packing=cfg.data.packing)
    train = data.Batches(corpus, train_idx, batch_size=cfg.train.batch_size, grad_accum=cfg.optim.grad_accum,
                         shuffle=True, keyword_augment=cfg.data.keyword_augment, **common)
    val = None
    if len(val_idx):
        val = data.Batches(corpus, val_idx, batch_size=cfg.train.batch_size, grad_accum=1, shuffle=False,
                           keyword_augment=False, repeat=False, **common)
    _report_prompt_overflow(cfg, train)
    unigram = unigram_entropy(train)
    return RunData(tokenizer, train, val, val_rows, len(train_idx), unigram)


def _report_prompt_overflow(cfg: TrainConfig, train: data.Batches) -> None:
    """One line each for rows whose keyword lists training cuts, and rows whose titles leave no text."""
    over, L = prompt_overflow(train), cfg.data.max_length
    if over["cut"]:
        _out(f"data: {over['cut']} of {train.num_examples} training rows have a title + keywords longer than half "
             f"of data.max_length={L} (up to {over['longest']} tokens); their last keywords are dropped to fit "
             f"{data.prompt_limit(L)} tokens, after keyword augmentation's shuffle")
    if over["no_text"]:
        _out(f"data: {over['no_text']} training rows have a title that leaves no room for text within "
             f"data.max_length={L}" + ("; with data.loss_on=text they train nothing" if cfg.data.loss_on == "text"
                                       else ""))


def evaluate(eval_step, state: TrainState, val, n_batches: int, mesh) -> dict:
    loss, count = 0.0, 0.0
    for i in range(n_batches):
        l, c = eval_step(state.params, state.frozen, state.rng, sharding.global_batch(val.local_batch(i), mesh))
        loss, count = loss + float(sharding.local_value(l)), count + float(sharding.local_value(c))
    mean = loss / max(count, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


class _Preemption:
    """SIGTERM (how TPU preemption and schedulers stop a job) asks the loop to checkpoint and leave."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def now(self, step: int) -> bool:
        if jax.process_count() > 1:  # every process must stop at the same step
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


def _resume(ckpt: Checkpointer, cfg: TrainConfig, setup: Setup, model_config: ModelConfig, tokenizer) -> TrainState:
    """The newest checkpoint that verifies, restored straight onto this mesh's layout, if the run can
    continue from it. Damaged newer steps are reported and set aside (RUN_DIR/corrupt-checkpoints/)."""
    out_dir, damaged = cfg.train.out_dir, []
    for step in sorted(ckpt.all_steps(), reverse=True):
        try:
            meta = ckpt.meta(step)
            harmless = check_resumable(meta.get("config", {}), cfg.to_dict(), out_dir)
            want = _run_meta(cfg, model_config, tokenizer, step)
            for part in ("model", "tokenizer"):
                if meta.get(part) != want[part]:
                    got = meta.get(part) or {}
                    diff = sorted(k for k in set(got) | set(want[part]) if got.get(k) != want[part].get(k))
                    raise GPT2JaxError(f"cannot resume {out_dir}: its checkpoint's {part} differs "
                                       f"({', '.join(diff)}); use another train.out_dir, or checkpoint.resume=false "
                                       f"to start over")
            restored = ckpt.restore(step, setup.abstract_state)
        except CorruptCheckpoint as e:
            _out(f"warning: checkpoint step {step} of {out_dir} skipped: {e}")
            damaged.append(step)
            continue
        if damaged:
            ckpt.set_aside(damaged, out_dir)
            _out(f"moved the damaged step(s) {', '.join(map(str, damaged))} to {out_dir}/corrupt-checkpoints/")
        _out(f"resumed from step {step} of {out_dir}" + (f" (changed: {'; '.join(harmless)})" if harmless else ""))
        return restored
    raise GPT2JaxError(f"cannot resume {out_dir}: no checkpoint verifies (steps {', '.join(map(str, damaged))}); "
                       f"checkpoint.resume=false starts over (the damaged steps are kept until it saves)")


def _replace_checkpoints(out_dir: str) -> Optional[str]:
    """checkpoint.resume=false: move the earlier checkpoints aside (deleted once this run has saved one)."""
    old = checkpoint_dir(out_dir)
    aside = f"{old}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0 and os.path.isdir(old):
        os.replace(old, aside)
        _out(f"checkpoint.resume=false: moved the earlier checkpoints of {out_dir} aside to {aside}; they are "
             f"deleted once this run has written its first checkpoint")
    sharding.sync("replace_checkpoints")
    return aside


def _drop_replaced(out_dir: str) -> None:
    """Delete the checkpoints that resume=false set aside, now that this run has one of its own."""
    if jax.process_index() == 0:
        parent, name = os.path.split(checkpoint_dir(out_dir))
        for entry in os.listdir(parent):
            if entry.startswith(name + ".replaced-"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def train(cfg: TrainConfig) -> dict:
    """Run the training described by `cfg`; returns the final metrics. Every process runs this.

    Re-running with the same out_dir continues from the latest checkpoint (checkpoint.resume).
    """
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
        try:
            load_hf_config(cfg.model.init_from)
        except GPT2JaxError as e:
            raise GPT2JaxError(f"model.init_from: {e}") from None
    out_dir = cfg.train.out_dir
    leader = jax.process_index() == 0
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GPT2JaxError(f"train.out_dir {out_dir} is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    sharding.sync("out_dir")

    # Nothing is removed before the new run's data, tokenizer and model are prepared.
    run_data = prepare_data(cfg, jax.process_index(), jax.process_count())
    tokenizer, val_batches = run_data.tokenizer, run_data.val
    model_config = run_model_config(cfg, tokenizer)
    setup = build_setup(model_config, cfg, mesh)
    replacing = not cfg.checkpoint.resume and os.path.isdir(checkpoint_dir(out_dir))
    if replacing:
        _replace_checkpoints(out_dir)
    ckpt = Checkpointer(out_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    if ckpt.latest_step() is not None:
        state = _resume(ckpt, cfg, setup, model_config, tokenizer)
        done = int(sharding.local_value(state.step))
        if done > cfg.train.steps:
            ckpt.close()
            raise GPT2JaxError(f"train.steps={cfg.train.steps} is below step {done} of the checkpoint in {out_dir}: "
                               f"nothing to train; raise train.steps, or export that step with tools/export_hf.py")
    else:
        params = init_from_params(cfg.model.init_from, len(tokenizer)) if cfg.model.init_from else None
        state = init_state(setup, params)
        del params
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
    _out(f"data: {run_data.n_train} training / {len(run_data.val_rows)} validation examples, {tokens_per_step} "
         f"tokens per step; unigram baseline loss {run_data.unigram:.3f}")
    _out(f"mesh: {dict(mesh.shape)} on {mesh.size} {jax.devices()[0].platform} device(s), "
         f"{jax.process_count()} process(es)")

    writer = MetricsWriter(out_dir, enabled=leader)
    n_eval = 0
    if val_batches is not None:
        n_eval = max(1, min(cfg.train.eval_batches, val_batches.num_batches))
    start = int(sharding.local_value(state.step))
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not leader, dynamic_ncols=True, unit="step")
    last = {"time": time.time(), "step": start}
    final: dict = {"preempted": False, "unigram_loss": run_data.unigram}

    def check_finite(metrics, step):
        loss, gnorm = float(sharding.local_value(metrics["loss"])), float(sharding.local_value(metrics["grad_norm"]))
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            good = ckpt.latest_step()
            raise GPT2JaxError(f"the training loss is {loss} (gradient norm {gnorm}) at step {step}: stopped; "
                               f"the latest good checkpoint is {'step ' + str(good) if good is not None else 'none'}"
                               f" (lower optim.lr, check the data)")

    metric_rows = run_data.val_rows[:cfg.sample.metric_rows]
    sampler_layout = ModelLayout.of(model_config)  # no mesh constraints: any number of rows samples

    def live_metrics(state, step) -> dict:
        """Keyword metrics of texts the current parameters write for the metric rows (single-process runs;
        a multi-process run measures them once, at the end). An extra: a failure warns."""
        if not metric_rows or jax.process_count() > 1:
            return {}
        try:
            # On one device, as the end-of-run samples are: XLA:CPU aborts compiling the sampling loop's top-k
            # for parameters spread over a mesh (TopkDecomposer on an optimization barrier, jaxlib 0.10.2).
            flat, rng = jax.device_put(({**state.params, **state.frozen}, state.rng), jax.devices()[0])
            model = sampler_layout.model(flat, rng, train=False)
            m = sample_metrics(write_texts(model, tokenizer, metric_rows, cfg, warn=lambda _: None))
        except Exception as e:
            _out(f"warning: the sample metrics at step {step} failed ({first_line(e)})")
            return {}
        writer.write(step, m, split="sample")
        return m

    with _Preemption() as preemption, _finishing(ckpt):
        for step in range(start, cfg.train.steps):
            batch = sharding.global_batch(run_data.train.local_batch(step), mesh)
            state, metrics = train_step(state, batch)
            # Every step's non-padding tokens, all processes', from the data plan: no device sync per step.
            last["real"] = last.get("real", 0) + run_data.train.real_tokens(step)
            done = step + 1
            if done % max(cfg.train.log_every, 1) == 0 or done == cfg.train.steps:
                check_finite(metrics, done)
                m = {k: float(sharding.local_value(v)) for k, v in metrics.items()}
                now = time.time()
                seconds, slots = max(now - last["time"], 1e-9), (done - last["step"]) * tokens_per_step
                tok_s, real_s = slots / seconds, last["real"] / seconds
                # MFU counts the FLOPs of real tokens only: padding slots are computed but wasted.
                m.update(tokens_per_s=tok_s, real_tokens_per_s=real_s, padding_share=1.0 - last["real"] / slots,
                         mfu=real_s * flops_step / tokens_per_step / peak)
                last.update(time=now, step=done, real=0)
                writer.write(done, {k: m[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "real_tokens_per_s",
                                                      "padding_share", "mfu")})
                bar.set_postfix_str(f"loss {m['loss']:.3f} · {real_s:,.0f} real tok/s · padding "
                                    f"{100 * m['padding_share']:.1f}% · MFU (real tokens) {100 * m['mfu']:.1f}%")
                final["train_loss"] = m["loss"]
            bar.update(1)
            if val_batches is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0 \
                    and done != cfg.train.steps:
                ev = evaluate(eval_step, state, val_batches, n_eval, mesh)
                writer.write(done, ev, split="val")
                sm = live_metrics(state, done)
                if leader:
                    bar.write(f"step {done}: validation loss {ev['loss']:.3f}, perplexity {ev['perplexity']:.1f}"
                              + (f"; samples: {format_metrics(sm)}" if sm else ""))
            preempted = preemption.now(done)
            if ckpt.due(done) or done == cfg.train.steps or preempted:
                check_finite(metrics, done)  # never save a state that has gone non-finite
                ckpt.save(done, state, _run_meta(cfg, model_config, tokenizer, done))
                if replacing:  # the earlier run's checkpoints go once this run's first one is complete
                    ckpt.wait()
                    _drop_replaced(out_dir)
                    replacing = False
            if preempted:
                ckpt.wait()
                bar.close()
                _out(f"SIGTERM: saved a checkpoint at step {done} and stopped; re-run the same command to resume")
                final.update(preempted=True, steps=done)
                writer.close()
                return final
    bar.close()
    end = int(sharding.local_value(state.step))
    if ckpt.latest_step() != end:
        ckpt.save(end, state, _run_meta(cfg, model_config, tokenizer, end))
    if val_batches is not None:
        ev = evaluate(eval_step, state, val_batches, n_eval, mesh)
        writer.write(end, ev, split="val")
        final.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
        _out(f"validation: loss {ev['loss']:.3f}, perplexity {ev['perplexity']:.1f} "
             f"(unigram baseline loss {run_data.unigram:.3f})")
    writer.close()
    ckpt.close()
    del state

    # The training is saved: what follows are extras, which warn instead of failing the run.
    if leader:
        try:  # the export streams the final checkpoint one tensor at a time: no host gathers the model
            _out(f"saved the Hugging Face model to {export_run(out_dir, os.path.join(out_dir, 'hf'), step=end)}")
        except Exception as e:
            _out(f"warning: the Hugging Face export failed ({first_line(e)}); the checkpoint of step {end} is "
                 f"saved: python tools/export_hf.py --checkpoint {out_dir} --out DIR")
        if (cfg.sample.num or metric_rows) and run_data.val_rows:
            try:
                model = load_run(out_dir, step=end)
                if cfg.sample.num:
                    written = write_texts(model, tokenizer, run_data.val_rows[:cfg.sample.num], cfg, warn=_out)
                    for r, text in written:
                        _out(f"\n[held-out] title: {r.title}\n  keywords: {' '.join(r.keywords)}\n  text: {text}")
                    final["samples"] = [t for _, t in written]
                if metric_rows:
                    m = sample_metrics(write_texts(model, tokenizer, metric_rows, cfg, warn=lambda _: None))
                    with MetricsWriter(out_dir) as w:
                        w.write(end, m, split="sample")
                    final["sample_metrics"] = m
                    _out(f"\nsample metrics over {len(metric_rows)} held-out rows: {format_metrics(m)}")
            except Exception as e:
                _out(f"warning: the held-out samples failed ({first_line(e)})")
    final.update(steps=end, seconds=time.time() - t_start)
    _out(f"done in {time.time() - t_start:.0f} s")
    return final
