"""Preparing a corpus of any size: rows streamed from the file in bounded memory, chunks of rows tokenized
in worker processes, each chunk one shard of ``data.token_store``'s format; resumable and refusing to mix sources.

The directory is usable once ``meta.json`` is written (last). Before that, ``prepare.json`` records what is
being prepared (source identity, tokenizer digest, settings), so that a re-run after a kill keeps the
finished shards (verified against their checksums) and refuses a source that changed meanwhile (a plan that
finished no shard is dropped: nothing of it to keep). The workers die with the process that started them.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from gpt2_jax.data import token_writer
from gpt2_jax.data.rows import Row, corpus_format, iter_rows
from gpt2_jax.data.token_store import tokenizer_digest
from gpt2_jax.errors import GPT2JaxError, first_line

log = logging.getLogger(__name__)

PLAN = "prepare.json"  # what an unfinished directory is being prepared from
DEFAULT_SHARD_TOKENS = 1 << 22  # 8 MB uint16 shards; the reader holds about 6 chunks of 4 bytes of text a token
_BYTES_PER_TOKEN = 4  # a chunk of rows holds about shard_tokens * this many characters
_HASH_BLOCK = 1 << 24  # bytes of the source hashed at once
# Where GPT-2's byte-level pre-tokenizer always ends a pre-token: after a newline that follows a non-space and
# that a printable ASCII character follows. Such a newline is a whitespace run of its own in the whole text and
# at the end of a piece alike; after a space it is not (" " + "\n" inside a text, " \n" at a piece's end, which
# a BPE with the merge "ĠĊ" encodes differently). Texts cut there encode to the same ids. Python sources cut so
# took about a quarter less CPU time than whole (the same instructions: presumably the tokenizer's smaller
# per-text buffers stay in cache).
_LINE_START = re.compile(r"(?<=\S\n)(?=[!-~])")


def source_identity(path: Path) -> dict:
    """What says the source file is unchanged: path, size, mtime and the sha256 of every byte (about 1 s a GB,
    against minutes to tokenize it), so that no edit, however small, reuses stale tokens."""
    h = hashlib.sha256()
    try:
        st = path.stat()
        with open(path, "rb") as f:
            while block := f.read(_HASH_BLOCK):
                h.update(block)
    except OSError as e:
        raise GPT2JaxError(f"cannot read the corpus {path} ({first_line(e)})") from None
    return dict(path=str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=h.hexdigest())


def prepare_corpus(corpus: str | Path, tokenizer_dir: str | Path, out: str | Path, *, format: Optional[str] = None,
                   workers: int = 2, shard_tokens: int = DEFAULT_SHARD_TOKENS, skip_bad_rows: bool = False,
                   on_shard: Optional[Callable[[int], None]] = None) -> dict:
    """Prepare ``corpus`` with the tokenizer at ``tokenizer_dir`` into the directory ``out``; returns a summary
    (rows, tokens, shards, shards written now, bad rows, seconds). ``on_shard(i)`` runs after shard i is
    on disk (tests stop a run there)."""
    from gpt2_jax.tokenizer import load_tokenizer  # here, not above: the workers import this module without it

    t0 = time.time()
    path, out = Path(corpus), Path(out)
    format = corpus_format(path, format)
    if shard_tokens < 1 or workers < 0:
        raise GPT2JaxError(f"shard_tokens must be at least 1 and workers at least 0, got {shard_tokens} and {workers}")
    tokenizer = load_tokenizer(tokenizer_dir)
    digest = tokenizer_digest(tokenizer)
    source = source_identity(path)
    settings = dict(format=format, shard_tokens=shard_tokens, skip_bad_rows=skip_bad_rows)
    plan = dict(source=source, tokenizer_digest=digest, settings=settings)
    done = _existing(out, plan)
    if done is not None:
        log.info("%s is already prepared from %s", out, path)
        return _summary(done, out, written=0, seconds=time.time() - t0)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / PLAN, plan)

    records, written, tail_bad = [], 0, []
    with _Pool(workers, str(tokenizer_dir), tokenizer) as pool:
        for i, (rows, bad) in enumerate(_chunks(path, format, shard_tokens * _BYTES_PER_TOKEN, skip_bad_rows,
                                                tail_bad)):
            record = _finished(out, i)
            if record is not None:
                records.append(record)  # a slot: kept in order
                continue
            records.append(pool.submit(out, i, rows, bad))
            written += 1
            for j in pool.drain(block=False):
                on_shard and on_shard(j)
        for j in pool.drain(block=True):
            on_shard and on_shard(j)
    records = [r if isinstance(r, dict) else r.result() for r in records]
    if not records:
        raise GPT2JaxError(f"{path}: empty corpus" + (f" (all {len(tail_bad)} rows were bad)" if tail_bad else ""))
    st = path.stat()  # not hashed again: an edit during the run that keeps both is not looked for
    now = dict(source, size=st.st_size, mtime_ns=st.st_mtime_ns)
    if now != source:
        raise GPT2JaxError(f"{path} changed while it was being prepared ({_what_changed(source, now)}); run again")
    for stale in out.glob("shard-*"):  # from an earlier, longer attempt with the same plan: none expected
        if stale.name not in {r["name"] for r in records}:
            shutil.rmtree(stale, ignore_errors=True)
    meta = token_writer.finish(out, records, tokenizer, digest, source, extra=dict(settings=settings),
                               more_bad_rows=len(tail_bad))
    (out / PLAN).unlink()
    if meta["bad_rows"]:
        log.warning("skipped %d bad row(s) of %s", meta["bad_rows"], path)
    return _summary(meta, out, written=written, seconds=time.time() - t0)


def _summary(meta: dict, out: Path, *, written: int, seconds: float) -> dict:
    return dict(out=str(out), rows=meta["rows"], tokens=meta["tokens"], shards=len(meta["shards"]),
                shards_written=written, bad_rows=meta["bad_rows"], dtype=meta["dtype"], seconds=round(seconds, 3))


def _existing(out: Path, plan: dict) -> Optional[dict]:
    """The meta of a finished ``out`` prepared by the same plan; None to (re)start; refuses anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise GPT2JaxError(f"{out} exists and is not a directory")
    meta_file, plan_file = out / "meta.json", out / PLAN
    if meta_file.is_file():
        meta = _read_json(meta_file)
        theirs = dict(source=meta.get("source"), tokenizer_digest=meta.get("tokenizer_digest"),
                      settings=meta.get("settings"))
        what = "was prepared"
    elif plan_file.is_file():
        if not any((d / token_writer.SHARD_DONE).is_file() for d in out.glob("shard-*")):
            plan_file.unlink()  # a failed or killed start: nothing to keep, whatever the plan was
            return None
        meta, theirs, what = None, _read_json(plan_file), "is being prepared"
    elif any(out.iterdir()):
        raise GPT2JaxError(f"{out} is not empty and holds no prepared data; give an empty or new --out")
    else:
        return None
    src, mine = theirs.get("source") or {}, plan["source"]
    if src.get("path") != mine["path"]:
        raise GPT2JaxError(f"{out} {what} from another source ({src.get('path')}); give another --out or delete it")
    if src != mine:
        raise GPT2JaxError(f"{mine['path']} changed since {out} {what} from it ({_what_changed(src, mine)}); "
                           f"delete {out} to prepare it again")
    if theirs.get("tokenizer_digest") != plan["tokenizer_digest"]:
        raise GPT2JaxError(f"{out} {what} with another tokenizer; give another --out or delete it")
    if theirs.get("settings") != plan["settings"]:
        raise GPT2JaxError(f"{out} {what} with other settings ({theirs.get('settings')}, now {plan['settings']}); "
                           f"give another --out or delete it")
    return meta


