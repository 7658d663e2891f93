"""Generation against transformers: greedy decoding, the cached loop against full forward passes, seeds,
compilation counts, sharded parameters and input errors. Tiny random models on CPU (the processors
themselves: test_processors.py)."""
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gpt2_jax.sample import generate as sampling
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.sample.generate import SamplingParams, bucket_length, generate, generate_text
from gpt2_jax.sharding import make_mesh, named_shardings

V = 300  # above the first candidate cap (64), so generate's fast path and its fallbacks both run
N_POSITIONS = 64
CFG_EOS = 299


def make_hf_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    """A random GPT-2 whose greedy continuations vary: a large init gives sharp attention, logits of
    order 1-10 and no near-ties, so float32 rounding cannot flip an argmax."""
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=N_POSITIONS, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.4, bos_token_id=CFG_EOS, eos_token_id=CFG_EOS,
                                  attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, our model loaded from its saved directory)."""
    ref = make_hf_gpt2()
    path = tmp_path_factory.mktemp("sampling") / "hf"
    ref.save_pretrained(path)
    return ref, load_pretrained(str(path))


def left_padded(lengths, pad, seed=0):
    rng = np.random.default_rng(seed)
    P = max(lengths)
    ids = np.full((len(lengths), P), pad, np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = rng.integers(0, V - 1, n)
        mask[b, P - n:] = 1
    return ids, mask


def hf_generate(ref, ids, mask, **kw):
    with torch.no_grad():
        return ref.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), **kw).numpy()


# --- generate against transformers ---------------------------------------------------------------------------

LENGTHS = [9, 4, 13]


@pytest.mark.slow
def test_greedy_equals_transformers(models, attention_path):
    """Left-padded prompts of unequal length: token for token HF's greedy generate, EOS handling included."""
    ref, model = models
    ids, mask = left_padded(LENGTHS, pad=0)
    P, N = ids.shape[1], 20
    free = generate(model, ids, mask, max_new_tokens=N)
    eos = int(free[1, P + 3])  # row 1 stops after 4 tokens; the others when (if) they meet this token
    cases = [
        dict(eos_token_id=eos, pad_token_id=0),
        dict(eos_token_id=eos, pad_token_id=0, min_new_tokens=6),
        dict(eos_token_id=[eos, int(free[0, P + 5])], pad_token_id=0, repetition_penalty=1.3),
        dict(eos_token_id=eos, pad_token_id=eos, repetition_penalty=1.8, pad_prompt=True),  # pad == eos, penalised
    ]
    finished_early = 0
    for kw in cases:
        p_ids = np.where(mask == 1, ids, eos) if kw.pop("pad_prompt", False) else ids
        got = generate(model, p_ids, mask, max_new_tokens=N, **kw)
        want = hf_generate(ref, p_ids, mask, max_new_tokens=N, do_sample=False, **kw)
        assert got.shape == (3, P + N)
        np.testing.assert_array_equal(got[:, :want.shape[1]], want, err_msg=str(kw))
        np.testing.assert_array_equal(got[:, want.shape[1]:], kw["pad_token_id"])
        finished_early += int((got[:, P:] == kw["pad_token_id"]).any())
    assert finished_early >= 2  # EOS and padding really happened
    # Lists of unequal length are left-padded with pad_token_id: the same as the padded array.
    lists = [r[m == 1].tolist() for r, m in zip(ids, mask)]
    np.testing.assert_array_equal(generate(model, lists, max_new_tokens=N, eos_token_id=eos, pad_token_id=0),
                                  generate(model, ids, mask, max_new_tokens=N, eos_token_id=eos, pad_token_id=0))


def test_penalize_prompt_off_equals_prompt_ignore_length(models):
    """penalize_prompt=False is HF's RepetitionPenaltyLogitsProcessor(prompt_ignore_length=P): only new tokens
    are penalised. Checked greedy and sampled, and that it differs from the default (the prompt penalised)."""
    ref, model = models
    ids, mask = left_padded(LENGTHS, pad=0, seed=2)
    P, N, penalty = ids.shape[1], 16, 3.0
    proc = transformers.LogitsProcessorList(
        [transformers.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=P)])
    got = generate(model, ids, mask, max_new_tokens=N, repetition_penalty=penalty, penalize_prompt=False,
                   eos_token_id=[], pad_token_id=0)
    want = hf_generate(ref, ids, mask, max_new_tokens=N, do_sample=False, logits_processor=proc,
                       eos_token_id=None, pad_token_id=0)
    np.testing.assert_array_equal(got, want)
    default = generate(model, ids, mask, max_new_tokens=N, repetition_penalty=penalty, eos_token_id=[],
                       pad_token_id=0)
    assert (default != got).any()  # the prompt's tokens really were penalised by default
    assert np.isin(got[:, P:], ids[mask == 1]).any()  # and are written again without it


