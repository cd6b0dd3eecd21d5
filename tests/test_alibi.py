"""ALiBi families. MPT: the per-head position bias the block hands the attention, boolean masks where True means
masked, an MLP that adds the residual itself. BLOOM: the (B*H, 1, S) ALiBi bias, fused per-head qkv, and both the
attention and the MLP adding the residual they are handed. The four support-matrix checks each, with hypothesis
full-rank properties."""
from __future__ import annotations

import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod import ReducedHeadAttention, ReducedMLP

import family_checks as fc
from conftest import VOCAB, calib_ids, input_ids, model_from_config


def factory(seed: int = 0, heads: int = 4, head_dim: int = 8, layers: int = 2, expansion: int = 2, max_bias: int = 8):
    cfg = transformers.MptConfig(vocab_size=VOCAB, d_model=heads * head_dim, n_heads=heads, n_layers=layers,
                                 expansion_ratio=expansion, max_seq_len=64, initializer_range=0.1,
                                 attn_config={"alibi_bias_max": max_bias})
    return lambda: model_from_config(cfg, seed)


@settings(max_examples=5)
@given(seed=st.integers(0, 1000), heads=st.sampled_from([2, 4, 8]), head_dim=st.sampled_from([4, 8, 16]),
       layers=st.integers(1, 2), expansion=st.sampled_from([2, 4]), max_bias=st.sampled_from([4, 8]))
def test_full_rank_reproduces_outputs(seed, heads, head_dim, layers, expansion, max_bias):
    fc.full_rank_reproduces_outputs(factory(seed, heads, head_dim, layers, expansion, max_bias), impls=("eager",))


def test_compresses_at_30_percent_keeping_alibi_and_the_mlp_residual():
    rep = fc.compresses_at(factory(), 0.3)
    assert all((r.qk_dim, r.vo_dim) == (6, 6) for r in rep.rows)
    model = factory()()
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    attn, mlp = model.transformer.blocks[0].attn, model.transformer.blocks[0].ffn
    assert isinstance(attn, ReducedHeadAttention) and (attn.alibi, attn.bool_mask) == ("position_bias", "masked")
    assert isinstance(mlp, ReducedMLP) and mlp.residual


def test_without_alibi_the_rewrite_is_refused_by_the_self_check(monkeypatch):
    import dataclasses

    from a3mod.arch import adapters
    from a3mod.errors import DiscoveryError

    monkeypatch.setitem(adapters.ARCHS, "mpt", dataclasses.replace(adapters.ARCHS["mpt"], alibi=None))
    model = factory()()
    ids = input_ids()
    before = model(input_ids=ids).logits
    try:
        a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(), progress=False)
        raise AssertionError("a description without ALiBi was accepted")
    except DiscoveryError as e:
        assert "rewrite of the attention" in str(e)
    assert torch.equal(model(input_ids=ids).logits, before)


def test_cached_generate_matches_uncached():
    fc.cached_generate_matches_uncached(factory(), 0.3, impls=("eager",))


def test_save_load_round_trip(tmp_path):
    fc.save_load_round_trip(factory(), tmp_path)


# ------------------------------------------------------------------------------------------------ BLOOM
def bloom(seed: int = 0, heads: int = 4, head_dim: int = 8, layers: int = 2, post_ln: bool = False):
    cfg = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=heads * head_dim, n_head=heads, n_layer=layers,
                                   initializer_range=0.1, apply_residual_connection_post_layernorm=post_ln)
    return lambda: model_from_config(cfg, seed)


@settings(max_examples=5)
@given(seed=st.integers(0, 1000), heads=st.sampled_from([2, 4, 8]), head_dim=st.sampled_from([4, 8, 16]),
       layers=st.integers(1, 2), post_ln=st.booleans())
def test_bloom_full_rank_reproduces_outputs(seed, heads, head_dim, layers, post_ln):
    fc.full_rank_reproduces_outputs(bloom(seed, heads, head_dim, layers, post_ln), impls=("eager",))


def test_bloom_compresses_generates_and_round_trips(tmp_path):
    rep = fc.compresses_at(bloom(), 0.3)
    assert all((r.qk_dim, r.vo_dim) == (6, 6) for r in rep.rows)
    fc.cached_generate_matches_uncached(bloom(), 0.3, impls=("eager",))
    fc.save_load_round_trip(bloom(), tmp_path)
    model = bloom()()
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    attn = model.transformer.h[0].self_attention
    assert isinstance(attn, ReducedHeadAttention) and attn.alibi == "alibi" and attn.residual
