"""``tools/bench.py data --prepare``: corpus preparation speed and memory, ours against a nanoGPT-style prepare.

Builds once (cached under the path it prints) a plain-text corpus of ``--size-mb`` from this machine's
Python sources (the venv's site-packages; each file one document, blank lines dropped, documents separated by
a blank line; passes after the first label each document with its pass, so the text repeats with variations)
and a byte-level BPE tokenizer of 50,257 ids trained on a ~20 MB sample of it. Then prepares the corpus
(a) with ``prepare_corpus`` (``--workers`` processes) and (b) as nanoGPT's ``prepare.py`` does, with HF
``tokenizers`` ``encode_batch`` (Rust threads on every core) appending ``<|endoftext|>`` after each document
into a uint16 file: over the lines (``nanogpt-style-lines``), and over whole documents as prepare.py encodes
each example and as (a) must, to give each document's ``encode`` ids (``nanogpt-style-docs``). Each runs in its own subprocess; the process tree's resident memory
is sampled every 0.2 s (psutil). Fields: impl, mb, wall_s, mb_per_s, peak_pss_mb (the tree's proportional set
size: shared pages counted once, its real footprint), peak_rss_sum_mb (RSS summed: shared pages counted in
every process), cpu_s (the tree's user + system CPU seconds) and mb_per_cpu_s (a fairer speed on a machine
shared with other work), tokens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[2]  # the repository
_CACHE = Path(os.path.expanduser("~/.cache/gpt2-jax/bench-data"))
_SAMPLE_MB = 20
_EOT = "<|endoftext|>"


def build_corpus(size_mb: int, root: Path = _CACHE) -> Path:
    """``size_mb`` MB of Python source text, one document per file, made once."""
    out = root / f"pysrc-{size_mb}mb.txt"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    site = Path(np.__file__).resolve().parents[1]
    files = sorted(p for p in site.rglob("*.py") if p.is_file())
    tmp, target, written, k = out.with_suffix(".tmp"), size_mb << 20, 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            for p in files:
                try:
                    lines = [ln.rstrip() for ln in p.read_text(encoding="utf-8").splitlines()]
                except (UnicodeDecodeError, OSError):
                    continue
                doc = "\n".join(ln for ln in lines if ln)
                if not doc:
                    continue
                if k:
                    doc = f"# pass {k}: {p.relative_to(site)}\n{doc}"
                written += f.write(doc + "\n\n")
                if written >= target:
                    break
            k += 1
    os.replace(tmp, out)
    return out


def build_tokenizer(corpus: Path, root: Path = _CACHE) -> Path:
    """A GPT-2-sized byte-level BPE (50,257 ids with <|endoftext|>, plus our 4 special tokens) trained on the
    corpus's first ~20 MB, with the project's trainer; made once."""
    out = root / f"bpe-50257-{corpus.stem}"
    if (out / "tokenizer.json").is_file():
        return out
    from gpt2_jax.tokenizer import train_bpe

    with open(corpus, encoding="utf-8") as f:
        sample = f.read(_SAMPLE_MB << 20)
    train_bpe([d for d in sample.split("\n\n") if d], out, 50257)
    return out


def nanogpt_prepare(corpus: Path, tokenizer_dir: Path, out: Path, unit: str = "lines") -> int:
    """nanoGPT's prepare.py, streamed: ``encode_batch`` over ~4 MB of lines (``unit="lines"``) or of whole
    documents (``"docs"``: as prepare.py encodes each example), <|endoftext|> after each document, uint16."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eot = tok.token_to_id(_EOT)
    total = 0

    def write(texts: list[str], ends: list[bool], w) -> int:
        flat = []
        for e, end in zip(tok.encode_batch(texts, add_special_tokens=False), ends):
            flat.extend(e.ids)
            if end:
                flat.append(eot)
        np.array(flat, np.uint16).tofile(w)
        return len(flat)

    with open(corpus, encoding="utf-8") as f, open(out, "wb") as w:
        doc: list[str] = []
        while True:
            lines = f.readlines(1 << 22)  # ~4 MB of lines
            if not lines:
                break
            if unit == "lines":  # a blank line ends a document
                texts = [ln for ln in lines if ln.strip()]
                ends = [i + 1 < len(lines) and not lines[i + 1].strip() for i, ln in enumerate(lines) if ln.strip()]
            else:
                texts, ends = [], []
                for ln in lines:
                    if ln.strip():
                        doc.append(ln)
                    elif doc:
                        texts.append("".join(doc).strip())
                        ends.append(True)
                        doc = []
            total += write(texts, ends, w)
        if doc:
            total += write(["".join(doc).strip()], [True], w)
    return total


