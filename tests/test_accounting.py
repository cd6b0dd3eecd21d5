"""Rank rounding, exact parameter accounting and KV-cache bytes of the report."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import a3mod
from a3mod.passes.base import kept_dim

from conftest import FAMILIES, attn_modules, calib_ids, input_ids, mlp_modules, tiny_model


# ---------------------------------------------------------------------------------------- kept_dim
@pytest.mark.parametrize("full,ratio,multiple,expected", [
    (8, 0.0, 2, 8), (8, 0.3, 2, 6), (8, 0.5, 2, 4), (8, 0.9, 2, 2), (8, 0.99, 2, 2),
    (64, 0.2, 2, 52), (64, 0.25, 2, 48), (128, 0.3, 2, 90),
    (11, 0.3, 1, 8), (11, 0.95, 1, 1), (64, 0.3, 1, 45),
    (512, 0.0, 8, 512), (512, 0.3, 8, 360), (1000, 0.33, 8, 672), (1536, 0.2, 8, 1232),
])
def test_kept_dim_examples(full, ratio, multiple, expected):
    assert kept_dim("A3X", full, ratio, None, multiple) == expected


@given(full=st.integers(1, 4096), ratio=st.floats(0.0, 0.999), multiple=st.sampled_from([1, 2, 8]))
@settings(max_examples=25)
def test_kept_dim_properties(full, ratio, multiple):
    if multiple > full:
        return
    r = kept_dim("A3X", full, ratio, None, multiple)
    assert r % multiple == 0 or r == full            # "keep everything" needs no rounding
    assert multiple <= r <= full
    # nearest multiple to (1 - ratio) * full, unless clamped to [multiple, full]
    target = (1 - ratio) * full
    if multiple < r < full - multiple:
        assert abs(r - target) <= multiple / 2 + 1e-9


def test_kept_dim_rank_is_returned_verbatim_or_rejected():
    assert kept_dim("A3QK", 8, None, 6, 2) == 6
    assert kept_dim("A3MLP", 512, None, 256, 8) == 256
    with pytest.raises(a3mod.RatioError, match="rank=9 exceeds the full dimension 8"):
        kept_dim("A3QK", 8, None, 9, 2)
    with pytest.raises(a3mod.RatioError, match="rank=5 must be a multiple of 2"):
        kept_dim("A3QK", 8, None, 5, 2)
    with pytest.raises(a3mod.RatioError, match="rank=100 must be a multiple of 8"):
        kept_dim("A3MLP", 512, None, 100, 8)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ranks_used_by_apply(family):
    """RoPE keeps even q/k dims; OV even for even heads; the MLP rounds to multiples of 8 from 512 on."""
    kw = dict(hidden=32, heads=2, inter=512) if family == "gpt2" else dict(hidden=32, heads=2, inter=512)
    model = tiny_model(family, layers=1, **kw)            # head_dim 16
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    a, m = attn_modules(model)[0], mlp_modules(model)[0]
    assert a.vo_dim == 12                                  # round(0.7 * 16 / 2) * 2
    assert a.qk_dim == (12 if family == "llama" else 11)   # no RoPE: any integer, round(11.2)
    assert m.inter == 360 and m.inter % 8 == 0             # round(0.7 * 512 / 8) * 8


# ---------------------------------------------------------------------------------------- params
def _linear_numel(model) -> int:
    from a3mod.arch import get_path, spec_for

    n = 0
    for layer in get_path(model, spec_for(model).layers):
        for mod in layer.modules():
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                n += mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
    return n


def _hand_count(model) -> int:
    """Parameters from the dims alone: q/k/v/o, gate/up/down weights and biases."""
    n = 0
    for a, m in zip(attn_modules(model), mlp_modules(model)):
        d, h, hkv = a.o_proj.out_features, a.num_heads, a.num_key_value_heads
        b = {x: getattr(a, f"{x}_proj").bias is not None for x in "qkvo"}
        n += (d + b["q"]) * h * a.qk_dim + (d + b["k"]) * hkv * a.qk_dim + (d + b["v"]) * hkv * a.vo_dim
        n += h * a.vo_dim * d + b["o"] * d
        mats = 2 if m.gate_proj is not None else 1
        n += mats * (d + (m.up_proj.bias is not None)) * m.inter + m.inter * d + (m.down_proj.bias is not None) * d
    return n


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(kv_heads=2)),
    ("llama", dict(kv_heads=1, attention_bias=True, mlp_bias=True, head_dim=12)),
    ("mistral", dict(kv_heads=2)),
    ("qwen2", dict(kv_heads=2)),
    ("gpt2", dict()),
])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5])
def test_report_params_are_exact(family, kw, ratio):
    model = tiny_model(family, hidden=32, heads=4, inter=64, **kw)
    orig = _linear_numel(model)
    rep0 = a3mod.report(model)
    assert rep0.params == rep0.params_orig == orig
    assert rep0.ratio == 0.0
    a3mod.apply(model, a3mod.a3_passes(ratio), calib=calib_ids(), progress=False)
    rep = a3mod.report(model)
    assert rep.params == _linear_numel(model) == _hand_count(model)
    assert rep.params_orig == orig
    assert rep.ratio == pytest.approx(1 - rep.params / orig, abs=1e-15)
    assert sum(r.params for r in rep.rows) == rep.params
    assert [r.qk_dim for r in rep.rows] == [a.qk_dim for a in attn_modules(model)]
    assert [r.vo_dim for r in rep.rows] == [a.vo_dim for a in attn_modules(model)]
    assert [(r.mlp_dim, r.mlp_orig) for r in rep.rows] == [(m.inter, 64) for m in mlp_modules(model)]


def test_report_llama_hand_numbers():
    """llama, hidden 32, 4 heads / 2 KV heads of 8, MLP 64, 2 layers, ratio 0.3 -> qk = vo = 6, MLP 45."""
    model = tiny_model("llama", hidden=32, heads=4, kv_heads=2, inter=64)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    per_layer_orig = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64
    per_layer = 32 * 24 + 32 * 12 + 32 * 12 + 24 * 32 + 3 * 32 * 45
    rep = a3mod.report(model)
    assert rep.params_orig == 2 * per_layer_orig == 18432
    assert rep.params == 2 * per_layer == 13248
    assert rep.ratio == pytest.approx(1 - 13248 / 18432)
    assert rep.kv_bytes_per_token(orig=True) == 2 * 2 * (8 + 8) * 4
    assert rep.kv_bytes_per_token() == 2 * 2 * (6 + 6) * 4
    ctx = rep.context
    assert rep.flops_per_token() == 2 * 13248 + 2 * (2 * 4 * ctx * 12)
    assert rep.flops_per_token(orig=True) == 2 * 18432 + 2 * (2 * 4 * ctx * 16)
    d = rep.to_dict()
    assert json.loads(json.dumps(d))["params"] == 13248
    assert d["kv_bytes_per_token"] == 192 and d["kv_bytes_per_token_orig"] == 256
    text = str(rep)
    assert "18,432 -> 13,248" in text and "embeddings/lm_head excluded" in text


# ------------------------------------------------------------------------------------------- KV
def _cache_bytes_per_token(cache, batch: int, seq: int) -> float:
    total = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                for l in cache.layers)
    return total / (batch * seq)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6])
def test_kv_bytes_match_cache(family, ratio):
    model = tiny_model(family, heads=4, hidden=64, **({} if family == "gpt2" else dict(kv_heads=2)))
    a3mod.apply(model, a3mod.a3_passes(ratio), calib=calib_ids(), progress=False)
    rep = a3mod.report(model)
    expected = sum(a.num_key_value_heads * (a.qk_dim + a.vo_dim) for a in attn_modules(model)) * 4
    assert rep.kv_bytes_per_token() == expected
    with torch.no_grad():
        out = model(input_ids(3, 10), use_cache=True)
    assert _cache_bytes_per_token(out.past_key_values, 3, 10) == expected
    if ratio > 0:
        assert rep.kv_bytes_per_token() < rep.kv_bytes_per_token(orig=True)


def test_kv_bytes_uncompressed_match_cache():
    model = tiny_model("llama", kv_heads=2)
    with torch.no_grad():
        out = model(input_ids(2, 9), use_cache=True)
    rep = a3mod.report(model)
    assert rep.kv_bytes_per_token() == rep.kv_bytes_per_token(orig=True) == 2 * 2 * 16 * 4
    assert _cache_bytes_per_token(out.past_key_values, 2, 9) == rep.kv_bytes_per_token()


def test_kv_bytes_follow_dtype():
    model = tiny_model("llama", kv_heads=2)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    model.to(torch.bfloat16)
    rep = a3mod.report(model)
    assert rep.dtype_bytes == 2
    with torch.no_grad():
        out = model(input_ids(2, 9), use_cache=True)
    assert _cache_bytes_per_token(out.past_key_values, 2, 9) == rep.kv_bytes_per_token() == 2 * 2 * 12 * 2
