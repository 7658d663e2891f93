"""The end-to-end demonstration on the bundled corpus, until training lands.

Trains a SentencePiece tokenizer with [BOS] [SEP] [EOS] [PAD] on data/sample.csv, builds a small random
GPT-2 sized for it, exports both as a Hugging Face directory, reloads that directory and samples text
for a title and keywords from it (random weights: the text is noise, the pipeline is real).

    python tools/demo.py [--corpus data/sample.csv] [--out runs/demo]
"""
import argparse
import os

from gpt2_jax import load_pretrained, load_tokenizer, save_pretrained
from gpt2_jax.config import ModelConfig
from gpt2_jax.data import read_rows
from gpt2_jax.errors import run_cli
from gpt2_jax.model import GPT2LMHeadModel
from gpt2_jax.sampling import generate_text
from gpt2_jax.tokenizer import train_sentencepiece


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=os.path.join(os.path.dirname(__file__), "..", "data", "sample.csv"))
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--vocab-size", type=int, default=2000)
    args = p.parse_args()

    rows = read_rows(args.corpus)
    texts = [s for r in rows for s in (r.title, " ".join(r.keywords), r.text) if s]
    tok_dir = os.path.join(args.out, "tokenizer")
    train_sentencepiece(texts, tok_dir, args.vocab_size)
    tok = load_tokenizer(tok_dir)
    print(f"tokenizer: {len(tok)} tokens, [BOS]={tok.bos_id} [SEP]={tok.sep_id} [EOS]={tok.eos_id} [PAD]={tok.pad_id}")

    config = ModelConfig(vocab_size=len(tok), n_positions=256, n_embd=128, n_layer=4, n_head=4,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model_dir = save_pretrained(GPT2LMHeadModel(config), os.path.join(args.out, "model"), tokenizer=tok)
    print(f"exported a {config.n_layer}-layer GPT-2 to {model_dir}")

    model, tok = load_pretrained(model_dir), load_tokenizer(model_dir)
    prompts = [tok.format_prompt(r.title, r.keywords) for r in rows[:2]]
    # The seed project's sampling settings.
    texts = generate_text(model, tok, prompts, max_new_tokens=40, do_sample=True, top_k=30, top_p=0.7,
                          temperature=0.9, repetition_penalty=2.0, seed=0)
    for r, text in zip(rows[:2], texts):
        print(f"\ntitle: {r.title}\nkeywords: {' '.join(r.keywords)}\ntext: {text}")


if __name__ == "__main__":
    run_cli(main)
