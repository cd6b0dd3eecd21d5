"""Support matrix, part A: qwen3, olmo2, gemma, gemma2, starcoder2.

Each family gets the four checks of family_checks.py (full rank as a hypothesis property over small random
configs, 30 %, cached generate, save/load) and tests of its own features: qk-norm (qwen3 per head, olmo2 over
the whole projection) kept exact at the full head dim, gemma2's logit softcapping / query_pre_attn_scalar /
alternating sliding windows, starcoder2's biases, LayerNorm, non-gated MLP and sliding window.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod import ReducedHeadAttention, ReducedMLP, UnsupportedModelError

import family_checks as fc
from conftest import VOCAB, assert_close_logits, attn_modules, calib_ids, input_ids, logits, mlp_modules, \
    model_from_config

FAMILIES_A = ("qwen3", "olmo2", "gemma", "gemma2", "starcoder2")
QK_NORM = {"qwen3": "head", "olmo2": "all"}
_CONFIGS = {"qwen3": transformers.Qwen3Config, "olmo2": transformers.Olmo2Config, "gemma": transformers.GemmaConfig,
            "gemma2": transformers.Gemma2Config, "starcoder2": transformers.Starcoder2Config}


def config_a(family: str, *, hidden: int = 32, heads: int = 4, kv_heads: int | None = None,
             head_dim: int | None = None, layers: int = 2, inter: int = 64, init: float = 0.1, **extra):
    """A tiny random config of a part-A family (same conventions as conftest.tiny_config)."""
    kw = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=64,
              initializer_range=init, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if family in ("qwen3", "gemma", "gemma2"):   # their own head_dim setting (default 128 / 256: too big here)
        kw["head_dim"] = head_dim or hidden // heads
    else:
        assert head_dim is None, f"{family} derives head_dim from hidden / heads"
    if family == "gemma2":      # small softcap: the tanh really bends the scores of these random weights
        kw.update(query_pre_attn_scalar=12, attn_logit_softcapping=2.0, sliding_window=4)
    if family == "starcoder2":
        kw.update(use_bias=True, sliding_window=4)
    kw.update(extra)
    return _CONFIGS[family](**kw)


def model_a(family: str, seed: int = 0, impl: str | None = None, **kw):
    model = model_from_config(config_a(family, **kw), seed)
    if impl is not None:
        model.set_attn_implementation(impl)
    return model


def impls(family: str) -> tuple[str, ...]:
    """Gemma-2's HF class refuses sdpa (no softcapping there), so it is checked with eager only."""
    return ("eager",) if family == "gemma2" else fc.IMPLS


# MHA and GQA variants per family (olmo2 / starcoder2: d_h = hidden / heads)
VARIANTS = [
    ("qwen3", dict(kv_heads=4)),
    ("qwen3", dict(kv_heads=2, head_dim=16, attention_bias=True)),
    ("olmo2", dict(kv_heads=4)),
    ("olmo2", dict(kv_heads=2, attention_bias=True)),
    ("gemma", dict(kv_heads=4, head_dim=12)),
    ("gemma", dict(kv_heads=1, head_dim=16)),
    ("gemma2", dict(kv_heads=4)),
    ("gemma2", dict(kv_heads=2, head_dim=16)),
    ("starcoder2", dict(kv_heads=4)),
    ("starcoder2", dict(kv_heads=2, use_bias=False)),
]
IDS = [f"{f}-{i}" for i, (f, _) in enumerate(VARIANTS)]


# ----------------------------------------------------------------------------------- the four checks
@st.composite
def configs_a(draw, family: str):
    """Random tiny configs: MHA / GQA / MQA, head dims, biases and the family's own options."""
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    hidden = draw(st.sampled_from([16, 24, 32]))
    head_dim = draw(st.sampled_from([4, 8, 12])) if family in ("qwen3", "gemma", "gemma2") else None
    extra = {}
    if family in ("qwen3", "olmo2", "gemma", "gemma2"):
        extra["attention_bias"] = draw(st.booleans())
    if family == "qwen3":
        extra["layer_types"] = draw(st.sampled_from([["full_attention"] * 2, ["sliding_attention", "full_attention"]]))
        extra.update(use_sliding_window=True, sliding_window=4)
    if family == "gemma2":
        extra.update(attn_logit_softcapping=draw(st.sampled_from([None, 1.0, 50.0])),
                     query_pre_attn_scalar=draw(st.sampled_from([4, 12, 64])),
                     sliding_window=draw(st.sampled_from([2, 4, 64])))
    if family == "starcoder2":
        extra.update(use_bias=draw(st.booleans()), sliding_window=draw(st.sampled_from([None, 4])),
                     hidden_act=draw(st.sampled_from(["gelu_pytorch_tanh", "relu"])))
    return config_a(family, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                    inter=draw(st.sampled_from([24, 64])), **extra)


