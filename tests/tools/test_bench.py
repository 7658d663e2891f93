"""tools/bench.py: its subcommands, and the train benchmark's rows (each impl in a child process)."""
import pytest
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
BENCH = os.path.join(ROOT, "tools", "bench.py")
SUBCOMMANDS = ("generate", "generate-file", "lora-generate", "serve", "train", "compile", "attention", "data", "padding", "grain", "keywords")


def _bench(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_every_subcommand_has_its_help():
    listed = _bench("--help")
    assert listed.returncode == 0 and "{" + ",".join(SUBCOMMANDS) + "}" in listed.stdout
    for name in SUBCOMMANDS:
        proc = _bench(name, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: bench.py {name}"), proc.stderr


@pytest.mark.slow
def test_train_rows_against_the_full_step():
    """gpt2-jax's step and the matmul floor, each in its own process: a row each, the floor's compared with
    the full step's."""
    proc = _bench("train", "--shapes", "tiny", "--impls", "jax,gemm", "--batch", "1", "--seq", "8", "--steps", "1",
                  timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and [r["impl"] for r in rows] == ["jax", "gemm"], proc.stdout + proc.stderr
    assert not [r["error"] for r in rows if "error" in r]
    jax_row, gemm = rows
    assert (jax_row["trainable"], jax_row["shape"], jax_row["batch"], jax_row["seq"]) == ("all", "tiny", 1, 8)
    assert jax_row["step_s"] > 0 and jax_row["tokens_per_s"] > 0 and 0 < jax_row["mfu"]
    assert gemm["trainable"] == "all (matmuls only)" and gemm["ratio_to_full"] > 0


def test_train_seq_past_the_shape_is_a_usage_error():
    proc = _bench("train", "--shapes", "tiny", "--seq", "2000")
    assert proc.returncode == 2 and "--seq must be between 1 and 1024 (n_positions)" in proc.stderr
    assert proc.stdout == ""