def _measure(cmd: list[str]) -> dict:
    """Wall seconds, the peak summed RSS and PSS of the command's process tree and its CPU seconds (each
    process's last sample: the last 0.2 s of each are missed), and its last stdout line as JSON."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=_ROOT)
    rss, pss, ps, cpu = 0, 0, psutil.Process(proc.pid), {}
    while proc.poll() is None:
        try:
            tree = [ps, *ps.children(recursive=True)]
            mem = [p.memory_full_info() for p in tree]
            rss, pss = max(rss, sum(m.rss for m in mem)), max(pss, sum(m.pss for m in mem))
            for p in tree:
                t = p.cpu_times()
                cpu[p.pid] = t.user + t.system
        except psutil.Error:
            pass
        time.sleep(0.2)
    out = proc.stdout.read().strip().splitlines()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return dict(wall_s=round(time.time() - t0, 2), peak_pss_mb=round(pss / 2**20, 1), peak_rss_mb=round(rss / 2**20, 1),
                cpu_s=round(sum(cpu.values()), 1), **json.loads(out[-1]))


def bench(size_mb: int, workers: int) -> None:
    corpus = build_corpus(size_mb)
    tok = build_tokenizer(corpus)
    prepared = _CACHE / f"prepared-{corpus.stem}"  # kept: train.py's data.train (with tokenizer.path the tokenizer)
    print(json.dumps(dict(corpus=str(corpus), tokenizer=str(tok), prepared=str(prepared),
                          mb=round(corpus.stat().st_size / 2**20, 1))), flush=True)
    mb = corpus.stat().st_size / 2**20
    runs = {
        "gpt2-jax": [sys.executable, __file__, "ours", str(corpus), str(tok), str(prepared), str(workers)],
        **{f"nanogpt-style-{unit}": [sys.executable, __file__, f"nanogpt-{unit}", str(corpus), str(tok),
                                     str(_CACHE / f"nanogpt-{corpus.stem}.bin")] for unit in ("lines", "docs")},
    }
    for impl, cmd in runs.items():
        subprocess.run(["rm", "-rf", cmd[-2] if impl == "gpt2-jax" else cmd[-1]], check=True)  # a full preparation
        r = _measure(cmd)
        print(json.dumps(dict(impl=impl, mb=round(mb, 1), wall_s=r["wall_s"], mb_per_s=round(mb / r["wall_s"], 2),
                              peak_pss_mb=r["peak_pss_mb"], peak_rss_sum_mb=r["peak_rss_mb"], cpu_s=r["cpu_s"],
                              mb_per_cpu_s=round(mb / max(r["cpu_s"], 1e-9), 2), tokens=r["tokens"],
                              **({"workers": workers, "shards": r["shards"]} if impl == "gpt2-jax" else {}))),
              flush=True)


def _child(argv: list[str]) -> None:
    kind, corpus, tok, out = argv[:4]
    if kind == "ours":
        from gpt2_jax.data.prepare import prepare_corpus

        s = prepare_corpus(corpus, tok, out, format="text", workers=int(argv[4]))
        print(json.dumps(dict(tokens=s["tokens"], shards=s["shards"])))
    else:
        print(json.dumps(dict(tokens=nanogpt_prepare(Path(corpus), Path(tok), Path(out), kind.split("-")[1]))))


if __name__ == "__main__":
    sys.path.insert(0, str(_ROOT))
    _child(sys.argv[1:])
