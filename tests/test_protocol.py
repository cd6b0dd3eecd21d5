"""The pass protocol (one registry, scopes, versioned configs), recipes and Stats.ensure."""
from __future__ import annotations

import dataclasses

import pytest

import a3mod
from a3mod import A3ModError, CalibrationError, RatioError
from a3mod.pipeline import recipes
from a3mod.passes.base import PASSES, PassConfig, pass_from_dict, pass_to_dict, register_pass, scope_of

from conftest import calib_ids, tiny_model

ALL = [a3mod.A3QK(ratio=0.2), a3mod.A3OV(rank=4), a3mod.A3MLP(ratio=0.1, multiple_of=8), a3mod.Allocate(0.2),
       a3mod.A3KV(0.5, mixed=True), a3mod.ASVD(kv_ratio=0.5), a3mod.SVDLLM(ratio=0.2), a3mod.PlainSVD(rank=3),
       a3mod.HQQ(nbits=4), a3mod.Bnb4bit(), a3mod.BnbInt8()]


def test_every_pass_is_registered_once_with_a_scope_and_round_trips():
    assert {type(p) for p in ALL} <= set(PASSES)
    assert {scope_of(p) for p in ALL} == {"layer", "model", "linear"}
    assert [scope_of(p) for p in ALL[:3]] == ["layer"] * 3
    for p in ALL:
        d = pass_to_dict(p)
        assert d["version"] == type(p).VERSION and d["type"] == type(p).__name__
        assert pass_from_dict(d) == p and isinstance(p, PassConfig)


def test_pass_dicts_from_newer_versions_or_with_unknown_fields_are_refused():
    d = pass_to_dict(a3mod.A3QK(ratio=0.2))
    with pytest.raises(A3ModError, match="version 2"):
        pass_from_dict({**d, "version": 2})
    with pytest.raises(A3ModError, match=r"unknown fields \['surprise'\]"):
        pass_from_dict({**d, "surprise": 1})
    assert pass_from_dict({k: v for k, v in d.items() if k != "version"}) == a3mod.A3QK(ratio=0.2)   # hand-written
    with pytest.raises(RatioError, match="ratio=2"):
        pass_from_dict({**d, "ratio": 2})                            # the constructor's checks run


def test_register_pass_wants_a_pass_config():
    @dataclasses.dataclass(frozen=True)
    class Loose:
        x: int = 1

    with pytest.raises(TypeError, match="PassConfig"):
        register_pass(Loose)


def test_apply_refuses_unregistered_objects_and_two_model_passes():
    model = tiny_model("llama")
    with pytest.raises(A3ModError, match="not a pass config"):
        a3mod.apply(model, [object()], calib=calib_ids())
    with pytest.raises(A3ModError, match="give it alone"):
        a3mod.apply(model, [a3mod.SVDLLM(ratio=0.2), a3mod.A3QK(ratio=0.2)], calib=calib_ids())


@pytest.mark.parametrize("method,kw,want", [
    ("a3", dict(ratio=0.2), a3mod.a3_passes(0.2)),
    ("a3", dict(ratio=0.2, mlp_ratio=0.4, multiple_of=8),
     [a3mod.A3QK(ratio=0.2, multiple_of=8), a3mod.A3OV(ratio=0.2, multiple_of=8), a3mod.A3MLP(ratio=0.4, multiple_of=8),
      a3mod.A3Experts(ratio=0.4, multiple_of=8)]),
    ("a3-mix", dict(ratio=0.3, across="all"), [a3mod.Allocate(budget=0.3, across="all")]),
    ("a3", dict(kv_ratio=0.5), [a3mod.A3KV(kv_ratio=0.5)]),
    ("a3-mix", dict(kv_ratio=0.5), [a3mod.A3KV(kv_ratio=0.5, mixed=True)]),
    ("svd-llm", dict(ratio=0.2), [a3mod.SVDLLM(ratio=0.2)]),
    ("svd", dict(ratio=0.2), [a3mod.PlainSVD(ratio=0.2)]),
])
def test_recipes(method, kw, want):
    assert recipes.passes(method, **kw) == want


@pytest.mark.parametrize("method,kw,msg", [
    ("nope", dict(ratio=0.2), "allowed: a3"), ("svd", dict(kv_ratio=0.5), "not 'svd'"),
    ("asvd", dict(ratio=0.2, kv_ratio=0.5), "exactly one"), ("svd-llm", dict(ratio=0.2, qk_ratio=0.1), "A3 options"),
    ("a3-mix", dict(ratio=0.2, multiple_of=8), "multiple_of 8"), ("a3", dict(), "needs ratio"),
])
def test_recipe_errors(method, kw, msg):
    with pytest.raises(RatioError, match=msg):
        recipes.passes(method, **kw)


def test_stats_ensure_collects_only_what_is_missing():
    model, calib = tiny_model("llama"), calib_ids()
    s = a3mod.Stats.ensure(model, calib, {"a3"})
    assert s.kinds == {"a3"}
    same = a3mod.Stats.ensure(model, calib, {"a3", "gram"}, s)
    assert same is s and s.kinds == {"a3", "gram"}
    assert a3mod.Stats.ensure(model, calib, set()) is None
    with pytest.raises(CalibrationError, match=r"need the \['absmean'\] statistics"):
        a3mod.Stats.ensure(model, None, {"absmean"}, s)
    with pytest.raises(CalibrationError, match="another model"):
        a3mod.Stats.ensure(tiny_model("llama", seed=3), calib, {"a3"}, s)
