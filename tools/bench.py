"""Benchmarks that print one JSON object per measurement; `tools/bench.py SUBCOMMAND --help` says what each
measures and its fields.

    python tools/bench.py generate [--preset tiny gpt2] [--batch 1 8] [--impl jax torch flax]
    python tools/bench.py train [--shapes tiny,gpt2] [--batch 4] [--seq 128] [--steps 5] [--dtype float32]
                                [--impls jax,jax-last6,jax-head,flax,gemm] [--interleave]
    python tools/bench.py lora-generate [--preset gpt2] [--batch 1 8] [--rank 8]
    python tools/bench.py generate-file [--model runs/demo] [--input data/sample.csv] [--batch-sizes 1 32]
    python tools/bench.py serve [--models demo gpt2] [--slots 1 4 16 64] [--rates 2 8 32] [--requests 48]
    python tools/bench.py compile --topology v5e:4x4 [--config configs/X.yaml] [section.key=value ...]
    python tools/bench.py compile --shipped
    python tools/bench.py attention [--topology v5e:2x2] [--seq-lens 1024,2048]
    python tools/bench.py padding [--tokenizer DIR]
    python tools/bench.py keywords --run RUN_DIR [--long]
    python tools/bench.py data --prepare [--size-mb 1024]     (a one-off comparison: tools/experiments/)
    python tools/bench.py grain                              (a one-off comparison: tools/experiments/)

Each benchmark is a module of tools/benchmarks/ (tools/experiments/ for data and grain), imported when its
subcommand runs, so that its dependencies (JAX, PyTorch, libtpu, grain) load only then, and after compile and
attention have started JAX on the CPU (compile-only TPU devices need no TPU backend).
"""
from __future__ import annotations

import argparse
import os
import sys

from benchmarks import generate, lora_generate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _names(known):
    """argparse type: comma-separated names from `known` (`--shapes tiny,gpt2`)."""

    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        for n in names:
            if n not in known:
                raise argparse.ArgumentTypeError(f"unknown {n!r}; known: {', '.join(known)}")
        return names

    return parse


