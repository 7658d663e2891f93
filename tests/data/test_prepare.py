"""Tests for gpt2_jax/data/prepare.py and tools/prepare_data.py: streamed preparation in worker processes, round
trips against the tokenizer, reuse, resume after a kill, a changed source refused, bad rows; and a run's
data (gpt2_jax/train/run_data.py's prepare_data) from a prepared directory."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax.data import prepare
from gpt2_jax.data.prepare import prepare_corpus
from gpt2_jax.data.rows import Row, corpus_format, iter_rows, read_rows
from gpt2_jax.data.token_store import ShardedTokens, TokenizedCorpus, open_corpus, tokenizer_digest
from gpt2_jax.data.token_writer import tokenize_corpus
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.tokenizer import train_bpe, train_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample.csv"


@pytest.fixture(scope="module")
def rows() -> list[Row]:
    return list(read_rows(SAMPLE)[:30])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, rows) -> Path:
    texts = [s for r in rows for s in (r.title, " ".join(r.keywords), r.text)]
    out = tmp_path_factory.mktemp("tok") / "bpe"
    train_bpe(texts, out, 400)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from gpt2_jax.tokenizer import load_tokenizer

    return load_tokenizer(tok_dir)


def write_corpus(path: Path, rows: list[Row], format: str) -> Path:
    """The rows as a file of `format` (.gz compressed when the name ends so)."""
    if format == "csv":
        import csv
        import io
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["title", "keywords", "text"])
        w.writerows([r.title, " ".join(r.keywords), r.text] for r in rows)
        content = buf.getvalue()
    elif format == "jsonl":
        content = "".join(json.dumps(dict(title=r.title, keywords=list(r.keywords), text=r.text)) + "\n" for r in rows)
    else:
        content = "\n\n".join(r.text for r in rows) + "\n"
    data = content.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def assert_rows_equal(corpus: TokenizedCorpus, rows: list[Row], tok) -> None:
    assert len(corpus) == len(rows)
    for r, row in enumerate(rows):
        assert corpus.title(r).tolist() == tok.encode(row.title)
        assert corpus.keywords(r).tolist() == tok.encode(" ".join(row.keywords))
        assert corpus.text(r).tolist() == tok.encode(row.text)
        n = len(row.keywords)
        if n > 1:
            order = np.arange(n)[::-1]
            assert corpus.keywords_in_order(r, order).tolist() == tok.encode(" ".join(row.keywords[::-1]))


@pytest.mark.parametrize("name,format", [("c.csv", "csv"), ("t.txt", "text")])  # rows with keywords, text only
def test_round_trip_two_workers_tiny_shards(tmp_path, rows, tok_dir, tok, name, format):
    expect = rows if format != "text" else [Row("", (), r.text) for r in rows if r.text]
    src = write_corpus(tmp_path / name, expect, format)
    s = prepare_corpus(src, tok_dir, tmp_path / "out", workers=2, shard_tokens=300)
    assert s["shards"] > 3 and s["shards_written"] == s["shards"] and s["dtype"] == "uint16"
    corpus = TokenizedCorpus.load(tmp_path / "out")
    assert isinstance(corpus.tokens, ShardedTokens) and corpus.text_only == (format == "text")
    assert_rows_equal(corpus, expect, tok)
    # The same ids and offsets as train.py's small-corpus path, which writes the same format in one shard.
    small = tokenize_corpus(expect, tok, tmp_path / "cache")
    np.testing.assert_array_equal(np.asarray(corpus.tokens), np.asarray(small.tokens))
    np.testing.assert_array_equal(corpus.piece_off, small.piece_off)
    np.testing.assert_array_equal(corpus.row_kw_off, small.row_kw_off)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["tokenizer_digest"] == tokenizer_digest(tok) and meta["source"]["size"] == src.stat().st_size
    assert sum(sh["tokens"] for sh in meta["shards"]) == meta["tokens"] == len(corpus.tokens)
    assert not (tmp_path / "out" / prepare.PLAN).exists()


ODD_TEXTS = [
    "a [SEP] b[BOS]c [EOS][PAD] <|endoftext|> end",  # special tokens inline, with and without spaces
    "中文文本，全角标点。日本語のテキスト、한국어 텍스트",  # CJK, Hangul
    "emoji 👍🏽 family 👨\u200d👩\u200d👧 flags 🇫🇷 and e\u0301 combining",
    "tabs\tand\r\nCRLF  double  spaces \x0c form feed \u00a0nbsp",
    # line starts (where the workers' encoder cuts GPT-2 style BPE texts) after odd and blank lines
    "def f(x):\n    return x\n\nclass A:\n  pass\n[SEP]\n's\n'll\r\n#x\n \n\n\tz\n\x0bq\n\u2028w\n\u00e9t\u00e9\n9\n",
    "x \nfoo  \n\nbar\n\n\n!?\n<|endoftext|>\n[EOS]\n\n",
    "",
]


def _hf_tokenizers(tmp_path, rows, tok):
    """Our Hugging Face tokenizer kinds: byte-level BPE, a SentencePiece model's tokenizer.json export, and a
    BERT-style WordPiece vocab.txt (with CJK characters)."""
    from gpt2_jax.tokenizer import HFTokenizer, load_tokenizer

    train_sentencepiece([r.text for r in rows], tmp_path / "sp", 400)
    chars = sorted({c for t in ODD_TEXTS + [r.text for r in rows] for c in t if not c.isspace()})
    words = sorted({w.lower() for r in rows for w in r.text.split()})[:300]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *words]) + "\n")
    hf = [tok, load_tokenizer(tmp_path / "sp" / "tokenizer.json"), load_tokenizer(tmp_path / "bert")]
    assert all(isinstance(t, HFTokenizer) for t in hf)
    return hf


def test_fast_encoding_gives_encode_batch_ids(tmp_path, rows, tok):
    """HFTokenizer.encode_batch (encode_batch_fast: no offsets) and the workers' pickled encoder give the ids
    of the Rust tokenizer's full encode_batch, on odd text and long documents."""
    import pickle

    long_doc = "\n\n".join(r.text for r in rows) * 20
    long_doc = long_doc[:50_000] + " [SEP] " + ODD_TEXTS[1] + long_doc[50_000:]
    texts = ODD_TEXTS + [long_doc, long_doc[:99_999]] + [r.text for r in rows]
    assert len(long_doc) > 100_000
    for t, cut in zip(_hf_tokenizers(tmp_path, rows, tok), (True, False, False)):
        full = [e.ids for e in t.hf.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
        assert t.encode_batch(texts) == full
        assert [t.encode(x) for x in texts[:7]] == full[:7]
        encoder = pickle.loads(pickle.dumps(prepare._RustEncoder(t)))
        assert encoder.cut == cut and encoder.encode_batch(texts) == full  # byte-level BPE: cut at line starts
        assert t.sep_id in full[0] and t.eos_id in full[0]


def test_only_gpt2_style_byte_level_bpe_is_cut(tok):
    spec = json.loads(tok.hf.backend_tokenizer.to_str())
    assert prepare._cuts_at_line_starts(spec)
    added = spec["added_tokens"][0]
    for change in (dict(normalizer={"type": "NFC"}), dict(truncation={"max_length": 8}),
                   dict(pre_tokenizer=dict(spec["pre_tokenizer"], add_prefix_space=True)),
                   dict(pre_tokenizer=dict(spec["pre_tokenizer"], use_regex=False)),
                   dict(model=dict(spec["model"], dropout=0.1)),
                   dict(added_tokens=[dict(added, lstrip=True)]), dict(added_tokens=[dict(added, content="a\nb")])):
        assert not prepare._cuts_at_line_starts({**spec, **change}), change


@pytest.mark.slow
def test_workers_skip_transformers_and_sentencepiece_workers(tmp_path, rows, tok_dir, tok):
    """Workers of a Hugging Face tokenizer get its Rust tokenizer and never import transformers (about 250 MB
    each); a SentencePiece tokenizer is loaded in each worker; both give the single-process ids."""
    with prepare._Pool(1, str(tok_dir), tok) as pool:
        assert not pool.executor.submit(eval, "'transformers' in __import__('sys').modules").result()
    sp = train_sentencepiece([r.text for r in rows], tmp_path / "sp", 400)
    src = write_corpus(tmp_path / "c.csv", rows, "csv")
    prepare_corpus(src, tmp_path / "sp", tmp_path / "out", workers=2, shard_tokens=300)
    corpus = TokenizedCorpus.load(tmp_path / "out")
    assert len(corpus.tokens.shards) > 3
    assert_rows_equal(corpus, rows, sp)


@pytest.mark.parametrize("name,content", [
    ("stray.csv", b'title,keywords,text\r\nA,k,"one\r\nB,k,two\r\nC,k,three\r\nD,k,four\r\n'),  # a stray quote
    ("mac.csv.gz", b"T,k l,x\rU,m,y\r"),  # old Mac line ends, gzipped
    ("bad.jsonl", b'{"title": "a", "keywords": [], "text": "x"}\n[1]\n\n{"title": "b", "keywords": "k", "text": "y"}'),
    ("para.txt", b"\n\none\ntwo\n\n\nthree\n\n"), ("lines.txt", b"one\ntwo\x0cthree\n\n"),
])
def test_streamed_rows_equal_read_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    whole = read_rows(path, skip_bad_rows=True)
    streamed = list(iter_rows(path, corpus_format(path, None)))
    assert [r for _, r in streamed if isinstance(r, Row)] == list(whole)
    assert [f"{path}:{w}: {r}" for w, r in streamed if not isinstance(r, Row)] == whole.bad


def test_gathers_across_shard_boundaries(tmp_path, rows, tok_dir):
    src = write_corpus(tmp_path / "c.csv", rows, "csv")
    prepare_corpus(src, tok_dir, tmp_path / "out", workers=0, shard_tokens=200)
    corpus = TokenizedCorpus.load(tmp_path / "out")
    whole = np.asarray(corpus.tokens)
    assert len(corpus.tokens.shards) > 5
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(whole), size=(7, 50))
    np.testing.assert_array_equal(corpus.tokens[idx], whole[idx])
    for a in list(corpus.tokens.starts[1:-1]) + [0]:  # slices that end at, start at and cross a boundary
        for lo, hi in ((a - 3, a), (a, a + 3), (a - 2, a + 2)):
            lo, hi = max(lo, 0), min(hi, len(whole))
            np.testing.assert_array_equal(corpus.tokens[lo:hi], whole[lo:hi])
    with pytest.raises(IndexError):
        corpus.tokens[np.array([len(whole)])]


