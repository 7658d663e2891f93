"""Tests for gpt2_jax/tokenizer.py over every backend, built locally: GPT-2 byte-level BPE (vocab.json +
merges.txt, and tokenizer.json), a hand-written BERT vocab.txt, SentencePiece with and without the special
tokens as user-defined symbols. transformers is the reference for the Hugging Face backends."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax.data.rows import read_rows
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.tokenizer import (SPECIAL_TOKENS, SentencePieceTokenizer, load_tokenizer, train_bpe,
                                train_sentencepiece)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.csv"
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "。", "，",
              "你", "好", "世", "界", "我", "爱", "花", "园", "the", "garden", "notes", "soil", "seeds",
              "plant", "in", "spring", "hello", "world", "##s", "gard", "##en"]
BACKENDS = ["gpt2_files", "gpt2_json", "bert", "sp_user", "sp_plain"]
TITLE, KEYWORDS, TEXT = "Garden notes", ("soil", "seeds"), "Plant the seeds in spring."


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rows = read_rows(SAMPLE)[:25]  # a few KB
    return [s for r in rows for s in (r.title, " ".join(r.keywords), r.text)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, texts) -> dict[str, Path]:
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tokenizers")
    out = {name: root / name for name in BACKENDS}
    for d in out.values():
        d.mkdir()
    # GPT-2 style byte-level BPE, as GPT-2's own files are laid out.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    bpe.model.save(str(out["gpt2_files"]))
    bpe.save(str(out["gpt2_json"] / "tokenizer.json"))
    (out["bert"] / "vocab.txt").write_text("\n".join(BERT_VOCAB) + "\n", encoding="utf-8")
    common = dict(sentence_iterator=iter(texts), vocab_size=400, hard_vocab_limit=False, minloglevel=2)
    spm.SentencePieceTrainer.train(**common, model_prefix=str(out["sp_user"] / "m"), byte_fallback=True,
                                   user_defined_symbols=list(SPECIAL_TOKENS))
    common["sentence_iterator"] = iter(texts)
    spm.SentencePieceTrainer.train(**common, model_prefix=str(out["sp_plain"] / "m"))
    return out


@pytest.fixture(params=BACKENDS)
def backend(request, paths):
    return request.param, load_tokenizer(paths[request.param])


def test_special_tokens_present_distinct_and_reused(backend, paths):
    name, tok = backend
    ids = [tok.bos_id, tok.sep_id, tok.eos_id, tok.pad_id]
    assert len(set(ids)) == 4 and tok.special_ids == dict(zip(SPECIAL_TOKENS, ids))
    assert len(tok) == tok.vocab_size == max(tok.base_vocab_size, max(ids) + 1)
    # The user-defined symbols follow SentencePiece's <unk> <s> </s>.
    existing = {"bert": {"[SEP]": 3, "[PAD]": 0}, "sp_user": {"[BOS]": 3, "[SEP]": 4, "[EOS]": 5, "[PAD]": 6}}
    for token, i in tok.special_ids.items():
        if token in existing.get(name, {}):
            assert i == existing[name][token]
        else:
            assert i >= tok.base_vocab_size
    added = len(SPECIAL_TOKENS) - len(existing.get(name, {}))
    assert tok.vocab_size == tok.base_vocab_size + added


def test_format_example_and_prompt(backend):
    _, tok = backend
    enc = tok.encode
    expected = [tok.bos_id, *enc(TITLE), tok.sep_id, *enc("soil seeds"), tok.sep_id, *enc(TEXT), tok.eos_id]
    assert tok.format_example(TITLE, KEYWORDS, TEXT) == expected
    assert tok.format_example(TITLE, " soil   seeds ", TEXT) == expected  # a string of keywords
    assert tok.format_prompt(TITLE, list(KEYWORDS)) == expected[: -len(enc(TEXT)) - 1]
    # Plain text (no title, no keywords) is trained as [EOS] text [EOS] (data.batches.Batches): its prompt is [EOS].
    assert tok.format_prompt("", []) == tok.format_prompt("", "  ") == [tok.eos_id]
    assert tok.format_example("", (), TEXT) == [tok.eos_id, *enc(TEXT), tok.eos_id]


def test_special_strings_in_text_are_single_ids(backend):
    _, tok = backend
    ids = tok.encode("seeds[SEP]soil [EOS] [BOS][PAD]")
    for i in (tok.sep_id, tok.eos_id, tok.bos_id, tok.pad_id):
        assert ids.count(i) == 1
    assert ids[: ids.index(tok.sep_id)] == tok.encode("seeds")
    assert tok.encode_batch(["seeds", "x [SEP] y"]) == [tok.encode("seeds"), tok.encode("x [SEP] y")]


EXPECTED_DECODE = {  # decode(format_example(...)) without and with the special tokens
    "bert": ("garden notes soil seeds plant the seeds in spring.",
             "[BOS] garden notes [SEP] soil seeds [SEP] plant the seeds in spring. [EOS]"),
    **{name: ("Garden notessoil seedsPlant the seeds in spring.",
              "[BOS]Garden notes[SEP]soil seeds[SEP]Plant the seeds in spring.[EOS]")
       for name in ("gpt2_files", "gpt2_json")},
    # SentencePiece starts every encoded piece with a word boundary; decoding keeps it, as the exported
    # tokenizer.json decodes in transformers.
    **{name: ("Garden notes soil seeds Plant the seeds in spring.",
              "[BOS] Garden notes[SEP] soil seeds[SEP] Plant the seeds in spring.[EOS]")
       for name in ("sp_user", "sp_plain")},
}


def test_decode_round_trips(backend):
    name, tok = backend
    ids = tok.format_example(TITLE, KEYWORDS, TEXT)
    assert (tok.decode(ids), tok.decode(ids, skip_special_tokens=False)) == EXPECTED_DECODE[name]
    text = TEXT.lower() if name == "bert" else TEXT  # BERT's vocab is lower-cased
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text) + [tok.eos_id, tok.pad_id, tok.pad_id]) == text


def test_save_load_gives_identical_ids(backend, tmp_path):
    name, tok = backend
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert type(again) is type(tok) and again.special_ids == tok.special_ids and len(again) == len(tok)
    for s in (TEXT, "x[SEP]y [EOS]", "你好 world\nnew line"):
        assert again.encode(s) == tok.encode(s)
    assert again.format_example(TITLE, KEYWORDS, TEXT) == tok.format_example(TITLE, KEYWORDS, TEXT)


GPT2_TEXTS = ["Plant the seeds in spring.", "  Leading spaces,\ttabs and\nnew lines\n\n",
              "Unicode: café, naïve, 你好, emoji 🌱!", "<|endoftext|> ends a document"]


@pytest.mark.parametrize("name", ["gpt2_files", "gpt2_json"])
def test_gpt2_ids_equal_transformers(paths, name):
    from transformers import GPT2TokenizerFast

    d = paths["gpt2_files"]
    reference = GPT2TokenizerFast(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"))
    tok = load_tokenizer(paths[name])
    for s in GPT2_TEXTS:
        assert tok.encode(s) == reference.encode(s)
        assert tok.decode(tok.encode(s), skip_special_tokens=False) == s


def test_bert_ids_equal_transformers(paths):
    from transformers import BertTokenizerFast

    reference = BertTokenizerFast(vocab_file=str(paths["bert"] / "vocab.txt"))
    tok = load_tokenizer(paths["bert"])
    for s in ["你好，世界。", "我爱花园 Hello gardens", "unknown 字", "the garden in spring."]:
        assert tok.encode(s) == reference.encode(s, add_special_tokens=False)
    assert tok.decode(tok.encode("我爱花园，你好世界。")) == "我爱花园，你好世界。"  # no spaces between characters
    assert tok.decode(tok.encode("我爱 hello world 花园")) == "我爱 hello world 花园"


def test_sentencepiece_file_path_and_directory(paths):
    by_file = load_tokenizer(paths["sp_plain"] / "m.model")
    by_dir = load_tokenizer(paths["sp_plain"])
    assert isinstance(by_dir, SentencePieceTokenizer) and by_file.special_ids == by_dir.special_ids
    assert by_file.encode(TEXT) == by_dir.encode(TEXT)


def test_errors(tmp_path, paths):
    with pytest.raises(GPT2JaxError, match=r"tokenizer path .*missing does not exist"):
        load_tokenizer(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(GPT2JaxError, match=r"empty: no tokenizer files \(looked for tokenizer\.json, "
                                           r"vocab\.json \+ merges\.txt, vocab\.txt or one \*\.model"):
        load_tokenizer(empty)
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_text((paths["gpt2_files"] / "vocab.json").read_text())
    with pytest.raises(GPT2JaxError, match="vocab.json without merges.txt"):
        load_tokenizer(half)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.model").write_bytes(b"not a protobuf")
    with pytest.raises(GPT2JaxError, match=r"x\.model: not a readable SentencePiece model"):
        load_tokenizer(bad)
    (bad / "y.model").write_bytes(b"")
    with pytest.raises(GPT2JaxError, match=r"several SentencePiece models \(x\.model, y\.model\)"):
        load_tokenizer(bad)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text("{not json")
    with pytest.raises(GPT2JaxError, match="cannot load the Hugging Face tokenizer"):
        load_tokenizer(corrupt)


def test_train_functions(tmp_path, texts):
    sp = train_sentencepiece(texts, tmp_path / "sp", 400, model_type="bpe")
    assert sp.special_ids == {"[BOS]": 1, "[SEP]": 2, "[EOS]": 3, "[PAD]": 4} and len(sp) <= 400
    assert load_tokenizer(tmp_path / "sp").encode(TEXT) == sp.encode(TEXT)
    assert sp.decode(sp.encode("line one\nline two 🌱")) == "line one\nline two 🌱"  # newlines, byte fallback
    bpe = train_bpe(texts, tmp_path / "bpe", 400)
    assert len(bpe) == 400 and load_tokenizer(tmp_path / "bpe").encode(TEXT) == bpe.encode(TEXT)
    with pytest.raises(GPT2JaxError, match=r"vocab size 100 is too small for this corpus: .* at least \d+"):
        train_sentencepiece(texts, tmp_path / "small", 100)
    with pytest.raises(GPT2JaxError, match="vocab size 100 is too small for byte-level BPE"):
        train_bpe(texts, tmp_path / "small", 100)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("kind,vocab_size", [("sentencepiece", 8000), ("bpe", 1000)])
def test_cli_trains_on_sample(tmp_path, kind, vocab_size):
    out = tmp_path / kind
    result = run_tool("--corpus", str(SAMPLE), "--kind", kind, "--vocab-size", str(vocab_size), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout
    tok = load_tokenizer(out)
    assert len(set(tok.special_ids.values())) == 4 and len(tok) <= vocab_size + 4
    assert tok.decode(tok.format_example("Roast Potatoes", "cooking oven", TEXT)).endswith(TEXT)


@pytest.mark.slow
def test_cli_missing_corpus_exits_2(tmp_path):
    result = run_tool("--corpus", str(tmp_path / "none.csv"), "--kind", "bpe", "--vocab-size", "500",
                      "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: corpus file {tmp_path / 'none.csv'} does not exist"
    assert "Traceback" not in result.stderr


EXPORT_TEXTS = ["[BOS]Garden notes[SEP]soil seeds[SEP]Plant the seeds in spring.[EOS]",
                "[BOS] Garden notes [SEP] soil seeds [SEP] Plant the seeds [PAD][PAD]", "你好，世界。我爱花园",
                "  spaces  and\ttabs\nand a newline ", "unseen: é ü ﬁ 😀"]


def exported(backend, texts, tmp_path) -> tuple[Path, Path]:
    """The backend saved as a run saves it, and what transformers must give for `texts` (tests/test_demo.py)."""
    from test_demo import expected_tokenizer

    name, tok = backend
    out = tok.save(tmp_path / name)
    expected = tmp_path / f"{name}.json"
    expected.write_text(json.dumps(expected_tokenizer(tok, texts[:60] + EXPORT_TEXTS)))
    return out, expected


def test_export_loads_in_transformers_4_with_our_ids_and_text(backend, texts, tmp_path):
    """AutoTokenizer (transformers 4.57) on the saved directory: our ids with the special tokens inline, our
    decoding, [BOS] [SEP] [EOS] [PAD] in their roles; our own loader gives the same tokenizer back."""
    from hf_export_check import check_tokenizer

    out, expected = exported(backend, texts, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    hf = check_tokenizer(str(out), json.loads(expected.read_text()))
    assert type(hf).__name__ == "PreTrainedTokenizerFast"
    again = load_tokenizer(out)
    assert type(again) is type(backend[1]) and again.special_ids == backend[1].special_ids
    assert [again.encode(t) for t in EXPORT_TEXTS] == [backend[1].encode(t) for t in EXPORT_TEXTS]


@pytest.mark.slow
def test_export_loads_in_transformers_5_with_our_ids_and_text(paths, texts, tmp_path, transformers5_python):
    for name in BACKENDS:
        out, expected = exported((name, load_tokenizer(paths[name])), texts, tmp_path)
        res = subprocess.run([transformers5_python, str(ROOT / "tests" / "hf_export_check.py"), str(out),
                              str(expected), "--tokenizer-only"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, (name, res.stderr[-3000:])
        assert json.loads(res.stdout.splitlines()[-1])["transformers"].startswith("5."), res.stdout


def test_train_vocab_size_not_positive_is_one_line(tmp_path, texts):
    """Not SentencePiece's internal assertion text."""
    with pytest.raises(GPT2JaxError) as e:
        train_sentencepiece(texts, tmp_path / "sp", 0)
    assert str(e.value) == "vocab size must be positive, got 0"
    with pytest.raises(GPT2JaxError, match=r"^vocab size -5 is too small for byte-level BPE"):
        train_bpe(texts, tmp_path / "bpe", -5)


@pytest.mark.parametrize("train", [train_sentencepiece, train_bpe])
def test_train_out_dir_that_is_a_file(tmp_path, texts, train):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(GPT2JaxError) as e:
            train(texts, out, 300)
        assert str(e.value) == f"cannot write the tokenizer to {out}: {blocker} is a file, not a directory"
    assert blocker.read_text() == "x"
