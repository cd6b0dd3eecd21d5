"""KV-cache quantization composed with A3: per-layer group sizes that fit reduced head dims, exact byte
accounting, chunked perplexity through a cache, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import a3mod
from a3mod.quant.kv_cache import _largest_divisor

from conftest import calib_ids, input_ids, tiny_model


@pytest.fixture(scope="module")
def compressed():
    m = tiny_model("llama", kv_heads=2, hidden=64, heads=4, head_dim=16)
    a3mod.apply(m, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    return m


def _fill(model, cache, ids, chunk):
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True)
    return cache


def _dims(model):
    return [(r.kv_heads, r.qk_dim, r.vo_dim) for r in a3mod.report(model).rows]


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize("tokens,chunk", [(40, 40), (37, 7), (9, 3)])
def test_hqq_cache_bytes_are_codes_plus_group_scales(compressed, nbits, tokens, chunk):
    """Once past the residual window everything is quantized: bytes = packed codes of the token-padded tensor +
    one scale and one zero (fp32 here) per group; groups divide the reduced head dims (12 here, not 64)."""
    cache = _fill(compressed, a3mod.quantized_cache(compressed, "hqq", nbits, group_size=64, residual_length=1),
                  input_ids(1, tokens), chunk)
    padded = tokens + (-tokens % 4)
    want = 0
    for h, qk, vo in _dims(compressed):
        assert qk == vo == 12
        for d in (qk, vo):
            n = h * padded * d
            codes = {2: n // 4, 3: None, 4: n // 2, 8: n}[nbits]
            if nbits == 3:               # 10 codes per int32, rows padded to a multiple of 10
                rows = n // d
                codes = 4 * d * (-(-rows // 10))
            want += codes + 2 * 4 * (n // d)
    assert all(layer.keys.numel() == 0 for layer in cache.layers)   # residual flushed at this length
    assert a3mod.cache_bytes(cache) == want


def test_dynamic_cache_bytes_match_report(compressed):
    cache = _fill(compressed, DynamicCache(), input_ids(1, 10), 10)
    assert a3mod.cache_bytes(cache) == 10 * a3mod.report(compressed).kv_bytes_per_token()


def test_fp8_cache_is_one_byte_per_element(compressed):
    cache = _fill(compressed, a3mod.quantized_cache(compressed, "fp8"), input_ids(1, 10), 10)
    elems = sum(h * (qk + vo) for h, qk, vo in _dims(compressed)) * 10
    assert a3mod.cache_bytes(cache) == elems + 2 * 4 * len(cache.layers)          # + a scale per tensor


def test_chunked_perplexity_through_a_plain_cache_is_exact(compressed):
    ids = input_ids(2, 24, seed=7).reshape(-1)
    ref = a3mod.perplexity(compressed, ids, seq_len=24, progress=False)
    got = a3mod.perplexity(compressed, ids, seq_len=24, progress=False, cache=DynamicCache, chunk=5)
    assert got["tokens"] == ref["tokens"] == 46
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-5)


def test_kv_quantization_error_shrinks_with_bits(compressed):
    ids = input_ids(2, 40, seed=8).reshape(-1)
    ref = a3mod.perplexity(compressed, ids, seq_len=40, progress=False)["nll"]
    err = {b: abs(a3mod.perplexity(compressed, ids, seq_len=40, progress=False, chunk=8,
                                   cache=lambda b=b: a3mod.quantized_cache(compressed, "hqq", b, residual_length=8)
                                   )["nll"] - ref) for b in (2, 4, 8)}
    assert err[8] < err[4] < err[2]
    assert err[8] < 1e-3 * abs(ref)


@pytest.mark.parametrize("backend", ["hqq", "fp8"])
def test_generate_with_quantized_cache(compressed, backend):
    prompt = input_ids(1, 12, seed=3)
    with torch.no_grad():
        out = compressed.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                  min_new_tokens=6, do_sample=False, pad_token_id=0,
                                  past_key_values=a3mod.quantized_cache(compressed, backend, 8, residual_length=4))
    assert out.shape == (1, 18)


def test_original_model_uses_full_head_groups():
    m = tiny_model("llama", kv_heads=2, hidden=64, heads=4, head_dim=16)
    cache = _fill(m, a3mod.quantized_cache(m, "hqq", 4, group_size=64, residual_length=1), input_ids(1, 8), 8)
    assert cache.layers[0]._quantized_keys[1]["group_size"] == 16


def test_largest_divisor():
    assert [_largest_divisor(n, 64) for n in (52, 64, 12, 13, 128)] == [52, 64, 12, 13, 64]
    assert _largest_divisor(52, 16) == 13


@pytest.mark.parametrize("kw,msg", [
    (dict(backend="quanto"), "allowed: hqq, fp8"),
    (dict(nbits=5), "nbits=5"),
    (dict(group_size=0), "group_size=0"),
    (dict(residual_length=-1), "residual_length=-1"),
])
def test_bad_arguments(compressed, kw, msg):
    with pytest.raises(a3mod.QuantizationError, match=msg):
        a3mod.quantized_cache(compressed, **kw)


def test_sliding_window_refused():
    m = tiny_model("mistral", kv_heads=2, sliding_window=4)
    with pytest.raises(a3mod.QuantizationError, match="sliding-window"):
        a3mod.quantized_cache(m)


def test_bad_chunk(compressed):
    with pytest.raises(a3mod.A3ModError, match="chunk=0"):
        a3mod.perplexity(compressed, input_ids(1, 20).reshape(-1), seq_len=20, cache=DynamicCache, chunk=0)
