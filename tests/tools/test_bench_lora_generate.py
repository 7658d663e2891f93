"""tools/bench.py lora-generate: its rows (base, merged, in-loop) and the sizes line, on the tiny preset."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


@pytest.mark.slow
def test_lora_generate_rows(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "lora-generate", "--preset", "tiny",
                           "--batch", "2", "--new-tokens", "4", "--repeats", "1", "--rank", "4",
                           "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "PYTHONPATH": os.path.abspath(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r.get("impl") for r in rows[:3]] == ["base", "merged", "in-loop"]
    assert all(r["batch"] == 2 and r["new_tokens"] == 4 and r["rank"] == 4 and r["steady_s"] > 0 for r in rows[:3])
    assert rows[0]["vs_base"] == 1.0
    sizes = rows[3]
    assert sizes["sizes"] == "tiny" and 0 < sizes["adapter_bytes"] < sizes["merged_safetensors_bytes"]
    assert sizes["merged_export_bytes"] > sizes["merged_safetensors_bytes"]
