"""tools/bench.py: its subcommands and their arguments."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
BENCH = os.path.join(ROOT, "tools", "bench.py")
SUBCOMMANDS = ("generate", "generate-file", "train", "compile", "attention", "data", "padding", "grain", "keywords")


def _bench(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_every_subcommand_has_its_help():
    listed = _bench("--help")
    assert listed.returncode == 0 and "{" + ",".join(SUBCOMMANDS) + "}" in listed.stdout
    for name in SUBCOMMANDS:
        proc = _bench(name, "--help")
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: bench.py {name}"), proc.stderr


def test_train_seq_past_the_shape_is_a_usage_error():
    proc = _bench("train", "--shapes", "tiny", "--seq", "2000")
    assert proc.returncode == 2 and "--seq must be between 1 and 1024 (n_positions)" in proc.stderr
    assert proc.stdout == ""
