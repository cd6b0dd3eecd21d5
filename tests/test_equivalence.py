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
    # Qwen2 has no head_dim setting: d_h = hidden / heads (always even for these sizes)
    head_dim = None if family == "qwen2" else draw(st.sampled_from([4, 8, 12, 16]))
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


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(kv_heads=2)),
    ("mistral", dict(kv_heads=2, sliding_window=4)),     # decoding past the window, cache cropped
    ("qwen2", dict(kv_heads=1)),
    ("gpt2", dict()),
])
def test_batched_left_padded_generate(family, kw):
    """A left-padded batch decodes with the cache exactly as without it, and each row as if alone."""
    model = tiny_model(family, impl="eager", **kw)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    prompt = input_ids(2, 8, seed=4)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, attention_mask=mask, use_cache=True, **gen)
        uncached = model.generate(prompt, attention_mask=mask, use_cache=False, **gen)
        alone = model.generate(prompt[:1, 3:], attention_mask=mask[:1, 3:], use_cache=True, **gen)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[0, 3:], alone[0])


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
    assert [p["type"] for p in model.a3mod_info["passes"]] == ["A3QK", "A3OV", "A3MLP", "A3Experts"]


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


@pytest.mark.parametrize("family,kw", [
    ("mistral", dict(sliding_window=4)),          # MistralAttention keeps the window only in its config
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0)),
])
def test_sliding_window_reaches_attention_backend(family, kw):
    from transformers import AttentionInterface

    AttentionInterface.register("a3mod_test_windowed", _windowed_attention)
    model = tiny_model(family, kv_heads=2, **kw)
    ids = input_ids(1, 12)
    model.set_attn_implementation("eager")
    ref = logits(model, ids)
    model.set_attn_implementation("a3mod_test_windowed")
    assert_close_logits(logits(model, ids), ref)          # the backend itself is faithful
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    assert_close_logits(logits(model, ids), ref)
    assert [a.sliding_window for a in attn_modules(model)] == [4, 4]


