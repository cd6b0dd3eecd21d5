"""Support matrix, part B: Phi-3, GPT-NeoX, OPT, BERT (and RoBERTa, the same code path).

Phi-3: fused qkv_proj and gate_up_proj, partial rotary. GPT-NeoX: fused per-head (H, 3, d_h) qkv, partial
rotary, parallel residual. OPT: learned positions, fc1/fc2 on the decoder layer (narrowed in place),
pre/post layer norm. BERT: bidirectional encoder, output projection outside the attention module.
Each family runs the four checks of `family_checks` plus its own feature tests.
"""
from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod import ReducedHeadAttention, ReducedMLP
from a3mod.arch import get_path, layer_views, spec_for
from a3mod.modules import NarrowLinear
from a3mod.passes.a3 import rot_share

import family_checks as fc
from conftest import VOCAB, assert_close_logits, calib_ids, input_ids, model_from_config

FAMILIES_B = ("phi3", "gpt_neox", "opt", "bert")
DECODERS_B = ("phi3", "gpt_neox", "opt")
_COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def config_b(family: str, *, head_dim: int = 8, heads: int = 4, kv_heads: int | None = None, layers: int = 2,
             inter: int = 64, init: float = 0.1, **extra):
    """A tiny random config of a part-B family; hidden = heads * head_dim (every family here ties them)."""
    hidden = heads * head_dim
    if family == "phi3":
        return transformers.Phi3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                       num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                                       initializer_range=init, **_COMMON, **extra)
    assert kv_heads in (None, heads), f"{family} is MHA"
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                          num_attention_heads=heads, initializer_range=init, **_COMMON,
                                          **{"rotary_pct": 0.5, **extra})
    if family == "opt":
        return transformers.OPTConfig(hidden_size=hidden, ffn_dim=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, word_embed_proj_dim=hidden, init_std=init,
                                      initializer_range=init, dropout=0.0, attention_dropout=0.0,
                                      **_COMMON, **extra)
    if family in ("bert", "roberta"):
        cls = transformers.BertConfig if family == "bert" else transformers.RobertaConfig
        return cls(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                   initializer_range=init, **{**_COMMON, "pad_token_id": 0}, **extra)
    raise ValueError(family)


def _auto(config, head: str | None):
    """Encoders: BertModel, or with head "mlm" BertForMaskedLM, "causal" BertLMHeadModel (is_decoder)."""
    if config.model_type in ("bert", "roberta"):
        return {"mlm": transformers.AutoModelForMaskedLM, "causal": transformers.AutoModelForCausalLM}.get(
            head, transformers.AutoModel)
    return None


def factory(family: str, seed: int = 0, head: str | None = None, **kw):
    """make() -> the same tiny random model (eval mode) on every call."""
    config = config_b(family, **kw)
    return lambda: model_from_config(config, seed, auto=_auto(config, head))


def attn_of(model):
    spec = spec_for(model)
    return [get_path(layer, spec.attn) for layer in get_path(model, spec.layers)]


def mlp_linears(model):
    """(up, down) modules of every layer."""
    return [(get_path(v.mlp, v.spec.gate_up or v.spec.up), v.down_module()) for v in layer_views(model)]


def _kw_for(family: str) -> dict:
    return dict(kv_heads=2) if family == "phi3" else {}


# --------------------------------------------------------------------------- random configs (hypothesis)
@st.composite
def configs(draw, family: str) -> dict:
    """Keyword arguments of `config_b` for random small models of `family` (MHA / GQA where allowed)."""
    heads = draw(st.sampled_from([2, 4]))
    kw = dict(heads=heads, layers=draw(st.integers(1, 2)), head_dim=draw(st.sampled_from([4, 8, 16])),
              inter=draw(st.sampled_from([32, 48, 64])))
    if family == "phi3":
        kw["kv_heads"] = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
        kw["partial_rotary_factor"] = draw(st.sampled_from([1.0, 0.5]))
        kw["sliding_window"] = draw(st.sampled_from([None, 4]))
    elif family == "gpt_neox":
        kw["rotary_pct"] = draw(st.sampled_from([0.5, 1.0] + ([0.25] if kw["head_dim"] >= 8 else [])))
        kw["use_parallel_residual"] = draw(st.booleans())
        kw["attention_bias"] = draw(st.booleans())
        kw["hidden_act"] = draw(st.sampled_from(["gelu", "relu"]))
    elif family == "opt":
        kw["do_layer_norm_before"] = draw(st.booleans())
        kw["enable_bias"] = draw(st.booleans())
        kw["activation_function"] = draw(st.sampled_from(["relu", "gelu"]))
    else:
        kw["hidden_act"] = draw(st.sampled_from(["gelu", "relu"]))
    return kw


