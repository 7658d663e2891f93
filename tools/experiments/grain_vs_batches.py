"""``tools/bench.py grain``: Grain's loader (``grain`` 0.2.x: MapDataset, packing iterators) against our data
path (data.token_store + data.Batches), over the same memory-mapped token corpus, in one process, interleaved.

Setups: "demo" (the bundled builtin:stdlib-docs corpus tokenized as train.py does, T=128, batch 16, keyword
augmentation on) and "pod" (a synthetic text-only corpus of ~200k documents, log-normal lengths, written once
in our on-disk format; T=1024, batch 32). Ours is ``Batches(..., packing=True)`` (best fit over the whole
epoch's windows). Grain's is the closest equivalent built from its parts: a MapDataset over the example ids,
``shuffle(seed).repeat()`` (a new order each epoch), ``map_with_index`` building each example's sequence (our
keyword augmentation of that epoch), a FlatMap cutting long examples into our windows (repeated zero-loss
prompt), ``BestFitPackIterDataset`` / ``FirstFitPackIterDataset`` (``num_packing_bins`` bins packed at a time)
and ``batch``. Reading is in the calling thread (``ReadOptions(num_threads=0)``), like ours.

Rows (bench="grain", one JSON object each):
  what=speed    batches/s, slots/s (B*T per batch) and real (non-padding) tokens/s of each impl, timed in
                alternating rounds after a first batch (reported apart: ours plans an epoch there);
  what=padding  padding share of a whole epoch: ours from its plan; Grain's from running its packer over the
                epoch (lengths-only elements: the same decisions, checked against the real pipeline on demo);
  what=restore  a fresh process's cost to produce batch N (demo: mid-epoch 5; pod: mid-epoch 1): ours
                constructs Batches and fetches batch N (plans every earlier epoch); Grain builds the pipeline
                and set_state()s a saved iterator state (and, without one, must replay N batches);
  what=features (a) no label across examples, positions restarting, segment ids; (b) the long-text windows
                with the repeated zero-loss prompt (same windows and label count as ours?); (c) batch a pure
                function of the step, and per-host slices of one global batch (2 processes vs 1).
  what=loc      lines of code of each side.
"""
from __future__ import annotations

import sys

try:
    import grain
except ImportError:
    print("tools/bench.py grain needs Google's grain loader: pip install grain", file=sys.stderr)
    sys.exit(2)

import inspect
import json
import os
import time
from pathlib import Path

import numpy as np

from gpt2_jax.data import batches as data
from gpt2_jax.data.token_store import TokenizedCorpus

_CACHE = Path(os.path.expanduser("~/.cache/gpt2-jax/bench-grain"))


def _print(**row) -> None:
    print(json.dumps({"bench": "grain", **row}), flush=True)


# ---------------------------------------------------------------- corpora


def pod_corpus(n_docs: int = 200_000, median: int = 350, sigma: float = 1.0, seed: int = 0) -> Path:
    """A text-only corpus in our prepared format (one uint16 shard, memory-mapped when loaded): ``n_docs``
    documents of log-normal length (median ``median`` tokens, clipped to [16, 32768]) of random GPT-2 ids."""
    out = _CACHE / f"pod-{n_docs}-{median}-{sigma}-{seed}"
    if (out / "meta.json").is_file():
        return out
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), sigma, n_docs), 16, 32768).astype(np.int64)
    ends = np.cumsum(lengths)
    tmp = out.with_name(out.name + ".tmp")
    (tmp / "shard-00000").mkdir(parents=True, exist_ok=True)
    np.save(tmp / "shard-00000" / "tokens.npy", rng.integers(0, 50256, int(ends[-1]), dtype=np.uint16))
    starts = ends - lengths  # title and keywords empty: pieces 3r, 3r + 1 start where the text does
    np.save(tmp / "piece_off.npy", np.append(np.stack([starts, starts, starts], 1).reshape(-1), ends[-1]))
    np.save(tmp / "kw_tokens.npy", np.zeros(0, np.int32))
    np.save(tmp / "kw_off.npy", np.zeros(1, np.int64))
    np.save(tmp / "row_kw.npy", np.zeros(0, np.int32))
    np.save(tmp / "row_kw_off.npy", np.zeros(n_docs + 1, np.int64))
    meta = dict(version=2, rows=n_docs, keywords=0, tokens=int(ends[-1]), keyword_mismatches=0, text_only=True,
                dtype="uint16", vocab_size=50257, special_ids={"<|endoftext|>": 50256}, kind="synthetic",
                shards=[{"name": "shard-00000", "tokens": int(ends[-1])}])
    (tmp / "meta.json").write_text(json.dumps(meta))
    os.replace(tmp, out)
    return out


