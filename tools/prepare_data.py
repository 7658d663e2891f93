"""Tokenize a corpus of any size into token shards + index (a prepared data directory), in bounded memory.

    python tools/prepare_data.py --corpus big.jsonl.gz --tokenizer runs/tok --out data/big [--workers 2]

Train on it with ``data.train: DATA_DIR`` and ``tokenizer.path`` = the same tokenizer. Re-running the same
command reuses a finished directory and resumes an interrupted one (finished shards are kept).
"""
from __future__ import annotations

import argparse
import json

from gpt2_jax.data.rows import ROW_FORMATS
from gpt2_jax.runtime import run_cli
from gpt2_jax.data.prepare import DEFAULT_SHARD_TOKENS, prepare_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="CSV, JSONL, text or Parquet file (.gz too)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or SentencePiece .model")
    p.add_argument("--out", required=True, help="the prepared data directory")
    p.add_argument("--format", choices=ROW_FORMATS, help="corpus format (default: from the file extension)")
    p.add_argument("--workers", type=int, default=2, help="tokenizing processes (0: in this process)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="about this many tokens a shard")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows (counted) instead of failing")
    args = p.parse_args()
    summary = prepare_corpus(args.corpus, args.tokenizer, args.out, format=args.format, workers=args.workers,
                             shard_tokens=args.shard_tokens, skip_bad_rows=args.skip_bad_rows)
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
