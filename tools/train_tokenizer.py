"""Train a tokenizer on a corpus's titles, keywords and texts.

    python tools/train_tokenizer.py --corpus data/sample.csv --kind sentencepiece --vocab-size 8000 --out runs/tok
"""
from __future__ import annotations

import argparse
from pathlib import Path

from gpt2_jax.data.rows import ROW_FORMATS, read_rows, row_texts
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.runtime import run_cli
from gpt2_jax.tokenizer import train_bpe, train_sentencepiece


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="CSV, JSONL or text file")
    p.add_argument("--format", choices=ROW_FORMATS, help="corpus format (default: from the file extension)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of failing")
    p.add_argument("--kind", required=True, choices=("sentencepiece", "bpe"),
                   help="sentencepiece: DIR/spm.model; bpe: GPT-2 byte-level BPE as a Hugging Face directory")
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"), help="SentencePiece model type")
    p.add_argument("--vocab-size", required=True, type=int,
                   help="target size; SentencePiece makes it smaller when the corpus is too small")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args()
    # Checked before the corpus is read and the tokenizer trained, which can take a while.
    if args.vocab_size <= 0:
        raise GPT2JaxError(f"--vocab-size must be positive, got {args.vocab_size}")
    out = Path(args.out)
    blocker = next((d for d in (out, *out.parents) if d.exists() and not d.is_dir()), None)
    if blocker is not None:
        raise GPT2JaxError(f"--out {args.out} is a file, not a directory" if blocker == out
                           else f"--out {args.out}: {blocker} is a file, not a directory")

    rows = read_rows(args.corpus, args.format, skip_bad_rows=args.skip_bad_rows)
    texts = row_texts(rows)
    if args.kind == "sentencepiece":
        tok = train_sentencepiece(texts, args.out, args.vocab_size, model_type=args.model_type)
    else:
        tok = train_bpe(texts, args.out, args.vocab_size)
    print(f"wrote {args.out}: {args.kind} tokenizer, {len(tok)} tokens "
          f"(bos {tok.bos_id}, sep {tok.sep_id}, eos {tok.eos_id}, pad {tok.pad_id}), trained on {len(rows)} rows")


if __name__ == "__main__":
    run_cli(main)