def test_attention_mask_inferred_from_padding(models):
    """No attention_mask, pad set and not EOS: padding is masked out, as HF infers it."""
    ref, model = models
    ids, mask = left_padded([6, 2], pad=3, seed=5)
    kw = dict(max_new_tokens=8, eos_token_id=CFG_EOS, pad_token_id=3)
    got = generate(model, ids, **kw)
    np.testing.assert_array_equal(got, generate(model, ids, mask, **kw))
    with torch.no_grad():
        want = ref.generate(torch.as_tensor(ids), do_sample=False, **kw).numpy()
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)
    with pytest.raises(GPT2JaxError, match="inferred from pad_token_id=3"):
        generate(model, np.array([[5, 3, 3]]), **kw)  # right padding


def test_config_eos_and_pad_defaults(models):
    ref, model = models
    ids, mask = left_padded([5, 8], pad=CFG_EOS, seed=4)
    got = generate(model, ids, mask, max_new_tokens=6)
    want = hf_generate(ref, ids, mask, max_new_tokens=6, do_sample=False)  # HF: eos 299, pad = eos
    np.testing.assert_array_equal(got[:, :want.shape[1]], want)


def test_greedy_tokens_are_argmax_of_full_forward(models, attention_path):
    """Each token greedy generate picks through its KV cache (prefilled, grown, decoded step by step) is the
    argmax of a full forward pass over prompt + tokens so far; model-level cached logits: tests/model/test_gpt2.py."""
    _, model = models
    ids, mask = left_padded(LENGTHS, pad=0, seed=1)
    N, P = 12, ids.shape[1]
    seqs = generate(model, ids, mask, max_new_tokens=N, eos_token_id=[], pad_token_id=0)
    full_mask = np.concatenate([mask, np.ones((3, N), np.int64)], axis=1)
    pos = np.where(full_mask == 1, np.cumsum(full_mask, axis=1) - 1, 1)
    logits = np.asarray(model(seqs, full_mask, pos))[:, P - 1:-1]
    top2 = np.sort(logits, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3  # no near-tie that rounding could flip
    np.testing.assert_array_equal(seqs[:, P:], logits.argmax(-1))


@pytest.mark.slow
def test_sampling_seed_and_num_return_sequences(models):
    _, model = models
    ids, mask = left_padded([6, 3], pad=0, seed=2)
    kw = dict(max_new_tokens=15, do_sample=True, top_k=40, top_p=0.9, temperature=1.2, num_return_sequences=3,
              eos_token_id=[], pad_token_id=0)
    a = generate(model, ids, mask, seed=7, **kw)
    assert a.shape == (6, ids.shape[1] + 15)
    np.testing.assert_array_equal(a[:, :ids.shape[1]], np.repeat(ids, 3, axis=0))  # HF's row order
    np.testing.assert_array_equal(generate(model, ids, mask, seed=7, **kw), a)
    assert (generate(model, ids, mask, seed=8, **kw) != a).any()
    assert len({tuple(r) for r in a[:3, ids.shape[1]:].tolist()}) == 3  # the samples of a prompt differ
    # top_k=1 sampling is greedy decoding.
    greedy = generate(model, ids, mask, max_new_tokens=15, eos_token_id=[], pad_token_id=0)
    np.testing.assert_array_equal(generate(model, ids, mask, max_new_tokens=15, do_sample=True, top_k=1,
                                           eos_token_id=[], pad_token_id=0), greedy)


def test_parameters_do_not_recompile(models):
    """Sampling parameters, seeds, special ids, and lengths within a bucket reuse the compiled loop."""
    _, model = models
    prompts = [[5, 6, 7, 8], [9, 10]]
    base = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, repetition_penalty=1.2,
                min_new_tokens=2, eos_token_id=CFG_EOS, pad_token_id=0)
    generate(model, prompts, **base)
    compiled = sampling.generate_program._cache_size()
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    changes = [dict(temperature=1.7), dict(top_k=0), dict(top_k=250), dict(top_k=3, top_p=1.0), dict(top_p=0.3),
               dict(repetition_penalty=3.0), dict(penalize_prompt=False), dict(min_new_tokens=9), dict(seed=11), dict(max_new_tokens=14),
               dict(eos_token_id=[1, 2]), dict(pad_token_id=5), dict(top_k=0, top_p=1.0, temperature=0.5)]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for change in changes:
            generate(model, prompts, **{**base, **change})
        generate(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4]], **base)  # another prompt length, same bucket
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sampling.generate_program._cache_size() == compiled
    assert events == []


