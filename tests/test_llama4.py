"""Llama 4 (text): complex-frequency RoPE on interleaved pairs, an L2 q/k norm after it in the RoPE layers (QK kept
whole there), NoPE layers whose queries are temperature-tuned by position, chunked attention, dense and MoE layers
(adapter `llama4_text`). Tiny random configs; the temperature and the chunks act inside the test windows."""
from __future__ import annotations

import pytest
import torch
import transformers

import a3mod
from a3mod.arch import layer_views
from a3mod.modules.attention import ReducedHeadAttention
from zoo import _greedy, _ids, _logits, tiny_zoo_config


def make(step: int = 2):
    c = tiny_zoo_config("llama4_text")
    c.interleave_moe_layer_step, c.moe_layers = step, list(range(step - 1, c.num_hidden_layers, step))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(c).float().eval()


def test_views_read_the_layer_kinds():
    model = make()
    views = layer_views(model)
    assert [v.dims.rot_dim > 0 for v in views] == [bool(f) for f in model.config.no_rope_layers]
    assert [v.qk_norm for v in views] == ["head" if f else None for f in model.config.no_rope_layers]
    assert [v.temperature() is not None for v in views] == [not f for f in model.config.no_rope_layers]
    assert [v.experts is not None for v in views] == [i in model.config.moe_layers for i in range(len(views))]


def test_full_rank_is_exact_and_30_percent_runs_cached(tmp_path):
    model, ids, calib = make(), _ids(2, 14, 0), _ids(8, 16, 1)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib, progress=False)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    model = make()
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib, progress=False)
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    assert abs(a3mod.report(model).ratio_reducible - 0.3) < 0.05
    prompt = _ids(1, 9, 5)          # past the temperature floor (4) and the attention chunk (6) while generating
    assert torch.equal(_greedy(model, prompt, True), _greedy(model, prompt, False))
    loaded = a3mod.load(a3mod.save(model, tmp_path / "ck"))
    assert torch.equal(_logits(loaded, ids), out)
    model.save_pretrained(tmp_path / "hf")
    native = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(_logits(native, ids), out)


def test_the_temperature_and_the_norm_are_live():
    """Dropping the NoPE layers' temperature or the RoPE layers' L2 norm changes the outputs: both are modelled."""
    model, ids = make(), _ids(2, 14, 0)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(8, 16, 1), progress=False)
    base = _logits(model, ids)
    attn = [m for m in model.modules() if isinstance(m, ReducedHeadAttention)]
    nope = next(a for a in attn if a.cfg.temperature_scale is not None)
    rope = next(a for a in attn if a.cfg.qk_norm_after_rope)
    assert rope.qk_dim == rope.head_dim and "qk-norm" in repr(rope)
    cfg = nope.cfg
    object.__setattr__(cfg, "temperature_scale", 0.0)          # log1p(...) * 0 + 1: no tuning
    assert not torch.allclose(_logits(model, ids), base, atol=1e-5)
    object.__setattr__(cfg, "temperature_scale", model.config.attn_scale)
    torch.testing.assert_close(_logits(model, ids), base, rtol=0, atol=0)


@pytest.mark.parametrize("step", [1, 2])
def test_streaming_equals_in_memory(tmp_path, step):
    from test_stream import assert_streaming_equals_in_memory

    assert_streaming_equals_in_memory(make(step), tmp_path, a3mod.a3_passes(0.3))
