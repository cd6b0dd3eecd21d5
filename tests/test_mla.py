"""Multi-head latent attention (DeepSeek-V2/V3 and the types built like them): A3QK on each head's position-free
q/k dims through the latents, A3OV on its value -> o_proj block; the cached latent and the RoPE key untouched."""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

import a3mod
from a3mod.arch import layer_views
from a3mod.arch.mla import MLAView, is_mla

from conftest import assert_sidecar_edits_refused
from zoo import _ids, _logits, tiny_zoo_config, tiny_zoo_model

MLA = ["deepseek_v2", "deepseek_v3", "glm4_moe_lite"]


def mla_model(mtype: str, seed: int = 0, q_lora: bool = True):
    if q_lora:
        return tiny_zoo_model(mtype, seed)
    import transformers

    cfg = tiny_zoo_config(mtype)
    cfg.q_lora_rank = None                      # the q_proj form (DeepSeek-V2-Lite)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).float().eval()


@pytest.mark.parametrize("mtype,q_lora", [("deepseek_v3", True), ("deepseek_v3", False), ("deepseek_v2", True)])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_full_rank_reproduces_the_model(mtype, q_lora, seed):
    model = mla_model(mtype, seed, q_lora)
    ids = _ids(2, 12, seed % 7)
    ref = _logits(model, ids)
    a3mod.apply(model, [a3mod.A3QK(ratio=0.0), a3mod.A3OV(ratio=0.0)], calib=_ids(4, 16, 1), progress=False)
    assert all(is_mla(v.attn) and getattr(v.attn, "a3mod_mla", None) for v in layer_views(model))
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-5


def _nope_qk(model, layer: int, calib):
    """Every calibration token's position-free queries and keys of layer `layer`, (H, N, nope) each."""
    v = layer_views(model)[layer]
    mv = MLAView(v.attn)
    got = {}
    hs = [mv.q_linear.register_forward_hook(lambda m, i, o: got.setdefault("q", []).append(mv.split_q(o))),
          v.attn.kv_b_proj.register_forward_hook(lambda m, i, o: got.setdefault("k", []).append(mv.split_kv(o)))]
    _logits(model, calib)
    for h in hs:
        h.remove()
    q, k = (torch.cat([t.reshape(-1, t.shape[-1]) for t in got[n]]).double() for n in ("q", "k"))
    return q.view(-1, mv.heads, q.shape[-1] // mv.heads).transpose(0, 1), \
        k.view(-1, mv.heads, k.shape[-1] // mv.heads).transpose(0, 1)


@pytest.mark.parametrize("rank", [4, 8, 12])
def test_qk_loss_is_the_score_error_through_the_latents(rank):
    """The closed form's loss at rank r equals ||Q Kᵀ - Q' K'ᵀ||² / N² summed over heads, on the calibration tokens
    themselves (Q, K: position-free queries from q_b_proj, keys from kv_b_proj over the latent)."""
    from a3mod.passes.a3 import apply_qk, solve_layer
    from a3mod.passes.base import PassContext
    from a3mod.pipeline.rewrite import LayerWork

    calib = _ids(4, 16, 1)
    model = mla_model("deepseek_v3")
    stats = a3mod.collect(model, calib, progress=False)
    v = layer_views(model)[1]
    q, k = _nope_qk(model, 1, calib)
    work, plan = solve_layer(v, [a3mod.A3QK(rank=rank)], stats)
    w = LayerWork.from_view(v)
    sol_loss = apply_qk(a3mod.A3QK(rank=rank), PassContext(work=w, stats=stats.layers[1], n=stats.n)).loss
    n = q.shape[1]
    # the new heads' q/k: the latent inputs times the new weights, recovered as Q' = Q (Wq^+ Wq')
    mv = MLAView(v.attn)
    wq0, wk0, *_ = mv.weights()
    qp = q @ torch.linalg.pinv(wq0) @ work.attn.wq
    kp = k @ torch.linalg.pinv(wk0) @ work.attn.wk
    err = sum(float(((q[h] @ k[h].T) - (qp[h] @ kp[h].T)).square().sum()) for h in range(mv.heads)) / n ** 2
    want = float(sol_loss[rank // 2])
    assert err == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert plan.parts["qk"].kept == rank + mv.rope and plan.parts["qk"].full == mv.nope + mv.rope
    assert (sol_loss[:-1] >= sol_loss[1:] - 1e-12).all() and abs(float(sol_loss[-1])) < 1e-9


@pytest.mark.parametrize("mtype", MLA)
def test_mla_end_to_end(mtype, tmp_path):
    """30%: narrower q/kv_b/o, the latent cache as it was, save / load exact, cached generate == uncached."""
    calib, ids = _ids(4, 16, 1), _ids(2, 12, 0)
    model = mla_model(mtype)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib, progress=False)
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    rep = a3mod.report(model)
    assert rep.kv_bytes_per_token() == rep.kv_bytes_per_token(True)        # the latent cache is untouched
    assert all(r.qk_dim < r.qk_orig and r.vo_dim < r.vo_orig for r in rep.rows if not r.left)
    assert rep.flops_per_token() < rep.flops_per_token(True) and 0.15 < rep.ratio < 0.4
    attn = layer_views(model)[0].attn
    with torch.no_grad():
        o = model(input_ids=ids, use_cache=True)
    kv = o.past_key_values.layers[0]
    assert kv.keys.shape[-1] == attn.kv_lora_rank and kv.values.shape[-1] == attn.qk_rope_head_dim
    path = a3mod.save(model, tmp_path / mtype)
    loaded = a3mod.load(path)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[x], sb[x]) for x in sa)
    assert torch.equal(_logits(loaded, ids), out)
    p = _ids(1, 5, 7)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(p, use_cache=True, **kw), loaded.generate(p, use_cache=False, **kw))
    assert "qk_nope" in json.loads((path / "a3mod.json").read_text())["layers"]["0"]["mla"]


def test_corrupted_mla_entry_is_refused(tmp_path):

    model = mla_model("deepseek_v3")
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    path = a3mod.save(model, tmp_path / "m")
    assert_sidecar_edits_refused(path, "0", "mla", [{"qk_nope": 999}, {"orig_v": 3}, {"v": 0}, {"extra": 1}])


def test_streaming_equals_in_memory_for_mla(tmp_path):
    from test_stream import assert_streaming_equals_in_memory

    assert_streaming_equals_in_memory(mla_model("deepseek_v3"), tmp_path, calib=_ids(4, 16, 1))


@pytest.mark.parametrize("mtype", ["deepseek_v3", "deepseek_v2"])
def test_ov_update_on_latent_attention(mtype):
    """A3OV(update=True) re-fits o_proj on the heads' kept value dims: exact at full rank, and a lower logit error on
    the calibration tokens than A3OV alone at the same dims."""
    calib = _ids(16, 16, 1)
    model = mla_model(mtype)
    ids = _ids(2, 12, 3)
    ref = _logits(model, ids)
    a3mod.apply(model, [a3mod.A3OV(ratio=0.0, update=True)], calib=calib, progress=False)
    assert float((_logits(model, ids) - ref).norm() / ref.norm()) < 1e-5
    orig, err = mla_model(mtype), {}
    for update in (False, True):
        m = mla_model(mtype)
        a3mod.apply(m, [a3mod.A3OV(ratio=0.5, update=update)], calib=calib, progress=False)
        err[update] = float((_logits(m, calib) - _logits(orig, calib)).pow(2).mean())
    assert err[True] < err[False], err