# ------------------------------------------------------------------------------------------ four checks
@pytest.mark.parametrize("family", FAMILIES_B)
@settings(max_examples=5)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_full_rank_reproduces_outputs(family, data, seed):
    fc.full_rank_reproduces_outputs(factory(family, seed, **data.draw(configs(family))))


@pytest.mark.parametrize("family", FAMILIES_B)
def test_compresses_at_30_percent(family):
    rep = fc.compresses_at(factory(family, **_kw_for(family)), 0.3)
    assert all((r.qk_dim, r.vo_dim, r.mlp_dim) == (6, 6, 45) for r in rep.rows)


@pytest.mark.parametrize("family", DECODERS_B)
@pytest.mark.parametrize("ratio", [0.0, 0.3])
def test_cached_generate_matches_uncached(family, ratio):
    fc.cached_generate_matches_uncached(factory(family, **_kw_for(family)), ratio)


@pytest.mark.parametrize("family,head", [*((f, None) for f in FAMILIES_B), ("bert", "mlm")])
def test_save_load_round_trip(family, head, tmp_path):
    fc.save_load_round_trip(factory(family, head=head, **_kw_for(family)), tmp_path)


# ----------------------------------------------------------------------------------- partial rotary
def test_rot_share_splits_in_proportion_with_whole_pairs():
    assert [rot_share(m, 8, 16) for m in range(0, 17, 2)] == [0, 2, 2, 4, 4, 6, 6, 8, 8]
    for rot, full in ((4, 16), (8, 16), (2, 8), (16, 16)):
        for m in range(0, full + 1, 2):
            s = rot_share(m, rot, full)
            assert s % 2 == 0 and 0 <= s <= rot and 0 <= m - s <= full - rot, (m, rot, full, s)


