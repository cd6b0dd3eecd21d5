"""Mixed-rank allocation (Allocate) and the KV-budget pass (A3KV)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import a3mod
from a3mod.passes.allocate import Curve, allocate

from conftest import calib_ids, input_ids, tiny_model

FAMS = [("llama", dict(kv_heads=2, layers=3)), ("gpt2", dict(layers=3)), ("qwen2", dict(kv_heads=2, layers=3))]


def _stats(model):
    return a3mod.collect(model, calib_ids(8, 32), progress=False)


def _apply(model, passes, stats):
    return a3mod.apply(copy.deepcopy(model), passes, stats=stats, progress=False)


@pytest.mark.parametrize("fam,kw", FAMS)
@pytest.mark.parametrize("budget", [0.1, 0.2, 0.3])
def test_allocate_layers_matches_uniform_param_count(fam, kw, budget):
    base = tiny_model(fam, **kw)
    st_ = _stats(base)
    uni = a3mod.report(_apply(base, a3mod.a3_passes(budget), st_))
    mix = a3mod.report(_apply(base, [a3mod.Allocate(budget=budget)], st_))
    assert mix.params == uni.params                       # exactly the same count
    for comp in ("qk_dim", "vo_dim", "mlp_dim"):          # each component removes what uniform removes
        assert sum(getattr(r, comp) for r in mix.rows) == sum(getattr(r, comp) for r in uni.rows)


@pytest.mark.parametrize("fam,kw", FAMS)
def test_allocate_all_meets_budget_within_one_unit(fam, kw):
    base = tiny_model(fam, **kw)
    st_ = _stats(base)
    uni = a3mod.report(_apply(base, a3mod.a3_passes(0.3), st_))
    m = _apply(base, [a3mod.Allocate(budget=0.3, across="all")], st_)
    mix = a3mod.report(m)
    d = kw.get("hidden", 32)
    biggest_unit = 2 * (4 + 4) * (d + 1) + 8 * 3 * (d + 1)      # generous bound on one unit's parameters
    assert uni.params - biggest_unit < mix.params <= uni.params
    logits = m(input_ids()).logits
    assert torch.isfinite(logits).all()


def _curve(layer, comp, loss, uniform, cost=1):
    return Curve(layer, comp, 1, torch.tensor(loss, dtype=torch.float64), cost, uniform)


@given(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=8), st.integers(1, 7), st.integers(2, 6))
def test_identical_layers_get_uniform_ranks(increments, uniform, layers):
    """Identical loss curves in every layer -> every layer keeps exactly uniform's units."""
    inc = sorted(increments, reverse=True)                 # convex: largest loss increments first
    loss = [sum(inc[k:]) for k in range(len(inc) + 1)]     # loss[k] for k kept units, loss[-1] = 0
    uniform = min(uniform, len(inc))
    cs = [_curve(i, c, loss, uniform) for i in range(layers) for c in ("qk", "ov", "mlp")]
    assert allocate(cs, "layers") == [uniform] * len(cs)


def test_allocate_moves_units_to_where_they_matter():
    """A layer whose spectrum is flat keeps more than one whose energy sits in few units."""
    flat = [1.0 - k / 8 for k in range(9)]
    peaked = [1.0, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001, 0.0]
    cs = [_curve(0, "qk", flat, 4), _curve(1, "qk", peaked, 4)]
    kept = allocate(cs, "layers")
    assert sum(kept) == 8 and kept[0] > kept[1]


def test_identical_model_layers_give_uniform_model():
    """Same weights and same statistics in every layer: Allocate builds exactly uniform A3."""
    base = tiny_model("llama", kv_heads=2, layers=3)
    with torch.no_grad():
        for layer in base.model.layers[1:]:
            layer.load_state_dict(base.model.layers[0].state_dict())
    st_ = _stats(base)
    st_.layers = [{k: t.clone() for k, t in st_.layers[0].items()} for _ in st_.layers]
    uni = _apply(base, a3mod.a3_passes(0.3), st_)
    mix = _apply(base, [a3mod.Allocate(budget=0.3)], st_)
    x = input_ids()
    torch.testing.assert_close(mix(x).logits, uni(x).logits)
    assert [(r.qk_dim, r.vo_dim, r.mlp_dim) for r in a3mod.report(mix).rows] == \
        [(r.qk_dim, r.vo_dim, r.mlp_dim) for r in a3mod.report(uni).rows]


