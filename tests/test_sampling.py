"""Generation against transformers: each logits processor, greedy decoding, cached logits, sampling
statistics, compilation counts and input errors. Tiny random models on CPU."""
import functools
from contextlib import nullcontext
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf_lp

from gpt2_jax import sampling
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.hf import load_pretrained
from gpt2_jax.sampling import (apply_min_new_tokens, apply_repetition_penalty, apply_temperature, bucket_length,
                               filter_candidates, generate, sample_tokens, token_presence, top_k_filter,
                               top_p_filter, warp)

V = 300  # above the first candidate cap (64), so the fast path and its fallbacks both run
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


# --- processors against transformers' ------------------------------------------------------------------

def scores(kind, B=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, V)).astype(np.float32) * 3
    if kind == "ties":  # steps of 0.5: dozens of tokens share each value, the maximum included
        x = np.round(x * 2) / 2
    return x


def hf_apply(processors, x, ids=None, stable=False):
    """transformers' processors on `x`. `stable`: with torch.sort made stable, see `hf_reference`."""
    ids = torch.zeros((x.shape[0], 1), dtype=torch.long) if ids is None else torch.as_tensor(ids)
    t = torch.as_tensor(x)
    with mock.patch.object(torch, "sort", functools.partial(_torch_sort, stable=True)) if stable else nullcontext():
        for proc in processors:
            t = proc(ids, t)
    return t.numpy()


_torch_sort = torch.sort


def hf_reference(processors, x):
    """What our warpers must equal exactly: HF's, with its sort made stable.

    TopPLogitsWarper calls torch.sort without stable=True, and on CPU that order is not stable, so when
    tied tokens straddle the nucleus boundary, which of them HF keeps is unspecified. We keep the ones a
    stable sort puts last (the highest ids). Either way the same number of tokens of each value is kept,
    which is checked against unpatched HF.
    """
    want = hf_apply(processors, x, stable=True)
    plain = hf_apply(processors, x)
    np.testing.assert_array_equal(np.sort(want, axis=1), np.sort(plain, axis=1))
    return want


@functools.cache
def _jit(fn, static):
    return jax.jit(functools.partial(fn, **dict(static)))


def jitted(fn, **static):
    """`fn` compiled with every argument traced, as inside the generation loop: numbers become float32 /
    int32 arrays, so no value is folded into the program as a constant."""
    def run(*args):
        args = [np.float32(a) if isinstance(a, float) else np.int32(a) if isinstance(a, int) else a for a in args]
        return jax.tree.map(np.asarray, _jit(fn, tuple(sorted(static.items())))(*args))
    return run


def _warp_candidates(x, t, k, p, cap):
    return filter_candidates(apply_temperature(x, t), k, p, cap)


def _penalise(x, ids, penalty):
    return apply_repetition_penalty(x, token_presence(ids, V), penalty)


def scatter_candidates(vals_BC, ids_BC):
    out = np.full((vals_BC.shape[0], V), -np.inf, np.float32)
    np.put_along_axis(out, np.asarray(ids_BC), np.asarray(vals_BC), axis=1)
    return out


@pytest.mark.parametrize("t", [0.3, 0.9, 1.0, 2.5])
def test_temperature(t):
    x = scores("normal")
    np.testing.assert_array_equal(jitted(apply_temperature)(x, t), hf_apply([hf_lp.TemperatureLogitsWarper(t)], x))


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("k", [1, 2, 7, 30, 64, 65, 299, 300, 1000])
def test_top_k(kind, k):
    x = scores(kind)
    want = hf_apply([hf_lp.TopKLogitsWarper(k)], x)
    np.testing.assert_array_equal(jitted(top_k_filter)(x, k), want)
    vals, ids, exact = jitted(filter_candidates, cap=64)(x, k, 1.0)
    exact = np.asarray(exact)
    if kind == "normal" or k == 1:
        assert exact.all() == (k <= 64)  # no ties at the threshold: exact iff k fits in the candidates
    np.testing.assert_array_equal(scatter_candidates(vals, ids)[exact], want[exact])


def test_top_k_zero_is_off():
    x = scores("ties")
    np.testing.assert_array_equal(top_k_filter(x, 0), x)


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("p", [1e-6, 0.01, 0.3, 0.7, 0.95, 0.999, 0.999999])
def test_top_p(kind, p):
    x = scores(kind)
    want = hf_reference([hf_lp.TopPLogitsWarper(p)], x)
    np.testing.assert_array_equal(jitted(top_p_filter)(x, p), want)
    for cap in (8, 64):
        vals, ids, exact = jitted(filter_candidates, cap=cap)(x, 0, p)
        exact = np.asarray(exact)
        np.testing.assert_array_equal(scatter_candidates(vals, ids)[exact], want[exact])


def test_top_p_one_is_off():
    # generate skips TopPLogitsWarper at top_p == 1, so even zero-probability tokens stay.
    x = scores("normal")
    x[:, :3] = -200.0
    np.testing.assert_array_equal(top_p_filter(x, 1.0), x)


