"""ReducedMLP: a (gated) MLP whose intermediate width is whatever its Linear children say."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2CLS, ACT2FN

from .configs import Part
from .configs import ConfigError, check_choices, spec, to_entry


def _activation(name: str, dtype) -> nn.Module:
    """ACT2FN[name]; an activation with learned parameters that takes a dtype (xIELU) gets the module's dtype (or
    the default one, as under from_pretrained's dtype context), not its class default."""

    cls = ACT2CLS.get(name)
    if isinstance(cls, type) and "dtype" in inspect.signature(cls.__init__).parameters:
        return cls(dtype=dtype or torch.get_default_dtype())
    return ACT2FN[name]


@dataclass(frozen=True)
class MLPConfig:
    """A ReducedMLP: widths (hidden, original and kept intermediate), activation, gating, biases. Which neurons it
    kept is the module's `kept` (provenance; None when unknown)."""
    hidden: int = spec(kind="int", lo=1)
    orig_inter: int = spec(kind="int", lo=1)
    inter: int = spec(kind="int", lo=1, le="orig_inter")
    act: str = spec(kind="str", choices=set(ACT2FN))
    gated: bool = spec(kind="bool")
    up_bias: bool = spec(kind="bool")
    down_bias: bool = spec(kind="bool")
    dropout: float = spec(0.0, kind="float", lo=0.0, hi=1.0)
    residual: bool = spec(False, kind="bool", omit_default=True, only=True, doc="the MLP adds the residual")

    def __post_init__(self):
        if self.inter > self.orig_inter:
            raise ConfigError("inter", self.inter, f"is wider than orig_inter = {self.orig_inter}")
        check_choices(self)


class ReducedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) when gated, else down(act(up(x))). `kept` lists the original neurons kept."""

    def __init__(self, cfg: MLPConfig | None = None, *, device=None, dtype=None, **fields):
        """`cfg` (or its fields as keywords)."""
        super().__init__()
        c = self.cfg = cfg if cfg is not None else MLPConfig(**fields)
        kw = dict(device=device, dtype=dtype)
        self.gate_proj = nn.Linear(c.hidden, c.inter, bias=c.up_bias, **kw) if c.gated else None
        self.up_proj = nn.Linear(c.hidden, c.inter, bias=c.up_bias, **kw)
        self.down_proj = nn.Linear(c.inter, c.hidden, bias=c.down_bias, **kw)
        self.act = c.act
        self.act_fn = _activation(c.act, dtype)
        self.orig_inter = c.orig_inter
        self.dropout = c.dropout                     # on the output (GPT-2's resid_pdrop); train mode only
        self.kept: list[int] | None = None          # original neuron indices (None: all, in order)
        self.residual = c.residual                   # forward(x, residual) adds it (MPT's MLP owns that add)

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
        return {**to_entry(self.cfg), "kept": self.kept}

    def extra_repr(self) -> str:
        return f"intermediate {self.orig_inter} -> {self.inter}, act={self.act}, gated={self.gate_proj is not None}"
