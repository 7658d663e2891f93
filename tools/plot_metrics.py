"""Plot a run's losses (and learning rate) from its metrics.jsonl into a PNG.

    python tools/plot_metrics.py --run RUN_DIR [--out PNG] [--smoothing 0.9]

Draws train loss with its smoothed curve and validation loss against step (default RUN_DIR/loss.png),
and a learning-rate panel when the run logged `lr`. Records come from gpt2_jax.train.metrics.read_metrics.
"""
from __future__ import annotations

import argparse
import math
import os

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.runtime import run_cli
from gpt2_jax.train.metrics import read_metrics


def series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in `split`, by step; a resumed run's re-logged steps keep their last record."""
    last = {r["step"]: r.get(key) for r in records if r.get("split") == split and key in r}
    steps = sorted(last)
    return steps, [math.nan if last[s] is None else last[s] for s in steps]


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average; NaN values are skipped."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if not math.isnan(v):
            avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight**n) if n else math.nan)
    return out


def plot_metrics(records: list[dict], out_path: str, smoothing: float = 0.9) -> None:
    """Write the loss (and learning-rate) figure of `records` to `out_path` as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train, val, lr = series(records, "train", "loss"), series(records, "val", "loss"), series(records, "train", "lr")
    if not train[0] and not val[0]:
        raise GPT2JaxError("the metrics file has no train or val loss records")
    fig = Figure(figsize=(9, 6.5 if lr[0] else 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if lr[0] else 1, 1, sharex=True, squeeze=False, height_ratios=[2, 1][: 2 if lr[0] else 1])
    ax = axes[0, 0]
    if train[0]:
        ax.plot(*train, color="tab:blue", alpha=0.3, lw=1, label="train")
        ax.plot(train[0], smooth(train[1], smoothing), color="tab:blue", lw=1.5, label=f"train (smoothed {smoothing})")
    if val[0]:
        ax.plot(*val, "o-", color="tab:orange", ms=3, lw=1.5, label="validation")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if lr[0]:
        axes[1, 0].plot(*lr, color="tab:green", lw=1.5)
        axes[1, 0].set_ylabel("learning rate")
        axes[1, 0].grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Plot train/validation loss (and learning rate) of a training run.")
    p.add_argument("--run", required=True, help="the run directory (train.out_dir), holding metrics.jsonl")
    p.add_argument("--out", help="the PNG to write (default: RUN/loss.png)")
    p.add_argument("--smoothing", type=float, default=0.9, help="EMA weight in [0, 1) for train loss (default 0.9)")
    args = p.parse_args(argv)
    if not 0 <= args.smoothing < 1:
        raise GPT2JaxError(f"--smoothing {args.smoothing} is not in [0, 1)")
    out = args.out or os.path.join(args.run, "loss.png")
    plot_metrics(read_metrics(os.path.join(args.run, "metrics.jsonl")), out, args.smoothing)
    print(out)


if __name__ == "__main__":
    run_cli(main)
