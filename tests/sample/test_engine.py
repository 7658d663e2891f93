"""The continuous-batching engine (sample/engine.py) against `generate`: greedy and seeded tokens whatever the slot,
the companions and the arrival order; keyword guidance; finish reasons, cancel, logprobs; compile counts; a mesh."""
import itertools

import jax
import numpy as np
import pytest
import torch
import transformers

from gpt2_jax.checkpoints.pretrained import load_pretrained
from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sample import engine_programs as programs
from gpt2_jax.sample import processors
from gpt2_jax.sample.engine import Engine, Request, run_all
from gpt2_jax.sample.generate import generate, new_tokens
from gpt2_jax.sharding import make_mesh

V = 300  # above the first candidate cap (64): sampling's fallbacks run too
N_POSITIONS = 64
CFG_EOS = 299
SAMPLING = dict(do_sample=True, top_k=30, top_p=0.9, temperature=0.9, repetition_penalty=1.3)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random GPT-2 with sharp logits (no near-ties, as test_generate.py's), loaded from its HF directory."""
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=N_POSITIONS, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.4, bos_token_id=CFG_EOS, eos_token_id=CFG_EOS)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("engine") / "hf"
    ref.save_pretrained(path)
    return load_pretrained(str(path))


@pytest.fixture(scope="module")
def eos(model):
    """A token that ends some greedy continuations early (so EOS frees slots mid-run)."""
    prompt = prompts_of(LENGTHS)[1]
    return int(generate(model, [list(prompt)], max_new_tokens=8)[0, len(prompt) + 3])


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(0, V - 1, n)) for n in lengths]


def reference(model, eos, prompt, max_new, **kw):
    """`generate`'s new tokens for one prompt alone, EOS cut."""
    out = generate(model, [list(prompt)], max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0, **kw)
    return new_tokens(out[:, len(prompt):], eos)[0]


# Lengths from 1 to near the context (61 + 3 = 64 = n_positions), across prompt buckets 16, 32, 64.
LENGTHS = [9, 4, 13, 30, 1, 61, 17]
MAX_NEW = [20, 12, 10, 30, 5, 3, 25]


@pytest.fixture(scope="module")
def engine(model, eos):
    return Engine(model, slots=3, eos_ids=[eos], pad_id=0)


@pytest.mark.slow
def test_greedy_equals_generate_in_any_order(model, eos, engine):
    """Token for token generate's, whatever the slot, the companions and the order of arrival (all at once,
    reversed, and trickling in while others decode)."""
    prompts = prompts_of(LENGTHS)
    want = [reference(model, eos, p, n) for p, n in zip(prompts, MAX_NEW)]
    assert any(len(w) < n for w, n in zip(want, MAX_NEW)), "no row stops at EOS: the test would not free slots"
    reqs = [Request(p, n) for p, n in zip(prompts, MAX_NEW)]
    assert run_all(engine, reqs) == want
    assert run_all(engine, reqs[::-1]) == want[::-1]
    order = [3, 5, 0, 6, 2, 1, 4]
    got, rids = {}, {}
    for j, i in enumerate(order):  # one new request every step
        rids[engine.add(reqs[i])] = i
        for out in engine.step():
            got.setdefault(rids[out.rid], []).extend(out.tokens)
    while engine.active or engine.pending:
        for out in engine.step():
            got.setdefault(rids[out.rid], []).extend(out.tokens)
    assert [got[i] for i in range(len(reqs))] == want


@pytest.mark.slow
def test_seeded_sampling_equals_generate(model, eos, engine):
    """A seeded sampled request gives one-prompt generate's tokens with that seed, whatever runs beside it."""
    prompts = prompts_of(LENGTHS[:5], seed=1)
    reqs = [Request(p, n, seed=100 + i, **SAMPLING) for i, (p, n) in enumerate(zip(prompts, MAX_NEW))]
    want = [reference(model, eos, r.prompt, r.max_new_tokens, seed=r.seed, **SAMPLING) for r in reqs]
    assert run_all(engine, reqs) == want
    greedy = [Request(p, 8) for p in prompts_of([5, 7], seed=2)]
    mixed = run_all(engine, [reqs[2], greedy[0], reqs[0], greedy[1]])
    assert mixed[0] == want[2] and mixed[2] == want[0]


