"""The ratio asked is the ratio removed: with q/k norms QK stays whole, and `passes.balance.balance` takes its share
from OV and MLP (one raised ratio), or names the largest reachable ratio in a RatioError."""
from __future__ import annotations

import pytest
import torch

import a3mod
from a3mod.arch import layer_views
from a3mod.errors import RatioError
from a3mod.passes.a3 import A3MLP, A3OV, A3QK
from a3mod.passes.balance import balance
from a3mod.report import report
from zoo import _ids, _logits, tiny_zoo_model


@pytest.mark.parametrize("mtype", ["qwen3", "olmo2", "gemma3_text"])
@pytest.mark.parametrize("ratio", [0.2, 0.3])
def test_qk_norm_models_remove_the_ratio_asked(mtype, ratio):
    model = tiny_zoo_model(mtype).eval()
    a3mod.apply(model, a3mod.a3_passes(ratio), calib=_ids(4, 16, 1), progress=False)
    rep = report(model)
    assert abs(rep.ratio - ratio) < 0.015, rep.ratio            # kept-dim rounding on tiny widths only
    assert all(r.qk_dim == r.head_dim for r in rep.rows if not r.left)     # QK itself stays whole
    assert torch.isfinite(_logits(model, _ids(2, 8, 0))).all()


def test_the_others_are_raised_to_one_ratio_that_gives_the_qk_share():
    views = layer_views(tiny_zoo_model("qwen3"))
    got = balance(a3mod.a3_passes(0.3), views)
    assert got[0] == A3QK(ratio=0.3) and got[1].ratio == got[2].ratio > 0.3
    v = views[0]
    d, inter = v.dims, v.mlp_params()[1][0].shape[0]
    qk = (d.heads + d.kv_heads) * d.hidden * d.head_dim
    ov = (d.kv_heads + d.heads) * d.hidden * d.head_dim
    mlp = 3 * d.hidden * inter
    assert got[1].ratio == pytest.approx(0.3 * (qk + ov + mlp) / (ov + mlp), abs=1e-6)


def test_requests_that_are_not_one_uniform_ratio_are_left_alone():
    views = layer_views(tiny_zoo_model("qwen3"))
    mixed = [A3QK(ratio=0.3), A3OV(ratio=0.2), A3MLP(ratio=0.3)]
    assert balance(mixed, views) == mixed
    ranks = [A3QK(rank=8), A3OV(rank=8)]
    assert balance(ranks, views) == ranks
    assert balance(a3mod.a3_passes(0.3), layer_views(tiny_zoo_model("llama"))) == a3mod.a3_passes(0.3)


def test_an_unreachable_ratio_names_the_largest_reachable_one():
    model = tiny_zoo_model("qwen3").eval()
    before = _logits(model, _ids(2, 8, 0))
    with pytest.raises(RatioError, match=r"largest reachable ratio is 0\.\d+"):
        a3mod.apply(model, a3mod.a3_passes(0.85), calib=_ids(4, 16, 1), progress=False)
    torch.testing.assert_close(_logits(model, _ids(2, 8, 0)), before, rtol=0, atol=0)     # untouched


def test_streaming_balances_the_same_way(tmp_path):
    from test_stream import assert_streaming_equals_in_memory

    assert_streaming_equals_in_memory(tiny_zoo_model("qwen3").eval(), tmp_path, a3mod.a3_passes(0.3))


@pytest.mark.parametrize("across", ["layers", "all"])
def test_allocate_under_qk_norms_meets_its_budget(across):
    """Allocate has no QK curve in a qk-norm layer (QK stays whole); the others' uniform reference is the raised
    ratio, so the budget is the fraction of all compressed parameters removed."""
    model = tiny_zoo_model("qwen3").eval()
    a3mod.apply(model, [a3mod.Allocate(budget=0.3, across=across)], calib=_ids(8, 16, 1), progress=False)
    rep = report(model)
    assert abs(rep.ratio - 0.3) < 0.015, rep.ratio
    assert all(r.qk_dim == r.head_dim for r in rep.rows)
    assert torch.isfinite(_logits(model, _ids(2, 8, 0))).all()


def test_a3kv_refuses_qk_norm_by_name():
    from a3mod.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="K cache cannot shrink"):
        a3mod.apply(tiny_zoo_model("qwen3").eval(), [a3mod.A3KV(kv_ratio=0.3)], calib=_ids(4, 16, 1), progress=False)