def demo_corpus(path: str | None) -> TokenizedCorpus:
    """The demo's tokenized corpus: ``path`` (a train.py cache directory), else tokenized here as train.py
    does (SentencePiece of 4,000 pieces trained on the corpus), cached under ~/.cache/gpt2-jax/bench-grain."""
    if path:
        return TokenizedCorpus.load(path)
    from gpt2_jax.data.rows import read_rows, resolve_corpus, row_texts
    from gpt2_jax.data.token_writer import tokenize_corpus
    from gpt2_jax.tokenizer import load_tokenizer, train_sentencepiece

    docs = list(read_rows(resolve_corpus("builtin:stdlib-docs", os.path.expanduser("~/.cache/gpt2-jax/data"))))
    tok_dir = _CACHE / "demo-tokenizer"
    tok = load_tokenizer(str(tok_dir)) if tok_dir.is_dir() else train_sentencepiece(row_texts(docs), str(tok_dir), 4000)
    return tokenize_corpus(docs, tok, _CACHE / "demo-cache")


def special_ids(corpus: TokenizedCorpus) -> dict:
    s = corpus.special_ids
    if "[BOS]" in s:
        return dict(bos_id=s["[BOS]"], sep_id=s["[SEP]"], eos_id=s["[EOS]"], pad_id=s["[PAD]"])
    eot = s["<|endoftext|>"]  # text-only: only EOS is ever placed; padding is masked out anyway
    return dict(bos_id=eot, sep_id=eot, eos_id=eot, pad_id=eot)


# ---------------------------------------------------------------- the Grain pipeline (what adoption would need)
# GRAIN-PIPELINE-BEGIN


class _Windows(grain.experimental.FlatMapTransform):
    """An example {"seq": S, "P": prompt length, "text_only"} -> our windows, each {"input_ids", "labels",
    "loss_mask"} of at most T tokens: the first S[:T+1], later ones repeat the prompt S[:P] as zero-loss
    context (title/keyword rows) or simply continue (text-only rows), as data.Batches cuts them."""

    max_fan_out = 1 << 16

    def __init__(self, T: int, lengths_only: bool = False):
        self.T, self.lengths_only = T, lengths_only

    def flat_map(self, ex):
        T, S, P, text_only = self.T, ex["seq"], ex["P"], ex["text_only"]
        labels = len(S) - 1
        goes_on = text_only or P <= data.prompt_limit(T)
        step = T if text_only else max(T - P, 1)
        out, c, p = [], 0, 0
        while True:
            m = min(T - p, labels - c)
            if self.lengths_only:
                out.append({"input_ids": np.zeros(p + m, np.int8)})
            else:
                tok = np.concatenate([S[:p], S[c:c + m + 1]])
                mask = np.zeros(p + m, np.float32)
                mask[p:] = 1.0  # loss_on="all": every body label; the repeated prefix is context only
                out.append({"input_ids": tok[:-1], "labels": tok[1:], "loss_mask": mask})
            c += m
            if not goes_on or c >= labels:
                return out
            p = 0 if text_only else P


