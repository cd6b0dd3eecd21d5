"""ASVD's KV-cache mode: k/v factorized, LatentKVAttention caches the rank-r latents (B, 1, T, r)."""
from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch

import a3mod
from a3mod import ASVD, LatentKVAttention, LowRankLinear
from a3mod.math import factorize as fz
from a3mod.arch import get_path, layer_views, spec_for
from a3mod.passes.lowrank import _latent_attention
from a3mod.arch import set_child

from conftest import calib_ids, input_ids, logits, tiny_model

KV_FAMS = {"llama": dict(kv_heads=2), "qwen2": {}, "gpt2": {}, "mistral": dict(sliding_window=None)}
PROBE = dict(probe_samples=2, probe_seq_len=16)


def model64(family: str, **kw):
    return tiny_model(family, **{**KV_FAMS[family], **kw}).double()


def kv_width(model) -> int:
    d = layer_views(model)[0].dims
    return d.kv_heads * d.head_dim


def attns(model) -> list:
    spec = spec_for(model)
    return [get_path(layer, spec.attn) for layer in get_path(model, spec.layers)]


def compress_kv(model, kv_ratio: float, rank_search: bool):
    return a3mod.apply(model, [ASVD(kv_ratio=kv_ratio, rank_search=rank_search, **PROBE)], calib=calib_ids(8, 32),
                       progress=False)


def cache_elems_per_token(out, batch: int, tokens: int) -> int:
    """Elements the returned cache holds per token, summed over layers (checks the (B, h, T, .) layout)."""
    total = 0
    for layer in out.past_key_values.layers:
        for t in (layer.keys, layer.values):
            assert t.dim() == 4 and t.shape[0] == batch and t.shape[2] == tokens
            total += t.shape[1] * t.shape[3]
    return total


def padded_batch():
    ids = input_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


def greedy(model, ids, use_cache: bool, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=6,
                              min_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)


_kv_cache: dict = {}


def kv_compressed(family: str, rank_search: bool):
    """(original, compressed copy at kv_ratio 0.5); shared by tests that do not modify them."""
    key = (family, rank_search)
    if key not in _kv_cache:
        orig = model64(family)
        _kv_cache[key] = (orig, compress_kv(copy.deepcopy(orig), 0.5, rank_search))
    return _kv_cache[key]


