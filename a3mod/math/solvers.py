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


def qk_rope_select(q2: Tensor, k2: Tensor, rot_dim: int, layout: str, r: int, order: Tensor | None = None):
    """QK with RoPE: keep the top r/2 RoPE pairs per KV group (CUR, no re-fit); `order` (rot_dim/2,): one ranking
    of the pairs for every group instead (a portable selection: `shared_pair_order`).

    Returns (index (h_kv, r) into the original head dims, ordered [firsts, seconds] so rotate_half on the
    reduced head pairs them correctly; loss (h_kv, rot_dim/2 + 1) = dropped score for r/2 kept pairs).
    Non-rotary dims (partial rotary) are not handled here.
    """
    if r % 2:
        raise ValueError(f"QK rank under RoPE must be even (whole pairs), got {r}")
    scores, pairs = rope_pair_scores(q2, k2, rot_dim, layout)
    order = scores.argsort(-1, descending=True) if order is None else order.to(scores.device).expand_as(scores)
    kept = order[:, : r // 2].sort(-1).values              # (h_kv, r/2), ascending frequency index
    idx = torch.cat([pairs[kept, 0], pairs[kept, 1]], -1)  # (h_kv, r)
    return idx, tail_losses(scores.gather(-1, order))


def shared_pair_order(scores: list[Tensor]) -> Tensor:
    """One ranking of the RoPE pairs for every KV group of every layer: by the summed pair scores (each (h_kv,
    rot/2) from `rope_pair_scores`), so the pairs kept at any rank minimise the total dropped score among shared
    selections. Returns (rot/2,) pair indices, best first."""
    total = torch.stack([s.double().sum(0) for s in scores]).sum(0)
    return total.argsort(descending=True)


# ---------------------------------------------------------------------------------------------- OV
def ov_joint(wv: Tensor, wo: Tensor, g: Tensor, r: int, return_map: bool = False):
    """OV: one value head shared by g output blocks (g = 1 for MHA, where `g` moment is the attention output).

    wv: (n, d_in, d_h), wo: (n, g, d_h, d_m), g: (n, d_h, d_h) second moment of what enters W_o (MHA:
    per-head attention output; GQA: the group's values). Minimises E||z [W_o,1..W_o,g] - z' W_o'||^2.
    Returns wv' (n, d_in, r), wo' (n, g, r, d_m), loss (n, d_h+1), and with return_map the value map t (n, d_h, r)
    with wv' = wv t (what `ov_refit` reads).
    """
    n, gg, dh, dm = wo.shape
    wo_cat = wo.permute(0, 2, 1, 3).reshape(n, dh, gg * dm)   # [W_o,1 ... W_o,g]  (n, d_h, g d_m)
    _, s, vh = torch.linalg.svd(psd_sqrt(damp(g)) @ wo_cat, full_matrices=False)
    vr = vh[:, :r].mT                                          # (n, g d_m, r)
    t = wo_cat @ vr                                            # (n, d_h, r): the kept value basis
    wo_r = vr.reshape(n, gg, dm, r).mT                         # (n, g, r, d_m)
    return (wv @ t, wo_r, tail_losses(s**2)) + ((t,) if return_map else ())


def ov_gated_select(u2: Tensor, wo: Tensor, groups: int, r: int):
    """OV under an elementwise output gate (Qwen3.5): o_proj reads u = z * sigmoid(g) per value dim, and a rotation
    of the value space does not commute with the gate, so whole value dims are kept (CUR, as the MLP's neurons):
    dim i of KV group j keeps v_proj's row, every query head's gate row and o_proj column for it. Its score is
    sum over the group's heads h of E[u_hi^2] ||W_o[h, i, :]||^2 (the output energy it carries alone).

    u2: (H, d_h) E[u^2] per head dim; wo: (H, d_h, d_m); groups: query heads per KV head (consecutive).
    Returns (kept (H_kv, r) ascending per group, loss (H_kv, d_h+1) dropped score)."""
    h, dh, _ = wo.shape
    score = (u2 * wo.square().sum(-1)).view(h // groups, groups, dh).sum(1)        # (H_kv, d_h)
    order = score.argsort(-1, descending=True)
    return order[:, :r].sort(-1).values, tail_losses(score.gather(-1, order))


# --------------------------------------------------------------------------------------------- MLP
def experts_select(h2: Tensor, down_sq: Tensor, r: int):
    """MLP CUR for every routed expert at once: each keeps its r neurons with the largest E[w^2 h_i^2] ||W_down[i]||^2.

    h2: (E, d_i) per-expert (combine-weighted) squared activations, down_sq: (E, d_i) squared norms of each neuron's
    down-projection column. Returns (kept index (E, r) ascending per expert, loss (E, d_i+1) dropped score)."""
    score = h2 * down_sq
    order = score.argsort(-1, descending=True)
    return order[:, :r].sort(-1).values, tail_losses(score.gather(-1, order))


def mlp_order(h2: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor]:
    """(neurons by descending CUR score E[h_i^2] ||W_down[i, :]||^2, the scores); h2 (d_i,), w_down (d_i, d_m)."""
    score = h2 * w_down.pow(2).sum(-1)
    return score.argsort(descending=True), score


def mlp_select(h2: Tensor, w_down: Tensor, r: int):
    """MLP CUR: keep the r intermediate neurons with the largest E[h_i^2] ||W_down[i, :]||^2.

    h2: (d_i,), w_down: (d_i, d_m). Returns (kept index (r,) ascending, loss (d_i+1,) dropped score).
    """
    order, score = mlp_order(h2, w_down)
    return order[:r].sort().values, tail_losses(score[order])


def mlp_obs_order(w_down: Tensor, hh: Tensor, r: int, damping: float = 0.01, block: int = 64, to: int | None = None):
    """Structured OBS selection (ZipLM / SlimGPT; ../shared/docs/quality_levers.md 2.1): neurons in the order it keeps
    them. w_down: (d_i, d_m) in `h @ W` form; hh: (d_i, d_i) E[h h^T], damped by `damping` x its mean diagonal.

    Greedy removal, `block` neurons a step: those of least ||W_q||^2 / (H^-1)_qq among the alive (the output error
    their removal leaves once the others are re-fitted), then the exact joint update of the rest,
    W_R -= (H^-1)_RQ (H^-1)_QQ^-1 W_Q and H^-1 -= (H^-1)_:Q (H^-1)_QQ^-1 (H^-1)_Q: (the inverse Gram of the alive).
    The last step before `r` alive is cut to land on r exactly; removal goes on to `to` alive (default r).
    Returns (d_i,): the survivors at `to` (ascending), then the removed in reverse order of removal, so that [:k] is
    the set alive at k for every k >= to. With a diagonal H no update moves W and the order is the CUR order."""
    d = w_down.shape[0]
    to = r if to is None else to
    hinv = torch.cholesky_inverse(chol_upper(damp(hh, damping) if damping > 0 else hh), upper=True)
    w = w_down.clone()
    alive = torch.ones(d, dtype=torch.bool, device=w.device)
    removed: list[Tensor] = []
    while int(alive.sum()) > to:
        n = int(alive.sum())
        k = min(block, n - r if n > r else n - to)
        score = w.square().sum(-1) / hinv.diagonal().clamp_min(1e-300)
        q = torch.where(alive, score, torch.inf).topk(k, largest=False).indices
        q = q[score[q].argsort(descending=True)]        # within a block: the most important first
        m = torch.linalg.solve(hinv[q][:, q], torch.cat([w[q], hinv[q]], 1))      # (k, d_m + d_i)
        w -= hinv[:, q] @ m[:, :w.shape[1]]
        hinv -= hinv[:, q] @ m[:, w.shape[1]:]
        alive[q] = False
        w[q], hinv[q], hinv[:, q] = 0.0, 0.0, 0.0
        removed.append(q)
    return torch.cat([alive.nonzero().flatten(), *reversed(removed)])


# ------------------------------------------------------------------------------------- refits
def ridge_refit(a: Tensor, b: Tensor, w0: Tensor, damping: float) -> Tensor:
    """argmin over W of tr(W^T a W) - 2 tr(W^T b) + lam ||W - w0||^2 (lam = damping * mean diag(a)):
    w0 + (a + lam I)^-1 (b - a w0). The least-squares fit of a target with Gram-form a = E[u u^T],
    b = E[u y^T], pulled toward w0; for any damping its error lies between the exact fit's and w0's."""
    l = chol_upper(damp(a, damping) if damping > 0 else a).mT          # lower: l l^T = a + lam I
    return w0 + torch.cholesky_solve(b - a @ w0, l)


def refit_error(w: Tensor, t: Tensor, w_new: Tensor, g: Tensor) -> Tensor:
    """E||z W - z T W'||^2 = tr(E^T G E), E = W - T W': the output error of a reduced projection (z: the input
    whose Gram is g; T maps it to what the reduced projection reads)."""
    e = w - t @ w_new
    return (e * (g @ e)).sum()


def mlp_refit(w_down: Tensor, hh: Tensor, kept: Tensor, damping: float = 0.01, errors: bool = True):
    """Least-squares update of the kept neurons' down projection (closed form, same shapes, no extra GEMM).

    w_down: (d_i, d_m) in `h @ W` form; hh: (d_i, d_i) E[h h^T] of the intermediate activations; kept: (r,) indices.
    With D the dropped neurons, the kept rows become W_K + H_KK^-1 H_KD W_D: the minimiser of E||h W - h_K W'||^2,
    pulled toward W_K by `damping` (`ridge_refit`). Returns (new kept rows (r, d_m), error before, error after):
    E||h W - h_K W'_K||^2 on the undamped `hh`, before meaning W'_K = W_K (None, None with errors=False)."""
    wk = w_down[kept]
    if kept.numel() == w_down.shape[0]:
        return wk.clone(), w_down.new_zeros(()), w_down.new_zeros(())
    h_k = hh[kept]                                                               # (r, d_i) = sel^T H
    new = ridge_refit(h_k[:, kept], h_k @ w_down, wk, damping)
    if not errors:
        return new, None, None
    sel = torch.zeros(w_down.shape[0], kept.numel(), dtype=w_down.dtype, device=w_down.device)
    sel[kept, torch.arange(kept.numel(), device=w_down.device)] = 1.0          # h_K = h @ sel
    return new, refit_error(w_down, sel, wk, hh), refit_error(w_down, sel, new, hh)


def ov_refit(wo: Tensor, t: Tensor, gram: Tensor, wo_r: Tensor, damping: float = 0.01, errors: bool = True):
    """Least-squares update of o_proj on reduced value bases, every head jointly (cross-head terms included).

    wo: (H, d_h, d_m) original per-head o_proj blocks; t: (H_kv, d_h, r) each KV group's map from the original value
    dims to the kept ones (W_v' = W_v t, so head i's reduced attention output is z_i t_g(i)); gram: (H d_h, H d_h)
    E[z z^T] of o_proj's input z (all heads' bias-free attention outputs); wo_r: (H, r, d_m) the reduction's own
    blocks. With T = blockdiag(t_g(i)): W_o' = argmin E||z W_o - z T W'||^2 = (T^T G T)^-1 T^T G W_o, pulled toward
    wo_r by `damping`. Returns (wo' (H, r, d_m), error with wo_r, error with wo'); (wo', None, None) with
    errors=False."""
    h, dh, dm = wo.shape
    r = t.shape[-1]
    big_t = torch.block_diag(*t.repeat_interleave(h // t.shape[0], 0))           # (H d_h, H r)
    w, w0 = wo.reshape(h * dh, dm), wo_r.reshape(h * r, dm)
    gt = gram @ big_t
    new = ridge_refit(big_t.mT @ gt, gt.mT @ w, w0, damping)
    if not errors:
        return new.reshape(h, r, dm), None, None
    return new.reshape(h, r, dm), refit_error(w, big_t, w0, gram), refit_error(w, big_t, new, gram)


def mlp_refit_losses(w_down: Tensor, hh: Tensor, order: Tensor) -> Tensor:
    """loss[k] = E||h W - h_K W'_K||^2 after the least-squares update (undamped), K the first k neurons of `order`
    (d_i,), for k = 0..d_i: one Cholesky. With H permuted into that order, H = L L^T, the whitened activations
    u = L^-1 h are uncorrelated and span the first k neurons' space with their first k entries; y = h W = u (L^T W),
    so keeping k neurons explains the first k rows of M = L^T W: loss[k] = sum of ||M_j||^2 over j > k."""
    p = order.to(hh.device)
    l = chol_upper(hh[p][:, p]).mT                   # lower, in the given order (damped only where singular)
    m = l.mT @ w_down[p]                             # (d_i, d_m)
    return tail_losses(m.square().sum(-1))
