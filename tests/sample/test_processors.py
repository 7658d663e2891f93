"""The logits processors against transformers': each one, their chain, the candidate fast path and its
exactness flags, and sampling statistics. Float32 scores on CPU."""
import functools
from contextlib import nullcontext
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as hf_lp

from gpt2_jax.errors import GPT2JaxError
from gpt2_jax.sample.processors import (WAIT, apply_keyword_boost, apply_min_new_tokens, apply_repetition_penalty,
                                        apply_temperature, filter_candidates, full_filter, glue_ids, keyword_guidance,
                                        one_minus_top_p, sample_tokens, token_presence, update_keyword_match)

V = 300  # above the first candidate cap (64), so the fast path and its fallbacks both run


KINDS = ["normal", "ties", "ties_at_cap"]


def scores(kind, B=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, V)).astype(np.float32) * 3
    if kind.startswith("ties"):  # steps of 0.5: dozens of tokens share each value, the maximum included
        x = np.round(x * 2) / 2
    if kind == "ties_at_cap":  # ties everywhere but across the 64th largest: the candidates can decide
        for row in x:
            thr = np.sort(row)[::-1][63]
            surplus = np.flatnonzero(row == thr)[64 - (row > thr).sum():]
            row[surplus] -= 0.5
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


def top_k_filter(x, k):
    """HF's TopKLogitsWarper by the exact path: top-p off."""
    return full_filter(jnp.asarray(x, jnp.float32), jnp.asarray(k, jnp.int32), jnp.float32(0.0), False)


def top_p_filter(x, p):
    """HF's TopPLogitsWarper by the exact path: top-k off; top_p 1 is off, as generate skips it."""
    return full_filter(jnp.asarray(x, jnp.float32), jnp.int32(0), one_minus_top_p(p), jnp.asarray(p) < 1)


def warp(x, t, k, p):
    """Temperature, top-k, top-p in HF's order by the exact path: what sampling draws from."""
    return full_filter(apply_temperature(x, t), jnp.asarray(k, jnp.int32), one_minus_top_p(p), jnp.asarray(p) < 1)


def _warp_candidates(x, t, k, p, cap):
    return filter_candidates(apply_temperature(x, t), k, p, cap)


def _penalise(x, ids, penalty):
    return apply_repetition_penalty(x, token_presence(ids, V), penalty)


def scatter_candidates(vals_BC, ids_BC):
    out = np.full((vals_BC.shape[0], V), -np.inf, np.float32)
    np.put_along_axis(out, np.asarray(ids_BC), np.asarray(vals_BC), axis=1)
    return out


def candidates_decide(x, k, want, cap):
    """Rows whose `cap` largest scores decide HF's answer `want` (as filter_candidates documents it): top-k on
    and <= cap, or top-k off and a nucleus narrower than cap, with no tie straddling the cap."""
    B, V = x.shape
    if cap >= V:
        return np.ones(B, bool)
    desc = -np.sort(-x, axis=1)
    low = desc[:, cap - 1]
    separated = (x >= low[:, None]).sum(axis=1) == cap
    if 0 < k < V:
        return (k <= cap) & (separated | (desc[:, min(k, cap) - 1] > low))
    return separated & (np.isfinite(want).sum(axis=1) < cap)


def check_candidates(x, k, want, cap, out):
    """filter_candidates' `out` flags exactly the rows its candidates decide, and equals HF's `want` on them.
    Returns the flags, so that callers can require exact rows where their case has them."""
    vals, ids, exact = out
    exact = np.asarray(exact)
    np.testing.assert_array_equal(exact, candidates_decide(x, k, want, cap))
    np.testing.assert_array_equal(scatter_candidates(vals, ids)[exact], want[exact])
    return exact


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5])
def test_temperature(t):
    x = scores("normal")
    np.testing.assert_array_equal(jitted(apply_temperature)(x, t), hf_apply([hf_lp.TemperatureLogitsWarper(t)], x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 30, 64, 65, 299, 300])
