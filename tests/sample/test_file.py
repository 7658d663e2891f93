"""Generation for a whole file (gpt2_jax/sample/file.py and tools/generate.py --input) on data/sample.csv."""
import importlib.util
import json
import logging
import os
from pathlib import Path

import pytest
import torch
import transformers

from gpt2_jax.data.rows import read_rows, row_texts
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sample.file import generate_file, plan_batches
from gpt2_jax.sample.fluency import perplexity
from gpt2_jax.sample.keywords import summarise
from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.sample.generate import generate_text
from gpt2_jax.tokenizer import load_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample.csv"
SAMPLING = dict(do_sample=True, top_k=30, top_p=0.9, temperature=0.9, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def model_and_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen-file") / "model"
    tok = train_bpe(row_texts(read_rows(SAMPLE)), path, vocab_size=400)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=96, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.3, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return load_pretrained(str(path)), load_tokenizer(path), path


def lines(path: Path) -> dict[int, dict]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        assert obj["index"] not in out
        out[obj["index"]] = obj
    return out


def test_plan_batches_groups_budgets_and_sorts_by_length():
    plan = plan_batches([5, 3, 9, 3, 7, 1], [8, 8, 4, 8, 8, 8], batch_size=2)
    assert plan == [[5, 1], [3, 0], [4], [2]]


@pytest.mark.slow
def test_every_row_written_once_batched_equal_to_one_at_a_time(model_and_tok, tmp_path):
    """Greedy: batch 8 (left-padded, bucketed) writes exactly the texts of one row at a time; each line holds
    the row's title and keywords."""
    model, tok, _ = model_and_tok
    rows = read_rows(SAMPLE)
    greedy = dict(do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    stats = generate_file(model, tok, str(SAMPLE), str(tmp_path / "b8.jsonl"), batch_size=8, max_new_tokens=12,
                          progress=False, **greedy)
    generate_file(model, tok, str(SAMPLE), str(tmp_path / "b1.jsonl"), batch_size=1, max_new_tokens=12,
                  progress=False, **greedy)
    b8, b1 = lines(tmp_path / "b8.jsonl"), lines(tmp_path / "b1.jsonl")
    assert sorted(b8) == list(range(len(rows))) and stats["written"] == len(rows) and stats["new_tokens"] > 0
    for i, row in enumerate(rows):
        assert (b8[i]["title"], b8[i]["keywords"]) == (row.title, list(row.keywords))
        assert b8[i]["text"] == b1[i]["text"]
    one = generate_text(model, tok, [tok.format_prompt(rows[5].title, rows[5].keywords)], max_new_tokens=12,
                        do_sample=False)
    assert b8[5]["text"] == one[0]


@pytest.mark.slow
def test_sampling_is_seeded_and_a_killed_run_resumes_to_the_same_file(model_and_tok, tmp_path):
    model, tok, _ = model_and_tok
    run = lambda out, seed=0: generate_file(model, tok, str(SAMPLE), str(out), batch_size=16,  # noqa: E731
                                            max_new_tokens=10, seed=seed, progress=False, **SAMPLING)
    run(tmp_path / "a.jsonl")
    run(tmp_path / "b.jsonl")
    run(tmp_path / "c.jsonl", seed=1)
    a = lines(tmp_path / "a.jsonl")
    assert a == lines(tmp_path / "b.jsonl")
    assert [a[i]["text"] for i in a] != [lines(tmp_path / "c.jsonl")[i]["text"] for i in a]
    # Killed mid-way: 40 lines kept and half of the 41st; the resumed run completes the same texts.
    text = (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    killed = tmp_path / "k.jsonl"
    (tmp_path / "a.jsonl.settings.json").rename(tmp_path / "k.jsonl.settings.json")
    killed.write_text("".join(text[:40]) + text[40][:17], encoding="utf-8")
    stats = run(killed)
    assert stats["already_done"] == 40 and stats["written"] == len(a) - 40
    assert lines(killed) == a
    assert run(killed)["written"] == 0  # complete: nothing more to do
    with pytest.raises(GPT2JaxError, match=r"k.jsonl was written with other settings \(seed\)"):
        run(killed, seed=5)


def test_bad_rows_and_prompts_past_the_context_are_reported_and_skipped(model_and_tok, tmp_path, caplog):
    model, tok, _ = model_and_tok
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join([json.dumps({"title": "Soup", "keywords": "leek potato"}),
                              "{not json",
                              json.dumps({"title": "x " * 200, "keywords": ["a"]}),
                              json.dumps({"keywords": "no title"}),
                              json.dumps({"title": "Bread", "keywords": ["flour", "yeast"], "text": "ignored"})]))
    with caplog.at_level(logging.WARNING, logger="gpt2_jax.sample.file"):
        stats = generate_file(model, tok, str(src), str(tmp_path / "o.jsonl"), max_new_tokens=94, progress=False,
                              **SAMPLING)
    err = caplog.text
    assert f"skipped {src}:2: invalid JSON" in err and f"skipped {src}:4: missing key(s) 'title'" in err
    assert "skipped row 1 ('x x x x" in err and "fills the model's context of 96" in err
    assert "2 row(s) get fewer than 94 new tokens" in err
    out = lines(tmp_path / "o.jsonl")
    assert sorted(out) == [0, 2] and out[2]["keywords"] == ["flour", "yeast"]
    assert stats["bad_rows"] == 2 and stats["skipped_prompts"] == 1


@pytest.mark.slow
def test_cli_input_output(model_and_tok, tmp_path, capsys, monkeypatch):
    import gpt2_jax.runtime

    monkeypatch.setattr(gpt2_jax.runtime, "enable_compilation_cache", lambda path=None: None)
    spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "tools", "generate.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    _, _, path = model_and_tok
    out = tmp_path / "cli.jsonl"
    cli.main(["--model", str(path), "--input", str(SAMPLE), "--output", str(out), "--batch-size", "32",
              "--max-new-tokens", "8", "--top-k", "30"])
    stats = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert stats["written"] == len(read_rows(SAMPLE)) == len(lines(out)) and stats["tokens_per_s"] > 0
    assert 0 <= stats["metrics"]["keyword_coverage"] <= 1 and stats["metrics"]["rows"] == len(read_rows(SAMPLE))
    with pytest.raises(SystemExit):
        cli.main(["--model", str(path), "--input", str(SAMPLE)])


def test_keyword_metrics_and_boost(model_and_tok, tmp_path, caplog):
    """The metrics of the whole output in the log and in the stats; a large boost puts every keyword in
    (coverage 1, measured by sample.keywords on the decoded text), and the swap scores lower."""
    model, tok, _ = model_and_tok
    rows = read_rows(SAMPLE)[:12]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"title": r.title, "keywords": list(r.keywords)}) + "\n" for r in rows))
    greedy = dict(do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    with caplog.at_level(logging.INFO, logger="gpt2_jax.sample.file"):
        plain = generate_file(model, tok, str(src), str(tmp_path / "plain.jsonl"), max_new_tokens=40,
                              progress=False, **greedy)
    assert f"keywords: rows 12, keyword_coverage {plain['metrics']['keyword_coverage']:.3f}" in caplog.text
    texts = [o["text"] for _, o in sorted(lines(tmp_path / "plain.jsonl").items())]
    prompts = [tok.format_prompt(r.title, r.keywords) for r in rows]
    assert plain["metrics"] == {**summarise(texts, [list(r.keywords) for r in rows]),
                                "perplexity": perplexity(model, prompts, [tok.encode(t)[:96 - len(p)]  # re-encoded, cut
                                                                          for p, t in zip(prompts, texts)])}
    zero = generate_file(model, tok, str(src), str(tmp_path / "zero.jsonl"), max_new_tokens=40, progress=False,
                         keyword_boost=0.0, **greedy)
    assert zero["metrics"] == plain["metrics"]  # boost 0: the same texts
    boosted = generate_file(model, tok, str(src), str(tmp_path / "boost.jsonl"), max_new_tokens=40,
                            progress=False, keyword_boost=100.0, **greedy)["metrics"]
    # Every keyword is written; a random model may glue the next token on ("kitchen" -> "kitcheners"), which
    # the whole-word coverage does not count: the boost ends with the keyword's last token.
    assert boosted["keyword_coverage"] > 0.9 > plain["metrics"]["keyword_coverage"]
    assert all(k.lower() in o["text"].lower() for o in lines(tmp_path / "boost.jsonl").values() for k in o["keywords"])
    assert boosted["swapped_coverage"] < 0.5
    assert set(boosted) == {"rows", "keyword_coverage", "swapped_coverage", "distinct_1", "distinct_2",
                            "repeat_4gram", "first_position", "first_10pct", "longest_run", "run3_rows",
                            "perplexity", "perplexity_unguided", "perplexity_ratio"}
    # 12 rows, all within UNGUIDED_ROWS: the ratio is over the whole output.
    assert boosted["perplexity_ratio"] == pytest.approx(boosted["perplexity"] / boosted["perplexity_unguided"])
    # The boost is part of the settings: an output is continued only with the same one.
    with pytest.raises(GPT2JaxError, match=r"other settings \(keyword_boost\)"):
        generate_file(model, tok, str(src), str(tmp_path / "boost.jsonl"), max_new_tokens=40, progress=False,
                      keyword_boost=5.0, **greedy)


def test_summary_places_keywords_against_the_inputs_texts(model_and_tok, tmp_path, caplog):
    """An input with texts: the summary's placement has the reference's beside it (the input's texts cut to
    each written text's length); waiting guidance is part of the settings."""
    model, tok, _ = model_and_tok
    rows = read_rows(SAMPLE)[:8]
    texts_in = [r.text for r in rows]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"title": r.title, "keywords": list(r.keywords), "text": r.text}) + "\n"
                           for r in rows))
    kw = dict(max_new_tokens=24, progress=False, do_sample=True, top_k=20, keyword_boost=10.0, keyword_wait=True)
    with caplog.at_level(logging.INFO, logger="gpt2_jax.sample.file"):
        m = generate_file(model, tok, str(src), str(tmp_path / "w.jsonl"), **kw)["metrics"]
    out = [o["text"] for _, o in sorted(lines(tmp_path / "w.jsonl").items())]
    want = summarise(out, [list(r.keywords) for r in rows], references=texts_in)
    assert {k: m[k] for k in want} == want and "reference_first_10pct" in m and "run3_unlike_reference" in m
    assert f"first_10pct {m['first_10pct']:.3f}" in caplog.text
    with pytest.raises(GPT2JaxError, match=r"other settings \(keyword_wait\)"):
        generate_file(model, tok, str(src), str(tmp_path / "w.jsonl"), **{**kw, "keyword_wait": False})


