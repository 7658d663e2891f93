"""The README's main job, tools/demo.py, end to end: its export loads in transformers with the same logits."""
import os
import subprocess
import sys

import numpy as np
import torch
import transformers

from gpt2_jax.hf import load_pretrained
from gpt2_jax.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_exports_a_working_model(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\ntitle: ") == 2 and "text: " in res.stdout
    model_dir = tmp_path / "model"
    tok = load_tokenizer(model_dir)
    ids = np.array([tok.format_example("A title", "two words", "Some text about tomatoes.")])
    ref = transformers.GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    assert ref.config.eos_token_id == tok.eos_id and ref.config.vocab_size == len(tok)
    with torch.no_grad():
        want = ref(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(load_pretrained(str(model_dir))(ids)), want, atol=1e-5, rtol=0)
