"""Families released in 2025-26, on tiny random configs (no real checkpoint is reachable offline): attention sinks
found by discovery, DeepSeek sparse attention's indexer kept whole, latent attention with parts a3mod does not
model refused by name, RoPE facts (per-layer-type rope parameters, odd rotary products, NoPE global layers)."""
from __future__ import annotations

import pytest
import torch

import a3mod
from a3mod.arch import layer_views
from a3mod.arch.lookup import spec_for
from a3mod.arch.spec import dims_of, partial_rotary_factor
from zoo import _ids, _logits, tiny_zoo_model


@pytest.mark.parametrize("mtype", ["granite_swa", "granitemoe_swa", "flint"])
def test_discovery_finds_attention_sinks(mtype):
    """A per-head `sinks` parameter (gpt-oss's column, or Granite-SWA's post-softmax LSE scaling, the same
    function) becomes ArchSpec.sinks; the compressed attention keeps the logits, unchanged."""
    model = tiny_zoo_model(mtype).eval()
    assert spec_for(model).sinks == "sinks"
    v = next(v for v in layer_views(model) if v.attn is not None)
    with torch.no_grad():
        v.attn.sinks.copy_(torch.linspace(-2, 2, v.attn.sinks.numel()))
    ids = _ids(2, 12, 0)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(4, 16, 1), progress=False)
    new = model.model.layers[v.index].self_attn
    assert new.sinks is not None and torch.equal(new.sinks, torch.linspace(-2, 2, new.sinks.numel()))
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mtype", ["deepseek_v32", "glm_moe_dsa"])
def test_the_sparse_attention_indexer_stays_whole(mtype):
    model = tiny_zoo_model(mtype).eval()
    before = {n: p.clone() for n, p in model.named_parameters() if ".indexer." in n}
    widths = (model.model.layers[0].self_attn.kv_b_proj.out_features, model.model.layers[0].self_attn.o_proj.in_features)
    assert before
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())
    attn = model.model.layers[0].self_attn
    assert attn.kv_b_proj.out_features < widths[0] and attn.o_proj.in_features < widths[1]