def small_input(path: Path, rows, title=lambda i, t: t) -> Path:
    path.write_text("".join(json.dumps({"title": title(i, r.title), "keywords": list(r.keywords)}) + "\n"
                            for i, r in enumerate(rows)))
    return path


def test_an_edited_input_is_refused_and_the_output_kept(model_and_tok, tmp_path):
    """A killed output continued onto an input with other titles (same row count) mixed the two inputs' rows
    with exit status 0: the settings held the input's path and row count only."""
    model, tok, _ = model_and_tok
    rows = read_rows(SAMPLE)[:6]
    src, out = small_input(tmp_path / "rows.jsonl", rows), tmp_path / "o.jsonl"
    run = lambda: generate_file(model, tok, str(src), str(out), max_new_tokens=4, progress=False,  # noqa: E731
                                do_sample=False)
    run()
    killed = "".join(out.read_text(encoding="utf-8").splitlines(keepends=True)[:2])
    out.write_text(killed, encoding="utf-8")
    small_input(src, rows, title=lambda i, t: f"{t} (edited)")
    with pytest.raises(GPT2JaxError) as e:
        run()
    assert str(e.value) == (f"{src} changed since {out} was written from it (the content of its 6 rows differs); "
                            f"continue with the input as it was, or delete {out} and o.jsonl.settings.json "
                            f"to start over")
    small_input(src, rows[:5])
    with pytest.raises(GPT2JaxError, match=r"changed since .* \(6 -> 5 rows\)"):
        run()
    assert out.read_text(encoding="utf-8") == killed
    small_input(src, rows)  # as it was: the run continues
    assert run()["already_done"] == 2


