"""A3QK(update=True): the score Gram (calib/scores.py), the pair selection and query gains (math/qk_refit.py), and
what the rewritten attention really computes."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import a3mod
from a3mod.calib.scores import score_gram
from a3mod.errors import RatioError
from a3mod.math import qk_refit
from a3mod.passes import pass_from_dict, pass_to_dict
from a3mod.passes.base import needs
from conftest import assert_close_logits, calib_ids, input_ids, logits, tiny_model
from test_stream import assert_streaming_equals_in_memory


def _rotate(x, cos, sin):
    """RoPE in rotate_half layout, (T, heads, rot) with cos/sin (T, rot)."""
    h = x.shape[-1] // 2
    rh = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos[:, None] + rh * sin[:, None]


def _brute_gram(q, k, cos, sin, scaling, stride, window, softcap):
    """The score Gram from explicit loops over queries, keys and pairs (real rotated vectors, no complex numbers)."""
    b, t, h, rot = q.shape
    half, g = rot // 2, h // k.shape[2]
    out = torch.zeros(h, rot, rot, dtype=torch.float64)
    for i in range(b):
        qr, kr = _rotate(q[i].double(), cos[i].double(), sin[i].double()), _rotate(k[i].double(), cos[i].double(),
                                                                                   sin[i].double())
        for m in range(t - 1, -1, -stride):
            keys = [n for n in range(m + 1) if window is None or n > m - window]
            for hh in range(h):
                feats, scores = [], []
                for n in keys:
                    a, c = qr[m, hh], kr[n, hh // g]
                    f = []
                    for p in range(half):
                        # pair p: (a_p + i a_{p+h}) * conj(c_p + i c_{p+h})
                        f += [a[p] * c[p] + a[p + half] * c[p + half], a[p + half] * c[p] - a[p] * c[p + half]]
                    feats.append(torch.stack(f))
                    s = float(a @ c) * scaling
                    scores.append(softcap * math.tanh(s / softcap) if softcap else s)
                p = torch.tensor(scores, dtype=torch.float64).softmax(0)
                f = torch.stack(feats)
                fc = f - (p[:, None] * f).sum(0)
                out[hh] += (fc * p[:, None]).T @ fc
    return out


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (None, 2.0)])
def test_score_gram_equals_explicit_loops(window, softcap):
    g = torch.Generator().manual_seed(0)
    b, t, h, hkv, rot = 2, 9, 4, 2, 6
    q, k = torch.randn(b, t, h, rot, generator=g), torch.randn(b, t, hkv, rot, generator=g)
    ang = torch.rand(b, t, rot // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    got = score_gram(q, k, cos, sin, 0.4, window=window, softcap=softcap, stride=2)
    ref = _brute_gram(q, k, cos, sin, 0.4, 2, window, softcap)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _gram(n_pairs: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n_pairs + 4, 2 * n_pairs, generator=g, dtype=torch.float64)
    x = x * torch.rand(2 * n_pairs, generator=g, dtype=torch.float64) * 3     # uneven pair sizes
    return x.T @ x


@given(n=st.integers(2, 6), seed=st.integers(0, 10**6), damping=st.sampled_from([0.0, 0.01, 0.3, 3.0]),
       data=st.data())
def test_gains_never_raise_the_objective(n, seed, damping, data):
    keep = data.draw(st.integers(1, n))
    gram = torch.stack([_gram(n, seed), _gram(n, seed + 1)])
    pairs = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(seed + s))[:keep] for s in (0, 1)])
    gains, before, after = qk_refit.pair_gains(gram, pairs, damping)
    assert gains.shape == (2, keep, 2)
    assert (after <= before * (1 + 1e-9) + 1e-9).all()
    if keep == n:            # every pair kept: plain selection is exact, the gains stay 1
        torch.testing.assert_close(gains, torch.tensor([1.0, 0.0], dtype=gains.dtype).expand_as(gains))
        assert before.abs().max() < 1e-8 * gram.diagonal(dim1=-2, dim2=-1).sum()


@given(n=st.integers(2, 6), seed=st.integers(0, 10**6))
def test_less_damping_fits_no_worse_and_more_pairs_fit_no_worse(n, seed):
    gram = _gram(n, seed)[None]
    pairs = torch.arange(n - 1)[None]
    e = [qk_refit.pair_gains(gram, pairs, d)[2] for d in (0.0, 0.1, 10.0)]
    assert e[0] <= e[1] * (1 + 1e-9) + 1e-9 and e[1] <= e[2] * (1 + 1e-9) + 1e-9
    fewer = qk_refit.pair_gains(gram, pairs[:, :-1], 0.0)[2]
    assert e[0] <= fewer * (1 + 1e-9) + 1e-9


@given(n=st.integers(2, 6), g=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_one_greedy_step_drops_the_cheapest_pair(n, g, seed):
    gram = torch.stack([_gram(n, seed + j) for j in range(g)])[None]          # (1, g, F, F)
    kept = qk_refit.select_pairs(gram, n - 1, 0.01)
    cost = [qk_refit.pair_gains(gram[0], torch.tensor([q for q in range(n) if q != p]).expand(g, -1), 0.01)[2].sum()
            for p in range(n)]
    dropped = ({*range(n)} - set(kept[0].tolist())).pop()
    assert cost[dropped] <= min(cost) * (1 + 1e-9) + 1e-12
    assert kept.tolist() == [sorted(kept[0].tolist())]
    assert qk_refit.select_pairs(gram, n, 0.01).tolist() == [list(range(n))]


def test_gain_rows_is_the_complex_product():
    g = torch.Generator().manual_seed(0)
    w, gains = torch.randn(2, 5, 6, generator=g), torch.randn(2, 3, 2, generator=g)
    x = torch.randn(5, generator=g)
    q, q2 = x @ w, x @ qk_refit.gain_rows(w, gains)                           # (2, 6)
    c = torch.complex(gains[..., 0], gains[..., 1])
    torch.testing.assert_close(torch.complex(q2[..., :3], q2[..., 3:]), c * torch.complex(q[..., :3], q[..., 3:]))


# ------------------------------------------------------------------------------------------------ whole model
def _one_layer(family="llama", **kw):
    return tiny_model(family, layers=1, heads=4, kv_heads=2, head_dim=16, max_position_embeddings=256, **kw)


def _attention_probs(model, calib):
    """Each window's attention probabilities of layer 0 (B, H, T, T), eager attention."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    got = []
    h = m.model.layers[0].self_attn.register_forward_hook(lambda mod, i, out: got.append(out[1]))
    with torch.no_grad():
        m(input_ids=calib, use_cache=False)
    h.remove()
    return got[0].double()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_rewritten_attention_has_the_predicted_score_error(family):
    """The objective measured on what the compressed layer computes (its log-probabilities are its scores up to a
    per-query shift, which the centring removes) equals the Gram's prediction for the fitted gains, and is below
    plain selection of the same pairs. One layer, so both models see the same inputs."""
    model, calib = _one_layer(family), calib_ids(3, 128)
    stats = a3mod.collect(model, calib, kinds=("a3", "qkgram"), progress=False)
    p = _attention_probs(model, calib)
    comp = copy.deepcopy(model)
    a3mod.apply(comp, [a3mod.A3QK(rank=10, update=True)], stats=stats, progress=False)
    att = comp.model.layers[0].self_attn
    assert att.qk_dim == 10
    p2 = _attention_probs(comp, calib)
    scale2 = att.scaling ** 2
    measured = torch.zeros(4, dtype=torch.float64)
    for m in range(127, -1, -64):                                    # the queries the statistics sample
        d = p[..., m, : m + 1].log() - p2[..., m, : m + 1].log()     # (B, H, m+1): score error + a shift
        w = p[..., m, : m + 1]
        dc = d - (w * d).sum(-1, keepdim=True)
        measured += (w * dc.square()).sum(-1).sum(0) / scale2
    kept = att.rope_index[:, :5].repeat_interleave(2, 0)              # (H, 5) pairs
    _, before, after = qk_refit.pair_gains(stats.layers[0]["qs"], kept, 0.01)
    torch.testing.assert_close(measured, after, rtol=2e-3, atol=1e-6)
    assert (after < before).all()


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_full_rank_update_reproduces_the_model(family):
    model = tiny_model(family, kv_heads=2, head_dim=16, max_position_embeddings=256)
    ref = logits(model, input_ids())
    a3mod.apply(model, [a3mod.A3QK(rank=16, update=True)], calib=calib_ids(3, 128), progress=False)
    assert_close_logits(logits(model, input_ids()), ref, rel=1e-5)