@pytest.mark.parametrize("family", FAMILIES_A)
@settings(max_examples=5)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_full_rank_reproduces_outputs(family, data, seed):
    config = data.draw(configs_a(family))
    fc.full_rank_reproduces_outputs(lambda: model_from_config(copy.deepcopy(config), seed), impls=impls(family))


@pytest.mark.parametrize("family,kw", VARIANTS, ids=IDS)
def test_full_rank_fixed(family, kw):
    fc.full_rank_reproduces_outputs(lambda: model_a(family, **kw), impls=impls(family))


@pytest.mark.parametrize("family,kw", VARIANTS, ids=IDS)
def test_compresses_at_30_percent(family, kw):
    # qk-norm families keep QK whole; OV and the MLP give its share (see test_qk_norm_achieved_ratio)
    lo = 0.2
    fc.compresses_at(lambda: model_a(family, **kw), 0.3, lo=lo)


@pytest.mark.parametrize("family,kw", VARIANTS, ids=IDS)
def test_cached_generate_matches_uncached(family, kw):
    fc.cached_generate_matches_uncached(lambda: model_a(family, **kw), impls=impls(family))


@pytest.mark.parametrize("family,kw", VARIANTS, ids=IDS)
def test_save_load_round_trip(family, kw, tmp_path):
    fc.save_load_round_trip(lambda: model_a(family, **kw), tmp_path)


# ------------------------------------------------------------------------------------------- qk-norm
@pytest.mark.parametrize("family,kw", [v for v in VARIANTS if v[0] in QK_NORM])
def test_qk_norm_layers_keep_qk_whole_and_exact(family, kw):
    """Treatment "keep": q/k projections and norms are copied verbatim, v/o and the MLP shrink."""
    model = model_a(family, **kw)
    ref = copy.deepcopy(model)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    d = ref.config.head_dim if getattr(ref.config, "head_dim", None) else ref.config.hidden_size // 4
    for a, old in zip(attn_modules(model), attn_modules(ref)):
        assert isinstance(a, ReducedHeadAttention) and a.qk_norm == QK_NORM[family]
        assert a.qk_dim == a.rot_dim == d and a.vo_dim < d
        assert bool((a.rope_index == torch.arange(d)).all())
        for name in ("q_proj", "k_proj", "q_norm", "k_norm"):
            for (n, p), (_, p0) in zip(getattr(a, name).named_parameters(), getattr(old, name).named_parameters()):
                assert torch.equal(p, p0), (name, n)
    rep = a3mod.report(model)
    assert all(r.qk_dim == r.head_dim for r in rep.rows)


def _expected_ratio_keep_qk(model, ratio: float) -> float:
    """Achieved ratio when only v/o (pairs) and the MLP are cut at `ratio` and QK stays whole."""
    c = model.config
    hidden, heads, kv, inter = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    d = getattr(c, "head_dim", None) or hidden // heads
    b = 1 if c.attention_bias else 0
    r_vo = max(2, round((1 - ratio) * d / 2) * 2)
    r_mlp = round((1 - ratio) * inter)
    qk = (heads + kv) * d * (hidden + b)
    full = qk + (kv * d) * (hidden + b) + heads * d * hidden + b * hidden + 3 * hidden * inter
    kept = qk + kv * r_vo * hidden + heads * r_vo * hidden + b * hidden + 3 * hidden * r_mlp   # v bias folded
    return 1 - kept / full


@pytest.mark.parametrize("family", list(QK_NORM))
def test_qk_norm_achieved_ratio(family):
    """QK whole, OV and MLP give its share at one raised ratio (passes.balance.balance): the report states exactly what
    that removes, and it is the target up to the rounding of kept dims."""
    model = model_a(family, kv_heads=2)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    rep = a3mod.report(model)
    raised = model.a3mod_info["passes"][1]["ratio"]
    assert raised > 0.3 and model.a3mod_info["passes"][2]["ratio"] == raised
    assert rep.ratio == pytest.approx(_expected_ratio_keep_qk(model, raised), abs=1e-12)
    assert abs(rep.ratio - 0.3) < 0.02


