"""The run's configuration: YAML sections with a default for every key, `section.key=value` overrides,
type checks and validation done once. Each list of allowed values lives with the code that owns it
(`LOSS_ON` in data.batches, `TRAINABLE` in train.freeze, ...) and is imported here."""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Optional, Union

import yaml

from gpt2_jax.data.batches import LOSS_ON
from gpt2_jax.data.rows import FORMATS
from gpt2_jax.errors import GPT2JaxError, first_line, suggest
from gpt2_jax.model.config import DTYPES, PRESETS, ModelConfig, preset
from gpt2_jax.model.gpt2 import REMAT
from gpt2_jax.model.lora import TARGETS, LoraConfig
from gpt2_jax.train.freeze import TRAINABLE
from gpt2_jax.train.optim import SCHEDULES


def check_choice(key: str, value: str, known: tuple[str, ...]) -> None:
    """A GPT2JaxError naming `key` (with the closest known value) unless `value` is one of `known`."""
    if value not in known:
        raise GPT2JaxError(f"config key {key} is {value!r}{suggest(value, known)}; known: {', '.join(known)}")


# Every section is a frozen dataclass with a default for every key; `load_train_config` validates names and
# types once, so the rest of the code reads typed fields and never a raw dict.


@dataclasses.dataclass(frozen=True)
class ModelSection:
    # A released GPT-2 size (gpt2, gpt2-medium, gpt2-large, gpt2-xl) that the fields below override.
    preset: str = "gpt2"
    # A Hugging Face GPT-2 directory to fine-tune; null trains from scratch.
    init_from: Optional[str] = None
    # Compute dtype (float32, bfloat16, float16); parameters stay in param_dtype.
    dtype: str = "float32"
    # Parameter (and optimiser state) dtype; float32 with dtype bfloat16 is mixed precision.
    param_dtype: str = "float32"
    # Shape overrides for training from scratch (null: the preset's); not allowed with init_from.
    n_layer: Optional[int] = None
    n_embd: Optional[int] = None
    n_head: Optional[int] = None
    n_positions: Optional[int] = None
    n_inner: Optional[int] = None
    # Sets resid_pdrop, embd_pdrop and attn_pdrop together (null: the preset's or checkpoint's, 0.1 for GPT-2).
    dropout: Optional[float] = None
    # Rematerialisation in the backward pass: none, block (keep each block's input only) or a
    # jax.checkpoint_policies name, e.g. dots_with_no_batch_dims_saveable (keep the matmul outputs).
    remat: str = "none"
    # Positions per chunk of the LM head's cross-entropy: > 0 never holds the [B, T, V] logits at once (a
    # scan over chunks with its own backward; about 1.3x the head's time); 0 computes them whole.
    loss_chunk: int = 0


@dataclasses.dataclass(frozen=True)
class TokenizerSection:
    # A tokenizer directory or SentencePiece .model (the special tokens are added); null with init_from
    # uses the init_from directory's tokenizer, and null without it trains a tokenizer on the corpus.
    path: Optional[str] = None
    # Vocabulary size of the SentencePiece model trained when path is null.
    sentencepiece_vocab_size: int = 8000


@dataclasses.dataclass(frozen=True)
class DataSection:
    # Training corpus: a file path, a bundled corpus "builtin:stdlib-docs", a directory that
    # tools/prepare_data.py prepared (with tokenizer.path its tokenizer), or an llm.c / nanoGPT .bin token file.
    train: str = "builtin:stdlib-docs"
    # Validation corpus; null splits val_fraction of the training corpus off instead.
    val: Optional[str] = None
    # csv | jsonl | text | bin (llm.c / nanoGPT token files); null infers it from the file extension.
    format: Optional[str] = None
    # Fraction of the corpus held out for validation when val is null.
    val_fraction: float = 0.05
    # Tokens per training sequence. A longer example continues in further windows (title and keywords
    # repeated as context), never cut; a title over half of it leaves no room for that and is cut.
    max_length: int = 256
    # Pack whole examples (and windows of long ones) into each sequence, told apart by segment ids, so
    # that padding is rare; false: one window per sequence, padded.
    packing: bool = True
    # Each epoch, train on a random subset of each example's keywords in random order.
    keyword_augment: bool = True
    # all: every token gets loss; text: title and keywords are context only.
    loss_on: str = "all"
    # Skip (and count) malformed rows instead of stopping at the first one.
    skip_bad_rows: bool = False
    # Where tokenized corpora and built-in corpora are cached.
    cache_dir: str = "~/.cache/gpt2-jax/data"


