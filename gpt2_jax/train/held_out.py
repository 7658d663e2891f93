"""Text written for held-out rows: the samples logged at the end of a run, and the keyword metrics (coverage,
swapped coverage, distinct-n, repeated 4-grams) logged at every evaluation.

Prompts are formatted as training formats them: ``[BOS] title [SEP] keywords [SEP]`` with the keyword list cut
to batches.prompt_limit, and a lone ``[EOS]`` for rows without a title or keywords (plain language modelling,
whose documents start after an EOS). A prompt that leaves less room than sample.max_new_tokens in the context
gets fewer new tokens, and one with no room is skipped, each with a line to the caller's `warn`.
"""
from __future__ import annotations

from typing import Callable, Sequence

from gpt2_jax.data import batches
from gpt2_jax.sample.keywords import summarise
from gpt2_jax.sample.generate import generate_text
from gpt2_jax.train.config import TrainConfig


def prompt_ids(tokenizer, row, max_length: int) -> list[int]:
    """The prompt training teaches the model to continue for `row`."""
    return tokenizer.format_prompt(row.title, row.keywords, max_tokens=batches.prompt_limit(max_length))


def write_texts(model, tokenizer, rows: Sequence, cfg: TrainConfig, warn: Callable[[str], None]) -> list[tuple]:
    """[(row, generated text)] for `rows` with the run's sample settings (keyword_boost included), one
    generate call per number of new tokens; rows whose prompt fills the context are left out."""
    s, n_ctx = cfg.sample, model.config.n_positions
    groups: dict[int, list] = {}  # new tokens -> [(row, prompt)]
    for r in rows:
        prompt = prompt_ids(tokenizer, r, cfg.data.max_length)
        room = n_ctx - len(prompt)
        if room < 1:
            warn(f"held-out sample {r.title!r} skipped: its prompt of {len(prompt)} tokens fills the "
                 f"context of {n_ctx}")
            continue
        if room < s.max_new_tokens:
            warn(f"held-out sample {r.title!r} gets {room} new tokens, not sample.max_new_tokens="
                 f"{s.max_new_tokens}: its prompt of {len(prompt)} tokens leaves no more of the context of {n_ctx}")
        groups.setdefault(min(room, s.max_new_tokens), []).append((r, prompt))
    out = []
    for n, group in groups.items():
        texts = generate_text(model, tokenizer, [p for _, p in group], max_new_tokens=n, do_sample=True,
                              temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                              repetition_penalty=s.repetition_penalty, penalize_prompt=s.penalize_prompt,
                              seed=cfg.train.seed, keyword_boost=s.keyword_boost,
                              keywords=[list(r.keywords) for r, _ in group])
        out += [(r, t) for (r, _), t in zip(group, texts)]
    return out


def sample_metrics(written: Sequence[tuple]) -> dict[str, float]:
    """The keyword metrics of `write_texts`' output; coverages are absent when no row has keywords."""
    m = summarise([t for _, t in written], [list(r.keywords) for r, _ in written]) if written else {}
    return {k: float(v) for k, v in m.items() if v is not None and k != "rows"}


def format_metrics(m: dict[str, float]) -> str:
    names = (("keyword_coverage", "keyword coverage"), ("swapped_coverage", "swapped"),
             ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("repeat_4gram", "repeated 4-grams"))
    return ", ".join(f"{label} {m[k]:.2f}" for k, label in names if k in m)
