"""The attention-weighted score Gram of a rotary attention (kind "qkgram", `A3QK(update=True)`): a pure tensor
function over one batch of pre-RoPE queries and keys (docs/method_extensions.md, "QK update";
`a3mod.math.qk_refit` for what it feeds)."""
from __future__ import annotations

import torch
from torch import Tensor

QUERY_STRIDE = 64      # every 64th query position is sampled (the last one first): 8 queries per 512-token window,
#                        each with all the keys it sees; on SmolLM2 at 20% the fit from 1 in 16 queries was 0.2% better


def score_gram(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, scaling: float, *, window: int | None = None,
               softcap: float | None = None, stride: int = QUERY_STRIDE) -> Tensor:
    """q (B,T,H,rot), k (B,T,Hkv,rot): the rotary dims of each head, pre-RoPE, in rotate_half layout (pair p = dims
    p and p + rot/2); cos, sin (B|1,T,rot) the rotation of every position in that layout (cat(freqs, freqs)).

    Returns (H, rot, rot) float64: over every `stride`-th query m (counted back from the last) and the keys n it
    sees (causal, within `window`), the sum of p_mn f~ f~^T, where f = [Re z_0, Im z_0, ...], z_p = Q_p(m)
    conj(K_p(n)), Q_p = (q_p + i q_{p+rot/2}) e^{i angle_p(m)} (so the score is scaling x the sum of Re z_p),
    p_mn the softmax of the scores (capped by `softcap` when given) and f~ = f - sum_n p_mn f."""
    b, t, h, rot = q.shape
    half, g = rot // 2, h // k.shape[2]
    turn = torch.complex(cos[..., :half].float(), sin[..., :half].float())[:, :, None]     # (B|1, T, 1, half)
    qc = torch.complex(q[..., :half].float(), q[..., half:].float()) * turn                 # (B, T, H, half)
    kc = (torch.complex(k[..., :half].float(), k[..., half:].float()) * turn).repeat_interleave(g, 2)
    out = torch.zeros(h, rot, rot, dtype=torch.float32, device=q.device)
    for i in range(b):
        for m in range(t - 1, -1, -stride):
            lo = 0 if window is None else max(0, m - window + 1)       # the keys query m sees: lo..m
            z = qc[i, m][None] * kc[i, lo:m + 1].conj()                # (n, H, half)
            f = torch.view_as_real(z).flatten(-2)                      # (n, H, rot)
            s = f[..., 0::2].sum(-1) * scaling
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            p = s.softmax(0)                                           # (n, H)
            x = ((f - (p[..., None] * f).sum(0)) * p.sqrt()[..., None]).transpose(0, 1)   # (H, n, rot)
            out += x.mT @ x
    return out.double()


def sampled(t: int, stride: int = QUERY_STRIDE, window: int | None = None, device=None) -> tuple[Tensor, Tensor]:
    """The query positions `score_gram` samples in a window of t tokens (every stride-th, counted back from the
    last), (Q,) long, and which keys each sees, (Q, t) bool (causal, within `window`)."""
    ms = torch.arange(t - 1, -1, -stride, device=device)
    keys = torch.arange(t, device=device)
    lo = ms - (t if window is None else window) + 1
    return ms, (keys[None] <= ms[:, None]) & (keys[None] >= lo[:, None])


def sampled_scores(q: Tensor, k: Tensor, scaling: float, *, window: int | None = None, softcap: float | None = None,
                   stride: int = QUERY_STRIDE) -> tuple[Tensor, Tensor]:
    """The scores of the sampled queries (`sampled`) over every key and their softmax: q (B,T,H,r), k (B,T,Hkv,r)
    already rotated (any layout, the same for both). Returns (s, p), each (B, H, Q, T) float32: s the scaled dot
    products before any softcap (0 at keys a query does not see), p the attention (capped by `softcap`; 0 there)."""
    t, g = q.shape[1], q.shape[2] // k.shape[2]
    ms, seen = sampled(t, stride, window, q.device)
    kk = k.float().repeat_interleave(g, 2).permute(0, 2, 3, 1)                                 # (B, H, r, T)
    s = (q[:, ms].float().transpose(1, 2) @ kk) * scaling                                   # (B, H, Q, T)
    capped = s if softcap is None else torch.tanh(s / softcap) * softcap
    p = capped.masked_fill(~seen, float("-inf")).softmax(-1)
    return s.masked_fill(~seen, 0.0), p


def refit_sums(q: Tensor, k: Tensor, s: Tensor, p: Tensor, scaling: float,
               stride: int = QUERY_STRIDE) -> tuple[Tensor, Tensor, Tensor]:
    """The least-squares sums of the query gains of a reduced rotary head toward target scores: q (B,T,H,r),
    k (B,T,Hkv,r) the reduced head's rotated queries and keys in rotate_half layout (pair j = dims j, j + r/2), s and
    p (B,H,Q,T) the target scores and attention of the sampled queries (`sampled_scores`; p 0 where a key is not
    seen). With f = scaling [Re z_0, Im z_0, ...], z_j = Q_j conj(K_j), and f~, s~ centred under p per query, returns
    float64 (A (H, r, r), b (H, r), c (H,)) = the sums of p f~ f~^T, p f~ s~, p s~^2 (`qk_refit.theta_error`)."""
    bsz, t, h, r = q.shape
    half, g = r // 2, h // k.shape[2]
    ms, _ = sampled(t, stride, None, q.device)
    qc = torch.complex(q[:, ms, :, :half].float(), q[:, ms, :, half:].float())            # (B, Q, H, half)
    kc = torch.complex(k[..., :half].float(), k[..., half:].float()).repeat_interleave(g, 2).conj()
    a = torch.zeros(h, r, r, dtype=torch.float64, device=q.device)
    b = torch.zeros(h, r, dtype=torch.float64, device=q.device)
    c = torch.zeros(h, dtype=torch.float64, device=q.device)
    for i in range(bsz):
        for j in range(len(ms)):
            w = p[i, :, j].float().T                                                       # (T, H)
            n = int(w.sum(1).nonzero().max()) + 1                                          # keys up to the last seen
            w = w[:n]
            f = torch.view_as_real(qc[i, j][None] * kc[i, :n]).flatten(-2) * scaling      # (n, H, r)
            f = f - (w[..., None] * f).sum(0)
            st = s[i, :, j, :n].float().T                                                  # (n, H)
            st = st - (w * st).sum(0)
            x = (f * w.sqrt()[..., None]).transpose(0, 1)                                  # (H, n, r)
            a += (x.mT @ x).double()
            b += (w[..., None] * f * st[..., None]).sum(0).double()
            c += (w * st.square()).sum(0).double()
    return a, b, c
