"""Generation for a whole file of titles and keywords on the continuous-batching engine: seeded, resumable.

The rows are planned once, from the input alone: sorted by the new tokens they may take and by prompt
length (so rows admitted together share a prefill bucket). They enter the engine (sample/engine.py) in that
order, `batch_size` slots decoding at once, and each finished row's slot takes the next row. Every row's
text is a function of its own prompt, settings and seed alone (greedy: `generate`'s tokens for the prompt;
sampled: a seed derived from (seed, row)), so a resumed run writes exactly what an uninterrupted one would,
generating only the rows missing from the output. An output is continued only with the same settings and the
same input rows (their digest is in its settings file).
Output lines are JSON objects `{"index", "title", "keywords", "text"}` in the plan's order (rows that finish
early wait for those before them); `index` is the row's position among the input's good rows. When done, the
keyword metrics of the whole output (sample.keywords.summarise: coverage, distinct-n, the keywords' placement,
against the input's own texts where it has them) and the model's perplexity of it (with guidance, against
unguided texts': `fluency`) are logged and returned under "metrics".
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from gpt2_jax.data.rows import Row, read_rows
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sample.engine import Engine, Request
from gpt2_jax.sample.fluency import perplexity
from gpt2_jax.sample.generate import MIN_KEYWORD_BUCKET, bucket_length, check_sampling, generate_tokens, special_ids
from gpt2_jax.sample.keywords import summarise
from gpt2_jax.sample.processors import glue_ids
from gpt2_jax.text import keyword_token_ids

log = logging.getLogger(__name__)

# Rows written again without keyword guidance, for the perplexity of unguided texts beside the guided ones'.
UNGUIDED_ROWS = 64


def plan_batches(prompt_lengths: list[int], new_tokens: list[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches: equal new-token budgets together, shortest prompts first, at most
    `batch_size` rows each."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-new_tokens[i], prompt_lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if not batches or len(batches[-1]) == batch_size or new_tokens[batches[-1][0]] != new_tokens[i]:
            batches.append([])
        batches[-1].append(i)
    return batches


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of one row: from (seed, row) alone, whatever runs beside it."""
    return int(np.random.SeedSequence([seed, row]).generate_state(1)[0]) % 2**31