@dataclasses.dataclass(frozen=True)
class FreezeSection:
    # all | head | last_n_blocks | patterns: which parameters train; the rest keep their values exactly.
    trainable: str = "all"
    # With trainable=last_n_blocks: how many of the top blocks train (ln_f trains with them, the tied head not).
    last_n_blocks: int = 6
    # With trainable=patterns: regular expressions; a parameter trains if one matches its path
    # (e.g. "transformer/h/1[01]/.*", "transformer/ln_f/.*").
    patterns: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LoraSection:
    # Adapters' rank (0: none); > 0 trains them over the frozen base (freeze.trainable: what else trains).
    rank: int = 0
    # The update is scaled by alpha / rank, as PEFT's (alpha / sqrt(rank) with use_rslora, rank-stabilised).
    alpha: float = 16.0
    # Projections that carry adapters: c_attn, c_proj (attention's and the MLP's), c_fc.
    targets: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")
    # Dropout on each adapter's input while training (PEFT's lora_dropout).
    dropout: float = 0.0
    # A PEFT adapter directory to continue training over model.init_from; null: fresh adapters (B zero).
    init_from: Optional[str] = None
    use_rslora: bool = False

    def adapters(self) -> LoraConfig:  # the model's LoraConfig (rank 0: no adapters)
        return LoraConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LoraConfig)})


@dataclasses.dataclass(frozen=True)
class OptimSection:
    # Peak learning rate of AdamW.
    lr: float = 3e-4
    # Linear warm-up steps from 0 to lr.
    warmup_steps: int = 100
    # cosine | linear | constant decay after warm-up.
    schedule: str = "cosine"
    # The learning rate at the last step, as a fraction of lr (cosine and linear).
    min_lr_ratio: float = 0.1
    # Decoupled weight decay, on tensors of rank >= 2 only (not biases, norms).
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # Global gradient-norm clipping; 0 turns it off.
    clip: float = 1.0
    # Micro-batches per step: the batch is split in grad_accum parts whose gradients are summed.
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class MeshSection:
    # Data-parallel size; -1 takes the devices fsdp leaves.
    data: int = -1
    # Fully-sharded data-parallel size: parameters and optimiser state are split over it; -1: the rest.
    fsdp: int = 1
    # Multi-process (multi-host) runs: null reads the environment (TPU pods, SLURM) or runs one process.
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    coordinator_address: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class TrainSection:
    # Optimiser steps.
    steps: int = 1000
    # Global batch size in sequences per step (over all devices and micro-batches).
    batch_size: int = 32
    # Seeds initialisation, data order, keyword augmentation and dropout.
    seed: int = 0
    # Where the tokenizer, metrics, checkpoints and the final Hugging Face export go.
    out_dir: str = "runs/default"
    # Evaluate on the validation set every this many steps (and at the end); 0 only at the end.
    eval_every: int = 200
    # Validation batches per evaluation (capped at one pass over the validation set).
    eval_batches: int = 20
    # Log training metrics every this many steps.
    log_every: int = 10
    # Peak FLOP/s of one device for MFU; null looks the device up (or measures a CPU's matmul peak).
    peak_flops: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    # Save every this many steps (and at the end); 0 only at the end.
    every: int = 500
    # Keep the latest this many checkpoints.
    keep: int = 3
    # Continue from the latest checkpoint in out_dir if there is one.
    resume: bool = True


