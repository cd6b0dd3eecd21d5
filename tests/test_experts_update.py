"""A3Experts(update=True): each routed expert's kept down-projection columns re-fitted by least squares on the Gram
of its combine-weighted activations over the tokens routed to it (the MLP update, per expert)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import a3mod
from a3mod.arch import layer_views
from a3mod.passes import A3Experts

from zoo import _ids, _logits, tiny_zoo_model

LAYOUTS = ["mixtral", "gpt_oss", "qwen2_moe", "llama4_text"]     # fused / interleaved / biased / pre-scaled inputs


def _routed(model, calib) -> dict:
    """Per MoE layer index: per expert, the combine-weighted activations (T_e, I) of the tokens routed to it."""
    views = [v for v in layer_views(model) if v.experts is not None]
    got = {v.index: {} for v in views}
    hs = []
    for v in views:
        ev = v.experts_view()

        def hook(mod, args, kwargs, out, ev=ev, i=v.index):
            for e, x, w in ev.routed(args, kwargs):
                got[i].setdefault(e, []).append(ev.hidden_states(x, e).double() * w.double()[:, None])
        hs.append(v.experts.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        for b in range(calib.shape[0]):
            model(calib[b:b + 1])
    for h in hs:
        h.remove()
    return {i: {e: torch.cat(x) for e, x in d.items()} for i, d in got.items()}


def _down(view, transposed: bool) -> torch.Tensor:
    """(E, d_m, I) down columns of a layer's routed experts (`transposed`: stored (E, I, d_m), as the original view
    says; a narrowed Llama 4 module can be square, which its own view refuses to guess)."""
    d = view.experts.down_proj.detach().double()
    return d.transpose(1, 2) if transposed else d


def _layouts(model) -> dict:
    return {v.index: v.experts_view().transposed for v in layer_views(model) if v.experts is not None}


def _ridge(w, hh, kept, damping=0.01):
    """Brute force of the update: argmin over W' of E|h W - h_K W'|^2 + lam |W' - W_K|^2, lam relative to H_KK."""
    a, b = hh[kept][:, kept], hh[kept] @ w
    lam = damping * a.diagonal().mean()
    return w[kept] + torch.linalg.solve(a + lam * torch.eye(len(kept), dtype=a.dtype), b - a @ w[kept])


@pytest.mark.parametrize("mtype", LAYOUTS)
def test_update_equals_a_brute_force_least_squares_per_expert(mtype):
    model = tiny_zoo_model(mtype)
    calib = _ids(8, 16, 1)
    hw = _routed(model, calib)
    tr = _layouts(model)
    before = {v.index: _down(v, tr[v.index]) for v in layer_views(model) if v.experts is not None}
    a3mod.apply(model, [A3Experts(ratio=0.5, min_tokens=0, update=True)], calib=calib, progress=False)
    checked = 0
    for v in layer_views(model):
        if v.experts is None:
            continue
        kept, after = torch.tensor(v.experts.a3mod_experts["kept"]), _down(v, tr[v.index])
        for e, h in hw[v.index].items():
            hh = h.T @ h / h.shape[0]
            want = _ridge(before[v.index][e].t(), hh, kept[e]).t()             # (d_m, k)
            torch.testing.assert_close(after[e], want.to(after.dtype).double(), rtol=2e-4, atol=1e-6)
            checked += 1
    assert checked > 0


@settings(max_examples=6, deadline=None)
@given(mtype=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**16), ratio=st.sampled_from([0.25, 0.5, 0.75]))
def test_update_never_raises_the_routed_error_and_full_rank_is_exact(mtype, seed, ratio):
    model = tiny_zoo_model(mtype, seed)
    calib = _ids(6, 16, seed % 5)
    hw = _routed(model, calib)
    tr = _layouts(model)
    orig = {v.index: _down(v, tr[v.index]) for v in layer_views(model) if v.experts is not None}
    sel, upd = copy.deepcopy(model), copy.deepcopy(model)
    a3mod.apply(sel, [A3Experts(ratio=ratio, min_tokens=0)], calib=calib, progress=False)
    a3mod.apply(upd, [A3Experts(ratio=ratio, min_tokens=0, update=True)], calib=calib, progress=False)
    for vs, vu in zip(layer_views(sel), layer_views(upd)):
        if vs.experts is None:
            continue
        kept = torch.tensor(vu.experts.a3mod_experts["kept"])
        assert torch.equal(kept, torch.tensor(vs.experts.a3mod_experts["kept"]))      # the same selection
        for e, h in hw[vs.index].items():
            y = h @ orig[vs.index][e].t()                                           # the original expert output
            err = lambda v: float((y - h[:, kept[e]] @ _down(v, tr[v.index])[e].t()).square().sum())  # noqa: E731
            assert err(vu) <= err(vs) * (1 + 1e-6) + 1e-9
    full = copy.deepcopy(model)
    ids = _ids(2, 10, 3)
    a3mod.apply(full, [A3Experts(ratio=0.0, update=True)], calib=calib, progress=False)
    ref = _logits(model, ids)
    assert float((_logits(full, ids) - ref).norm() / ref.norm()) < 1e-5


def test_statistics_and_schedules(tmp_path):
    """The Gram kind sums what the hook sees; the layer-by-layer schedule gives the model collecting everything first
    gives; the updated columns survive save / load."""
    model = tiny_zoo_model("mixtral")
    calib = _ids(6, 16, 1)
    stats = a3mod.collect(model, calib, kinds=["a3", "ehgram"], progress=False)
    hw = _routed(model, calib)
    for e, h in hw[0].items():
        torch.testing.assert_close(stats.layers[0]["eh"][e], h.T @ h, rtol=1e-6, atol=1e-9)
    passes = a3mod.a3_passes(0.3)
    passes = passes[:3] + [A3Experts(ratio=0.3, update=True)]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a3mod.apply(a, passes, calib=calib, progress=False)
    a3mod.apply(b, passes, stats=stats, progress=False)
    ids = _ids(2, 12, 0)
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    plain = copy.deepcopy(model)
    a3mod.apply(plain, a3mod.a3_passes(0.3), calib=calib, progress=False)
    assert not torch.equal(_logits(a, ids), _logits(plain, ids))
    loaded = a3mod.load(a3mod.save(a, tmp_path / "m"))
    assert torch.equal(_logits(loaded, ids), _logits(a, ids))
    assert loaded.a3mod_info["passes"][3]["update"] is True


def test_bad_options_are_refused():
    for bad in (dict(update="yes"), dict(update=True, damping=-1.0), dict(update=True, damping=float("nan"))):
        with pytest.raises(a3mod.RatioError):
            A3Experts(ratio=0.3, **bad)
