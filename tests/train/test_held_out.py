"""gpt2_jax/train/held_out.py: the run's sample metrics hold the keywords' placement against the rows' own
texts, and the model's perplexity of what it wrote (with guidance on, against unguided sampling's)."""
import dataclasses
import random

import pytest
import transformers

from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.data.rows import Row
from gpt2_jax.sample.fluency import perplexity
from gpt2_jax.sample.keywords import summarise
from gpt2_jax.tokenizer import train_sentencepiece
from gpt2_jax.train.config import SampleSection, TrainConfig
from gpt2_jax.train.held_out import format_metrics, held_out_metrics, write_tokens

WORDS = "water the garden every morning and plant seeds in spring when soil is warm".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp, rng = tmp_path_factory.mktemp("held_out"), random.Random(0)
    tok = train_sentencepiece([" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)], tmp / "sp", 320)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp / "hf")
    rows = [Row("garden care", ("garden", "seeds"), "plant the seeds in the garden when the soil is warm"),
            Row("morning", ("water", "morning"), "water the garden every morning in spring")]
    run = TrainConfig(sample=SampleSection(max_new_tokens=12))
    return load_pretrained(str(tmp / "hf")), tok, rows, run


def test_metrics_hold_placement_and_fluency(setup):
    model, tok, rows, cfg = setup
    m = held_out_metrics(model, tok, rows, cfg)
    written = write_tokens(model, tok, rows, cfg, warn=lambda _: None)
    texts = [tok.decode(ids, skip_special_tokens=True) for _, _, ids in written]
    want = summarise(texts, [list(r.keywords) for r in rows], references=[r.text for r in rows])
    assert {k: v for k, v in m.items() if not k.startswith("perplexity")} == \
        {k: float(v) for k, v in want.items() if v is not None and k != "rows"}
    assert m["perplexity"] == pytest.approx(perplexity(model, [p for _, p, _ in written], [i for _, _, i in written]))
    assert "perplexity_unguided" not in m and "reference_first_10pct" in m
    # Guided: the unguided texts' perplexity beside it, and their ratio.
    guided = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, keyword_boost=5.0, keyword_wait=True))
    g = held_out_metrics(model, tok, rows, guided)
    assert g["perplexity_unguided"] == pytest.approx(m["perplexity"])
    assert g["perplexity_ratio"] == pytest.approx(g["perplexity"] / m["perplexity"])
    line = format_metrics(g)
    assert f"perplexity {g['perplexity']:.2f} (unguided {m['perplexity']:.2f})" in line
    assert f"longest keyword run {g['longest_run']:.2f} (reference {g['reference_longest_run']:.2f})" in line
