"""Text written for held-out rows: the samples logged at the end of a run, and the keyword metrics (coverage,
swapped coverage, distinct-n, repeated 4-grams, the keywords' placement against the rows' own texts, and the
model's own perplexity of what it wrote) logged at every evaluation.

Prompts are formatted as training formats them: ``[BOS] title [SEP] keywords [SEP]`` with the keyword list cut
to batches.prompt_limit, and a lone ``[EOS]`` for rows without a title or keywords (plain language modelling,
whose documents start after an EOS). A prompt that leaves less room than sample.max_new_tokens in the context
gets fewer new tokens, and one with no room is skipped, each with a line to the caller's `warn`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from gpt2_jax.data import batches
from gpt2_jax.sample.fluency import perplexity
from gpt2_jax.sample.keywords import summarise
from gpt2_jax.sample.generate import generate_tokens
from gpt2_jax.train.config import TrainConfig


def prompt_ids(tokenizer, row, max_length: int) -> list[int]:
    """The prompt training teaches the model to continue for `row`."""
    return tokenizer.format_prompt(row.title, row.keywords, max_tokens=batches.prompt_limit(max_length))


def guidance_settings(s) -> dict:
    """generate's keyword guidance settings from a config's sample section."""
    return {"keyword_boost": s.keyword_boost, "keyword_wait": s.keyword_wait}


def write_tokens(model, tokenizer, rows: Sequence, cfg: TrainConfig, warn: Callable[[str], None],
                 max_new_tokens: int | None = None, min_new_tokens: int = 0) -> list[tuple]:
    """[(row, prompt ids, new token ids)] for `rows` with the run's sample settings (keyword guidance included),
    one generate call per number of new tokens (`max_new_tokens`, default sample.max_new_tokens, or what the
    context leaves; no EOS before `min_new_tokens` of them); rows whose prompt fills the context are left out."""
    s, n_ctx = cfg.sample, model.config.n_positions
    want = s.max_new_tokens if max_new_tokens is None else max_new_tokens
    groups: dict[int, list] = {}  # new tokens -> [(row, prompt)]
    for r in rows:
        prompt = prompt_ids(tokenizer, r, cfg.data.max_length)
        room = n_ctx - len(prompt)
        if room < 1:
            warn(f"held-out sample {r.title!r} skipped: its prompt of {len(prompt)} tokens fills the "
                 f"context of {n_ctx}")
            continue
        if room < want:
            warn(f"held-out sample {r.title!r} gets {room} new tokens, not sample.max_new_tokens="
                 f"{want}: its prompt of {len(prompt)} tokens leaves no more of the context of {n_ctx}")
        groups.setdefault(min(room, want), []).append((r, prompt))
    out = []
    for n, group in groups.items():
        new = generate_tokens(model, tokenizer, [p for _, p in group], max_new_tokens=n, do_sample=True,
                              temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                              repetition_penalty=s.repetition_penalty, penalize_prompt=s.penalize_prompt,
                              seed=cfg.train.seed, keywords=[list(r.keywords) for r, _ in group],
                              min_new_tokens=min(min_new_tokens, n),
                              **guidance_settings(s))
        out += [(r, p, ids) for (r, p), ids in zip(group, new)]
    return out


def write_texts(model, tokenizer, rows: Sequence, cfg: TrainConfig, warn: Callable[[str], None]) -> list[tuple]:
    """[(row, generated text)]: `write_tokens` decoded."""
    return [(r, tokenizer.decode(ids, skip_special_tokens=True))
            for r, _, ids in write_tokens(model, tokenizer, rows, cfg, warn)]


def sample_metrics(written: Sequence[tuple]) -> dict[str, float]:
    """The keyword metrics of `write_texts`' output (sample.keywords.summarise, the rows' own texts as the
    placement's references where they have one); coverages and placement are absent when no row has keywords."""
    refs = [r.text or "" for r, _ in written]
    m = summarise([t for _, t in written], [list(r.keywords) for r, _ in written],
                  references=refs if any(refs) else None) if written else {}
    return {k: float(v) for k, v in m.items() if v is not None and k != "rows"}


def held_out_metrics(model, tokenizer, rows: Sequence, cfg: TrainConfig) -> dict[str, float]:
    """`sample_metrics` of the texts written for `rows`, and their fluency: the model's own perplexity of them
    (sample.fluency, without guidance); with keyword guidance on, also that of unguided samples from the same
    prompts (perplexity_unguided) and the ratio of the two (perplexity_ratio)."""
    quiet = lambda _: None  # noqa: E731
    written = write_tokens(model, tokenizer, rows, cfg, quiet)
    m = sample_metrics([(r, tokenizer.decode(ids, skip_special_tokens=True)) for r, _, ids in written])
    if not written:
        return m
    ppl = perplexity(model, [p for _, p, _ in written], [ids for _, _, ids in written])
    if ppl is not None:
        m["perplexity"] = ppl
    if cfg.sample.keyword_boost and ppl is not None:
        plain = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, keyword_boost=0.0))
        unguided = write_tokens(model, tokenizer, rows, plain, quiet)
        base = perplexity(model, [p for _, p, _ in unguided], [ids for _, _, ids in unguided])
        if base is not None:
            m.update(perplexity_unguided=base, perplexity_ratio=ppl / base)
    return m


def format_metrics(m: dict[str, float]) -> str:
    """The metrics in one line: "keyword coverage 0.94, ..., keywords in the first 10% 0.20 (reference 0.18), ..."."""
    names = (("keyword_coverage", "keyword coverage", ""), ("swapped_coverage", "swapped", ""),
             ("distinct_1", "distinct-1", ""), ("distinct_2", "distinct-2", ""),
             ("repeat_4gram", "repeated 4-grams", ""), ("first_10pct", "keywords in the first 10%", "reference_"),
             ("longest_run", "longest keyword run", "reference_"), ("perplexity", "perplexity", "unguided"))
    parts = []
    for k, label, other in names:
        if k in m:
            other_key = f"{other}{k}" if other == "reference_" else f"{k}_{other}"
            parts.append(f"{label} {m[k]:.2f}" + (f" ({other.rstrip('_')} {m[other_key]:.2f})"
                                                  if other and other_key in m else ""))
    return ", ".join(parts)