@pytest.mark.parametrize("family", list(QK_NORM))
def test_qk_norm_really_applied(family):
    """The kept norms are live: scaling their weights changes the compressed model's outputs."""
    model = model_a(family, kv_heads=2)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    ids = input_ids()
    before = logits(model, ids)
    with torch.no_grad():
        for a in attn_modules(model):
            a.q_norm.weight.mul_(3.0)
    assert not torch.allclose(logits(model, ids), before, atol=1e-4)


def test_qk_norm_module_refuses_reduced_qk():
    norm = torch.nn.Identity()
    with pytest.raises(ValueError, match="full head dim"):
        ReducedHeadAttention(config_a("qwen3"), 0, hidden=32, heads=4, kv_heads=4, head_dim=8, qk_dim=6, vo_dim=8,
                             rot_dim=6, scaling=8 ** -0.5, bias=dict(q=False, k=False, v=False, o=False),
                             qk_norm="head", q_norm=norm, k_norm=norm)
    with pytest.raises(ValueError, match="qk_norm='rms'"):
        ReducedHeadAttention(config_a("qwen3"), 0, hidden=32, heads=4, kv_heads=4, head_dim=8, qk_dim=8, vo_dim=8,
                             rot_dim=8, scaling=8 ** -0.5, bias=dict(q=False, k=False, v=False, o=False),
                             qk_norm="rms", q_norm=norm, k_norm=norm)


@pytest.mark.parametrize("family", list(QK_NORM))
def test_explicit_qk_rank_leaves_qk_norm_layers_whole(family):
    model = model_a(family, kv_heads=2)
    a3mod.apply(model, [a3mod.A3QK(rank=4)], calib=calib_ids(), progress=False)
    assert all((a.qk_dim, a.vo_dim) == (8, 8) for a in attn_modules(model))
    with pytest.raises(a3mod.RatioError):
        a3mod.apply(model_a(family), [a3mod.A3QK(rank=3)], calib=calib_ids(), progress=False)


# ---------------------------------------------------------------------------------------- softcapping
def test_softcap_reaches_the_attention():
    """Gemma-2 with a small softcap: full rank matches; without the cap the same weights give other outputs,
    and switching the compressed modules' cap off gives exactly those."""
    model = model_a("gemma2", kv_heads=2, impl="eager")
    uncapped = model_a("gemma2", kv_heads=2, impl="eager", attn_logit_softcapping=None)
    ids = input_ids()
    ref, ref_uncapped = logits(model, ids), logits(uncapped, ids)
    assert not torch.allclose(ref, ref_uncapped, atol=1e-3), "the cap must matter for this test"
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    assert all(a.softcap == 2.0 for a in attn_modules(model))
    assert_close_logits(logits(model, ids), ref)
    for a in attn_modules(model):
        a.softcap = None
    assert_close_logits(logits(model, ids), ref_uncapped)


def test_softcap_with_sdpa_is_refused():
    """sdpa has no softcapping: the HF sdpa backend raises rather than silently dropping the cap."""
    model = model_a("gemma2", kv_heads=2, impl="eager")
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    model.config._attn_implementation = "sdpa"          # the HF class refuses set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="softcap"):
        logits(model, input_ids())


def test_query_pre_attn_scalar_is_the_scale():
    model = model_a("gemma2", kv_heads=2, query_pre_attn_scalar=12)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert all(a.scaling == pytest.approx(12 ** -0.5) for a in attn_modules(model))
    assert "scale=0.288675" in str(model) and "softcap=2" in str(model)


# ----------------------------------------------------------------------------- sliding window backend
_SEEN: list = []


def _windowed_attention(module, q, k, v, mask, scaling=None, sliding_window=None, softcap=None, dropout=0.0, **_):
    """A backend that, like flash-attention, takes the window (and softcap) as arguments, not from the mask."""
    _SEEN.append((module.layer_idx, sliding_window, softcap))
    t, s = q.shape[-2], k.shape[-2]
    i = torch.arange(t)[:, None] + (s - t)
    j = torch.arange(s)[None]
    allowed = j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    w = (q @ k.transpose(-1, -2)) * scaling
    if softcap is not None:
        w = torch.tanh(w / softcap) * softcap
    w = w.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (w @ v).transpose(1, 2).contiguous(), w