def test_top_k(kind, k):
    x = scores(kind)
    want = hf_apply([hf_lp.TopKLogitsWarper(k)], x)
    np.testing.assert_array_equal(jitted(top_k_filter)(x, k), want)
    exact = check_candidates(x, k, want, 64, jitted(filter_candidates, cap=64)(x, k, 1.0))
    # Exact iff k fits in the candidates, unless (only with "ties") the 64th value ties with the 65th.
    assert exact.all() == (k <= 30 or (k <= 64 and kind != "ties"))
    assert exact.any() == exact.all()


def test_top_k_zero_is_off():
    x = scores("ties")
    np.testing.assert_array_equal(top_k_filter(x, 0), x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1e-6, 0.3, 0.7, 0.95, 0.999999])
def test_top_p(kind, p):
    x = scores(kind)
    want = hf_reference([hf_lp.TopPLogitsWarper(p)], x)
    np.testing.assert_array_equal(jitted(top_p_filter)(x, p), want)
    for cap in (8, 64):
        exact = check_candidates(x, 0, want, cap, jitted(filter_candidates, cap=cap)(x, 0, p))
        if cap == 64 and p <= 0.7 and kind != "ties":
            assert exact.all()  # a narrow nucleus fits in 64 candidates


def test_top_p_one_is_off():
    # generate skips TopPLogitsWarper at top_p == 1, so even zero-probability tokens stay.
    x = scores("normal")
    x[:, :3] = -200.0
    np.testing.assert_array_equal(top_p_filter(x, 1.0), x)


