"""The optimised HLO text of a compiled program (`compiled.as_text()`), read for what the cost analysis
leaves out: the collectives that run per step and the bytes their results hold, each loop body counted as
often as the loop runs (a scan's trip count read from its `counter < N` condition), and the Pallas kernel calls.
"""
from __future__ import annotations

import math
import re
from typing import Optional

from gpt2_jax.errors import GPT2JaxError

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")


def _split_type(rest: str) -> tuple[str, str]:
    """(result type, the rest) of an instruction's right-hand side; tuple types hold spaces and parentheses."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


def shape_bytes(type_text: str) -> int:
    """Bytes of every array in an HLO result type (`bf16[64,192]{1,0}` or a tuple of them)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def parse_hlo(text: str) -> tuple[str, dict]:
    """(entry name, {computation: [(name, result type, opcode, attributes)]}) of an HLO module's text."""
    comps: dict[str, list] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line.lstrip().startswith("HloModule"):
                current = m.group(2)
                comps[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            type_text, rest = _split_type(m.group(3))
            op = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
            comps[current].append((m.group(2), type_text, op.group(1) if op else "", rest))
    if entry is None:
        raise GPT2JaxError("no ENTRY computation in the compiled HLO text")
    return entry, comps


def _trip_count(comps: dict, condition: str) -> Optional[int]:
    """A scan's trip count from its loop condition (ROOT `counter < constant`, the counter starting at 0
    as lax.scan's does), or None for any other condition (a data-dependent while_loop)."""
    body = comps.get(condition, [])
    if not body or body[-1][2] != "compare" or "direction=LT" not in body[-1][3]:
        return None
    operands = re.findall(r"%([\w.\-]+)", body[-1][3].split(")")[0])
    defs = {name: (op, rest) for name, _, op, rest in body}
    if len(operands) != 2 or defs.get(operands[0], ("",))[0] != "get-tuple-element":
        return None
    op, rest = defs.get(operands[1], ("", ""))
    m = re.match(r"constant\((\d+)\)", rest)
    return int(m.group(1)) if op == "constant" and m else None


def collectives(text: str) -> dict:
    """Collectives of an optimised HLO module: per kind, how many run per step and the bytes of their
    results, with loop bodies counted as often as the loop runs (trip counts read from `counter < N`
    conditions; a loop whose count cannot be read is counted once and listed in `loops_counted_once`);
    the loops by trip count; the Pallas kernel calls per step."""
    entry, comps = parse_hlo(text)
    times: dict[str, float] = {}
    loops, counted_once = [], []

    def visit(comp: str, n: float):
        times[comp] = times.get(comp, 0) + n
        for name, _, op, rest in comps.get(comp, []):
            calls = {}
            for kind, target in _CALLS.findall(rest):
                for t in re.findall(r"[\w.\-]+", target):
                    calls[t] = kind
            trip = 1
            if op == "while":
                cond = next((t for t, k in calls.items() if k == "condition"), None)
                count = _trip_count(comps, cond) if cond else None
                loops.append({"loop": name, "trip_count": count})
                if count is None:
                    counted_once.append(name)
                trip = count or 1
            for t, kind in calls.items():
                if t in comps:
                    visit(t, n * (trip if kind in ("body", "condition") else 1))

    visit(entry, 1)
    out = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}
    kernels = 0
    for comp, n in times.items():
        for _, type_text, op, rest in comps[comp]:
            kernels += int(n) * (op == "custom-call" and 'custom_call_target="tpu_custom_call"' in rest)
            base = op[:-len("-done")] if op.endswith("-done") else op
            # An async pair is counted at its -done (whose result is the collective's output alone).
            if base in out and not op.endswith("-start"):
                out[base]["count"] += int(n)
                out[base]["bytes"] += int(n * shape_bytes(type_text))
    trips: dict[str, int] = {}
    for loop in loops:
        key = str(loop["trip_count"] if loop["trip_count"] is not None else "unknown")
        trips[key] = trips.get(key, 0) + 1
    # {trip count: loops}; "unknown" loops (data-dependent while_loops) had their bodies counted once
    # Pallas kernels (tpu_custom_call, e.g. attention): XLA's cost analysis does not see their FLOPs.
    return {"collectives": out, "while_loops": trips, "loops_counted_once": counted_once[:5],
            "pallas_kernels": kernels}
