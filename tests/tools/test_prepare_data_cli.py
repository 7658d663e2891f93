"""tools/prepare_data.py as a subprocess: the library's log lines reach stderr once each; its workers die with it."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2_jax.data.rows import read_rows, row_texts
from gpt2_jax.tokenizer import train_bpe, train_sentencepiece

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "sample.csv"


@pytest.mark.slow
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


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process, from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        out[int(stat.parent.name)] = (int(fields[1]), fields[0], fields[19])
    return out


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every process below ``pid``."""
    procs, found, todo = _processes(), {}, [pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, _, start) in procs.items():
            if ppid == parent and p not in found:
                found[p] = start
                todo.append(p)
    return found


@pytest.mark.slow  # a multi-process run: 15-40 s
def test_killing_the_cli_kills_its_forkserver_tracker_and_workers(tmp_path):
    """``kill -9`` of prepare_data.py: no process of its own outlives it (before, the workers blocked on its
    queue forever, keeping its forkserver and resource tracker alive)."""
    rows = read_rows(str(SAMPLE))
    train_bpe(row_texts(rows[:30]), tmp_path / "tok", 400)  # a Hugging Face tokenizer: workers start fastest
    with open(tmp_path / "big.csv", "w", newline="") as f:
        csv.writer(f).writerows([r.title, " ".join(r.keywords), r.text] for _ in range(200) for r in rows)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "--corpus", str(tmp_path / "big.csv"),
           "--tokenizer", str(tmp_path / "tok"), "--out", str(out), "--workers", "2", "--shard-tokens", "5000"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not list(out.glob("shard-*/shard.json")):  # the workers are busy
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.1)
        kids = _descendants(proc.pid)
        assert len(kids) >= 4, kids  # the forkserver, the resource tracker, 2 workers
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 10
    while True:
        procs = _processes()
        alive = [p for p, start in kids.items() if p in procs and procs[p][2] == start and procs[p][1] != "Z"]
        if not alive or time.time() > deadline:
            break
        time.sleep(0.2)
    for p in alive:  # not left running on a failure
        os.kill(p, signal.SIGKILL)
    assert alive == []