def test_keyword_guidance_equals_generate(model, eos, engine):
    prompts = prompts_of([6, 11, 3], seed=3)
    keywords = [((10, 11), (40,)), ((7,),), ((3, 4, 5), (90, 91), (200,))]
    for boost in (2.0, 100.0):
        want = [new_tokens(generate(model, [list(p)], max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                                    keywords=[[list(k) for k in kw]], keyword_boost=boost)[:, len(p):], eos)[0]
                for p, kw in zip(prompts, keywords)]
        got = run_all(engine, [Request(p, 16, keywords=kw, keyword_boost=boost) for p, kw in zip(prompts, keywords)])
        assert got == want


def test_keyword_wait_equals_generate(model, eos):
    """Guidance that waits (window, pace, hold, no glue after a keyword) gives generate's tokens in the engine,
    greedy and seeded, beside a request without it."""
    glue = tuple(range(20, 60))
    engine = Engine(model, slots=3, eos_ids=[eos], pad_id=0, glue_ids=glue)
    prompts = prompts_of([6, 11, 3], seed=5)
    keywords = [((10, 11), (40,), (70,)), ((7,),), ((3, 4, 5), (90, 91), (200,))]
    waits = [True, {"window": 3.0, "ramp": 4.0}, None]
    kwargs = [dict(), dict(do_sample=True, seed=7, top_k=20), dict()]
    want = [new_tokens(generate(model, [list(p)], max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                                keywords=[[list(k) for k in kw]], keyword_boost=5.0, keyword_wait=w,
                                glue_ids=glue, **kw_args)[:, len(p):], eos)[0]
            for p, kw, w, kw_args in zip(prompts, keywords, waits, kwargs)]
    got = run_all(engine, [Request(p, 16, keywords=kw, keyword_boost=5.0, keyword_wait=w, **kw_args)
                           for p, kw, w, kw_args in zip(prompts, keywords, waits, kwargs)])
    assert got == want
    plain = run_all(engine, [Request(p, 16, keywords=kw, keyword_boost=5.0) for p, kw in zip(prompts, keywords)])
    assert plain[0] != got[0]  # the wait changes what is written


@pytest.mark.slow
def test_new_mix_of_requests_does_not_recompile(model, eos, engine):
    """Settings, seeds, keywords, lengths within a bucket: the compiled programs stay as they are."""
    prompts = prompts_of([5, 9, 12], seed=4)
    for n in (3, 2, 1):  # every prefill row bucket of this prompt bucket (the shapes: compiled once each)
        run_all(engine, [Request(p, 6) for p in prompts[:n]])
    counts = [f._cache_size() for f in (programs.prefill, programs.insert, programs.decode)]
    mixes = [
        [Request(prompts[1], 9, do_sample=True, temperature=0.5, top_k=0, top_p=0.5, seed=3,
                 repetition_penalty=2.0, penalize_prompt=False, min_new_tokens=4),
         Request(prompts[2], 3, keywords=((1, 2),), keyword_boost=5.0, logprobs=2),
         Request(prompts[0], 7, do_sample=True, top_k=5, seed=9)],
        [Request(prompts[2][:7], 11, min_new_tokens=11), Request(prompts[1], 2, logprobs=0)],
    ]
    for reqs in mixes:
        run_all(engine, reqs)
    assert [f._cache_size() for f in (programs.prefill, programs.insert, programs.decode)] == counts


def test_finish_reasons_cancel_and_queue(model, eos, engine):
    prompts = prompts_of([4, 4, 4, 4], seed=5)
    stops = next(p for p in prompts_of([4] * 40, seed=6) if len(reference(model, eos, p, 12)) < 12)
    rids = [engine.add(Request(stops, 12)), engine.add(Request(prompts[0], 5)),
            engine.add(Request(prompts[1], 30)), engine.add(Request(prompts[2], 30))]
    assert engine.pending == 4 and engine.active == 0
    outs = engine.step()
    assert engine.active == 3 and engine.pending == 1  # three slots
    engine.cancel(rids[2])
    engine.cancel(rids[3])  # still queued
    reasons = {}
    for _ in range(40):
        for out in outs:
            assert not out.finished or out.rid not in reasons
            if out.finished:
                reasons[out.rid] = out.finish_reason
        if not (engine.active or engine.pending):
            break
        outs = engine.step()
    assert reasons == {rids[0]: "stop", rids[1]: "length", rids[2]: "cancelled", rids[3]: "cancelled"}


