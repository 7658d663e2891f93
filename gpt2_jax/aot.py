"""A run's programs compiled ahead of time for a TPU slice on this (CPU) machine, through libtpu.

`compile_programs(cfg, "v5e:4x4")` builds the run's mesh over the slice's compile-only devices, lowers the
real train step, eval step and `generate` with abstract (ShapeDtypeStruct) arguments, compiles them with
XLA:TPU and reports per program: per-chip HBM (`memory_analysis`), XLA's FLOPs against the model's
(`cost_analysis`, flops.py), the collectives of the optimised HLO and the bytes they move, a step-time
estimate (labelled: the cost model's, or a roofline), and whether the SPMD partitioner had to replicate a
tensor to reshard it ("involuntary full rematerialization", which it only logs, to stderr).

Nothing here runs on a TPU: the figures are the compiler's and the cost model's, not measurements.
Loops: XLA's cost analysis counts a `while` body once (grad_accum's scan, chunked loops, the decode loop),
so with loops in the program its FLOPs, bytes and time estimate are too low (`xla_cost_counts_loop_bodies_once`);
the collective counts (gpt2_jax.hlo) multiply each scan body by its trip count, read from the loop condition.

Shape letters: A micro-batches per step, B examples, T positions, P prompt slots, N new-token slots.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
import time
from typing import Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import topologies

from gpt2_jax import sharding

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.errors import GPT2JaxError, first_line
from gpt2_jax.hlo import collectives
from gpt2_jax.train.flops import flops_per_token
from gpt2_jax.checkpoints.hf import load_hf_config
from gpt2_jax.sample.generate import SamplingParams, generate_program, bucket_length
from gpt2_jax.tokenizer import SPECIAL_TOKENS, load_tokenizer
from gpt2_jax.train.config import TrainConfig
from gpt2_jax.train.step import build_setup, compile_steps

PROGRAMS = ("train", "eval", "generate")
GPT2_BASE_VOCAB = 50257  # GPT-2's BPE vocabulary, before the project's special tokens


class Chip(NamedTuple):
    name: str
    hbm_bytes: float  # per chip
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip


GiB = 2 ** 30
# Google's public per-chip figures (https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e: "System
# architecture" tables: HBM capacity, peak bf16 compute, HBM bandwidth). Keyed by jax's `device.device_kind`.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5e": Chip("v5e", 16 * GiB, 197e12, 819e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1640e9),
    "TPU v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9),
}

REMAT_MARK = "involuntary full rematerialization"


def chip_of(device) -> Chip:
    kind = device.device_kind
    if kind not in CHIPS:
        raise GPT2JaxError(f"no HBM / peak figures for TPU kind {kind!r}; known: {', '.join(sorted(CHIPS))}")
    return CHIPS[kind]


# --- the slice --------------------------------------------------------------------------------------

def topology_devices(topology: str) -> list:
    """The compile-only devices of a TPU topology such as "v5e:4x4", one per chip."""
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the chips it drives; compiling drives none,
    # so several compiling processes (tests, another bench) may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # The partitioner's involuntary-rematerialization line is a WARNING, which libtpu keeps off stderr by
    # default (ERROR and up); it reads these when it loads.
    for var in ("TPU_MIN_LOG_LEVEL", "TPU_STDERR_LOG_LEVEL"):
        os.environ[var] = str(min(int(os.environ.get(var) or 1), 1))
    dims = re.fullmatch(r"[^:]+:([0-9x]+)", topology)
    # A slice smaller than libtpu's default host (2x2 chips for v5e), e.g. a one-chip "v5e:1x1", is one host.
    single_host = dims is not None and math.prod(int(d) for d in dims.group(1).split("x")) < 4
    bounds = dict(chips_per_host_bounds=(1, 1, 1)) if single_host else {}
    try:
        with captured_stderr():  # libtpu logs initialisation errors about the missing TPU environment
            devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **bounds).devices)
    except RuntimeError as e:  # JaxRuntimeError is one too
        if "not installed" in str(e):
            raise GPT2JaxError('libtpu is not installed (TPU compiles need it): pip install -e ".[tpu]"') from None
        if "Invalid TPU" in str(e) or "INVALID_ARGUMENT" in str(e):
            raise GPT2JaxError(f"unknown TPU topology {topology!r} ({first_line(e)}); e.g. v5e:2x2, v5e:4x4, "
                               f"v5p:2x2x1, v6e:4x4") from None
        raise GPT2JaxError(f"libtpu could not describe topology {topology!r}: {first_line(e)}") from None
    chips = {_chip_coords(d) for d in devices}
    if len(chips) != len(devices):
        raise GPT2JaxError(f"topology {topology!r} gives {len(devices) // len(chips)} devices per chip (TPU cores "
                           f"of a {devices[0].device_kind}), which jax.make_mesh does not support; use a v5e, "
                           f"v5p or v6e topology (one device per chip)")
    return devices


def _chip_coords(device) -> tuple:
    return tuple(getattr(device, "coords", ())) + (getattr(device, "slice_index", 0),)


# --- capturing XLA's log lines --------------------------------------------------------------------

@contextlib.contextmanager
def captured_stderr() -> Iterator[list]:
    """Redirect file descriptor 2 (where absl/glog write, below Python) into a temporary file; the yielded
    list receives its lines on exit."""
    lines: list = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines += tmp.read().decode("utf-8", "replace").splitlines()


def remat_lines(lines: Sequence[str]) -> list[str]:
    """The partitioner's involuntary-rematerialization warnings among log lines (libtpu's own
    initialisation errors and everything else filtered out)."""
    return [line.strip() for line in lines if REMAT_MARK in line.lower()]


# --- one program ------------------------------------------------------------------------------------

def exhausted_bytes(message: str) -> Optional[int]:
    """The bytes that XLA:TPU's RESOURCE_EXHAUSTED message says the program needs: "the total memory
    required for HLO temporaries (20.00G) exceeds available HBM (15.75G)" or "Used 20.5G of 15.75G hbm"."""
    m = (re.search(r"required[^(]*\(([0-9.]+)([KMGT]?)i?B?\)", message)
         or re.search(r"Used\s+([0-9.]+)([KMGT]?)i?B?\s+of", message))
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2)])


