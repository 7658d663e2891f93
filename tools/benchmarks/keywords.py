"""``tools/bench.py keywords --run RUN_DIR``: does a trained model use its keywords, and what guidance costs.

Over every held-out row of the run (its own validation split, prompts as trained), one JSON line per
sampling setting (the run's `sample` section, with the repetition penalty over the prompt or not, and
keyword_boost 0 / 3 / 10): keyword coverage, swapped coverage, distinct-1/2, the repeated-4-gram share, and
the model's own perplexity of what it wrote (teacher-forced, without guidance). Then one teacher-forced
"copy" line: the mean log-probability of the text tokens that write a keyword, with the row's own keywords in
the prompt against another row's (the row half the split away); their difference, in nats, is how much the
model copies from its prompt, a continuous measure that moves before coverage does.

Two more figures say why coverage is what it is: each setting's coverage split by the keyword's length in tokens as
running text writes it (1, 2, 3 or more: writing a keyword of several tokens takes copying each in turn), and a
"reference" line, the coverage of the rows' own texts cut to sample.max_new_tokens tokens (what writing like
the corpus would score in that many tokens), with the share of keywords of each length.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np

from gpt2_jax.data import batches as data
from gpt2_jax.train.held_out import prompt_ids, sample_metrics, write_texts
from gpt2_jax.sample.keywords import mean_coverage
from gpt2_jax.text import keyword_occurs, keyword_token_ids
from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.train.config import load_train_config
from gpt2_jax.train.run_data import prepare_data

LENGTHS = ("1", "2", "3+")  # keyword length classes, in tokens
SETTINGS = ({"penalize_prompt": True}, {"penalize_prompt": False},
            {"penalize_prompt": False, "keyword_boost": 3.0}, {"penalize_prompt": False, "keyword_boost": 10.0})


def _log_probs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[t + 1] | ids[:t + 1]) for every t, float64."""
    a = np.asarray(ids)[None]
    logits = np.asarray(model(a, np.ones_like(a), np.arange(a.shape[1])[None]))[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logits[np.arange(len(ids) - 1), a[0, 1:]] - lse[:-1]


def _perplexity(model, tokenizer, written, max_length: int) -> float:
    nll, count = 0.0, 0
    for row, text in written:
        prompt = prompt_ids(tokenizer, row, max_length)
        ids = (prompt + tokenizer.encode(text) + [tokenizer.eos_id])[:model.config.n_positions]
        nll -= float(_log_probs(model, ids)[len(prompt) - 1:].sum())
        count += len(ids) - len(prompt)
    return float(np.exp(nll / max(count, 1)))


def _copy_probe(model, tokenizer, rows, max_length: int) -> dict:
    own, swapped = [], []
    n, limit = len(rows), data.prompt_limit(max_length)
    for i, row in enumerate(rows):
        if not row.keywords:
            continue
        text = tokenizer.encode(row.text)
        forms = keyword_token_ids(tokenizer, list(row.keywords))
        for keywords, out in ((row.keywords, own), (rows[(i + n // 2) % n].keywords, swapped)):
            prompt = tokenizer.format_prompt(row.title, keywords, max_tokens=limit)
            seq = (prompt + text)[:model.config.n_positions]
            m = len(seq) - len(prompt)
            hit = np.zeros(max(m, 0), bool)
            for form in forms:
                for j in range(m - len(form) + 1):
                    if text[j:j + len(form)] == form:
                        hit[j:j + len(form)] = True
            if hit.any():
                out.extend(_log_probs(model, seq)[len(prompt) - 1:][hit].tolist())
    return {"keyword_tokens": len(own), "logp_own": round(float(np.mean(own)), 3),
            "logp_swapped": round(float(np.mean(swapped)), 3),
            "copy_gain_nats": round(float(np.mean(own) - np.mean(swapped)), 3)}


def _length_class(tokenizer, keyword: str) -> str:
    ids = keyword_token_ids(tokenizer, [keyword])
    return LENGTHS[min(len(ids[0]) if ids else 1, len(LENGTHS)) - 1]


def coverage_by_length(tokenizer, written) -> dict[str, float | None]:
    """Keyword coverage of `write_texts`' output per keyword length class (None where a class is empty)."""
    hits: dict[str, list[bool]] = {k: [] for k in LENGTHS}
    for row, text in written:
        for word in row.keywords:
            hits[_length_class(tokenizer, word)].append(keyword_occurs(text, word))
    return {k: round(float(np.mean(v)), 3) if v else None for k, v in hits.items()}


def reference_line(tokenizer, rows, new_tokens: int) -> dict:
    """Coverage of the rows' own texts cut to `new_tokens` tokens, and the share of keywords per length class."""
    keywords = [list(r.keywords) for r in rows]
    cut = [tokenizer.decode(tokenizer.encode(r.text)[:new_tokens]) for r in rows]
    classes = [_length_class(tokenizer, w) for ks in keywords for w in ks]
    coverage = mean_coverage(cut, keywords)
    return {"new_tokens": new_tokens, "keyword_coverage": None if coverage is None else round(coverage, 3),
            "keywords_by_tokens": {k: round(classes.count(k) / max(len(classes), 1), 3) for k in LENGTHS}}


def bench(run: str) -> None:
    cfg = load_train_config(f"{run}/config.yaml")
    run_data = prepare_data(cfg, 0, 1)
    model, tok, rows = load_pretrained(run), run_data.tokenizer, list(run_data.val_rows)
    for setting in SETTINGS:
        run_cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **setting))
        t0 = time.time()
        written = write_texts(model, tok, rows, run_cfg, warn=lambda _: None)
        m = {k: round(v, 3) for k, v in sample_metrics(written).items()}
        print(json.dumps({"bench": "keywords", "run": run, "rows": len(written), **setting, **m,
                          "coverage_by_tokens": coverage_by_length(tok, written),
                          "perplexity": round(_perplexity(model, tok, written, cfg.data.max_length), 1),
                          "seconds": round(time.time() - t0, 1)}), flush=True)
    print(json.dumps({"bench": "keywords", "run": run, "what": "reference",
                      **reference_line(tok, rows, cfg.sample.max_new_tokens)}), flush=True)
    print(json.dumps({"bench": "keywords", "run": run, "what": "copy",
                      **_copy_probe(model, tok, rows, cfg.data.max_length)}), flush=True)
