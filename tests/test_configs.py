"""Compact-module configs (modules/configs.py): one frozen dataclass per kind is the module's constructor argument,
its description and the schema that description is checked against."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from a3mod.errors import CheckpointError
from a3mod.io.schema import check_config
from a3mod.modules import ReducedHeadAttention, ReducedMLP
from a3mod.modules.attention import AttentionConfig
from a3mod.modules.configs import ConfigError, from_entry, to_entry
from a3mod.modules.mlp import MLPConfig

from conftest import tiny_config


@st.composite
def attention_configs(draw):
    kv = draw(st.integers(1, 4))
    heads = kv * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 8))
    qk_norm = draw(st.sampled_from([None, "head", "all"]))
    qk = head_dim if qk_norm else draw(st.integers(1, head_dim))
    rot = 2 * draw(st.integers(0, qk // 2))
    return AttentionConfig(
        hidden=draw(st.integers(1, 64)), heads=heads, kv_heads=kv, head_dim=head_dim, qk_dim=qk,
        vo_dim=draw(st.integers(1, head_dim)), rot_dim=rot, scaling=draw(st.floats(1e-3, 10.0)),
        bias={n: draw(st.booleans()) for n in "qkvo"}, sliding_window=draw(st.none() | st.integers(1, 4096)),
        is_causal=draw(st.booleans()), dropout=draw(st.floats(0.0, 0.9)), out_dropout=0.0,
        out_proj=draw(st.booleans()), qk_norm=qk_norm, softcap=draw(st.none() | st.floats(1.0, 50.0)),
        rope_table=draw(st.sampled_from(["half", "sin_cos", "once"])), alibi=draw(st.sampled_from([None, "alibi"])),
        bool_mask=draw(st.sampled_from(["keep", "masked"])), residual=draw(st.booleans()), sinks=draw(st.booleans()))


@given(attention_configs())
def test_attention_config_round_trips_through_its_description(cfg):
    entry = to_entry(cfg)
    check_config(AttentionConfig, entry, "attn")                       # the schema accepts what is written
    assert from_entry(AttentionConfig, entry) == cfg
    for f in dataclasses.fields(cfg):                                  # defaults that are not written stay out
        if f.metadata["omit_default"] and getattr(cfg, f.name) == f.default:
            assert f.name not in entry


@given(attention_configs())
def test_the_module_describes_the_config_it_was_built_from(cfg):
    norms = {"q_norm": torch.nn.Identity(), "k_norm": torch.nn.Identity()} if cfg.qk_norm else {}
    m = ReducedHeadAttention(tiny_config("llama"), 0, cfg, **norms)
    assert m.cfg == cfg and from_entry(AttentionConfig, m.describe()) == cfg
    assert (m.o_proj is None) == (not cfg.out_proj) and (m.sinks is not None) == cfg.sinks


@pytest.mark.parametrize("edit,where", [
    (dict(inter=99), r"mlp\.inter = 99 is outside \[1, 65\)"),
    (dict(act="os.system"), r"mlp\.act = 'os.system'; allowed"),
    (dict(residual=False), r"mlp\.residual = False; only true is written"),
    (dict(gated=1), r"mlp\.gated = 1 must be true or false"),
])
def test_the_schema_is_read_from_the_dataclass(edit, where):
    entry = to_entry(MLPConfig(hidden=32, orig_inter=64, inter=48, act="silu", gated=True, up_bias=False,
                               down_bias=False))
    with pytest.raises(CheckpointError, match=where):
        check_config(MLPConfig, {**entry, **edit}, "mlp")
    m = ReducedMLP(from_entry(MLPConfig, entry), device="meta")
    assert m.inter == 48 and from_entry(MLPConfig, m.describe()) == m.cfg


def test_cross_field_rules_name_their_field():
    base = dict(hidden=32, heads=4, kv_heads=2, head_dim=8, qk_dim=8, vo_dim=8, rot_dim=8, scaling=0.35,
                bias=dict(q=False, k=False, v=False, o=False))
    with pytest.raises(ConfigError, match="heads=3 is not a multiple of kv_heads = 2"):
        AttentionConfig(**{**base, "heads": 3})
    with pytest.raises(CheckpointError, match=r"attn\.rot_dim = 3 must be even"):
        check_config(AttentionConfig, to_entry(AttentionConfig(**base)) | {"rot_dim": 3}, "attn")
    cfg = AttentionConfig(**{**base, "out_proj": False, "bias": dict(q=False, k=False, v=False, o=True)})
    assert cfg.bias["o"] is False                  # no output projection in the module: no output bias either


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12), st.booleans())
def test_low_rank_config_round_trips_and_bounds_its_rank(i, r, o, bias):
    from a3mod.modules.lowrank import LowRankConfig

    if r > min(i, o):
        with pytest.raises(ConfigError, match="exceeds min"):
            LowRankConfig(in_features=i, rank=r, out_features=o, bias=bias)
        return
    cfg = LowRankConfig(in_features=i, rank=r, out_features=o, bias=bias)
    from a3mod.modules import LowRankLinear
    m = LowRankLinear(cfg, device="meta")
    assert from_entry(LowRankConfig, m.describe()) == cfg and m.rank == r
    check_config(LowRankConfig, to_entry(cfg), "linears.x")


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(0, 16), st.integers(1, 16))
def test_latent_kv_config_round_trips(kv, g, half_hd, k_rank, v_rank):
    from a3mod.modules import LatentKVAttention
    from a3mod.modules.latent_kv import LatentKVConfig

    hd = 2 * half_hd
    fields = dict(hidden=16, heads=kv * g, kv_heads=kv, head_dim=hd, k_rank=max(1, k_rank), v_rank=v_rank,
                  rot_dim=hd, scaling=0.5, bias=dict(q=True, k=False, v=True, o=False))
    if max(fields["k_rank"], v_rank) > kv * hd:
        with pytest.raises(ConfigError, match="exceeds kv_heads x head_dim"):
            LatentKVConfig(**fields)
        return
    cfg = LatentKVConfig(**fields)
    m = LatentKVAttention(tiny_config("llama"), 0, cfg, device="meta")
    assert from_entry(LatentKVConfig, m.describe()) == cfg
    check_config(LatentKVConfig, to_entry(cfg), "latent_attn")