WARP_CASES = [(0.9, 30, 0.7), (1.0, 5, 1.0), (0.5, 0, 0.9), (2.0, 0, 0.3), (1.3, 100, 0.95), (0.7, 250, 0.5),
              (1.0, 0, 1.0), (0.9, 64, 0.999999), (1.1, 3, 1e-6)]


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("t,k,p", WARP_CASES)
def test_warp_chain(kind, t, k, p):
    """Temperature -> top-k -> top-p as generate chains them, on the exact path and the candidate path."""
    x = scores(kind)
    procs = [hf_lp.TemperatureLogitsWarper(t)]
    procs += [hf_lp.TopKLogitsWarper(k)] if k else []
    procs += [hf_lp.TopPLogitsWarper(p)] if p < 1 else []
    want = hf_reference(procs, x)
    np.testing.assert_array_equal(jitted(warp)(x, t, k, p), want)
    for cap in (8, 64, 1024):
        vals, ids, exact = jitted(_warp_candidates, cap=cap)(x, t, k, p)
        exact = np.asarray(exact)
        np.testing.assert_array_equal(scatter_candidates(vals, ids)[exact], want[exact])
        if cap >= V:
            assert exact.all()


def test_candidate_path_exactness_flags():
    """The fast path claims exactness exactly when the candidates decide the answer."""
    x = scores("normal")
    flag = lambda k, p, cap: jitted(filter_candidates, cap=cap)(x, k, p)[2]  # noqa: E731
    assert flag(30, 0.7, 64).all() and flag(64, 1.0, 64).all()
    assert not flag(65, 1.0, 64).any()  # top-k larger than the candidates
    assert not flag(0, 1.0, 64).any()  # nothing filtered: the whole vocabulary
    assert flag(0, 0.05, 64).all()  # a narrow nucleus fits
    assert not flag(0, 0.99, 8).any()  # a wide one does not
    tied = np.zeros((1, V), np.float32)
    tied[0, :3] = 1.0  # top-2 with a three-way tie: all three stay, one of them outside a cap of 2
    assert not jitted(filter_candidates, cap=2)(tied, 2, 1.0)[2][0]
    np.testing.assert_array_equal(top_k_filter(tied, 2), hf_apply([hf_lp.TopKLogitsWarper(2)], tied))


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.7])
def test_repetition_penalty(penalty):
    x = scores("normal")
    ids = np.random.default_rng(1).integers(0, 20, size=(4, 12))  # many repeats
    want = hf_apply([hf_lp.RepetitionPenaltyLogitsProcessor(penalty)], x, ids)
    got = jitted(_penalise)(x, ids, penalty)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("length", [5, 6, 7, 8, 9])
def test_min_new_tokens(length):
    x = scores("normal")
    ids = np.zeros((4, length), np.int64)
    eos_mask = np.zeros(V, bool)
    eos_mask[[3, 7]] = True
    want = hf_apply([hf_lp.MinNewTokensLengthLogitsProcessor(5, 3, [3, 7])], x, ids)
    np.testing.assert_array_equal(jitted(apply_min_new_tokens)(x, eos_mask, length - 5, 3), want)


# --- sampling statistics ---------------------------------------------------------------------------------

def chi2_pvalue(counts, probs, n):
    """Pearson's chi-square test of `counts` against `probs`; bins expecting < 5 draws are pooled."""
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # too little pooled mass for its own bin: fold it into the largest
        obs[np.argmax(exp[:-1])] += obs[-1]
        exp[np.argmax(exp[:-1])] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# (top_k, top_p, candidate caps, whether the first cap is exact): each path of sample_tokens.
PATHS = {
    "candidates": (30, 0.7, (64,), True),
    "candidates_top_p_only": (0, 0.6, (64,), True),
    "second_cap": (0, 0.9, (8, 1024), False),
    "full_sort_top_p": (0, 0.9, (8,), False),
    "full_sort_top_k": (12, 0.95, (8,), False),
    "unfiltered": (0, 1.0, (64,), False),
}


@pytest.mark.parametrize("path", PATHS)
def test_sampling_frequencies(path):
    """20,000 draws from one fixed row: frequencies fit HF's filtered distribution (chi-square p > 1e-3,
    so a correct sampler fails one run in a thousand per path; the seed is fixed, so runs are repeatable),
    and no token HF filters out is ever drawn."""
    top_k, top_p, caps, first_exact = PATHS[path]
    t, n = 0.9, 20_000
    row = scores("normal", B=1, seed=3) / 2
    assert np.asarray(filter_candidates(jnp.asarray(row) / t, top_k, top_p, caps[0])[2])[0] == first_exact
    procs = [hf_lp.TemperatureLogitsWarper(t)]
    procs += [hf_lp.TopKLogitsWarper(top_k)] if top_k else []
    procs += [hf_lp.TopPLogitsWarper(top_p)] if top_p < 1 else []
    probs = torch.softmax(torch.as_tensor(hf_apply(procs, row)[0]).double(), -1).numpy()
    draw = jax.jit(lambda key, s: sample_tokens(key, s, top_k, top_p, caps=caps))
    scaled = jnp.broadcast_to(apply_temperature(jnp.asarray(row), t), (n, V))
    tokens = np.asarray(draw(jax.random.key(0), scaled))
    counts = np.bincount(tokens, minlength=V)
    assert counts[probs == 0].sum() == 0
    assert chi2_pvalue(counts, probs, n) > 1e-3
    np.testing.assert_array_equal(np.asarray(draw(jax.random.key(0), scaled)), tokens)  # same key, same draws