def test_rerun_reuses_and_refuses_another(tmp_path, rows, tok_dir):
    src = write_corpus(tmp_path / "c.csv", rows, "csv")
    out = tmp_path / "out"
    first = prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=400)
    again = prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=400)
    assert again["shards_written"] == 0 and again["tokens"] == first["tokens"]
    other_src = write_corpus(tmp_path / "d.csv", rows[:5], "csv")
    with pytest.raises(GPT2JaxError, match=r"out was prepared from another source \(.*c\.csv\); give another --out"):
        prepare_corpus(other_src, tok_dir, out, workers=0, shard_tokens=400)
    with pytest.raises(GPT2JaxError, match=r"with other settings"):
        prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=999)
    sp = train_sentencepiece([r.text for r in rows], tmp_path / "sp", 400)
    with pytest.raises(GPT2JaxError, match=r"was prepared with another tokenizer"):
        prepare_corpus(src, tmp_path / "sp", out, workers=0, shard_tokens=400)
    assert sp.vocab_size


def test_resume_after_a_kill_keeps_finished_shards(tmp_path, rows, tok_dir, tok):
    src = write_corpus(tmp_path / "c.csv", rows, "csv")
    out = tmp_path / "out"

    def killed(i):
        if i == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=300, on_shard=killed)
    assert not (out / "meta.json").exists() and (out / prepare.PLAN).exists()
    with pytest.raises(GPT2JaxError, match="not a prepared data directory .*unfinished"):
        open_corpus(out)
    kept = sorted(p.name for p in out.glob("shard-*"))
    assert kept == ["shard-00000", "shard-00001", "shard-00002"]
    mtimes = {d: (out / d / "tokens.npy").stat().st_mtime_ns for d in kept}
    s = prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=300)
    assert s["shards_written"] == s["shards"] - 3
    assert {d: (out / d / "tokens.npy").stat().st_mtime_ns for d in kept} == mtimes  # not rewritten
    assert_rows_equal(TokenizedCorpus.load(out), rows, tok)

    # A finished directory that lost meta.json and a shard: that shard alone is written again.
    (out / "meta.json").unlink()
    (out / prepare.PLAN).write_text(json.dumps(dict(source=prepare.source_identity(src),
                                                    tokenizer_digest=tokenizer_digest(tok),
                                                    settings=dict(format="csv", shard_tokens=300, skip_bad_rows=False))))
    (out / "shard-00001" / "tokens.npy").write_bytes(b"garbage")  # a broken shard fails its checksum
    s = prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=300)
    assert s["shards_written"] == 1
    assert_rows_equal(TokenizedCorpus.load(out), rows, tok)


