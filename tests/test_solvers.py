"""Closed-form A3 solvers (float64 tensor functions) against brute-force optima computed from data."""
from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from a3mod.math import solvers

f64 = torch.float64


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=f64)


def tokens(g: torch.Generator, l: int, d_in: int) -> torch.Tensor:
    """l x d_in data with correlated, unevenly scaled features (full column rank since l > d_in)."""
    mix = randn(g, d_in, d_in) * torch.exp(0.5 * randn(g, d_in))[:, None]
    return randn(g, l, d_in) @ mix + 0.3 * randn(g, d_in)


def moment(z: torch.Tensor) -> torch.Tensor:
    """Second moment E[z z^T] of rows z, batched: (..., N, d) -> (..., d, d)."""
    return z.mT @ z / z.shape[-2]


def best_rank(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]


def sq(t: torch.Tensor, dims=(-2, -1)) -> torch.Tensor:
    return t.pow(2).sum(dims)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def sym_pow(r: torch.Tensor, p: float) -> torch.Tensor:
    w, v = torch.linalg.eigh(r)
    return (v * w.pow(p)[None]) @ v.T


# ------------------------------------------------------------------------------------------- shapes
@st.composite
def qk_problem(draw):
    h = draw(st.integers(1, 3))
    d_h = draw(st.integers(2, 6))
    d_in = draw(st.integers(d_h, 10))
    l = d_in + draw(st.integers(4, 30))
    g = rng(draw(st.integers(0, 10_000)))
    x = tokens(g, l, d_in)
    wq, wk = randn(g, h, d_in, d_h), randn(g, h, d_in, d_h)
    return x, wq, wk


def qk_scores(x, wq, wk):
    return (x @ wq) @ (x @ wk).mT            # (h, l, l)


# ---------------------------------------------------------------------------------------- QK (MHA)
@given(qk_problem(), st.data())
@settings(max_examples=25)
def test_qk_whitened_svd_is_best_rank_r_on_data(problem, data):
    x, wq, wk = problem
    h, d_in, d_h = wq.shape
    r = data.draw(st.integers(1, d_h), label="r")
    s = qk_scores(x, wq, wk)
    sv = torch.linalg.svdvals(s)
    assume(bool((sv[:, r - 1] - sv[:, r] > 1e-3 * sv[:, 0]).all()) if r < d_h else True)  # unique optimum
    wq_r, wk_r, loss = solvers.qk_whitened_svd(wq, wk, moment(x @ wq), moment(x @ wk), r)
    assert wq_r.shape == wk_r.shape == (h, d_in, r)
    assert loss.shape == (h, d_h + 1)
    s_r = qk_scores(x, wq_r, wk_r)
    assert rel(s_r, best_rank(s, r)) < 1e-7
    # loss[r] is the measured error ||S - S_r||^2 / l^2, for every head
    l = x.shape[0]
    err = sq(s - s_r) / l**2
    assert torch.allclose(loss[:, r], err, rtol=1e-6, atol=1e-9 * sq(s).max().item() / l**2)


@given(qk_problem(), st.data())
@settings(max_examples=25)
def test_qk_whitened_svd_equals_paper_form(problem, data):
    """W~ = R^-1/2 SVD_r(R^1/2 Wq Wk^T R^1/2) R^-1/2, without biases (R = X^T X / l)."""
    x, wq, wk = problem
    d_h = wq.shape[-1]
    r = data.draw(st.integers(1, d_h), label="r")
    rx = moment(x)
    half, inv_half = sym_pow(rx, 0.5), sym_pow(rx, -0.5)
    m = half @ wq @ wk.mT @ half
    sv = torch.linalg.svdvals(m)
    assume(bool((sv[:, r - 1] - sv[:, r] > 1e-3 * sv[:, 0]).all()) if r < d_h else True)
    paper = inv_half @ best_rank(m, r) @ inv_half
    wq_r, wk_r, _ = solvers.qk_whitened_svd(wq, wk, moment(x @ wq), moment(x @ wk), r)
    assert rel(wq_r @ wk_r.mT, paper) < 1e-6


@given(qk_problem())
@settings(max_examples=20)
def test_qk_whitened_svd_full_rank_exact_and_monotone(problem):
    x, wq, wk = problem
    d_h = wq.shape[-1]
    s = qk_scores(x, wq, wk)
    gq, gk = moment(x @ wq), moment(x @ wk)
    errs = []
    for r in range(1, d_h + 1):
        wq_r, wk_r, loss = solvers.qk_whitened_svd(wq, wk, gq, gk, r)
        errs.append(sq(s - qk_scores(x, wq_r, wk_r)))
        # the loss table does not depend on r and is non-increasing, ending at 0
        assert bool((loss[:, :-1] >= loss[:, 1:] - 1e-12 * loss[:, :1]).all())
        assert torch.equal(loss[:, -1], torch.zeros_like(loss[:, -1]))
    assert rel(qk_scores(x, wq_r, wk_r), s) < 1e-8       # r = d_h reproduces the scores
    tol = 1e-9 * sq(s)
    for a, b in zip(errs, errs[1:]):
        assert bool((b <= a + tol).all())


