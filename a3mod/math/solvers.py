"""Closed-form A3 solvers: pure tensor functions (float64), no transformers, no modules.

Notation follows ../shared/docs/method.md: weights in `x @ W` form, so a projection's W is (d_in, d_out).
Every solver takes second moments (E[z z^T], already divided by the token count) and returns new weights
plus the closed-form loss for every rank, so rank allocation needs no extra pass.
"""
from __future__ import annotations

import torch
from torch import Tensor

DAMP = 1e-8  # relative damping added to non-PD second moments (times mean diagonal)


def damp(g: Tensor, rel: float = DAMP) -> Tensor:
    """g + rel * mean(diag(g)) * I, batched over leading dims. Keeps PSD matrices invertible."""
    d = g.shape[-1]
    scale = g.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
    return g + rel * scale[..., None, None] * torch.eye(d, dtype=g.dtype, device=g.device)


def chol_upper(g: Tensor) -> Tensor:
    """Upper-triangular A with A^T A = g (batched), damping harder until g is positive definite."""
    rel = DAMP
    for _ in range(12):
        l, info = torch.linalg.cholesky_ex(damp(g, rel))
        if not bool((info != 0).any()):
            return l.mT
        rel *= 100
    raise torch.linalg.LinAlgError(f"second moment is not positive definite even with damping {rel:g}")


