"""What one compiled program needs on a TPU chip: per-chip HBM, XLA's FLOPs against the model's, the
collectives of its optimised HLO, a step-time estimate (labelled as one), and the SPMD partitioner's
involuntary rematerialisations, which libtpu only logs (so its stderr is captured below Python)."""
from __future__ import annotations

import os
import re
import time
from typing import Optional, Sequence

import jax

from gpt2_jax.aot.hlo import collectives
from gpt2_jax.aot.slices import GiB, Chip, captured_stderr
from gpt2_jax.errors import first_line

REMAT_MARK = "involuntary full rematerialization"


def remat_lines(lines: Sequence[str]) -> list[str]:
    """The partitioner's involuntary-rematerialization warnings among log lines (libtpu's own
    initialisation errors and everything else filtered out)."""
    return [line.strip() for line in lines if REMAT_MARK in line.lower()]


# --- one program ------------------------------------------------------------------------------------

def exhausted_bytes(message: str) -> Optional[int]:
    """The bytes that XLA:TPU's RESOURCE_EXHAUSTED message says the program needs: "the total memory
    required for HLO temporaries (20.00G) exceeds available HBM (15.75G)" or "Used 20.5G of 15.75G hbm"."""
    m = (re.search(r"required[^(]*\(([0-9.]+)([KMGT]?)i?B?\)", message)
         or re.search(r"Used\s+([0-9.]+)([KMGT]?)i?B?\s+of", message))
    if not m:
        return None
    return int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2)])


def compile_report(jitted, args: tuple, *, chip: Chip, chips: int, model_flops_per_chip: Optional[float],
                   tokens_per_chip: float) -> dict:
    """Lower `jitted` with `args` (ShapeDtypeStructs), compile it for the TPU devices their shardings name,
    and return the figures of the module docstring as one flat dict."""
    lowered = jitted.lower(*args)
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a cache hit would log nothing and take no time
    t0 = time.perf_counter()
    try:
        with captured_stderr() as log:
            compiled = lowered.compile()
    except Exception as e:  # XLA raises JaxRuntimeError; only RESOURCE_EXHAUSTED is a result
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        needed = exhausted_bytes(str(e))
        return {"fits": False, "needed_bytes": needed, "hbm_share": needed and round(needed / chip.hbm_bytes, 3),
                "error": first_line(e)[:500]}
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)
    seconds = time.perf_counter() - t0
    remats = remat_lines(log)

    mem = compiled.memory_analysis()
    hbm = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
           ("argument", "output", "temp", "alias", "generated_code")}
    # Donated arguments alias outputs: count those bytes once.
    hbm["total"] = hbm["argument"] + hbm["output"] - hbm["alias"] + hbm["temp"] + hbm["generated_code"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float(cost.get("flops", 0.0))
    bytes_accessed = float(cost.get("bytes accessed", 0.0))
    optimal = float(cost.get("optimal_seconds", -1.0))
    if optimal > 0:
        estimate, step_s = "cost_model", optimal
    else:
        # XLA counts a loop body once and a Pallas kernel not at all, so the model's FLOPs are the floor of
        # the compute term; the bytes are XLA's (too low with loops). No overlap loss, no collectives: this
        # is a lower bound on the step time, an upper bound on MFU.
        compute = max(xla_flops, model_flops_per_chip or 0.0)
        estimate, step_s = "roofline", max(compute / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth)
    hlo = collectives(compiled.as_text())
    report = {
        "fits": hbm["total"] <= chip.hbm_bytes,
        "hbm_bytes": hbm,
        "hbm_gib": round(hbm["total"] / GiB, 3),
        "hbm_share": round(hbm["total"] / chip.hbm_bytes, 3),
        "compile_s": round(seconds, 2),
        "xla_flops_per_chip": xla_flops,
        "model_flops_per_chip": model_flops_per_chip,
        "flops_ratio": (round(xla_flops / model_flops_per_chip, 3) if model_flops_per_chip else None),
        "bytes_accessed_per_chip": bytes_accessed,
        **hlo,
        # XLA's cost analysis counts a while loop's body once (measured: grad_accum 2 reports half the
        # FLOPs of grad_accum 1), so with loops present its FLOPs and the estimate below are too low.
        "xla_cost_counts_loop_bodies_once": bool(hlo["while_loops"]),
        "cost_model_seconds": cost.get("optimal_seconds"),  # used when positive
        "estimate": estimate,
        "step_s": step_s,
        "tokens_per_s_per_chip": round(tokens_per_chip / step_s, 1) if step_s > 0 else None,
        "mfu": (round(model_flops_per_chip / (step_s * chip.peak_flops), 4)
                if step_s > 0 and model_flops_per_chip else None),
        "involuntary_remat": len(remats),
        "first_remat": remats[0][:1000] if remats else None,
    }
    return report