# ------------------------------------------------------------- selections equal zeroing what they drop
def _zero_rows(lin, rows) -> None:
    with torch.no_grad():
        lin.weight[rows] = 0
        if lin.bias is not None:
            lin.bias[rows] = 0


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(kv_heads=2, head_dim=16, attention_bias=True)),
    ("llama", dict(kv_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})),
    ("llama", dict(kv_heads=4, head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16})),
    ("mistral", dict(kv_heads=1, head_dim=12)),
    ("qwen2", dict(kv_heads=2)),
])
@pytest.mark.parametrize("impl", IMPLS)
def test_rope_qk_selection_equals_zeroing_dropped_dims(family, kw, impl):
    """A3QK under RoPE is a CUR selection: the reduced model equals the original with the dropped q/k dims
    zeroed. This checks per-group kept frequencies, the [firsts, seconds] order and the kept 1/sqrt(d_h)."""
    model = tiny_model(family, impl=impl, heads=4, **kw)
    ref = copy.deepcopy(model)
    a3mod.apply(model, [a3mod.A3QK(ratio=0.5)], calib=calib_ids(), progress=False)
    d = ref.config.head_dim if family != "qwen2" else 8
    for a, old in zip(attn_modules(model), attn_modules(ref)):
        assert a.qk_dim == a.rot_dim == d // 2 and a.vo_dim == d
        g = a.num_key_value_groups
        idx = a.rope_index.tolist()
        for j, kept in enumerate(idx):
            assert sorted(kept) == sorted(set(kept))
            assert [p + d // 2 for p in kept[: d // 4]] == kept[d // 4:]      # whole pairs, [J, J + d/2]
            drop = [x for x in range(d) if x not in kept]
            _zero_rows(old.k_proj, [j * d + x for x in drop])
            _zero_rows(old.q_proj, [h * d + x for h in range(j * g, (j + 1) * g) for x in drop])
    assert any(i[0] != i[-1] for i in [a.rope_index.tolist() for a in attn_modules(model)]) or kw["kv_heads"] == 1
    ids = input_ids()
    assert_close_logits(logits(model, ids), logits(ref, ids), rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_selection_equals_zeroing_dropped_neurons(family):
    model = tiny_model(family, impl="eager")
    ref = copy.deepcopy(model)
    a3mod.apply(model, [a3mod.A3MLP(ratio=0.4)], calib=calib_ids(), progress=False)
    from a3mod.arch import layer_views

    for m, v in zip(mlp_modules(model), layer_views(ref)):
        assert m.inter == 38 and len(m.kept) == 38 and m.kept == sorted(m.kept)
        down = v.down_module()
        drop = [i for i in range(64) if i not in m.kept]
        with torch.no_grad():
            if v.spec.conv1d:
                down.weight[drop] = 0          # Conv1D weight is (in, out)
            else:
                down.weight[:, drop] = 0
    ids = input_ids()
    assert_close_logits(logits(model, ids), logits(ref, ids), rel=1e-5)


# ------------------------------------------------------------------------ OV on MHA: optimal per head
@pytest.mark.parametrize("family,kw", [
    ("llama", dict(kv_heads=4)),
    ("qwen2", dict(kv_heads=4)),                   # value bias: centred statistics, bias folded into o
    ("gpt2", dict()),                              # value bias, Conv1D
])
def test_mha_ov_is_optimal_per_head_on_calibration_data(family, kw):
    """MHA whitens with each head's attention output: on the calibration tokens, each head's contribution
    Z_i W_o,i is replaced by its best rank-r approximation (QK untouched, so the softmax is unchanged)."""
    from a3mod.arch import layer_views

    model = tiny_model(family, impl="eager", heads=4, **kw)
    ref = copy.deepcopy(model)
    calib = calib_ids()
    r, d, heads = 4, 8, 4
    a3mod.apply(model, [a3mod.A3OV(rank=r)], calib=calib, progress=False)
    v_ref, v_new = layer_views(ref)[0], attn_modules(model)[0]
    got = {}
    h1 = v_ref.o_module().register_forward_pre_hook(lambda m, a: got.__setitem__("ref", a[0].double()))
    h2 = v_new.o_proj.register_forward_pre_hook(lambda m, a: got.__setitem__("new", a[0].double()))
    logits(ref, calib), logits(model, calib)
    h1.remove(), h2.remove()
    wo, bo = (t.detach().double() if t is not None else None for t in v_ref.o_params())     # (d_m, H d)
    bv = v_ref.qkv_params()[2][1]
    bv = torch.zeros(heads * d, dtype=torch.float64) if bv is None else bv.detach().double()
    z = got["ref"].reshape(-1, heads, d) - bv.view(heads, d)        # bias-free per-head outputs
    z_new = got["new"].reshape(-1, heads, r)
    wo_new = v_new.o_proj.weight.detach().double()                  # (d_m, H r)
    for i in range(heads):
        target = z[:, i] @ wo[:, i * d:(i + 1) * d].T                # (N, d_m)
        approx = z_new[:, i] @ wo_new[:, i * r:(i + 1) * r].T
        err = (target - approx).pow(2).sum().item()
        optimum = torch.linalg.svdvals(target)[r:].pow(2).sum().item()
        total = target.pow(2).sum().item()
        assert err == pytest.approx(optimum, rel=1e-3, abs=1e-6 * total), (i, err, optimum, total)
    # b_v W_o moved into o_proj's bias
    if family == "llama":
        assert v_new.o_proj.bias is None and v_new.v_proj.bias is None
    else:
        assert v_new.v_proj.bias is None
        fold = bv @ wo.T
        expected = fold if bo is None else bo + fold
        assert torch.allclose(v_new.o_proj.bias.detach().double(), expected, atol=1e-6)


# ----------------------------------------------------------------------------------- dtype / train mode
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model(family):
    """Statistics and solvers run in float64; the modules are built in the model's dtype."""
    model = tiny_model(family, impl="eager").to(torch.bfloat16)
    ids = input_ids()
    ref = logits(model, ids).float()
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_close_logits(logits(model, ids).float(), ref, rel=3e-2)      # bf16 rounding of rebuilt weights


def test_attention_dropout_survives_in_train_mode():
    model = tiny_model("llama", impl="eager", attention_dropout=0.5)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    assert all(a.attention_dropout == 0.5 and not a.training for a in attn_modules(model))
    ids = input_ids()
    assert torch.equal(logits(model, ids), logits(model, ids))         # eval: deterministic
    model.train()
    assert not torch.equal(logits(model, ids), logits(model, ids))     # train: dropout active


def test_gpt2_residual_dropout_survives_in_train_mode():
    model = tiny_model("gpt2", impl="eager", resid_pdrop=0.5, attn_pdrop=0.0, embd_pdrop=0.0)
    ids = input_ids()
    model.train()
    assert not torch.equal(logits(model, ids), logits(model, ids))     # the original drops activations
    model.eval()
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    model.train()
    assert not torch.equal(logits(model, ids), logits(model, ids))


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), kv=st.sampled_from([1, 2, 3]), g=st.sampled_from([1, 2, 3]), T=st.integers(1, 9),
       past=st.integers(0, 6), r=st.sampled_from([2, 5, 8]), mask=st.sampled_from(["float", "bool", None]),
       softcap=st.sampled_from([None, 5.0]), seed=st.integers(0, 2**16))
