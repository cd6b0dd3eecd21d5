"""Components and layer plans (a3mod/pipeline/plan.py): one rounding rule, per-unit costs that add up, modules that describe
themselves."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import a3mod
from a3mod.arch import layer_views, spec_for
from a3mod.pipeline.plan import COMPONENTS, layer_plan
from a3mod.report import linear_param_count

from conftest import calib_ids, tiny_model


@given(full=st.integers(1, 2048), ratio=st.floats(0, 0.99), rope=st.booleans(), comp=st.sampled_from(list(COMPONENTS)))
def test_kept_follows_the_documented_unit(full, ratio, rope, comp):
    c = COMPONENTS[comp]
    unit = {"qk": 2 if rope else 1, "ov": 2 if full % 2 == 0 else 1, "mlp": 8 if full >= 512 else 1,
            "experts": 8 if full % 8 == 0 else 1}[comp]
    if comp == "qk" and rope and full % 2:
        return                                    # RoPE heads are even
    k = c.kept(full, ratio, None, rope)
    assert c.granule(full, rope) == unit
    assert k % unit == 0 or k == full
    assert unit <= k <= full or k == full
    assert abs(k - (1 - ratio) * full) <= unit / 2 + 1e-9 or k in (unit, full)


@pytest.mark.parametrize("family,kw", [("llama", {}), ("qwen2", {"kv_heads": 2}), ("gpt2", {})])
def test_per_dim_costs_add_up_to_the_removed_parameters(family, kw):
    """params(original) - params(compressed) == sum over components of dim_params * dims removed."""
    model = tiny_model(family, **kw)
    views = layer_views(model)
    before = [linear_param_count(v.layer) for v in views]
    gated = [v.spec.gate is not None or v.spec.gate_up is not None for v in views]
    biases, fold = [], []
    for v in views:
        (_, bq), (_, bk), (_, bv) = v.qkv_params()
        _, up, _ = v.mlp_params()
        biases.append({"q": bq is not None, "k": bk is not None, "up": up[1] is not None})
        # A3OV folds a value bias into o's bias (softmax rows sum to 1): the v bias goes, o gains one if it had none
        fold.append(0 if bv is None else bv.numel() - (0 if v.o_params()[1] is not None else v.dims.hidden))
    d = views[0].dims
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    spec = spec_for(model)
    for i, layer in enumerate(a3mod.arch.get_path(model, spec.layers)):
        plan = layer_plan(i, layer, spec, d)
        assert any(p.reduced for p in plan.parts.values())
        removed = sum(COMPONENTS[c].dim_params(d.hidden, d.heads, d.kv_heads, biases[i], gated[i])
                      * (plan.full(c) - plan.kept(c)) for c in COMPONENTS) + fold[i]
        assert before[i] - linear_param_count(layer) == removed, (family, i)


def test_report_reads_the_plans():
    model = tiny_model("llama")
    a3mod.apply(model, [a3mod.A3QK(rank=4), a3mod.A3OV(rank=6), a3mod.A3MLP(rank=40)], calib=calib_ids(),
                progress=False)
    rep = a3mod.report(model)
    for r in rep.rows:
        assert (r.qk_dim, r.vo_dim, r.mlp_dim, r.mlp_orig) == (4, 6, 40, 64)
        assert r.kv_elems == r.kv_heads * (4 + 6) and r.kv_elems_orig == 2 * r.kv_heads * r.head_dim
    attn = model.model.layers[0].self_attn
    assert [(p.comp, p.full, p.kept) for p in attn.plan_parts()] == [("qk", 8, 4), ("ov", 8, 6)]
    mlp = model.model.layers[0].mlp
    (part,) = mlp.plan_parts()
    assert part.full == 64 and part.kept == 40 and len(part.index) == 40 and list(part.index) == sorted(part.index)


def test_modules_describe_themselves_as_their_sidecar_entry(tmp_path):
    model = tiny_model("llama")
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    out = a3mod.save(model, tmp_path / "ck")
    side = a3mod.io.checkpoint.read_sidecar(out)
    layer = model.model.layers[1]
    assert side["layers"]["1"]["attn"] == layer.self_attn.describe()
    assert side["layers"]["1"]["mlp"] == layer.mlp.describe()
    assert torch.equal(a3mod.load(out).model.layers[1].self_attn.rope_index, layer.self_attn.rope_index)


@pytest.mark.parametrize("mtype", ["llama", "qwen2_moe"])
def test_handlers_plan_is_what_the_built_modules_describe(mtype):
    """The LayerPlan the handlers return (solve_layer) is the plan the compact modules built from it describe."""
    import sys
    from pathlib import Path

    from a3mod.passes.a3 import solve_layer

    sys.path.insert(0, str(Path(__file__).parent))
    from zoo import tiny_zoo_model

    model = tiny_zoo_model(mtype)
    calib = calib_ids()
    stats = a3mod.collect(model, calib % model.config.vocab_size, progress=False)
    passes = a3mod.a3_passes(0.3)
    views = layer_views(model)
    planned = {v.index: solve_layer(v, passes, stats)[1] for v in views}
    a3mod.apply(model, passes, stats=stats, progress=False)
    spec = spec_for(model)
    for v in views:
        got = layer_plan(v.index, get_path_layer(model, spec, v.index), spec, v.dims)
        want = planned[v.index]
        assert set(got.parts) == set(want.parts), (got.parts, want.parts)
        for c, p in want.parts.items():
            assert (got.full(c), got.kept(c)) == (p.full, p.kept), c
            if c == "mlp":
                assert got.parts[c].index == p.index


def get_path_layer(model, spec, i):
    from a3mod.arch import get_path

    return get_path(model, spec.layers)[i]
