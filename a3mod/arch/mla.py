"""Multi-head latent attention (DeepSeek-V2/V3): how to read its weights per head and narrow it in place.

    q      = q_b_proj(q_a_layernorm(q_a_proj(x)))  (or q_proj(x))     (T, H, d_nope + d_rope)
    c_kv   = kv_a_layernorm(kv_a_proj_with_mqa(x)[:kv_lora]),  k_rot = RoPE(kv_a_proj_with_mqa(x)[kv_lora:])
    [k_nope | v] = kv_b_proj(c_kv)                                      (T, H, d_nope + d_v)
    scores_h = q_nope,h k_nope,hᵀ + q_rot,h k_rotᵀ;   out = o_proj(concat_h softmax(.) v_h)

The cache holds the latent (c_kv, k_rot), which the position-free dims d_nope and the value dim d_v do not touch;
a3mod reduces those two (A3QK: whitened SVD of each head's q_nope k_noperᵀ through the latent; A3OV: joint SVD of
each head's v -> o_proj block), leaving RoPE, the latents and the norms as they are. The module keeps its class
and forward (transformers reads `qk_nope_head_dim`, `v_head_dim`, `qk_head_dim` from it), with narrower q / kv_b /
o projections; the softmax scale stays the original's. Weights here are float64 in `x @ W` form, per head.
"""
from __future__ import annotations

import torch
from torch import nn

from .spec import module_copy


def is_mla(mod: nn.Module | None) -> bool:
    return mod is not None and all(hasattr(mod, n) for n in ("kv_b_proj", "kv_a_proj_with_mqa", "qk_nope_head_dim",
                                                              "v_head_dim", "qk_rope_head_dim"))


class MLAView:
    """One MLA module's per-head weights."""

    def __init__(self, mod: nn.Module):
        self.mod = mod
        self.heads = mod.num_heads
        self.nope, self.rope, self.v = mod.qk_nope_head_dim, mod.qk_rope_head_dim, mod.v_head_dim
        self.q_name = "q_proj" if getattr(mod, "q_proj", None) is not None else "q_b_proj"
        self.latent = mod.kv_b_proj.in_features

    @property
    def q_linear(self) -> nn.Linear:
        return getattr(self.mod, self.q_name)

    def _heads(self, lin: nn.Linear, split: list[int]) -> list[torch.Tensor]:
        """lin's output rows per head, split -> [(H, d_in, part) float64 in x @ W form]."""
        w = lin.weight.detach().double().t().reshape(lin.in_features, self.heads, sum(split)).permute(1, 0, 2)
        return list(w.split(split, -1))

    def weights(self):
        """(wq_nope (H, d_q, nope), wk_nope (H, kv_lora, nope), wv (H, kv_lora, d_v), wo (H, d_v, d_m), bo)."""
        wq, _ = self._heads(self.q_linear, [self.nope, self.rope])
        wk, wv = self._heads(self.mod.kv_b_proj, [self.nope, self.v])
        o = self.mod.o_proj
        wo = o.weight.detach().double().t().reshape(self.heads, self.v, o.out_features)
        return wq, wk, wv, wo, None if o.bias is None else o.bias.detach().double()

    def split_q(self, q: torch.Tensor) -> torch.Tensor:
        """q projection output (..., H (nope + rope)) -> q_nope (..., H nope)."""
        return q.unflatten(-1, (self.heads, self.nope + self.rope))[..., : self.nope].flatten(-2)

    def split_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """kv_b_proj output (..., H (nope + v)) -> k_nope (..., H nope)."""
        return kv.unflatten(-1, (self.heads, self.nope + self.v))[..., : self.nope].flatten(-2)


def narrowed_mla(mod: nn.Module, wq: torch.Tensor | None, wk: torch.Tensor | None, wv: torch.Tensor | None,
                 wo: torch.Tensor | None, bo: torch.Tensor | None, nope: int | None = None,
                 v_dim: int | None = None) -> nn.Module:
    """A copy of MLA module `mod` whose heads have `wq`/`wk` (H, d_in, r) as q/k position-free dims and `wv`
    (H, kv_lora, r_v) / `wo` (H, r_v, d_m) as values (float64, x @ W form); the RoPE rows of the q projection are
    kept. With no weights (all None): empty projections of widths `nope`, `v_dim` on mod's device (`a3mod.load`)."""
    view = MLAView(mod)
    H, rope = view.heads, view.rope
    r = wq.shape[-1] if wq is not None else nope
    rv = wv.shape[-1] if wv is not None else v_dim
    new = module_copy(mod)
    ql, kvb, o = view.q_linear, mod.kv_b_proj, mod.o_proj
    kw = dict(device=ql.weight.device, dtype=ql.weight.dtype)
    q_new = nn.Linear(ql.in_features, H * (r + rope), bias=ql.bias is not None, **kw)
    kv_new = nn.Linear(kvb.in_features, H * (r + rv), bias=kvb.bias is not None, **kw)
    o_new = nn.Linear(H * rv, o.out_features, bias=o.bias is not None, **kw)
    if wq is not None:
        with torch.no_grad():
            _, q_rot = view._heads(ql, [view.nope, rope])                           # (H, d_q, rope)
            q_new.weight.copy_(torch.cat([wq, q_rot], -1).permute(1, 0, 2).reshape(ql.in_features, -1).t())
            kv_new.weight.copy_(torch.cat([wk, wv], -1).permute(1, 0, 2).reshape(kvb.in_features, -1).t())
            o_new.weight.copy_(wo.reshape(H * rv, -1).t())
            if o.bias is not None:
                o_new.bias.copy_(bo if bo is not None else o.bias)
            for lin, old in ((q_new, ql), (kv_new, kvb)):
                if old.bias is not None:
                    raise ValueError("MLA q / kv_b projections with biases are not supported")
    new._modules[view.q_name], new._modules["kv_b_proj"], new._modules["o_proj"] = q_new, kv_new, o_new
    new.qk_nope_head_dim, new.v_head_dim, new.qk_head_dim = r, rv, r + rope
    info = getattr(mod, "a3mod_mla", None)
    new.a3mod_mla = info or {"orig_nope": view.nope, "orig_v": view.v}
    return new.train(mod.training)


def mla_dims(mod: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """((original, current) q/k head dim, (original, current) v head dim) of an MLA module."""
    info = getattr(mod, "a3mod_mla", None) or {"orig_nope": mod.qk_nope_head_dim, "orig_v": mod.v_head_dim}
    return ((info["orig_nope"] + mod.qk_rope_head_dim, mod.qk_head_dim), (info["orig_v"], mod.v_head_dim))
