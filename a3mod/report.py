"""Per-layer dims, parameters, FLOPs and KV-cache bytes of a (compressed) model.

Parameters counted: weights and biases of the linear layers inside the decoder layers (embeddings and
lm_head excluded), the quantity every a3mod ratio refers to.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .arch import dims_of, get_path, spec_for


def linear_param_count(module: nn.Module) -> int:
    """Weights + biases of the nn.Linear (and GPT-2 Conv1D) modules inside `module`."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            n += sum(p.numel() for p in m.parameters(recurse=False))
    return n


@dataclass
class LayerRow:
    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_dim: int
    vo_dim: int
    mlp_dim: int
    mlp_orig: int
    params: int
    params_orig: int
    kv_elems: int = 0        # elements cached per token (K + V, or the latents of a LatentKVAttention)
    kv_elems_orig: int = 0
    lowrank: int = 0         # linears stored as two low-rank factors (baselines)


@dataclass
class Report:
    model_type: str
    rows: list[LayerRow]
    dtype_bytes: int
    context: int

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def params_orig(self) -> int:
        return sum(r.params_orig for r in self.rows)

    @property
    def ratio(self) -> float:
        """Achieved fraction of decoder-layer linear parameters removed."""
        return 1.0 - self.params / self.params_orig

    def kv_bytes_per_token(self, orig: bool = False) -> int:
        return sum(r.kv_elems_orig if orig else r.kv_elems for r in self.rows) * self.dtype_bytes

    def flops_per_token(self, orig: bool = False) -> int:
        """Decoder-layer FLOPs for one token at `context` positions: 2 * linear params + attention scores/mix."""
        attn = sum(2 * r.heads * self.context * (2 * r.head_dim if orig else r.qk_dim + r.vo_dim) for r in self.rows)
        return 2 * (self.params_orig if orig else self.params) + attn

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "params": self.params, "params_orig": self.params_orig,
                "ratio": self.ratio, "kv_bytes_per_token": self.kv_bytes_per_token(),
                "kv_bytes_per_token_orig": self.kv_bytes_per_token(True), "flops_per_token": self.flops_per_token(),
                "flops_per_token_orig": self.flops_per_token(True), "context": self.context,
                "layers": [asdict(r) for r in self.rows]}

    def __str__(self) -> str:
        head = f"{'layer':>5} {'heads':>7} {'qk':>9} {'vo':>9} {'mlp':>11} {'kv/token':>11} {'low-rank':>8} {'params':>21}"
        lines = [f"a3mod report: {self.model_type}, decoder-layer linear parameters (embeddings/lm_head excluded)",
                 head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.layer:>5} {r.heads:>3}/{r.kv_heads:<3} {r.head_dim:>3}->{r.qk_dim:<4} "
                         f"{r.head_dim:>3}->{r.vo_dim:<4} {r.mlp_orig:>5}->{r.mlp_dim:<5} "
                         f"{r.kv_elems_orig:>5}->{r.kv_elems:<5} {r.lowrank:>8} "
                         f"{r.params_orig:>10,}->{r.params:<10,}")
        kv0, kv1 = self.kv_bytes_per_token(True), self.kv_bytes_per_token()
        f0, f1 = self.flops_per_token(True), self.flops_per_token()
        lines += ["-" * len(head),
                  f"params        {self.params_orig:,} -> {self.params:,}  (removed {100 * self.ratio:.4f}%)",
                  f"KV bytes/token {kv0:,} -> {kv1:,}  ({kv1 / kv0:.4f}x, {self.dtype_bytes}-byte elements)",
                  f"FLOPs/token   {f0:,} -> {f1:,}  ({f1 / f0:.4f}x at context {self.context})"]
        return "\n".join(lines)


def report(model: nn.Module, context: int = 2048) -> Report:
    """Describe every decoder layer of `model` (compressed by a3mod or not)."""
    from .arch import out_features
    from .modules import LatentKVAttention, LowRankLinear, ReducedHeadAttention, ReducedMLP

    spec = spec_for(model)
    d = dims_of(model.config, spec)
    orig = getattr(model, "a3mod_info", {}).get("orig_layer_params")
    rows = []
    for i, layer in enumerate(get_path(model, spec.layers)):
        attn, mlp = get_path(layer, spec.attn), get_path(layer, spec.mlp)
        qk, vo = (attn.qk_dim, attn.vo_dim) if isinstance(attn, ReducedHeadAttention) else (d.head_dim, d.head_dim)
        if isinstance(mlp, ReducedMLP):
            mi, mo = mlp.inter, mlp.orig_inter
        else:
            mi = mo = out_features(getattr(mlp, spec.up))
        kv0 = 2 * d.kv_heads * d.head_dim
        kv = attn.kv_elems_per_token if isinstance(attn, LatentKVAttention) else d.kv_heads * (qk + vo)
        lowrank = sum(isinstance(m, LowRankLinear) for m in layer.modules())
        n = linear_param_count(layer)
        rows.append(LayerRow(i, d.heads, d.kv_heads, d.head_dim, qk, vo, mi, mo, n, orig[i] if orig else n,
                             kv, kv0, lowrank))
    p = next(model.parameters())
    return Report(model.config.model_type, rows, p.element_size() if p.is_floating_point() else 2, context)
