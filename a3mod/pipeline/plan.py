"""Components and layer plans: what a decoder layer is made of, in one place.

A `Component` is one reducible part of a layer: QK (the query/key head dim), OV (the value/output head dim) and
MLP (the intermediate width). It owns its granule (the step kept dims move by: a RoPE pair, an even head dim, a
multiple of 8 neurons), the rounding rule from a ratio to a kept dim (`kept_dim`, the only one in a3mod), and the
parameters and KV-cache elements one kept dim costs.

A `LayerPlan` says, per component, the full and kept dims of one layer (and which original units were kept).
Compact modules describe themselves as parts of a plan (`plan_parts()`), so the report and Allocate read plans
instead of asking each module type in turn. Shapes: H query heads, Hkv KV heads, d_m hidden, d_h head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from ..arch import find_path, get_path, mlp_paths, out_features
from ..arch.experts import kept_width
from ..arch.mla import is_mla, mla_dims
from ..errors import RatioError
from ..modules.configs import Part


def kept_dim(name: str, full: int, ratio: float | None, rank: int | None, granule: int,
             multiple_of: int | None = None) -> int:
    """Dimension kept out of `full`: round((1-ratio)*full) to a multiple of `granule` (the structure's: RoPE
    pairs, ...) and of `multiple_of` (the user's), at least one granule and at most `full`; or `rank`."""
    if rank is not None:
        if rank > full:
            raise RatioError(f"{name}: rank={rank} exceeds the full dimension {full}")
        if rank % granule:
            raise RatioError(f"{name}: rank={rank} must be a multiple of {granule} here"
                             + (" (RoPE keeps whole pairs)" if granule == 2 else ""))
        return rank
    if multiple_of is not None:
        granule = math.lcm(granule, int(multiple_of))
        if granule > full and ratio > 0:
            raise RatioError(f"{name}: multiple_of={multiple_of} makes every kept dim a multiple of {granule}, more "
                             f"than the full dimension {full}: nothing could be removed; use a smaller multiple_of")
    r = int(round((1.0 - ratio) * full / granule)) * granule
    return min(full, max(granule, r))


@dataclass(frozen=True)
class Component:
    """One reducible part of a layer (see the module docstring)."""

    name: str                   # "qk", "ov", "mlp"
    pass_name: str              # the A3 pass that reduces it

    def granule(self, full: int, rope: bool, rank_given: bool = False) -> int:
        """Granularity of the kept dim: whole RoPE pairs for q/k under RoPE; even v/o heads (with a ratio) for
        even heads; multiples of 8 from 512 neurons on (with a ratio); multiples of 8 for routed experts (always:
        the fused experts kernels need it)."""
        if self.name == "qk":
            return 2 if rope else 1
        if self.name == "experts":   # transformers' grouped_mm kernels need 16-byte strides: 8 neurons (bf16)
            return 8 if full % 8 == 0 else 1
        if rank_given:
            return 1
        if self.name == "ov":
            return 2 if full % 2 == 0 else 1
        return 8 if full >= 512 else 1

    def kept(self, full: int, ratio: float | None, rank: int | None, rope: bool = False,
             multiple_of: int | None = None) -> int:
        """The kept dim for a ratio (or rank) request: the one rounding rule (`kept_dim`) at this granule."""
        return kept_dim(self.pass_name, full, ratio, rank, self.granule(full, rope, rank is not None), multiple_of)

    def dim_params(self, hidden: int, heads: int, kv_heads: int, biases: dict[str, bool], gated: bool = False,
                   experts: int = 1, attn_gate: bool = False) -> int:
        """Parameters one kept dim costs: a q/k head dim is a column of every query and key head (with biases); a
        v/o head dim a column of every value head and a row of every o head (and of the output gate, `attn_gate`);
        a neuron a row of up (and gate) and a column of down, in each of `experts` routed experts."""
        if self.name == "qk":
            return heads * (hidden + biases.get("q", False)) + kv_heads * (hidden + biases.get("k", False))
        if self.name == "ov":      # attn_gate: an output gate row of every query head too (Qwen3.5)
            return kv_heads * hidden + heads * hidden * (2 if attn_gate else 1)
        return experts * ((2 if gated else 1) * (hidden + biases.get("up", False)) + hidden)

    def kv_per_dim(self, kv_heads: int) -> int:
        """KV-cache elements per token one kept dim costs (K for q/k, V for v/o, none for the MLP)."""
        return kv_heads if self.name in ("qk", "ov") else 0


COMPONENTS: dict[str, Component] = {
    "qk": Component("qk", "A3QK"),
    "ov": Component("ov", "A3OV"),
    "mlp": Component("mlp", "A3MLP"),
    "experts": Component("experts", "A3Experts"),   # every routed expert's width
}


@dataclass(frozen=True)
class LayerPlan:
    """The kept dims of one layer, per component."""

    layer: int
    parts: dict[str, Part] = field(default_factory=dict)

    def kept(self, comp: str) -> int:
        return self.parts[comp].kept if comp in self.parts else 0

    def full(self, comp: str) -> int:
        return self.parts[comp].full if comp in self.parts else 0


def layer_plan(index: int, layer: nn.Module, spec, dims) -> LayerPlan:
    """The plan of decoder layer `layer` as it is now: every module in it that describes itself (`plan_parts()`:
    ReducedHeadAttention, ReducedMLP, a layer's narrowed up projection) overrides the original dims; an MoE layer's
    routed experts say their width (`arch.experts.kept_width`); an MoE layer without a shared expert has no "mlp"."""
    parts = {"qk": Part("qk", dims.head_dim, dims.head_dim), "ov": Part("ov", dims.head_dim, dims.head_dim)}
    mlp_path, experts_path = mlp_paths(layer, spec)
    mlp = None if mlp_path is None else find_path(layer, mlp_path)
    if mlp is not None and not hasattr(mlp, "plan_parts"):  # the original MLP, or narrowed linears on the layer
        up = get_path(mlp, spec.gate_up or spec.up)
        inter = out_features(up) // (2 if spec.gate_up else 1)
        orig = getattr(up, "orig_out", None) or getattr(up, "a3mod_narrow", {}).get("orig_out", inter)
        parts["mlp"] = Part("mlp", orig, inter)
    if experts_path is not None:
        full, kept = kept_width(get_path(layer, experts_path), dims.hidden)
        parts["experts"] = Part("experts", full, kept)
    attn = find_path(layer, spec.attn)      # None in a hybrid's mixer layer
    if is_mla(attn):               # latent attention narrowed in place: its own head dims
        (qf, qk), (vf, vk) = mla_dims(attn)
        parts["qk"], parts["ov"] = Part("qk", qf, qk), Part("ov", vf, vk)
    for mod in (attn, mlp):
        if hasattr(mod, "plan_parts"):
            parts.update({p.comp: p for p in mod.plan_parts()})
    return LayerPlan(index, parts)
