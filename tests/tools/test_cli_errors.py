"""The tools' bad-input paths, run in-process: one `error: ...` line on stderr and exit status 2, no traceback."""
import importlib.util
import sys
from pathlib import Path

import pytest

from gpt2_jax.runtime import run_cli

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample.csv"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of tools/NAME.py with `args`, run through run_cli as its __main__ does."""
    tool = load_tool(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, args)])
    try:
        run_cli(tool.main)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


@pytest.mark.parametrize("sub", [False, True])
def test_export_hf_out_is_a_file_fails_before_exporting(tmp_path, a_file, monkeypatch, capsys, sub):
    import gpt2_jax.checkpoints.pretrained

    def export_run(*args, **kwargs):
        raise AssertionError("exported before checking --out")

    monkeypatch.setattr(gpt2_jax.checkpoints.pretrained, "export_run", export_run)
    monkeypatch.setattr(gpt2_jax.checkpoints.pretrained, "is_run_dir", lambda path: True)
    out = a_file / "hf" if sub else a_file
    code, _, err = run_tool("export_hf", ["--checkpoint", tmp_path, "--out", out], monkeypatch, capsys)
    expected = f"--out {out}: {a_file} is a file, not a directory" if sub else f"--out {out} is a file, not a directory"
    assert (code, err) == (2, f"error: {expected}\n")
    assert a_file.read_text() == "not a directory\n"


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_train_tokenizer_out_is_a_file(a_file, monkeypatch, capsys, kind):
    args = ["--corpus", SAMPLE, "--kind", kind, "--vocab-size", 500, "--out", a_file]
    code, _, err = run_tool("train_tokenizer", args, monkeypatch, capsys)
    assert (code, err) == (2, f"error: --out {a_file} is a file, not a directory\n")


@pytest.mark.parametrize("vocab_size", [0, -3])
def test_train_tokenizer_vocab_size_not_positive(tmp_path, monkeypatch, capsys, vocab_size):
    args = ["--corpus", SAMPLE, "--kind", "sentencepiece", "--vocab-size", vocab_size, "--out", tmp_path / "tok"]
    code, _, err = run_tool("train_tokenizer", args, monkeypatch, capsys)
    assert (code, err) == (2, f"error: --vocab-size must be positive, got {vocab_size}\n")
    assert not (tmp_path / "tok").exists()


def test_train_tokenizer_stray_quote_names_the_line(tmp_path, monkeypatch, capsys):
    """A stray opening quote used to swallow rows 6-20 into row 5 and train on 5 rows with exit status 0."""
    lines = [f"Title {i},kw{i} more,Text of row {i} here." for i in range(1, 21)]
    lines[4] = 'Title 5,kw5 more,"Quoted start of text 5.'
    corpus = tmp_path / "c.csv"
    corpus.write_text("\n".join(lines) + "\n")
    args = ["--corpus", corpus, "--kind", "bpe", "--vocab-size", 300, "--out", tmp_path / "tok"]
    code, _, err = run_tool("train_tokenizer", args, monkeypatch, capsys)
    assert (code, err) == (2, f"error: {corpus}:5: the quoted field that opens here runs to the end of the file and "
                              f"takes in 15 more line(s), 15 shaped like rows; a stray '\"'? "
                              f"(skip_bad_rows skips such rows)\n")
    code, out, _ = run_tool("train_tokenizer", [*args, "--skip-bad-rows"], monkeypatch, capsys)
    assert code == 0 and out.rstrip().endswith("trained on 19 rows")


@pytest.mark.parametrize("flags,message", [
    (["--keyword-boost", "inf"], "keyword_boost must be >= 0, got inf"),
    (["--keyword-boost", "-1"], "keyword_boost must be >= 0, got -1.0"),
    (["--temperature", "nan"], "temperature must be > 0 when sampling (for greedy decoding use do_sample=False), "
                               "got nan"),
    (["--temperature", "nan", "--greedy"], "temperature must be a finite number, got nan"),
    (["--top-p", "inf"], "top_p must be in (0, 1], got inf"),
    (["--repetition-penalty", "nan"], "repetition_penalty must be > 0, got nan"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--batch-size", "0"], "batch size must be at least 1, got 0"),
])
def test_generate_bad_setting_refused_before_the_model_loads(tmp_path, monkeypatch, capsys, flags, message):
    """`--keyword-boost inf` was refused only after the model had loaded, and with --input after an empty output
    and its settings file were written, so that a rerun with a finite boost was refused as "other settings"."""
    out = tmp_path / "o.jsonl"
    args = ["--model", tmp_path / "no-model", "--input", SAMPLE, "--output", out, *flags]
    code, _, err = run_tool("generate", args, monkeypatch, capsys)
    assert (code, err) == (2, f"error: {message}\n")
    assert list(tmp_path.iterdir()) == []
    if "--batch-size" not in flags and "--greedy" not in flags:  # the same check without --input (greedy decoding
        # ignores the temperature; a file's run refuses NaN, which would never equal itself in the settings file)
        code, _, err = run_tool("generate", ["--model", tmp_path / "no-model", "--title", "t", *flags], monkeypatch,
                                capsys)
        assert (code, err) == (2, f"error: {message}\n")


@pytest.mark.parametrize("which", ["--input", "--output"])
def test_generate_directory_as_input_or_output(tmp_path, monkeypatch, capsys, which):
    d = tmp_path / "d"
    d.mkdir()
    paths = {"--input": SAMPLE, "--output": tmp_path / "o.jsonl", which: d}
    args = ["--model", tmp_path / "no-model", "--input", paths["--input"], "--output", paths["--output"]]
    code, _, err = run_tool("generate", args, monkeypatch, capsys)
    expected = (f"input {d} is a directory, not a CSV or JSONL file of rows" if which == "--input" else
                f"output {d} is a directory; give the path of a JSONL file to write")
    assert (code, err) == (2, f"error: {expected}\n")
    assert list(tmp_path.iterdir()) == [d] and not any(d.iterdir())


def test_generate_output_under_a_file(tmp_path, a_file, monkeypatch, capsys):
    out = a_file / "o.jsonl"
    code, _, err = run_tool("generate", ["--model", tmp_path / "no-model", "--input", SAMPLE, "--output", out],
                            monkeypatch, capsys)
    assert (code, err) == (2, f"error: output {out}: {a_file} is a file, not a directory\n")
