"""LowRankLinear: a linear layer stored as two factors, y = out_proj(in_proj(x)) (the SVD baselines)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .configs import ConfigError, spec, to_entry


@dataclass(frozen=True)
class LowRankConfig:
    """A LowRankLinear: the original linear's dims and the rank of its two factors."""
    in_features: int = spec(kind="int", lo=1)
    rank: int = spec(kind="int", lo=1)
    out_features: int = spec(kind="int", lo=1)
    bias: bool = spec(kind="bool")

    def __post_init__(self):
        if self.rank > min(self.in_features, self.out_features):
            raise ConfigError("rank", self.rank, f"exceeds min(in, out) = {min(self.in_features, self.out_features)}")


class LowRankLinear(nn.Module):
    """(out x in) weight as B (out x r) @ A (r x in): `in_proj` holds A (no bias), `out_proj` holds B and the bias."""

    def __init__(self, cfg: LowRankConfig | None = None, *, device=None, dtype=None, **fields):
        """`cfg` (or its fields as keywords)."""
        super().__init__()
        c = self.cfg = cfg if cfg is not None else LowRankConfig(**fields)
        kw = dict(device=device, dtype=dtype)
        self.in_proj = nn.Linear(c.in_features, c.rank, bias=False, **kw)
        self.out_proj = nn.Linear(c.rank, c.out_features, bias=c.bias, **kw)

    def describe(self) -> dict:
        """The description entry of this linear (its config)."""
        return to_entry(self.cfg)

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
