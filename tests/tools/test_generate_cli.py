"""tools/generate.py on a tiny random model with a tiny byte-level BPE tokenizer, run in-process."""
import importlib.util
import io
import os

import pytest
import torch
import transformers

from gpt2_jax.runtime import run_cli
from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.sample.generate import generate
from gpt2_jax.text import keyword_token_ids
from gpt2_jax.tokenizer import load_tokenizer, train_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "tools", "generate.py"))
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

CORPUS = ["the quick brown fox jumps over the lazy dog", "a title about foxes and dogs", "keywords make prompts",
          "sampling from a language model", "jax compiles one loop"] * 20


@pytest.fixture(autouse=True)
def cache_calls(monkeypatch):
    """In-process runs must not switch this whole test session onto a disk cache: record the call instead."""
    import gpt2_jax.runtime
    calls = []
    monkeypatch.setattr(gpt2_jax.runtime, "enable_compilation_cache", lambda path=None: calls.append(path))
    return calls


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random GPT-2 sized to a BPE tokenizer with [BOS] [SEP] [EOS] [PAD], saved together."""
    path = tmp_path_factory.mktemp("cli") / "model"
    tok = train_bpe(CORPUS, path, vocab_size=300)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.4, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def expected_texts(path, prompt_ids, **kw):
    model, tok = load_pretrained(path), load_tokenizer(path)
    out = generate(model, [prompt_ids], eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, **kw)
    texts = []
    for row in out[:, len(prompt_ids):].tolist():
        row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
        texts.append(tok.decode(row))
    return texts


def test_title_and_keywords(model_dir, capsys):
    args = ["--model", model_dir, "--title", "foxes", "--keywords", "dog  jax", "--num-return-sequences", "2",
            "--seed", "3", "--max-new-tokens", "12", "--top-k", "30", "--top-p", "0.7", "--temperature", "0.9",
            "--repetition-penalty", "2.0"]
    cli.main(args)
    out = capsys.readouterr().out
    tok = load_tokenizer(model_dir)
    sampling = dict(max_new_tokens=12, do_sample=True, top_k=30, top_p=0.7, temperature=0.9,
                    repetition_penalty=2.0, num_return_sequences=2, seed=3)
    want = expected_texts(model_dir, tok.format_prompt("foxes", "dog jax"), penalize_prompt=False, **sampling)
    assert out == "".join(f"[{i + 1}] {t}\n" for i, t in enumerate(want))
    assert any(want)
    cli.main(args)
    assert capsys.readouterr().out == out  # a fixed seed repeats
    # --penalize-prompt: the penalty counts the prompt's tokens too, as HF generate does by default.
    cli.main(args + ["--penalize-prompt"])
    want = expected_texts(model_dir, tok.format_prompt("foxes", "dog jax"), **sampling)
    assert capsys.readouterr().out == "".join(f"[{i + 1}] {t}\n" for i, t in enumerate(want)) != out


def test_plain_prompt_greedy(model_dir, capsys):
    cli.main(["--model", model_dir, "--prompt", "the quick", "--greedy", "--max-new-tokens", "10"])
    tok = load_tokenizer(model_dir)
    want = expected_texts(model_dir, tok.encode("the quick"), max_new_tokens=10)
    assert capsys.readouterr().out == want[0] + "\n"


def test_keyword_boost(model_dir, capsys):
    """--keyword-boost passes the keywords as they appear mid-text (" dog", " jax") with the boost; a large
    one writes both keywords into the text."""
    args = ["--model", model_dir, "--title", "foxes", "--keywords", "dog jax", "--greedy", "--max-new-tokens", "12",
            "--keyword-boost", "100"]
    cli.main(args)
    out = capsys.readouterr().out
    tok = load_tokenizer(model_dir)
    want = expected_texts(model_dir, tok.format_prompt("foxes", "dog jax"), max_new_tokens=12, keyword_boost=100.0,
                          keyword_wait=True, keywords=[keyword_token_ids(tok, ["dog", "jax"])])
    assert out == want[0] + "\n" and "dog" in out and "jax" in out
    # --no-keyword-wait: every keyword boosted from the first token on.
    cli.main(args + ["--no-keyword-wait"])
    at_once = expected_texts(model_dir, tok.format_prompt("foxes", "dog jax"), max_new_tokens=12,
                             keyword_boost=100.0, keywords=[keyword_token_ids(tok, ["dog", "jax"])])
    assert capsys.readouterr().out == at_once[0] + "\n"
    cli.main(args[:-2])
    assert capsys.readouterr().out == expected_texts(model_dir, tok.format_prompt("foxes", "dog jax"),
                                                     max_new_tokens=12)[0] + "\n"
    with pytest.raises(SystemExit):
        cli.main(["--model", model_dir, "--prompt", "x", "--keyword-boost", "2"])
    assert "--keyword-boost needs keywords" in capsys.readouterr().err


@pytest.mark.slow
def test_interactive(model_dir, capsys, monkeypatch):
    """Two rounds, then an empty title: each round prints its sample (seed + round), and nothing fails.
    A generation error would only reach stderr (the session goes on), so stderr must stay empty."""
    monkeypatch.setattr("sys.stdin", io.StringIO("foxes\ndog\nlazy dogs\n\n\n"))
    cli.main(["--model", model_dir, "--seed", "0", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert err == ""
    tok = load_tokenizer(model_dir)
    # The CLI's defaults: sampling with top-k 50.
    texts = [expected_texts(model_dir, tok.format_prompt(title, keywords), max_new_tokens=6, do_sample=True,
                            top_k=50, seed=seed)[0]
             for seed, (title, keywords) in enumerate([("foxes", "dog"), ("lazy dogs", "")])]
    assert any(texts)
    assert out == "".join(f"title: keywords: {t}\n" for t in texts) + "title: "


@pytest.mark.parametrize("args,message", [
    (["--model", "/nonexistent/model"], "model path does not exist"),
    (["--prompt", "", "--seed", "0"], "empty prompt"),
    (["--title", "t", "--top-p", "0", "--seed", "0"], "top_p must be in"),
])
def test_errors_are_one_line(model_dir, capsys, args, message):
    if "--model" not in args:
        args = ["--model", model_dir, *args]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: cli.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_an_edited_input_is_refused(model_dir, tmp_path, capsys):
    """A part-written output continued onto an input whose titles were edited: refused in one line, the output
    as it was."""
    src, out = tmp_path / "rows.csv", tmp_path / "o.jsonl"
    src.write_text("".join(f"title {i},fox dog\n" for i in range(4)))
    args = ["--model", model_dir, "--input", str(src), "--output", str(out), "--max-new-tokens", "3", "--greedy"]
    cli.main(args)
    part = "".join(out.read_text().splitlines(keepends=True)[:2])
    out.write_text(part)
    src.write_text("".join(f"another title {i},fox dog\n" for i in range(4)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: cli.main(args))
    assert e.value.code == 2 and out.read_text() == part
    assert capsys.readouterr().err == (f"error: {src} changed since {out} was written from it (the content of its "
                                       f"4 rows differs); continue with the input as it was, or delete {out} and "
                                       f"o.jsonl.settings.json to start over\n")


def test_compilation_cache_on_by_default(model_dir, cache_calls, capsys):
    base = ["--model", model_dir, "--prompt", "the fox", "--max-new-tokens", "3", "--seed", "0"]
    cli.main(base + ["--no-compile-cache"])
    assert cache_calls == []
    cli.main(base)
    assert cache_calls == [None]


@pytest.mark.slow
def test_compilation_cache_is_written(model_dir, tmp_path):
    import subprocess
    import sys
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    cmd = [sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--model", model_dir, "--prompt", "the fox",
           "--max-new-tokens", "3", "--seed", "0"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert os.listdir(tmp_path / "gpt2-jax" / "xla")  # the compiled generation loop is on disk