# --- generate against transformers ---------------------------------------------------------------------------

LENGTHS = [9, 4, 13]


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


def test_cached_logits_equal_full_forward(models, attention_path):
    """Every decode step's logits equal a full forward pass over prompt + tokens so far (ours and HF's)."""
    ref, model = models
    ids, mask = left_padded(LENGTHS, pad=0, seed=1)
    N = 12
    seqs, step_logits = sampling._generate(
        model, ids, mask, max_new_tokens=N, do_sample=False, temperature=1.0, top_k=0, top_p=1.0,
        repetition_penalty=1.0, min_new_tokens=0, num_return_sequences=1, eos_token_id=[], pad_token_id=0,
        seed=0, with_logits=True)
    P = ids.shape[1]
    full_mask = np.concatenate([mask, np.ones((3, N), np.int64)], axis=1)
    pos = np.where(full_mask == 1, np.cumsum(full_mask, axis=1) - 1, 1)
    ours = np.asarray(model(seqs, full_mask, pos))[:, P - 1:-1]
    with torch.no_grad():
        theirs = ref(torch.as_tensor(seqs).long(), attention_mask=torch.as_tensor(full_mask),
                     position_ids=torch.as_tensor(pos)).logits.numpy()[:, P - 1:-1]
    assert step_logits.shape == (3, N, V)
    np.testing.assert_allclose(step_logits, ours, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(step_logits, theirs, atol=1e-4, rtol=1e-5)
    np.testing.assert_array_equal(seqs[:, P:], step_logits.argmax(-1))


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
    compiled = sampling._generate_jit._cache_size()
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    changes = [dict(temperature=1.7), dict(top_k=0), dict(top_k=250), dict(top_k=3, top_p=1.0), dict(top_p=0.3),
               dict(repetition_penalty=3.0), dict(min_new_tokens=9), dict(seed=11), dict(max_new_tokens=14),
               dict(eos_token_id=[1, 2]), dict(pad_token_id=5), dict(top_k=0, top_p=1.0, temperature=0.5)]
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for change in changes:
            generate(model, prompts, **{**base, **change})
        generate(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9], [4]], **base)  # another prompt length, same bucket
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sampling._generate_jit._cache_size() == compiled
    assert events == []


def test_buckets():
    assert [bucket_length(n) for n in (1, 16, 17, 32, 33, 100, 1024)] == [16, 16, 32, 32, 64, 128, 1024]


# --- bad input -------------------------------------------------------------------------------------------

BAD = {
    "too_long": (dict(max_new_tokens=60), [[1] * 10], "exceeds the model's n_positions"),
    "top_p_zero": (dict(top_p=0.0), [[1, 2]], r"top_p must be in \(0, 1\]"),
    "top_p_above_one": (dict(top_p=1.5), [[1, 2]], r"top_p must be in \(0, 1\]"),
    "top_k_negative": (dict(top_k=-1), [[1, 2]], "top_k must be >= 0"),
    "temperature_zero": (dict(do_sample=True, temperature=0.0), [[1, 2]], "temperature must be > 0"),
    "temperature_negative": (dict(do_sample=True, temperature=-1.0), [[1, 2]], "temperature must be > 0"),
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


def test_generate_with_parameters_sharded_by_logical_axes(models):
    """On 8 (fake CPU) devices, parameters sharded over a mesh by their logical axis names: the same tokens."""
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    _, model = models
    ids, mask = left_padded(LENGTHS, pad=0)
    want = generate(model, ids, mask, max_new_tokens=8, eos_token_id=CFG_EOS, pad_token_id=0)
    sharded = nnx.clone(model)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    rules = {"embed": "fsdp", "mlp": "data", "heads": "data"}  # a logical -> mesh rule set, as sharding will use

    def place(var):
        axes = var.get_metadata()["out_sharding"]
        spec = [rules.get(a) if a in rules and n % mesh.shape[rules[a]] == 0 else None
                for a, n in zip(axes, var.shape)]
        return jax.device_put(var[...], NamedSharding(mesh, PartitionSpec(*spec)))

    state = nnx.state(sharded, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        var.set_value(place(var))
    nnx.update(sharded, state)
    kernel = sharded.transformer.h[0].mlp.c_fc.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    got = generate(sharded, ids, mask, max_new_tokens=8, eos_token_id=CFG_EOS, pad_token_id=0)
    np.testing.assert_array_equal(got, want)