def grain_pipeline(corpus: TokenizedCorpus, ids: np.ndarray, *, T: int, B: int, seed: int, bins: int,
                   packer: str = "best", process_index: int = 0, process_count: int = 1, epochs: int | None = None,
                   lengths_only: bool = False, keyword_augment: bool = True):
    """Grain's equivalent of ``Batches(..., packing=True)``: an IterDataset of batches {"input_ids",
    "labels", "loss_mask", "input_ids_segment_ids", "input_ids_positions"}, each [B, T]."""
    sp = special_ids(corpus)
    ds = grain.MapDataset.source(ids)[process_index::process_count]  # per host: its own documents
    n = len(ds)
    ds = ds.shuffle(seed % 2**32).repeat(epochs)  # repeat() reseeds the shuffle each epoch

    def example(index: int, i) -> dict:
        i = int(i)
        if lengths_only and len(corpus.title(i)) == 0 and corpus.num_keywords(i) == 0:  # [EOS] text [EOS]
            return {"seq": range(len(corpus.text(i)) + 2), "P": 1, "text_only": True}
        order = (data._augmented(corpus, np.array([i]), seed, index // n)[0]
                 if keyword_augment and corpus.num_keywords(i) else None)
        S, P = corpus.sequence(i, order, bos_id=sp["bos_id"], sep_id=sp["sep_id"], eos_id=sp["eos_id"],
                               prompt_limit=data.prompt_limit(T))
        return {"seq": S, "P": P, "text_only": len(corpus.title(i)) == 0 and corpus.num_keywords(i) == 0}

    it = ds.map_with_index(example).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    it = grain.experimental.FlatMapIterDataset(it, _Windows(T, lengths_only))
    if packer == "cts":  # concat-then-split: no padding, but a window split over two rows loses its context
        it = grain.experimental.ConcatThenSplitIterDataset(
            it, length_struct={k: T for k in (("input_ids",) if lengths_only else ("input_ids", "labels", "loss_mask"))})
        return it.batch(B)
    pack = {"best": grain.experimental.BestFitPackIterDataset,
            "first": grain.experimental.FirstFitPackIterDataset}[packer]
    if lengths_only:
        it = pack(it, length_struct={"input_ids": T}, num_packing_bins=bins, seed=seed)
    else:
        it = pack(it, length_struct={"input_ids": T, "labels": T, "loss_mask": T}, num_packing_bins=bins, seed=seed,
                  meta_features=("labels", "loss_mask"),
                  padding_struct={"input_ids": sp["pad_id"], "labels": sp["pad_id"], "loss_mask": 0})
    return it.batch(B)


# GRAIN-PIPELINE-END
# ---------------------------------------------------------------- measurements


def ours_batches(corpus, ids, *, T, B, seed, **kw) -> data.Batches:
    return data.Batches(corpus, ids, **special_ids(corpus), max_length=T, batch_size=B, seed=seed, packing=True, **kw)


def _ours_next(b: data.Batches):
    step = 0

    def nxt():
        nonlocal step
        out = b.local_batch(step)
        step += 1
        return out["segment_ids"]
    return nxt


def _grain_next(it):
    return lambda: next(it)["input_ids_segment_ids"]


def speed(setup: str, corpus, ids, *, T, B, seed, rounds: int, per_round: int, variants) -> None:
    """Batches/s of each impl, in alternating rounds of ``per_round`` batches."""
    impls = {"ours": _ours_next(ours_batches(corpus, ids, T=T, B=B, seed=seed))}
    for packer, bins in variants:
        impls[_name(packer, bins)] = _grain_next(
            iter(grain_pipeline(corpus, ids, T=T, B=B, seed=seed, bins=bins, packer=packer)))
    first, secs, real, count = {}, dict.fromkeys(impls, 0.0), dict.fromkeys(impls, 0), dict.fromkeys(impls, 0)
    for name, nxt in impls.items():
        t0 = time.perf_counter()
        nxt()
        first[name] = time.perf_counter() - t0
    for _ in range(rounds):
        for name, nxt in impls.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                seg = nxt()
                real[name] += int(np.count_nonzero(seg))
            secs[name] += time.perf_counter() - t0
            count[name] += per_round
    for name in impls:
        bps = count[name] / secs[name]
        _print(what="speed", setup=setup, impl=name, T=T, batch=B, batches=count[name],
               first_batch_s=round(first[name], 4), batches_per_s=round(bps, 1),
               slots_per_s=round(bps * B * T), real_tokens_per_s=round(real[name] / secs[name]),
               padding_share_seen=round(1 - real[name] / (count[name] * B * T), 4))


def padding(setup: str, corpus, ids, *, T, B, seed, variants, check_real: bool) -> None:
    """Padding share of epoch 0's rows: ours from the plan, Grain's by packing the whole epoch."""
    t0 = time.perf_counter()
    b = ours_batches(corpus, ids, T=T, B=B, seed=seed)
    plan = b.plan(0)
    _print(what="padding", setup=setup, impl="ours", T=T, rows=plan.num_rows, segments=len(plan.example_N),
           real_tokens=int(plan.row_len_R.sum()), padding_share=round(b.padding_share(0), 4),
           plan_s=round(time.perf_counter() - t0, 3))
    for packer, bins in variants:
        t0 = time.perf_counter()
        rows = windows = tokens = 0
        for batch in grain_pipeline(corpus, ids, T=T, B=B, seed=seed, bins=bins, packer=packer, epochs=1,
                                    lengths_only=True):
            seg = batch["input_ids_segment_ids"]
            rows, windows, tokens = rows + len(seg), windows + int(seg.max(1).sum()), tokens + int(np.count_nonzero(seg))
        row = dict(what="padding", setup=setup, impl=_name(packer, bins), T=T, rows=rows, segments=windows,
                   real_tokens=tokens, padding_share=round(1 - tokens / (rows * T), 4),
                   windows_split=windows - len(plan.example_N),  # each cut adds a segment (at position 0: no context)
                   epoch_lengths_only_s=round(time.perf_counter() - t0, 3))
        if check_real:  # the lengths-only run packs exactly as the real pipeline does
            t0 = time.perf_counter()
            r = sum(int(np.count_nonzero(x["input_ids_segment_ids"])) for x in grain_pipeline(
                corpus, ids, T=T, B=B, seed=seed, bins=bins, packer=packer, epochs=1))
            row.update(real_pipeline_tokens=r, real_pipeline_same=r == tokens,
                       epoch_real_s=round(time.perf_counter() - t0, 3))
        _print(**row)


def restore_ours(setup: str, corpus, ids, *, T, B, seed, epoch: float) -> int:
    """Ours: a fresh Batches and its batch N (it plans every epoch up to N's to count their rows)."""
    N = int(epoch * ours_batches(corpus, ids, T=T, B=B, seed=seed).steps_per_epoch)
    t0 = time.perf_counter()
    ours_batches(corpus, ids, T=T, B=B, seed=seed).local_batch(N)
    _print(what="restore", setup=setup, impl="ours", step=N, epoch=epoch, state="the step (an int)",
           restore_s=round(time.perf_counter() - t0, 4))
    return N


def restore(setup: str, corpus, ids, *, T, B, seed, epoch: float, bins: int, replay: bool) -> None:
    """A fresh start's batch N = int(epoch * steps/epoch): ours from the step alone, Grain from a saved state."""
    N = restore_ours(setup, corpus, ids, T=T, B=B, seed=seed, epoch=epoch)
    t0 = time.perf_counter()
    it = iter(grain_pipeline(corpus, ids, T=T, B=B, seed=seed, bins=bins))
    if replay:
        for _ in range(N):
            next(it)
    else:  # skip ahead without building batches: the first N batches' windows, lengths only
        lit = iter(grain_pipeline(corpus, ids, T=T, B=B, seed=seed, bins=bins, lengths_only=True))
        for _ in range(N):
            next(lit)
        it.set_state(lit.get_state())
    replay_s = time.perf_counter() - t0
    state = it.get_state()
    want = next(it)
    t0 = time.perf_counter()
    fresh = iter(grain_pipeline(corpus, ids, T=T, B=B, seed=seed, bins=bins))
    fresh.set_state(json.loads(json.dumps(state)))  # as a checkpoint would store it
    got = next(fresh)
    restore_s = time.perf_counter() - t0
    _print(what="restore", setup=setup, impl=f"grain-bestfit-bins{bins}", step=N, epoch=epoch, state=state,
           state_bytes=len(json.dumps(state)), restore_s=round(restore_s, 4),
           **{"replay_s" if replay else "replay_lengths_only_s": round(replay_s, 3)},
           bitwise_same=all(np.array_equal(want[k], got[k]) for k in want))


def features(setup: str, corpus, ids, *, T, B, seed, bins: int) -> None:
    """(a) labels never cross segments, positions restart, segment ids; (b) windows: the same windows and
    trained labels per epoch as ours; (c) per-host slices of one global batch; a batch from the step alone."""
    it = iter(grain_pipeline(corpus, ids, T=T, B=B, seed=seed, bins=bins, epochs=1))
    ok_a = True
    windows = labels = 0
    prefix_ctx = 0  # repeated-prompt tokens carried as zero-loss context
    for batch in it:
        x, y, seg, pos, m = (batch[k] for k in ("input_ids", "labels", "input_ids_segment_ids", "input_ids_positions",
                                                 "loss_mask"))
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        ok_a &= bool(np.all(y[:, :-1][same] == x[:, 1:][same]))  # a label is the next input only within a segment
        ok_a &= bool(np.all(pos[:, 1:][same] == pos[:, :-1][same] + 1) and np.all(pos[:, 1:][~same & (seg[:, 1:] > 0)] == 0))
        ok_a &= bool(np.all(pos[:, 0] == 0) and np.all(m[seg == 0] == 0))
        windows += int(seg.max(1).sum())
        labels += int(m.sum())
        prefix_ctx += int(np.count_nonzero((seg > 0) & (m == 0)))
    b = ours_batches(corpus, ids, T=T, B=B, seed=seed)
    plan = b.plan(0)
    ours_labels = int(plan.body_N.sum())  # loss_on="all": every body label of every window counts
    # (c) two processes: ours gives each a slice of the single-process batch; Grain packs each host's documents
    one = ours_batches(corpus, ids, T=T, B=B, seed=seed).local_batch(7)["input_ids"]
    two = [ours_batches(corpus, ids, T=T, B=B, seed=seed, process_index=p, process_count=2).local_batch(7)["input_ids"]
           for p in range(2)]
    g1 = _nth(grain_pipeline(corpus, ids, T=T, B=B, seed=seed, bins=bins), 7)["input_ids"]
    g2 = [_nth(grain_pipeline(corpus, ids, T=T, B=B // 2, seed=seed, bins=bins, process_index=p, process_count=2),
               7)["input_ids"] for p in range(2)]
    _print(what="features", setup=setup, T=T, batch=B,
           a_no_cross_labels_positions_segments=ok_a,
           b_grain_windows=windows, b_ours_windows=len(plan.example_N),
           b_grain_trained_labels=labels, b_ours_trained_labels=ours_labels,
           b_zero_loss_prefix_tokens=prefix_ctx, b_how="our _Windows FlatMap on top of Grain (Grain has no such transform)",
           c_ours_batch_from_step=True, c_grain_needs_iterator_state=True,
           c_ours_two_hosts_equal_one=bool(np.array_equal(np.concatenate(two, 1), one)),
           c_grain_two_hosts_equal_one=bool(np.array_equal(np.concatenate(g2, 0), g1)))


def _name(packer: str, bins: int) -> str:
    return "grain-concat-then-split" if packer == "cts" else f"grain-{packer}fit-bins{bins}"


def _nth(ds, n: int):
    it = iter(ds)
    for _ in range(n):
        next(it)
    return next(it)


def loc() -> None:
    src = Path(__file__).read_text().split("# GRAIN-PIPELINE-BEGIN")[1].split("# GRAIN-PIPELINE-END")[0]
    code = lambda text: sum(1 for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#"))  # noqa: E731
    ours = inspect.getsource(data.Batches) + "".join(inspect.getsource(f) for f in (data._Plan, data._span, data._best_fit))
    _print(what="loc", grain_pipeline_lines=code(src),
           ours_batches_lines=code(ours), note="non-blank, non-comment lines incl. docstrings; both reuse "
           "token_cache.TokenizedCorpus and data's keyword augmentation / example_lengths")


def bench(demo_path: str | None, pod_docs: int, quick: bool = False, setups: str = "demo,pod") -> None:
    # Timed rounds hold whole packing bursts (bins / batch batches are packed at once, then served).
    rounds = 2 if quick else 4
    if "demo" in setups:
        demo = demo_corpus(demo_path)
        d_ids = np.arange(len(demo))
        dv = [("best", 16), ("first", 16), ("best", 128)]
        speed("demo", demo, d_ids, T=128, B=16, seed=0, rounds=rounds, per_round=16, variants=dv)
        padding("demo", demo, d_ids, T=128, B=16, seed=0, variants=dv, check_real=True)
        restore("demo", demo, d_ids, T=128, B=16, seed=0, epoch=5.5, bins=16, replay=True)
        features("demo", demo, d_ids, T=128, B=16, seed=0, bins=16)
    if "pod" in setups:
        pod = TokenizedCorpus.load(pod_corpus(pod_docs))
        p_ids = np.arange(len(pod))
        pv = [("best", 32), ("first", 32), ("best", 256), ("cts", 0)]
        speed("pod", pod, p_ids, T=1024, B=32, seed=0, rounds=rounds, per_round=16, variants=pv)
        padding("pod", pod, p_ids, T=1024, B=32, seed=0, variants=pv, check_real=False)
        restore("pod", pod, p_ids, T=1024, B=32, seed=0, epoch=1.5, bins=32, replay=False)
        restore_ours("pod", pod, p_ids, T=1024, B=32, seed=0, epoch=10.5)  # Grain's stays one set_state
    loc()
