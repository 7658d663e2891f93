"""The server's tests' helpers and fixtures (tests/conftest.py imports the fixtures, so each is made once a session): a tiny random GPT-2 with a byte-level BPE
tokenizer ([BOS] [SEP] [EOS] [PAD]) saved as a Hugging Face directory; a real uvicorn server in a thread on a free
127.0.0.1 port."""
import socket
import threading
import time

import openai
import pytest
import torch
import transformers
import uvicorn

from gpt2_jax.serve.app import create_app
from gpt2_jax.serve.server import load_service
from gpt2_jax.tokenizer import load_tokenizer, train_bpe

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


class ServerThread:
    """uvicorn serving `service` from a thread (no signal handlers there) on 127.0.0.1:port."""

    def __init__(self, service):
        self.service = service
        self.port = free_port()
        config = uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive()


# --- fixtures: a real uvicorn server over the real engine and a tiny model; the model in transformers, the reference

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """The same model in transformers: the reference for texts and log-probabilities."""
    return transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="session")
def hf_greedy(hf_model, tokenizer):
    """transformers' greedy continuation of token ids, cut before EOS: (tokens, ended by EOS)."""

    def run(ids, max_new_tokens: int) -> tuple[list[int], bool]:
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_id,
                                pad_token_id=tokenizer.pad_id)[0, len(ids):].tolist()
        eos = tokenizer.eos_id in out
        return (out[:out.index(tokenizer.eos_id)] if eos else out), eos

    return run


@pytest.fixture(scope="session")
def client(server):
    """The official OpenAI client pointed at the server."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def server(model_dir):
    """A server of 4 slots and a queue of 64 over the tiny model, shared by the tests (one compile)."""
    with ServerThread(load_service(model_dir, name="tiny", slots=4, max_queue=64)) as s:
        yield s