def test_streaming_equals_in_memory(tmp_path):
    model = tiny_model("llama", kv_heads=2, head_dim=16, max_position_embeddings=256)
    passes = [a3mod.A3QK(ratio=0.3, update=True), a3mod.A3OV(ratio=0.3), a3mod.A3MLP(ratio=0.3)]
    assert_streaming_equals_in_memory(model, tmp_path, passes, calib_ids(3, 128))


def test_portable_keeps_the_shared_pairs_and_fits_the_gains():
    model, calib = tiny_model("llama", kv_heads=2, head_dim=16, max_position_embeddings=256), calib_ids(3, 128)
    plain, upd = copy.deepcopy(model), copy.deepcopy(model)
    a3mod.apply(plain, [a3mod.A3QK(ratio=0.4, portable=True)], calib=calib, progress=False)
    a3mod.apply(upd, [a3mod.A3QK(ratio=0.4, portable=True, update=True)], calib=calib, progress=False)
    for a, b in zip(plain.model.layers, upd.model.layers):
        assert torch.equal(a.self_attn.rope_index, b.self_attn.rope_index)
        assert torch.equal(a.self_attn.k_proj.weight, b.self_attn.k_proj.weight)
        assert not torch.equal(a.self_attn.q_proj.weight, b.self_attn.q_proj.weight)


