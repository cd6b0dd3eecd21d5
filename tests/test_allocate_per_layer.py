"""Per-layer ranks of the A3 passes (`ranks=`) and Allocate resolved into them (qk_update / seq_refit)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod.passes.a3 import full_dims, layer_configs
from a3mod.passes.allocate import allocated_ranks
from a3mod.arch import layer_views

from conftest import calib_ids, input_ids, tiny_model

MIX = dict(budget=0.3, across="all", kv_budget="uniform")


def _dims(model) -> list[tuple[int, int, int]]:
    return [(r.qk_dim, r.vo_dim, r.mlp_dim) for r in a3mod.report(model).rows]


def _ranks_of(model) -> dict[str, tuple]:
    rows = a3mod.report(model).rows
    return {"qk": tuple(r.qk_dim for r in rows), "ov": tuple(r.vo_dim for r in rows),
            "mlp": tuple(r.mlp_dim for r in rows)}


def test_ranks_validated_and_round_trip():
    with pytest.raises(a3mod.A3ModError, match="takes no ratio"):
        a3mod.A3QK(ratio=0.2, ranks=(4, 4))
    with pytest.raises(a3mod.A3ModError, match="takes no ratio"):
        a3mod.A3MLP(ranks=(4, 4), multiple_of=8)
    with pytest.raises(a3mod.A3ModError, match="non-empty list"):
        a3mod.A3OV(ranks=())
    with pytest.raises(a3mod.A3ModError, match="ranks"):
        a3mod.A3MLP(ranks=(4, -1))
    with pytest.raises(a3mod.A3ModError, match="exactly one"):
        a3mod.A3MLP()
    p = a3mod.A3MLP(ranks=[8, None, 6], update=True)
    assert p.ranks == (8, None, 6)
    assert p.at_layer(0) == a3mod.A3MLP(rank=8, update=True)
    assert p.at_layer(1) is None and p.at_layer(7) is None
    assert a3mod.A3MLP(ratio=0.2).at_layer(3) == a3mod.A3MLP(ratio=0.2)
    assert layer_configs([a3mod.A3QK(ranks=(2, None)), p], 1) == []
    d = a3mod.pass_to_dict(p)
    d["ranks"] = list(d["ranks"])                              # as JSON gives it back
    assert a3mod.pass_from_dict(d) == p


def test_ranks_that_do_not_fit_are_refused_before_calibration():
    base = tiny_model("llama", kv_heads=2, layers=3)
    too_big = full_dims(layer_views(base)[0])["mlp"] + 8
    with pytest.raises(a3mod.RatioError):
        a3mod.apply(base, [a3mod.A3MLP(ranks=(8, too_big, 8))], calib=calib_ids(), progress=False)


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_ranks_equal_to_uniform_reproduce_uniform_a3(fam):
    base = tiny_model(fam, kv_heads=2, layers=3)
    stats = a3mod.collect(base, calib_ids(8, 32), progress=False)
    uni = a3mod.apply(copy.deepcopy(base), a3mod.a3_passes(0.3), stats=stats, progress=False)
    r = _ranks_of(uni)
    per = a3mod.apply(copy.deepcopy(base), [a3mod.A3QK(ranks=r["qk"]), a3mod.A3OV(ranks=r["ov"]),
                                            a3mod.A3MLP(ranks=r["mlp"])], stats=stats, progress=False)
    x = input_ids()
    torch.testing.assert_close(per(x).logits, uni(x).logits)


@settings(max_examples=6, deadline=None)
@given(st.data())
def test_ranks_give_each_layer_its_dims_and_full_ranks_are_exact(data):
    base = tiny_model("llama", kv_heads=2, layers=3)
    full = full_dims(layer_views(base)[0])
    qk = tuple(2 * data.draw(st.integers(1, full["qk"] // 2)) for _ in range(3))      # whole RoPE pairs
    mlp = tuple(data.draw(st.integers(1, full["mlp"])) for _ in range(3))
    stats = a3mod.collect(base, calib_ids(8, 32), progress=False)
    m = a3mod.apply(copy.deepcopy(base), [a3mod.A3QK(ranks=qk), a3mod.A3MLP(ranks=mlp)], stats=stats,
                    progress=False)
    assert [(q, m_) for q, _, m_ in _dims(m)] == list(zip(qk, mlp))
    whole = a3mod.apply(copy.deepcopy(base), [a3mod.A3QK(ranks=(full["qk"],) * 3),
                                              a3mod.A3MLP(ranks=(full["mlp"],) * 3)], stats=stats, progress=False)
    x = input_ids()
    torch.testing.assert_close(whole(x).logits, base(x).logits, atol=2e-4, rtol=2e-4)


def test_allocate_per_layer_takes_allocates_ranks_and_runs_the_updates(tmp_path):
    base = tiny_model("llama", kv_heads=2, layers=3)
    calib = calib_ids(8, 32)
    plain = a3mod.apply(copy.deepcopy(base), [a3mod.Allocate(**MIX)], calib=calib, progress=False)
    cfg = a3mod.Allocate(**MIX, mlp_update=True, ov_update=True, qk_update=True, seq_refit=True,
                         refit_damping="heldout")
    m = a3mod.apply(copy.deepcopy(base), [cfg], calib=calib, progress=False)
    assert _dims(m) == _dims(plain)                           # the same ranks as Allocate from "a3" curves
    assert a3mod.report(m).kv_bytes_per_token() <= a3mod.report(
        a3mod.apply(copy.deepcopy(base), a3mod.a3_passes(0.3), calib=calib, progress=False)).kv_bytes_per_token()
    recorded = [a3mod.pass_from_dict(d) for d in m.a3mod_info["passes"]]
    assert [type(p).__name__ for p in recorded] == ["A3QK", "A3OV", "A3MLP", "A3Experts"]
    assert recorded[0].update and recorded[2].seq_refit and recorded[2].refit_damping == "heldout"
    assert recorded[2].ranks == _ranks_of(m)["mlp"]
    # the recorded per-layer passes, given again, rebuild the same model (the ranks are what Allocate resolved to)
    again = a3mod.apply(copy.deepcopy(base), recorded, calib=calib, progress=False)
    x = input_ids()
    torch.testing.assert_close(again(x).logits, m(x).logits)
    a3mod.save(m, tmp_path / "m")
    torch.testing.assert_close(a3mod.load(tmp_path / "m")(x).logits, m(x).logits)


def _qk_allocated(family: str):
    """(model, calib, Allocate(qk_update=True), what apply made of it, `allocated_ranks` on explicit statistics)."""
    base = tiny_model(family, kv_heads=2, layers=3)
    calib = calib_ids(8, 32)
    cfg = a3mod.Allocate(**MIX, qk_update=True)
    m = a3mod.apply(copy.deepcopy(base), [cfg], calib=calib, progress=False)
    stats = a3mod.collect(base, calib, kinds=("a3", "qkgram"), progress=False)
    return base, calib, cfg, m, allocated_ranks(cfg, layer_views(base), stats)


def test_allocate_qk_update_equals_its_per_layer_passes():
    base, calib, cfg, m, ranks = _qk_allocated("qwen2")
    ref = a3mod.apply(copy.deepcopy(base), cfg.layer_passes(ranks, 3), calib=calib, progress=False)
    x = input_ids()
    torch.testing.assert_close(m(x).logits, ref(x).logits)
    assert not torch.allclose(m(x).logits, a3mod.apply(copy.deepcopy(base), [a3mod.Allocate(**MIX)], calib=calib,
                                                      progress=False)(x).logits)      # the gains changed q_proj


def test_allocate_per_layer_errors():
    with pytest.raises(a3mod.A3ModError, match="refit_damping"):
        a3mod.Allocate(budget=0.2, refit_damping=0.1)
    with pytest.raises(a3mod.A3ModError, match="qk_update"):
        a3mod.Allocate(budget=0.2, qk_update="yes")
    base = tiny_model("llama", kv_heads=2, layers=3)
    stats = a3mod.collect(base, calib_ids(8, 32), progress=False)
    with pytest.raises(a3mod.A3ModError, match="seq_refit"):          # the re-fit calibrates from calib=
        a3mod.apply(copy.deepcopy(base), [a3mod.Allocate(budget=0.2, seq_refit=True)], stats=stats, progress=False)
    with pytest.raises(a3mod.A3ModError, match="layer-scope"):
        a3mod.compress_streaming("x", "y", [a3mod.Allocate(budget=0.2, qk_update=True)], calib_ids())


def test_allocate_with_the_qk_update_reads_the_qk_curves_after_it():
    """Allocate(qk_update=True) allocates from QK's curves after the QK update (greedy removal with fitted gains):
    its QK ranks are those of `allocated_ranks` on statistics holding "qkgram", and may differ from A3's curves'."""
    base, calib, _, m, ranks = _qk_allocated("llama")
    assert _ranks_of(m)["qk"] == tuple(ranks[i, "qk"] for i in range(3))
    assert a3mod.report(m).kv_bytes_per_token() <= a3mod.report(
        a3mod.apply(copy.deepcopy(base), a3mod.a3_passes(0.3), calib=calib, progress=False)).kv_bytes_per_token()


@pytest.mark.parametrize("seq_refit", [False, True])
def test_allocate_collects_the_score_statistic_once(monkeypatch, seq_refit):
    """The statistics Allocate collected for its ranks ("a3", "qkgram") are reused by the run that solves the layers
    (layer by layer with the re-fit, one forward without): the score statistic is summed once per window and layer."""
    import a3mod.calib.stats as stats_mod
    calls = []
    real = stats_mod.score_gram
    monkeypatch.setattr(stats_mod, "score_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = tiny_model("llama", kv_heads=2, layers=3)
    calib = calib_ids(8, 32)
    cfg = a3mod.Allocate(**MIX, qk_update=True, mlp_update=True, seq_refit=seq_refit)
    a3mod.apply(copy.deepcopy(base), [cfg], calib=calib, progress=False)
    assert len(calls) == 8 * 3