def compile_report(jitted, args: tuple, *, chip: Chip, chips: int, model_flops_per_chip: Optional[float],
                   tokens_per_chip: float) -> dict:
    """Lower `jitted` with `args` (ShapeDtypeStructs), compile it for the TPU devices their shardings name,
    and return the figures of the module docstring as one flat dict."""
    lowered = jitted.lower(*args)
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would log nothing and take no time
    t0 = time.perf_counter()
    try:
        with captured_stderr() as log:
            compiled = lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError; only RESOURCE_EXHAUSTED is a result
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed = exhausted_bytes(str(e))
        return {"fits": False, "needed_bytes": needed, "hbm_share": needed and round(needed / chip.hbm_bytes, 3),
                "error": first_line(e)[:500]}
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
    seconds = time.perf_counter() - t0
    remats = remat_lines(log)

    mem = compiled.memory_analysis()
    hbm = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "temp", "alias", "generated_code")}
    # Donated arguments alias outputs: count those bytes once.
    hbm["total"] = hbm["argument"] + hbm["output"] - hbm["alias"] + hbm["temp"] + hbm["generated_code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    optimal = float(cost.get("optimal_seconds", -1.0))
    if optimal > 0:
        estimate, step_s = "cost_model", optimal
    else:
        # XLA counts a loop body once and a Pallas kernel not at all, so the model's FLOPs are the floor of
        # the compute term; the bytes are XLA's (too low with loops). No overlap loss, no collectives: this
        # is a lower bound on the step time, an upper bound on MFU.
        compute = max(xla_flops, model_flops_per_chip or 0.0)
        estimate, step_s = "roofline", max(compute / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth)
    hlo = collectives(compiled.as_text())
    report = {
        "fits": hbm["total"] <= chip.hbm_bytes,
        "hbm_bytes": hbm,
        "hbm_gib": round(hbm["total"] / GiB, 3),
        "hbm_share": round(hbm["total"] / chip.hbm_bytes, 3),
        "compile_s": round(seconds, 2),
        "xla_flops_per_chip": xla_flops,
        "model_flops_per_chip": model_flops_per_chip,
        "flops_ratio": (round(xla_flops / model_flops_per_chip, 3) if model_flops_per_chip else None),
        "bytes_accessed_per_chip": bytes_accessed,
        **hlo,
        # XLA's cost analysis counts a while loop's body once (measured: grad_accum 2 reports half the
        # FLOPs of grad_accum 1), so with loops present its FLOPs and the estimate below are too low.
        "xla_cost_counts_loop_bodies_once": bool(hlo["while_loops"]),
        "cost_model_seconds": cost.get("optimal_seconds"),  # used when positive
        "estimate": estimate,
        "step_s": step_s,
        "tokens_per_s_per_chip": round(tokens_per_chip / step_s, 1) if step_s > 0 else None,
        "mfu": (round(model_flops_per_chip / (step_s * chip.peak_flops), 4)
                if step_s > 0 and model_flops_per_chip else None),
        "involuntary_remat": len(remats),
        "first_remat": remats[0][:1000] if remats else None,
    }
    return report


# --- the run's programs -----------------------------------------------------------------------------

def run_vocab_size(cfg: TrainConfig) -> tuple[int, str]:
    """The run's vocabulary (len(tokenizer)) without training anything, and where it came from."""
    path = cfg.tokenizer.path or cfg.model.init_from
    if path is not None and os.path.exists(path):
        return len(load_tokenizer(path)), f"tokenizer {path}"
    if path is not None:
        # e.g. the pod config's tokenizers/gpt2, which lives on the pod: GPT-2's BPE + the special tokens
        return GPT2_BASE_VOCAB + len(SPECIAL_TOKENS), (f"{path} not found here: GPT-2's {GPT2_BASE_VOCAB} + "
                                                       f"{len(SPECIAL_TOKENS)} special tokens")
    # A SentencePiece model trained by the run holds the special tokens within its vocabulary.
    return cfg.tokenizer.sentencepiece_vocab_size, "tokenizer.sentencepiece_vocab_size"


def _batch(A: int, B: int, T: int, batch_sharding) -> dict:
    """A global batch as data.Batches gives every step (packed or not, it has all five arrays)."""
    spec = lambda dtype: jax.ShapeDtypeStruct((A, B, T), dtype, sharding=batch_sharding)
    return {"input_ids": spec(jnp.int32), "labels": spec(jnp.int32), "loss_mask": spec(jnp.float32),
            "segment_ids": spec(jnp.int32), "positions": spec(jnp.int32)}


def compile_programs(cfg: TrainConfig, topology: str, programs: Sequence[str] = PROGRAMS,
                     vocab_size: Optional[int] = None) -> Iterator[dict]:
    """One report (a flat dict) per program of `cfg`'s run compiled for `topology`; see the module docstring.
    `vocab_size` overrides the vocabulary read from the run's tokenizer."""
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown:
        raise GPT2JaxError(f"unknown program {unknown[0]!r}; known: {', '.join(PROGRAMS)}")
    devices = topology_devices(topology)
    chip = chip_of(devices[0])
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, devices=devices)
    vocab, vocab_from = (vocab_size, "--vocab-size") if vocab_size else run_vocab_size(cfg)
    src = cfg.model.init_from  # a fine-tune keeps its checkpoint's shape, as trainer.run_model_config does
    model_config = cfg.model_config(vocab, load_hf_config(src) if src and os.path.isdir(src) else None)
    T, chips = cfg.data.max_length, len(devices)
    if T > model_config.n_positions:
        raise GPT2JaxError(f"data.max_length={T} exceeds model n_positions={model_config.n_positions}")
    A, B = cfg.optim.grad_accum, cfg.train.batch_size
    if B % A or (B // A) % sharding.data_parallel_size(mesh):
        raise GPT2JaxError(f"train.batch_size={B} / optim.grad_accum={A} does not split over the "
                           f"{sharding.data_parallel_size(mesh)} data-parallel devices of the mesh")
    setup = build_setup(model_config, cfg, mesh)
    head = {"topology": topology, "chips": chips, "chip": chip.name, "device_kind": devices[0].device_kind,
            "mesh": dict(mesh.shape), "vocab_size": vocab, "vocab_from": vocab_from,
            "hbm_per_chip_gib": round(chip.hbm_bytes / GiB, 2), "peak_flops_per_chip": chip.peak_flops}
    train_step, eval_step = compile_steps(setup)
    batch_sharding = sharding.batch_sharding(mesh)
    for program in programs:
        if program == "train":
            tokens = B * T
            model = tokens * flops_per_token(model_config, T, setup.trainable) / chips
            shape = {"batch": [A, B // A, T]}
            args = (setup.abstract_state, _batch(A, B // A, T, batch_sharding))
            jitted = train_step
        elif program == "eval":
            tokens = B * T  # the trainer's validation batches: train.batch_size rows, one micro-batch
            model = tokens * flops_per_token(model_config, T, ()) / chips
            shape = {"batch": [1, B, T]}
            st = setup.abstract_state
            args = (st.params, st.frozen, st.rng, _batch(1, B, T, batch_sharding))
            jitted = eval_step
        else:
            report = _generate_args(cfg, setup, model_config)
            if isinstance(report, str):
                yield {**head, "program": program, "skipped": report}
                continue
            jitted, args, shape, tokens, model = report
            model /= chips
        result = compile_report(jitted, args, chip=chip, chips=chips, model_flops_per_chip=model,
                                tokens_per_chip=tokens / chips)
        yield {**head, "program": program, **shape, "tokens_per_step": tokens, **result}


def _generate_args(cfg: TrainConfig, setup, model_config: ModelConfig):
    """(jit, abstract args, shape fields, tokens, model FLOPs) of the run's held-out sampling, as
    trainer.print_samples calls `generate`: sample.num prompts of max_length / 2 tokens; or why it is skipped."""
    s = cfg.sample
    if s.num == 0:
        return "sample.num is 0: the run writes no samples"
    prompt = cfg.data.max_length // 2
    new = min(s.max_new_tokens, model_config.n_positions - prompt)
    if new < 1:
        return f"a prompt of {prompt} tokens leaves no room in n_positions={model_config.n_positions}"
    P, N = bucket_length(prompt), bucket_length(new)
    mesh = setup.mesh
    repl = sharding.replicated(mesh)
    layout = setup.layout
    st = setup.abstract_state
    params = layout.state({**st.params, **st.frozen})  # the training layout's parameter shardings
    rng = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), layout.abstract_rng)
    state = nnx.merge_state(params, rng)
    p = SamplingParams.of(vocab_size=model_config.vocab_size, do_sample=True, temperature=s.temperature,
                          top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty, min_new_tokens=0,
                          max_new_tokens=new, pad_token_id=0, eos_ids=[0], seed=cfg.train.seed, keyword_boost=0.0)
    p = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=repl), p)
    ids = jax.ShapeDtypeStruct((s.num, P), jnp.int32, sharding=repl)
    start = jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)
    no_keywords = jax.ShapeDtypeStruct((s.num, 0, 1), jnp.int32, sharding=repl)  # as print_samples: none
    jitted = jax.jit(lambda state, ids, mask, start, kw, p: generate_program(
        state, ids, mask, start, kw, p, graphdef=layout.graphdef_eval, do_sample=True, num_return_sequences=1,
        new_slots=N))
    # Model FLOPs: every prompt slot and new token through the forward pass at the full cache length;
    # tokens (for tokens/s): the new ones.
    model = s.num * (P + new) * flops_per_token(model_config, P + new, ())
    return jitted, (state, ids, ids, start, no_keywords, p), {"prompt": [s.num, P], "new_slots": N}, s.num * new, model
