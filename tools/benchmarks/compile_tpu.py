"""`tools/bench.py compile`: the run's programs compiled for a TPU slice on this machine (gpt2_jax.aot.programs,
libtpu), one JSON line per program: per-chip HBM, FLOPs against the model's, collectives, an estimated step
time. `--shipped`: every shipped TPU config for the slice it is for (`SHIPPED`)."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from gpt2_jax.aot.programs import PROGRAMS, compile_programs
from gpt2_jax.train.config import load_train_config

# The slice each shipped config is for (as its header says), with the settings it is run with there:
# `tools/bench.py compile --shipped` compiles them all.
SHIPPED = {
    "configs/gpt2-tpu-pod.yaml": ("v5e:4x4", ()),  # a v5e-16 (v5litepod-16)
    "configs/gpt2-finetune.yaml": ("v5e:1x1", ("model.dtype=bfloat16",)),  # one v5e chip, bf16 on accelerators
    "configs/gpt2-xl-lora.yaml": ("v5e:1x1", ()),  # GPT-2 XL LoRA on one v5e chip
}


def print_reports(config: Optional[str], overrides: Sequence[str], topology: str,
                  programs: Sequence[str] = PROGRAMS, vocab_size: Optional[int] = None) -> int:
    """One JSON line per program; exit status 1 when one does not fit in HBM (a result, printed as a line
    with "fits": false), else 0."""
    cfg = load_train_config(config, overrides)
    status = 0
    for report in compile_programs(cfg, topology, programs, vocab_size):
        print(json.dumps({"bench": "compile", "config": config, "overrides": list(overrides), **report}), flush=True)
        if report.get("fits") is False:
            status = 1
    return status


def print_shipped(root: str, programs: Sequence[str] = PROGRAMS) -> int:
    """Every shipped config compiled for its slice (`SHIPPED`); exit status 1 when a program does not fit."""
    status = 0
    for config, (topology, overrides) in SHIPPED.items():
        status = max(status, print_reports(os.path.join(root, config), overrides, topology, programs))
    return status