def psd_sqrt(g: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix (batched); negative eigenvalues from round-off are clipped."""
    w, v = torch.linalg.eigh(g)
    return (v * w.clamp_min(0).sqrt()[..., None, :]) @ v.mT


def tail_losses(s2: Tensor) -> Tensor:
    """loss[r] = sum of s2 beyond the first r (s2 sorted descending); shape (..., n+1)."""
    total = s2.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([total, torch.zeros_like(total[..., :1])], -1)


# ---------------------------------------------------------------------------------------------- QK
def qk_whitened_svd(wq: Tensor, wk: Tensor, gq: Tensor, gk: Tensor, r: int):
    """QK without RoPE, MHA: rank-r optimum of the per-head scores X Wq Wk^T X^T (cheap exact form).

    wq, wk: (h, d_in, d_h) per-head weights (a bias is an extra input row); gq, gk: (h, d_h, d_h) second
    moments of the head's queries / keys. Returns wq' (h, d_in, r), wk' (h, d_in, r), loss (h, d_h+1)
    where loss[r] = ||scores - scores_r||^2 / l^2.
    """
    a, b = chol_upper(gq), chol_upper(gk)                 # gq = a^T a, gk = b^T b
    u, s, vh = torch.linalg.svd(a @ b.mT)                  # (h, d_h, d_h)
    half = s[..., :r].sqrt()
    wq_r = wq @ torch.linalg.solve_triangular(a, u[..., :r], upper=True) * half[..., None, :]
    wk_r = wk @ torch.linalg.solve_triangular(b, vh.mT[..., :r], upper=True) * half[..., None, :]
    return wq_r, wk_r, tail_losses(s**2)


def qk_whitened_svd_gqa(wq: Tensor, wk: Tensor, gq: Tensor, gk: Tensor, r: int):
    """QK without RoPE, grouped: one key subspace per KV group shared by its g query heads.

    wq: (h_kv, g, d_in, d_h), wk: (h_kv, d_in, d_h), gq: (h_kv, g, d_h, d_h), gk: (h_kv, d_h, d_h).
    Minimises sum_i ||Q_i K^T - Q_i' K'^T||^2: the kept key directions are the top right singular vectors
    of the stacked [A_1 B^T; ...; A_g B^T] (eigenvectors of B (sum_i G_q,i) B^T).
    Returns wq' (h_kv, g, d_in, r), wk' (h_kv, d_in, r), loss (h_kv, d_h+1).
    """
    b = chol_upper(gk)                                     # (h_kv, d_h, d_h)
    m = b @ gq.sum(1) @ b.mT                               # (h_kv, d_h, d_h)
    w, v = torch.linalg.eigh(m)
    w, v = w.flip(-1).clamp_min(0), v.flip(-1)
    vr = v[..., :r]                                        # whitened key basis (h_kv, d_h, r)
    wk_r = wk @ torch.linalg.solve_triangular(b, vr, upper=True)
    wq_r = wq @ (b.mT @ vr)[:, None]
    return wq_r, wk_r, tail_losses(w)


def rope_pair_scores(q2: Tensor, k2: Tensor, rot_dim: int, layout: str) -> tuple[Tensor, Tensor]:
    """Score of every RoPE pair per KV group. q2: (h_kv, g, d_h) E[q_j^2] (pre-RoPE), k2: (h_kv, d_h).

    Returns (scores (h_kv, rot_dim/2), partner index table (rot_dim/2, 2)) where pair p is the dims
    (first, second) of the table: (p, p + rot/2) for rotate_half, (2p, 2p+1) for interleaved.
    """
    if layout not in ("rotate_half", "interleaved"):
        raise ValueError(f"RoPE layout {layout!r}; allowed: 'rotate_half', 'interleaved'")
    half = rot_dim // 2
    p = torch.arange(half, device=q2.device)
    pairs = torch.stack([p, p + half], -1) if layout == "rotate_half" else torch.stack([2 * p, 2 * p + 1], -1)
    score = q2.sum(1) * k2                                 # (h_kv, d_h): group-summed E[q_j^2] E[k_j^2]
    return score[:, pairs].sum(-1), pairs


def qk_rope_select(q2: Tensor, k2: Tensor, rot_dim: int, layout: str, r: int):
    """QK with RoPE: keep the top r/2 RoPE pairs per KV group (CUR, no re-fit).

    Returns (index (h_kv, r) into the original head dims, ordered [firsts, seconds] so rotate_half on the
    reduced head pairs them correctly; loss (h_kv, rot_dim/2 + 1) = dropped score for r/2 kept pairs).
    Non-rotary dims (partial rotary) are not handled here.
    """
    if r % 2:
        raise ValueError(f"QK rank under RoPE must be even (whole pairs), got {r}")
    scores, pairs = rope_pair_scores(q2, k2, rot_dim, layout)
    order = scores.argsort(-1, descending=True)
    kept = order[:, : r // 2].sort(-1).values              # (h_kv, r/2), ascending frequency index
    idx = torch.cat([pairs[kept, 0], pairs[kept, 1]], -1)  # (h_kv, r)
    return idx, tail_losses(scores.gather(-1, order))


# ---------------------------------------------------------------------------------------------- OV
def ov_joint(wv: Tensor, wo: Tensor, g: Tensor, r: int):
    """OV: one value head shared by g output blocks (g = 1 for MHA, where `g` moment is the attention output).

    wv: (n, d_in, d_h), wo: (n, g, d_h, d_m), g: (n, d_h, d_h) second moment of what enters W_o (MHA:
    per-head attention output; GQA: the group's values). Minimises E||z [W_o,1..W_o,g] - z' W_o'||^2.
    Returns wv' (n, d_in, r), wo' (n, g, r, d_m), loss (n, d_h+1).
    """
    n, gg, dh, dm = wo.shape
    wo_cat = wo.permute(0, 2, 1, 3).reshape(n, dh, gg * dm)   # [W_o,1 ... W_o,g]  (n, d_h, g d_m)
    _, s, vh = torch.linalg.svd(psd_sqrt(damp(g)) @ wo_cat, full_matrices=False)
    vr = vh[:, :r].mT                                          # (n, g d_m, r)
    wv_r = wv @ (wo_cat @ vr)                                  # (n, d_in, r)
    wo_r = vr.reshape(n, gg, dm, r).mT                         # (n, g, r, d_m)
    return wv_r, wo_r, tail_losses(s**2)


# --------------------------------------------------------------------------------------------- MLP
def experts_select(h2: Tensor, down_sq: Tensor, r: int):
    """MLP CUR for every routed expert at once: each keeps its r neurons with the largest E[w^2 h_i^2] ||W_down[i]||^2.

    h2: (E, d_i) per-expert (combine-weighted) squared activations, down_sq: (E, d_i) squared norms of each neuron's
    down-projection column. Returns (kept index (E, r) ascending per expert, loss (E, d_i+1) dropped score)."""
    score = h2 * down_sq
    order = score.argsort(-1, descending=True)
    return order[:, :r].sort(-1).values, tail_losses(score.gather(-1, order))


def mlp_select(h2: Tensor, w_down: Tensor, r: int):
    """MLP CUR: keep the r intermediate neurons with the largest E[h_i^2] ||W_down[i, :]||^2.

    h2: (d_i,), w_down: (d_i, d_m). Returns (kept index (r,) ascending, loss (d_i+1,) dropped score).
    """
    score = h2 * w_down.pow(2).sum(-1)
    order = score.argsort(descending=True)
    return order[:r].sort().values, tail_losses(score[order])


def mlp_refit(w_down: Tensor, hh: Tensor, kept: Tensor, damping: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares update of the kept neurons' down projection (closed form, same shapes, no extra GEMM).

    w_down: (d_i, d_m) in `h @ W` form; hh: (d_i, d_i) E[h h^T] of the intermediate activations; kept: (r,) indices.
    With D the dropped neurons, the kept rows become W_K + H_KK^-1 H_KD W_D: the minimiser of E||h W - h_K W'||^2,
    with H_KK damped by `damping` times its mean diagonal. Returns (new kept rows (r, d_m), error before, error after)
    where the errors are E||h W - h_K W'_K||^2 evaluated on the undamped `hh` (W'_K = W_K before the update)."""
    d_i = w_down.shape[0]
    drop = torch.ones(d_i, dtype=torch.bool, device=w_down.device)
    drop[kept] = False
    wk, wd = w_down[kept], w_down[drop]
    if wd.shape[0] == 0:
        return wk.clone(), w_down.new_zeros(()), w_down.new_zeros(())
    h_kk, h_kd = hh[kept][:, kept], hh[kept][:, drop]
    l = chol_upper(damp(h_kk, damping)).mT if damping > 0 else chol_upper(h_kk).mT     # lower: h_kk ~= l l^T
    new = wk + torch.cholesky_solve(h_kd @ wd, l)
    return new, _refit_error(w_down, hh, kept, wk), _refit_error(w_down, hh, kept, new)


def _refit_error(w_down: Tensor, hh: Tensor, kept: Tensor, wk_new: Tensor) -> Tensor:
    """E||h W - h_K W'_K||^2 = tr(E^T H E) with E = W - (W'_K scattered into the kept rows, zeros elsewhere)."""
    e = w_down.clone()
    e[kept] -= wk_new
    return (e * (hh @ e)).sum()