@given(qk_problem(), st.data())
@settings(max_examples=25)
def test_qk_whitened_svd_beats_plain_svd(problem, data):
    x, wq, wk = problem
    r = data.draw(st.integers(1, wq.shape[-1]), label="r")
    s = qk_scores(x, wq, wk)
    wq_r, wk_r, _ = solvers.qk_whitened_svd(wq, wk, moment(x @ wq), moment(x @ wk), r)
    ours = sq(s - qk_scores(x, wq_r, wk_r))
    plain = sq(s - x @ best_rank(wq @ wk.mT, r) @ x.T)
    assert bool((ours <= plain * (1 + 1e-9) + 1e-12 * sq(s)).all())


def test_qk_whitened_svd_with_bias_row():
    """A bias is a constant-1 input feature: the cheap form uses the biased q/k moments."""
    g = rng(7)
    x = tokens(g, 40, 6)
    xa = torch.cat([x, torch.ones(40, 1, dtype=f64)], 1)           # augmented input
    wq, wk = randn(g, 2, 7, 4), randn(g, 2, 7, 4)                  # last row = bias
    s = qk_scores(xa, wq, wk)
    wq_r, wk_r, loss = solvers.qk_whitened_svd(wq, wk, moment(xa @ wq), moment(xa @ wk), 2)
    s_r = qk_scores(xa, wq_r, wk_r)
    assert rel(s_r, best_rank(s, 2)) < 1e-7
    assert torch.allclose(loss[:, 2], sq(s - s_r) / 40**2, rtol=1e-6)


# ---------------------------------------------------------------------------------------- QK (GQA)
@st.composite
def gqa_problem(draw, g_max: int = 3):
    h_kv = draw(st.integers(1, 2))
    grp = draw(st.integers(1, g_max))
    d_h = draw(st.integers(2, 6))
    d_in = draw(st.integers(d_h, 10))
    l = d_in + draw(st.integers(4, 30))
    gen = rng(draw(st.integers(0, 10_000)))
    x = tokens(gen, l, d_in)
    return x, randn(gen, h_kv, grp, d_in, d_h), randn(gen, h_kv, d_in, d_h)


def gqa_scores(x, wq, wk):
    return (x @ wq) @ (x @ wk).mT[:, None]      # (h_kv, g, l, l)


def gqa_solve(x, wq, wk, r):
    return solvers.qk_whitened_svd_gqa(wq, wk, moment(x @ wq), moment(x @ wk), r)


@given(gqa_problem(), st.data())
@settings(max_examples=25)
def test_qk_gqa_is_best_shared_key_subspace(problem, data):
    """Stacking a group's score matrices, a shared rank-r key side is a rank-r approximation of the stack."""
    x, wq, wk = problem
    h_kv, grp, d_in, d_h = wq.shape
    l = x.shape[0]
    r = data.draw(st.integers(1, d_h), label="r")
    s = gqa_scores(x, wq, wk)
    wq_r, wk_r, loss = gqa_solve(x, wq, wk, r)
    assert wq_r.shape == (h_kv, grp, d_in, r) and wk_r.shape == (h_kv, d_in, r)
    assert loss.shape == (h_kv, d_h + 1)
    err = sq(s - gqa_scores(x, wq_r, wk_r), (-3, -2, -1))
    stacked_sv = torch.linalg.svdvals(s.reshape(h_kv, grp * l, l))
    optimum = stacked_sv[:, r:].pow(2).sum(-1)
    scale = sq(s, (-3, -2, -1))
    assert torch.allclose(err, optimum, rtol=1e-6, atol=1e-9 * scale.max().item())
    assert torch.allclose(loss[:, r] * l**2, err, rtol=1e-6, atol=1e-9 * scale.max().item())


@given(gqa_problem())
@settings(max_examples=20)
def test_qk_gqa_full_rank_exact_and_monotone(problem):
    x, wq, wk = problem
    d_h = wq.shape[-1]
    s = gqa_scores(x, wq, wk)
    errs = [sq(s - gqa_scores(x, *gqa_solve(x, wq, wk, r)[:2]), (-3, -2, -1)) for r in range(1, d_h + 1)]
    assert rel(gqa_scores(x, *gqa_solve(x, wq, wk, d_h)[:2]), s) < 1e-8
    tol = 1e-9 * sq(s, (-3, -2, -1))
    for a, b in zip(errs, errs[1:]):
        assert bool((b <= a + tol).all())


