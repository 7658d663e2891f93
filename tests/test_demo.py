"""The README's main job, `python train.py --config configs/demo.yaml`, shrunk to seconds: the bundled
corpus builds, a tokenizer trains on it, the loop runs, and the run ends with held-out generations."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_config_runs_end_to_end_on_the_builtin_corpus(tmp_path):
    shrink = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "tokenizer.sentencepiece_vocab_size=600",
              "train.steps=6", "train.eval_every=3", "train.eval_batches=2", "checkpoint.every=3",
              "sample.max_new_tokens=8", f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
                          *shrink], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "unigram baseline loss" in out and "step 3: validation loss" in out
    assert out.count("[held-out] title: ") == 3
    corpus = list((tmp_path / "cache").glob("stdlib-docs-*.jsonl"))
    assert len(corpus) == 1 and corpus[0].stat().st_size > 1_000_000
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "tokenizer", "hf/config.json", "checkpoints/6"):
        assert (run / name).exists(), name
