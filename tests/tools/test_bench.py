"""tools/bench.py: the matmul floor multiplies exactly the products a train step needs."""
import importlib.util
import math
import os

import pytest

from gpt2_jax.model.config import ModelConfig
from gpt2_jax.train.flops import flops_per_token
from gpt2_jax.model.attention import QUERY_CHUNK

_spec = importlib.util.spec_from_file_location(
    "bench", os.path.join(os.path.dirname(__file__), "..", "tools", "bench.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _gemm_flops(shape, batch, seq):
    return sum(2 * math.prod(b) * m * k * n for b, m, k, n in bench._gemm_shapes(shape, batch, seq))


@pytest.mark.parametrize("name", sorted(bench.TRAIN_SHAPES))
def test_gemm_floor_counts_the_train_step_flops(name):
    """Up to one query block, attention is dense and the floor's FLOPs are 6N + 12LHQT up to the biases
    and LayerNorm parameters (which no matmul touches); past it, the causal blocks skip the masked blocks."""
    shape = bench.TRAIN_SHAPES[name]
    cfg = ModelConfig(**shape)
    d, L = cfg.n_embd, cfg.n_layer
    no_matmul = L * (3 * d + d + 4 * d + d + 4 * d) + 2 * d  # biases and LayerNorm scales/biases, ln_f
    batch, seq = 2, QUERY_CHUNK
    assert _gemm_flops(shape, batch, seq) == batch * seq * (flops_per_token(cfg, seq) - 6 * no_matmul)
    blocks = 4
    seq = blocks * QUERY_CHUNK
    dense_attention = batch * seq * 12 * L * d * seq
    kept = sum(range(1, blocks + 1)) / blocks ** 2  # the lower triangle of query blocks x key blocks
    assert _gemm_flops(shape, batch, seq) == (batch * seq * (flops_per_token(cfg, seq) - 6 * no_matmul)
                                              - dense_attention * (1 - kept))