def test_changed_source_is_refused(tmp_path, rows, tok_dir):
    src = write_corpus(tmp_path / "c.csv", rows, "csv")
    out = tmp_path / "out"

    def killed(i):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=300, on_shard=killed)
    with open(src, "a") as f:
        f.write("New,k,more text\n")
    with pytest.raises(GPT2JaxError, match=r"c\.csv changed since .*out is being prepared from it \(size \d+ -> \d+ "
                                           r"bytes\); delete .*out to prepare it again"):
        prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=300)
    done = tmp_path / "done"
    prepare_corpus(src, tok_dir, done, workers=0, shard_tokens=300)
    src.write_bytes(src.read_bytes().replace(b"New,k", b"Old,k"))  # same size, other content
    with pytest.raises(GPT2JaxError, match=r"changed since .*done was prepared from it \(its content differs\)"):
        prepare_corpus(src, tok_dir, done, workers=0, shard_tokens=300)


def test_bad_rows_name_file_and_row_or_are_skipped(tmp_path, tok_dir):
    src = tmp_path / "c.jsonl"
    src.write_text('{"title": "a", "keywords": "k", "text": "x"}\n{"title": 1}\n{"title": "b", "keywords": [], "text": "y"}\n')
    with pytest.raises(GPT2JaxError, match=r"c\.jsonl:2: missing key\(s\) 'keywords', 'text' \(--skip-bad-rows skips"):
        prepare_corpus(src, tok_dir, tmp_path / "out", workers=0)
    s = prepare_corpus(src, tok_dir, tmp_path / "out2", workers=0, skip_bad_rows=True)
    assert s["rows"] == 2 and s["bad_rows"] == 1
    with open(src, "a") as f:  # trailing bad rows count too
        f.write("not json\n")
    s = prepare_corpus(src, tok_dir, tmp_path / "out3", workers=0, skip_bad_rows=True, shard_tokens=1)
    assert s["rows"] == 2 and s["bad_rows"] == 2 and s["shards"] == 2
    src.write_text("[1]\n")
    with pytest.raises(GPT2JaxError, match=r"c\.jsonl: empty corpus \(all 1 rows were bad\)"):
        prepare_corpus(src, tok_dir, tmp_path / "out4", workers=0, skip_bad_rows=True)