@pytest.mark.parametrize("fam,kw", FAMS)
@pytest.mark.parametrize("kv", [0.25, 0.5])
@pytest.mark.parametrize("mixed", [False, True])
def test_a3kv_cache_budget_and_accounting(fam, kw, kv, mixed):
    base = tiny_model(fam, **kw)
    m = _apply(base, [a3mod.A3KV(kv_ratio=kv, mixed=mixed)], _stats(base))
    rep = a3mod.report(m)
    assert rep.kv_bytes_per_token() <= (1 - kv) * rep.kv_bytes_per_token(orig=True) + 1e-9
    assert all(r.mlp_dim == r.mlp_orig for r in rep.rows)          # attention only
    out = m(input_ids(1, 10), use_cache=True)
    cached = sum(l.keys[0, :, 0].numel() + l.values[0, :, 0].numel() for l in out.past_key_values.layers)
    assert cached * m.dtype.itemsize == rep.kv_bytes_per_token()     # the report counts what the cache holds
    ids = input_ids(1, 6)
    g1 = m.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    g2 = m.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(g1, g2)


def test_a3kv_uniform_equals_a3qk_plus_a3ov():
    base = tiny_model("llama", kv_heads=2)
    st_ = _stats(base)
    a = _apply(base, [a3mod.A3KV(kv_ratio=0.5)], st_)
    b = _apply(base, [a3mod.A3QK(ratio=0.5), a3mod.A3OV(ratio=0.5)], st_)
    x = input_ids()
    torch.testing.assert_close(a(x).logits, b(x).logits)


def test_allocate_save_load_and_json(tmp_path):
    base = tiny_model("qwen2", kv_heads=2, layers=3)
    m = _apply(base, [a3mod.Allocate(budget=0.3, across="all")], _stats(base))
    a3mod.save(m, tmp_path / "m")
    m2 = a3mod.load(tmp_path / "m")
    x = input_ids()
    torch.testing.assert_close(m2(x).logits, m(x).logits)
    for p in (a3mod.Allocate(budget=0.2), a3mod.Allocate(budget=0.3, across="all"), a3mod.A3KV(kv_ratio=0.5, mixed=True)):
        assert a3mod.pass_from_dict(a3mod.pass_to_dict(p)) == p


