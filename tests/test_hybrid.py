"""Hybrid models: attention layers are compressed, linear-attention / convolution / state-space layers are left as
they are, and the report says which and why (LFM2 with conv layers, OLMo-hybrid with gated-delta-net layers)."""
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
def test_hybrid_compresses_attention_layers_and_leaves_mixers(mtype, tmp_path):
    model, ids, calib = make(mtype), _ids(2, 12, 0), _ids(4, 16, 1)
    views = layer_views(model)
    left = [v.index for v in views if v.left]
    assert left and len(left) < len(views)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib, progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-4

    model = make(mtype)
    mixers = {i: {n: p.clone() for n, p in layer_views(model)[i].layer.named_parameters()} for i in left}
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib, progress=False)
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    names = compact_modules(model)
    for i in left:                           # untouched: no compact module, same weights
        assert not any(n.startswith(f"model.layers.{i}.") for n in names)
        layer = model.model.layers[i]
        assert all(torch.equal(p, mixers[i][n]) for n, p in layer.named_parameters())
    rep = a3mod.report(model)
    assert [r.layer for r in rep.rows if r.left] == left
    assert all("no attention" in r.left for r in rep.rows if r.left)
    assert "left as it is" in str(rep)
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