def test_parquet_and_streamed_rows_equal_read_rows(tmp_path, rows, tok_dir, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"title": [r.title for r in rows], "keywords": [list(r.keywords) for r in rows],
                      "text": [r.text for r in rows]})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=7)
    s = prepare_corpus(tmp_path / "c.parquet", tok_dir, tmp_path / "out", workers=0, shard_tokens=500)
    assert s["shards"] > 1
    assert_rows_equal(TokenizedCorpus.load(tmp_path / "out"), rows, tok)


@pytest.mark.slow
def test_cli_one_line_errors_and_summary(tmp_path, rows, tok_dir):
    src = write_corpus(tmp_path / "c.csv", rows[:5], "csv")
    cmd = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--corpus", str(src), "--tokenizer", str(tok_dir),
           "--out", str(tmp_path / "out"), "--workers", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[-1])["rows"] == 5
    bad = subprocess.run(cmd[:3] + [str(tmp_path / "nope.csv")] + cmd[4:], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [f"error: corpus file {tmp_path / 'nope.csv'} does not exist"]


def test_train_prepare_data_reads_a_prepared_directory(tmp_path, rows, tok_dir, tok):
    from gpt2_jax.train.run_data import prepare_data
    from gpt2_jax.train.config import load_train_config

    src = write_corpus(tmp_path / "c.csv", rows, "csv")
    out = tmp_path / "prepared"
    prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=300)
    cfg = load_train_config(None, [f"data.train={out}", f"tokenizer.path={tok_dir}", "data.max_length=32",
                                   "train.batch_size=4", f"train.out_dir={tmp_path / 'run'}", "data.val_fraction=0.2"])
    run = prepare_data(cfg, 0, 1)
    assert run.n_train + len(run.val_rows) == len(rows)
    held_out = run.val_rows[0]
    assert held_out in rows  # decoded back: the BPE round-trips this text
    sp = tmp_path / "sp"
    train_sentencepiece([r.text for r in rows], sp, 400)
    cfg = load_train_config(None, [f"data.train={out}", f"tokenizer.path={sp}", f"train.out_dir={tmp_path / 'run2'}"])
    with pytest.raises(GPT2JaxError, match=r"prepared with another tokenizer than the run's"):
        prepare_data(cfg, 0, 1)
    cfg = load_train_config(None, [f"data.train={out}", f"train.out_dir={tmp_path / 'run3'}"])
    with pytest.raises(GPT2JaxError, match=r"holds token ids: set tokenizer.path"):
        prepare_data(cfg, 0, 1)


