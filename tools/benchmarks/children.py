"""Benchmarks that run each implementation in a process of its own (so that its peak RSS is its own): the
child is tools/bench.py again, with the subcommand's hidden --child flag."""
from __future__ import annotations

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")


def child_command(subcommand: str, *flags: str) -> list[str]:
    """The command line of a child process of `tools/bench.py SUBCOMMAND`."""
    return [sys.executable, BENCH, subcommand, "--child", *flags]


def child_rows(cmd: list[str], ident: dict) -> list[dict]:
    """The JSON lines a child benchmark process printed, or [`ident` with the error that stopped it]."""
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [l for l in res.stdout.splitlines() if l.startswith("{")]
    if res.returncode or not lines:
        return [dict(ident, error=(res.stderr.strip().splitlines() or ["no output"])[-1])]
    return [json.loads(l) for l in lines]
