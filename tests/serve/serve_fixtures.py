"""Helpers of the server's tests, shared with tests/tools/test_serve.py: a tiny random GPT-2 with a byte-level BPE
tokenizer ([BOS] [SEP] [EOS] [PAD]) saved as a Hugging Face directory; a free port on 127.0.0.1."""
import socket

import torch
import transformers

from gpt2_jax.tokenizer import train_bpe

CORPUS = ["the quick brown fox jumps over the lazy dog", "a title about foxes and dogs", "keywords make prompts",
          "sampling from a language model", "jax compiles one loop", "ünïcödé wörds and 漢字 too"] * 20
N_POSITIONS = 256


def save_tiny_model(path, n_positions: int = N_POSITIONS) -> str:
    tok = train_bpe(CORPUS, path, vocab_size=300)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.4, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