@pytest.mark.parametrize("family,kw", [
    ("gpt_neox", dict(head_dim=16, rotary_pct=0.5)),
    ("gpt_neox", dict(head_dim=16, rotary_pct=0.25, attention_bias=False)),
    ("phi3", dict(head_dim=16, kv_heads=2, partial_rotary_factor=0.5)),
])
def test_partial_rotary_keeps_pairs_and_equals_zeroing_dropped_rotary_dims(family, kw):
    """With the non-rotary key rows zeroed, the position-free part of the scores is 0 at any rank, so A3QK
    reduces to RoPE pair selection on the rotary dims: the reduced model equals the original with the
    dropped rotary q/k dims zeroed (checks the [kept pairs | SVD dims] head layout and the per-group RoPE)."""
    model = factory(family, **kw)()
    d, heads = 16, 4
    g = heads // (kw.get("kv_heads") or heads)
    rot = int(d * kw.get("rotary_pct", kw.get("partial_rotary_factor", 1.0)))
    with torch.no_grad():      # zero the non-rotary key dims (rows of the fused qkv that make keys)
        for v in layer_views(model):
            lin = v.qkv_modules()[0]
            rows = torch.arange(lin.out_features)
            _, k_rows, _ = v.split_qkv(rows)
            k_rows = k_rows.view(-1, d)[:, rot:].flatten()
            lin.weight[k_rows] = 0
            if lin.bias is not None:
                lin.bias[k_rows] = 0
    ref = copy.deepcopy(model)
    a3mod.apply(model, [a3mod.A3QK(ratio=0.5)], calib=calib_ids(), progress=False)
    r = 8
    for a, v in zip(attn_of(model), layer_views(ref)):
        assert a.qk_dim == r and a.rot_dim == rot_share(r, rot, d) and a.vo_dim == d
        assert a.rope_index.shape == (a.num_key_value_heads, a.rot_dim)
        lin = v.qkv_modules()[0]
        rows = torch.arange(lin.out_features)
        q_rows, k_rows, _ = (t.view(-1, d) for t in v.split_qkv(rows))
        for j, kept in enumerate(a.rope_index.tolist()):
            half = len(kept) // 2
            assert [x + rot // 2 for x in kept[:half]] == kept[half:]          # whole rotate_half pairs
            drop = [x for x in range(rot) if x not in kept]
            with torch.no_grad():
                for row in [k_rows[j, drop]] + [q_rows[h, drop] for h in range(j * g, (j + 1) * g)]:
                    lin.weight[row] = 0
                    if lin.bias is not None:
                        lin.bias[row] = 0
    ids = input_ids()
    assert_close_logits(fc.outputs(model, ids), fc.outputs(ref, ids), rel=1e-5)


def test_partial_rotary_loss_curve_for_allocate():
    """A3QK on partial rotary returns one loss per kept pair count (0..d_h/2), non-increasing, 0 at full."""
    from a3mod.passes.a3 import apply_qk
    from a3mod.passes.base import PassContext
    from a3mod.pipeline.rewrite import LayerWork

    model = factory("gpt_neox", head_dim=16, rotary_pct=0.25)()
    stats = a3mod.collect(model, calib_ids(), progress=False)
    work = LayerWork.from_view(layer_views(model)[0])
    sol = apply_qk(a3mod.A3QK(ratio=0.3), PassContext(work=work, stats=stats.layers[0], n=stats.n))
    loss, unit = sol.loss, sol.granule
    assert unit == 2 and loss.shape == (9,) and (sol.part.full, sol.part.kept) == (16, 12)
    assert (loss[:-1] >= loss[1:] - 1e-12).all() and loss[-1].abs() < 1e-9 * loss[0]


# --------------------------------------------------------------------- fused per-head qkv (GPT-NeoX)
def test_neox_statistics_see_pre_rope_qkv_in_hf_layout():
    """The calibration hooks split query_key_value's output as GPTNeoXAttention does: view (.., H, 3 d_h),
    chunk(3) -> q, k, v per head."""
    model = factory("gpt_neox", head_dim=8)()
    ids = calib_ids(2, 8)
    seen = []
    attn = model.gpt_neox.layers[0].attention
    h = attn.query_key_value.register_forward_hook(lambda m, i, out: seen.append(out.detach().double()))
    stats = a3mod.collect(model, ids, progress=False)
    h.remove()
    qkv = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    q, k, v = qkv.view(-1, 4, 3 * 8).chunk(3, dim=-1)                   # (N, H, d_h) each, HF's own split
    for name, t in (("q", q), ("k", k), ("v", v)):
        ref = torch.einsum("nhd,nhe->hde", t, t)
        assert torch.allclose(stats.layers[0][name], ref, rtol=1e-10, atol=1e-10), name


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("impl", fc.IMPLS)
def test_neox_parallel_residual(parallel, impl):
    make = factory("gpt_neox", use_parallel_residual=parallel, attention_bias=True)
    fc.full_rank_reproduces_outputs(make, impls=(impl,))
    model = make()
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert torch.isfinite(fc.outputs(model, input_ids())).all()
    assert model.gpt_neox.layers[0].use_parallel_residual is parallel


# ------------------------------------------------------------------------------------------------ OPT
@pytest.mark.parametrize("before", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_opt_layer_norm_before_and_after(before, bias):
    make = factory("opt", do_layer_norm_before=before, enable_bias=bias)
    fc.full_rank_reproduces_outputs(make)
    fc.cached_generate_matches_uncached(make, 0.3, impls=("eager",))


@pytest.mark.parametrize("family", ["opt", "bert"])
def test_layer_level_mlp_selection_equals_zeroing_dropped_neurons(family):
    """fc1/fc2 (OPT) and intermediate/output.dense (BERT) live on the layer: A3MLP swaps in narrower
    NarrowLinear modules in place, equal to the original with the dropped neurons' fc2 columns zeroed."""
    model = factory(family)()
    ref = copy.deepcopy(model)
    a3mod.apply(model, [a3mod.A3MLP(ratio=0.4)], calib=calib_ids(), progress=False)
    for (up, down), (_, old_down) in zip(mlp_linears(model), mlp_linears(ref)):
        assert isinstance(up, NarrowLinear) and isinstance(down, NarrowLinear)
        assert up.kept == down.kept and len(up.kept) == 38 == up.out_features == down.in_features
        assert (up.orig_out, down.orig_in) == (64, 64)
        with torch.no_grad():
            old_down.weight[:, [i for i in range(64) if i not in up.kept]] = 0
    ids = input_ids()
    assert_close_logits(fc.outputs(model, ids), fc.outputs(ref, ids), rel=1e-5)


# ----------------------------------------------------------------------------------------------- BERT
def _padded_ids():
    ids = input_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0                                     # right padding, as BERT tokenizers pad
    return ids, mask


@pytest.mark.parametrize("impl", fc.IMPLS)
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_padding_mask(family, impl):
    """Bidirectional attention with a padding mask: at full rank the unpadded outputs are reproduced, and the
    padded positions' tokens do not change them (compressed at 30 % too)."""
    make = lambda: model_from_config(config_b(family), 0, auto=transformers.AutoModel)  # noqa: E731
    model = make()
    model.set_attn_implementation(impl)
    ids, mask = _padded_ids()
    other = ids.clone()
    other[0, 6:] = 7
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert_close_logits(got[keep], ref[keep])
    model = make()
    model.set_attn_implementation(impl)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=other, attention_mask=mask).last_hidden_state
        unmasked = model(input_ids=ids).last_hidden_state
    assert_close_logits(b[keep], a[keep], rel=1e-5)
    assert not torch.allclose(unmasked[0, :6], a[0, :6])        # the mask matters: attention is bidirectional


def test_bert_modules_after_compression():
    model = factory("bert", head="mlm")()
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    for layer in model.bert.encoder.layer:
        attn = layer.attention.self
        assert isinstance(attn, ReducedHeadAttention) and attn.o_proj is None and not attn.is_causal
        o = layer.attention.output.dense
        assert isinstance(o, NarrowLinear) and (o.in_features, o.orig_in, o.kept) == (24, 32, None)
        assert isinstance(layer.attention.output.LayerNorm, torch.nn.LayerNorm)       # still runs after o
    out = model(input_ids=input_ids()).logits
    assert out.shape == (2, 12, VOCAB) and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------- print / report
@pytest.mark.parametrize("family", FAMILIES_B)
def test_print_shows_reduced_dims(family):
    model = factory(family, **_kw_for(family))()
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    text = str(model)
    assert "ReducedHeadAttention" in text and "head_dim 8 -> qk 6 / vo 6" in text
    if family in ("opt", "bert"):
        assert "NarrowLinear(in_features 32 -> 32, out_features 64 -> 45" in text
        assert "NarrowLinear(in_features 64 -> 45, out_features 32 -> 32" in text
    else:
        assert "ReducedMLP" in text and "intermediate 64 -> 45" in text
    if family == "gpt_neox":            # rotary_pct 0.5 of d_h 8: 4 rotary + 4 position-free dims -> 4 + 2
        assert "rope dims 4 (per KV group)" in text
    if family == "phi3":
        assert "rope dims 6 (per KV group)" in text and isinstance(model.model.layers[0].mlp, ReducedMLP)
    if family == "bert":
        assert "no rope" in text and "output projection outside" in text


def test_phi3_fused_gate_up_is_split_into_gate_and_up():
    model = factory("phi3", kv_heads=2)()
    old = copy.deepcopy(model.model.layers[0].mlp.gate_up_proj.weight)
    a3mod.apply(model, [a3mod.A3MLP(ratio=0.5)], calib=calib_ids(), progress=False)
    mlp = model.model.layers[0].mlp
    assert torch.equal(mlp.gate_proj.weight, old[:64][mlp.kept]) and torch.equal(mlp.up_proj.weight, old[64:][mlp.kept])


@pytest.mark.parametrize("family", FAMILIES_B)
def test_allocate_and_a3kv_run(family):
    """Allocate (per-layer ranks) and A3KV (attention only) swap the same modules as uniform A3."""
    for passes, lo, hi in (([a3mod.Allocate(0.3)], 0.2, 0.4), ([a3mod.A3KV(kv_ratio=0.5)], 0.05, 0.4)):
        model = factory(family, **_kw_for(family))()
        a3mod.apply(model, passes, calib=calib_ids(), progress=False)
        rep = a3mod.report(model)
        assert lo <= rep.ratio <= hi, (passes, rep.ratio)
        assert torch.isfinite(fc.outputs(model, input_ids())).all()


def test_bert_decoder_and_cross_attention():
    """BERT as a causal decoder (is_decoder) caches like any decoder; with cross-attention (an
    EncoderDecoderCache) the self-attention is reduced and the cross-attention stays as it is."""
    fc.full_rank_reproduces_outputs(factory("bert", head="causal", is_decoder=True))
    fc.cached_generate_matches_uncached(factory("bert", head="causal", is_decoder=True), 0.3, impls=("eager",))
    model = factory("bert", head="causal", is_decoder=True, add_cross_attention=True)()
    enc, ids = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)), input_ids()
    with torch.no_grad():
        ref = model(input_ids=ids, encoder_hidden_states=enc, use_cache=False).logits
        a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids(), progress=False)
        full = model(input_ids=ids, encoder_hidden_states=enc, use_cache=False).logits
        out = model(input_ids=ids[:, :6], encoder_hidden_states=enc, use_cache=True)
        step = model(input_ids=ids[:, 6:], encoder_hidden_states=enc, past_key_values=out.past_key_values).logits
    assert_close_logits(full, ref)
    assert_close_logits(torch.cat([out.logits, step], 1), full, rel=1e-5)
    assert not isinstance(model.bert.encoder.layer[0].crossattention.self, ReducedHeadAttention)