@given(gqa_problem(g_max=1), st.data())
@settings(max_examples=20)
def test_qk_gqa_with_one_query_head_equals_mha(problem, data):
    x, wq, wk = problem
    d_h = wq.shape[-1]
    r = data.draw(st.integers(1, d_h), label="r")
    s = qk_scores(x, wq[:, 0], wk)
    sv = torch.linalg.svdvals(s)
    assume(bool((sv[:, r - 1] - sv[:, r] > 1e-3 * sv[:, 0]).all()) if r < d_h else True)
    wq_g, wk_g, loss_g = gqa_solve(x, wq, wk, r)
    wq_m, wk_m, loss_m = solvers.qk_whitened_svd(wq[:, 0], wk, moment(x @ wq[:, 0]), moment(x @ wk), r)
    # same scores on the data (the weight products agree only up to cond(X) x the 1e-8 damping)
    assert rel(qk_scores(x, wq_g[:, 0], wk_g), qk_scores(x, wq_m, wk_m)) < 1e-7
    assert torch.allclose(loss_g, loss_m, rtol=1e-6, atol=1e-8 * loss_m[:, :1].max().item()), (loss_g, loss_m)


# ---------------------------------------------------------------------------------------------- RoPE
def rope_tables(pos: torch.Tensor, inv_freq: torch.Tensor, layout: str):
    """cos/sin (T, d) as a model's rotary embedding produces them for that layout."""
    ang = pos[:, None].to(f64) * inv_freq[None]                       # (T, d/2)
    if layout == "rotate_half":
        ang = torch.cat([ang, ang], -1)
    else:
        ang = ang.repeat_interleave(2, -1)
    return ang.cos(), ang.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([-x2, x1], -1)


def rope_full(x, cos, sin, layout):
    """Reference RoPE on a full head: rotate_half pairs (j, j+d/2), interleaved pairs (2j, 2j+1)."""
    if layout == "rotate_half":
        return x * cos + rotate_half(x) * sin
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 0::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