def _add_generate(sub) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    g = sub.add_parser("generate", help="sampling speed against transformers (PyTorch and jitted Flax)",
                       description=generate.__doc__, formatter_class=raw)
    g.add_argument("--preset", nargs="+", default=["tiny", "gpt2"], choices=sorted(generate.PRESETS))
    g.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    g.add_argument("--impl", nargs="+", default=["jax", "torch", "flax"], choices=list(generate.IMPLS),
                   help="jax-warm: gpt2-jax in a second process over the persistent compilation cache that "
                        "tools/generate.py uses (compile_s is then what a repeated CLI run pays)")
    g.add_argument("--prompt", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--cache-dir", help="where the random weights are written (default: a temporary directory)")
    g.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--compile-cache", help=argparse.SUPPRESS)
    g.add_argument("--weights", help=argparse.SUPPRESS)
    f = sub.add_parser("generate-file", help="tools/generate.py --input's tokens/s at several batch sizes")
    f.add_argument("--model", default="runs/demo", help="a model or run directory (default: the demo's)")
    f.add_argument("--input", default="data/sample.csv", help="rows to write texts for")
    f.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    f.add_argument("--max-new-tokens", type=int, default=60)
    f.add_argument("--min-new-tokens", type=int, default=0,
                   help="EOS blocked before this many (= --max-new-tokens: every row decodes the same length)")
    f.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up one")
    f.add_argument("--paths", nargs="+", default=["engine", "batched"], choices=["engine", "batched"],
                   help="engine: generate_file (slots refilled); batched: the path before the engine (each "
                        "batch decoded until its longest row ends), for comparison")
    lg = sub.add_parser("lora-generate", help="sampling with a LoRA adapter merged once against applied in the "
                                              "loop, and the base alone; the adapter's size against the merged "
                                              "export", description=lora_generate.__doc__, formatter_class=raw)
    lg.add_argument("--preset", default="gpt2", choices=sorted(generate.PRESETS))
    lg.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    lg.add_argument("--rank", type=int, default=8)
    lg.add_argument("--prompt", type=int, default=32)
    lg.add_argument("--new-tokens", type=int, default=64)
    lg.add_argument("--repeats", type=int, default=3)
    lg.add_argument("--cache-dir", help="where the random weights are written (default: a temporary directory)")
    s = sub.add_parser("serve", help="the continuous-batching engine under Poisson arrivals: continuous against "
                                     "static batches and transformers, by slot count")
    s.add_argument("--models", nargs="+", default=["demo"], choices=["demo", "gpt2"])
    s.add_argument("--slots", nargs="+", type=int, default=[1, 4, 16, 64])
    s.add_argument("--rates", nargs="+", type=float, default=[2.0, 8.0, 32.0], help="arrivals per second")
    s.add_argument("--requests", type=int, default=48, help="requests per run (held-out rows' lengths)")
    s.add_argument("--max-new", type=int, default=1024,
                   help="new tokens per request at most (also capped by the context: n_positions - prompt)")
    s.add_argument("--modes", nargs="+", default=["continuous", "static", "transformers"],
                   choices=["continuous", "static", "transformers", "decode"])
    s.add_argument("--tokenizer", default="runs/demo/tokenizer", help="the tokenizer that measures the rows")
    s.add_argument("--steps-per-call", nargs="+", type=int, default=[1],
                   help="decode steps per host round trip (the first for the arrival runs; all for --modes decode)")


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train-step speed and MFU against transformers' Flax GPT-2",
                       description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--shapes", nargs="+", type=_names(train.TRAIN_SHAPES), default=[list(train.TRAIN_SHAPES)])
    t.add_argument("--impls", nargs="+", type=_names(train.TRAIN_IMPLS), default=[list(train.TRAIN_IMPLS)],
                   help="jax: all parameters train; jax-last6: the top half of the blocks (6 of 12); "
                        "jax-head: the tied head; jax-lora: LoRA r=8 over the frozen model; "
                        "flax: transformers' FlaxGPT2LMHeadModel; gemm: the step's matmuls alone")
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--seq", type=int, default=128)
    t.add_argument("--steps", type=int, default=5, help="timed steps after the first (compiling) one")
    t.add_argument("--interleave", action="store_true",
                   help="run the impls of a shape in one process, a step of each in turn (each impl once; "
                        "all of them in memory together), rather than each in a process of its own")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    t.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


def _add_tpu(sub) -> None:
    c = sub.add_parser("compile", help="the run's programs compiled for a TPU slice on this machine (libtpu): "
                                       "per-chip HBM, FLOPs against the model's, collectives, estimated step time")
    c.add_argument("--topology", help="a TPU slice, e.g. v5e:4x4, v5p:2x2x2, v6e:2x2")
    c.add_argument("--shipped", action="store_true", help="every shipped TPU config for the slice it names")
    c.add_argument("--config", help="a YAML file in configs/ (default: every key's default)")
    c.add_argument("overrides", nargs="*", metavar="section.key=value")
    c.add_argument("--programs", default="train,eval,generate", help="comma-separated: train, eval, generate")
    c.add_argument("--vocab-size", type=int, help="instead of len(tokenizer) (default: read from the run's tokenizer; "
                                                  "GPT-2's 50257 + 4 special tokens when its path is not here)")
    a = sub.add_parser("attention", help="one attention layer's forward + backward compiled for a TPU slice: "
                                         "XLA's attention against the Pallas splash and flash kernels")
    a.add_argument("--topology", default="v5e:2x2")
    a.add_argument("--seq-lens", default="1024,2048")


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="corpus preparation (tools/prepare_data.py) against a nanoGPT-style prepare")
    d.add_argument("--prepare", action="store_true", required=True, help="time preparing a plain-text corpus")
    d.add_argument("--size-mb", type=int, default=1024, help="corpus size, built once from local Python sources")
    d.add_argument("--workers", type=int, default=2)
    pad = sub.add_parser("padding", help="padding and truncated shares before and after packing (data.batches)")
    pad.add_argument("--tokenizer", default="runs/demo/tokenizer",
                     help="a tokenizer directory; missing: the demo's SentencePiece is trained on the corpus")
    gr = sub.add_parser("grain", help="Grain's loader (pip install grain) against data.Batches: speed, padding, resume")
    gr.add_argument("--demo-corpus", help="a tokenized demo corpus directory (default: tokenized here, cached)")
    gr.add_argument("--pod-docs", type=int, default=200_000)
    gr.add_argument("--quick", action="store_true")
    gr.add_argument("--setups", default="demo,pod", help="demo, pod or both (comma-separated)")
    kw = sub.add_parser("keywords", help="a trained run's keyword coverage with and without guidance, and how "
                                         "much it copies from its prompt (teacher-forced)")
    kw.add_argument("--run", default="runs/demo", help="a training run's directory")
    kw.add_argument("--long", action="store_true", help="the held-out rows with long texts (100+ tokens), written "
                                                        "with what the context leaves")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    for add in (_add_generate, _add_train, _add_tpu, _add_data):
        add(sub)
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.bench == "generate":
        (generate.child if args.child else generate.bench)(args)
    elif args.bench == "generate-file":
        from benchmarks.generate_file import bench
        bench(args.model, args.input, args.batch_sizes, args.max_new_tokens, args.min_new_tokens, args.rounds,
              args.paths)
    elif args.bench == "lora-generate":
        lora_generate.bench(args)
    elif args.bench == "serve":
        from benchmarks.serve import bench
        bench(args.models, args.slots, args.rates, args.requests, args.max_new, args.modes, args.tokenizer,
              args.steps_per_call)
    elif args.bench == "train":
        args.shapes, args.impls = sum(args.shapes, []), sum(args.impls, [])  # --shapes tiny,gpt2 or tiny gpt2
        longest = min(train.TRAIN_SHAPES[s]["n_positions"] for s in args.shapes)
        if not 1 <= args.seq <= longest:
            p.error(f"--seq must be between 1 and {longest} (n_positions)")
        (train.child if args.child else train.bench)(args)
    elif args.bench == "compile":
        if not (args.shipped or args.topology):
            p.error("compile needs --topology (or --shipped)")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from gpt2_jax.runtime import run_cli
        from benchmarks.compile_tpu import print_reports, print_shipped
        programs = [n for n in args.programs.split(",") if n]
        if args.shipped:
            run_cli(lambda: sys.exit(print_shipped(ROOT, programs)))
        run_cli(lambda: sys.exit(print_reports(args.config, args.overrides, args.topology, programs,
                                               args.vocab_size)))
    elif args.bench == "attention":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from benchmarks.attention import bench
        bench(args.topology, tuple(int(t) for t in args.seq_lens.split(",")))
    elif args.bench == "padding":
        from benchmarks.padding import bench
        bench(args.tokenizer)
    elif args.bench == "keywords":
        from benchmarks.keywords import bench
        bench(args.run, long=args.long)
    elif args.bench == "data":
        from experiments.prepare_vs_nanogpt import bench
        bench(args.size_mb, args.workers)
    elif args.bench == "grain":
        from experiments.grain_vs_batches import bench  # exits 2 without grain
        bench(args.demo_corpus, args.pod_docs, args.quick, args.setups)


if __name__ == "__main__":
    main()
