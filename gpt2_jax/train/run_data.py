"""What a run trains on, prepared from its config: the tokenizer (given, init_from's, or trained on the
corpus), this process's training and validation batches, and what follows from the tokenizer: the model
config (its vocabulary) and model.init_from's parameters grown to it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Optional

import jax
import numpy as np

from gpt2_jax import sharding
from gpt2_jax.checkpoints.hf import load_hf_config, params_from_state_dict, read_hf_state_dict
from gpt2_jax.checkpoints.orbax import checkpoint_dir
from gpt2_jax.checkpoints.peft import read_adapter
from gpt2_jax.data import batches, token_store
from gpt2_jax.data.split_stats import prompt_overflow, split_indices, unigram_entropy
from gpt2_jax.data.token_writer import rows_digest, tokenize_corpus
from gpt2_jax.data.rows import Row, Rows, read_rows, resolve_corpus, row_texts
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.model.gpt2 import grow_embedding
from gpt2_jax.tokenizer import load_tokenizer, train_sentencepiece
from gpt2_jax.train.config import TrainConfig

log = logging.getLogger(__name__)

TRAINED_WITH = "trained_with.json"  # beside a tokenizer a run trained: its settings and corpus digest


def prepare_tokenizer(cfg: TrainConfig, rows):
    """The run's tokenizer: tokenizer.path, else init_from's, else a SentencePiece model trained on the corpus
    (a later run in the same out_dir reuses it while it was trained with the same settings and corpus)."""
    if cfg.tokenizer.path is not None:
        return load_tokenizer(cfg.tokenizer.path)
    if cfg.model.init_from is not None:
        return load_tokenizer(cfg.model.init_from)
    tok_dir = os.path.join(cfg.train.out_dir, "tokenizer")
    record_file = os.path.join(tok_dir, TRAINED_WITH)
    record = {"sentencepiece_vocab_size": cfg.tokenizer.sentencepiece_vocab_size,
              "corpus": rows_digest(rows)}
    saved = _read_record(record_file)
    resuming = cfg.checkpoint.resume and os.path.isdir(checkpoint_dir(cfg.train.out_dir))
    # A resumed run keeps the tokenizer its checkpoints were trained with (a changed vocab size is refused
    # with the other config changes); a new run trains one unless the saved one was trained as asked.
    if os.path.isdir(tok_dir) and (saved == record or resuming):
        return load_tokenizer(tok_dir)
    if jax.process_index() == 0:
        if os.path.isdir(tok_dir):
            changed = [k for k in record if (saved or {}).get(k) != record[k]]
            log.info(f"tokenizer: retraining {tok_dir}: it was not trained with this run's "
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


def lora_init_params(cfg: TrainConfig, config: ModelConfig) -> dict[str, np.ndarray]:
    """lora.init_from's adapters (a PEFT directory, checked against the base `config`) in our layout; their
    rank, targets and scaling must be the lora section's."""
    src = cfg.lora.init_from
    lora, adapters = read_adapter(src, config)
    want = cfg.lora.adapters()
    for name in ("rank", "targets", "alpha", "use_rslora"):
        same = set if name == "targets" else (lambda v: v)
        if same(getattr(lora, name)) != same(getattr(want, name)):
            raise GPT2JaxError(f"lora.init_from {src} has {name}={getattr(lora, name)!r} but the lora section "
                               f"{name}={getattr(want, name)!r}: set lora.{name} to the adapter's")
    return adapters


@dataclasses.dataclass
class RunData:
    """The run's tokenizer and batches."""

    tokenizer: object
    train: batches.Batches
    val: Optional[batches.Batches]
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
        tokenizer, corpus, train_idx, val_idx, val_rows = _token_data(cfg, train_path)
    else:
        tokenizer, corpus, train_idx, val_idx, val_rows = _row_data(cfg, train_path, cache_dir)
    common = dict(bos_id=tokenizer.bos_id, sep_id=tokenizer.sep_id, eos_id=tokenizer.eos_id,
                  pad_id=tokenizer.pad_id, max_length=cfg.data.max_length, loss_on=cfg.data.loss_on,
                  process_index=process_index, process_count=process_count, seed=cfg.train.seed,
                  packing=cfg.data.packing)
    train = batches.Batches(corpus, train_idx, batch_size=cfg.train.batch_size, grad_accum=cfg.optim.grad_accum,
                            shuffle=True, keyword_augment=cfg.data.keyword_augment, **common)
    val = None
    if len(val_idx):
        val = batches.Batches(corpus, val_idx, batch_size=cfg.train.batch_size, grad_accum=1, shuffle=False,
                              keyword_augment=False, repeat=False, **common)
    _report_prompt_overflow(cfg, train)
    unigram = unigram_entropy(train)
    return RunData(tokenizer, train, val, val_rows, len(train_idx), unigram)


def _token_data(cfg: TrainConfig, train_path):
    """(tokenizer, corpus, training rows, validation rows, validation Rows) of token ids already made: the run
    must use the tokenizer that made them."""
    if cfg.tokenizer.path is None and cfg.model.init_from is None:
        raise GPT2JaxError(f"data.train {train_path} holds token ids: set tokenizer.path to the tokenizer "
                           f"they were made with")
    if cfg.data.val is not None:
        raise GPT2JaxError(f"data.val is not read with the token data {train_path}: leave it null, "
                           f"data.val_fraction splits off the validation rows")
    tokenizer = prepare_tokenizer(cfg, [])
    corpus = token_store.open_corpus(train_path, vocab_size=len(tokenizer))
    made_with = corpus.meta.get("tokenizer_digest")
    if made_with is not None and made_with != token_store.tokenizer_digest(tokenizer):
        raise GPT2JaxError(f"{train_path} was prepared with another tokenizer than the run's "
                           f"({cfg.tokenizer.path or cfg.model.init_from}); prepare it again with this one")
    train_idx, val_idx = split_indices(len(corpus), cfg.data.val_fraction, cfg.train.seed)
    return tokenizer, corpus, train_idx, val_idx, token_store.DecodedRows(corpus, val_idx, tokenizer)


def _row_data(cfg: TrainConfig, train_path, cache_dir: str):
    """(tokenizer, corpus, training rows, validation rows, validation Rows) of a corpus file (and data.val's),
    tokenized once into the cache."""
    rows = read_rows(train_path, cfg.data.format, skip_bad_rows=cfg.data.skip_bad_rows)
    if rows.skipped and jax.process_index() == 0:
        log.info(f"data: skipped {rows.skipped} malformed row(s) of {train_path}")
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
    return tokenizer, corpus, train_idx, val_idx, [all_rows[i] for i in val_idx]


def _report_prompt_overflow(cfg: TrainConfig, train: batches.Batches) -> None:
    """One line each for rows whose keyword lists training cuts, and rows whose titles leave no text."""
    if jax.process_index() != 0:
        return
    over, L = prompt_overflow(train), cfg.data.max_length
    if over["cut"]:
        log.info(f"data: {over['cut']} of {train.num_examples} training rows have a title + keywords longer than half "
                 f"of data.max_length={L} (up to {over['longest']} tokens); their last keywords are dropped to fit "
                 f"{batches.prompt_limit(L)} tokens, after keyword augmentation's shuffle")
    if over["no_text"]:
        log.info(f"data: {over['no_text']} training rows have a title that leaves no room for text within "
                 f"data.max_length={L}" + ("; with data.loss_on=text they train nothing" if cfg.data.loss_on == "text"
                                           else ""))
