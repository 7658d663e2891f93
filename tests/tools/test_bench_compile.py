"""tools/bench.py compile (tools/benchmarks/compile_tpu.py): the shipped TPU configs, and a bad topology's error."""
import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from gpt2_jax.train.config import load_train_config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
_spec = importlib.util.spec_from_file_location(
    "compile_tpu", os.path.join(ROOT, "tools", "benchmarks", "compile_tpu.py"))
compile_tpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compile_tpu)


def test_every_shipped_config_names_its_slice():
    """`tools/bench.py compile --shipped` covers each config in configs/ that runs on TPU."""
    shipped = set(compile_tpu.SHIPPED)
    configs = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert shipped == configs - {"configs/demo.yaml"}
    for config, (topology, overrides) in compile_tpu.SHIPPED.items():
        load_train_config(os.path.join(ROOT, config), overrides)  # valid as run there
        assert topology.startswith("v5e:")


@pytest.mark.slow
def test_cli_prints_one_line_for_an_unknown_topology():
    pytest.importorskip("libtpu", reason='libtpu is not installed (pip install -e ".[tpu]"); CI installs it')
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "compile", "--topology",
                           "v9x:2x2"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert errors == [errors[0]] and "unknown TPU topology 'v9x:2x2'" in errors[0]
    assert proc.stdout == ""
