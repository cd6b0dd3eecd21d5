"""Self-verification of an architecture description: no model is compressed on a description that does not
reproduce the original at full rank.

Before a pass runs, `verify_model` rewrites one layer of each distinct structure with the compact modules built
from its description (adapter or graph discovery) with nothing removed, runs it on the inputs that layer
receives from a short probe, and compares its output with the original layer's. The attention is swapped in
first on its own, then the MLP as well, so a mismatch names the part whose description is wrong, with the facts
a3mod read for it (q/k/v layout, RoPE layout and rotary dims, scale, softcap, q/k norm, activation, gating).
The tolerance is round-off of the model's dtype; the error is relative to what the layer adds to its input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch import LayerView, get_path, set_child
from ..arch.capture import layer_inputs, probe_ids
from ..errors import DiscoveryError
from .rewrite import LayerWork

_NOT_STRUCTURE = ("layer_idx", "layer_id", "layer_number", "idx", "layer_index")


@dataclass(frozen=True)
class Check:
    """One verified layer: its index, the layers sharing its structure, and the relative errors found."""

    index: int
    same: tuple[int, ...]
    attn_error: float
    layer_error: float
    tol: float


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed for round-off: 1e-4 in fp32/fp64, 64 ulps in half precision."""
    return max(1e-4, 64 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4


def structure_key(layer: nn.Module) -> tuple:
    """Layers with equal keys compute the same function of their weights: the same module classes, parameter
    shapes and scalar settings (sliding window, attention type, ...; the layer's own index excluded)."""
    mods, attrs = [], []
    for name, m in layer.named_modules():
        mods.append((name, type(m).__name__, tuple((n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False))))
        for k, v in vars(m).items():
            if not k.startswith("_") and k != "training" and k not in _NOT_STRUCTURE and (
                    v is None or isinstance(v, (bool, int, float, str))):
                attrs.append((name, k, v))
    return type(layer), tuple(mods), tuple(attrs)


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _layer_text(view: LayerView) -> tuple[str, str]:
    """What a3mod read about the attention and the MLP of `view`, for the error message."""
    s, d = view.spec, view.dims
    qkv = f"fused {s.qkv} ({s.qkv_layout})" if s.qkv else f"{s.q}/{s.k}/{s.v}"
    rope = f"RoPE {d.rope} over {d.rot_dim} of {d.head_dim} dims" if d.rot_dim else "no RoPE"
    attn = (f"{qkv} -> {s.o}; {d.heads} heads, {d.kv_heads} KV heads, head dim {d.head_dim}; {rope}; scale "
            f"{view.scaling():g}" + (f"; softcap {view.softcap():g}" if s.softcap else "")
            + (f"; q/k norm over {'each head' if s.qk_norm == 'head' else 'the projection'}" if s.qk_norm else "")
            + (f"; output gate from {s.attn_gate}" if s.attn_gate else ""))
    gate = f"gate {s.gate_up or s.gate} (gated)" if (s.gate or s.gate_up) else "not gated"
    act = repr(s.act_name) if s.act_name else f"config.{s.act}"
    mlp = f"up {s.up}, {gate}, down {s.down}, activation {act}"
    return attn, mlp


def _unused(view: LayerView, mlp: bool) -> list[str]:
    """Parameters of the attention (or MLP) module that the description does not use: often the feature missed
    (attention sinks, a norm on the attention output, a learned scale)."""
    s = view.spec
    if mlp and (not s.mlp or view.mlp is None):
        return []
    root = view.mlp if mlp else view.attn
    used = [s.gate, s.up, s.down, s.gate_up, s.mlp_adapters] if mlp else [
        s.q, s.k, s.v, s.qkv, None if s.o_from_layer else s.o, *(s.qk_norm_names if s.qk_norm else ()), s.sinks,
        s.attn_gate if s.attn_gate != "q" else None, s.attn_gate_bias]
    used = [u for u in used if u]
    return [n for n, _ in root.named_parameters() if not any(n == u or n.startswith(u + ".") for u in used)]


@torch.no_grad()
def check_layer(model: nn.Module, view: LayerView, args: tuple, kwargs: dict, same=()) -> Check:
    """Full-rank rewrite of `view`'s layer vs the original on (args, kwargs); DiscoveryError when they differ."""
    layer = view.layer
    was = layer.training
    layer.eval()
    w = view.anchor()
    dtype, device = w.dtype, w.device
    x = args[0] if args else kwargs.get("hidden_states")
    ref = _hidden(layer(*args, **kwargs))
    scale = float((ref - x).norm()) if x is not None and x.shape == ref.shape else float(ref.norm())
    scale = max(scale, 1e-30)
    tol = tolerance(dtype)
    work = LayerWork.from_view(view)
    errs = []
    try:
        for mlp in (False, True):
            swaps = work.build(model.config, dtype, device, mlp=mlp)
            old = [(path, get_path(layer, path)) for path, _ in swaps]
            try:
                for path, new in swaps:
                    set_child(layer, path, new.eval())
                try:
                    err = float((_hidden(layer(*args, **kwargs)) - ref).norm()) / scale
                except Exception as e:       # the layer calls its attention / MLP in a way the modules do not take
                    raise DiscoveryError(
                        f"layer {view.index} ({type(layer).__name__}): the layer cannot run a3mod's rewrite of "
                        f"{'the MLP' if mlp else 'the attention'} ({type(e).__name__}: {str(e)[:200]}); it calls "
                        f"that part in a way a3mod's modules do not support. Nothing was compressed") from e
            finally:
                for path, mod in old:
                    set_child(layer, path, mod)
            errs.append(err)
            if not err <= tol:          # NaN fails too
                attn, mlp_text = _layer_text(view)
                part = "the MLP" if mlp else "the attention"
                facts = mlp_text if mlp else attn
                unused = _unused(view, mlp)
                if unused:
                    facts += f"; parameters it does not use: {', '.join(unused[:6])}"
                raise DiscoveryError(
                    f"layer {view.index} ({type(layer).__name__}{', like layers ' + str(list(same)) if same else ''}):"
                    f" a3mod's full-rank rewrite of {part} does not reproduce the original (relative error "
                    f"{err:.2e} > {tol:.0e}), so a role or feature of it is not what a3mod read: {facts}. Nothing "
                    f"was compressed; this model type needs an adapter or a feature a3mod does not model yet")
    finally:
        layer.train(was)
    return Check(view.index, tuple(same), errs[0], errs[1], tol)


def view_key(v: LayerView) -> tuple:
    """What makes two layers' rewrites differ: the module structure and the facts a3mod reads per layer (RoPE dims
    (NoPE layers), mixer or attention, gate, q/k norms, sinks), so a layer whose facts differ is checked on its own."""
    return (structure_key(v.layer), v.dims.rot_dim, v.dims.head_dim, bool(v.mixer), v.qk_norm, v.has_sinks,
            v.temperature() is not None if v.attn is not None else None)


@torch.no_grad()
def verify_model(model: nn.Module, views: list[LayerView], seq_len: int = 12) -> list[Check]:
    """Check one layer of every distinct structure (`structure_key`) on a probe of `seq_len` tokens; the
    forward pass stops once the last of them has its inputs. Returns the checks; raises DiscoveryError."""
    groups: dict[tuple, list[int]] = {}
    for v in views:
        if not v.left:
            groups.setdefault(view_key(v), []).append(v.index)
    reps = {g[0]: tuple(g[1:]) for g in groups.values()}
    layers = [v.layer for v in views]
    was = model.training
    try:
        model.eval()
        calls = layer_inputs(model, layers, probe_ids(model, seq_len), wanted=reps)   # discovery's probe
    finally:
        model.train(was)
    missing = [i for i in reps if i not in calls]
    if missing:
        raise DiscoveryError(f"layers {missing} were not called by a forward pass on input_ids; a3mod cannot verify "
                             "its description of them")
    return [check_layer(model, views[i], *calls[i], same=reps[i]) for i in sorted(reps)]