def generate_file(model, tokenizer, input_path: str, output_path: str, *, batch_size: int = 32,
                  max_new_tokens: int = 100, seed: int = 0, prompt_limit: Optional[int] = None,
                  progress: bool = True, **sampling) -> dict:
    """Write a text for every row of `input_path` (CSV or JSONL with title and keywords) to `output_path`
    (JSONL), continuing an existing output of the same settings. Returns counts and tokens/s.
    `batch_size`: the engine's slots (rows decoding at once).

    Bad rows and prompts that do not fit the model's context are logged as warnings, one line each, and
    skipped; a prompt that leaves less room than `max_new_tokens` gets fewer new tokens (one summary line).
    `prompt_limit` cuts keyword lists as training did (data.batches.prompt_limit); `sampling`: generate's settings.
    With `keyword_boost` > 0 in them, each row's keywords (all of them) are boosted. Every setting is checked
    (check_file_run, and the token ids against the model) before a file is written.
    """
    check_file_run(input_path, output_path, batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed,
                   **sampling)
    eos_ids, pad_id = special_ids(model.config, sampling.get("eos_token_id", tokenizer.eos_id),
                                  sampling.get("pad_token_id", tokenizer.pad_id))
    rows = read_rows(input_path, skip_bad_rows=True, with_text=False)
    for line in rows.bad:
        log.warning(f"skipped {line}")
    n_ctx = model.config.n_positions
    prompts = [tokenizer.format_prompt(r.title, r.keywords, max_tokens=prompt_limit) for r in rows]
    budget = [min(max_new_tokens, n_ctx - len(p)) for p in prompts]
    short = sum(0 < b < max_new_tokens for b in budget)
    for i in (i for i, b in enumerate(budget) if b < 1):
        log.warning(f"skipped row {i} ({rows[i].title[:40]!r}): its prompt of {len(prompts[i])} tokens fills "
                    f"the model's context of {n_ctx}")
    if short:
        log.warning(f"{short} row(s) get fewer than {max_new_tokens} new tokens: their prompts leave no more of "
                    f"the context of {n_ctx}")
    usable = [i for i, b in enumerate(budget) if b >= 1]
    order = [usable[j] for b in plan_batches([len(prompts[i]) for i in usable], [budget[i] for i in usable],
                                             batch_size) for j in b]
    settings = {"input": os.path.abspath(input_path), "rows": len(rows), "rows_sha256": rows_digest(rows),
                "batch_size": batch_size, "max_new_tokens": max_new_tokens, "seed": seed,
                "prompt_limit": prompt_limit, **sampling}
    for k in ("keyword_boost", "keyword_wait"):
        if not settings.get(k, 1):
            del settings[k]  # off: outputs written before the option existed continue as they were
    if sampling.get("do_sample", False):
        settings["seeds"] = "per row"  # sampled outputs of the batched path (a seed per batch) are not continued
    done = _open_output(Path(output_path), settings)
    todo = [i for i in order if i not in done]
    requests = _requests(tokenizer, rows, prompts, budget, todo, seed, sampling)
    glue = glue_ids(tokenizer) if sampling.get("keyword_boost") and sampling.get("keyword_wait") else ()
    engine = _engine(model, requests, batch_size, eos_ids, pad_id, glue) if todo else None

    bar = tqdm(total=len(usable), initial=sum(i in done for i in usable), disable=not progress, unit="row",
               dynamic_ncols=True)
    written = generated = 0
    t0 = time.perf_counter()
    with open(output_path, "a", encoding="utf-8") as out:
        for i, new in _finished_in_order(engine, requests, todo, batch_size):
            generated += len(new)
            text = tokenizer.decode(new, skip_special_tokens=True)
            out.write(json.dumps({"index": i, "title": rows[i].title, "keywords": list(rows[i].keywords),
                                  "text": text}, ensure_ascii=False) + "\n")
            out.flush()
            written += 1
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    stats = {"rows": len(rows), "bad_rows": rows.skipped, "skipped_prompts": len(rows) - len(usable),
             "written": written, "already_done": len(done & set(usable)), "new_tokens": generated,
             "seconds": seconds, "tokens_per_s": generated / max(seconds, 1e-9)}
    metrics = output_metrics(output_path, {i: r.text for i, r in enumerate(rows) if r.text})
    if metrics is not None:
        metrics.update(fluency(model, tokenizer, output_path, prompts, seed, sampling))
        log.info("keywords: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()))
        stats["metrics"] = metrics
    return stats


def _requests(tokenizer, rows, prompts, budget, todo, seed, sampling) -> dict[int, Request]:
    """The engine request of each row to generate (keywords only with a boost, as generate_tokens passes them)."""
    settings = {k: v for k, v in sampling.items() if k not in ("eos_token_id", "pad_token_id", "num_return_sequences")}
    boost = settings.get("keyword_boost", 0.0)
    out = {}
    for i in todo:
        kws = tuple(tuple(ids) for ids in keyword_token_ids(tokenizer, rows[i].keywords) if ids) if boost else ()
        out[i] = Request(prompt=tuple(prompts[i]), max_new_tokens=budget[i], seed=row_seed(seed, i),
                         keywords=kws, **settings)
    return out


def _engine(model, requests: dict[int, Request], slots: int, eos_ids, pad_id: int, glue=()) -> Engine:
    """An engine of `slots` slots (no more than there are rows) whose keyword table fits every row's keywords."""
    kws = [r.keywords for r in requests.values()]
    K = bucket_length(max(map(len, kws), default=1), MIN_KEYWORD_BUCKET)
    L = bucket_length(max((len(k) for row in kws for k in row), default=1), MIN_KEYWORD_BUCKET)
    return Engine(model, slots=max(1, min(slots, len(requests))), eos_ids=eos_ids, pad_id=pad_id, max_keywords=K,
                  max_keyword_tokens=L, glue_ids=glue)


def _finished_in_order(engine: Engine, requests: dict[int, Request], todo: list[int], slots: int):
    """(row, new tokens) of every row in `todo`, in that order: rows enter the engine in order as slots free
    (at most `slots` queued beyond them), and a row that finishes early waits for the rows before it."""
    row_of: dict[int, int] = {}
    got: dict[int, list[int]] = {}
    finished: dict[int, list[int]] = {}
    nxt = emitted = 0
    while emitted < len(todo):
        while nxt < len(todo) and engine.pending < slots:
            row_of[engine.add(requests[todo[nxt]])] = todo[nxt]
            nxt += 1
        for o in engine.step():
            got.setdefault(o.rid, []).extend(o.tokens)
            if o.finished:
                if o.finish_reason == "error":
                    raise GPT2JaxError(f"row {row_of[o.rid]}: generation failed: {o.error}")
                finished[row_of[o.rid]] = got.pop(o.rid)
        while emitted < len(todo) and todo[emitted] in finished:
            yield todo[emitted], finished.pop(todo[emitted])
            emitted += 1


def check_file_run(input_path: str, output_path: str, *, batch_size: int = 32, max_new_tokens: int = 100,
                   seed: int = 0, **sampling) -> None:
    """generate_file's checks that need no model, for a caller to run before it loads one: the paths' kinds
    and every setting (generate.check_sampling's, and finite numbers, which the settings file must compare)."""
    if Path(input_path).is_dir():
        raise GPT2JaxError(f"input {input_path} is a directory, not a CSV or JSONL file of rows")
    if not Path(input_path).exists():
        raise GPT2JaxError(f"input {input_path} does not exist")
    if Path(output_path).is_dir():
        raise GPT2JaxError(f"output {output_path} is a directory; give the path of a JSONL file to write")
    above = next((d for d in Path(output_path).parents if d.exists()), None)
    if above is not None and not above.is_dir():
        raise GPT2JaxError(f"output {output_path}: {above} is a file, not a directory")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise GPT2JaxError(f"batch size must be at least 1, got {batch_size}")
    if sampling.get("num_return_sequences", 1) != 1:
        raise GPT2JaxError(f"generate_file writes one text per row: num_return_sequences must be 1, got "
                           f"{sampling['num_return_sequences']}")
    check_sampling(max_new_tokens=max_new_tokens, seed=seed,
                   **{k: v for k, v in sampling.items() if k not in ("eos_token_id", "pad_token_id")})
    for k, v in sampling.items():  # greedy decoding ignores the temperature, but NaN != NaN on a rerun
        if isinstance(v, float) and not math.isfinite(v):
            raise GPT2JaxError(f"{k} must be a finite number, got {v}")


def rows_digest(rows: list[Row]) -> str:
    """sha256 of the rows as read (title, keywords, text): what says a resumed output continues the same input."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.title, list(r.keywords), r.text], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def _output_lines(output_path: str) -> list[dict]:
    return sorted((json.loads(line) for line in Path(output_path).read_text(encoding="utf-8").splitlines()),
                  key=lambda o: o["index"])


def output_metrics(output_path: str, references: Optional[dict[int, str]] = None) -> Optional[dict]:
    """sample.keywords.summarise over every line of an output (resumed parts too), in index order, with the
    input rows' own texts (`references`, by index) as the placement's reference where the input has them; None
    when no row has keywords."""
    objs = _output_lines(output_path)
    if not any(o["keywords"] for o in objs):
        return None
    refs = [(references or {}).get(o["index"], "") for o in objs]
    return summarise([o["text"] for o in objs], [o["keywords"] for o in objs], references=refs if any(refs) else None)


def fluency(model, tokenizer, output_path: str, prompts: list[list[int]], seed: int, sampling: dict) -> dict:
    """The model's own perplexity of the output's texts (re-encoded, given their prompts, without guidance);
    with keyword guidance on, that of unguided texts written for the first UNGUIDED_ROWS rows, and the ratio of
    the guided texts' perplexity to it over those rows."""
    n_ctx = model.config.n_positions
    objs = _output_lines(output_path)
    rows = [(prompts[o["index"]], tokenizer.encode(o["text"])[:n_ctx - len(prompts[o["index"]])]) for o in objs]
    ppl = perplexity(model, [p for p, _ in rows], [t for _, t in rows])
    out = {} if ppl is None else {"perplexity": ppl}
    if not sampling.get("keyword_boost") or ppl is None:
        return out
    first = rows[:UNGUIDED_ROWS]
    plain = {k: v for k, v in sampling.items() if k not in ("keyword_boost", "keyword_wait")}
    budget = min(n_ctx - max(len(p) for p, _ in first), max(len(t) for _, t in first))
    new = generate_tokens(model, tokenizer, [p for p, _ in first], max_new_tokens=max(budget, 1), seed=seed, **plain)
    unguided = perplexity(model, [p for p, _ in first], [tokenizer.encode(tokenizer.decode(t, skip_special_tokens=True))
                                                         [:n_ctx - len(p)] for (p, _), t in zip(first, new)])
    guided = perplexity(model, [p for p, _ in first], [t for _, t in first])
    if unguided and guided:
        out.update(perplexity_unguided=unguided, perplexity_ratio=guided / unguided)
    return out


def _open_output(path: Path, settings: dict) -> set[int]:
    """The indices an existing output already holds (its settings must match), after cutting a last line
    that a killed run left half written; a new output gets its settings file."""
    meta = path.with_name(path.name + ".settings.json")
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
            path.write_text("")
        except OSError as e:
            raise GPT2JaxError(f"cannot write the output {path} ({e.strerror or e})") from None
        return set()
    try:
        saved = json.loads(meta.read_text())
    except (OSError, ValueError):
        raise GPT2JaxError(f"{path} exists without a readable {meta.name}: not an output of this tool, or "
                           f"damaged; give another --output") from None
    changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if "input" not in changed and ("rows" in changed or "rows_sha256" in changed and "rows_sha256" in saved):
        what = (f"{saved.get('rows')} -> {settings['rows']} rows" if saved.get("rows") != settings["rows"] else
                f"the content of its {settings['rows']} rows differs")
        raise GPT2JaxError(f"{settings['input']} changed since {path} was written from it ({what}); continue with "
                           f"the input as it was, or delete {path} and {meta.name} to start over")
    if changed:
        raise GPT2JaxError(f"{path} was written with other settings ({', '.join(changed)}); continue it with "
                           f"the same ones, or give another --output")
    raw = path.read_bytes()
    keep = raw[:raw.rfind(b"\n") + 1]  # a half-written last line is dropped
    if len(keep) != len(raw):
        path.write_bytes(keep)
    done = set()
    for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
        try:
            done.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError):
            raise GPT2JaxError(f"{path}:{n}: not a line this tool wrote") from None
    return done
