"""Low-rank factorizations of one linear layer, the baselines: plain SVD, ASVD, SVD-LLM.

Pure float64 tensor functions, no transformers. Weights are (out, in) as in nn.Linear; every function
returns factors (B (out, r), A (r, in)) with W ~ B @ A (A applied first), sqrt(Sigma) split on both.
See "Baselines" in ../shared/docs/method.md.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

ASVD_EPS = 1e-6


def floor(x: float) -> int:
    """floor, forgiving float round-off just below a whole number (0.7 * 20 = 13.999999999999998 -> 14)."""
    return math.floor(x + 1e-9)


def rank_for_keep(out_f: int, in_f: int, keep: float, bias: int = 0) -> int:
    """Largest rank whose factors (+ the `bias` entries) hold at most `keep` x the layer's m*n + bias parameters:
    floor((keep (m n + bias) - bias) / (m + n)), clamped to [1, min(m, n)]. bias=0 is method.md's formula."""
    return max(1, min(min(out_f, in_f), floor((keep * (out_f * in_f + bias) - bias) / (out_f + in_f))))


def _split(u: Tensor, s: Tensor, vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def svd_factors(w: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Plain truncated SVD of W (no activation information): minimises ||W - BA||_F."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return _split(u, s, vh, r)


def asvd_scale(abs_mean: Tensor, alpha: float) -> Tensor:
    """ASVD input-channel scale S = (mean |x|)^alpha + eps, (in,)."""
    return abs_mean.double().pow(alpha) + ASVD_EPS


def asvd_svd(w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of W diag(S) (computed once, truncated at any rank by `asvd_truncate`)."""
    return torch.linalg.svd(w.double() * scale[None], full_matrices=False)


def asvd_truncate(svd: tuple[Tensor, Tensor, Tensor], scale: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Rank-r factors of W from the SVD of W diag(S), with the scaling undone on A: A = sqrt(S_r) V_r^T / S."""
    b, a = _split(*svd, r)
    return b, a / scale[None]


def asvd_factors(w: Tensor, abs_mean: Tensor, alpha: float, r: int) -> tuple[Tensor, Tensor]:
    """ASVD: truncated SVD of W diag(mean|x|^alpha + eps), scaling undone. alpha=0 is plain SVD."""
    scale = asvd_scale(abs_mean, alpha)
    return asvd_truncate(asvd_svd(w, scale), scale, r)


def whitening(gram: Tensor) -> Tensor:
    """Lower Cholesky factor L of X^T X = L L^T (float64); a diagonal shift when not positive definite.

    A singular Gram can still factor in floating point with a pivot of round-off size (L^-1 then explodes):
    a pivot L_ii^2 below 1e-12 x the mean diagonal counts as a failed factorization too."""
    g = gram.double()
    g = (g + g.mT) / 2
    scale = g.diagonal().mean().abs().clamp_min(1e-30)
    l, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0 and bool(torch.isfinite(l).all()) and bool((l.diagonal().square() > 1e-12 * scale).all()):
        return l
    # A Gram is PSD up to round-off (singular when the inputs span fewer dims than it has: more input channels than
    # calibration tokens), so a small shift factors it; no eigendecomposition (9x a Cholesky at d = 8960)
    shift = 1e-6 * scale
    for _ in range(10):
        l, info = torch.linalg.cholesky_ex(g + shift * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
        if int(info) == 0 and bool(torch.isfinite(l).all()):
            return l
        shift = shift * 10
    raise torch.linalg.LinAlgError("input Gram matrix is not positive definite even after a diagonal shift")


def svdllm_factors(w: Tensor, gram: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """SVD-LLM: truncated SVD of W L (X^T X = L L^T), A = sqrt(S_r) V_r^T L^-1.

    Minimises ||(W - BA) X^T||_F over rank-r BA for the calibration inputs X (rows = tokens).
    """
    l = whitening(gram)
    u, s, vh = torch.linalg.svd(w.double() @ l, full_matrices=False)
    b, a = _split(u, s, vh, r)
    a = torch.linalg.solve_triangular(l, a, upper=False, left=False)      # a @ L^-1
    return b, a


def _eig_root(gram: Tensor) -> tuple[Tensor, Tensor]:
    """X^T X = U diag(lam) U^T: (S = U diag(sqrt(lam)), S^+ = diag(1/sqrt(lam)) U^T with directions of eigenvalue
    <= 1e-12 x the largest dropped)."""
    g = gram.double()
    lam, u = torch.linalg.eigh((g + g.mT) / 2)
    keep = lam > 1e-12 * lam.max().clamp_min(1e-300)
    root = lam.clamp_min(0).sqrt()
    inv = torch.where(keep, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    return u * root, inv[:, None] * u.mT


def stable_whitened_svd(w: Tensor, gram: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD-LLM V2's truncation: X^T X = U diag(lam) U^T (eigendecomposition, no Cholesky), S = U diag(sqrt(lam));
    the SVD of W S = P diag(s) Q^T and the pseudo-inverse S^+ (directions of eigenvalue <= 1e-12 x the largest are
    dropped). Returns (P, s, Q^T, S^+); `s**2` tails are the truncation losses ||(W - W_r) X^T||_F^2."""
    root, pinv = _eig_root(gram)
    p, s, qh = torch.linalg.svd(w.double() @ root, full_matrices=False)
    return p, s, qh, pinv


def whitened_spectrum(w: Tensor, gram: Tensor) -> Tensor:
    """The `s` of `stable_whitened_svd` alone (singular values only: no factors held)."""
    return torch.linalg.svdvals(w.double() @ _eig_root(gram)[0])


def stable_truncate(svd: tuple[Tensor, Tensor, Tensor, Tensor], r: int) -> tuple[Tensor, Tensor]:
    """Rank-r factors from `stable_whitened_svd`: B = P_r sqrt(s_r), A = sqrt(s_r) Q_r^T S^+."""
    p, s, qh, pinv = svd
    b, a = _split(p, s, qh, r)
    return b, a @ pinv
