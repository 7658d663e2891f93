"""tools/benchmarks/serve.py (`bench.py serve`): the arrival-driven driver's rows, continuous and static."""
import importlib.util
import os

import numpy as np
import torch
import transformers

from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.sample.engine import Engine

_BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "benchmarks")
_spec = importlib.util.spec_from_file_location("bench_serve", os.path.join(_BENCHMARKS, "serve.py"))
bench_serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_serve)


def test_drive_counts_every_token_in_both_modes(tmp_path):
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1,
                                                         n_head=2)).save_pretrained(tmp_path)
    model = load_pretrained(str(tmp_path))
    lengths = [(3, 4), (7, 2), (5, 6), (2, 1), (9, 3)]
    requests = bench_serve._requests(lengths, 50)
    engine = Engine(model, slots=2, eos_ids=[], pad_id=0, max_length=16)
    gaps = np.full(len(requests), 0.001)
    for static in (False, True):
        row = bench_serve.drive(engine, requests, gaps, static=static)
        assert row["requests"] == 5 and row["new_tokens"] == sum(n for _, n in lengths)
        assert row["tokens_per_s"] > 0 and 0 <= row["ttft_p50_ms"] <= row["ttft_p99_ms"]
        assert 0 < row["per_token_p50_ms"] <= row["per_token_p99_ms"]
        assert not engine.active and not engine.pending