@pytest.mark.parametrize("make,needle", [
    (lambda: a3mod.Allocate(budget=1.0), "budget=1.0"),
    (lambda: a3mod.Allocate(budget=-0.1), "budget=-0.1"),
    (lambda: a3mod.Allocate(budget=0.2, across="heads"), "across='heads'"),
    (lambda: a3mod.A3KV(kv_ratio=1.5), "kv_ratio=1.5"),
    (lambda: a3mod.A3KV(kv_ratio=0.5, mixed="yes"), "mixed='yes'"),
])
def test_errors(make, needle):
    with pytest.raises(a3mod.A3ModError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        make()


def test_allocate_cannot_mix_with_a3_passes():
    with pytest.raises(a3mod.A3ModError, match="alone"):
        a3mod.apply(tiny_model("llama"), [a3mod.Allocate(budget=0.2), a3mod.A3MLP(ratio=0.2)], calib=calib_ids())


@pytest.mark.parametrize("min_keep", [0.5, 0.8, 1.0])
def test_min_keep_floor(min_keep):
    peaked = [1.0, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.001, 0.0]
    flat = [1.0 - k / 8 for k in range(9)]
    cs = [_curve(0, "mlp", flat, 4), _curve(1, "mlp", peaked, 4)]
    kept = allocate(cs, "layers", min_keep)
    assert sum(kept) == 8 and min(kept) >= max(1, -(-min_keep * 4 // 1))
    if min_keep == 1.0:
        assert kept == [4, 4]


def test_allocate_options_validated():
    with pytest.raises(a3mod.A3ModError, match="min_keep=2"):
        a3mod.Allocate(budget=0.2, min_keep=2)
    with pytest.raises(a3mod.A3ModError, match="normalize='l2'"):
        a3mod.Allocate(budget=0.2, normalize="l2")
    base = tiny_model("llama", kv_heads=2, layers=3)
    st_ = _stats(base)
    uni = a3mod.report(_apply(base, a3mod.a3_passes(0.3), st_))
    for kw in (dict(normalize="absolute"), dict(min_keep=0.9), dict(across="all", normalize="absolute")):
        rep = a3mod.report(_apply(base, [a3mod.Allocate(budget=0.3, **kw)], st_))
        assert rep.params <= uni.params and torch.isfinite(torch.tensor(rep.ratio))


@pytest.mark.parametrize("scale", [1e-3, 7.0, 1e4])
def test_uniform_normalisation_ignores_each_layers_scale(scale):
    """normalize='uniform' divides every curve by its value at uniform's rank: scaling one layer's statistics
    (its output energy) leaves the allocation unchanged; 'absolute' moves units towards the scaled layer."""
    from a3mod.arch import layer_views
    from a3mod.passes.allocate import curves

    base = tiny_model("llama", kv_heads=2, layers=3)
    st_ = _stats(base)
    scaled = copy.deepcopy(st_)
    scaled.layers[1] = {k: t * scale for k, t in scaled.layers[1].items()}   # every moment of layer 1 scaled
    views = layer_views(base)
    ref = allocate(curves(views, st_, 0.3, "uniform"), "layers")
    assert allocate(curves(views, scaled, 0.3, "uniform"), "layers") == ref
    if scale > 1:
        moved = allocate(curves(views, scaled, 0.3, "absolute"), "layers")
        assert moved != ref


def test_uniform_normalisation_is_robust_to_outlier_units():
    """A layer whose energy sits in one huge unit (a massive activation) is not emptied: relative normalisation
    sees its bulk as free and cuts it to the bone, uniform normalisation keeps it near uniform's rank."""
    bulk = [1.0 - k / 8 for k in range(9)]                               # 8 equal units
    outlier = [1000.0 + v for v in bulk[1:]]                              # + one unit holding 1000x the energy
    outlier = [outlier[0] + 1.0] + outlier                                # loss[0] = everything
    outlier = [v - outlier[-1] for v in outlier]                          # loss[units] = 0, 9 units
    def norm(loss, ref):
        return [v / ref for v in loss]
    u = 5
    rel = allocate([_curve(0, "mlp", norm(bulk, bulk[0]), u), _curve(1, "mlp", norm(outlier, outlier[0]), u)], "layers")
    uni = allocate([_curve(0, "mlp", norm(bulk, bulk[u]), u), _curve(1, "mlp", norm(outlier, outlier[u]), u)], "layers")
    assert rel[1] <= 2 and sum(rel) == 2 * u
    assert abs(uni[1] - u) <= 1 and sum(uni) == 2 * u


@pytest.mark.parametrize("fam,kw", FAMS)
@pytest.mark.parametrize("kv", ["uniform", 0.4])
def test_allocate_all_with_kv_budget(fam, kw, kv):
    """across='all' + kv_budget: the parameter budget is met as without it, and the KV cache loses at least
    uniform A3's share (or the asked fraction); with no KV budget the cache is kept (nearly) whole."""
    base = tiny_model(fam, **kw)
    st_ = _stats(base)
    uni = a3mod.report(_apply(base, a3mod.a3_passes(0.3), st_))
    m = _apply(base, [a3mod.Allocate(budget=0.3, across="all", kv_budget=kv)], st_)
    rep = a3mod.report(m)
    assert rep.params <= uni.params
    full = rep.kv_bytes_per_token(orig=True)
    goal = uni.kv_bytes_per_token() if kv == "uniform" else (1 - kv) * full
    assert rep.kv_bytes_per_token() <= goal + 1e-9
    assert torch.isfinite(m(input_ids()).logits).all()
    assert a3mod.pass_from_dict(a3mod.pass_to_dict(a3mod.Allocate(budget=0.3, across="all", kv_budget=kv))) == \
        a3mod.Allocate(budget=0.3, across="all", kv_budget=kv)


def _kv_curve(layer, comp, loss, uniform, cost, kv):
    return Curve(layer, comp, 1, torch.tensor(loss, dtype=torch.float64), cost, uniform, kv)


@given(st.lists(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), min_size=3, max_size=6),
       st.integers(0, 12))
def test_allocate_kv_goal_meets_both_budgets(incs, kv_goal):
    """Every curve set: the allocation removes at least the parameter goal and the KV goal, and costs no more
    loss than one greedy that meets them with one fixed price (the grid includes mu = 0)."""
    cs = []
    for i, inc in enumerate(incs):
        inc = sorted(inc, reverse=True)
        loss = [sum(inc[k:]) for k in range(len(inc) + 1)]
        comp = ("qk", "ov", "mlp")[i % 3]
        cs.append(_kv_curve(i, comp, loss, 2, 3 if comp == "mlp" else 1, 0 if comp == "mlp" else 1))
    kv_goal = min(kv_goal, sum(c.units - 1 for c in cs if c.kv))
    kept = allocate(cs, "all", 0.0, kv_goal)
    goal = sum((c.units - c.uniform) * c.cost for c in cs)
    assert sum((c.units - k) * c.cost for c, k in zip(cs, kept)) >= goal
    assert sum((c.units - k) * c.kv for c, k in zip(cs, kept)) >= kv_goal
    assert all(1 <= k <= c.units for c, k in zip(cs, kept))


def test_kv_budget_validated():
    with pytest.raises(a3mod.A3ModError, match="needs across='all'"):
        a3mod.Allocate(budget=0.2, kv_budget="uniform")
    for bad in (1.0, -0.1, "half", True):
        with pytest.raises(a3mod.A3ModError, match="kv_budget="):
            a3mod.Allocate(budget=0.2, across="all", kv_budget=bad)
