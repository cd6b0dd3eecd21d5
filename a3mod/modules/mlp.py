"""ReducedMLP: a (gated) MLP whose intermediate width is whatever its Linear children say."""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.activations import ACT2CLS, ACT2FN

from ..pipeline.plan import Part


def _activation(name: str, dtype) -> nn.Module:
    """ACT2FN[name]; an activation with learned parameters that takes a dtype (xIELU) gets the module's dtype (or
    the default one, as under from_pretrained's dtype context), not its class default."""

    cls = ACT2CLS.get(name)
    if isinstance(cls, type) and "dtype" in inspect.signature(cls.__init__).parameters:
        return cls(dtype=dtype or torch.get_default_dtype())
    return ACT2FN[name]


class ReducedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) when gated, else down(act(up(x))). `kept` lists the original neurons kept."""

    def __init__(self, hidden: int, inter: int, act: str, gated: bool, up_bias: bool, down_bias: bool,
                 orig_inter: int | None = None, dropout: float = 0.0, residual: bool = False, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden, inter, bias=up_bias, **kw) if gated else None
        self.up_proj = nn.Linear(hidden, inter, bias=up_bias, **kw)
        self.down_proj = nn.Linear(inter, hidden, bias=down_bias, **kw)
        self.act = act
        self.act_fn = _activation(act, dtype)
        self.orig_inter = orig_inter or inter
        self.dropout = dropout                       # on the output (GPT-2's resid_pdrop); train mode only
        self.kept: list[int] | None = None          # original neuron indices (None: all, in order)
        self.residual = residual                     # forward(x, residual) adds it (MPT's MLP owns that add)

    @property
    def inter(self) -> int:
        return self.up_proj.out_features

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        up = self.up_proj(x)
        h = self.act_fn(self.gate_proj(x)) * up if self.gate_proj is not None else self.act_fn(up)
        out = nn.functional.dropout(self.down_proj(h), self.dropout, self.training)
        return out + residual if residual is not None else out

    SIDECAR_KEY = "mlp"

    def plan_parts(self) -> list[Part]:
        """This module as a part of a layer plan: the intermediate width (full -> kept, which neurons)."""
        return [Part("mlp", self.orig_inter, self.inter, None if self.kept is None else tuple(self.kept))]

    def describe(self) -> dict:
        """The sidecar entry `a3mod.load` rebuilds this module from."""
        return dict(hidden=self.up_proj.in_features, inter=self.inter, orig_inter=self.orig_inter, act=self.act,
                    gated=self.gate_proj is not None, up_bias=self.up_proj.bias is not None,
                    down_bias=self.down_proj.bias is not None, dropout=self.dropout, kept=self.kept,
                    **({"residual": True} if self.residual else {}))

    def extra_repr(self) -> str:
        return f"intermediate {self.orig_inter} -> {self.inter}, act={self.act}, gated={self.gate_proj is not None}"