def test_line_start_cuts_keep_the_ids_around_trailing_whitespace(tmp_path):
    """A BPE that has merged a space with a newline ("ĠĊ") and two newlines ("ĊĊ"): a line ending in spaces,
    or a blank line, pre-tokenizes as " " + "\\n" (or "\\n" + "\\n") inside a text but as one piece at the
    end of one, so no cut may follow whitespace."""

    texts = [f"line {i} \nnext  \n\tindented \r\nend\n\nnew paragraph\n\n" for i in range(300)]
    t = train_bpe(texts, tmp_path / "bpe", 300)
    assert {"ĠĊ", "ĊĊ"} <= set(t.hf.backend_tokenizer.get_vocab())  # merges that make a wrong cut visible
    probe = ["a \nb", "a  \nb", "a\n b", "a \n\nb", "a\n\nb", "x\ny \nz\n  w", *texts[:3]]
    full = [e.ids for e in t.hf.backend_tokenizer.encode_batch(probe, add_special_tokens=False)]
    encoder = prepare._RustEncoder(t)
    assert encoder.cut and encoder.encode_batch(probe) == full


def test_a_flipped_id_in_a_prepared_shard_is_refused(tmp_path, rows, tok_dir):
    src = write_corpus(tmp_path / "c.csv", rows, "csv")
    out = tmp_path / "out"
    prepare_corpus(src, tok_dir, out, workers=0, shard_tokens=300)
    shard = out / "shard-00001" / "tokens.npy"
    a = np.load(shard)
    a[100] ^= 0x8000
    np.save(shard, a)
    with pytest.raises(GPT2JaxError, match=r"shard-00001/tokens\.npy: token id \d+ at position 100 is not below the "
                                           r"vocabulary of \d+ ids"):
        open_corpus(out, vocab_size=400)


def test_a_failed_prepare_does_not_block_the_retry(tmp_path, rows, tok_dir):
    src = tmp_path / "c.csv"
    src.write_text("")
    out = tmp_path / "out"
    with pytest.raises(GPT2JaxError, match=r"c\.csv: empty corpus"):
        prepare_corpus(src, tok_dir, out, workers=0)
    write_corpus(src, rows[:5], "csv")
    assert prepare_corpus(src, tok_dir, out, workers=0)["rows"] == 5


def test_a_same_size_edit_with_its_mtime_restored_is_seen(tmp_path, tok_dir):
    """The source's identity covers every byte, not only its head and tail."""
    src = tmp_path / "t.txt"
    pad = "\n" * (3 << 20)  # blank lines: read, not tokenized
    src.write_text(f"first document\n{pad}middle one\n{pad}last document\n")
    out = tmp_path / "out"
    prepare_corpus(src, tok_dir, out, workers=0)
    st = src.stat()
    src.write_text(f"first document\n{pad}middle two\n{pad}last document\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size and src.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(GPT2JaxError, match=r"changed since .*out was prepared from it \(its content differs\)"):
        prepare_corpus(src, tok_dir, out, workers=0)


def test_a_truncated_gzip_corpus_is_one_line(tmp_path, rows, tok_dir):
    src = write_corpus(tmp_path / "c.csv.gz", rows, "csv")
    src.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(GPT2JaxError, match=r"c\.csv\.gz: not a valid gzip file \(.*\)$") as e:
        prepare_corpus(src, tok_dir, tmp_path / "out", workers=0)
    assert "\n" not in str(e.value)


def test_an_empty_directory_is_not_taken_for_token_data(tmp_path):
    from gpt2_jax.train.run_data import prepare_data
    from gpt2_jax.train.config import load_train_config

    (tmp_path / "empty").mkdir()
    cfg = load_train_config(None, [f"data.train={tmp_path / 'empty'}", f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(GPT2JaxError, match=r"empty is an empty directory: it holds no corpus"):
        prepare_data(cfg, 0, 1)
