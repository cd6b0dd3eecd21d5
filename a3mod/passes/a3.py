"""The A3 passes: QK (whitened SVD / RoPE pair selection), OV (joint whitened SVD), MLP (CUR).

Each handler edits the layer's work in place and returns a `Solution`: the component's part of the layer plan
(full and kept dims, which original units) and its closed-form loss (summed over heads) for every number of kept
units, loss[k] for k = 0..full/granule, where a unit is `granule` kept dims (2 under RoPE: whole pairs).
`Allocate` reads these curves; `solve_layer` gathers the parts into the layer's `LayerPlan`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..arch import active
from ..errors import CalibrationError, RatioError
from ..math import qk_refit, solvers
from ..pipeline.plan import COMPONENTS, LayerPlan, Part
from ..pipeline.rewrite import LayerWork, MLAWork
from .a3_config import A3MLP, A3OV, A3QK, A3Experts, RatioOrRank, a3_passes, portable_pair_order
from .base import PassContext, handler, run_pass

__all__ = ["A3MLP", "A3OV", "A3QK", "A3Experts", "RatioOrRank", "a3_passes", "portable_pair_order", "Solution",
           "build_layer", "solve_layer", "preflight", "full_dims"]


@dataclass(frozen=True)
class Solution:
    """What a layer-scope handler returns: the plan of its component (`part`: full and kept dims, which original
    units; None when the layer has no such component) and the closed-form loss for every number of kept units
    (loss[k], k = 0..full/granule, `granule` dims each), which `Allocate` reads."""
    part: Part | None
    loss: torch.Tensor
    granule: int


def solved(comp: str, work: LayerWork, loss: torch.Tensor, granule: int) -> Solution:
    """The Solution of component `comp` as the layer's work now stands."""
    a, d = work.attn, work.view.dims
    if a is None and comp in ("qk", "ov"):                    # a hybrid's mixer layer: no attention part
        part = None
    elif isinstance(a, MLAWork) and comp in ("qk", "ov"):       # full: the module's dims (q/k with its RoPE part)
        mv = work.view.mla_view()
        part = (Part("qk", mv.nope + mv.rope, a.wq.shape[-1] + mv.rope) if comp == "qk"
                else Part("ov", mv.v, a.wv.shape[-1]))
    elif comp == "qk":
        part = Part("qk", d.head_dim, a.wq.shape[-1])
    elif comp == "ov":
        part = Part("ov", d.head_dim, a.wv.shape[-1])
    elif comp == "mlp":
        m = work.mlp
        part = None if m is None else Part("mlp", m.orig, m.kept.numel(), tuple(m.kept.tolist()))
    else:
        x = work.experts
        part = None if x is None else Part("experts", x.orig, x.kept.shape[1])
    return Solution(part, loss, granule)


def solve_layer(view, passes, stats) -> tuple[LayerWork, LayerPlan]:
    """Run A3 passes (configs with per-layer handlers) on one layer: its edited work and the plan they chose."""
    work = LayerWork.from_view(view)
    parts = {}
    for p in layer_configs(passes, view.index):
        sol = run_pass(p, PassContext(work=work, stats=stats.layers[view.index], n=stats.n))
        if sol.part is not None:
            parts[sol.part.comp] = sol.part
    return work, LayerPlan(view.index, parts)


def layer_configs(passes, index: int) -> list:
    """The passes as they apply to layer `index`: per-layer ranks resolved (`_A3Dims.at_layer`), components a
    per-layer config leaves whole there dropped."""
    out = [p.at_layer(index) if hasattr(p, "at_layer") else p for p in passes]
    return [p for p in out if p is not None]


def build_layer(model, view, passes, stats, mlp: bool = True):
    """Run A3 passes on one layer (`solve_layer`); returns its compact modules as (path in the layer, module) swaps
    (`LayerWork.build`); mlp=False: attention only."""
    work, _ = solve_layer(view, passes, stats)
    w = view.anchor()
    return work.build(model.config, w.dtype, w.device, mlp=mlp)


def qk_kept(cfg: A3QK, full: int, rotary: bool) -> int:
    """Kept q/k head dim: whole RoPE pairs under RoPE (`plan.COMPONENTS["qk"]`)."""
    return COMPONENTS["qk"].kept(full, cfg.ratio, cfg.rank, rotary, cfg.multiple_of)


