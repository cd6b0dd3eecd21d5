"""Mixture-of-experts: routed experts stored as fused 3-D parameters, reduced by A3Experts.

The experts module keeps its class and forward with narrower parameters (a3mod.arch.experts.narrowed); each
expert keeps its neurons with the largest combine-weighted CUR score over the tokens routed to it."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import a3mod
from a3mod.math import solvers
from a3mod.arch import layer_views
from a3mod.arch.experts import ExpertsView, narrowed
from a3mod.errors import RatioError
from a3mod.passes import A3Experts

from conftest import assert_sidecar_edits_refused
from zoo import _ids, _logits, tiny_zoo_model

MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "glm4_moe", "gpt_oss"]


def experts_of(mtype: str, layer: int = -1):
    model = tiny_zoo_model(mtype)
    v = layer_views(model)[layer]
    return model, v


def _experts_module(mtype: str):
    """The routed experts module of a tiny `mtype` (built directly: gpt-oss and Llama 4 attention is refused, their
    experts layouts are not)."""
    model = tiny_zoo_model(mtype)
    mod = next(m for m in model.modules() if type(m).__name__.endswith("Experts"))
    return mod, model.config.hidden_size


def _call(mod, ev: ExpertsView, x, idx, w):
    """The experts module on tokens x (T, d) routed to idx (T, k) with weights w (T, k), in its own calling form."""
    if ev.scaled_inputs:         # Llama 4: every expert gets every token scaled by its score (0 if not routed)
        scores = torch.zeros(x.shape[0], ev.num).scatter(1, idx, w)                   # (T, E)
        out = mod((x[None] * scores.t()[:, :, None]).reshape(-1, x.shape[-1]))
        return out.reshape(ev.num, x.shape[0], -1).sum(0)
    return mod(x, idx, w)


def _zeroed(mod, ev: ExpertsView, idx):
    """Reference: the original module with every dropped neuron's down-projection column set to zero."""
    import copy

    ref = copy.deepcopy(mod)
    keep = torch.zeros(ev.num, ev.inter, dtype=torch.bool).scatter(1, idx, True)
    with torch.no_grad():
        d = ref.down_proj
        if ev.transposed:        # (E, I, d)
            d.mul_(keep[:, :, None])
        else:                    # (E, d, I)
            d.mul_(keep[:, None, :])
    return ref


