"""tools/prepare_data.py as a subprocess: the library's log lines reach stderr once each."""
import subprocess
import sys
from pathlib import Path

from gpt2_jax.data.rows import read_rows, row_texts
from gpt2_jax.tokenizer import train_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample.csv"


def test_a_second_run_says_once_that_the_directory_is_prepared(tmp_path):
    train_sentencepiece(row_texts(read_rows(str(SAMPLE))), tmp_path / "tok", 500)
    cmd = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--corpus", str(SAMPLE),
           "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"), "--workers", "0"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr
    lines = [line for line in again.stderr.splitlines() if "is already prepared from" in line]
    assert lines == [f"{tmp_path / 'out'} is already prepared from {SAMPLE}"], again.stderr