def _what_changed(old: dict, new: dict) -> str:
    if old.get("size") != new["size"]:
        return f"size {old.get('size')} -> {new['size']} bytes"
    if "sha256" not in old:
        return "recorded without the whole file's sha256, by an older prepare"
    if old["sha256"] != new["sha256"]:
        return "its content differs"
    return "its modification time differs"


def _finished(out: Path, i: int) -> Optional[dict]:
    """Shard i's record when it is complete and intact (a broken one is removed, to be written again)."""
    d = out / token_writer.shard_name(i)
    if not (d / token_writer.SHARD_DONE).is_file():
        shutil.rmtree(d, ignore_errors=True)
        return None
    record = _read_json(d / token_writer.SHARD_DONE)
    why = token_writer.check_shard(out, record)
    if why:
        log.warning("%s: %s; writing it again", out, why)
        shutil.rmtree(d, ignore_errors=True)
        return None
    return record


def _chunks(path: Path, format: str, chars: int, skip_bad_rows: bool,
            tail_bad: list[str]) -> Iterator[tuple[list[Row], list[str]]]:
    """The corpus's rows in chunks of about ``chars`` characters (the same chunks on every run), with the
    bad rows each chunk skipped."""
    rows, bad, size = [], [], 0
    for where, row in iter_rows(path, format):
        if not isinstance(row, Row):
            if not skip_bad_rows:
                raise GPT2JaxError(f"{path}:{where}: {row} (--skip-bad-rows skips such rows)")
            bad.append(f"{path}:{where}: {row}")
            continue
        rows.append(row)
        size += len(row.title) + len(row.text) + sum(len(k) + 1 for k in row.keywords)
        if size >= chars:
            yield rows, bad
            rows, bad, size = [], [], 0
    if rows:
        yield rows, bad
    else:
        tail_bad.extend(bad)  # after the last row: no shard to record them, meta.json counts them