@pytest.mark.parametrize("mtype", ["mixtral", "gpt_oss", "llama4_text", "qwen2_moe"])
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), keep=st.sampled_from([8, 16, 24, 32]))
def test_narrowed_equals_dropping_neurons(mtype, seed, keep):
    """Every layout (concatenated / interleaved gate-up, transposed, biases, gpt-oss's clamped gate, Llama 4's
    pre-scaled inputs): keeping neurons == zeroing the dropped ones; all kept == the original exactly."""
    mod, hidden = _experts_module(mtype)
    ev = ExpertsView(mod, hidden)
    g = torch.Generator().manual_seed(seed)
    keep = min(keep, ev.inter)
    idx = torch.stack([torch.randperm(ev.inter, generator=g)[:keep].sort().values for _ in range(ev.num)])
    x = torch.randn(10, hidden, generator=g)
    route = torch.stack([torch.randperm(ev.num, generator=g)[:2] for _ in range(10)])
    w = torch.rand(10, 2, generator=g)
    with torch.no_grad():
        small = narrowed(mod, hidden, idx)
        assert ExpertsView(small, hidden).inter == keep
        got = _call(small, ExpertsView(small, hidden), x, route, w)
        want = _call(_zeroed(mod, ev, idx), ev, x, route, w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        full = narrowed(mod, hidden, torch.arange(ev.inter).repeat(ev.num, 1))
        assert torch.equal(_call(full, ev, x, route, w), _call(mod, ev, x, route, w))
    assert mod.down_proj.shape[1 if ev.transposed else 2] == ev.inter      # the original is untouched


def test_statistics_are_the_routed_weighted_squares():
    """e2[e] = sum over tokens routed to e of w^2 h^2, h computed here from the raw weights; en = token counts."""
    model, v = experts_of("mixtral", 0)
    calib = _ids(3, 16, 1)
    seen = []
    hook = v.experts.register_forward_pre_hook(lambda m, args: seen.append(args))
    stats = a3mod.collect(model, calib, progress=False)
    hook.remove()
    x, idx, w = (torch.cat([a[j] for a in seen]) for j in range(3))
    gu, down = v.experts.gate_up_proj.detach().double(), v.experts.down_proj
    inter = down.shape[2]
    e2 = torch.zeros(gu.shape[0], inter, dtype=torch.float64)
    en = torch.zeros(gu.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            z = gu[e] @ x[t].double()
            h = torch.nn.functional.silu(z[:inter]) * z[inter:]
            e2[e] += float(w[t, j]) ** 2 * h ** 2
            en[e] += 1
    torch.testing.assert_close(stats.layers[0]["e2"], e2, rtol=1e-4, atol=1e-9)
    assert torch.equal(stats.layers[0]["en"], en)
    assert en.sum() == calib.numel() * model.config.num_experts_per_tok


def test_batched_selection_equals_per_expert_cur():
    g = torch.Generator().manual_seed(0)
    h2, down = torch.rand(5, 40, generator=g, dtype=torch.float64), torch.randn(5, 40, 12, generator=g,
                                                                                 dtype=torch.float64)
    idx, loss = solvers.experts_select(h2, down.square().sum(-1), 16)
    for e in range(5):
        i, l_e = solvers.mlp_select(h2[e], down[e], 16)
        assert torch.equal(idx[e], i)
        torch.testing.assert_close(loss[e], l_e)
    assert (loss[:, :-1] >= loss[:, 1:]).all() and (loss[:, -1] == 0).all()


def _block_error(model_a, model_b, layer: int, calib) -> float:
    """Relative error of layer `layer`'s MoE block output of model_b vs model_a on the calibration tokens."""
    outs = []
    for m in (model_a, model_b):
        got = []
        v = layer_views(m)[layer]
        block = v.experts_path.rpartition(".")[0]
        h = v.layer.get_submodule(block).register_forward_hook(lambda mod, i, o: got.append(o[0] if isinstance(
            o, tuple) else o))
        _logits(m, calib)
        h.remove()
        outs.append(got[0])
    return float((outs[1] - outs[0]).norm() / outs[0].norm())


def test_error_shrinks_as_experts_keep_more_and_beats_random():
    calib = _ids(4, 16, 1)
    ref = tiny_zoo_model("mixtral")
    errs = []
    for rank in (16, 48, 96, 128):
        m = tiny_zoo_model("mixtral")
        a3mod.apply(m, [A3Experts(rank=rank, min_tokens=0)], calib=calib, progress=False)
        errs.append(_block_error(ref, m, 0, calib))
    assert errs[-1] == 0.0
    assert errs[0] > errs[1] > errs[2] > errs[3], errs
    # the scores beat random subsets of the same size on the data they were fitted on
    g = torch.Generator().manual_seed(3)
    rand = []
    for _ in range(4):
        m = tiny_zoo_model("mixtral")
        v = layer_views(m)[0]
        ev = v.experts_view()
        idx = torch.stack([torch.randperm(ev.inter, generator=g)[:48].sort().values for _ in range(ev.num)])
        v.layer.mlp.experts = narrowed(v.experts, 64, idx)
        rand.append(_block_error(ref, m, 0, calib))
    assert errs[1] < min(rand), (errs[1], rand)


@pytest.mark.parametrize("mtype", MOE)
def test_moe_family_end_to_end(mtype, tmp_path):
    """Full rank exact; 30% on target with the experts narrowed; the report's per-token parameters; save / load
    bit exact; cached generate == uncached."""
    calib, ids = _ids(4, 16, 1), _ids(2, 12, 0)
    model = tiny_zoo_model(mtype)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib, progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-5
    model = tiny_zoo_model(mtype)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib, progress=False)
    rep = a3mod.report(model)
    moe = [r for r in rep.rows if r.experts]
    assert moe and all(r.expert_dim < r.expert_orig and r.expert_dim % 8 == 0 for r in moe)
    assert moe[0].experts_active == model.config.num_experts_per_tok
    assert all(r.active_params() < r.params and r.active_params(True) < r.params_orig for r in moe)
    assert 0.2 <= rep.ratio <= 0.4 and "routed experts" in str(rep)
    path = a3mod.save(model, tmp_path / mtype)
    side = json.loads((path / "a3mod.json").read_text())
    assert any("experts" in e for e in side["layers"].values())
    loaded = a3mod.load(path)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[x], sb[x]) for x in sa)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    p = _ids(1, 5, 7)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(p, use_cache=True, **kw), loaded.generate(p, use_cache=False, **kw))


def test_fallback_for_rarely_routed_experts_is_reported(tmp_path):
    calib = _ids(2, 12, 1)
    model = tiny_zoo_model("mixtral")
    a3mod.apply(model, [A3Experts(ratio=0.5, min_tokens=10**6)], calib=calib, progress=False)
    rep = a3mod.report(model)
    assert all(r.experts_fallback == r.experts for r in rep.rows)
    assert "scored from weights" in str(rep)
    # the weight-only score: ||gate row||^2 ||up row||^2 ||down column||^2
    v = layer_views(tiny_zoo_model("mixtral"))[0]
    ev = v.experts_view()
    gate, up = ev.up_rows(1)
    score = gate.double().square().sum(-1) * up.double().square().sum(-1) * ev.down_cols()[1].double().square().sum(0)
    want = score.argsort(descending=True)[:64].sort().values
    assert model.model.layers[0].mlp.experts.a3mod_experts["kept"][1] == want.tolist()
    loaded = a3mod.load(a3mod.save(model, tmp_path / "fb"))
    assert a3mod.report(loaded).rows[0].experts_fallback == rep.rows[0].experts


