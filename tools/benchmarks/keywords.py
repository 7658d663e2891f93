"""``tools/bench.py keywords --run RUN_DIR``: does a trained model use its keywords, and what guidance costs.

Over every held-out row of the run (its own validation split, prompts as trained), one JSON line per
sampling setting (the run's `sample` section, with the repetition penalty over the prompt or not, unguided at
its natural length and held to about the guided texts' length, keyword_boost 3 / 10 from the first token on,
and 10 waiting for a natural place): keyword coverage, swapped coverage, distinct-1/2, the repeated-4-gram
share, the keywords' placement (first position as a fraction of the text, the share first written in its
first 10%, the longest run of keywords in a row, rows with a run of 3 or more) beside the same figures for the
rows' own texts cut to each text's length (reference_*), and the model's own perplexity of what it wrote
(sample.fluency: teacher-forced, without guidance), with guidance as a ratio to the unguided lines'. With
--long, the same over the second corpus: held-out rows whose text holds at least LONG_TOKENS tokens, written
with as many new tokens as the context leaves (about 100). Then one teacher-forced
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
from gpt2_jax.train.held_out import sample_metrics, write_tokens
from gpt2_jax.sample.fluency import perplexity
from gpt2_jax.sample.keywords import mean_coverage
from gpt2_jax.text import keyword_occurs, keyword_token_ids
from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.train.config import load_train_config
from gpt2_jax.train.run_data import prepare_data

LENGTHS = ("1", "2", "3+")  # keyword length classes, in tokens
SETTINGS = ({"penalize_prompt": True, "keyword_boost": 0.0}, {"penalize_prompt": False, "keyword_boost": 0.0},
            {"penalize_prompt": False, "keyword_boost": 0.0, "same_length": True},
            {"penalize_prompt": False, "keyword_boost": 3.0, "keyword_wait": False},
            {"penalize_prompt": False, "keyword_boost": 10.0, "keyword_wait": False},
            {"penalize_prompt": False, "keyword_boost": 10.0, "keyword_wait": True})
# same_length: unguided, but no EOS before this share of the new tokens: guidance that holds EOS until its
# keywords are written makes texts about as long, and a longer text is less likely under the model.
SAME_LENGTH = 0.9
LONG_TOKENS = 100  # the second corpus: held-out rows whose text has at least this many tokens


def _log_probs(model, ids: list[int]) -> np.ndarray:
    """log p(ids[t + 1] | ids[:t + 1]) for every t, float64."""
    a = np.asarray(ids)[None]
    logits = np.asarray(model(a, np.ones_like(a), np.arange(a.shape[1])[None]))[0].astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    return logits[np.arange(len(ids) - 1), a[0, 1:]] - lse[:-1]


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


def long_rows(rows, tokenizer, min_tokens: int) -> list:
    """The rows whose text holds at least `min_tokens` tokens: the second corpus, of long texts."""
    return [r for r in rows if len(tokenizer.encode(r.text)) >= min_tokens]


def setting_line(model, tok, rows, cfg, setting: dict, new_tokens: int, unguided: dict) -> dict:
    """One sampling setting over `rows`: keyword metrics with placement (and the rows' texts, cut to each
    text's length, as reference), coverage by keyword length, and fluency (the model's perplexity of the texts,
    without guidance; perplexity_ratio against unguided["natural"], perplexity_ratio_same_length against
    unguided["same_length"], where present)."""
    setting = dict(setting)
    least = round(SAME_LENGTH * new_tokens) if setting.pop("same_length", False) else 0
    run_cfg = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, **setting))
    t0 = time.time()
    out = write_tokens(model, tok, rows, run_cfg, warn=lambda _: None, max_new_tokens=new_tokens,
                       min_new_tokens=least)
    seconds = time.time() - t0
    written = [(r, tok.decode(ids, skip_special_tokens=True)) for r, _, ids in out]
    m = {k: round(v, 3) for k, v in sample_metrics(written).items()}
    ppl = perplexity(model, [p for _, p, _ in out], [ids for _, _, ids in out])
    line = {**m, "coverage_by_tokens": coverage_by_length(tok, written), "perplexity": round(ppl, 1),
            "mean_new_tokens": round(float(np.mean([len(ids) for _, _, ids in out])), 1),
            "seconds": round(seconds, 1)}
    if setting.get("keyword_boost"):
        for key, base in (("perplexity_ratio", "natural"), ("perplexity_ratio_same_length", "same_length")):
            if unguided.get(base):
                line[key] = round(ppl / unguided[base], 2)
    return line


def bench(run: str, long: bool = False, settings=SETTINGS) -> None:
    cfg = load_train_config(f"{run}/config.yaml")
    run_data = prepare_data(cfg, 0, 1)
    model, tok, rows = load_pretrained(run), run_data.tokenizer, list(run_data.val_rows)
    new_tokens, corpus = cfg.sample.max_new_tokens, "held-out"
    if long:  # texts of at least LONG_TOKENS tokens, written with what the context leaves (about 100 tokens)
        rows, new_tokens, corpus = long_rows(rows, tok, LONG_TOKENS), model.config.n_positions, "held-out long"
    unguided: dict[str, float] = {}
    for setting in settings:
        line = setting_line(model, tok, rows, cfg, setting, new_tokens, unguided)
        if not setting.get("keyword_boost") and not setting.get("penalize_prompt", True):
            unguided["same_length" if setting.get("same_length") else "natural"] = line["perplexity"]
        print(json.dumps({"bench": "keywords", "run": run, "corpus": corpus, "rows": len(rows), **setting, **line}),
              flush=True)
    print(json.dumps({"bench": "keywords", "run": run, "corpus": corpus, "what": "reference",
                      **reference_line(tok, rows, min(new_tokens, cfg.sample.max_new_tokens if not long
                                                       else LONG_TOKENS))}), flush=True)
    if not long:
        print(json.dumps({"bench": "keywords", "run": run, "what": "copy",
                          **_copy_probe(model, tok, rows, cfg.data.max_length)}), flush=True)