def test_layers_without_full_rope_keep_a3s_solution():
    """GPT-2 (no RoPE): the update has nothing to fit; the result is plain A3QK's."""
    model, calib = tiny_model("gpt2"), calib_ids(3, 32)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a3mod.apply(a, [a3mod.A3QK(ratio=0.3)], calib=calib, progress=False)
    a3mod.apply(b, [a3mod.A3QK(ratio=0.3, update=True)], calib=calib, progress=False)
    torch.testing.assert_close(logits(a, input_ids()), logits(b, input_ids()))


def test_config_is_checked_and_round_trips():
    p = a3mod.A3QK(ratio=0.2, update=True, damping=0.1)
    assert pass_from_dict(pass_to_dict(p)) == p and set(needs(p)) == {"a3", "qkgram"}
    assert set(needs(a3mod.A3QK(ratio=0.2))) == {"a3"}
    with pytest.raises(RatioError, match="update"):
        a3mod.A3QK(ratio=0.2, update="yes")
    with pytest.raises(RatioError, match="damping"):
        a3mod.A3QK(ratio=0.2, update=True, damping=-1.0)


@given(n=st.integers(2, 6), seed=st.integers(0, 10**6), damping=st.sampled_from([0.0, 0.01, 0.3]), data=st.data())
def test_greedy_curve_is_the_error_of_the_pairs_it_keeps(n, seed, damping, data):
    """select_pairs(curve=True): the same pairs as without; curve[k] the error (gains fitted) of the pairs the greedy
    keeps at k, summed over heads; no pair: the whole score's error; every pair: 0."""
    keep = data.draw(st.integers(1, n))
    gram = torch.stack([torch.stack([_gram(n, seed + 2 * j + i) for i in range(2)]) for j in range(2)])  # (2, 2, F, F)
    kept, curve = qk_refit.select_pairs(gram, keep, damping, curve=True)
    assert torch.equal(kept, qk_refit.select_pairs(gram, keep, damping))
    assert curve.shape == (n + 1,)
    err = qk_refit.pair_gains(gram.flatten(0, 1), kept.repeat_interleave(2, 0), damping)[2].sum()
    torch.testing.assert_close(curve[keep], err) if keep < n else None
    t = torch.zeros(2 * n, dtype=torch.float64)
    t[0::2] = 1
    torch.testing.assert_close(curve[0], (t @ gram @ t).sum())
    assert curve[n] == 0


def test_score_statistic_added_to_statistics_that_hold_a3():
    """The score statistic collected alone (kind "qkgram" added to statistics that already hold "a3", as
    `Stats.ensure` does) equals the one collected beside "a3", and apply(stats=a3 only, calib=) runs the QK update as
    apply(calib=) does. Statistics that claim the kind without its sums are refused, not silently left un-updated."""
    base = tiny_model("llama", kv_heads=2, layers=2)
    calib = calib_ids(4, 32)
    both = a3mod.collect(base, calib, kinds=("a3", "qkgram"), progress=False)
    alone = a3mod.collect(base, calib, kinds=("qkgram",), progress=False)
    for a, b in zip(both.layers, alone.layers):
        assert set(b) == {"qs"}
        torch.testing.assert_close(a["qs"], b["qs"], rtol=0, atol=0)
    passes = [a3mod.A3QK(ratio=0.5, update=True)]
    ref = a3mod.apply(copy.deepcopy(base), passes, calib=calib, progress=False)
    a3 = a3mod.collect(base, calib, progress=False)
    got = a3mod.apply(copy.deepcopy(base), passes, stats=a3, calib=calib, progress=False)
    x = input_ids()
    assert_close_logits(logits(got, x), logits(ref, x))
    plain = a3mod.apply(copy.deepcopy(base), [a3mod.A3QK(ratio=0.5)], calib=calib, progress=False)
    assert not torch.allclose(logits(got, x), logits(plain, x))
    claims = a3mod.collect(base, calib, progress=False)
    claims.source["kinds"] = ["a3", "qkgram"]             # the kind recorded, its sums missing
    with pytest.raises(a3mod.CalibrationError, match="qkgram"):
        a3mod.apply(copy.deepcopy(base), passes, stats=claims, progress=False)