def test_logprobs_are_log_softmax_of_the_model(model, eos, engine):
    prompt = prompts_of([7], seed=7)[0]
    rid = engine.add(Request(prompt, 4, logprobs=3))
    toks, lps, tops = [], [], []
    while engine.active or engine.pending:
        for out in engine.step():
            assert out.rid == rid
            toks += out.tokens
            lps += out.logprobs
            tops += out.top_logprobs
    ids = np.array([list(prompt) + toks])
    logits = np.asarray(model(ids), np.float64)[0, len(prompt) - 1:-1]
    want = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(lps, [want[i, t] for i, t in enumerate(toks)], atol=1e-4)
    for i, top in enumerate(tops):
        assert len(top) == 3 and list(top) == list(np.argsort(-want[i])[:3])


@pytest.mark.parametrize("change, match", [
    (dict(prompt=()), "empty prompt"),
    (dict(prompt=(1, V)), f"outside the vocabulary"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(prompt=(1,) * 60, max_new_tokens=5), r"prompt \(60 tokens\) \+ max_new_tokens \(5\) = 65 exceeds .*64"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(top_p=1.5), "top_p"),
    (dict(keywords=((1,),) * 17, keyword_boost=1.0), "at most 16"),
    (dict(keywords=((V,),), keyword_boost=1.0), r"keywords\[0\]"),
    (dict(logprobs=6), "logprobs"),
])
def test_bad_requests_are_one_line(engine, change, match):
    req = Request(**{**dict(prompt=(1, 2), max_new_tokens=4), **change})
    with pytest.raises(GPT2JaxError, match=match):
        engine.add(req)
    assert engine.pending == 0


def test_per_row_processor_parameters_equal_scalar_ones():
    """[B] parameters give each row what the scalar call gives it (the engine's slots each have their own)."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 50)).astype(np.float32) * 3
    seen = rng.random((3, 50)) < 0.3
    pen, temp = np.float32([1.0, 1.5, 0.7]), np.float32([1.0, 0.5, 2.0])
    num_new, min_new = np.int32([0, 3, 5]), np.int32([2, 3, 9])
    eos_mask = np.zeros(50, bool)
    eos_mask[[4, 7]] = True
    kw = np.full((3, 2, 2), -1, np.int32)
    kw[:, 0, :2] = [3, 9]
    kw[:, 1, 0] = 20
    match, done = np.int32([[0, 0], [1, 0], [0, 0]]), np.zeros((3, 2), bool)
    boost = np.float32([0.0, 2.0, 5.0])
    rows = [
        processors.apply_repetition_penalty(scores, seen, pen),
        processors.apply_temperature(scores, temp),
        processors.apply_min_new_tokens(scores, eos_mask, num_new, min_new),
        processors.apply_keyword_boost(scores, kw, match, done, boost),
    ]
    for b in range(3):
        one = [
            processors.apply_repetition_penalty(scores[b:b + 1], seen[b:b + 1], pen[b]),
            processors.apply_temperature(scores[b:b + 1], temp[b]),
            processors.apply_min_new_tokens(scores[b:b + 1], eos_mask, num_new[b], min_new[b]),
            processors.apply_keyword_boost(scores[b:b + 1], kw[b:b + 1], match[b:b + 1], done[b:b + 1], boost[b]),
        ]
        for got, want in zip(rows, one):
            np.testing.assert_array_equal(np.asarray(got)[b], np.asarray(want)[0])


@pytest.mark.slow
def test_engine_on_a_mesh_equals_generate(model, eos):
    """On 8 fake CPU devices: parameters sharded by the training rules, slots split over the batch axes."""
    assert len(jax.devices()) >= 8
    mesh = make_mesh(data=2, fsdp=4)
    eng = Engine(model, slots=4, eos_ids=[eos], pad_id=0, mesh=mesh)
    kernel = eng._state["transformer"]["h"][0]["mlp"]["c_fc"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    prompts = prompts_of([9, 4, 13, 30, 2], seed=8)
    want = [reference(model, eos, p, 10) for p in prompts]
    assert run_all(eng, [Request(p, 10) for p in prompts]) == want


@pytest.mark.slow
@pytest.mark.parametrize("steps", [4])
def test_several_steps_per_call_equal_one(model, eos, steps):
    eng = Engine(model, slots=2, eos_ids=[eos], pad_id=0, steps_per_call=steps)
    prompts = prompts_of(LENGTHS[:4], seed=9)
    want = [reference(model, eos, p, n) for p, n in zip(prompts, MAX_NEW)]
    assert run_all(eng, [Request(p, n) for p, n in zip(prompts, MAX_NEW)]) == want