@pytest.mark.parametrize("layout,expected", [
    ("rotate_half", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("interleaved", [[0, 1], [2, 3], [4, 5], [6, 7]]),
])
def test_rope_pair_table(layout, expected):
    q2, k2 = torch.rand(2, 3, 8, dtype=f64), torch.rand(2, 8, dtype=f64)
    scores, pairs = solvers.rope_pair_scores(q2, k2, 8, layout)
    assert pairs.tolist() == expected
    per_dim = q2.sum(1) * k2
    assert torch.allclose(scores, per_dim[:, pairs[:, 0]] + per_dim[:, pairs[:, 1]], rtol=1e-15)


def test_rope_pair_scores_rejects_unknown_layout():
    with pytest.raises(ValueError, match="'neox'"):
        solvers.rope_pair_scores(torch.ones(1, 1, 4), torch.ones(1, 4), 4, "neox")


@given(h_kv=st.integers(1, 3), grp=st.integers(1, 3), half=st.integers(1, 8), seed=st.integers(0, 10_000),
       layout=st.sampled_from(["rotate_half", "interleaved"]), data=st.data())
@settings(max_examples=25)
def test_qk_rope_select(h_kv, grp, half, seed, layout, data):
    d = 2 * half
    keep = data.draw(st.integers(1, half), label="kept pairs")
    g = rng(seed)
    q2 = torch.rand(h_kv, grp, d, generator=g, dtype=f64)
    k2 = torch.rand(h_kv, d, generator=g, dtype=f64)
    idx, loss = solvers.qk_rope_select(q2, k2, d, layout, 2 * keep)
    assert idx.shape == (h_kv, 2 * keep) and idx.dtype == torch.long
    scores, pairs = solvers.rope_pair_scores(q2, k2, d, layout)
    for j in range(h_kv):
        firsts, seconds = idx[j, :keep], idx[j, keep:]
        # [firsts, seconds]: pair p = (firsts[p], seconds[p]) from the layout's table, ascending pair index
        p = pairs[:, 0].tolist()
        kept_pairs = [p.index(f) for f in firsts.tolist()]
        assert kept_pairs == sorted(kept_pairs)
        assert seconds.tolist() == [pairs[k, 1].item() for k in kept_pairs]
        # the kept pairs are the top-scoring ones
        top = scores[j].argsort(descending=True)[:keep].sort().values.tolist()
        assert kept_pairs == top
        # loss[keep] = total score of the dropped pairs; loss[0] = everything
        dropped = sorted(set(range(half)) - set(kept_pairs))
        assert loss[j, keep].item() == pytest.approx(scores[j, dropped].sum().item(), rel=1e-12, abs=1e-15)
        assert loss[j, 0].item() == pytest.approx(scores[j].sum().item(), rel=1e-12)
        assert loss[j, -1].item() == 0.0
    assert bool((loss[:, :-1] >= loss[:, 1:]).all())


@given(half=st.integers(1, 8), seed=st.integers(0, 10_000), layout=st.sampled_from(["rotate_half", "interleaved"]),
       data=st.data())
@settings(max_examples=25)
def test_rope_on_reduced_head_equals_kept_dims_of_rotated_head(half, seed, layout, data):
    """rotate_half RoPE on x[idx] with cos/sin gathered at idx == (RoPE of the full x)[idx]."""
    d = 2 * half
    keep = data.draw(st.integers(1, half), label="kept pairs")
    g = rng(seed)
    idx, _ = solvers.qk_rope_select(torch.rand(1, 1, d, generator=g, dtype=f64),
                                    torch.rand(1, d, generator=g, dtype=f64), d, layout, 2 * keep)
    idx = idx[0]
    pos = torch.randint(0, 4096, (7,), generator=g)
    inv_freq = 10000.0 ** (-torch.rand(half, generator=g, dtype=f64))
    cos, sin = rope_tables(pos, inv_freq, layout)
    x = randn(g, 7, d)
    reduced = x[:, idx] * cos[:, idx] + rotate_half(x[:, idx]) * sin[:, idx]
    assert torch.allclose(reduced, rope_full(x, cos, sin, layout)[:, idx], atol=1e-12, rtol=0)
    # and scores q.k of the kept dims are what the reduced heads compute at any pair of positions
    q, k = randn(g, 7, d), randn(g, 7, d)
    full_q, full_k = rope_full(q, cos, sin, layout)[:, idx], rope_full(k, cos, sin, layout)[:, idx]
    red_q = q[:, idx] * cos[:, idx] + rotate_half(q[:, idx]) * sin[:, idx]
    red_k = k[:, idx] * cos[:, idx] + rotate_half(k[:, idx]) * sin[:, idx]
    assert torch.allclose(red_q @ red_k.T, full_q @ full_k.T, atol=1e-10, rtol=0)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_qk_rope_select_odd_rank_raises(r):
    with pytest.raises(ValueError, match=str(r)):
        solvers.qk_rope_select(torch.rand(1, 1, 8), torch.rand(1, 8), 8, "rotate_half", r)


# ------------------------------------------------------------------------------------------------ OV
@st.composite
def ov_problem(draw):
    n = draw(st.integers(1, 3))
    grp = draw(st.integers(1, 3))
    d_h = draw(st.integers(2, 6))
    d_in = draw(st.integers(d_h, 10))
    d_m = draw(st.integers(d_h, 8))         # d_m >= d_h, as in every transformer (d_m = H d_h or more)
    big_n = d_in + draw(st.integers(4, 30))
    g = rng(draw(st.integers(0, 10_000)))
    x = tokens(g, big_n, d_in)
    return x, randn(g, n, d_in, d_h), randn(g, n, grp, d_h, d_m)


def cat_o(wo):
    """(n, g, r, d_m) -> [W_o,1 ... W_o,g] (n, r, g d_m)."""
    n, grp, r, dm = wo.shape
    return wo.permute(0, 2, 1, 3).reshape(n, r, grp * dm)


def ov_error(x, wv, wo, wv_r, wo_r):
    target = (x @ wv) @ cat_o(wo)                    # (n, N, g d_m): Z [W_o,1 .. W_o,g]
    return sq(target - (x @ wv_r) @ cat_o(wo_r)), target


@given(ov_problem(), st.data())
@settings(max_examples=25)
def test_ov_joint_is_optimal_on_data(problem, data):
    x, wv, wo = problem
    n, grp, d_h, d_m = wo.shape
    big_n = x.shape[0]
    r = data.draw(st.integers(1, d_h), label="r")
    z = x @ wv
    wv_r, wo_r, loss = solvers.ov_joint(wv, wo, moment(z), r)
    assert wv_r.shape == (n, x.shape[1], r) and wo_r.shape == (n, grp, r, d_m)
    assert loss.shape == (n, d_h + 1)
    err, target = ov_error(x, wv, wo, wv_r, wo_r)
    scale = sq(target).max().item()
    # optimal: the best rank-r approximation of Z [W_o,..] (which lies in Z's column space)
    optimum = torch.linalg.svdvals(target)[:, r:].pow(2).sum(-1)
    assert torch.allclose(err, optimum, rtol=1e-6, atol=1e-7 * scale)
    assert torch.allclose(loss[:, r] * big_n, err, rtol=1e-6, atol=1e-7 * scale)
    # at least as good as plain SVD truncation of [W_o,1 .. W_o,g] (no activation information)
    _, _, vh = torch.linalg.svd(cat_o(wo), full_matrices=False)
    vr = vh[:, :r].mT
    plain = sq(target - z @ cat_o(wo) @ vr @ vr.mT)
    assert bool((err <= plain * (1 + 1e-9) + 1e-9 * scale).all())


@given(ov_problem())
@settings(max_examples=20)
def test_ov_joint_full_rank_exact_and_monotone(problem):
    x, wv, wo = problem
    d_h = wo.shape[2]
    g = moment(x @ wv)
    errs = []
    for r in range(1, d_h + 1):
        wv_r, wo_r, loss = solvers.ov_joint(wv, wo, g, r)
        err, target = ov_error(x, wv, wo, wv_r, wo_r)
        errs.append(err)
        assert bool((loss[:, :-1] >= loss[:, 1:] - 1e-12 * loss[:, :1]).all())
    assert rel((x @ wv_r) @ cat_o(wo_r), target) < 1e-7
    tol = 1e-9 * sq(target)
    for a, b in zip(errs, errs[1:]):
        assert bool((b <= a + tol).all())


# -------------------------------------------------------------------------------------- OV refit
@st.composite
def ov_refit_problem(draw):
    """Attention outputs z (N, H, d_h) of H = h_kv * g heads, o_proj blocks (H, d_h, d_m), kept maps (h_kv, d_h, r)."""
    h_kv, grp, d_h = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(2, 5))
    r, d_m = draw(st.integers(1, d_h)), draw(st.integers(d_h, 7))     # d_m >= d_h as in every transformer
    g = rng(draw(st.integers(0, 10_000)))
    h = h_kv * grp
    z = tokens(g, h * d_h + draw(st.integers(2, 20)), h * d_h)
    return z, randn(g, h, d_h, d_m), randn(g, h_kv, d_h, r), grp


