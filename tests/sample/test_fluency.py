"""gpt2_jax/sample/fluency.py: the jitted teacher-forced scoring equals transformers' log-likelihood of the same
tokens, row by row, and reuses its compiled program."""
import math

import numpy as np
import pytest
import torch

from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sample import fluency
from conftest import make_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    ref = make_hf_model(seed=3)
    path = tmp_path_factory.mktemp("fluency") / "hf"
    ref.save_pretrained(path)
    return ref, load_pretrained(str(path))


def torch_log_likelihood(ref, prompt, text):
    ids = torch.tensor([list(prompt) + list(text)])
    with torch.no_grad():
        logp = torch.log_softmax(ref(ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(prompt) + i - 1, t]) for i, t in enumerate(text))


def test_scores_equal_transformers(models):
    ref, ours = models
    rng = np.random.default_rng(0)
    # Rows of several lengths (more than one pass of BATCH rows, several length buckets), an empty text too.
    shapes = [(int(rng.integers(1, 12)), int(rng.integers(0, 30))) for _ in range(fluency.BATCH + 3)]
    prompts = [rng.integers(0, 97, p).tolist() for p, _ in shapes]
    texts = [rng.integers(0, 97, t).tolist() for _, t in shapes]
    ll, count = fluency.token_log_likelihoods(ours, prompts, texts)
    want = np.array([torch_log_likelihood(ref, p, t) for p, t in zip(prompts, texts)])
    assert count.tolist() == [len(t) for t in texts]
    np.testing.assert_allclose(ll, want, rtol=1e-4, atol=1e-3)
    assert fluency.perplexity(ours, prompts, texts) == pytest.approx(math.exp(-want.sum() / count.sum()), rel=1e-4)


def test_no_recompile_for_new_rows(models):
    _, ours = models
    fluency.token_log_likelihoods(ours, [[1, 2]], [[3, 4, 5]])
    before = fluency.score_program._cache_size()
    fluency.token_log_likelihoods(ours, [[7, 8, 9], [1]], [[3] * 10, [4, 5]])  # same length bucket, other rows
    assert fluency.score_program._cache_size() == before


def test_bad_input(models):
    _, ours = models
    with pytest.raises(GPT2JaxError, match="2 prompts but 1 texts"):
        fluency.token_log_likelihoods(ours, [[1], [2]], [[3]])
    with pytest.raises(GPT2JaxError, match="row 0: an empty prompt"):
        fluency.token_log_likelihoods(ours, [[]], [[3]])
    with pytest.raises(GPT2JaxError, match="exceed the model's context"):
        fluency.token_log_likelihoods(ours, [[1] * 40], [[3] * 20])
    assert fluency.perplexity(ours, [[1]], [[]]) is None
