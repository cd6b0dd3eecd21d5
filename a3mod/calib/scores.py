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