def _reduced_inputs(z, t, grp):
    """Every head's reduced attention output z_i t_g(i), concatenated: (N, H r)."""
    h, d_h = t.shape[0] * grp, t.shape[1]
    zh = z.reshape(z.shape[0], h, d_h)
    return torch.einsum("nhd,hdr->nhr", zh, t.repeat_interleave(grp, 0)).reshape(z.shape[0], -1)


@given(ov_refit_problem())
@settings(max_examples=25)
def test_ov_refit_is_the_joint_least_squares_fit_on_data(problem):
    z, wo, t, grp = problem
    h, d_h, d_m = wo.shape
    r = t.shape[-1]
    y = z @ wo.reshape(h * d_h, d_m)
    u = _reduced_inputs(z, t, grp)
    wo_r = randn(rng(0), h, r, d_m)
    new, before, after = solvers.ov_refit(wo, t, moment(z), wo_r, damping=0.0)
    ref = torch.linalg.lstsq(u, y).solution
    err = lambda w: sq(y - u @ w.reshape(h * r, d_m), -1).mean()  # noqa: E731
    assert new.shape == (h, r, d_m)
    assert after.item() == pytest.approx(err(ref).item(), rel=1e-6, abs=1e-5 * sq(y, -1).mean().item())
    assert before.item() == pytest.approx(err(wo_r).item(), rel=1e-9)
    assert after.item() <= err(new).item() * (1 + 1e-6) + 1e-9


@given(ov_refit_problem(), st.sampled_from([0.0, 1e-3, 0.01, 0.1, 1.0, 100.0]))
@settings(max_examples=30)
def test_ov_refit_never_increases_the_error_of_a3ovs_own_blocks(problem, damping):
    """Starting from A3OV's solution (whitened by the group's values, heads separately), the joint refit on the
    Gram of o_proj's input is never worse on that objective, for any damping."""
    z, wo, _, grp = problem
    h, d_h, d_m = wo.shape
    h_kv = h // grp
    zh = z.reshape(z.shape[0], h_kv, grp, d_h)
    g_v = moment(zh.sum(2).transpose(0, 1))                       # a stand-in for the values' moments per group
    r = max(1, d_h - 1)
    _, wo_r, _, t = solvers.ov_joint(torch.eye(d_h, dtype=f64).expand(h_kv, d_h, d_h), wo.reshape(h_kv, grp, d_h, d_m),
                                     g_v, r, return_map=True)
    _, before, after = solvers.ov_refit(wo, t, moment(z), wo_r.reshape(h, r, d_m), damping=damping)
    assert after.item() <= before.item() * (1 + 1e-9) + 1e-12


