"""NarrowLinear: a plain nn.Linear that stands in for a wider one of the original model.

Used where the linear lives outside any module a3mod replaces: the MLP of OPT (fc1/fc2 on the decoder
layer) and BERT (intermediate.dense / output.dense), and BERT's attention output projection
(attention.output.dense, after the self-attention module). The layer's own forward keeps running
(activation, dropout, residual, LayerNorm); only the widths change.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .configs import ConfigError, check_choices, spec


@dataclass(frozen=True)
class NarrowConfig:
    """A NarrowLinear: its dims, the original linear's, and the side its kept indices index (the narrowed one)."""
    in_features: int = spec(kind="int", lo=1)
    out_features: int = spec(kind="int", lo=1)
    bias: bool = spec(kind="bool")
    orig_in: int = spec(kind="int", lo=1)
    orig_out: int = spec(kind="int", lo=1)
    side: str | None = spec(None, kind="str", choices={"in", "out"})

    def __post_init__(self):
        for n, o in (("in_features", "orig_in"), ("out_features", "orig_out")):
            if getattr(self, n) > getattr(self, o):
                raise ConfigError(n, getattr(self, n), f"is wider than the original's {o} = {getattr(self, o)}")
        check_choices(self)
        if self.side is None:
            object.__setattr__(self, "side", narrowed_side(self.in_features, self.out_features, self.orig_in,
                                                           self.orig_out))


class NarrowLinear(nn.Linear):
    """nn.Linear (in_features, out_features) cut from an original (orig_in, orig_out) linear.

    kept: the original indices kept along the narrowed side (MLP neurons, ascending), or None when the
    narrow side is a new basis (A3OV's reduced value dims entering an output projection). cfg.side: "in" or "out",
    the side `kept` indexes: the narrowed one (`narrowed_side`), given explicitly where no side is narrower.
    """

    def __init__(self, cfg: NarrowConfig | None = None, kept: list[int] | None = None, *, device=None, dtype=None,
                 **fields):
        """`cfg` (or its fields as keywords) and the kept indices."""
        c = cfg if cfg is not None else NarrowConfig(**fields)
        super().__init__(c.in_features, c.out_features, bias=c.bias, device=device, dtype=dtype)
        self.cfg, side = c, c.side
        if kept is not None:
            n, bound = (c.out_features, c.orig_out) if side == "out" else (c.in_features, c.orig_in)
            if len(kept) != n or not all(0 <= k < bound for k in kept):
                raise ValueError(f"NarrowLinear kept must list {n} original {side}put indices in [0, {bound}), got "
                                 f"{len(kept)}: {kept[:8]!r}")
        self.orig_in, self.orig_out, self.kept, self.side = c.orig_in, c.orig_out, kept, side

    def narrow_info(self) -> dict:
        """What a quantized replacement must remember to be rebuilt (a3mod.save): original dims, kept indices."""
        return dict(orig_in=self.orig_in, orig_out=self.orig_out, kept=self.kept, side=self.side)

    def extra_repr(self) -> str:
        return (f"in_features {self.orig_in} -> {self.in_features}, out_features {self.orig_out} -> "
                f"{self.out_features}, bias={self.bias is not None}")


def narrowed_side(in_features: int, out_features: int, orig_in: int, orig_out: int) -> str:
    """The side a NarrowLinear cuts: the one narrower than the original ("out" when neither is: an MLP's up
    projection at full width)."""
    return "in" if in_features < orig_in and out_features == orig_out else "out"