def test_experts_requests_are_checked_before_calibration():
    model = tiny_zoo_model("mixtral")
    with pytest.raises(RatioError, match="multiple of 8"):
        a3mod.apply(model, [A3Experts(rank=12)], calib=_ids(2, 12, 1), progress=False)
    with pytest.raises(RatioError, match="exceeds"):
        a3mod.apply(model, [A3Experts(rank=256)], calib=_ids(2, 12, 1), progress=False)
    with pytest.raises(RatioError, match="min_tokens"):
        A3Experts(ratio=0.2, min_tokens=-1)
    assert not any(hasattr(m, "a3mod_experts") for m in model.modules())


def test_corrupted_experts_entry_is_refused(tmp_path):

    model = tiny_zoo_model("mixtral")
    a3mod.apply(model, a3mod.a3_passes(0.5), calib=_ids(2, 12, 1), progress=False)
    path = a3mod.save(model, tmp_path / "m")
    assert_sidecar_edits_refused(path, "0", "experts", [{"orig_inter": 64}, {"kept": [[0, 0]] * 4},
                                                         {"kept": [[1, 2], [1]] * 2}, {"kept": [[999] * 64] * 4}])


def test_streaming_equals_in_memory_for_moe(tmp_path):
    from test_stream import assert_streaming_equals_in_memory

    out, model = assert_streaming_equals_in_memory(tiny_zoo_model("qwen2_moe"), tmp_path, calib=_ids(4, 16, 1))
    loaded = a3mod.load(out)
    ids = _ids(2, 12, 0)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("across", ["layers", "all"])
def test_allocate_gives_experts_per_layer_widths_on_uniform_budget(across, tmp_path):
    """Allocate treats an MoE layer's routed experts as one more component (one width per layer, from the summed
    per-expert loss curves): the same parameters removed as uniform A3, finite, save / load exact."""
    calib, ids = _ids(4, 16, 1), _ids(2, 12, 0)
    uni = tiny_zoo_model("qwen2_moe")
    a3mod.apply(uni, a3mod.a3_passes(0.3), calib=calib, progress=False)
    mix = tiny_zoo_model("qwen2_moe")
    a3mod.apply(mix, [a3mod.Allocate(budget=0.3, across=across)], calib=calib, progress=False)
    ru, rm = a3mod.report(uni), a3mod.report(mix)
    assert all(r.experts for r in rm.rows)
    step = 8 * sum(r.experts for r in rm.rows) * 3 * 64      # one unit of experts width, for slack
    assert abs(rm.params - ru.params) <= step, (rm.params, ru.params)
    assert torch.isfinite(_logits(mix, ids)).all()
    loaded = a3mod.load(a3mod.save(mix, tmp_path / "mix"))
    assert torch.equal(_logits(loaded, ids), _logits(mix, ids))


@settings(max_examples=8, deadline=None)
@given(mtype=st.sampled_from(MOE), seed=st.integers(0, 2**16))
def test_full_rank_is_exact_for_every_moe_family(mtype, seed):
    model = tiny_zoo_model(mtype, seed)
    ids = _ids(2, 10, seed % 5)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(4, 16, seed % 3), progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-5


def test_llama4_moe_layers_compress():
    """Llama 4 (adapter): its MoE layers' routed experts and shared expert are narrowed (tests/test_llama4.py for the
    attention)."""
    model = tiny_zoo_model("llama4_text")
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    rep = a3mod.report(model)
    assert all(r.experts and r.expert_dim < r.expert_orig for r in rep.rows)


def test_experts_narrowed_in_place_count_as_compressed():
    """Routed experts narrowed in place keep their class; the codecs still find them, so a second apply is refused
    instead of narrowing them again."""
    model = tiny_zoo_model("mixtral")
    a3mod.apply(model, [A3Experts(ratio=0.3, min_tokens=0)], calib=_ids(4, 16, 1), progress=False)
    with pytest.raises(a3mod.A3ModError, match="already compressed"):
        a3mod.apply(model, [A3Experts(ratio=0.3, min_tokens=0)], calib=_ids(4, 16, 1), progress=False)


def test_llama4_experts_narrowed_to_the_hidden_size_report_save_and_load(tmp_path):
    """Llama 4's experts carry no layout flags; narrowed to exactly d_m neurons their down_proj is square, and the
    fused gate/up projection's shape tells the layout (this was refused as ambiguous: no report, no load)."""
    model = tiny_zoo_model("llama4_text")
    hidden = model.config.hidden_size
    v = next(v for v in layer_views(model) if v.experts is not None)
    ratio = 1 - hidden / v.experts_view().inter
    a3mod.apply(model, [A3Experts(ratio=ratio, min_tokens=0)], calib=_ids(4, 16, 1), progress=False)
    mod = next(v for v in layer_views(model) if v.experts is not None).experts
    assert mod.down_proj.shape[1] == mod.down_proj.shape[2] == hidden
    assert any(r.experts and r.expert_dim == hidden for r in a3mod.report(model).rows)
    loaded = a3mod.load(a3mod.save(model, tmp_path / "m"))
    ids = _ids(2, 10, 0)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