@pytest.mark.parametrize("mtype", ["hy_v4", "axk2", "deepseek_v4"])
def test_attention_a3_cannot_model_stays_whole_and_the_mlps_and_experts_give_the_ratio(mtype):
    """Latent attention with an output gate (HY-V4) or a gated query (AXK2) and DeepSeek-V4's compressed sparse
    attention stay as they are (the original modules and weights, the reason in the report); every MLP, shared
    expert and routed expert is compressed, and the ratio asked is the ratio of attention + MLP params removed."""
    model = tiny_zoo_model(mtype).eval()
    attn = [{n: p.clone() for n, p in layer.self_attn.named_parameters()} for layer in model.model.layers]
    experts = [layer.mlp.experts.gate_up_proj.shape for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert experts
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    for layer, before in zip(model.model.layers, attn):
        assert type(layer.self_attn).__module__.startswith("transformers.")
        after = dict(layer.self_attn.named_parameters())
        assert all(torch.equal(after[n], p) for n, p in before.items())
        mlp = layer.mlp if not hasattr(layer.mlp, "experts") else layer.mlp.shared_experts
        assert type(mlp).__name__ == "ReducedMLP"
    shrunk = [layer.mlp.experts.gate_up_proj.shape for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    assert all(a[1] < b[1] for a, b in zip(shrunk, experts))
    rep = a3mod.report(model)
    assert rep.ratio_reducible == pytest.approx(0.3, abs=0.03)
    assert rep.kv_bytes_per_token() == rep.kv_bytes_per_token(orig=True)
    assert "attention kept whole" in str(rep)


def test_rope_parameters_per_layer_type_and_an_odd_rotary_product():
    """MiMo-V2 keeps rope parameters per layer type; 16 x 0.334 = 5.3 dims: the rotary embedding rotates 3 pairs."""
    model = tiny_zoo_model("mimo_v2_flash")
    assert partial_rotary_factor(model.config) == pytest.approx(0.334)
    inv_freq = model.model.rotary_emb.full_attention_inv_freq
    class _S:  # noqa: N801
        rope = "rotate_half"
    assert dims_of(model.config, _S).rot_dim == 2 * inv_freq.numel() == 6


def test_nope_global_layers_among_rope_sliding_layers_discover_as_one_structure():
    """Flint rotates in its sliding layers only: discovery describes the RoPE layer, applies_rope the rest."""
    model = tiny_zoo_model("flint")
    views = layer_views(model)
    types = model.config.layer_types
    assert [v.dims.rot_dim > 0 for v in views] == [t == "sliding_attention" for t in types]


@pytest.mark.parametrize("mtype", ["gemma4_text", "gemma4_unified_text"])
def test_gemma4_keeps_its_attention_and_the_mlps_give_the_ratio(mtype):
    """Gemma 4 normalises every query, key and value head (v_norm) and may share K/V across layers: the attention
    stays as it is (ArchSpec.attn_whole, the original modules and weights), the MLPs give its share of the ratio."""
    model = tiny_zoo_model(mtype).eval()
    attn = {i: {n: p.clone() for n, p in layer.self_attn.named_parameters()}
            for i, layer in enumerate(model.model.layers)}
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    for i, layer in enumerate(model.model.layers):
        assert type(layer.self_attn).__module__.startswith("transformers.")
        assert all(torch.equal(p, attn[i][n]) for n, p in layer.self_attn.named_parameters())
        assert type(layer.mlp).__name__ == "ReducedMLP"
    rep = a3mod.report(model)
    assert abs(rep.ratio_reducible - 0.3) < 0.02
    assert rep.kv_bytes_per_token() == rep.kv_bytes_per_token(True) > 0
    assert all(r.qk_dim == r.vo_dim > 0 and not r.mixer for r in rep.rows)
    with pytest.raises(a3mod.RatioError, match="attention stays whole"):
        a3mod.apply(tiny_zoo_model(mtype).eval(), a3mod.a3_passes(0.8), calib=_ids(4, 16, 1), progress=False)


def test_a_flipped_rotate_half_is_the_rotation_by_minus_the_angle():
    """NanoChat's rotate_half is (x2, -x1): rope_table "half_flipped" negates sin, which reproduces it exactly."""
    from a3mod.modules.attention import half_table, rotate_half

    torch.manual_seed(0)
    x, ang = torch.randn(2, 5, 8), torch.rand(2, 5, 4) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x.chunk(2, -1)
    want = x * cos + torch.cat((x2, -x1), -1) * sin                   # NanoChat's own formula
    c, s = half_table((cos, sin), "half_flipped")
    torch.testing.assert_close(x * c + rotate_half(x) * s, want)
    assert spec_for(tiny_zoo_model("nanochat")).rope_table == "half_flipped"


@pytest.mark.parametrize("mtype", ["lara_mini", "kolibri1"])
def test_global_nope_layers_of_more_families(mtype):
    """RoPE in the sliding layers only: the full-attention layers' views have no rotary dims."""
    model = tiny_zoo_model(mtype)
    views = [v for v in layer_views(model) if v.attn is not None]
    types = model.config.layer_types
    assert [v.dims.rot_dim > 0 for v in views] == [types[v.index] == "sliding_attention" for v in views]
    ids = _ids(2, 12, 0)
    ref = _logits(model.eval(), ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(4, 16, 1), progress=False)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)


def test_laguna_softplus_head_gate_and_rotary_dims_per_layer_type():
    """Laguna gates each head by softplus(g_proj(x)) and rotates half the dims in full-attention layers, all of them
    in sliding ones (rope parameters per layer type): both are read, and full rank is exact."""
    model = tiny_zoo_model("laguna").eval()
    spec = spec_for(model)
    assert (spec.attn_gate, spec.attn_gate_head, spec.attn_gate_act) == ("g_proj", True, "softplus")
    views = [v for v in layer_views(model) if v.attn is not None]
    types = model.config.layer_types
    hd = views[0].dims.head_dim
    assert [v.dims.rot_dim for v in views] == [hd // 2 if types[v.index] == "full_attention" else hd for v in views]
    ids = _ids(2, 12, 0)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(4, 16, 1), progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-4
    attn = model.model.layers[views[0].index].self_attn
    assert attn.cfg.gate_act == "softplus" and "softplus output gate per head" in repr(attn)


def test_mimo_v2_kv_heads_per_layer_value_scale_and_sinks_in_some_layers():
    """MiMo-V2-Flash: sliding layers have twice the K/V heads and attention sinks, values are scaled by a constant
    (folded into v_proj); the views read each layer's own K/V heads, and full rank is exact with a scale != 1."""
    model = tiny_zoo_model("mimo_v2_flash").eval()
    views = [v for v in layer_views(model) if v.attn is not None]
    types = model.config.layer_types
    base = model.config.num_key_value_heads
    assert [v.dims.kv_heads for v in views] == [2 * base if types[v.index] == "sliding_attention" else base
                                                for v in views]
    assert [v.has_sinks for v in views] == [types[v.index] == "sliding_attention" for v in views]
    rep = a3mod.report(model)                   # K and V per token: each layer's own K/V heads
    assert [r.kv_elems_orig for r in rep.rows] == [2 * v.dims.kv_heads * v.dims.head_dim for v in views]
    for layer in model.model.layers:
        layer.self_attn.v_scale = 0.37
    ids = _ids(2, 12, 0)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(4, 16, 1), progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-4
