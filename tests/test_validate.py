"""a3mod.validate: one shape of check and message for every user-given number and option (pass configs,
quantization configs, heal), and the heal arguments and failures it guards."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import a3mod
from a3mod import validate
from a3mod.errors import A3ModError, CalibrationError, RatioError

from conftest import calib_ids, tiny_model

ANY = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10), st.booleans(),
                st.none(), st.text(max_size=3))


@given(ANY, st.booleans(), st.booleans())
def test_fraction_accepts_exactly_the_finite_reals_in_the_span(v, lo_open, hi_open):
    real = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    inside = real and (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
    if inside:
        out = validate.fraction("P", "x", v, lo_open=lo_open, hi_open=hi_open)
        assert out == v and type(out) is float
    else:
        with pytest.raises(RatioError, match=r"^P: x="):
            validate.fraction("P", "x", v, lo_open=lo_open, hi_open=hi_open)


@given(ANY, st.integers(0, 3))
def test_integer_refuses_bools_floats_and_small_values(v, lo):
    if isinstance(v, int) and not isinstance(v, bool) and v >= lo:
        assert validate.integer("P", "n", v, lo) == v
    else:
        with pytest.raises(A3ModError, match=r"^P: n="):
            validate.integer("P", "n", v, lo)


@pytest.mark.parametrize("v,allowed,ok", [(2, (1, 2), True), (2.0, (1, 2), False), (True, (1, 2), False),
                                          ("nf4", ("nf4", "fp4"), True), (True, (True, False), True),
                                          (1, (True, False), False)])
def test_choice_does_not_coerce(v, allowed, ok):
    if ok:
        assert validate.choice("P", "c", v, allowed) == v
    else:
        with pytest.raises(A3ModError, match="allowed"):
            validate.choice("P", "c", v, allowed)


@pytest.mark.parametrize("make,needle", [
    (lambda: a3mod.ASVD(ratio=0.2, alpha=math.inf), "alpha=inf"),
    (lambda: a3mod.ASVD(ratio=0.2, alpha=math.nan), "alpha=nan"),
    (lambda: a3mod.ASVD(ratio=0.2, probe_samples=True), "probe_samples=True"),
    (lambda: a3mod.Allocate(budget=math.nan), "budget=nan"),
    (lambda: a3mod.A3KV(kv_ratio=True), "kv_ratio=True"),
    (lambda: a3mod.BnbInt8(threshold=math.inf), "threshold=inf"),
    (lambda: a3mod.Bnb4bit(blocksize=64.0), "blocksize=64.0"),
    (lambda: a3mod.HQQ(axis=True), "axis=True"),
])
def test_configs_refuse_non_finite_and_bool_numbers(make, needle):
    with pytest.raises(A3ModError, match=needle):
        make()


@pytest.fixture(scope="module")
def healing():
    model = tiny_model("llama", kv_heads=2).eval()
    teacher, calib = copy.deepcopy(model), calib_ids(n=4, seq_len=16)
    a3mod.apply(model, a3mod.a3_passes(0.4), calib=calib, progress=False)
    return model, teacher, calib


@pytest.mark.parametrize("kw,needle", [({"steps": True}, "steps=True"), ({"steps": 2.0}, "steps=2.0"),
                                       ({"temperature": math.inf}, "temperature=inf"),
                                       ({"temperature": 1e-30}, "temperature=1e-30"),
                                       ({"lr": math.nan}, "lr=nan"), ({"batch_size": 0}, "batch_size=0"),
                                       ({"weight_decay": -1.0}, "weight_decay=-1.0")])
def test_heal_refuses_bad_numbers_before_any_step(healing, kw, needle):
    model, teacher, calib = healing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(A3ModError, match=needle):
        a3mod.heal(model, teacher, calib, progress=False, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad,needle", [(torch.zeros(0, 8, dtype=torch.long), "no tokens"),
                                        (torch.full((2, 8), 10 ** 6), "outside the vocabulary"),
                                        (torch.full((2, 8), -1), "outside the vocabulary")])
def test_heal_refuses_calibration_it_cannot_use(healing, bad, needle):
    model, teacher, _ = healing
    with pytest.raises(CalibrationError, match=needle):
        a3mod.heal(model, teacher, bad, progress=False)


def test_failed_heal_leaves_the_model_as_it_was(healing, monkeypatch):
    """A loss that becomes NaN mid-run (here: the teacher's logits turn NaN at step 3) is an A3ModError, and every
    weight is restored to its value before heal."""
    model, teacher, calib = healing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    forward = teacher.forward

    def poisoned(*a, **kw):
        out = forward(*a, **kw)
        calls["n"] += 1
        if calls["n"] >= 3:
            out.logits = out.logits * math.nan
        return out

    monkeypatch.setattr(teacher, "forward", poisoned)
    with pytest.raises(A3ModError, match="left as it was"):
        a3mod.heal(model, teacher, calib, steps=6, lr=1e-2, progress=False)
    assert calls["n"] >= 3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "heal" not in (getattr(model, "a3mod_info", None) or {})


@pytest.mark.parametrize("kw,needle", [(dict(seq_len=True), "seq_len=True"), (dict(seq_len=1), "seq_len=1"),
                                       (dict(batch_size=0), "batch_size=0"), (dict(max_windows=2.0), "max_windows"),
                                       (dict(cache=lambda: None, chunk=True), "chunk=True")])
def test_perplexity_arguments_go_through_the_shared_checks(kw, needle):
    """Booleans are not counts (the ad-hoc checks let True through as 1)."""
    model = tiny_model("llama")
    with pytest.raises(A3ModError, match=f"perplexity: {needle}"):
        a3mod.perplexity(model, calib_ids(1, 64), progress=False, **{"seq_len": 16, **kw})


@pytest.mark.parametrize("kw,needle", [(dict(group_size=True), "group_size=True"),
                                       (dict(residual_length=-1), "residual_length=-1"),
                                       (dict(nbits=True), "nbits=True"), (dict(nbits=5), "nbits=5")])
def test_quantized_cache_arguments_go_through_the_shared_checks(kw, needle):
    from a3mod.quant.configs import QuantizationError

    with pytest.raises(QuantizationError, match=needle):
        a3mod.quantized_cache(tiny_model("llama"), "hqq", **{"nbits": 4, **kw})
