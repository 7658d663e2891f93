"""gpt2_jax/text.py's keyword_token_ids on tokenizers trained locally (keyword_occurs and the script table:
tests/sample/test_keywords.py, with the keyword metrics built on them)."""
import pytest

from gpt2_jax.text import keyword_token_ids
from gpt2_jax.tokenizer import train_bpe, train_sentencepiece


def occurs(seq, kw):
    return any(seq[i:i + len(kw)] == kw for i in range(len(seq) - len(kw) + 1))


TEXTS = ["Plant the seeds in spring, when the soil is warm.", "Water the garden every morning.",
         "中国经济持续发展，经济增长稳定。", "发展经济是中国的目标。", "我们讨论经济问题。", "世界经济很复杂。"] * 20


@pytest.mark.parametrize("train", [train_bpe, train_sentencepiece])
def test_keyword_token_ids_as_in_running_text(tmp_path, train):
    """A keyword's ids are those it has inside a sentence: after a space (GPT-2 "Ġseeds", SentencePiece
    "▁seeds"), or straight after another character in Chinese."""
    tok = train(TEXTS, tmp_path / "tok", 400)
    ids = keyword_token_ids(tok, ["seeds", "garden", "经济"])
    assert len(ids) == 3 and all(ids)
    assert occurs(tok.encode(TEXTS[0]), ids[0]) and occurs(tok.encode(TEXTS[1]), ids[1])
    assert not occurs(tok.encode(TEXTS[0]), tok.encode("xseeds")[1:])  # not the word-start-less form
    assert tok.decode(ids[0]).strip() == "seeds" and tok.decode(ids[2]).strip() == "经济"
    if train is train_sentencepiece:  # byte-level BPE merges whole memorised Chinese phrases across words
        assert all(occurs(tok.encode(t), ids[2]) for t in ["他们讨论经济。", "世界经济很复杂。", "中国经济持续发展"])