@given(ov_refit_problem())
@settings(max_examples=15)
def test_ov_refit_at_full_rank_is_exact(problem):
    z, wo, _, grp = problem
    h, d_h, d_m = wo.shape
    h_kv = h // grp
    wv_r, wo_r, _, t = solvers.ov_joint(torch.eye(d_h, dtype=f64).expand(h_kv, d_h, d_h),
                                        wo.reshape(h_kv, grp, d_h, d_m), moment(z[:, :d_h]).expand(h_kv, d_h, d_h),
                                        d_h, return_map=True)
    assert torch.allclose(wv_r, t)                                 # wv' = wv t (wv = I here)
    new, _, after = solvers.ov_refit(wo, t, moment(z), wo_r.reshape(h, d_h, d_m), damping=0.01)
    assert after.item() <= 1e-9 * sq(z @ wo.reshape(h * d_h, d_m), -1).mean().item()


# ----------------------------------------------------------------------------------------------- MLP
@given(d_i=st.integers(1, 40), d_m=st.integers(1, 8), seed=st.integers(0, 10_000), data=st.data())
@settings(max_examples=25)
def test_mlp_select(d_i, d_m, seed, data):
    r = data.draw(st.integers(1, d_i), label="r")
    g = rng(seed)
    h2 = torch.rand(d_i, generator=g, dtype=f64) * 3
    w_down = randn(g, d_i, d_m)
    idx, loss = solvers.mlp_select(h2, w_down, r)
    score = h2 * w_down.pow(2).sum(-1)
    assert idx.shape == (r,)
    assert idx.tolist() == sorted(idx.tolist()) and len(set(idx.tolist())) == r
    assert idx.tolist() == score.argsort(descending=True)[:r].sort().values.tolist()
    rest = [i for i in range(d_i) if i not in set(idx.tolist())]
    if rest:
        assert score[idx].min() >= score[rest].max()
    assert loss.shape == (d_i + 1,)
    dropped = score.sum() - score[idx].sum()
    assert loss[r].item() == pytest.approx(dropped.item(), rel=1e-12, abs=1e-12)
    assert loss[0].item() == pytest.approx(score.sum().item(), rel=1e-12)
    assert loss[-1].item() == 0.0
    assert bool((loss[:-1] >= loss[1:]).all())


