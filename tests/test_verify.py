"""Self-verifying descriptions: a wrong adapter or discovery result is a DiscoveryError before anything is touched.

Each test breaks the description on purpose (wrong RoPE layout, wrong activation) and checks
that apply / streaming refuse with the part named, leaving the model and the output folder as they were.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import a3mod
from a3mod.arch import adapters, layer_views
from a3mod.errors import DiscoveryError
from a3mod.pipeline.verify import structure_key, tolerance, verify_model

from conftest import calib_ids, input_ids, logits, tiny_model


@pytest.fixture
def broken_llama(monkeypatch):
    """Llama's adapter with the RoPE layout wrong (interleaved instead of rotate_half)."""
    spec = adapters.ARCHS["llama"]
    monkeypatch.setitem(adapters.ARCHS, "llama", dataclasses.replace(spec, rope="interleaved"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_correct_descriptions_verify_within_round_off(family):
    model = tiny_model(family)
    checks = verify_model(model, layer_views(model))
    assert [c.index for c in checks] == [0] and checks[0].same == (1,)     # two layers, one structure
    assert checks[0].attn_error < 1e-5 and checks[0].layer_error < 1e-5


def test_wrong_rope_layout_is_refused_naming_the_attention(broken_llama):
    model = tiny_model("llama")
    ids = input_ids()
    before = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DiscoveryError, match=r"rewrite of the attention .*RoPE interleaved over 8 of 8 dims"):
        a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(), progress=False)
    assert not a3mod.pipeline.compress.compact_modules(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), before)


def test_wrong_activation_is_refused_naming_the_mlp():
    model = tiny_model("llama")
    model.config.hidden_act = "gelu"          # the modules keep SiLU; the description now says GELU
    with pytest.raises(DiscoveryError, match=r"rewrite of the MLP .*activation config.hidden_act"):
        a3mod.apply(model, [a3mod.A3MLP(ratio=0.2)], calib=calib_ids(), progress=False)


def test_baselines_that_only_factor_linears_skip_the_check(broken_llama):
    model = tiny_model("llama")
    a3mod.apply(model, [a3mod.PlainSVD(ratio=0.2)], progress=False)       # no attention rebuilt: allowed
    with pytest.raises(DiscoveryError):
        a3mod.apply(tiny_model("llama"), [a3mod.ASVD(kv_ratio=0.3, rank_search=False)], calib=calib_ids(),
                    progress=False)


def test_distinct_structures_are_each_checked():
    model = tiny_model("llama", layers=3)
    model.model.layers[1].self_attn.sliding_window = 4      # a scalar setting makes layer 1 its own structure
    keys = [structure_key(v.layer) for v in layer_views(model)]
    assert keys[0] == keys[2] != keys[1]
    checks = verify_model(model, layer_views(model))
    assert [(c.index, c.same) for c in checks] == [(0, (2,)), (1, ())]


def test_streaming_refuses_a_wrong_description(broken_llama, tmp_path):
    model = tiny_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out"
    with pytest.raises(DiscoveryError, match="rewrite of the attention"):
        a3mod.compress_streaming(src, out, a3mod.a3_passes(0.2), calib_ids(), progress=False)
    assert not out.exists()


def test_tolerance_is_round_off_of_the_dtype():
    assert tolerance(torch.float32) == 1e-4 and tolerance(torch.float64) == 1e-4
    assert tolerance(torch.bfloat16) == pytest.approx(64 * 2 ** -7)
