"""Generate text from a title and keywords (or plain text) with a GPT-2 model.

    python tools/generate.py --model PATH --title "..." --keywords "k1 k2" [--num-return-sequences 3]
    python tools/generate.py --model PATH --prompt "Once upon a time"
    python tools/generate.py --model PATH          # interactive: title, then keywords, until an empty title
    python tools/generate.py --model PATH --input rows.csv --output out.jsonl [--batch-size 32]
    python tools/generate.py --model BASE --adapter PEFT_DIR --prompt "..."   # a LoRA adapter on its base

Prints only the generated text: no prompt, no special tokens. With --input (CSV or JSONL rows with a title
and keywords), writes one JSON line per row to --output, --batch-size rows decoding at once on the
continuous-batching engine (a finished row's slot takes the next row), and continues an existing output (of the
same settings and input rows; a changed input is refused); then prints the whole output's keyword metrics
(coverage, coverage against another row's keywords, distinct-1/2, repeated 4-grams) on stderr, and a last
stderr line of JSON with the counts and those metrics ("metrics").
--keyword-boost B adds B to the logit of each keyword's next token until the keyword has been written; by
default only where the model already ranks it among its top candidates, paced over the text (--keyword-wait).
The --input summary also says where the keywords stand (first position, share in the first 10% of the text,
longest run in a row; against the input's own texts cut to the same length where it has them) and the model's
perplexity of the texts (with a boost, against unguided texts for the first rows').
Logic lives in gpt2_jax.sample.generate and gpt2_jax.sample.file.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.runtime import run_cli

EPILOG = """\
sampling defaults are those of Hugging Face's GenerationConfig (top-k 50, top-p 1.0, temperature 1.0,
repetition penalty 1.0). The seed project sampled with:
  --top-k 30 --top-p 0.7 --temperature 0.9 --repetition-penalty 2.0 --min-new-tokens 50 --num-return-sequences 10
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate text with a GPT-2 model (sampling unless --greedy).",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a Hugging Face model directory or a training run's directory")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory (adapter_config.json, "
                   "adapter_model.safetensors) for --model: merged into its weights once, so sampling runs at "
                   "the base's speed")
    p.add_argument("--tokenizer", help="tokenizer path (default: the model directory)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--title", help="the title to write about (with --keywords)")
    src.add_argument("--prompt", help="plain text to continue, instead of a title and keywords")
    src.add_argument("--input", help="a CSV (title,keywords[,text]) or JSONL file of rows to write texts for")
    p.add_argument("--output", help="with --input: the JSONL file to write (continued if it exists)")
    p.add_argument("--batch-size", type=int, default=32, help="with --input: rows decoding at once, the engine's slots (default 32)")
    p.add_argument("--keywords", default="", help='space-separated keywords, e.g. "k1 k2" (with --title)')
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="EOS is not allowed before this many (default 0)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens; 0: off (default 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1: off (default 1.0)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; below 1 is more conservative (default 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages tokens already written (default 1.0: off)")
    p.add_argument("--penalize-prompt", action="store_true",
                   help="the repetition penalty also counts the prompt's tokens, as HF generate does by default "
                        "(off by default: it would penalise the very keywords the text should use)")
    p.add_argument("--keyword-boost", type=float, default=0.0,
                   help="added to the logit of each keyword's next token until the keyword is written "
                        "(2-5 nudges, 100 forces every keyword in; default 0: off)")
    p.add_argument("--keyword-wait", action=argparse.BooleanOptionalAction, default=True,
                   help="with --keyword-boost: a keyword starts only where the model already ranks it among its "
                        "top candidates, paced over the text, and the text does not end before its keywords "
                        "(default on; --no-keyword-wait boosts every keyword from the first token on)")
    p.add_argument("--num-return-sequences", type=int, default=1, help="samples per prompt (default 1)")
    p.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed on stderr)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="compute dtype (default: float32)")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled programs in ~/.cache/gpt2-jax/xla (kept by default: later runs "
                        "skip most of the compile time)")
    args = p.parse_args(argv)
    if args.keywords and args.title is None:
        p.error("--keywords needs --title")
    if (args.input is None) != (args.output is None):
        p.error("--input and --output go together")
    if args.input is not None and args.num_return_sequences != 1:
        p.error("--input writes one text per row: --num-return-sequences must be 1")
    if args.keyword_boost and args.prompt is not None:
        p.error("--keyword-boost needs keywords: use it with --title/--keywords, --input or interactively")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.no_compile_cache:
        from gpt2_jax.runtime import enable_compilation_cache
        enable_compilation_cache()
    from gpt2_jax.sample.file import check_file_run, generate_file
    from gpt2_jax.checkpoints.pretrained import load_pretrained
    from gpt2_jax.sample.generate import check_sampling, generate_text
    from gpt2_jax.tokenizer import load_tokenizer

    seed = args.seed
    if seed is None and args.input is not None:
        seed = 0  # a file's run is reproducible and resumable by default
    kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                  do_sample=not args.greedy, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                  repetition_penalty=args.repetition_penalty, num_return_sequences=args.num_return_sequences,
                  keyword_boost=args.keyword_boost, keyword_wait=bool(args.keyword_boost and args.keyword_wait),
                  penalize_prompt=args.penalize_prompt)
    # Every setting is checked before the model loads (and, with --input, before a file is written).
    if args.input is not None:
        check_file_run(args.input, args.output, batch_size=args.batch_size, seed=seed, **kwargs)
    else:
        check_sampling(seed=0 if seed is None else seed, **kwargs)

    model = load_pretrained(args.model, adapter=args.adapter, dtype=args.dtype)
    tok = load_tokenizer(args.tokenizer or args.model)
    if seed is None:
        seed = secrets.randbelow(2**31)
        print(f"seed: {seed}", file=sys.stderr)
    vocab = model.config.vocab_size
    # A stock GPT-2 with our tokenizer: the added special tokens lie past its vocabulary, so EOS is the model's.
    eos = tok.eos_id if tok.eos_id < vocab else model.config.eos_token_id
    kwargs.update(eos_token_id=eos, pad_token_id=tok.pad_id if tok.pad_id < vocab else eos)

    def titled(title: str, keywords: str) -> list[int]:
        if tok.bos_id >= vocab or tok.sep_id >= vocab:
            raise GPT2JaxError(f"the tokenizer's [BOS]/[SEP] ids ({tok.bos_id}, {tok.sep_id}) are outside the "
                               f"model's vocabulary ({vocab}): --title needs a model trained with them; "
                               f"use --prompt for plain text")
        return tok.format_prompt(title, keywords)

    def show(prompt_ids: list[int], call: int, keywords: str = "") -> None:
        texts = generate_text(model, tok, [prompt_ids], seed=seed + call, keywords=[keywords.split()], **kwargs)
        for i, text in enumerate(texts):
            print(text if len(texts) == 1 else f"[{i + 1}] {text}", flush=True)

    if args.input is not None:
        titled("", "")  # the model must know [BOS] and [SEP]
        del kwargs["num_return_sequences"], kwargs["max_new_tokens"]
        stats = generate_file(model, tok, args.input, args.output, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, seed=seed, **kwargs)
        print(json.dumps(stats), file=sys.stderr)
    elif args.prompt is not None:
        show(tok.encode(args.prompt), 0)
    elif args.title is not None:
        show(titled(args.title, args.keywords), 0, args.keywords)
    else:
        call = 0
        while True:
            try:
                title = input("title: ").strip()
                if not title:
                    break
                keywords = input("keywords: ").strip()
            except EOFError:
                break
            try:
                show(titled(title, keywords), call, keywords)
            except GPT2JaxError as e:  # a bad prompt ends one round, not the session
                print(f"error: {e}", file=sys.stderr)
            call += 1


if __name__ == "__main__":
    run_cli(main)