def test_buckets():
    assert [bucket_length(n) for n in (1, 16, 17, 32, 33, 100, 1024)] == [16, 16, 32, 32, 64, 128, 1024]


# --- keyword-guided sampling -------------------------------------------------------------------------------

KW_PROMPTS = [[5, 6, 7, 8], [9, 10], [20, 21, 22]]
# Distinct first tokens within a row; multi-token keywords; row 2 has none.
KEYWORDS = [[[11, 12, 13], [40], [41, 42]], [[50, 51], [60], [70, 71, 72, 73], [80]], []]


def occurs(seq, kw):
    return any(seq[i:i + len(kw)] == kw for i in range(len(seq) - len(kw) + 1))


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    dict(max_new_tokens=12, eos_token_id=[], pad_token_id=0),
    dict(max_new_tokens=12, eos_token_id=CFG_EOS, pad_token_id=0, repetition_penalty=1.5, min_new_tokens=3),
    dict(max_new_tokens=12, do_sample=True, top_k=20, top_p=0.9, temperature=0.8, num_return_sequences=2,
         eos_token_id=[], pad_token_id=0, seed=3),
])
def test_keyword_boost_zero_is_plain_sampling(models, kw):
    _, model = models
    np.testing.assert_array_equal(generate(model, KW_PROMPTS, keywords=KEYWORDS, keyword_boost=0.0, **kw),
                                  generate(model, KW_PROMPTS, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, top_k=5, num_return_sequences=2, seed=1),
                                dict(repetition_penalty=2.0)])
