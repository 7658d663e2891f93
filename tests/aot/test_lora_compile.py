"""configs/gpt2-xl-lora.yaml: GPT-2 XL LoRA fine-tuning compiled by XLA:TPU for one v5e chip (libtpu, ahead of
time on this CPU machine) fits with at least 20% of HBM to spare; the full fine-tune does not."""
import os

import pytest

from gpt2_jax.aot import programs
from gpt2_jax.train.config import load_train_config

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install -e ".[tpu]"); CI installs it')

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "gpt2-xl-lora.yaml")


@pytest.mark.slow
def test_gpt2_xl_lora_train_step_fits_one_v5e_chip_with_headroom():
    cfg = load_train_config(CONFIG)
    (r,) = programs.compile_programs(cfg, "v5e:1x1", ["train"])
    assert r["mesh"] == {"data": 1, "fsdp": 1} and r["vocab_size"] == 50257 + 4
    assert r["fits"] and r["hbm_share"] <= 0.8, r["hbm_bytes"]
    # The state on the chip: the bf16 base (3.1 GB), float32 adapters and their Adam moments, no base moments.
    assert 3.0e9 < r["hbm_bytes"]["argument"] < 3.6e9
