"""Training metrics: one JSON line per write in `metrics.jsonl`, and TensorBoard scalars under `tb/`.

The TensorBoard event file is written by hand (a few protobuf fields in TFRecord framing), so neither
TensorFlow nor tensorboardX is needed. JSON cannot hold NaN or ±inf: non-finite values are written as
`null` in metrics.jsonl (and as they are to TensorBoard). A resumed run appends to metrics.jsonl and starts
a new events file; TensorBoard merges the files of one directory, and `plot_metrics` keeps the last record
of each (split, step).
"""
from __future__ import annotations

import json
import math
import os
import socket
import struct
import time

from gpt2_jax.errors import GPT2JaxError


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        for _ in range(8):
            n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1  # Castagnoli polynomial, reflected
        table.append(n)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses."""
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 two's complement, as protobuf encodes negative values
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _bytes_field(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _event(step: int, wall_time: float, *, file_version: str = "", scalars: dict[str, float] | None = None) -> bytes:
    """An encoded tensorflow.Event: wall_time (1), step (2), file_version (3) or summary (5) of simple values."""
    msg = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version:
        msg += _bytes_field(3, file_version.encode())
    if scalars:  # Summary.value (1) = {tag (1), simple_value (2, float32)}
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                          for tag, v in scalars.items())
        msg += _bytes_field(5, values)
    return msg


def _record(data: bytes) -> bytes:
    """TFRecord framing: length, masked crc32c of the length, data, masked crc32c of the data."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


class MetricsWriter:
    """Appends scalars to `out_dir/metrics.jsonl` and a TensorBoard events file; `enabled=False` writes nothing."""

    def __init__(self, out_dir: str, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = self._tb = None
        if not enabled:
            return
        tb_dir = os.path.join(out_dir, "tb")
        os.makedirs(tb_dir, exist_ok=True)
        path = os.path.join(out_dir, "metrics.jsonl")
        if os.path.exists(path):  # a killed run may have left half a line: drop it rather than glue onto it
            with open(path, "rb") as f:
                data = f.read()
            if not data.endswith(b"\n"):
                os.truncate(path, data.rfind(b"\n") + 1)
        self._jsonl = open(path, "a", encoding="utf-8")
        now = time.time()
        stem = os.path.join(tb_dir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}")
        n = 0
        while os.path.exists(f"{stem}.{n}"):
            n += 1
        self._tb = open(f"{stem}.{n}", "wb")
        self._tb.write(_record(_event(0, now, file_version="brain.Event:2")))
        self._tb.flush()

    def write(self, step: int, scalars: dict[str, float], split: str = "train") -> None:
        """Record `scalars` at `step` under `split` (TensorBoard tags `split/name`); flushed at once."""
        if not self.enabled:
            return
        now, values = time.time(), {k: float(v) for k, v in scalars.items()}
        row = {"step": int(step), "split": split, "time": now,
               **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._jsonl.flush()
        self._tb.write(_record(_event(int(step), now, scalars={f"{split}/{k}": v for k, v in values.items()})))
        self._tb.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._tb):
            if f is not None:
                f.close()
        self._jsonl = self._tb = None
        self.enabled = False

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, in file order (non-finite values are None); a cut-off last line is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise GPT2JaxError(f"no metrics file at {path}") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if any(rest.strip() for rest in lines[i:]):  # only the last line may be cut off
                raise GPT2JaxError(f"{path}:{i}: not a JSON line ({e})") from None
    return records