@pytest.mark.parametrize("bad,message", [
    (dict(keyword_boost=float("inf")), "keyword_boost must be >= 0, got inf"),
    (dict(keyword_boost=float("nan")), "keyword_boost must be >= 0, got nan"),
    (dict(temperature=float("inf")), "temperature must be > 0 when sampling"),
    (dict(temperature=float("nan"), do_sample=False), "temperature must be a finite number, got nan"),
    (dict(top_p=float("nan")), "top_p must be in (0, 1], got nan"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be > 0, got inf"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(seed=-1), "seed must be >= 0, got -1"),
    (dict(batch_size=0), "batch size must be at least 1, got 0"),
    (dict(num_return_sequences=2), "one text per row: num_return_sequences must be 1, got 2"),
    (dict(eos_token_id=10**6), "eos_token_id 1000000 is outside the vocabulary"),
])
def test_a_bad_setting_is_refused_before_any_file_is_written(model_and_tok, tmp_path, bad, message):
    model, tok, _ = model_and_tok
    settings = {**SAMPLING, "max_new_tokens": 4, **bad}
    with pytest.raises(GPT2JaxError) as e:
        generate_file(model, tok, str(SAMPLE), str(tmp_path / "o.jsonl"), progress=False, **settings)
    assert message in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_as_input_or_output(model_and_tok, tmp_path):
    model, tok, _ = model_and_tok
    (tmp_path / "d").mkdir()
    with pytest.raises(GPT2JaxError) as e:
        generate_file(model, tok, str(tmp_path / "d"), str(tmp_path / "o.jsonl"), progress=False)
    assert str(e.value) == f"input {tmp_path / 'd'} is a directory, not a CSV or JSONL file of rows"
    with pytest.raises(GPT2JaxError) as e:
        generate_file(model, tok, str(SAMPLE), str(tmp_path / "d"), progress=False)
    assert str(e.value) == f"output {tmp_path / 'd'} is a directory; give the path of a JSONL file to write"
    assert list(tmp_path.iterdir()) == [tmp_path / "d"] and not any((tmp_path / "d").iterdir())


def batched_output(model, tok, path: Path, batch_size: int, max_new_tokens: int, **sampling) -> str:
    """The output file the batched path wrote before the engine (generate_tokens over planned batches, each
    decoded until its longest row ends), for the rows of `path`: the reference of byte-identical output."""
    from gpt2_jax.sample.generate import generate_tokens

    rows = read_rows(path, with_text=False)
    prompts = [tok.format_prompt(r.title, r.keywords) for r in rows]
    budget = [min(max_new_tokens, model.config.n_positions - len(p)) for p in prompts]
    lines_ = []
    assert min(budget) >= 1
    for batch in plan_batches([len(p) for p in prompts], budget, batch_size):
        new_rows = generate_tokens(model, tok, [prompts[i] for i in batch], max_new_tokens=budget[batch[0]],
                                   keywords=[rows[i].keywords for i in batch], **sampling)
        for i, new in zip(batch, new_rows):
            lines_.append(json.dumps({"index": i, "title": rows[i].title, "keywords": list(rows[i].keywords),
                                      "text": tok.decode(new, skip_special_tokens=True)}, ensure_ascii=False) + "\n")
    return "".join(lines_)


@pytest.mark.slow
@pytest.mark.parametrize("boost", [0.0, 3.0])
def test_engine_output_is_byte_identical_to_the_batched_path(model_and_tok, tmp_path, boost):
    """Greedy: the engine's file (slots refilled as rows finish) is byte for byte the old batched path's, rows that
    stop at EOS, rows whose prompt leaves fewer new tokens and keyword guidance included."""
    model, tok, _ = model_and_tok
    rows = read_rows(SAMPLE)[:20]
    src = small_input(tmp_path / "rows.jsonl", rows, title=lambda i, t: t + " soup" * 8 * (i % 7 == 3))
    from gpt2_jax.sample.generate import generate_tokens

    # A random model never writes [EOS]: one of its frequent tokens ends rows instead.
    free = generate_tokens(model, tok, [tok.format_prompt(rows[1].title, rows[1].keywords)], max_new_tokens=12,
                           do_sample=False)[0]
    greedy = dict(do_sample=False, eos_token_id=free[6], pad_token_id=tok.pad_id, keyword_boost=boost)
    want = batched_output(model, tok, src, 8, 40, **greedy)
    texts = [json.loads(line)["text"] for line in want.splitlines()]
    assert any(len(tok.encode(t)) < 30 for t in texts), "no row stops early: slots would never be refilled"
    assert any(len(tok.format_prompt(r.title, r.keywords)) > 56 for r in read_rows(src, with_text=False))
    generate_file(model, tok, str(src), str(tmp_path / "o.jsonl"), batch_size=8, max_new_tokens=40,
                  progress=False, **greedy)
    assert (tmp_path / "o.jsonl").read_text(encoding="utf-8") == want
