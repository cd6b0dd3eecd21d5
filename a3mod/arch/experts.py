"""Routed experts stored as fused 3-D parameters: how to read them, compute one expert's intermediate activations,
and keep a subset of every expert's neurons, without a copy of any family's forward.

transformers 5 keeps the routed experts of a mixture-of-experts block in one module whose parameters hold every
expert at once (`@use_experts_implementation`): `gate_up_proj` (E, 2I, d_m) (or `up_proj` (E, I, d_m) without a
gate), `down_proj` (E, d_m, I), optional biases `*_bias`, and flags saying the layout: `is_transposed` (weights
stored (E, in, out)), `is_concatenated` ([gate | up] halves, else gate and up interleaved channel by channel, as
gpt-oss), `has_gate`, `has_bias`. Its forward takes (hidden (T, d_m), top_k_index (T, k), top_k_weights (T, k))
and scales each expert's output by the token's combine weight *after* the down projection. Llama 4's
`Llama4TextExperts` instead takes every expert's input already scaled by its router score, (E * T, d_m), with
transposed, concatenated weights. Both are read here (`ExpertsView`), nothing else.

Keeping neurons (`narrowed`): every expert keeps the same number k of its I neurons (the 3-D layout needs one
width), chosen per expert; the module keeps its class and forward (every experts implementation of transformers
still runs it), with narrower parameters and its intermediate-size attributes set to k. Shapes: E experts,
I intermediate width, d_m hidden.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .spec import module_copy

_WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size")


def is_experts(mod: nn.Module) -> bool:
    """A module holding routed experts as fused 3-D parameters (see the module docstring)."""
    p = mod._parameters
    up = p.get("gate_up_proj", p.get("up_proj"))
    down = p.get("down_proj")
    return up is not None and down is not None and up.dim() == 3 and down.dim() == 3 and up.shape[0] == down.shape[0]


class ExpertsView:
    """One experts module read through its layout flags. `scaled_inputs`: the Llama 4 form (inputs pre-scaled by the
    router, every expert fed every token), else the `use_experts_implementation` form (weights after down)."""

    def __init__(self, mod: nn.Module, hidden: int):
        if not is_experts(mod):
            raise UnsupportedModelError(f"{type(mod).__name__} does not hold experts as 3-D gate_up/up and down "
                                        "parameters")
        self.mod = mod
        self.gated = "gate_up_proj" in mod._parameters
        self.contract = hasattr(mod, "is_transposed") and hasattr(mod, "has_gate")
        if self.contract:
            self.transposed, self.concatenated = bool(mod.is_transposed), bool(getattr(mod, "is_concatenated", True))
            self.bias = bool(getattr(mod, "has_bias", False))
            if bool(getattr(mod, "has_post_expert_norm", False)):
                raise UnsupportedModelError(f"{type(mod).__name__}: a norm after each expert's down projection "
                                            "(has_post_expert_norm): the neuron scores assume the expert output is "
                                            "linear in its neurons")
        else:
            params = [p for p in inspect.signature(mod.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            self.transposed = _stored_in_out(mod, hidden)       # (E, I, d_m): stored (in, out); None: unknown
            if len(params) != 1 or self.transposed is None:
                raise UnsupportedModelError(f"{type(mod).__name__}: experts without transformers' experts flags "
                                            "(is_transposed, has_gate) whose forward is not f(pre-scaled inputs) "
                                            "with an unambiguous weight layout")
            self.concatenated, self.bias = True, False
        self.scaled_inputs = not self.contract
        down = mod._parameters["down_proj"]
        self.num = down.shape[0]
        self.inter = down.shape[1] if self.transposed else down.shape[2]
        self.hidden = hidden

    # ------------------------------------------------------------------------------------- weights
    def _w(self, name: str) -> torch.Tensor:
        """(E, out, in) view of a weight, whatever the stored layout."""
        w = self.mod._parameters[name]
        return w.transpose(1, 2) if self.transposed else w

    def up_rows(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Expert e's gate rows (I, d_m) (None without a gate) and up rows (I, d_m)."""
        if not self.gated:
            return None, self._w("up_proj")[e]
        w = self._w("gate_up_proj")[e]                                   # (2I, d_m)
        return (w[: self.inter], w[self.inter:]) if self.concatenated else (w[0::2], w[1::2])

    def down_cols(self) -> torch.Tensor:
        """Every expert's down projection as (E, d_m, I)."""
        return self._w("down_proj")

    # ------------------------------------------------------------------------------------- compute
    def routed(self, args: tuple, kwargs: dict) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """From one call's arguments: per expert hit, (e, its inputs (t, d_m), the weight scaling its output (t,),
        ones for pre-scaled inputs). Tokens routed to no expert of this module are not listed."""
        bound = inspect.signature(self.mod.forward).bind(*args, **kwargs).arguments
        vals = list(bound.values())
        x = vals[0]
        out = []
        if self.scaled_inputs:                 # (E * T, d_m): a token not routed to e reaches it scaled to zero
            xs = x.reshape(self.num, -1, x.shape[-1])
            for e in range(self.num):
                rows = xs[e][xs[e].abs().amax(-1) > 0]
                if rows.shape[0]:
                    out.append((e, rows, torch.ones(rows.shape[0], dtype=x.dtype, device=x.device)))
            return out
        idx, w = vals[1], vals[2]              # (T, k) expert ids and combine weights
        x = x.reshape(-1, x.shape[-1])
        for e in idx.unique().tolist():
            if not 0 <= e < self.num:          # expert-parallel sentinels
                continue
            hit = idx == e
            tok = hit.any(-1)
            out.append((e, x[tok], (w * hit).sum(-1)[tok]))
        return out

    def hidden_states(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's intermediate activations (T, I) for inputs x (T, d_m): the module's own gate (`_apply_gate`,
        gpt-oss's clamped SwiGLU included) or activation."""
        m = self.mod
        name = "gate_up_proj" if self.gated else "up_proj"
        w = m._parameters[name][e]
        proj = x @ w if self.transposed else x @ w.t()
        if self.bias:
            proj = proj + m._parameters[f"{name}_bias"][e]
        if not self.gated:
            return m.act_fn(proj)
        if self.contract:
            return m._apply_gate(proj)
        gate, up = proj.chunk(2, dim=-1)                                 # Llama 4: up * act(gate)
        return up * m.act_fn(gate)

    # ------------------------------------------------------------------------------------- narrow
    def channels(self, idx: torch.Tensor) -> torch.Tensor:
        """Output channels of the fused gate/up projection that hold kept neurons idx (E, k): (E, 2k) or (E, k)."""
        if not self.gated:
            return idx
        if self.concatenated:
            return torch.cat([idx, idx + self.inter], -1)
        return torch.stack([2 * idx, 2 * idx + 1], -1).flatten(-2)


def _stored_in_out(mod: nn.Module, hidden: int) -> bool | None:
    """Whether flag-less experts store their projections (in, out): down_proj (E, I, d_m). Where down_proj is square
    (I == d_m: e.g. narrowed to d_m neurons), the fused gate/up projection tells ((E, d_m, 2I) against (E, 2I, d_m));
    None where nothing does."""
    down = mod._parameters["down_proj"]
    if down.shape[1] != down.shape[2]:
        return down.shape[2] == hidden
    up = mod._parameters.get("gate_up_proj")
    if up is None or up.shape[1] == up.shape[2]:
        return None
    return up.shape[1] == hidden


def narrowed(mod: nn.Module, hidden: int, idx: torch.Tensor, fallback: list[int] | None = None,
             down: torch.Tensor | None = None) -> nn.Module:
    """A copy of experts module `mod` keeping neurons idx (E, k) of every expert (same class, same forward, the same
    k for each), parameters new tensors, its other attributes shared. Works on meta tensors (`a3mod.load`).
    `fallback`: the experts whose neurons were chosen from their weights alone (recorded for the report).
    `down`: (E, d_m, k) new down-projection columns of the kept neurons (a least-squares update), else sliced."""
    v = ExpertsView(mod, hidden)
    if idx.dim() != 2 or idx.shape[0] != v.num:
        raise ValueError(f"kept neurons must be (experts={v.num}, k), got {tuple(idx.shape)}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= v.inter):
        raise ValueError(f"kept neurons outside [0, {v.inter})")
    new = module_copy(mod)
    k = idx.shape[1]
    up_name = "gate_up_proj" if v.gated else "up_proj"
    ch = v.channels(idx).to(mod._parameters[up_name].device)
    out_dim = 2 if v.transposed else 1                                  # where a projection's output channels are
    in_dim = 1 if v.transposed else 2
    with torch.no_grad():
        w = mod._parameters[up_name]
        new._parameters[up_name] = nn.Parameter(_take(w, ch, out_dim), w.requires_grad)
        if v.bias:
            b = mod._parameters[f"{up_name}_bias"]
            new._parameters[f"{up_name}_bias"] = nn.Parameter(b.gather(1, ch) if not b.is_meta else
                                                              b.new_empty(b.shape[0], ch.shape[1]), b.requires_grad)
        d = mod._parameters["down_proj"]
        kept = (_take(d, idx.to(d.device), in_dim) if down is None else
                (down.transpose(1, 2) if v.transposed else down).to(device=d.device, dtype=d.dtype).contiguous())
        new._parameters["down_proj"] = nn.Parameter(kept, d.requires_grad)
    for a in _WIDTH_ATTRS:
        if getattr(mod, a, None) == v.inter:
            setattr(new, a, k)
    new.a3mod_experts = {"orig_inter": v.inter, "kept": idx.tolist(), "fallback": list(fallback or [])}
    return new


def _take(w: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """w (E, a, b) with, per expert e, the entries idx[e] along `dim` (1 or 2), contiguous."""
    shape = list(w.shape)
    shape[dim] = idx.shape[1]
    if w.is_meta:
        return w.new_empty(shape)
    index = idx[:, :, None].expand(-1, -1, w.shape[2]) if dim == 1 else idx[:, None, :].expand(-1, w.shape[1], -1)
    return w.gather(dim, index).contiguous()


def kept_width(mod: nn.Module, hidden: int) -> tuple[int, int]:
    """(original, current) intermediate width of every expert of `mod`."""
    v = ExpertsView(mod, hidden)
    info = getattr(mod, "a3mod_experts", None)
    return (info["orig_inter"] if info else v.inter), v.inter