def test_mlp_select_known_answer():
    h2 = torch.tensor([1.0, 4.0, 0.5, 2.0], dtype=f64)
    w_down = torch.tensor([[1.0, 0.0], [0.0, 0.5], [3.0, 0.0], [1.0, 1.0]], dtype=f64)
    # scores: 1, 1, 4.5, 4
    idx, loss = solvers.mlp_select(h2, w_down, 2)
    assert idx.tolist() == [2, 3]
    assert loss.tolist() == [10.5, 6.0, 2.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------- MLP refit
def _refit_problem(g, d_i, d_m, l=None):
    h = tokens(g, l or 4 * d_i + 8, d_i)
    return h, randn(g, d_i, d_m), moment(h)


@given(d_i=st.integers(2, 24), d_m=st.integers(1, 6), seed=st.integers(0, 10_000), data=st.data())
@settings(max_examples=25)
def test_mlp_refit_is_the_least_squares_fit_on_data(d_i, d_m, seed, data):
    """Undamped, the update is the minimiser of ||H W - H_K W'||^2 over the tokens (lstsq on the data), and its
    reported errors are the data's mean squared output errors before and after."""
    g = rng(seed)
    h, w, hh = _refit_problem(g, d_i, d_m)
    r = data.draw(st.integers(1, d_i - 1), label="r")
    kept = torch.randperm(d_i, generator=g)[:r].sort().values
    new, before, after = solvers.mlp_refit(w, hh, kept, damping=0.0)
    ref = torch.linalg.lstsq(h[:, kept], h @ w).solution
    assert new.shape == (r, d_m)
    torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
    err = lambda wk: sq(h @ w - h[:, kept] @ wk, -1).mean()  # noqa: E731
    assert before.item() == pytest.approx(err(w[kept]).item(), rel=1e-9)
    assert after.item() == pytest.approx(err(ref).item(), rel=1e-6, abs=1e-9)


@given(d_i=st.integers(2, 24), d_m=st.integers(1, 6), seed=st.integers(0, 10_000),
       damping=st.sampled_from([0.0, 1e-3, 0.01, 0.1, 1.0, 100.0]), data=st.data())
@settings(max_examples=40)
def test_mlp_refit_never_increases_the_calibration_error(d_i, d_m, seed, damping, data):
    """Any damping is a ridge pull toward the selected rows W_K, whose training error lies between the optimum's and
    no update's: the update never makes the calibration objective worse."""
    g = rng(seed)
    _, w, hh = _refit_problem(g, d_i, d_m, l=d_i // 2 + 1)      # fewer tokens than neurons: a singular Gram too
    r = data.draw(st.integers(1, d_i - 1), label="r")
    kept = torch.randperm(d_i, generator=g)[:r]
    _, before, after = solvers.mlp_refit(w, hh, kept, damping=damping)
    assert after.item() <= before.item() * (1 + 1e-9) + 1e-9


@given(d_i=st.integers(1, 20), d_m=st.integers(1, 6), seed=st.integers(0, 10_000))
@settings(max_examples=20)
def test_mlp_refit_full_rank_is_exact_and_error_shrinks_with_rank(d_i, d_m, seed):
    """Keeping every neuron changes nothing; growing nested kept sets never increase the refitted error."""
    g = rng(seed)
    _, w, hh = _refit_problem(g, d_i, d_m)
    new, before, after = solvers.mlp_refit(w, hh, torch.arange(d_i), damping=0.01)
    assert torch.equal(new, w) and before.item() == 0.0 and after.item() == 0.0
    order = torch.randperm(d_i, generator=g)
    errs = [solvers.mlp_refit(w, hh, order[:r], damping=0.0)[2].item() for r in range(1, d_i + 1)]
    scale = max(errs[0], 1e-12)
    assert all(b <= a + 1e-6 * scale for a, b in zip(errs, errs[1:])), errs


@given(d_i=st.integers(1, 16), d_m=st.integers(1, 5), seed=st.integers(0, 10_000))
@settings(max_examples=20)
def test_mlp_refit_losses_are_the_refitted_errors_of_every_prefix(d_i, d_m, seed):
    """One Cholesky gives, for every k, the error the (undamped) update leaves keeping the first k of the order."""
    g = rng(seed)
    _, w, hh = _refit_problem(g, d_i, d_m)
    order = torch.randperm(d_i, generator=g)
    loss = solvers.mlp_refit_losses(w, hh, order)
    assert loss.shape == (d_i + 1,) and loss[-1].item() == 0.0
    total = (w * (hh @ w)).sum().item()
    assert loss[0].item() == pytest.approx(total, rel=1e-7)       # chol_upper damps by 1e-8
    for k in range(1, d_i):
        want = solvers.mlp_refit(w, hh, order[:k], damping=0.0)[2].item()
        assert loss[k].item() == pytest.approx(want, rel=1e-5, abs=1e-7 * total)
    assert bool((loss[:-1] >= loss[1:] - 1e-9 * total).all())


def test_mlp_refit_known_answer():
    """Two perfectly correlated neurons: dropping one moves its contribution onto the other exactly."""
    hh = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=f64)             # h_1 = 2 h_0
    w = torch.tensor([[1.0, 0.0], [0.5, 3.0]], dtype=f64)
    new, before, after = solvers.mlp_refit(w, hh, torch.tensor([0]), damping=0.0)
    torch.testing.assert_close(new, torch.tensor([[2.0, 6.0]], dtype=f64), rtol=1e-6, atol=1e-6)
    assert before.item() == pytest.approx(4.0 * (0.25 + 9.0)) and after.item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------- MLP OBS selection
def _greedy_by_refit(w, hh, r: int) -> list[int]:
    """Brute force: remove, one at a time, the neuron whose removal leaves the least (undamped) refitted error."""
    alive = list(range(w.shape[0]))
    err = lambda k: solvers.mlp_refit(w, hh, torch.tensor(sorted(k)), damping=0.0)[2].item()  # noqa: E731
    while len(alive) > r:
        alive.remove(min(alive, key=lambda q: err([a for a in alive if a != q])))
    return sorted(alive)


@given(d_i=st.integers(2, 12), d_m=st.integers(1, 5), seed=st.integers(0, 10_000), data=st.data())
@settings(max_examples=25, deadline=None)
def test_mlp_obs_one_at_a_time_is_the_greedy_removal_by_refitted_error(d_i, d_m, seed, data):
    """block=1: each step drops the neuron of least ||W_q||^2 / (H^-1)_qq, the error its removal leaves after the
    update, on the weights the earlier removals updated: the brute-force greedy on the refitted error."""
    g = rng(seed)
    _, w, hh = _refit_problem(g, d_i, d_m)
    r = data.draw(st.integers(1, d_i - 1), label="r")
    order = solvers.mlp_obs_order(w, hh, r, damping=0.0, block=1)
    got = order[:r].sort().values.tolist()
    want = _greedy_by_refit(w, hh, r)
    if got != want:          # a tie: the two sets must leave the same error
        e = [solvers.mlp_refit(w, hh, torch.tensor(k), damping=0.0)[2].item() for k in (got, want)]
        assert e[0] == pytest.approx(e[1], rel=1e-6, abs=1e-9)


@given(d_i=st.integers(2, 40), d_m=st.integers(1, 5), seed=st.integers(0, 10_000), block=st.integers(1, 9),
       data=st.data())
@settings(max_examples=25, deadline=None)
def test_mlp_obs_order_is_a_nested_ranking(d_i, d_m, seed, block, data):
    """The order is a permutation; its first r are the survivors at r whether removal stops there or goes on
    (to=0), so the prefixes of one order serve every rank >= r; keeping all changes nothing."""
    g = rng(seed)
    _, w, hh = _refit_problem(g, d_i, d_m)
    r = data.draw(st.integers(1, d_i), label="r")
    stop = solvers.mlp_obs_order(w, hh, r, block=block)
    full = solvers.mlp_obs_order(w, hh, r, block=block, to=0)
    assert sorted(full.tolist()) == list(range(d_i)) == sorted(stop.tolist())
    assert set(stop[:r].tolist()) == set(full[:r].tolist())
    assert solvers.mlp_obs_order(w, hh, d_i, block=block)[:d_i].tolist() == list(range(d_i))


@given(d_i=st.integers(2, 30), d_m=st.integers(1, 5), seed=st.integers(0, 10_000), data=st.data())
@settings(max_examples=25, deadline=None)
def test_mlp_obs_with_a_diagonal_gram_is_cur(d_i, d_m, seed, data):
    """Uncorrelated neurons: (H^-1)_qq = 1 / H_qq and no update moves W, so OBS keeps what CUR keeps."""
    g = rng(seed)
    h2 = torch.exp(randn(g, d_i))
    w = randn(g, d_i, d_m)
    r = data.draw(st.integers(1, d_i - 1), label="r")
    kept = solvers.mlp_obs_order(w, torch.diag(h2), r, damping=0.0)[:r].sort().values
    assert torch.equal(kept, solvers.mlp_select(h2, w, r)[0])


def test_mlp_obs_keeps_what_the_others_cannot_rebuild():
    """Neuron 1 copies neuron 0 (h_1 = h_0) with the larger output weights; neuron 2 is independent and small.
    CUR keeps the copy pair's larger member and drops neuron 2 last-but-one; OBS drops one of the copies first,
    whose contribution the other rebuilds exactly, and keeps both the copy and neuron 2 at r = 2."""
    hh = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=f64) + 1e-9 * torch.eye(3, dtype=f64)
    w = torch.tensor([[2.0], [3.0], [1.0]], dtype=f64)
    assert solvers.mlp_select(hh.diagonal(), w, 2)[0].tolist() == [0, 1]
    kept = solvers.mlp_obs_order(w, hh, 2, damping=0.0, block=1)[:2].sort().values
    assert 2 in kept.tolist()
    assert solvers.mlp_refit(w, hh, kept, damping=0.0)[2].item() < 1e-6


