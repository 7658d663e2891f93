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
the collective counts (aot/hlo.py) multiply each scan body by its trip count, read from the loop condition.

Shape letters: A micro-batches per step, B examples, T positions, P prompt slots, N new-token slots.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gpt2_jax import sharding
from gpt2_jax.aot.report import compile_report
from gpt2_jax.aot.slices import GiB, chip_of, topology_devices
from gpt2_jax.checkpoints.hf import load_hf_config
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.sample.generate import SamplingParams, bucket_length, generate_program
from gpt2_jax.tokenizer import SPECIAL_TOKENS, load_tokenizer
from gpt2_jax.train.config import TrainConfig
from gpt2_jax.train.flops import flops_per_token
from gpt2_jax.train.step import build_setup, compile_steps

PROGRAMS = ("train", "eval", "generate")
GPT2_BASE_VOCAB = 50257  # GPT-2's BPE vocabulary, before the project's special tokens


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
