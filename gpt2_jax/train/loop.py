"""The training run, as its steps: prepare (devices, data, tokenizer, model), resume or initialise the state,
train (progress, evaluation, checkpoints, preemption, non-finite stops), and finish (the last checkpoint and
evaluation, then the Hugging Face export and held-out samples). The train step itself is train/step.py's;
what the run trains on, train/run_data.py's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Callable

import jax
from tqdm import tqdm

from gpt2_jax import sharding
from gpt2_jax.checkpoints.hf import load_hf_config
from gpt2_jax.checkpoints.lora_base import BASE
from gpt2_jax.checkpoints.orbax import Checkpointer
from gpt2_jax.checkpoints.pretrained import export_adapter, export_run, load_run
from gpt2_jax.checkpoints.resume import drop_replaced, restore_replaced, resume_state, set_aside_replaced
from gpt2_jax.checkpoints.run_lock import hold_run_dir
from gpt2_jax.errors import GPT2JaxError, first_line
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.layout import ModelLayout
from gpt2_jax.train.config import TrainConfig
from gpt2_jax.train.flops import flops_per_token, peak_flops
from gpt2_jax.train import lora_state
from gpt2_jax.train.held_out import format_metrics, held_out_metrics, write_texts
from gpt2_jax.train.metrics import MetricsWriter
from gpt2_jax.train.preemption import Preemption, finishing
from gpt2_jax.train.run_data import RunData, init_from_params, lora_init_params, prepare_data, run_model_config
from gpt2_jax.train.step import Setup, TrainState, build_setup, compile_steps, count_params, init_state, \
    optimizer_state_bytes

log = logging.getLogger(__name__)


def _info(msg: str) -> None:
    """A progress line, from process 0 only (every process runs the loop)."""
    if jax.process_index() == 0:
        log.info(msg)


@dataclasses.dataclass
class Run:
    """What the steps of a run share, all known before any parameter exists."""

    cfg: TrainConfig
    mesh: jax.sharding.Mesh
    data: RunData
    model_config: ModelConfig
    setup: Setup
    train_step: Callable  # (state, batch) -> (state, metrics), the state donated
    eval_step: Callable  # (params, frozen, rng, batch) -> (loss sum, token count)

    @property
    def out_dir(self) -> str:
        return self.cfg.train.out_dir

    @property
    def leader(self) -> bool:
        return jax.process_index() == 0

    @functools.cached_property
    def meta(self) -> dict:
        """What each checkpoint records of the run that wrote it (checkpoints.resume compares it)."""
        tokenizer, mc = self.data.tokenizer, self.model_config
        config = self.cfg.to_dict()
        if not self.cfg.lora.rank:  # as before LoRA existed: checkpoints of earlier runs still resume
            del config["lora"]
        return {"config": config,
                "model": {**mc.to_hf_dict(), "dtype": mc.dtype, "param_dtype": mc.param_dtype},
                "tokenizer": {"size": len(tokenizer), "special_ids": dict(tokenizer.special_ids)}}

    @functools.cached_property
    def sampler_layout(self) -> ModelLayout:
        return ModelLayout.of(self.model_config)  # no mesh constraints: any number of rows samples


def train(cfg: TrainConfig) -> dict:
    """Run the training described by `cfg`; returns the final metrics. Every process runs this.

    Re-running with the same out_dir continues from the latest checkpoint (checkpoint.resume).
    """
    t_start = time.time()
    with contextlib.ExitStack() as held:  # train.out_dir's writer lock, until the run ends
        run = prepare(cfg, held)
        ckpt, state, replacing = resume_or_init(run)
        _report_start(run, state)
        writer = MetricsWriter(run.out_dir, enabled=run.leader)
        state, final = train_steps(run, ckpt, writer, state, replacing)
        if final["preempted"]:
            writer.close()
            if final["interrupted"]:  # saved; Ctrl-C still ends the caller (run_cli: exit status 130)
                raise KeyboardInterrupt
            return final
        end = finish(run, ckpt, writer, state, final)
        del state  # the extras load the model from its checkpoint
        export_and_sample(run, end, final)
    final.update(steps=end, seconds=time.time() - t_start)
    _info(f"done in {time.time() - t_start:.0f} s")
    return final


def prepare(cfg: TrainConfig, held: contextlib.ExitStack) -> Run:
    """The mesh, the data and tokenizer, the model and its train and eval steps, after the config's checks
    against the devices. Process 0 takes train.out_dir's writer lock into `held` before anything is written
    there (another run holding it stops this one). Nothing in train.out_dir is removed before this succeeds."""
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
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise GPT2JaxError(f"train.out_dir {out_dir} is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    if jax.process_index() == 0:
        held.enter_context(hold_run_dir(out_dir))
    sharding.sync("out_dir")
    if cfg.checkpoint.resume:  # before the tokenizer: a resumed run keeps its checkpoints' tokenizer
        restore_replaced(out_dir)
    data = prepare_data(cfg, jax.process_index(), jax.process_count())
    model_config = run_model_config(cfg, data.tokenizer)
    setup = build_setup(model_config, cfg, mesh)
    return Run(cfg, mesh, data, model_config, setup, *compile_steps(setup))


def resume_or_init(run: Run) -> tuple[Checkpointer, TrainState, bool]:
    """(checkpointer, state, whether an earlier run's checkpoints wait to be replaced): the state of the
    newest checkpoint that verifies, or with none (or checkpoint.resume=false) a new one, random or
    model.init_from's. The run's config, model config and tokenizer are written to train.out_dir."""
    cfg, out_dir = run.cfg, run.out_dir
    replacing = not cfg.checkpoint.resume and set_aside_replaced(out_dir)
    ckpt = Checkpointer(out_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    if ckpt.latest_step() is not None:
        state = resume_state(ckpt, out_dir, lora_state.saved(cfg, run.setup.abstract_state), run.meta)
        done = int(sharding.local_value(state.step))
        if cfg.lora.rank:  # the frozen base, rebuilt and checked against the checkpoint's checksum
            run.meta[BASE] = ckpt.meta(done).get(BASE)
            state = lora_state.with_base(cfg, run.setup, run.model_config, state, run.meta[BASE])
        if done > cfg.train.steps:
            ckpt.close()
            raise GPT2JaxError(f"train.steps={cfg.train.steps} is below step {done} of the checkpoint in {out_dir}: "
                               f"nothing to train; raise train.steps, or export that step with tools/export_hf.py")
    else:
        params = init_from_params(cfg.model.init_from, len(run.data.tokenizer)) if cfg.model.init_from else None
        if cfg.lora.init_from:  # a PEFT adapter to continue training; without it the adapters start afresh
            params.update(lora_init_params(cfg, run.model_config))
        state = init_state(run.setup, params)
        del params
        if cfg.lora.rank:
            run.meta[BASE] = lora_state.base_record(cfg, state)
    if run.leader:
        cfg.save_yaml(os.path.join(out_dir, "config.yaml"))
        run.model_config.save_json(os.path.join(out_dir, "model_config.json"))
        if not os.path.isdir(os.path.join(out_dir, "tokenizer")):
            run.data.tokenizer.save(os.path.join(out_dir, "tokenizer"))
    return ckpt, state, replacing


def _report_start(run: Run, state: TrainState) -> None:
    cfg = run.cfg
    n_all, n_train_params = count_params(run.setup.layout.shapes), count_params(state.params)
    what = cfg.freeze.trainable if not cfg.lora.rank else \
        f"LoRA rank {cfg.lora.rank}" + (f" + freeze {cfg.freeze.trainable}" if cfg.freeze.trainable != "all" else "")
    _info(f"model: {n_all:,} parameters, {n_train_params:,} trainable ({what}); "
          f"optimiser state {optimizer_state_bytes(state) / 2**20:.1f} MiB; "
          f"{'from ' + cfg.model.init_from if cfg.model.init_from else 'from scratch'}")
    _info(f"data: {run.data.n_train} training / {len(run.data.val_rows)} validation examples, "
          f"{cfg.train.batch_size * cfg.data.max_length} tokens per step; unigram baseline loss "
          f"{run.data.unigram:.3f}")
    _info(f"mesh: {dict(run.mesh.shape)} on {run.mesh.size} {jax.devices()[0].platform} device(s), "
          f"{jax.process_count()} process(es)")


def train_steps(run: Run, ckpt: Checkpointer, writer: MetricsWriter, state: TrainState,
                replacing: bool) -> tuple[TrainState, dict]:
    """(state, metrics so far) after training from the state's step to train.steps: progress, evaluations,
    checkpoints. SIGTERM or SIGINT (Ctrl-C) stops it early, after a checkpoint of the current step; a
    non-finite loss raises before it is saved."""
    cfg = run.cfg
    start = int(sharding.local_value(state.step))
    throughput = _Throughput(run, state, start)
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not run.leader, dynamic_ncols=True, unit="step")
    final: dict = {"preempted": False, "unigram_loss": run.data.unigram}
    with Preemption() as preemption, finishing(ckpt):
        for step in range(start, cfg.train.steps):
            state, metrics = run.train_step(state, sharding.global_batch(run.data.train.local_batch(step), run.mesh))
            throughput.add(step)
            done = step + 1
            if done % max(cfg.train.log_every, 1) == 0 or done == cfg.train.steps:
                final["train_loss"] = _log_step(writer, bar, ckpt, throughput, metrics, done)
            bar.update(1)
            if run.data.val is not None and cfg.train.eval_every and done % cfg.train.eval_every == 0 \
                    and done != cfg.train.steps:
                _evaluate_now(run, writer, bar, state, done)
            preempted = preemption.now(done)
            if ckpt.due(done) or done == cfg.train.steps or preempted:
                _check_finite(metrics, done, ckpt)  # never save a state that has gone non-finite
                ckpt.save(done, lora_state.saved(cfg, state), {"step": done, **run.meta})
                if replacing:  # the earlier run's checkpoints go once this run's first one is complete
                    ckpt.wait()
                    drop_replaced(run.out_dir)
                    replacing = False
            if preempted:
                ckpt.wait()
                bar.close()
                how = "SIGINT (Ctrl-C)" if preemption.signal == "SIGINT" else "SIGTERM"
                _info(f"{how}: saved a checkpoint at step {done} and stopped; re-run the same command to resume")
                final.update(preempted=True, steps=done, interrupted=preemption.signal == "SIGINT")
                return state, final
    bar.close()
    return state, final


class _Throughput:
    """Tokens per second, the padding share and MFU since the last logged step."""

    def __init__(self, run: Run, state: TrainState, start: int):
        cfg = run.cfg
        self.batches = run.data.train
        self.tokens_per_step = cfg.train.batch_size * cfg.data.max_length
        self.flops_per_token = flops_per_token(run.model_config, cfg.data.max_length, state.params)
        self.peak = (cfg.train.peak_flops or peak_flops(jax.devices()[0], run.model_config.dtype)) * run.mesh.size
        self.time, self.step, self.real = time.time(), start, 0

    def add(self, step: int) -> None:
        # Every step's non-padding tokens, all processes', from the data plan: no device sync per step.
        self.real += self.batches.real_tokens(step)

    def since_last(self, step: int) -> dict[str, float]:
        now = time.time()
        seconds, slots = max(now - self.time, 1e-9), (step - self.step) * self.tokens_per_step
        real_s = self.real / seconds
        # MFU counts the FLOPs of real tokens only: padding slots are computed but wasted.
        out = dict(tokens_per_s=slots / seconds, real_tokens_per_s=real_s, padding_share=1.0 - self.real / slots,
                   mfu=real_s * self.flops_per_token / self.peak)
        self.time, self.step, self.real = now, step, 0
        return out


def _log_step(writer: MetricsWriter, bar, ckpt: Checkpointer, throughput: _Throughput, metrics: dict,
              step: int) -> float:
    """Write a logged step's metrics and show them on the progress bar; returns its loss."""
    _check_finite(metrics, step, ckpt)
    m = {k: float(sharding.local_value(v)) for k, v in metrics.items()}
    m.update(throughput.since_last(step))
    writer.write(step, {k: m[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "real_tokens_per_s",
                                          "padding_share", "mfu")})
    bar.set_postfix_str(f"loss {m['loss']:.3f} · {m['real_tokens_per_s']:,.0f} real tok/s · padding "
                        f"{100 * m['padding_share']:.1f}% · MFU (real tokens) {100 * m['mfu']:.1f}%")
    return m["loss"]


def _check_finite(metrics: dict, step: int, ckpt: Checkpointer) -> None:
    loss, gnorm = float(sharding.local_value(metrics["loss"])), float(sharding.local_value(metrics["grad_norm"]))
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        good = ckpt.latest_step()
        raise GPT2JaxError(f"the training loss is {loss} (gradient norm {gnorm}) at step {step}: stopped; "
                           f"the latest good checkpoint is {'step ' + str(good) if good is not None else 'none'}"
                           f" (lower optim.lr, check the data)")


def evaluate(run: Run, state: TrainState) -> dict:
    """The validation loss (and perplexity) over the first train.eval_batches batches of the validation rows."""
    val = run.data.val
    n_batches = max(1, min(run.cfg.train.eval_batches, val.num_batches))
    loss, count = 0.0, 0.0
    for i in range(n_batches):
        batch = sharding.global_batch(val.local_batch(i), run.mesh)
        l, c = run.eval_step(state.params, state.frozen, state.rng, batch)
        loss, count = loss + float(sharding.local_value(l)), count + float(sharding.local_value(c))
    mean = loss / max(count, 1.0)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def _evaluate_now(run: Run, writer: MetricsWriter, bar, state: TrainState, step: int) -> None:
    """An evaluation during training: the validation loss and the sample metrics, written and shown."""
    ev = evaluate(run, state)
    writer.write(step, ev, split="val")
    sm = _live_sample_metrics(run, writer, state, step)
    if run.leader:
        bar.write(f"step {step}: validation loss {ev['loss']:.3f}, perplexity {ev['perplexity']:.1f}"
                  + (f"; samples: {format_metrics(sm)}" if sm else ""))


def _live_sample_metrics(run: Run, writer: MetricsWriter, state: TrainState, step: int) -> dict:
    """Keyword metrics of texts the current parameters write for the metric rows (single-process runs; a
    multi-process run measures them once, at the end). An extra: a failure warns."""
    rows = run.data.val_rows[:run.cfg.sample.metric_rows]
    if not rows or jax.process_count() > 1:
        return {}
    try:
        # On one device, as the end-of-run samples are: XLA:CPU aborts compiling the sampling loop's top-k
        # for parameters spread over a mesh (TopkDecomposer on an optimization barrier, jaxlib 0.10.2).
        flat, rng = jax.device_put(({**state.params, **state.frozen}, state.rng), jax.devices()[0])
        if run.cfg.lora.rank:  # adapters merged once: sampling runs the base model's program
            flat = lora_state.merged(flat, run.setup.layout.lora)
        model = run.sampler_layout.model(flat, rng, train=False)
        m = held_out_metrics(model, run.data.tokenizer, rows, run.cfg)
    except Exception as e:
        log.warning(f"the sample metrics at step {step} failed ({first_line(e)})")
        return {}
    writer.write(step, m, split="sample")
    return m


def finish(run: Run, ckpt: Checkpointer, writer: MetricsWriter, state: TrainState, final: dict) -> int:
    """The last step: its checkpoint (unless saved already) and evaluation (into `final`); the writer and
    checkpointer closed. Returns the step."""
    end = int(sharding.local_value(state.step))
    if ckpt.latest_step() != end:
        ckpt.save(end, lora_state.saved(run.cfg, state), {"step": end, **run.meta})
    if run.data.val is not None:
        ev = evaluate(run, state)
        writer.write(end, ev, split="val")
        final.update(val_loss=ev["loss"], val_perplexity=ev["perplexity"])
        _info(f"validation: loss {ev['loss']:.3f}, perplexity {ev['perplexity']:.1f} "
              f"(unigram baseline loss {run.data.unigram:.3f})")
    writer.close()
    ckpt.close()
    return end


def export_and_sample(run: Run, end: int, final: dict) -> None:
    """The extras once the training is saved (process 0): the Hugging Face export, and the held-out samples
    and their metrics (into `final`). Each warns instead of failing the run."""
    if not run.leader:
        return
    out_dir = run.out_dir
    try:  # the export streams the final checkpoint one tensor at a time: no host gathers the model
        log.info(f"saved the Hugging Face model to {export_run(out_dir, os.path.join(out_dir, 'hf'), step=end)}")
    except Exception as e:
        log.warning(f"the Hugging Face export failed ({first_line(e)}); the checkpoint of step {end} is "
                    f"saved: python tools/export_hf.py --checkpoint {out_dir} --out DIR")
    if run.cfg.lora.rank:  # the adapter alone too, as PEFT saves one, where it is the whole change to its base
        try:
            log.info(f"saved the PEFT adapter to {export_adapter(out_dir, os.path.join(out_dir, 'adapter'), step=end)}")
        except GPT2JaxError as e:  # a run that trains more than adapters, or over a random base
            log.info(f"no PEFT adapter export: {first_line(e)}")
        except Exception as e:
            log.warning(f"the PEFT adapter export failed ({first_line(e)}): python tools/export_hf.py "
                        f"--checkpoint {out_dir} --adapter-only --out DIR")
    cfg, tokenizer, val_rows = run.cfg, run.data.tokenizer, run.data.val_rows
    metric_rows = val_rows[:cfg.sample.metric_rows]
    if not (cfg.sample.num or metric_rows) or not val_rows:
        return
    try:
        model = load_run(out_dir, step=end)
        if cfg.sample.num:
            written = write_texts(model, tokenizer, val_rows[:cfg.sample.num], cfg, warn=log.warning)
            for r, text in written:
                log.info(f"\n[held-out] title: {r.title}\n  keywords: {' '.join(r.keywords)}\n  text: {text}")
            final["samples"] = [t for _, t in written]
        if metric_rows:
            m = held_out_metrics(model, tokenizer, metric_rows, cfg)
            with MetricsWriter(out_dir) as w:
                w.write(end, m, split="sample")
            final["sample_metrics"] = m
            log.info(f"\nsample metrics over {len(metric_rows)} held-out rows: {format_metrics(m)}")
    except Exception as e:
        log.warning(f"the held-out samples failed ({first_line(e)})")
