"""Gated attention (Qwen3.5, Qwen3-Next, AFMoE): o_proj reads attn_out * sigmoid(gate(x)), the gate elementwise per
value dim of every query head. A3OV keeps whole value dims with their gate rows (solvers.ov_gated_select); the
closed form against brute force, the module against the original layer, discovery of both gate layouts."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod.arch import layer_views
from a3mod.arch.lookup import spec_for
from a3mod.errors import UnsupportedModelError
from a3mod.math import solvers
from a3mod.modules.attention import AttentionConfig, ReducedHeadAttention
from a3mod.modules.configs import ConfigError
from zoo import _ids, _logits, tiny_zoo_model


# ------------------------------------------------------------------------------------------- the closed form
@settings(max_examples=40, deadline=None)
@given(kv=st.integers(1, 3), groups=st.integers(1, 3), dh=st.integers(1, 6), dm=st.integers(1, 5),
       seed=st.integers(0, 10_000))
def test_gated_selection_is_the_best_subset_of_its_score(kv, groups, dh, dm, seed):
    """For every kept count r: the kept dims of each KV group are the subset with the largest summed score (brute
    force over all subsets), loss[r] is the score left out, loss[d_h] = 0 and the loss never grows with r."""
    g = torch.Generator().manual_seed(seed)
    h = kv * groups
    u2 = torch.rand(h, dh, generator=g, dtype=torch.float64)
    wo = torch.randn(h, dh, dm, generator=g, dtype=torch.float64)
    score = (u2 * wo.square().sum(-1)).view(kv, groups, dh).sum(1)
    for r in range(1, dh + 1):
        kept, loss = solvers.ov_gated_select(u2, wo, groups, r)
        assert kept.shape == (kv, r) and bool((kept.diff(dim=-1) > 0).all())
        for j in range(kv):
            best = max(score[j, list(c)].sum() for c in itertools.combinations(range(dh), r))
            torch.testing.assert_close(score[j, kept[j]].sum(), best)
            torch.testing.assert_close(loss[j, r], score[j].sum() - best)
        assert bool((loss[:, :-1] >= loss[:, 1:] - 1e-12).all())
    assert float(loss[:, dh].abs().max()) == 0.0


@settings(max_examples=25, deadline=None)
@given(kv=st.integers(1, 2), groups=st.integers(1, 3), dh=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_gated_loss_is_the_output_error_for_independent_dims(kv, groups, dh, seed):
    """With uncorrelated zero-mean value dims (a diagonal Gram) the score left out is exactly E||u W_o - u_K W_o,K||^2:
    the brute-force output error of the kept dims on samples whose Gram is that diagonal."""
    g = torch.Generator().manual_seed(seed)
    h, dm, n = kv * groups, 3, 4096
    wo = torch.randn(h, dh, dm, generator=g, dtype=torch.float64)
    u = torch.randn(n, h, dh, generator=g, dtype=torch.float64) * torch.rand(h, dh, generator=g, dtype=torch.float64)
    u = u - u.mean(0)
    q, _ = torch.linalg.qr(u.reshape(n, -1))                     # exactly uncorrelated columns, same norms
    u = (q * u.reshape(n, -1).norm(dim=0)).reshape(n, h, dh)
    u2 = u.square().mean(0)
    r = max(1, dh // 2)
    kept, loss = solvers.ov_gated_select(u2, wo, groups, r)
    mask = torch.zeros(kv, dh, dtype=torch.float64).scatter_(1, kept, 1.0).repeat_interleave(groups, 0)
    err = torch.einsum("nhd,hdm->nm", u * (1 - mask), wo).square().sum(-1).mean()
    torch.testing.assert_close(err, loss[:, r].sum(), rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(kv=st.integers(1, 2), groups=st.integers(1, 3), dh=st.integers(2, 5), seed=st.integers(0, 10_000))
def test_gated_refit_never_raises_the_calibration_error(kv, groups, dh, seed):
    """o_proj re-fit on the kept dims (ov_refit with selection maps) is below selection alone on the Gram it fits."""
    g = torch.Generator().manual_seed(seed)
    h, dm, n = kv * groups, 4, 256
    wo = torch.randn(h, dh, dm, generator=g, dtype=torch.float64)
    u = torch.randn(n, h * dh, generator=g, dtype=torch.float64) @ torch.randn(h * dh, h * dh, generator=g,
                                                                             dtype=torch.float64)
    gram = u.T @ u / n
    u2 = gram.diagonal().view(h, dh)
    r = dh - 1
    kept, _ = solvers.ov_gated_select(u2, wo, groups, r)
    t = torch.zeros(kv, dh, r, dtype=torch.float64).scatter_(1, kept[:, None, :], 1.0)
    per_head = kept.repeat_interleave(groups, 0)
    wo_r = wo.gather(1, per_head[..., None].expand(-1, -1, dm))
    _, before, after = solvers.ov_refit(wo, t, gram, wo_r, damping=0.0)
    assert float(after) <= float(before) * (1 + 1e-9) + 1e-12


# ------------------------------------------------------------------------------------------------ the module
def test_gate_config_rules():
    base = dict(hidden=8, heads=2, kv_heads=1, head_dim=4, qk_dim=4, vo_dim=4, rot_dim=4, scaling=0.5,
                bias=dict(q=False, k=False, v=False, o=False))
    with pytest.raises(ConfigError, match="gate_bias"):
        AttentionConfig(**base, gate_bias=True)
    with pytest.raises(ConfigError, match="out_proj"):
        AttentionConfig(**base, gate=True, out_proj=False)
    attn = ReducedHeadAttention(None, 0, AttentionConfig(**base, gate=True))
    assert attn.g_proj.weight.shape == (8, 8) and attn.describe()["gate"] is True
    assert "gate" not in ReducedHeadAttention(None, 0, AttentionConfig(**base)).describe()
    assert "sigmoid output gate" in repr(attn)


@pytest.mark.parametrize("mtype,gate", [("qwen3_5_text", "q"), ("qwen3_next", "q"), ("afmoe", "gate_proj")])
def test_discovery_reads_the_output_gate(mtype, gate):
    model = tiny_zoo_model(mtype)
    assert spec_for(model).attn_gate == gate
    v = next(v for v in layer_views(model) if v.attn is not None)
    wg, _ = v.gate_params()
    (wq, _), _, _ = v.qkv_params()
    d = v.dims
    assert wg.shape == wq.shape == (d.heads * d.head_dim, d.hidden)


def test_a_per_head_gate_keeps_the_joint_svd():
    """LFM3 gates each head's output by one sigmoid: it scales the head as a whole, so A3OV's rotation of the value
    dims commutes with it; the gate projection stays whole (H outputs) and a full-rank rotation is exact."""
    model = tiny_zoo_model("lfm3").eval()
    spec = spec_for(model)
    assert spec.attn_gate == "g_proj" and spec.attn_gate_head
    v = next(v for v in layer_views(model) if v.attn is not None)
    ids = _ids(2, 12, 0)
    ref = _logits(model, ids)
    a3mod.apply(model, [a3mod.A3OV(rank=v.dims.head_dim)], calib=_ids(8, 16, 1), progress=False)
    new = model.model.layers[v.index].self_attn
    assert new.cfg.gate_per_head and new.g_proj.out_features == v.dims.heads
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-4)
    assert "per head" in repr(new)


def _attn_layer(model):
    return next(v for v in layer_views(model) if v.attn is not None)


def test_kept_dims_match_a_brute_force_gated_attention():
    """The compressed attention equals the original's computation restricted to the kept value dims: each head's
    attention output z_h and gate g_h taken at its group's kept dims, times o_proj's columns there."""
    torch.manual_seed(0)
    model = tiny_zoo_model("qwen3_5_text").eval()
    v = _attn_layer(model)
    d, attn = v.dims, v.attn
    x = torch.randn(1, 9, d.hidden)
    pos = torch.arange(9)[None]
    pe = model.model.rotary_emb(x, pos)
    seen = {}
    h = attn.o_proj.register_forward_pre_hook(lambda m, i: seen.setdefault("u", i[0]))
    with torch.no_grad():
        attn(x, position_embeddings=pe, attention_mask=None)
    h.remove()
    gate = torch.sigmoid(v.gate_params()[0] @ x[0].T).T                        # (T, H*d_h)
    z = (seen["u"][0] / gate).view(9, d.heads, d.head_dim)                     # the ungated attention output
    a3mod.apply(model, [a3mod.A3OV(ratio=0.5)], calib=_ids(4, 16, 1), progress=False)
    new = model.model.layers[v.index].self_attn
    r = new.vo_dim
    assert r < d.head_dim and new.g_proj.weight.shape == (d.heads * r, d.hidden)
    wo = attn.o_proj.weight.T.reshape(d.heads, d.head_dim, d.hidden)
    g3 = gate.view(9, d.heads, d.head_dim)
    # which dims were kept: v_proj's rows of the compressed module are rows of the original
    wv_new, wv = new.v_proj.weight.view(d.kv_heads, r, -1), attn.v_proj.weight.view(d.kv_heads, d.head_dim, -1)
    kept = torch.stack([torch.cdist(wv_new[j], wv[j]).argmin(-1) for j in range(d.kv_heads)])
    per_head = kept.repeat_interleave(d.groups, 0)
    idx = per_head[None].expand(9, -1, -1)
    want = torch.einsum("thr,hrm->tm", (z.gather(2, idx) * g3.gather(2, idx)),
                        wo.gather(1, per_head[..., None].expand(-1, -1, d.hidden)))
    with torch.no_grad():
        got = new(x, position_embeddings=pe, attention_mask=None)[0][0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mtype", ["qwen3_5_text", "afmoe", "lfm3"])
def test_error_shrinks_as_rank_grows_and_full_rank_is_exact(mtype):
    torch.manual_seed(0)
    calib, ids = _ids(8, 16, 1), _ids(2, 12, 0)
    ref = _logits(tiny_zoo_model(mtype).eval(), ids)
    full = _attn_layer(tiny_zoo_model(mtype)).dims.head_dim
    errs = []
    for rank in (2, full // 2, full):
        model = tiny_zoo_model(mtype).eval()
        a3mod.apply(model, [a3mod.A3OV(rank=rank)], calib=calib, progress=False)
        errs.append(float((_logits(model, ids) - ref).norm()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4 * float(ref.norm())


def test_update_lowers_the_o_proj_error_on_the_calibration_tokens():
    """With only A3OV, each gated attention sees the same inputs with or without the update: the update's output
    error on the calibration tokens is the lower, with the same kept dims and shapes."""
    calib = _ids(16, 16, 1)
    orig = tiny_zoo_model("qwen3_5_text").eval()
    v = _attn_layer(orig)

    def attn_out(model):
        got = []
        hk = model.model.layers[v.index].self_attn.register_forward_hook(lambda m, i, o: got.append(o[0]))
        with torch.no_grad():
            model(input_ids=calib, use_cache=False)
        hk.remove()
        return got[0]

    ref = attn_out(orig)
    errs = {}
    for update in (False, True):
        model = tiny_zoo_model("qwen3_5_text").eval()
        a3mod.apply(model, [a3mod.A3OV(ratio=0.4, update=update)], calib=calib, progress=False)
        errs[update] = float((attn_out(model) - ref).square().sum())
    assert errs[True] < errs[False]


def test_gated_model_saves_and_loads_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_zoo_model("qwen3_5_text").eval()
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(8, 16, 1), progress=False)
    ids = _ids(2, 12, 0)
    want = _logits(model, ids)
    torch.testing.assert_close(_logits(a3mod.load(a3mod.save(model, tmp_path / "a")), ids), want, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids), want,
                               rtol=0, atol=0)


def test_kv_mode_refuses_a_gated_attention_by_name():
    model = tiny_zoo_model("afmoe").eval()
    with pytest.raises(UnsupportedModelError, match="output gate"):
        a3mod.apply(model, [a3mod.ASVD(kv_ratio=0.3)], calib=_ids(4, 16, 1), progress=False)


def test_streaming_a_gated_hybrid_equals_in_memory(tmp_path):
    from test_stream import assert_streaming_equals_in_memory

    model = tiny_zoo_model("qwen3_5_text").eval()
    assert_streaming_equals_in_memory(model, tmp_path, [a3mod.A3OV(ratio=0.3, update=True), a3mod.A3MLP(ratio=0.3)])


def test_per_dim_cost_of_a_gated_value_dim_adds_up():
    """A removed value dim takes a v_proj row per KV head, an o_proj column and a gate row per query head: the
    parameters a gated attention loses are dim_params(ov, attn_gate=True) times the dims removed (Allocate's cost)."""
    from a3mod.pipeline.plan import COMPONENTS

    model = tiny_zoo_model("qwen3_5_text").eval()
    v = _attn_layer(model)
    d = v.dims
    before = sum(p.numel() for p in v.attn.parameters())
    a3mod.apply(model, [a3mod.A3OV(ratio=0.5)], calib=_ids(4, 16, 1), progress=False)
    new = model.model.layers[v.index].self_attn
    after = sum(p.numel() for p in new.parameters())
    cost = COMPONENTS["ov"].dim_params(d.hidden, d.heads, d.kv_heads, {}, attn_gate=True)
    assert before - after == cost * (d.head_dim - new.vo_dim) and new.vo_dim < d.head_dim


@pytest.mark.parametrize("across", ["layers", "all"])
def test_allocate_on_a_gated_model_meets_its_budget(across):
    model = tiny_zoo_model("qwen3_next").eval()
    a3mod.apply(model, [a3mod.Allocate(budget=0.3, across=across, ov_update=True)], calib=_ids(8, 16, 1),
                progress=False)
    assert abs(a3mod.report(model).ratio_reducible - 0.3) < 0.05      # attention + MLP parts (routers whole)
    assert torch.isfinite(_logits(model, _ids(2, 12, 0))).all()


def test_a_per_head_bias_on_the_gate_is_kept():
    """Beam adds a per-head bias to its elementwise gate: it becomes g_proj's bias (one value per head, over the
    head's kept dims); full rank is exact with a non-zero bias, and a reduced model keeps the kept dims' bias."""
    model = tiny_zoo_model("beam").eval()
    spec = spec_for(model)
    assert spec.attn_gate == "gate_proj" and spec.attn_gate_bias == "gate_bias"
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.gate_bias.copy_(torch.linspace(-1.5, 1.5, layer.self_attn.gate_bias.numel()))
    ids = _ids(2, 12, 0)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(8, 16, 1), progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-4           # the zoo's full-rank measure
    attn = model.model.layers[0].self_attn
    assert attn.cfg.gate_bias and attn.g_proj.bias.view(attn.num_heads, -1)[:, 0].tolist() == pytest.approx(
        torch.linspace(-1.5, 1.5, attn.num_heads).tolist())