@pytest.mark.parametrize("family", KV_FAMS)
@pytest.mark.parametrize("rank_search", [False, True], ids=["uniform", "search"])
def test_kv_cache_shrinks(family, rank_search):
    orig, model = kv_compressed(family, rank_search)
    rep, rep0 = a3mod.report(model), a3mod.report(orig)
    esize = next(model.parameters()).element_size()
    kv0 = rep0.kv_bytes_per_token()
    assert rep.kv_bytes_per_token(orig=True) == kv0 == 2 * kv_width(orig) * len(attns(orig)) * esize
    assert rep.kv_bytes_per_token() <= 0.5 * kv0 + esize
    goal = math.ceil(0.5 * (kv0 // esize))
    assert kv0 // esize - rep.kv_bytes_per_token() // esize == goal          # cost 1 per rank: exact
    assert all(isinstance(a, LatentKVAttention) for a in attns(model))
    # only k and v are factorized: q, o and the MLP stay as they were
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 2 * len(attns(model))
    ids = input_ids(2, 9)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        out0 = orig(ids, use_cache=True)
    assert cache_elems_per_token(out0, 2, 9) * esize == kv0
    assert cache_elems_per_token(out, 2, 9) * esize == rep.kv_bytes_per_token()
    for layer, a in zip(out.past_key_values.layers, attns(model)):
        assert tuple(layer.keys.shape) == (2, 1, 9, a.k_proj.rank)
        assert tuple(layer.values.shape) == (2, 1, 9, a.v_proj.rank)
    with torch.no_grad():                      # one decoding step appends one latent per layer
        nxt = model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    assert cache_elems_per_token(nxt, 2, 10) * esize == rep.kv_bytes_per_token()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_widths_follow_the_ratio(family):
    widths = []
    for kv in (0.25, 0.5, 0.75):
        model = compress_kv(model64(family), kv, rank_search=False)
        want = math.floor((1 - Fraction(str(kv))) * kv_width(model))
        with torch.no_grad():
            out = model(input_ids(1, 5), use_cache=True)
        got = {(l.keys.shape[-1], l.values.shape[-1]) for l in out.past_key_values.layers}
        assert got == {(want, want)}, (kv, got)
        widths.append(want)
    assert widths[0] > widths[1] > widths[2]


def _full_rank_latent(model):
    """A copy of `model` whose attentions are LatentKVAttention with exact (full-rank SVD) k/v factors."""
    c = copy.deepcopy(model)
    spec = spec_for(c)
    rotary = get_path(c, spec.rotary) if spec.rotary else None
    for v in layer_views(c):
        (_, _), (wk, _), (wv, _) = v.qkv_params()
        fk, fv = fz.svd_factors(wk, wk.shape[0]), fz.svd_factors(wv, wv.shape[0])
        set_child(v.layer, spec.attn, _latent_attention(c.config, v, fk, fv, rotary))
    return c


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape and torch.isfinite(got).all() and torch.isfinite(ref).all()
    return ((got - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("family,impl,dtype,tol", [(f, "sdpa", torch.float64, 1e-9) for f in KV_FAMS]
                         + [(f, "eager", torch.float32, 1e-5) for f in ("llama", "gpt2")])
def test_full_rank_latent_attention_is_exact(family, impl, dtype, tol):
    model = tiny_model(family, impl=impl, **KV_FAMS[family]).to(dtype)
    latent = _full_rank_latent(model)
    assert all(isinstance(a, LatentKVAttention) for a in attns(latent))
    ids = input_ids(2, 10)
    assert rel_err(logits(latent, ids), logits(model, ids)) <= tol
    # left padding: real positions equal, and greedy generation (cached or not) equals the original's
    pids, mask = padded_batch()
    keep = mask.bool()
    assert rel_err(logits(latent, pids, attention_mask=mask)[keep], logits(model, pids, attention_mask=mask)[keep]) <= tol
    gen_ref = greedy(model, pids, True, mask)
    assert torch.equal(greedy(latent, pids, True, mask), gen_ref)
    assert torch.equal(greedy(latent, pids, False, mask), gen_ref)
    # cached decoding step by step: logits of each new token equal the original's
    with torch.no_grad():
        o_ref, o_lat = model(pids, attention_mask=mask, use_cache=True), latent(pids, attention_mask=mask, use_cache=True)
        for step in range(3):
            tok = o_ref.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            o_ref = model(tok, attention_mask=mask, past_key_values=o_ref.past_key_values, use_cache=True)
            o_lat = latent(tok, attention_mask=mask, past_key_values=o_lat.past_key_values, use_cache=True)
            assert rel_err(o_lat.logits, o_ref.logits) <= tol, step


def test_eager_float64_left_padding_stays_finite():
    model = tiny_model("gpt2", impl="eager").double()      # GPT-2's own eager softmax keeps float64: finite
    latent = _full_rank_latent(model)
    pids, mask = padded_batch()
    ref = logits(model, pids, attention_mask=mask)
    keep = mask.bool()
    assert torch.isfinite(ref).all()
    assert rel_err(logits(latent, pids, attention_mask=mask)[keep], ref[keep]) <= 1e-9


@pytest.mark.parametrize("family", KV_FAMS)
@pytest.mark.parametrize("rank_search", [False, True], ids=["uniform", "search"])
def test_kv_compressed_cached_generate_equals_uncached(family, rank_search):
    _, model = kv_compressed(family, rank_search)
    ids = input_ids(2, 6)
    assert torch.equal(greedy(model, ids, True), greedy(model, ids, False))
    pids, mask = padded_batch()
    assert torch.equal(greedy(model, pids, True, mask), greedy(model, pids, False, mask))


def test_sliding_window_is_refused():
    model = tiny_model("mistral", sliding_window=8).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for rs in (False, True):
        with pytest.raises(a3mod.UnsupportedModelError, match="sliding_window=8"):
            compress_kv(model, 0.5, rs)
    assert not any(isinstance(a, LatentKVAttention) for a in attns(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    compress_kv(tiny_model("mistral", sliding_window=None), 0.5, False)      # without a window it works


@pytest.mark.parametrize("family", KV_FAMS)
def test_kv_save_load(tmp_path, family):
    _, model = kv_compressed(family, True)
    a3mod.save(model, tmp_path / "m")
    loaded = a3mod.load(tmp_path / "m")
    assert all(isinstance(a, LatentKVAttention) for a in attns(loaded))
    assert [(a.k_proj.rank, a.v_proj.rank) for a in attns(loaded)] == [(a.k_proj.rank, a.v_proj.rank)
                                                                        for a in attns(model)]
    ids = input_ids(2, 10)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert a3mod.report(loaded).to_dict() == a3mod.report(model).to_dict()
    assert loaded.a3mod_info == model.a3mod_info
    pids, mask = padded_batch()
    assert torch.equal(greedy(loaded, pids, True, mask), greedy(model, pids, True, mask))


def test_kv_width_is_exact_floor():
    model = tiny_model("llama", hidden=40, heads=4, kv_heads=2, layers=1)      # Hkv * d_h = 2 * 10 = 20
    compress_kv(model, 0.8, rank_search=False)
    assert attns(model)[0].k_proj.rank == 4                                      # floor(0.2 * 20)
