"""gpt2_jax.train.metrics against TensorBoard's own reader, and tools/plot_metrics.py as a subprocess."""
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as tb_crc32c

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.train.metrics import MetricsWriter, crc32c, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "plot_metrics.py")
spec = importlib.util.spec_from_file_location("plot_metrics_cli", TOOL)
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


def tb_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard reads the run's tb/ directory."""
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_crc32c_known_vector_and_reference():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    for n in (1, 7, 8, 255, 1000):
        assert crc32c(data[:n]) == tb_crc32c(data[:n])


def test_tensorboard_reads_back_scalars(tmp_path):
    written = {1: {"loss": 4.25, "lr": 3e-4, "grad_norm": 1.0 / 3}, 2: {"loss": 3.9, "lr": 6e-4, "grad_norm": 0.7},
               2**40: {"loss": 0.123456789, "lr": 1e-7, "grad_norm": 12345.678}}  # 2**40: a multi-byte varint
    with MetricsWriter(str(tmp_path)) as w:
        for step, scalars in written.items():
            w.write(step, scalars)
        w.write(2, {"loss": 4.0, "perplexity": math.exp(4.0)}, split="val")
    files = glob.glob(str(tmp_path / "tb" / "*"))
    assert len(files) == 1 and "events.out.tfevents." in os.path.basename(files[0])

    got = tb_scalars(tmp_path)
    assert sorted(got) == ["train/grad_norm", "train/loss", "train/lr", "val/loss", "val/perplexity"]
    for name in ("loss", "lr", "grad_norm"):
        assert got[f"train/{name}"] == [(s, float(np.float32(v[name]))) for s, v in written.items()]
    assert got["val/loss"] == [(2, 4.0)]
    assert got["val/perplexity"] == [(2, float(np.float32(math.exp(4.0))))]

    events = list(EventFileLoader(files[0]).Load())  # every record passed the reader's crc checks
    assert events[0].file_version == "brain.Event:2"
    assert len(events) == 1 + len(written) + 1
    assert all(abs(e.wall_time - events[0].wall_time) < 60 for e in events)


def test_jsonl_round_trip_and_non_finite(tmp_path):
    with MetricsWriter(str(tmp_path)) as w:
        w.write(10, {"loss": np.float32(2.5), "lr": 1e-3})
        w.write(20, {"loss": float("nan"), "grad_norm": float("inf")})
        w.write(20, {"loss": 2.0}, split="val")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all("NaN" not in line and "Infinity" not in line for line in lines)  # strict JSON
    rows = [json.loads(line) for line in lines]
    assert rows == read_metrics(str(tmp_path / "metrics.jsonl"))
    assert all(isinstance(r.pop("time"), float) for r in rows)
    assert rows == [{"step": 10, "split": "train", "loss": 2.5, "lr": 1e-3},
                    {"step": 20, "split": "train", "loss": None, "grad_norm": None},
                    {"step": 20, "split": "val", "loss": 2.0}]
    got = tb_scalars(tmp_path)  # TensorBoard keeps the non-finite values as they are
    assert math.isnan(got["train/loss"][1][1]) and got["train/grad_norm"] == [(20, math.inf)]


def test_disabled_writer_writes_nothing(tmp_path):
    out = tmp_path / "run"
    with MetricsWriter(str(out), enabled=False) as w:
        w.write(1, {"loss": 1.0})
    assert not out.exists()


def test_resume_appends_and_starts_a_new_events_file(tmp_path):
    with MetricsWriter(str(tmp_path)) as w:
        w.write(1, {"loss": 3.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "tr')  # killed in the middle of a line
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1]
    with MetricsWriter(str(tmp_path)) as w:
        w.write(2, {"loss": 2.0})
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]
    assert len(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))) == 2
    assert tb_scalars(tmp_path)["train/loss"] == [(1, 3.0), (2, 2.0)]


def test_read_metrics_errors(tmp_path):
    with pytest.raises(GPT2JaxError, match="no metrics file"):
        read_metrics(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(GPT2JaxError, match=r"bad.jsonl:2: not a JSON line"):
        read_metrics(str(bad))


def test_series_keeps_last_record_of_a_step_and_smooths():
    records = [{"step": 1, "split": "train", "loss": 3.0}, {"step": 2, "split": "train", "loss": 9.0},
               {"step": 2, "split": "train", "loss": 2.0}, {"step": 3, "split": "train", "loss": None},
               {"step": 2, "split": "val", "loss": 5.0}]
    steps, values = cli.series(records, "train", "loss")
    assert steps == [1, 2, 3] and values[:2] == [3.0, 2.0] and math.isnan(values[2])
    assert cli.smooth([3.0, 2.0, math.nan], 0.0)[:2] == [3.0, 2.0]
    assert cli.smooth([4.0, 4.0, math.nan], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # debiased: no pull to 0


def run_tool(*args):
    return subprocess.run([sys.executable, TOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_plot_tool_writes_png(tmp_path):
    with MetricsWriter(str(tmp_path)) as w:
        for step in range(1, 41):
            w.write(step, {"loss": 5.0 / step**0.3 + 0.1 * np.sin(step), "lr": min(step, 10) * 1e-4})
            if step % 10 == 0:
                w.write(step, {"loss": 5.0 / step**0.3 + 0.2}, split="val")
    r = run_tool("--run", str(tmp_path))
    assert r.returncode == 0, r.stderr
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_plot_tool_missing_file_is_one_line_error(tmp_path):
    r = run_tool("--run", str(tmp_path / "nowhere"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: no metrics file at ") and r.stderr.count("\n") == 1
    assert not r.stdout