@dataclasses.dataclass(frozen=True)
class SampleSection:
    # Held-out (validation) titles and keywords to write text for when training ends.
    num: int = 3
    max_new_tokens: int = 80
    # The seed project's sampling settings.
    temperature: float = 0.9
    top_k: int = 30
    top_p: float = 0.7
    repetition_penalty: float = 2.0
    # Whether the repetition penalty counts the prompt's tokens too (HF generate's default) or only the new ones
    # (HF's RepetitionPenaltyLogitsProcessor with prompt_ignore_length). Counting the prompt penalises the very
    # keywords the text should use (at 2.0 it halves their scores), so the task's default is false.
    penalize_prompt: bool = False
    # Added to the logit of each keyword's next token until the keyword has been written (sample.generate's
    # keyword_boost; >= 0, 0: off; the shipped configs use 10, with keyword_wait).
    keyword_boost: float = 0.0
    # With keyword_boost: a keyword starts only where the model already ranks it among its top candidates, paced
    # over the text, and the text does not end before its keywords (sample.processors.keyword_guidance); false:
    # every keyword boosted from the first token on, which lists them at the text's start.
    keyword_wait: bool = True
    # Validation rows written for at every evaluation and at the end, for the keyword coverage, swapped
    # coverage, distinct-n and repeated 4-gram metrics (the first rows of the seeded split; 0: none).
    metric_rows: int = 16


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run: what `python train.py --config FILE key=value ...` resolves to."""

    model: ModelSection = ModelSection()
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection = DataSection()
    freeze: FreezeSection = FreezeSection()
    lora: LoraSection = LoraSection()
    optim: OptimSection = OptimSection()
    mesh: MeshSection = MeshSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    sample: SampleSection = SampleSection()

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (tuples as lists), for YAML and checkpoint metadata."""
        return {s.name: {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dataclasses.asdict(getattr(self, s.name)).items()}
                for s in dataclasses.fields(self)}

    def save_yaml(self, path: str) -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    def model_config(self, vocab_size: int, base: Optional[ModelConfig] = None) -> ModelConfig:
        """The ModelConfig to train: `base` (from init_from) or the preset, with this section's overrides."""
        m = self.model
        shape = {k: getattr(m, k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "n_inner")
                 if getattr(m, k) is not None}
        if base is not None and shape:
            raise GPT2JaxError(f"model.{next(iter(shape))} cannot change the shape of the model.init_from "
                               f"checkpoint {m.init_from}; remove it")
        cfg = base if base is not None else preset(m.preset, **shape)
        changes: dict[str, Any] = dict(vocab_size=vocab_size, dtype=m.dtype, param_dtype=m.param_dtype)
        if m.dropout is not None:
            changes.update(resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout)
        return cfg.replace(**changes)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the field type `hint`, or a GPT2JaxError naming the key."""
    origin, args = getattr(hint, "__origin__", None), getattr(hint, "__args__", ())
    if origin is Union:  # Optional[X]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        return _check_type(key, value, hint)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise GPT2JaxError(f"config key {key} must be a list of strings, got {value!r}")
        return tuple(items)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
    raise GPT2JaxError(f"config key {key} must be {name}, got {value!r}")


def _build(cls, d: Any, prefix: str):
    if not isinstance(d, dict):
        raise GPT2JaxError(f"config section {prefix[:-1] or '(top level)'} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in d.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = [f"{prefix}{n}" for n in names]
            raise GPT2JaxError(f"unknown config key {full}{suggest(full, known)}; "
                               f"known{' in ' + prefix[:-1] if prefix else ' sections'}: {', '.join(names)}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], {} if value is None else value, f"{full}.")
        else:
            kwargs[key] = _check_type(full, value, hints[key])
    return cls(**kwargs)


def _all_keys() -> list[str]:
    return [f"{name}.{f.name}" for name, section in typing.get_type_hints(TrainConfig).items()
            for f in dataclasses.fields(section)]


def load_train_config(path: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply `section.key=value` overrides.

    Override values are parsed as YAML (`optim.lr=1e-3`, `freeze.patterns=[a, b]`, `model.init_from=null`).
    """
    d: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise GPT2JaxError(f"config file not found: {path}")
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)  # PyYAML's position of the problem, 0-based
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
            what = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
            raise GPT2JaxError(f"{where}: not valid YAML ({what or first_line(e)})") from None
        if not isinstance(d, dict):
            raise GPT2JaxError(f"{path} must hold a mapping of sections (model, data, train, ...)")
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or "." not in key:
            raise GPT2JaxError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
        if key not in _all_keys():
            raise GPT2JaxError(f"unknown config key {key}{suggest(key, _all_keys())}")
        section, name = key.split(".", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if not isinstance(d.get(section), dict):
            d[section] = {}
        d[section][name] = value
    cfg = _build(TrainConfig, d, "")
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    """Allowed values, ranges and cross-key rules, checked once after the types."""
    def check(ok: bool, message: str):
        if not ok:
            raise GPT2JaxError(message)

    if cfg.model.init_from is None:
        check_choice("model.preset", cfg.model.preset, tuple(PRESETS))
    check_choice("model.dtype", cfg.model.dtype, DTYPES)
    check_choice("model.param_dtype", cfg.model.param_dtype, DTYPES)
    check_choice("data.loss_on", cfg.data.loss_on, LOSS_ON)
    check_choice("model.remat", cfg.model.remat, REMAT)
    if cfg.data.format is not None:
        check_choice("data.format", cfg.data.format, FORMATS)
    check_choice("freeze.trainable", cfg.freeze.trainable, TRAINABLE)
    check_choice("optim.schedule", cfg.optim.schedule, SCHEDULES)
    check(0 <= cfg.data.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    check(cfg.data.max_length >= 2, f"data.max_length must be at least 2, got {cfg.data.max_length}")
    check(cfg.model.dropout is None or 0 <= cfg.model.dropout < 1, "model.dropout must be in [0, 1)")
    for key in ("train.steps", "train.batch_size", "optim.grad_accum", "tokenizer.sentencepiece_vocab_size"):
        section, name = key.split(".")
        check(getattr(getattr(cfg, section), name) > 0, f"config key {key} must be positive")
    for key in ("model.loss_chunk", "train.eval_every", "train.eval_batches", "train.log_every", "optim.warmup_steps",
                "checkpoint.every", "checkpoint.keep", "sample.num", "sample.metric_rows", "freeze.last_n_blocks"):
        section, name = key.split(".")
        check(getattr(getattr(cfg, section), name) >= 0, f"config key {key} must not be negative")
    check(cfg.optim.lr > 0, "optim.lr must be positive")
    # The end-of-run samples' settings, checked here so that a typo fails before training, not after it.
    s = cfg.sample
    check(s.max_new_tokens >= 1, f"config key sample.max_new_tokens must be at least 1, got {s.max_new_tokens}")
    check(s.temperature > 0, f"config key sample.temperature must be positive, got {s.temperature}")
    check(s.top_k >= 0, f"config key sample.top_k must not be negative (0 turns it off), got {s.top_k}")
    check(0 < s.top_p <= 1, f"config key sample.top_p must be in (0, 1] (1 turns it off), got {s.top_p}")
    check(s.keyword_boost >= 0, f"config key sample.keyword_boost must not be negative (0 turns it off), "
                                f"got {s.keyword_boost}")
    check(s.repetition_penalty > 0,
          f"config key sample.repetition_penalty must be positive, got {s.repetition_penalty}")
    check(cfg.train.batch_size % cfg.optim.grad_accum == 0,
          f"train.batch_size={cfg.train.batch_size} is not divisible by optim.grad_accum={cfg.optim.grad_accum}")
    for key in ("mesh.data", "mesh.fsdp"):
        v = getattr(cfg.mesh, key.split(".")[1])
        check(v == -1 or v >= 1, f"{key} must be -1 (the rest of the devices) or positive, got {v}")
    check(not (cfg.mesh.data == -1 and cfg.mesh.fsdp == -1), "mesh.data and mesh.fsdp cannot both be -1")
    if cfg.freeze.trainable == "patterns":
        check(bool(cfg.freeze.patterns), "freeze.trainable is patterns but freeze.patterns is empty")
    lora = cfg.lora
    for target in lora.targets:
        check_choice("lora.targets", target, TARGETS)
    check(len(set(lora.targets)) == len(lora.targets), f"lora.targets names a module twice: {list(lora.targets)}")
    check(lora.alpha > 0, f"config key lora.alpha must be positive, got {lora.alpha}")
    check(lora.init_from is None or lora.rank > 0, "lora.init_from needs lora.rank > 0 (the adapter's rank)")
    check(lora.init_from is None or cfg.model.init_from is not None,
          "lora.init_from needs model.init_from: the base model its adapters were trained on")
    lora.adapters()  # LoraConfig's own checks: rank >= 0, dropout in [0, 1), targets not empty