def ov_kept(cfg: A3OV, full: int) -> int:
    """Kept v/o head dim: even for even heads (with a ratio)."""
    return COMPONENTS["ov"].kept(full, cfg.ratio, cfg.rank, False, cfg.multiple_of)


def mlp_kept(cfg: A3MLP, full: int) -> int:
    """Kept MLP width: multiples of 8 from 512 neurons on (with a ratio)."""
    return COMPONENTS["mlp"].kept(full, cfg.ratio, cfg.rank, False, cfg.multiple_of)


def experts_kept(cfg: A3Experts, full: int) -> int:
    """Kept width of every routed expert (the `mlp` rounding rule)."""
    return COMPONENTS["experts"].kept(full, cfg.ratio, cfg.rank, False, cfg.multiple_of)


COMPONENT_OF = {A3QK: "qk", A3OV: "ov", A3MLP: "mlp", A3Experts: "experts"}    # pass config -> component


def full_dims(view) -> dict[str, int]:
    """The original dim of every component a layer has."""
    dims = {"qk": view.dims.head_dim, "ov": view.dims.head_dim}
    if view.mixer:           # a hybrid's mixer layer: the MLP only
        dims = {}
    elif view.spec.mla:        # latent attention: A3QK reduces the position-free q/k dims, A3OV the value dims
        mv = view.mla_view()
        dims = {"qk": mv.nope, "ov": mv.v}
    if view.has_mlp:
        dims["mlp"] = view.mlp_params()[1][0].shape[0]
    if view.experts is not None:
        dims["experts"] = view.experts_view().inter
    return dims


def preflight(passes, views) -> None:
    """Every kept dim the A3 passes would pick, computed from the shapes alone, so a rank or multiple_of that does
    not fit any layer is a RatioError before calibration starts."""
    for v in active(views):
        full = full_dims(v)
        for p in layer_configs(passes, v.index):
            comp = COMPONENT_OF.get(type(p))
            if comp in full:
                rope = bool(v.dims.rot_dim) or (comp == "qk" and v.spec.mla)      # MLA: even q/k dims
                COMPONENTS[comp].kept(full[comp], p.ratio, p.rank, rope, p.multiple_of)