# ------------------------------------------------------------------------------------------- helpers
def test_tail_losses():
    s2 = torch.tensor([[5.0, 3.0, 1.0], [2.0, 2.0, 0.0]], dtype=f64)
    assert solvers.tail_losses(s2).tolist() == [[9.0, 4.0, 1.0, 0.0], [4.0, 2.0, 0.0, 0.0]]


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_chol_upper_damps_singular_psd(rank):
    g = rng(rank)
    d = 5
    v = randn(g, 2, d, rank)
    gm = v @ v.mT                                                 # PSD, rank < d (zero for rank 0)
    gm = gm + torch.zeros(2, d, d, dtype=f64)
    a = solvers.chol_upper(gm)
    assert a.shape == (2, d, d)
    assert torch.equal(a, a.triu())
    scale = gm.diagonal(dim1=-2, dim2=-1).mean().item() if rank else 1e-30
    assert torch.allclose(a.mT @ a, gm, atol=1e-5 * max(scale, 1e-30), rtol=0)
    assert bool((a.diagonal(dim1=-2, dim2=-1) > 0).all())           # invertible


def test_chol_upper_exact_on_pd():
    g = rng(3)
    m = randn(g, 6, 6)
    gm = m @ m.T + 0.1 * torch.eye(6, dtype=f64)
    a = solvers.chol_upper(gm)
    assert torch.allclose(a.T @ a, gm, rtol=1e-7, atol=1e-10)


@given(d=st.integers(1, 8), rank=st.integers(0, 8), seed=st.integers(0, 10_000))
@settings(max_examples=20)
def test_psd_sqrt(d, rank, seed):
    g = rng(seed)
    v = randn(g, 3, d, min(rank, d))
    gm = v @ v.mT
    root = solvers.psd_sqrt(gm)
    assert torch.allclose(root, root.mT, atol=1e-12)
    assert torch.allclose(root @ root, gm, atol=1e-9 * max(gm.abs().max().item(), 1.0))
    assert bool((torch.linalg.eigvalsh(root) > -1e-9).all())


def test_damp_adds_relative_identity():
    gm = torch.diag(torch.tensor([2.0, 4.0], dtype=f64))
    out = solvers.damp(gm, 0.5)
    assert out.tolist() == [[3.5, 0.0], [0.0, 5.5]]              # + 0.5 * mean(diag) = 1.5
