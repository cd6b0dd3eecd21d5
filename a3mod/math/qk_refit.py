"""QK under RoPE: the pair selection and query gains fitted to the attention-weighted score error (pure tensor
functions, float64; docs/method_extensions.md, "QK update").

Notation: a head's rotary dims in rotate_half layout form `half` complex pairs; pair p's score contribution for
query m and key n is Re z_p(m, n), z_p = Q_p(m) conj(K_p(n)) with Q_p, K_p the rotated complex pairs, and the
score is the sum over the pairs. Features f = [Re z_0, Im z_0, Re z_1, Im z_1, ...] (F = 2 half of them); the
statistics hold per query head G = sum over sampled queries and visible keys of p_mn f~ f~^T, f~ = f minus its
mean under the query's attention p_m (`a3mod.calib.scores.score_gram`). A reduced head keeps pairs K and scales
each kept query pair by a complex gain c_p = a_p + i b_p (a 2 x 2 block [[a, -b], [b, a]] on its two q_proj
rows, which commutes with the rotation): its score is sum over K of a_p Re z_p - b_p Im z_p, a linear function of
theta = [a_p, -b_p]_p. The error E(theta) = sum p_mn (s~ - theta . f~_K)^2 is softmax's shift-invariant score
error (half the KL of the attention to second order, up to the softmax scale), and theta0 = [1, 0, ...] is plain
pair selection.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .solvers import ridge_refit


def theta0(like: Tensor) -> Tensor:
    """A tensor like `like` (..., F) with 1 on the real features and 0 on the imaginary ones: over all features the
    full score's weights, over the kept ones theta0 (plain selection)."""
    t = torch.zeros_like(like)
    t[..., 0::2] = 1.0
    return t


def pair_system(gram: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The least-squares system of kept `pairs` (..., k) (long) in `gram` (..., F, F): (A (..., 2k, 2k), b (..., 2k),
    c (...)), with E(theta) = c - 2 theta . b + theta^T A theta."""
    feat = torch.stack([2 * pairs, 2 * pairs + 1], -1).flatten(-2)                  # (..., 2k)
    t = theta0(gram[..., 0, :])                                                       # (..., F)
    gt = (gram @ t[..., None])[..., 0]                                                # (..., F)
    rows = gram.gather(-2, feat[..., :, None].expand(*feat.shape, gram.shape[-1]))   # (..., 2k, F)
    a = rows.gather(-1, feat[..., None, :].expand(*feat.shape, feat.shape[-1]))     # (..., 2k, 2k)
    return a, gt.gather(-1, feat), (gt * t).sum(-1)


def theta_error(a: Tensor, b: Tensor, c: Tensor, th: Tensor) -> Tensor:
    """E(theta) = c - 2 theta . b + theta^T A theta (per head)."""
    return c - 2 * (th * b).sum(-1) + (th * (a @ th[..., None])[..., 0]).sum(-1)


def fit_theta(a: Tensor, b: Tensor, damping: float) -> Tensor:
    """theta of the damped fit, pulled toward theta0 (plain selection): `solvers.ridge_refit`."""
    return ridge_refit(a, b[..., None], theta0(b)[..., None], damping)[..., 0]


def pair_gains(gram: Tensor, pairs: Tensor, damping: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """Complex query gains of the kept pairs. gram (H, F, F); pairs (H, k) each head's kept pairs.

    Returns (gains (H, k, 2) as (a, b), c = a + i b; error of plain selection (H,); error with the gains (H,)),
    both on the undamped Gram: the second never exceeds the first (`ridge_refit`). All pairs kept: gains 1."""
    a, b, c = pair_system(gram, pairs)
    th = fit_theta(a, b, damping)
    return gains_of(th), theta_error(a, b, c, theta0(b)), theta_error(a, b, c, th)


def gains_of(th: Tensor) -> Tensor:
    """theta (..., 2k) = [a_p, -b_p]_p -> the complex gains (..., k, 2) as (a, b)."""
    return torch.stack([th[..., 0::2], -th[..., 1::2]], -1)


def select_pairs(gram: Tensor, keep: int, damping: float = 0.01, curve: bool = False):
    """Kept pairs per KV group by greedy removal: gram (Hkv, g, F, F), its query heads' Grams. Each step drops the
    pair whose removal leaves the least error summed over the group's heads after their gains are fitted
    (`pair_gains`, damped as given). Returns (Hkv, keep) pair indices, ascending; curve=True: also the loss curve
    (F/2 + 1,) float64, entry k the error summed over every head when the greedy keeps k pairs (the removal run down
    to none; entry F/2 is 0 up to round-off), which `Allocate` reads."""
    hkv, g, f, _ = gram.shape
    kept = torch.arange(f // 2, device=gram.device).expand(hkv, -1)                 # (Hkv, n)
    loss = torch.zeros(f // 2 + 1, dtype=torch.float64, device=gram.device)
    chosen = kept if keep >= f // 2 else None
    t = theta0(gram[..., 0, :])
    loss[0] = ((gram @ t[..., None])[..., 0] * t).sum()                              # no pair: the whole score
    while kept.shape[1] > (1 if curve else keep):
        n = kept.shape[1]
        drop = ~torch.eye(n, dtype=torch.bool, device=gram.device)                   # row j: all but j
        cand = kept[:, None, :].expand(-1, n, -1)[:, drop].view(hkv, n, n - 1)       # (Hkv, n, n-1)
        pairs = cand[:, :, None, :].expand(-1, -1, g, -1)                            # (Hkv, n, g, n-1)
        a, b, c = pair_system(gram[:, None].expand(-1, n, -1, -1, -1), pairs)
        err = theta_error(a, b, c, fit_theta(a, b, damping)).sum(-1)                 # (Hkv, n)
        best = err.argmin(-1)
        kept = cand[torch.arange(hkv, device=gram.device), best]
        loss[n - 1] = err.gather(-1, best[:, None]).sum()
        if n - 1 == keep:
            chosen = kept
    chosen = (kept if chosen is None else chosen).sort(-1).values
    return (chosen, loss) if curve else chosen


def gain_rows(w: Tensor, gains: Tensor) -> Tensor:
    """Apply the gains to a reduced head's q columns: w (..., d_in, r) in [firsts | seconds] rotate_half order,
    gains (..., r/2, 2). Pair p's columns (x, y) become (a x - b y, b x + a y): the complex product c (x + i y)."""
    k = w.shape[-1] // 2
    x, y = w[..., :k], w[..., k:]
    a, b = gains[..., 0].to(w.dtype)[..., None, :], gains[..., 1].to(w.dtype)[..., None, :]
    return torch.cat([a * x - b * y, b * x + a * y], -1)
