"""A3 passes with `multiple_of`: kept dims rounded to hardware-friendly multiples (and the structural ones)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod.passes.base import kept_dim, pass_from_dict, pass_to_dict

from conftest import assert_close_logits, attn_modules, calib_ids, input_ids, logits, mlp_modules, tiny_model


@settings(max_examples=200, deadline=None)
@given(full=st.integers(1, 512), ratio=st.floats(0.0, 0.99), structural=st.sampled_from([1, 2, 8]),
       multiple=st.sampled_from([None, 1, 2, 4, 8, 16, 64]))
def test_kept_dim_is_the_nearest_common_multiple(full, ratio, structural, multiple):
    m = math.lcm(structural, multiple or 1)
    if multiple is not None and m > full and ratio > 0:      # nothing could be removed: refused, not a silent no-op
        with pytest.raises(a3mod.RatioError, match="nothing could be removed"):
            kept_dim("X", full, ratio, None, structural, multiple)
        return
    r = kept_dim("X", full, ratio, None, structural, multiple)
    assert 1 <= r <= full
    if r != full:                                       # clipped to the full dim only
        assert r % m == 0
        assert abs(r - (1 - ratio) * full) <= m / 2 + 1e-9 or r == m   # nearest multiple, at least one
    if multiple in (None, 1):                           # the default rounding is unchanged
        assert r == kept_dim("X", full, ratio, None, structural)


def _dims(model):
    return ([(a.qk_dim, a.vo_dim, a.rot_dim) for a in attn_modules(model)],
            [m.inter for m in mlp_modules(model)])


@pytest.mark.parametrize("family,kw", [("llama", dict(hidden=64, heads=2, kv_heads=1, head_dim=32, inter=64)),
                                       ("qwen2", dict(hidden=64, heads=2, kv_heads=2, head_dim=32, inter=64)),
                                       ("gpt2", dict(hidden=64, heads=2, inter=64))])
def test_multiple_of_8_rounds_every_kept_dim(family, kw):
    model = tiny_model(family, **kw)
    stats = a3mod.collect(model, calib_ids(8, 16), progress=False)
    default = a3mod.apply(tiny_model(family, **kw), a3mod.a3_passes(0.3), stats=stats, progress=False)
    eight = a3mod.apply(tiny_model(family, **kw), a3mod.a3_passes(0.3, multiple_of=8), stats=stats, progress=False)
    (att_d, mlp_d), (att_8, mlp_8) = _dims(default), _dims(eight)
    assert att_d[0][:2] == (22, 22) and mlp_d[0] == 45          # 0.7 x 32 = 22.4 -> 22 (pairs), 0.7 x 64 -> 45
    for qk, vo, rot in att_8:
        assert (qk, vo) == (24, 24) and rot in (0, 24)            # -> 24 (a multiple of 8 and of a RoPE pair)
    assert mlp_8 == [48] * len(mlp_8)
    ids = input_ids()
    assert_close_logits(logits(eight, ids), logits(eight, ids))   # runs, finite
    assert "qk 24 / vo 24" in str(eight)


def test_multiple_of_at_ratio_zero_is_the_original():
    model = tiny_model("llama", hidden=64, heads=2, kv_heads=1, head_dim=32, inter=64)
    ref = logits(model, input_ids())
    a3mod.apply(model, a3mod.a3_passes(0.0, multiple_of=16), calib=calib_ids(8, 16), progress=False)
    assert_close_logits(logits(model, input_ids()), ref, rel=1e-5)


def test_multiple_of_round_trips_and_validates():
    for p in a3mod.a3_passes(0.2, multiple_of=8):
        assert pass_from_dict(pass_to_dict(p)) == p
    assert pass_from_dict({"type": "A3QK", "ratio": 0.2}) == a3mod.A3QK(ratio=0.2)   # a hand-written recipe
    with pytest.raises(a3mod.RatioError, match="multiple_of=0 must be a positive integer"):
        a3mod.A3OV(ratio=0.2, multiple_of=0)
    with pytest.raises(a3mod.RatioError, match="rank=16 is used as given"):
        a3mod.A3MLP(rank=16, multiple_of=8)
    with pytest.raises(TypeError):
        a3mod.SVDLLM(ratio=0.2, multiple_of=8)                   # only the A3 passes take it


@pytest.mark.parametrize("argv,ok", [(["--method", "a3", "--ratio", "0.2", "--multiple-of", "8", "--updates", "off"], True),
                                     (["--method", "svd-llm", "--ratio", "0.2", "--multiple-of", "8"], False),
                                     (["--method", "a3", "--kv-ratio", "0.5", "--multiple-of", "8"], False)])
def test_cli_multiple_of(argv, ok):
    from a3mod.cli.commands import build_parser, _passes
    args = build_parser().parse_args(["compress", "--model", "m", "--out", "o", *argv])
    if ok:
        assert _passes(args) == a3mod.a3_passes(0.2, multiple_of=8)
    else:
        with pytest.raises(a3mod.RatioError, match="--multiple-of 8"):
            _passes(args)
