"""The server's tests: a real uvicorn server over the real engine and a tiny model (serve_fixtures.py); the model
in transformers, the reference."""
import openai
import pytest
import torch
import transformers

from gpt2_jax.serve.server import load_service
from gpt2_jax.tokenizer import load_tokenizer
from serve_fixtures import ServerThread, save_tiny_model


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