class _RustEncoder:
    """What write_shard uses of an HFTokenizer, without transformers: ``encode_batch`` giving the ids of
    ``HFTokenizer.encode_batch`` (on a copy of its Rust tokenizer, which pickles whole as its JSON) and
    ``vocab_size``. Workers get this instead of loading the tokenizer: importing transformers (and torch)
    costs each process about 250 MB and seconds of start-up. A GPT-2 style byte-level BPE encodes each text
    cut at ``_LINE_START``."""

    def __init__(self, tokenizer):
        self.backend, self.vocab_size = tokenizer.hf.backend_tokenizer, tokenizer.vocab_size
        self.cut = _cuts_at_line_starts(json.loads(self.backend.to_str()))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        pieces = [_LINE_START.split(t) if self.cut else [t] for t in texts]
        encoded = iter(self.backend.encode_batch_fast([p for ps in pieces for p in ps], add_special_tokens=False))
        return [list(itertools.chain.from_iterable(next(encoded).ids for _ in ps)) for ps in pieces]


def _cuts_at_line_starts(spec: dict) -> bool:
    """Whether the tokenizer of ``spec`` (its tokenizer.json) gives a text's ids for its pieces cut at
    ``_LINE_START``: GPT-2's byte-level BPE as is (no normalizer, the byte-level regex with no prefix space,
    no truncation, added tokens that strip nothing and hold no newline); anything else is not cut."""
    pre, post, model = spec.get("pre_tokenizer") or {}, spec.get("post_processor") or {}, spec.get("model") or {}
    return (spec.get("normalizer") is None and spec.get("truncation") is None and spec.get("padding") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex") is True and pre.get("add_prefix_space") is False
            and post.get("type", "ByteLevel") == "ByteLevel" and model.get("type") == "BPE" and not model.get("dropout")
            and not any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") or "\n" in t.get("content", "\n")
                        for t in spec.get("added_tokens", [])))


class _Pool:
    """Shard writers: worker processes (one tokenizer each, single-threaded) with at most
    ``workers + 1`` chunks in flight, so the reader never runs ahead in memory; ``workers=0``: inline."""

    def __init__(self, workers: int, tokenizer_dir: str, tokenizer):
        self.tokenizer = tokenizer
        self.inflight: dict[cf.Future, int] = {}
        self.finished: list[int] = []  # shards done since the last drain
        self.limit = workers + 1
        self.executor = None
        if workers:
            # forkserver: a clean process (no threads of the caller's to fork) that imports this module and
            # the tokenizers library once; the workers fork from it and share those pages.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__, "tokenizers"])
            spec = _RustEncoder(tokenizer) if tokenizer.kind == "hf" else tokenizer_dir
            # A pipe that only this process writes: its end (EOF) tells the workers that this process is gone,
            # however it died. Their parent is the forkserver, which outlives this process (each worker holds its
            # liveness pipe open, waiting on this process's queue forever), so a parent-death signal is no use.
            self.alive_r, self.alive_w = ctx.Pipe(duplex=False)
            self.executor = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                   initargs=(spec, self.alive_r))
            self.executor.submit(int)  # start the workers now: they load the tokenizer while the first chunk is read

    def submit(self, out: Path, i: int, rows: list[Row], bad: list[str]):
        if self.executor is None:
            record = token_writer.write_shard(out, i, rows, self.tokenizer, bad)
            done = cf.Future()
            done.set_result(record)
            self.finished.append(i)
            return done
        while len(self.inflight) >= self.limit:
            cf.wait(self.inflight, return_when=cf.FIRST_COMPLETED)
            self._collect()
        future = self.executor.submit(_write, out, i, rows, bad)
        self.inflight[future] = i
        return future

    def drain(self, block: bool) -> list[int]:
        """Indices of the shards finished since the last call (all of them when ``block``)."""
        if block and self.inflight:
            cf.wait(self.inflight)
        self._collect()
        finished, self.finished = sorted(self.finished), []
        return finished

    def _collect(self) -> None:
        """Move the done futures to ``finished``; a worker's error is raised here."""
        for f in [f for f in self.inflight if f.done()]:
            if f.exception() is not None:
                raise f.exception()
            self.finished.append(self.inflight.pop(f))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.alive_w.close()
            self.alive_r.close()


_worker_tokenizer = None


def _init_worker(spec: _RustEncoder | str, parent_alive) -> None:
    """``spec``: a Hugging Face tokenizer's encoder, or the directory of another tokenizer to load;
    ``parent_alive``: the read end of a pipe that the preparing process alone holds open."""
    global _worker_tokenizer
    threading.Thread(target=_exit_with_parent, args=(parent_alive,), daemon=True).start()
    # One thread per worker: the processes are the parallelism (Rust's pool would oversubscribe the cores).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if isinstance(spec, _RustEncoder):
        _worker_tokenizer = spec
    else:
        from gpt2_jax.tokenizer import load_tokenizer

        _worker_tokenizer = load_tokenizer(spec)


def _exit_with_parent(parent_alive) -> None:
    """End this worker, at once, when the preparing process is gone: no orphan tokenizes on, writing shards."""
    try:
        parent_alive.recv_bytes()  # nothing is ever sent: this returns at the pipe's end
    except (EOFError, OSError):
        pass
    os._exit(1)


def _write(out: Path, i: int, rows: list[Row], bad: list[str]) -> dict:
    return token_writer.write_shard(out, i, rows, _worker_tokenizer, bad)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GPT2JaxError(f"{path}: unreadable ({first_line(e)}); delete {path.parent} to prepare it again") from None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