def _centered(s2: torch.Tensor, s1: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """E[(z - b)(z - b)^T] from the sums of z z^T (s2) and z (s1); b (..., d) or None."""
    g = s2 / n
    if bias is None:
        return g
    m = s1 / n
    b = bias
    return g - b[..., :, None] * m[..., None, :] - m[..., :, None] * b[..., None, :] + b[..., :, None] * b[..., None, :]


@handler(A3QK, scope="layer")
def apply_qk(cfg: A3QK, ctx: PassContext):
    work, st, n = ctx.work, ctx.stats, ctx.n
    a, d = work.attn, work.view.dims
    if a is None:                    # a hybrid's mixer layer: nothing of this component
        return solved("qk", work, torch.zeros(1, dtype=torch.float64), 1)
    if isinstance(a, MLAWork):       # each head's q_nope k_nopeᵀ through the latents: the MHA whitened SVD
        r = qk_kept(cfg, a.wq.shape[-1], True)    # even: DeepSeek-V2 views its RoPE part as complex pairs
        a.wq, a.wk, loss = solvers.qk_whitened_svd(a.wq, a.wk, st["q"] / n, st["k"] / n, r)
        return solved("qk", work, loss.sum(0)[::2], 2)
    full = a.wq.shape[-1]
    if a.qk_norm:   # the norm needs every dim of the head: QK stays whole (see README, "qk-norm treatment")
        qk_kept(cfg, full, bool(a.rot_dim))          # still validate the request
        return solved("qk", work, torch.zeros(full // (2 if a.rot_dim else 1) + 1, dtype=torch.float64),
                      2 if a.rot_dim else 1)
    if a.rot_dim:
        r = qk_kept(cfg, full, True)
        if a.rot_dim != full:
            return solved("qk", work, *_apply_qk_partial(work, st, n, r, cfg))
        p = a.perm
        q2 = (st["q"].diagonal(dim1=-2, dim2=-1) / n)[:, p].view(d.kv_heads, d.groups, -1)
        k2 = (st["k"].diagonal(dim1=-2, dim2=-1) / n)[:, p]
        idx, loss = solvers.qk_rope_select(q2, k2, a.rot_dim, "rotate_half", r,  # (Hkv, r)
                                           _order(cfg, a.rot_dim))
        if cfg.update and "qs" not in st:
            raise CalibrationError(f"layer {work.view.index}: A3QK(update=True) reads the score statistic (kind "
                                   f"'qkgram'), which these statistics lack (a file from an earlier a3mod that "
                                   f"recorded the kind without its sums?): collect them again")
        if cfg.update:
            idx, curve = _qk_update_pairs(cfg, st["qs"], d, r, idx, ctx.curves)
            loss = loss if curve is None else curve[None]
        qidx = idx.repeat_interleave(d.groups, 0)                                     # (H, r)
        a.wq = a.wq.gather(-1, qidx[:, None, :].expand(-1, a.wq.shape[1], -1))
        if cfg.update:
            a.wq = qk_refit.gain_rows(a.wq, qk_refit.pair_gains(st["qs"], qidx[:, : r // 2], cfg.damping)[0])
        a.wk = a.wk.gather(-1, idx[:, None, :].expand(-1, a.wk.shape[1], -1))
        a.rope_index = a.rope_index.gather(-1, idx)
        a.rot_dim = r
        return solved("qk", work, loss.sum(0), 2)      # per kept pair
    r = qk_kept(cfg, full, False)
    gq, gk = st["q"] / n, st["k"] / n
    if d.groups == 1:
        a.wq, a.wk, loss = solvers.qk_whitened_svd(a.wq, a.wk, gq, gk, r)
    else:
        wq = a.wq.view(d.kv_heads, d.groups, *a.wq.shape[1:])
        wq, a.wk, loss = solvers.qk_whitened_svd_gqa(wq, a.wk, gq.view(d.kv_heads, d.groups, full, full), gk, r)
        a.wq = wq.reshape(d.heads, *wq.shape[2:])
    return solved("qk", work, loss.sum(0), 1)


def _qk_update_pairs(cfg: A3QK, gram: torch.Tensor, d, r: int, idx: torch.Tensor, curves: bool = False):
    """A3QK(update=True): (the kept dims (Hkv, r) from the score Gram (H, rot, rot) by greedy removal
    (`qk_refit.select_pairs`), unless a shared ranking fixed them (`idx` as A3's selection gave it); with `curves`
    the greedy's loss per number of kept pairs (what Allocate reads), else None)."""
    if cfg.pair_order is not None:
        return idx, None
    half = gram.shape[-1] // 2
    kept = qk_refit.select_pairs(gram.view(d.kv_heads, d.groups, *gram.shape[1:]), r // 2, cfg.damping, curves)
    kept, curve = kept if curves else (kept, None)
    return torch.cat([kept, kept + half], -1), curve


def _order(cfg: A3QK, rot: int) -> torch.Tensor | None:
    """A3QK's shared pair ranking as a tensor (None: each KV group its own); RatioError if it does not fit."""
    if cfg.pair_order is None:
        if cfg.portable:
            raise RatioError("A3QK(portable=True) ranks the RoPE pairs from every layer's statistics, which this "
                             "run does not hold (compress_streaming solves layer by layer): use a3mod.apply, or "
                             "give pair_order (a3mod.json's passes record the one apply chose)")
        return None
    if len(cfg.pair_order) != rot // 2:
        raise RatioError(f"A3QK: pair_order ranks {len(cfg.pair_order)} RoPE pairs; this model's heads rotate "
                         f"{rot // 2}")
    return torch.tensor(cfg.pair_order)


def rot_share(m: int, rot: int, full: int) -> int:
    """Rotary dims among `m` kept q/k dims of a partial-rotary head (`rot` of `full` rotate): in proportion,
    even (whole pairs), and no more non-rotary dims than exist."""
    r = 2 * int(m * rot / full / 2 + 0.5)             # half up: ties keep a rotary pair
    lo = max(0, m - (full - rot))
    return max(lo + lo % 2, min(r, rot, m - m % 2))


def _apply_qk_partial(work: LayerWork, st: dict, n: int, r: int, cfg: A3QK):
    """Partial rotary (GPT-NeoX rotary_pct, Phi partial_rotary_factor): the scores are a rotary part plus a
    position-free part. The first gets pair selection, the second the whitened SVD; the `r` kept dims are
    split between them in proportion (`rot_share`). The reduced head is [kept pairs | SVD dims]."""
    a, d = work.attn, work.view.dims
    full, rot, p = a.wq.shape[-1], a.rot_dim, a.perm
    r_rot = rot_share(r, rot, full)
    q2 = (st["q"].diagonal(dim1=-2, dim2=-1) / n)[:, p][:, :rot].reshape(d.kv_heads, d.groups, rot)
    k2 = (st["k"].diagonal(dim1=-2, dim2=-1) / n)[:, p][:, :rot]
    idx, loss_rot = solvers.qk_rope_select(q2, k2, rot, "rotate_half", r_rot,  # (Hkv, r_rot), (Hkv, rot/2+1)
                                           _order(cfg, rot))
    qidx = idx.repeat_interleave(d.groups, 0)
    wq_rot = a.wq.gather(-1, qidx[:, None, :].expand(-1, a.wq.shape[1], -1))
    wk_rot = a.wk.gather(-1, idx[:, None, :].expand(-1, a.wk.shape[1], -1))
    # the position-free dims: whitened SVD on their own (d_h - rot) x (d_h - rot) moments
    pp = p[rot:]
    gq, gk = st["q"][:, pp][:, :, pp] / n, st["k"][:, pp][:, :, pp] / n
    wq, wk, dp = a.wq[..., rot:], a.wk[..., rot:], full - rot
    if d.groups == 1:
        wq_p, wk_p, loss_p = solvers.qk_whitened_svd(wq, wk, gq, gk, r - r_rot)
    else:
        wq_p, wk_p, loss_p = solvers.qk_whitened_svd_gqa(
            wq.reshape(d.kv_heads, d.groups, *wq.shape[1:]), wk, gq.reshape(d.kv_heads, d.groups, dp, dp), gk,
            r - r_rot)
        wq_p = wq_p.reshape(d.heads, *wq_p.shape[2:])
    a.wq, a.wk = torch.cat([wq_rot, wq_p], -1), torch.cat([wk_rot, wk_p], -1)
    a.rope_index, a.rot_dim = a.rope_index.gather(-1, idx), r_rot
    lr, lp = loss_rot.sum(0), loss_p.sum(0)
    shares = [rot_share(m, rot, full) for m in range(0, full + 1, 2)]
    return torch.stack([lr[s // 2] + lp[m - s] for m, s in zip(range(0, full + 1, 2), shares)]), 2


@handler(A3OV, scope="layer")
def apply_ov(cfg: A3OV, ctx: PassContext):
    work, st, n = ctx.work, ctx.stats, ctx.n
    a, d = work.attn, work.view.dims
    if a is None:                    # a hybrid's mixer layer: nothing of this component
        return solved("ov", work, torch.zeros(1, dtype=torch.float64), 1)
    if isinstance(a, MLAWork):       # each head's value -> o_proj block, whitened by its attention output (MHA)
        r = ov_kept(cfg, a.wv.shape[-1])
        g = _centered(st["o"], st["o1"], n, None)
        wv, wo, loss, t = solvers.ov_joint(a.wv, a.wo[:, None], g, r, return_map=True)
        a.wv, a.wo = wv, (solvers.ov_refit(a.wo, t, st["oo"] / n, wo[:, 0], cfg.damping, errors=False)[0] if cfg.update
                          else wo[:, 0])
        return solved("ov", work, loss.sum(0), 1)
    full = a.wv.shape[-1]
    r = ov_kept(cfg, full)
    if a.wg is not None and not a.gate_head:
        return _apply_ov_gated(cfg, work, st, n, r)
    # softmax rows sum to 1, so the value bias passes through as b_v W_o: fold it into o. Not with attention sinks
    # (gpt-oss): their softmax column takes mass, the rows over the keys sum to less; the bias stays a value input
    # (a per-head output gate scales it per token too: it stays a value input there as well)
    bv = a.wv[:, -1] if a.v_bias and not work.view.has_sinks and a.wg is None else None      # (Hkv, d_h)
    if bv is not None:
        fold = torch.einsum("hd,hdm->m", bv.repeat_interleave(d.groups, 0), a.wo)
        a.bo = fold if a.bo is None else a.bo + fold
        a.wv, a.v_bias = a.wv[:, :-1], False
    wo = a.wo.view(-1, d.groups if d.groups > 1 else 1, full, d.hidden)
    if d.groups == 1:   # MHA: whiten with the per-head attention output (softmax-weighted values)
        g = _centered(st["o"], st["o1"], n, bv)
    else:               # GQA: whiten with the group's values
        g = _centered(st["v"], st["v1"], n, bv)
    a.wv, wo_r, loss, t = solvers.ov_joint(a.wv, wo, g, r, return_map=True)
    wo_r = wo_r.reshape(d.heads, r, d.hidden)
    if cfg.update:      # every head's o_proj block re-fit jointly on the Gram of o_proj's (bias-free) input
        b = None if bv is None else bv.repeat_interleave(d.groups, 0).reshape(-1)
        gram = _centered(st["oo"], st["o1"].reshape(-1), n, b)
        wo_r = solvers.ov_refit(a.wo, t, gram, wo_r, cfg.damping, errors=False)[0]
    a.wo = wo_r
    return solved("ov", work, loss.sum(0), 1)


def _apply_ov_gated(cfg: A3OV, work: LayerWork, st: dict, n: int, r: int) -> Solution:
    """OV under an output gate: keep whole value dims per KV group (`solvers.ov_gated_select`) with their gate
    rows; update=True re-fits o_proj on the kept dims by least squares (`ov_refit` with selection maps). The value
    bias stays a value input (it is gated, so it does not fold into o_proj's bias)."""
    a, d = work.attn, work.view.dims
    u2 = st["o"].diagonal(dim1=-2, dim2=-1) / n                                      # (H, d_h) E[u^2]
    kept, loss = solvers.ov_gated_select(u2, a.wo, d.groups, r)                      # (Hkv, r)
    per_head = kept.repeat_interleave(d.groups, 0)                                   # (H, r)
    cols = lambda w, idx: w.gather(-1, idx[:, None, :].expand(-1, w.shape[1], -1))  # noqa: E731
    wo_r = a.wo.gather(1, per_head[..., None].expand(-1, -1, d.hidden))             # (H, r, d_m)
    if cfg.update:
        t = torch.zeros(d.kv_heads, d.head_dim, r, dtype=a.wo.dtype)
        t.scatter_(1, kept[:, None, :], 1.0)                                         # selection maps (Hkv, d_h, r)
        wo_r = solvers.ov_refit(a.wo, t, st["oo"] / n, wo_r, cfg.damping, errors=False)[0]
    a.wv, a.wg, a.wo = cols(a.wv, kept), cols(a.wg, per_head), wo_r
    return solved("ov", work, loss.sum(0), 1)


@handler(A3MLP, scope="layer")
def apply_mlp(cfg: A3MLP, ctx: PassContext):
    work, st, n = ctx.work, ctx.stats, ctx.n
    m = work.mlp
    if m is None:            # an MoE layer without a shared expert: its experts are A3Experts'
        return solved("mlp", work, torch.zeros(1, dtype=torch.float64), 1)
    full = m.up[0].shape[0]
    r = mlp_kept(cfg, full)
    idx, loss, order = _mlp_kept_order(cfg, st, n, m.down[0].t(), r, ctx.curves)
    if cfg.update and ctx.curves:   # Allocate reads the loss after the update, along the same order of neurons;
        # without `curves` the loss stays the selection's (nothing reads it then)
        loss = solvers.mlp_refit_losses(m.down[0].t(), st["hh"] / n, order)
    rows = lambda p: (p[0][idx], None if p[1] is None else p[1][idx])  # noqa: E731
    m.gate = None if m.gate is None else rows(m.gate)
    m.up = rows(m.up)
    if cfg.update:
        _check_refit_tokens(n, full)
        down = solvers.mlp_refit(m.down[0].t(), st["hh"] / n, idx, cfg.damping, errors=False)[0]     # (r, d_m)
        m.down = (down.t().contiguous(), m.down[1])
    else:
        m.down = (m.down[0][:, idx], m.down[1])
    m.kept = m.kept[idx]
    return solved("mlp", work, loss, 1)


def _mlp_kept_order(cfg: A3MLP, st: dict, n: int, w_down: torch.Tensor, r: int, curves: bool):
    """(kept neurons (r,) ascending, the selection's loss curve, every neuron in the order kept): CUR, structured
    OBS (its removal goes on to one neuron when the curves are read, so that the order covers every rank) or the
    loss sensitivity (kind "taylor"); the curve is CUR's loss along that order."""
    order, score = solvers.mlp_order(st["h2"] / n, w_down)          # CUR (what mlp_select keeps)
    if cfg.select == "taylor":
        order = (st["ht"] / n).argsort(descending=True)
    if cfg.select == "obs":
        order = solvers.mlp_obs_order(w_down, st["hh"] / n, r, cfg.damping, to=0 if curves else r)
    return order[:r].sort().values, solvers.tail_losses(score[order]), order


REFIT_TOKENS = 8      # calibration tokens per MLP neuron below which A3MLP(update=True) warns (docs: token curve)


def _check_refit_tokens(n: int, width: int) -> None:
    if n < REFIT_TOKENS * width:         # Python shows one warning per message: once per MLP width
        warnings.warn(f"a3mod: A3MLP(update=True) estimates a {width} x {width} activation Gram from {n} calibration "
                      f"tokens; it pays from about {REFIT_TOKENS * width} ({REFIT_TOKENS} per neuron): use more "
                      f"calibration windows", stacklevel=2)


@handler(A3Experts, scope="layer")
def apply_experts(cfg: A3Experts, ctx: PassContext):
    work, st = ctx.work, ctx.stats
    x = work.experts
    if x is None:            # a dense layer
        return solved("experts", work, torch.zeros(1, dtype=torch.float64), 1)
    ev = work.view.experts_view()
    r = experts_kept(cfg, x.orig)
    down = ev.down_cols().detach()                       # (E, d_m, I); float64 one expert at a time (memory)
    down_sq = torch.stack([down[e].double().square().sum(0) for e in range(ev.num)])   # (E, I)
    h2 = st["e2"].clone()
    few = (st["en"] < cfg.min_tokens).nonzero().flatten().tolist()
    for e in few:                        # too few routed tokens: a weight-only score (isotropic inputs)
        gate, up = ev.up_rows(e)
        h2[e] = up.detach().double().square().sum(-1) * (
            1.0 if gate is None else gate.detach().double().square().sum(-1))
    idx, loss = solvers.experts_select(h2, down_sq, r)
    if cfg.update and r < x.orig:
        x.down = _experts_update(down, st, idx, set(few), cfg.damping)
    x.kept = x.kept.gather(1, idx)
    x.fallback = few
    return solved("experts", work, loss.sum(0), 1)


def _experts_update(down: torch.Tensor, st: dict, idx: torch.Tensor, few: set, damping: float) -> torch.Tensor:
    """(E, d_m, k) kept down columns of every expert, re-fitted by least squares (`solvers.mlp_refit`) on the Gram
    of its combine-weighted activations; an expert in `few` (or routed no token) keeps its columns as they are."""
    width, out = down.shape[2], []
    low = [e for e in range(down.shape[0]) if e not in few and 0 < st["en"][e] < REFIT_TOKENS * width]
    if low:
        warnings.warn(f"a3mod: A3Experts(update=True): experts {low[:8]}{' ...' if len(low) > 8 else ''} were routed "
                      f"fewer than {REFIT_TOKENS * width} calibration tokens ({REFIT_TOKENS} per neuron) for their "
                      f"{width} x {width} Grams: use more calibration windows", stacklevel=3)
    for e in range(down.shape[0]):
        if e in few or not st["en"][e] > 0:
            out.append(down[e][:, idx[e]].double())
            continue
        w = down[e].double().t()                                        # (I, d_m) in h @ W form
        out.append(solvers.mlp_refit(w, st["eh"][e] / st["en"][e], idx[e], damping, errors=False)[0].t())
    return torch.stack(out)
