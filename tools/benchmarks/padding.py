"""``tools/bench.py padding``: padding and truncated shares of one row per example cut to the window
(before: "cut") against windows without packing ("windows") and packed windows ("packed", data.packing), for
the bundled corpus (configs/demo.yaml's tokenizer, max_length 128 and 1024), a synthetic 45k-row corpus of
short rows (256) and a Chinese-news-shaped one (10 rows of ~2,000 tokens, 30 keywords; 256 and 1024); then
what planning an epoch of the 45k rows costs, and a fresh start's first batch half-way through epoch 21 (a
late resume replans every earlier epoch to count its rows). Shares are of epoch 0 (keyword augmentation on).
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from gpt2_jax.data import batches as data
from gpt2_jax.data.rows import Row, read_rows, resolve_corpus, row_texts
from gpt2_jax.data.split_stats import padding_stats
from gpt2_jax.data.token_writer import tokenize_corpus
from gpt2_jax.tokenizer import load_tokenizer, train_sentencepiece


def bench(tokenizer_dir: str) -> None:
    docs = list(read_rows(resolve_corpus("builtin:stdlib-docs", os.path.expanduser("~/.cache/gpt2-jax/data"))))
    with tempfile.TemporaryDirectory() as tmp:
        if os.path.isdir(tokenizer_dir):
            tok = load_tokenizer(tokenizer_dir)
        else:  # configs/demo.yaml's: SentencePiece, 4,000 pieces, trained on the corpus
            tok = train_sentencepiece(row_texts(docs), os.path.join(tmp, "tok"), 4000)
        ids = dict(bos_id=tok.bos_id, sep_id=tok.sep_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
        rng = np.random.default_rng(0)
        words = np.array([w for r in docs[:3000] for w in r.text.split()])
        text = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
        short = [Row(f"row {i}", tuple(rng.choice(words, 3)), text(int(rng.integers(5, 60)))) for i in range(45000)]
        news = [Row(text(12), tuple(rng.choice(words, 30)), text(1200)) for _ in range(10)]
        corpora = {}
        for name, rows, lengths in (("stdlib-docs", docs, (128, 1024)), ("synthetic-45k-short", short, (256,)),
                                    ("news-shaped-10x30kw", news, (256, 1024))):
            corpora[name] = corpus = tokenize_corpus(rows, tok, os.path.join(tmp, "cache"))
            tokens = float(np.diff(corpus.piece_off).reshape(-1, 3).sum(1).mean())
            for L in lengths:
                for r in padding_stats(corpus, range(len(rows)), max_length=L, **ids):
                    print(json.dumps({"bench": "padding", "corpus": name, "max_length": L,
                                      "mean_row_tokens": round(tokens, 1), **r}), flush=True)
        corpus, batch = corpora["synthetic-45k-short"], 512

        def make():
            return data.Batches(corpus, range(len(corpus)), **ids, max_length=256, batch_size=batch, packing=True)

        t0 = time.perf_counter()
        rows = make().num_rows(0)
        plan_s = time.perf_counter() - t0
        step = int(20.5 * rows / batch)
        t0 = time.perf_counter()
        fresh = make()
        fresh.local_batch(step)
        print(json.dumps({"bench": "padding_plan", "corpus": "synthetic-45k-short", "max_length": 256,
                          "batch_size": batch, "rows_per_epoch": rows, "plan_epoch_s": round(plan_s, 3),
                          "resume_step": step, "resume_epoch": round(fresh.epoch(step), 2),
                          "resume_first_batch_s": round(time.perf_counter() - t0, 3)}), flush=True)
