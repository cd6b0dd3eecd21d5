"""Falcon: one fused query_key_value in each of its three layouts, all read as (Hkv, g + 2, d_h) groups — multi-query
(Falcon-7B: one K/V head), the new decoder architecture (Falcon-40B/180B: num_kv_heads groups, two layer norms)
and per-head (H, 3, d_h) — with parallel or sequential attention. The ALiBi variant is refused by the self-check."""
from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod.errors import DiscoveryError

import family_checks as fc
from conftest import VOCAB, calib_ids, input_ids, model_from_config

LAYOUTS = {"multi_query": dict(multi_query=True), "new_decoder": dict(new_decoder_architecture=True, num_kv_heads=2),
           "per_head": dict(multi_query=False)}


def falcon(layout: str = "multi_query", seed: int = 0, heads: int = 4, head_dim: int = 8, parallel: bool = True,
           **extra):
    kw = dict(LAYOUTS[layout])
    if layout == "per_head":
        kw["num_kv_heads"] = heads
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=heads * head_dim, num_attention_heads=heads,
                                    num_hidden_layers=2, parallel_attn=parallel, initializer_range=0.1,
                                    max_position_embeddings=64, bias=False, **kw, **extra)
    return lambda: model_from_config(cfg, seed)


@settings(max_examples=6)
@given(layout=st.sampled_from(sorted(LAYOUTS)), seed=st.integers(0, 1000), heads=st.sampled_from([4, 8]),
       head_dim=st.sampled_from([4, 8, 16]), parallel=st.booleans())
def test_full_rank_reproduces_outputs(layout, seed, heads, head_dim, parallel):
    fc.full_rank_reproduces_outputs(falcon(layout, seed, heads, head_dim, parallel))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_compresses_generates_and_round_trips(layout, tmp_path):
    rep = fc.compresses_at(falcon(layout), 0.3)
    assert rep.rows[0].kv_heads == {"multi_query": 1, "new_decoder": 2, "per_head": 4}[layout]
    fc.cached_generate_matches_uncached(falcon(layout), 0.3)
    fc.save_load_round_trip(falcon(layout), tmp_path)


def test_alibi_falcon_is_refused_untouched():
    model = falcon("per_head", alibi=True)()
    ids = input_ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with pytest.raises(DiscoveryError, match="rewrite of the attention"):
        a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(), progress=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