# Both on within the candidates; top-p alone; top-k past the candidates with a wide and a narrow nucleus;
# everything off; top-k at the cap with a nucleus of nearly everything.
WARP_CASES = [(0.9, 30, 0.7), (2.0, 0, 0.3), (1.3, 100, 0.95), (0.7, 250, 0.5), (1.0, 0, 1.0), (0.9, 64, 0.999999)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t,k,p", WARP_CASES)
def test_warp_chain(kind, t, k, p):
    """Temperature -> top-k -> top-p as generate chains them, on the exact path and the candidate path."""
    x = scores(kind)
    procs = [hf_lp.TemperatureLogitsWarper(t)]
    procs += [hf_lp.TopKLogitsWarper(k)] if k else []
    procs += [hf_lp.TopPLogitsWarper(p)] if p < 1 else []
    want = hf_reference(procs, x)
    np.testing.assert_array_equal(jitted(warp)(x, t, k, p), want)
    scaled = np.asarray(apply_temperature(x, t))
    for cap in (8, 64, 1024):
        exact = check_candidates(scaled, k, want, cap, jitted(_warp_candidates, cap=cap)(x, t, k, p))
        if cap >= V or (cap == 64 and kind != "ties" and (0 < k <= 64 or (k == 0 and p <= 0.9))):
            assert exact.all()  # the candidates hold the top-k, or a narrow nucleus


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


@pytest.mark.parametrize("length", [5, 7, 8])  # 0 and 2 new tokens: EOS blocked; 3: not
def test_min_new_tokens(length):
    x = scores("normal")
    ids = np.zeros((4, length), np.int64)
    eos_mask = np.zeros(V, bool)
    eos_mask[[3, 7]] = True
    want = hf_apply([hf_lp.MinNewTokensLengthLogitsProcessor(5, 3, [3, 7])], x, ids)
    np.testing.assert_array_equal(jitted(apply_min_new_tokens)(x, eos_mask, length - 5, 3), want)


# --- keyword boost (ours, not HF's) ----------------------------------------------------------------------

KW_BKL = np.array([[[3, 4, -1], [5, -1, -1], [3, 9, 8], [-1, -1, -1]],   # row 0: 3 4 | 5 | 3 9 8 | padding
                   [[7, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1]]], np.int32)


def test_keyword_boost_by_hand():
    x = scores("normal", B=2)
    boost = jitted(apply_keyword_boost)
    match, done = np.zeros((2, 4), np.int32), np.zeros((2, 4), bool)
    got = np.asarray(boost(x, KW_BKL, match, done, 2.5))
    want = x.copy()
    want[0, [3, 5]] += 2.5  # keyword 0 and 2 both start with 3: boosted once, not twice
    want[1, 7] += 2.5
    np.testing.assert_array_equal(got, want)
    # Keyword 0 under way (3 written): its next token 4 gets twice the boost; keyword 1 done: 5 not boosted.
    match[0, 0], done[0, 1] = 1, True
    got = np.asarray(boost(x, KW_BKL, match, done, 2.5))
    want = x.copy()
    want[0, 4] += 5.0
    want[0, 3] += 2.5  # keyword 2 has not started
    want[1, 7] += 2.5
    np.testing.assert_array_equal(got, want)
    # Boost 0 leaves every score as it was, bit for bit.
    np.testing.assert_array_equal(np.asarray(boost(x, KW_BKL, match, done, 0.0)), x)


def boost_before_waiting(scores_BV, kw_BKL, match_BK, done_BK, boost):
    """The keyword boost as it was before guidance could wait (a copy of that code), for the "off" tests."""
    B, V = scores_BV.shape
    L = kw_BKL.shape[2]
    next_BK = jnp.take_along_axis(kw_BKL, jnp.clip(match_BK, 0, L - 1)[..., None], axis=2)[..., 0]
    pending_BK = ~done_BK & (next_BK >= 0)
    boost = jnp.asarray(boost, jnp.float32)
    strength_BK = jnp.where(match_BK > 0, 2 * boost, boost)
    rows_BK = jnp.broadcast_to(jnp.arange(B)[:, None], next_BK.shape)
    scores_BV = jnp.asarray(scores_BV, jnp.float32)
    boosted_BK = scores_BV[rows_BK, jnp.clip(next_BK, 0, V - 1)] + strength_BK
    return scores_BV.at[rows_BK, jnp.where(pending_BK, next_BK, V)].max(boosted_BK, mode="drop")


def test_keyword_wait_off_is_the_boost_as_before():
    rng = np.random.default_rng(1)
    boost = jax.jit(apply_keyword_boost)
    for trial in range(5):
        x = scores("ties" if trial % 2 else "normal", B=2, seed=trial)
        match = rng.integers(0, 3, (2, 4)).astype(np.int32)
        done = rng.random((2, 4)) < 0.3
        b = float(rng.choice([0.0, 2.5, 10.0]))
        want = np.asarray(jax.jit(boost_before_waiting)(x, KW_BKL, match, done, b))
        off = keyword_guidance(False)
        np.testing.assert_array_equal(np.asarray(boost(x, KW_BKL, match, done, b, num_new=trial, max_new=8,
                                                       **off)), want)
        np.testing.assert_array_equal(np.asarray(boost(x, KW_BKL, match, done, b)), want)


BY_HAND = {"window": 2.0, "ramp": 4.0, "lead": 0.5}


def _wait_case(num_new, done=(False, False), score5=0.0):
    """One row, V 10: keyword A = [3] (score 4, 1 below the best, 5 at token 0), keyword B = [5] (`score5`)."""
    x = np.zeros((1, 10), np.float32)
    x[0, 0], x[0, 3], x[0, 5] = 5.0, 4.0, score5
    kw = np.array([[[3], [5]]], np.int32)
    got = jax.jit(apply_keyword_boost)(x, kw, np.zeros((1, 2), np.int32), np.array([done]), 10.0,
                                       num_new=num_new, max_new=60, **BY_HAND)
    return np.asarray(got)[0] - x[0]


def test_keyword_wait_by_hand():
    # Behind the pace by u keywords with a share f of the budget left, the window widens and the boost grows by
    # 4 * u / f. Token 0 of 60: u = 2 * 1/54, f = 59/60. A's token is among the top candidates (1 below the
    # best <= the window): boosted. B's, 5 below, is not: it waits for a natural place.
    grow = lambda n: 4 * (2 * (n + 1) / 54) / (1 - (n + 1) / 60)  # noqa: E731
    np.testing.assert_allclose(_wait_case(0), [0, 0, 0, 10 + grow(0), 0, 0, 0, 0, 0, 0], rtol=1e-6)
    # Token 10: the window is 2 + grow(10) = 4.0 < 5: B still waits.
    np.testing.assert_allclose(_wait_case(10), [0, 0, 0, 10 + grow(10), 0, 0, 0, 0, 0, 0], rtol=1e-6)
    # Token 20: 2 + grow(20) = 6.8 >= 5: B is boosted too.
    np.testing.assert_allclose(_wait_case(20), [0, 0, 0, 10 + grow(20), 0, 10 + grow(20), 0, 0, 0, 0], rtol=1e-6)
    # Lead: with A written at once (done), the row is 1 - 2/54 ahead of the pace: B may not start even where it
    # fits (score 4.5), until the pace catches up within 0.5 keyword (2 * (n + 1)/54 >= 0.5 from token 13).
    np.testing.assert_array_equal(_wait_case(0, (True, False), 4.5), np.zeros(10))
    np.testing.assert_array_equal(_wait_case(12, (True, False), 4.5), np.zeros(10))
    np.testing.assert_array_equal(_wait_case(13, (True, False), 4.5), [0, 0, 0, 0, 0, 10, 0, 0, 0, 0])
    # Far below the best (40 nats), B is still forced before the budget ends: boosted above the best.
    got = [_wait_case(n, (True, False), -35.0)[5] for n in range(60)]
    assert got[0] == 0 and got[-1] > 40
    # A keyword under way is finished at twice the boost wherever it stands.
    x = np.full((1, 10), -50.0, np.float32)
    x[0, 0] = 5.0
    kw = np.array([[[3, 4]]], np.int32)
    got = jax.jit(apply_keyword_boost)(x, kw, np.array([[1]], np.int32), np.zeros((1, 1), bool), 10.0,
                                       num_new=0, max_new=60, **BY_HAND)
    assert np.asarray(got)[0, 4] == pytest.approx(-50 + 20 + 4 * (1 / 54) / (59 / 60))  # 2 * boost + growth


def test_keyword_wait_per_row_parameters():
    """[B] parameters (one value per row, as a batch of requests has) equal each row's scalar call."""
    x = scores("normal", B=2)
    match, done = np.zeros((2, 4), np.int32), np.zeros((2, 4), bool)
    per_row = dict(num_new=np.array([3, 40]), max_new=np.array([60, 50]), window=np.array([0.5, np.inf]),
                   ramp=np.array([4.0, 0.0]), lead=np.array([0.5, np.inf]))
    got = np.asarray(jax.jit(apply_keyword_boost)(x, KW_BKL, match, done, np.array([10.0, 3.0]), **per_row))
    for b in range(2):
        one = {k: v[b] for k, v in per_row.items()}
        want = jax.jit(apply_keyword_boost)(x[b:b + 1], KW_BKL[b:b + 1], match[b:b + 1], done[b:b + 1],
                                            [10.0, 3.0][b], **one)
        np.testing.assert_array_equal(got[b], np.asarray(want)[0])


class PieceTokenizer:
    """Token i decodes to PIECES[i]; encode knows only "a"."""

    PIECES = ["a", " dog", "s", "。", "中", " ", "_x", "9", "", "-"]

    def __len__(self):
        return len(self.PIECES)

    def encode(self, text):
        return [self.PIECES.index(text)]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.PIECES[i] for i in ids)


