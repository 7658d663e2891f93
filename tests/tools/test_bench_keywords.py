"""tools/benchmarks/keywords.py (`bench.py keywords`): coverage by keyword length in tokens, and the reference
texts' own coverage."""
import importlib.util
import os
import random

from gpt2_jax.data.rows import Row
from gpt2_jax.tokenizer import train_sentencepiece

_BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "benchmarks")
_spec = importlib.util.spec_from_file_location("bench_keywords", os.path.join(_BENCHMARKS, "keywords.py"))
bench_keywords = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_keywords)

FILLER = "Water the garden every morning and plant the seeds in spring when the soil is warm."
RARE = "Qzvxkwjyfhob"  # never in the tokenizer's training text: one piece per character or so


def _tokenizer(tmp_path):
    words, rng = FILLER.lower().rstrip(".").split(), random.Random(0)
    tok = train_sentencepiece([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)], tmp_path / "sp", 320)
    ids = bench_keywords.keyword_token_ids(tok, ["garden", RARE])
    assert len(ids[0]) == 1 and len(ids[1]) >= 3  # the premise: one keyword of each length class
    return tok


def test_coverage_by_length(tmp_path):
    tok = _tokenizer(tmp_path)
    rows = [Row("a", ("garden", RARE), "x"), Row("b", ("garden", RARE), "x"), Row("c", ("garden",), "x")]
    written = [(rows[0], "the garden grows"), (rows[1], f"a {RARE.lower()} here"), (rows[2], "nothing")]
    # garden: written in 1 of 3 rows; the rare word (case-insensitive) in 1 of 2; no 2-token keyword at all.
    assert bench_keywords.coverage_by_length(tok, written) == {"1": 0.333, "2": None, "3+": 0.5}


def test_reference_line_cuts_the_texts_to_the_new_tokens(tmp_path):
    tok = _tokenizer(tmp_path)
    rows = [Row("a", ("garden", RARE), f"The garden. {FILLER} {FILLER} {RARE}."),
            Row("b", ("seeds", "warm"), FILLER)]
    assert len(tok.encode(rows[0].text)) > 40
    line = bench_keywords.reference_line(tok, rows, 5)
    # Five tokens hold "The garden." but neither the rare word at the end nor "seeds"/"warm" of the filler.
    assert line["keyword_coverage"] == round((1 / 2 + 0) / 2, 3)
    assert line["keywords_by_tokens"] == {"1": 0.75, "2": 0.0, "3+": 0.25}
    assert bench_keywords.reference_line(tok, rows, 1000)["keyword_coverage"] == 1.0
    # Rows without keywords (plain text) have no coverage to report.
    assert bench_keywords.reference_line(tok, [Row("", (), FILLER)], 5)["keyword_coverage"] is None
