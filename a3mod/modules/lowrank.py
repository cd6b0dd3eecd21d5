"""LowRankLinear: a linear layer stored as two factors, y = out_proj(in_proj(x)) (the SVD baselines)."""
from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """(out x in) weight as B (out x r) @ A (r x in): `in_proj` holds A (no bias), `out_proj` holds B and the bias."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool, device=None, dtype=None):
        super().__init__()
        if not 1 <= rank:
            raise ValueError(f"rank must be >= 1, got {rank}")
        kw = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(in_features, rank, bias=False, **kw)
        self.out_proj = nn.Linear(rank, out_features, bias=bias, **kw)

    @property
    def in_features(self) -> int:
        return self.in_proj.in_features

    @property
    def out_features(self) -> int:
        return self.out_proj.out_features

    @property
    def rank(self) -> int:
        return self.in_proj.out_features

    @property
    def bias(self):
        return self.out_proj.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.in_proj(x))                       # (..., in) -> (..., r) -> (..., out)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> rank {self.rank} -> {self.out_features}, bias={self.bias is not None}"