@pytest.mark.parametrize("family,kw,windows", [
    ("gemma2", dict(), [4, None]),                                            # alternating layer_types
    ("starcoder2", dict(), [4, 4]),                                           # window only in the config
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
     [4, None]),
])
def test_sliding_window_reaches_attention_backend(family, kw, windows):
    from transformers import AttentionInterface

    AttentionInterface.register("a3mod_test_windowed_a", _windowed_attention)
    model = model_a(family, kv_heads=2, **kw)
    ids = input_ids(1, 12)
    model.set_attn_implementation("eager")
    ref = logits(model, ids)
    model.set_attn_implementation("a3mod_test_windowed_a")
    assert_close_logits(logits(model, ids), ref)          # the backend itself is faithful
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    assert [a.sliding_window for a in attn_modules(model)] == windows
    _SEEN.clear()
    assert_close_logits(logits(model, ids), ref)
    cap = model.config.attn_logit_softcapping if family == "gemma2" else None
    assert sorted(_SEEN, key=lambda s: s[0]) == [(i, w, cap) for i, w in enumerate(windows)]


def test_window_changes_outputs():
    """The windows are not vacuous for these inputs (12 tokens, window 4)."""
    ids = input_ids(1, 12)
    windowed, full = model_a("starcoder2"), model_a("starcoder2", sliding_window=None)
    assert not torch.allclose(logits(windowed, ids), logits(full, ids), atol=1e-4)


# ---------------------------------------------------------------------------------- family details
def test_starcoder2_biases_layernorm_and_plain_mlp():
    model = model_a("starcoder2", kv_heads=2)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    for a, m in zip(attn_modules(model), mlp_modules(model)):
        assert a.q_proj.bias is not None and a.k_proj.bias is not None and a.o_proj.bias is not None
        assert a.v_proj.bias is None                      # folded into o_proj's bias
        assert isinstance(m, ReducedMLP) and m.gate_proj is None and m.up_proj.bias is not None
        assert m.act == "gelu_pytorch_tanh"
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.LayerNorm)


def test_starcoder2_residual_dropout_survives_in_train_mode():
    model = model_a("starcoder2", residual_dropout=0.5)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
    assert all(a.out_dropout == 0.5 for a in attn_modules(model))
    assert all(m.dropout == 0.5 for m in mlp_modules(model))
    ids = input_ids()
    model.train()
    assert not torch.equal(logits(model, ids), logits(model, ids))


def test_gemma_head_dim_independent_of_hidden():
    model = model_a("gemma", hidden=24, heads=4, kv_heads=2, head_dim=16)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert all((a.head_dim, a.qk_dim, a.vo_dim) == (16, 12, 12) for a in attn_modules(model))
    assert all(a.q_proj.in_features == 24 and a.o_proj.out_features == 24 for a in attn_modules(model))


@pytest.mark.parametrize("family,expect", [
    # qk-norm: OV and the MLP give QK's share at 36% (passes.balance.balance)
    ("qwen3", ["head_dim 8 -> qk 8 / vo 6", "qk-norm head (q/k kept at full head dim)", "intermediate 64 -> 41"]),
    ("olmo2", ["head_dim 8 -> qk 8 / vo 6", "qk-norm all (q/k kept at full head dim)", "intermediate 64 -> 41"]),
    ("gemma", ["head_dim 16 -> qk 12 / vo 12", "rope dims 12 (per KV group)", "intermediate 64 -> 45"]),
    ("gemma2", ["head_dim 16 -> qk 12 / vo 12", "softcap=2", "intermediate 64 -> 45"]),
    ("starcoder2", ["head_dim 8 -> qk 6 / vo 6", "rope dims 6 (per KV group)",
                    "intermediate 64 -> 45, act=gelu_pytorch_tanh, gated=False"]),
])
def test_print_shows_reduced_dims(family, expect):
    model = model_a(family, kv_heads=2, **({"head_dim": 16} if family in ("gemma", "gemma2") else {}))
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    text = str(model)
    assert "ReducedHeadAttention" in text and "ReducedMLP" in text
    for e in expect:
        assert e in text, e


# ------------------------------------------------------------------------- refused, with a typed error
@pytest.mark.parametrize("family", list(QK_NORM))
def test_kv_budget_passes_refuse_qk_norm(family):
    """KV budgets cannot shrink K under q/k norms (Allocate's parameter budget can: tests/test_ratio_balance.py)."""
    model = model_a(family, kv_heads=2)
    for p in (a3mod.A3KV(kv_ratio=0.5), a3mod.ASVD(kv_ratio=0.5)):
        with pytest.raises(UnsupportedModelError, match="qk-norm"):
            a3mod.apply(model, [p], calib=calib_ids(), progress=False)


def test_asvd_kv_mode_refuses_softcap():
    model = model_a("gemma2", kv_heads=2)
    with pytest.raises(UnsupportedModelError, match="softcap"):
        a3mod.apply(model, [a3mod.ASVD(kv_ratio=0.5)], calib=calib_ids(), progress=False)
