"""The README's main job, `python train.py --config configs/demo.yaml`, shrunk to seconds: the bundled
corpus builds, a tokenizer trains on it, the loop runs, and the run ends with held-out generations and an
export that transformers 4.57 and 5.x load with our ids and logits."""
import pytest
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import gpt2_jax

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_runs_end_to_end_on_the_builtin_corpus(tmp_path, transformers5_python):
    shrink = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "tokenizer.sentencepiece_vocab_size=600",
              "train.steps=6", "train.eval_every=3", "train.eval_batches=2", "checkpoint.every=3",
              "sample.max_new_tokens=8", f"train.out_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"]
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
                          *shrink], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "unigram baseline loss" in res.stderr and "step 3: validation loss" in res.stdout
    assert res.stderr.count("[held-out] title: ") == 3
    corpus = list((tmp_path / "cache").glob("stdlib-docs-*.jsonl"))
    assert len(corpus) == 1 and corpus[0].stat().st_size > 1_000_000
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "tokenizer", "hf/config.json", "checkpoints/6"):
        assert (run / name).exists(), name

    check_export_in_transformers(run / "hf", tmp_path / "expected.json", [sys.executable, transformers5_python])


def check_export_in_transformers(hf_dir: Path, expected: Path, pythons: list[str]) -> None:
    """tests/hf_export_check.py under each python: AutoTokenizer and AutoModelForCausalLM give our numbers."""
    tok = gpt2_jax.load_tokenizer(hf_dir)
    model = gpt2_jax.load_pretrained(str(hf_dir))
    texts = ["[BOS]json.loads[SEP]json string decode[SEP]", "[BOS] os.path.join [SEP] path join [SEP] Join one "
             "or more path components. [EOS]", "Return the number of items; raise ValueError if it is negative.\n",
             "  spaces  and\ttabs, unicode é and 中文 [PAD][PAD]"]
    prompt = tok.format_prompt("json.loads", "json string decode")
    out = gpt2_jax.generate(model, [prompt], max_new_tokens=12, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    new = [int(t) for t in np.asarray(out)[0, len(prompt):]]
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id) + 1]
    full = np.asarray(model(np.array([prompt + new])))[0, len(prompt) - 1:-1]
    top2 = np.sort(full, axis=-1)[:, -2:]
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    expected.write_text(json.dumps({
        **expected_tokenizer(tok, texts),
        "prompt_ids": prompt, "logits": np.asarray(model(np.array([prompt]))).tolist(),
        "greedy": new, "margins": (top2[:, 1] - top2[:, 0]).tolist(),
        "generation": {k: gen[k] for k in ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty",
                                           "bos_token_id", "eos_token_id", "pad_token_id")}}))
    assert gen["do_sample"] is True and gen["pad_token_id"] == tok.pad_id
    for python in pythons:
        res = subprocess.run([python, str(ROOT / "tests" / "hf_export_check.py"), str(hf_dir), str(expected)],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads(res.stdout.strip().splitlines()[-1])["logits_max_abs_diff"] < 1e-4


def expected_tokenizer(tok, texts: list[str]) -> dict:
    """What tests/hf_export_check.py compares an exported tokenizer against: our ids and decodings."""
    return {"vocab_size": len(tok), "special_ids": tok.special_ids, "join_cjk": getattr(tok, "_join_cjk", False),
            "encodings": [(t, tok.encode(t)) for t in texts],
            "decodings": {str(skip): {t: tok.decode(tok.encode(t), skip_special_tokens=skip) for t in texts}
                          for skip in (True, False)}}