def test_glue_ids_are_the_tokens_that_continue_a_word():
    # "a" + piece: a letter, digit or "_" right after "a" continues it; a space, punctuation, nothing or a
    # character of an unspaced script (中: a keyword there is a substring) does not.
    assert glue_ids(PieceTokenizer()) == (0, 2, 6, 7)


def test_hold_blocks_eos_while_keywords_are_missing_and_glue_after_one():
    x = np.zeros((2, 10), np.float32)
    kw = np.array([[[3], [5]], [[3], [5]]], np.int32)
    eos, glue = np.zeros(10, bool), np.zeros(10, bool)
    eos[9], glue[[6, 7]] = True, True
    done = np.array([[True, False], [True, True]])  # row 0 still misses keyword [5]; row 1 has both
    ended = np.array([True, False])
    kw_args = dict(num_new=5, max_new=60, **BY_HAND, eos_mask_V=eos, ended_B=ended, glue_mask_V=glue)
    got = np.asarray(jax.jit(apply_keyword_boost)(x, kw, np.zeros((2, 2), np.int32), done, 10.0, hold=1.0,
                                                  **kw_args))
    assert np.isneginf(got[0, [6, 7, 9]]).all()  # row 0: EOS (a keyword missing) and glue (one just ended)
    assert np.isfinite(got[1]).all()  # row 1: nothing missing, nothing just ended
    # hold 0 (or boost 0): nothing blocked.
    for hold, boost in ((0.0, 10.0), (1.0, 0.0)):
        got = np.asarray(jax.jit(apply_keyword_boost)(x, kw, np.zeros((2, 2), np.int32), done, boost, hold=hold,
                                                      **kw_args))
        assert np.isfinite(got).all()


