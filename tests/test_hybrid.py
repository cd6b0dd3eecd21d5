"""Hybrid models: attention layers are compressed; in linear-attention / convolution / state-space layers the mixer is
left as it is and the MLP beside it compressed, and the report says which and why (LFM2 with conv layers, OLMo-hybrid
with gated-delta-net layers)."""
from __future__ import annotations

import pytest
import torch
import transformers

import a3mod
from a3mod.pipeline.compress import compact_modules
from a3mod.arch import layer_views

from zoo import _greedy, _ids, _logits, tiny_zoo_config

HYBRIDS = {"lfm2": ["conv", "full_attention", "conv", "full_attention"], "olmo_hybrid": None}


def make(mtype: str):
    c = tiny_zoo_config(mtype)
    lt = HYBRIDS[mtype]
    if lt:
        c.layer_types, c.num_hidden_layers = lt, len(lt)
        c.full_attn_idxs = [i for i, t in enumerate(lt) if t == "full_attention"]
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(c).float().eval()


@pytest.mark.parametrize("mtype", sorted(HYBRIDS))
def test_hybrid_compresses_attention_and_every_mlp_and_keeps_mixers(mtype, tmp_path):
    """Attention layers are compressed; in a mixer layer (conv, gated delta net) the mixer stays as it is and its MLP
    is compressed; the report says which and why, and the ratio asked is met on the attention and MLP parts."""
    model, ids, calib = make(mtype), _ids(2, 12, 0), _ids(4, 16, 1)
    views = layer_views(model)
    mixer = [v.index for v in views if v.mixer]
    assert mixer and len(mixer) < len(views) and not any(v.left for v in views)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib, progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-4

    model = make(mtype)
    mlp_path = views[mixer[0]].mlp_path
    kept = {i: {n: p.clone() for n, p in layer_views(model)[i].layer.named_parameters()
                if not n.startswith(mlp_path + ".")} for i in mixer}
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib, progress=False)
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    names = compact_modules(model)
    for i in mixer:                          # the mixer untouched (same weights), the MLP compact
        assert not any(n.startswith(f"model.layers.{i}.") and not n.startswith(f"model.layers.{i}.{mlp_path}")
                       for n in names)
        assert any(n == f"model.layers.{i}.{mlp_path}" for n in names)
        own = dict(model.model.layers[i].named_parameters())
        assert all(torch.equal(own[n], p) for n, p in kept[i].items())
    rep = a3mod.report(model)
    assert [r.layer for r in rep.rows if r.mixer] == mixer and not any(r.left for r in rep.rows)
    assert all(r.mlp_dim < r.mlp_orig and r.qk_dim == r.vo_dim == 0 for r in rep.rows if r.mixer)
    assert "mixer" in str(rep) and "attention and MLP parts" in str(rep)
    assert abs(rep.ratio_reducible - 0.3) < 0.02 and rep.ratio < rep.ratio_reducible
    prompt = _ids(1, 6, 5)
    assert torch.equal(_greedy(model, prompt, True), _greedy(model, prompt, False))
    loaded = a3mod.load(a3mod.save(model, tmp_path / "ck"))
    assert torch.equal(_logits(loaded, ids), out)
    assert a3mod.report(loaded).to_dict() == rep.to_dict()


def test_hybrid_streams_layer_by_layer(tmp_path):
    model, calib = make("lfm2"), _ids(4, 16, 1)
    model.save_pretrained(tmp_path / "src")
    ref = make("lfm2")
    a3mod.apply(ref, a3mod.a3_passes(0.3), calib=calib, progress=False)
    out = a3mod.compress_streaming(tmp_path / "src", tmp_path / "out", a3mod.a3_passes(0.3), calib, progress=False)
    streamed = a3mod.load(out)
    ids = _ids(2, 12, 0)
    torch.testing.assert_close(_logits(streamed, ids), _logits(ref, ids), rtol=1e-4, atol=1e-5)


def test_a_mixer_beside_the_attention_stays_and_its_parameters_are_reported():
    """Falcon-H1 runs Mamba in parallel with the attention in every layer: discovery takes the MLP after both, the
    mixer stays bit-identical, and the report counts it as kept whole (the ratio asked is met on the rest)."""
    from zoo import tiny_zoo_model

    model = tiny_zoo_model("falcon_h1").eval()
    mamba = {n: p.clone() for n, p in model.model.layers[0].mamba.named_parameters()}
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    assert all(torch.equal(p, mamba[n]) for n, p in model.model.layers[0].mamba.named_parameters())
    rep = a3mod.report(model)
    from a3mod.report import linear_param_count

    assert rep.kept_whole == sum(linear_param_count(layer.mamba) for layer in model.model.layers)
    assert abs(rep.ratio_reducible - 0.3) < 0.03 and rep.ratio < rep.ratio_reducible


def test_a_shared_expert_beside_the_moe_block_is_compressed():
    """Granite 4.0-H keeps its shared MLP on the layer beside the MoE block (ArchSpec.shared_on_layer); the zoo
    config keeps one attention layer among the Mamba layers, as the real checkpoints have."""
    from a3mod.arch.lookup import spec_for
    from zoo import tiny_zoo_model

    model = tiny_zoo_model("granitemoehybrid").eval()
    spec = spec_for(model)
    assert spec.shared_on_layer and spec.shared == "shared_mlp"
    views = layer_views(model)
    assert [bool(v.mixer) for v in views] == [True, False] and all(v.mlp_path == "shared_mlp" for v in views)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    assert all(type(layer.shared_mlp).__name__ == "ReducedMLP" for layer in model.model.layers)


def test_one_mixer_per_layer_nemotron_h():
    """Nemotron-H holds one mixer per layer at the same path: Mamba-2 (left as it is), attention (reduced, no MLP
    beside it), a plain MLP or an MoE block (reduced, no attention): each layer's view reads which."""
    from zoo import tiny_zoo_model

    model = tiny_zoo_model("nemotron_h").eval()
    kinds = model.config.layers_block_type
    views = layer_views(model)
    for v, kind in zip(views, kinds):
        if kind == "full_attention":
            assert v.attn is not None and not v.has_mlp and v.experts is None
        elif kind in ("mlp", "moe"):
            assert v.attn is None and v.mixer.startswith("an MLP layer") and (v.has_mlp or v.experts is not None)
        else:
            assert v.left
    ids = _ids(2, 12, 0)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(4, 16, 1), progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-4
