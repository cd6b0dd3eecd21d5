"""Full-rank A3 must reproduce the original model; compressed models must stay finite and consistent."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod import ReducedHeadAttention, ReducedMLP

from conftest import (FAMILIES, ROPE_FAMILIES, VOCAB, assert_close_logits, attn_modules, calib_ids, input_ids,
                      logits, mlp_modules, model_from_config, tiny_config, tiny_model)

IMPLS = ("eager", "sdpa")


@st.composite
def configs(draw, family: str):
    """Random tiny configs of `family`: heads, KV heads (MHA / GQA / MQA), even head dims, biases."""
    layers = draw(st.integers(1, 2))
    if family == "gpt2":
        heads = draw(st.sampled_from([2, 4]))
        head_dim = draw(st.sampled_from([4, 8, 16]))
        return tiny_config("gpt2", hidden=heads * head_dim, heads=heads, layers=layers,
                           inter=draw(st.sampled_from([32, 64, 96])),
                           activation_function=draw(st.sampled_from(["gelu_new", "relu", "gelu"])),
                           scale_attn_by_inverse_layer_idx=draw(st.booleans()))
    heads = draw(st.sampled_from([2, 4, 6]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 3, 6) if heads % d == 0 and d <= heads]))
    hidden = draw(st.sampled_from([h for h in (24, 32, 48) if h % heads == 0]))
    extra = {}
    if family == "qwen2":
        if hidden % heads or (hidden // heads) % 2:
            heads, kv_heads = 4, draw(st.sampled_from([1, 2, 4]))
        head_dim = None
    else:
        head_dim = draw(st.sampled_from([4, 8, 12, 16]))
    if family == "llama":
        extra = dict(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))
    if family == "mistral":
        extra = dict(sliding_window=draw(st.sampled_from([None, 4, 64])))
    return tiny_config(family, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, layers=layers,
                       inter=draw(st.sampled_from([32, 64, 80])), **extra)


def _check_full_rank_equivalence(config, seed: int) -> None:
    model = model_from_config(config, seed)
    ids = input_ids()
    ref = {}
    for impl in IMPLS:
        model.set_attn_implementation(impl)
        ref[impl] = logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    assert all(isinstance(a, ReducedHeadAttention) for a in attn_modules(model))
    assert all(isinstance(m, ReducedMLP) for m in mlp_modules(model))
    for impl in IMPLS:
        model.set_attn_implementation(impl)
        assert_close_logits(logits(model, ids), ref[impl])


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=25)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_full_rank_reproduces_logits(family, data, seed):
    _check_full_rank_equivalence(data.draw(configs(family)), seed)


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(heads=4, kv_heads=4)),                       # MHA: OV whitened by the attention output
    ("llama", dict(heads=4, kv_heads=2, attention_bias=True, mlp_bias=True)),
    ("llama", dict(heads=4, kv_heads=1, head_dim=16)),          # MQA, head_dim != hidden / heads
    ("mistral", dict(heads=4, kv_heads=2, sliding_window=4)),
    ("qwen2", dict(heads=4, kv_heads=2)),                       # q/k/v biases (v bias folded into o)
    ("qwen2", dict(heads=4, kv_heads=4)),                       # MHA with v bias: centred attention output
    ("gpt2", dict(heads=4)),
])
def test_full_rank_reproduces_logits_fixed(family, kw):
    _check_full_rank_equivalence(tiny_config(family, **kw), seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_with_left_padding(family):
    model = tiny_model(family, impl="eager")
    ids = input_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ref = logits(model, ids, attention_mask=mask)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    got = logits(model, ids, attention_mask=mask)
    keep = mask.bool()
    assert_close_logits(got[keep], ref[keep])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_keeps_dims(family):
    model = tiny_model(family, heads=4, **({} if family == "gpt2" else dict(kv_heads=2)))
    params_before = a3mod.report(model).params
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    for a in attn_modules(model):
        assert (a.qk_dim, a.vo_dim) == (8, 8)
        if a.rot_dim:
            assert a.rope_index.tolist() == [list(range(8))] * a.num_key_value_heads
    assert all(m.inter == m.orig_inter == 64 for m in mlp_modules(model))
    # the value bias is folded into o_proj's bias (softmax rows sum to 1); nothing else changes
    if family == "qwen2":     # v bias (2 KV heads x 8) removed, o bias (hidden 32) created, per layer
        assert a3mod.report(model).params == params_before + 2 * (32 - 16)
    elif family == "gpt2":    # v bias (4 heads x 8) removed, o bias existed
        assert a3mod.report(model).params == params_before - 2 * 32
    else:
        assert a3mod.report(model).params == params_before


def _greedy(model, prompt, use_cache):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=use_cache,
                              pad_token_id=0, attention_mask=torch.ones_like(prompt))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.0, 0.3])
@pytest.mark.parametrize("impl", IMPLS)
def test_generate_with_cache_matches_no_cache(family, ratio, impl):
    model = tiny_model(family, impl=impl, **({} if family == "gpt2" else dict(kv_heads=2)))
    prompt = input_ids(1, 6, seed=5)
    original = _greedy(model, prompt, True)
    a3mod.apply(model, a3mod.a3_passes(ratio), calib=calib_ids(), progress=False)
    cached, uncached = _greedy(model, prompt, True), _greedy(model, prompt, False)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, uncached)
    if ratio == 0.0:
        assert torch.equal(cached, original)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_generate_with_cache_per_group_rope(family):
    """30% with GQA: every KV group keeps its own RoPE pairs, which the cached decode must reuse."""
    model = tiny_model(family, impl="eager", heads=4, kv_heads=2, head_dim=16 if family != "qwen2" else None)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    idx = [a.rope_index for a in attn_modules(model)]
    assert any(not bool((i == i[:1]).all()) for i in idx), "test needs groups with different kept pairs"
    prompt = input_ids(1, 7, seed=9)
    assert torch.equal(_greedy(model, prompt, True), _greedy(model, prompt, False))
    # a step-by-step decode with the cache equals the full forward
    ids = input_ids(1, 10, seed=3)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :6], use_cache=True)
        step = model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True).logits
    assert_close_logits(torch.cat([out.logits, step], 1), full, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_print_shows_reduced_dims(family):
    model = tiny_model(family, heads=4, **({} if family == "gpt2" else dict(kv_heads=2)))
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    text = str(model)
    assert "ReducedHeadAttention" in text and "ReducedMLP" in text
    assert "head_dim 8 -> qk 6 / vo 6" in text
    assert "intermediate 64 -> 45" in text
    if family == "gpt2":
        assert "no rope" in text
    else:
        assert "rope dims 6 (per KV group)" in text


@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_random_model_is_finite_and_on_target(family):
    model = tiny_model(family, layers=2, heads=4, hidden=64, inter=128,
                       **({} if family == "gpt2" else dict(kv_heads=2)))
    ids = input_ids()
    ref = logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    out = logits(model, ids)
    assert out.shape == ref.shape == (2, 12, VOCAB)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ref)            # something was actually removed
    rep = a3mod.report(model)
    assert 0.2 <= rep.ratio <= 0.4, rep.ratio
    assert rep.params < rep.params_orig


def test_compress_then_switch_attention_implementation():
    """The reduced modules read the implementation from the shared config at call time."""
    model = tiny_model("llama", impl="eager", kv_heads=2)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    ids = input_ids()
    eager = logits(model, ids)
    model.set_attn_implementation("sdpa")
    assert_close_logits(logits(model, ids), eager, rel=1e-5)


def test_original_model_is_not_a_copy():
    """apply works in place and returns the same object."""
    model = tiny_model("llama")
    out = a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(), progress=False)
    assert out is model
    assert model.a3mod_info["calib_tokens"] == 64
    assert [p["type"] for p in model.a3mod_info["passes"]] == ["A3QK", "A3OV", "A3MLP"]


def test_only_mlp_pass_leaves_attention_dims():
    model = tiny_model("llama", kv_heads=2)
    ref_model = copy.deepcopy(model)
    a3mod.apply(model, [a3mod.A3MLP(ratio=0.5)], calib=calib_ids(), progress=False)
    assert all((a.qk_dim, a.vo_dim) == (8, 8) for a in attn_modules(model))
    assert all(m.inter == 32 for m in mlp_modules(model))
    # the kept neurons are copied verbatim
    for m, old in zip(mlp_modules(model), mlp_modules(ref_model)):
        assert torch.equal(m.up_proj.weight, old.up_proj.weight[m.kept])
        assert torch.equal(m.gate_proj.weight, old.gate_proj.weight[m.kept])
        assert torch.equal(m.down_proj.weight, old.down_proj.weight[:, m.kept])


# ------------------------------------------------------------------------------ sliding window (Mistral)
def _windowed_attention(module, q, k, v, mask, scaling=None, sliding_window=None, dropout=0.0, **_):
    """A backend that, like flash-attention, takes the window as an argument rather than from the mask."""
    t, s = q.shape[-2], k.shape[-2]
    i = torch.arange(t)[:, None] + (s - t)
    j = torch.arange(s)[None]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    w = ((q @ k.transpose(-1, -2)) * scaling).masked_fill(~allowed, float("-inf")).softmax(-1)
    return (w @ v).transpose(1, 2).contiguous(), w


@pytest.mark.xfail(reason="BUG: rewrite.LayerWork.build reads sliding_window from the attention module; "
                          "MistralAttention keeps it only in config, so the reduced attention passes "
                          "sliding_window=None to backends that take the window as an argument", strict=True)
def test_mistral_sliding_window_reaches_attention_backend():
    from transformers import AttentionInterface

    AttentionInterface.register("a3mod_test_windowed", _windowed_attention)
    model = tiny_model("mistral", kv_heads=2, sliding_window=4)
    ids = input_ids(1, 12)
    model.set_attn_implementation("eager")
    ref = logits(model, ids)
    model.set_attn_implementation("a3mod_test_windowed")
    assert_close_logits(logits(model, ids), ref)          # the backend itself is faithful
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    assert_close_logits(logits(model, ids), ref)
    assert [a.sliding_window for a in attn_modules(model)] == [4, 4]