def test_large_boost_writes_every_keyword_whole(models, kw):
    """Boost 100 outweighs these logits (order 1-10): the first new tokens are the keywords, each written
    whole once started (continuations get twice the boost), in some order; none of them is boosted again."""
    _, model = models
    R = kw.get("num_return_sequences", 1)
    out = generate(model, KW_PROMPTS, keywords=KEYWORDS, keyword_boost=100.0, max_new_tokens=16,
                   eos_token_id=[], pad_token_id=0, **kw)
    plain = generate(model, KW_PROMPTS, max_new_tokens=16, eos_token_id=[], pad_token_id=0, **kw)
    P = max(map(len, KW_PROMPTS))
    for b, row in enumerate(out[:, P:].tolist()):
        kws = KEYWORDS[b // R]
        assert all(occurs(row, k) for k in kws)
        rest, left = row, list(kws)
        while left:  # the row starts with the keywords, one after another
            k = next(k for k in left if rest[:len(k)] == k)
            rest, left = rest[len(k):], [x for x in left if x is not k]
        if not kws:
            np.testing.assert_array_equal(out[b], plain[b])  # nothing to boost: as without keywords


def test_done_keywords_are_not_boosted_again(models):
    """Greedy with one keyword: once written, the text goes on as greedy decoding from prompt + keyword."""
    _, model = models
    for kw in ([33], [44, 45, 46]):
        out = generate(model, [[5, 6, 7, 8]], keywords=[[kw]], keyword_boost=100.0, max_new_tokens=12,
                       eos_token_id=[], pad_token_id=0)
        want = generate(model, [[5, 6, 7, 8, *kw]], max_new_tokens=12 - len(kw), eos_token_id=[], pad_token_id=0)
        np.testing.assert_array_equal(out, want)


def test_keyword_boost_does_not_recompile(models):
    _, model = models
    base = dict(max_new_tokens=10, do_sample=True, top_k=20, eos_token_id=CFG_EOS, pad_token_id=0)
    generate(model, KW_PROMPTS, keywords=KEYWORDS, keyword_boost=3.0, **base)
    compiled = sampling.generate_program._cache_size()
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for boost in (0.0, 100.0, 0.5):
            generate(model, KW_PROMPTS, keywords=KEYWORDS, keyword_boost=boost, **base)
        for wait in (True, {"window": 0.5, "ramp": 100.0}, {"lead": 0.0}, False):  # the guidance: traced too
            generate(model, KW_PROMPTS, keywords=KEYWORDS, keyword_boost=10.0, keyword_wait=wait, **base)
        generate(model, KW_PROMPTS, keywords=[[[1]], [[2, 3]], [[4], [5]]], keyword_boost=7.0, **base)  # same buckets
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sampling.generate_program._cache_size() == compiled
    assert events == []


def test_keyword_wait_with_boost_zero_is_plain_sampling(models):
    _, model = models
    kw = dict(max_new_tokens=12, do_sample=True, top_k=20, seed=3, eos_token_id=[], pad_token_id=0)
    np.testing.assert_array_equal(generate(model, KW_PROMPTS, keywords=KEYWORDS, keyword_boost=0.0,
                                           keyword_wait=True, **kw), generate(model, KW_PROMPTS, **kw))


def test_keyword_wait_waits_then_forces(models):
    """Greedy, one keyword: the token the model ranks last after the prompt. Boosted at once it is the first
    token; waiting, the text goes on as plain greedy decoding until the budget runs low, then writes it."""
    ref, model = models
    prompt = [5, 6, 7, 8]
    with torch.no_grad():
        worst = int(ref(torch.tensor([prompt])).logits[0, -1].argmin())
    kw = dict(max_new_tokens=16, eos_token_id=[], pad_token_id=0, keywords=[[[worst]]], keyword_boost=100.0)
    plain = generate(model, [prompt], max_new_tokens=16, eos_token_id=[], pad_token_id=0)[0, 4:].tolist()
    at_once = generate(model, [prompt], **kw)[0, 4:].tolist()
    waited = generate(model, [prompt], keyword_wait=True, **kw)[0, 4:].tolist()
    assert at_once[0] == worst
    first = waited.index(worst)  # written
    assert first >= 4 and waited[:first] == plain[:first]  # not forced early: plain greedy until then


class WordTokenizer:
    """One token per space-separated word of WORDS (ids from 10); decodes to the ids, space-separated."""

    WORDS = ["a", "leek", "potato"]
    eos_id, pad_id = CFG_EOS, 0

    def encode(self, text):
        return [10 + self.WORDS.index(w) for w in text.split()]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def test_keywords_reach_generate_only_with_a_boost(models):
    """generate_text passes keywords on only with keyword_boost > 0 and some keyword: otherwise the texts and
    the compiled program are plain sampling's; with a large boost each row starts with its keyword."""
    _, model = models
    tok, kw = WordTokenizer(), dict(max_new_tokens=8, do_sample=True, top_k=20, seed=2)
    plain = generate_text(model, tok, KW_PROMPTS, **kw)
    compiled = sampling.generate_program._cache_size()
    assert generate_text(model, tok, KW_PROMPTS, keywords=[["leek"], [], ["potato"]], keyword_boost=0.0, **kw) == plain
    assert generate_text(model, tok, KW_PROMPTS, keywords=[[], [], []], keyword_boost=5.0, **kw) == plain
    assert sampling.generate_program._cache_size() == compiled
    boosted = generate_text(model, tok, KW_PROMPTS, keywords=[["leek"], [], ["potato"]], keyword_boost=100.0, **kw)
    assert boosted[0].startswith("11") and boosted[2].startswith("12")


@pytest.mark.parametrize("keywords,boost,match", [
    ([[[1]]], 1.0, r"one list of keyword token-id sequences per prompt \(3\), got 1 rows"),
    ([[[1]], [], [[]]], 1.0, r"keywords\[2\]\[0\] must be a non-empty list of token ids"),
    ([[[1]], [[2, V]], []], 1.0, r"keywords\[1\]\[0\] holds token id 300, outside the vocabulary"),
    ([[[1]], [[2]], []], -1.0, "keyword_boost must be >= 0"),
    ([[[1]], "abc", []], 1.0, r"keywords\[1\] must be a list"),
])
def test_bad_keywords(models, keywords, boost, match):
    _, model = models
    with pytest.raises(GPT2JaxError, match=match):
        generate(model, KW_PROMPTS, keywords=keywords, keyword_boost=boost, max_new_tokens=4)


# --- bad input -------------------------------------------------------------------------------------------

BAD = {
    "too_long": (dict(max_new_tokens=60), [[1] * 10], "exceeds the model's n_positions"),
    "top_p_zero": (dict(top_p=0.0), [[1, 2]], r"top_p must be in \(0, 1\]"),
    "top_p_above_one": (dict(top_p=1.5), [[1, 2]], r"top_p must be in \(0, 1\]"),
    "top_k_negative": (dict(top_k=-1), [[1, 2]], "top_k must be >= 0"),
    "temperature_zero": (dict(do_sample=True, temperature=0.0), [[1, 2]], "temperature must be > 0"),
    "penalty_zero": (dict(repetition_penalty=0.0), [[1, 2]], "repetition_penalty must be > 0"),
    "empty_list": ({}, [], "empty prompt"),
    "empty_row": ({}, [[1, 2], []], "empty prompt"),
    "empty_array": ({}, np.zeros((1, 0), np.int64), "empty prompt"),
    "token_out_of_vocab": ({}, [[1, V]], "outside the vocabulary"),
    "eos_out_of_vocab": (dict(eos_token_id=V + 5), [[1, 2]], "outside the vocabulary"),
    "greedy_several_sequences": (dict(num_return_sequences=2), [[1, 2]], "needs do_sample=True"),
    "no_new_tokens": (dict(max_new_tokens=0), [[1, 2]], "max_new_tokens must be >= 1"),
    "float_top_k": (dict(top_k=2.5), [[1, 2]], "top_k must be an integer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(models, case):
    _, model = models
    kw, prompt, match = BAD[case]
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(GPT2JaxError, match=match):
        generate(model, prompt, **kw)


def test_bad_attention_mask(models):
    _, model = models
    ids = np.ones((2, 4), np.int64)
    with pytest.raises(GPT2JaxError, match="left padding"):
        generate(model, ids, np.array([[1, 1, 1, 1], [1, 1, 0, 0]]), max_new_tokens=2)
    with pytest.raises(GPT2JaxError, match="empty prompt"):
        generate(model, ids, np.array([[1, 1, 1, 1], [0, 0, 0, 0]]), max_new_tokens=2)
    with pytest.raises(GPT2JaxError, match="shape"):
        generate(model, ids, np.ones((2, 3)), max_new_tokens=2)


def test_temperature_ignored_when_greedy(models):
    _, model = models
    a = generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0.0, eos_token_id=[])
    np.testing.assert_array_equal(a, generate(model, [[1, 2, 3]], max_new_tokens=3, eos_token_id=[]))


def test_missing_model_path(tmp_path):
    with pytest.raises(GPT2JaxError, match="does not exist"):
        load_pretrained(str(tmp_path / "nope"))


def test_sampling_params_are_traced_leaves():
    """Every setting is a pytree leaf, so jit traces it instead of baking it into the program."""
    p = SamplingParams.of(vocab_size=V, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                          repetition_penalty=1.2, min_new_tokens=2, max_new_tokens=10, pad_token_id=0,
                          eos_ids=[3, CFG_EOS], seed=5)
    leaves, _ = jax.tree.flatten(p)
    assert len(leaves) == len(SamplingParams.__dataclass_fields__)
    assert p.top_p_cut == np.float32(1 - 0.9) and p.eos_mask_V.nonzero()[0].tolist() == [3, CFG_EOS]


def test_generate_with_parameters_sharded_by_logical_axes(models):
    """On 8 (fake CPU) devices, parameters laid out by the project's own rules (sharding.py, from each
    parameter's logical axes): the same tokens."""
    _, model = models
    ids, mask = left_padded(LENGTHS, pad=0)
    want = generate(model, ids, mask, max_new_tokens=8, eos_token_id=CFG_EOS, pad_token_id=0)
    sharded = nnx.clone(model)
    mesh = make_mesh(data=2, fsdp=4)
    flat = nnx.to_flat_state(nnx.state(sharded, nnx.Param))
    logical = {path: var.get_metadata().get("out_sharding") for path, var in flat}
    shardings = named_shardings(logical, {path: var for path, var in flat}, mesh)
    for path, var in flat:
        var.set_value(jax.device_put(var[...], shardings[path]))
    nnx.update(sharded, nnx.from_flat_state(flat))
    kernel = sharded.transformer.h[0].mlp.c_fc.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    got = generate(sharded, ids, mask, max_new_tokens=8, eos_token_id=CFG_EOS, pad_token_id=0)
    np.testing.assert_array_equal(got, want)