def test_keyword_guidance_settings():
    assert keyword_guidance(None) == keyword_guidance(False) == {"window": np.inf, "ramp": 0.0, "lead": np.inf,
                                                                 "hold": 0.0}
    assert keyword_guidance(True) == WAIT
    assert keyword_guidance({"window": 3}) == {**WAIT, "window": 3.0}
    for bad, match in (({"windw": 1}, "keyword_wait must be true, false or a mapping"),
                       ("yes", "keyword_wait must be true"), ({"ramp": float("inf")}, "ramp must be a number"),
                       ({"lead": -1}, "lead must be a number >= 0"), ({"window": True}, "window must be")):
        with pytest.raises(GPT2JaxError, match=match):
            keyword_guidance(bad)


def occurs(seq, kw):
    return any(seq[i:i + len(kw)] == kw for i in range(len(seq) - len(kw) + 1))


def test_keyword_match_against_substring_search():
    """Keywords of distinct tokens: done exactly once the emitted tokens contain the keyword, matched
    length = the longest keyword prefix the tokens end with."""
    rng = np.random.default_rng(0)
    kws = [[1, 2, 3], [2, 4], [5], [3, 1, 4, 0]]
    L = 5
    kw_BKL = np.full((3, len(kws), L), -1, np.int32)
    for k, kw in enumerate(kws):
        kw_BKL[:, k, :len(kw)] = kw
    step = jax.jit(update_keyword_match)
    match, done = np.zeros((3, len(kws)), np.int32), np.zeros((3, len(kws)), bool)
    emitted = [[] for _ in range(3)]
    for _ in range(40):
        tok = rng.integers(0, 6, 3).astype(np.int32)
        match, done = step(kw_BKL, match, done, tok)
        for b in range(3):
            emitted[b].append(int(tok[b]))
            for k, kw in enumerate(kws):
                assert bool(done[b, k]) == occurs(emitted[b], kw), (b, k, emitted[b])
                want = 0 if done[b, k] else max(n for n in range(len(kw)) if n == 0 or emitted[b][-n:] == kw[:n])
                assert int(match[b, k]) == want
    assert np.asarray(done).any() and not np.asarray(done).all()


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


@pytest.mark.slow
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