# ---------------------------------------------------------------------------- baselines / quantization
@pytest.mark.parametrize("family", FAMILIES_B)
def test_baselines_and_quantized_round_trip(family, tmp_path):
    """The SVD baselines factorize every projection (fused, layer-level and BERT's three "dense" ones);
    A3 + HQQ saves and loads, narrowed linears included."""
    pytest.importorskip("hqq")
    make = factory(family, **_kw_for(family))
    for i, passes in enumerate(([a3mod.SVDLLM(ratio=0.2)], [*a3mod.a3_passes(0.3), a3mod.HQQ(nbits=4, group_size=8)])):
        model = make()
        a3mod.apply(model, passes, calib=calib_ids(), progress=False)
        rep = a3mod.report(model)
        assert 0.15 <= rep.ratio <= 0.35 and (rep.rows[0].lowrank > 0) == (i == 0)
        loaded = a3mod.load(a3mod.save(model, tmp_path / str(i)))
        ids = input_ids()
        assert torch.equal(fc.outputs(loaded, ids), fc.outputs(model, ids))
        assert a3mod.report(loaded).to_dict() == rep.to_dict()


@pytest.mark.parametrize("family,passes,match", [
    ("bert", [a3mod.ASVD(ratio=0.2)], "not a causal LM"),
    ("gpt_neox", [a3mod.ASVD(kv_ratio=0.5)], "KV-cache mode"),
    ("bert", [a3mod.ASVD(kv_ratio=0.5)], "KV-cache mode"),
])
def test_unsupported_baseline_modes_raise(family, passes, match):
    model = factory(family)()
    with pytest.raises(a3mod.UnsupportedModelError, match=match):
        a3mod.apply(model, passes, calib=calib_ids(), progress=False)
    assert not any(isinstance(m, NarrowLinear) for m in model.modules())