def test_eager_attention_matches_reference(B, kv, g, T, past, r, mask, softcap, seed):
    """The eager path (scale and additive mask fused into one baddbmm when it can) equals the textbook
    softmax(scale * q k^T [softcapped] + mask) v, for float, bool and no masks, GQA and a cache of `past` tokens."""
    from types import SimpleNamespace

    from a3mod.modules.attention import eager_attention
    gen = torch.Generator().manual_seed(seed)
    S, H, scale = T + past, kv * g, 0.37
    q, k = torch.randn(B, H, T, r, generator=gen, dtype=torch.float64), torch.randn(B, kv, S, r, generator=gen, dtype=torch.float64)
    v = torch.randn(B, kv, S, r + 1, generator=gen, dtype=torch.float64)
    keep = torch.ones(T, S, dtype=torch.bool).tril(past)[None, None].repeat(B, 1, 1, 1)       # causal, (B,1,T,S)
    keep[0, 0, :, 0] = torch.rand(T, generator=gen) < 0.5 if S > 1 else True                  # padding-like holes
    m = {"float": torch.zeros(B, 1, T, S, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min),
         "bool": keep, None: None}[mask]
    out, w = eager_attention(SimpleNamespace(num_key_value_groups=g, training=False), q, k, v, m, scale, softcap=softcap)
    s = q @ k.repeat_interleave(g, 1).transpose(2, 3) * scale                                 # (B,H,T,S)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    ref_w = s.softmax(-1)
    assert out.shape == (B, T, H, r + 1) and w.shape == (B, H, T, S)
    torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, (ref_w @ v.repeat_interleave(g, 1)).transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_narrow_linear_side_is_the_narrowed_one_even_when_widths_coincide():
    """A down projection keeping 32 of 64 neurons into a hidden size of 32 has in == out == 32: its kept indices
    belong to the input side (up to 63), which the width alone cannot tell; an explicit side says the same."""
    from a3mod.modules import NarrowLinear

    kept = list(range(0, 64, 2))
    dims = dict(in_features=32, out_features=32, bias=True)
    down = NarrowLinear(kept=kept, orig_in=64, orig_out=32, **dims)
    assert down.side == "in" and down.narrow_info()["side"] == "in"
    assert NarrowLinear(kept=kept, orig_in=64, orig_out=32, side="in", **dims).side == "in"
    up = NarrowLinear(kept=kept, orig_in=32, orig_out=64, **dims)
    assert up.side == "out"
    with pytest.raises(ValueError, match="32 original input indices in \\[0, 64\\)"):
        NarrowLinear(kept=list(range(40)), orig_in=64, orig_out=32, **dims)
