"""Serve a GPT-2 over an OpenAI-compatible HTTP API (continuous batching over the engine's slots).

    python tools/serve.py --model RUN_OR_HF_DIR [--adapter DIR] [--slots 8] [--host 127.0.0.1 --port 8000]

Endpoints: POST /v1/completions (OpenAI's completions: prompt as text, texts or token ids; max_tokens,
temperature (0: greedy), top_p, n, stop, seed, stream, echo, logprobs; extensions top_k, repetition_penalty,
min_tokens, and title + keywords (+ keyword_boost), which build this project's [BOS] title [SEP] keywords [SEP]
prompt), GET /v1/models, GET /health. Binds 127.0.0.1 unless --host says otherwise. SIGTERM or Ctrl-C refuses
new requests (503), finishes those in flight, then exits. Logic lives in gpt2_jax.serve.
"""
from __future__ import annotations

import argparse

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.runtime import run_cli

EPILOG = """\
example:
  python tools/serve.py --model runs/demo --slots 16
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "runs/demo", "title": "Foxes", "keywords": "dog forest", "max_tokens": 100}'
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Serve a GPT-2 over an OpenAI-compatible HTTP API.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face model directory or a training run's directory")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory for --model, folded into its weights")
    p.add_argument("--tokenizer", help="tokenizer path (default: the model directory)")
    p.add_argument("--served-model-name", help="the name requests give as 'model' (default: --model as given)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (KV-cache slots; default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get 429 with Retry-After (default 64)")
    p.add_argument("--max-length", type=int, help="prompt + max_tokens at most (default: the model's n_positions)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: float32)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs in ~/.cache/gpt2-jax/xla (kept by default)")
    args = p.parse_args(argv)
    for name in ("slots", "port"):
        if getattr(args, name) < (1 if name == "slots" else 0):
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.max_queue < 0:
        p.error(f"--max-queue must be >= 0, got {args.max_queue}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:  # the `serve` extra
        from gpt2_jax.serve.server import load_service, serve
    except ImportError as e:
        raise GPT2JaxError(f"the server needs the serve extra ({e.name} is missing): pip install "
                           f"'gpt2-jax[serve]'") from None
    if not args.no_compile_cache:
        from gpt2_jax.runtime import enable_compilation_cache
        enable_compilation_cache()
    service = load_service(args.model, adapter=args.adapter, tokenizer=args.tokenizer, name=args.served_model_name,
                           slots=args.slots, max_queue=args.max_queue, dtype=args.dtype, max_length=args.max_length)
    serve(service, host=args.host, port=args.port)


if __name__ == "__main__":
    run_cli(main)
