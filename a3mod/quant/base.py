"""The quantization handler registry and the model-level steps `a3mod.apply` runs for a quantization pass.

One `QuantHandler` per config type: `quantize` turns one nn.Linear into the library's quantized module,
`restore` rebuilds that module from its saved tensors (a3mod.load), `check` names a layer shape the
library cannot take (checked for every layer before the model is touched).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import LayerView
from ..modules.linears import is_quantized, linear_shape, quantized_linears  # noqa: F401  (re-exported)
from ..passes.base import handler
from .configs import QuantizationError

QUANT_HANDLERS: dict[type, "QuantHandler"] = {}


@dataclass(frozen=True)
class QuantHandler:
    library: str                                                   # import name (installed by a3mod[quant])
    quantize: Callable[[Any, nn.Linear], nn.Module]                # (cfg, linear) -> quantized module
    restore: Callable[..., nn.Module]                              # (cfg, state, in_features=, out_features=,
                                                                   #   bias=, device=, dtype=) -> module
    check: Callable[[Any, int, int], str | None] = lambda cfg, in_f, out_f: None   # problem with a shape, or None


def register_quant(cls, backend: QuantHandler) -> None:
    """Register a quantization config: its backend (library, quantize, restore, check) and, in the pass registry,
    a linear-scope handler that quantizes ctx.linear."""
    QUANT_HANDLERS[cls] = backend
    handler(cls, scope="linear")(lambda cfg, ctx: backend.quantize(cfg, ctx.linear))


def handler_for(cfg) -> QuantHandler:
    """The handler of `cfg`, after checking its library imports."""
    h = QUANT_HANDLERS[type(cfg)]
    try:
        importlib.import_module(h.library)
    except ImportError as e:
        raise QuantizationError(f"{type(cfg).__name__} needs the {h.library!r} package ({e}); "
                                "install it with pip install 'a3mod[quant]'") from e
    return h


# ------------------------------------------------------------------------------------------ modules

def is_plain_linear(m: nn.Module) -> bool:
    """An nn.Linear or GPT-2 Conv1D that is not quantized."""
    return (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D") and not is_quantized(m)


def as_linear(m: nn.Module) -> nn.Linear:
    """`m` itself for an nn.Linear; for a GPT-2 Conv1D (weight (in, out)) an equivalent nn.Linear (weight copied)."""
    if type(m).__name__ != "Conv1D":
        return m
    w = m.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
    return lin.train(m.training)




def split_quant(passes) -> tuple[list, Any]:
    """(compression passes, the quantization pass or None); it must come last, at most one."""
    passes = list(passes)
    names = [type(p).__name__ for p in passes]
    idx = [i for i, p in enumerate(passes) if type(p) in QUANT_HANDLERS]
    if len(idx) > 1:
        known = ", ".join(sorted(t.__name__ for t in QUANT_HANDLERS))
        raise QuantizationError(f"at most one quantization pass ({known})"
                                f" per apply, got {names}")
    if idx and idx[0] != len(passes) - 1:
        raise QuantizationError(f"the quantization pass {names[idx[0]]} must come last (compression first, then "
                                f"quantization), got {names}")
    return (passes[:-1], passes[-1]) if idx else (passes, None)


def _targets(views: list[LayerView], swaps: list) -> list[tuple[int, str, nn.Module]]:
    """(layer, path, module) of every linear the layers will hold once `swaps` are made."""
    out = []
    for v in views:
        if v.left:                      # a hybrid's linear-attention / SSM layers stay as they are
            continue
        new = [(path, mod) for i, path, mod in swaps if i == v.index]
        gone = tuple(p for p, _ in new)
        mods = [(p, m) for p, m in v.layer.named_modules()
                if not any(p == g or p.startswith(g + ".") for g in gone)]
        mods += [(f"{path}.{n}" if n else path, m) for path, mod in new for n, m in mod.named_modules()]
        if v.mixer:                     # a hybrid's mixer stays as it is; its MLP is quantized like any other
            keep = [x for x in (v.mlp_path, v.experts_path) if x]
            mods = [(p, m) for p, m in mods if any(p == k or p.startswith(k + ".") for k in keep)]
        for p, m in mods:
            if is_quantized(m):
                raise QuantizationError(f"layer {v.index} {p} is already quantized ({type(m).__name__}); quantize "
                                        "the unquantized model (compression passes first, then one quantization pass)")
            if is_plain_linear(m):
                out.append((v.index, p, m))
    return out


def quant_swaps(cfg, views: list[LayerView], swaps: list, progress: bool = True) -> list:
    """(layer, path, quantized module) for every decoder-layer linear, after `swaps`; the model is not touched."""
    h = handler_for(cfg)
    targets = _targets(views, swaps)
    for i, p, m in targets:
        in_f, out_f = linear_shape(m)
        problem = h.check(cfg, in_f, out_f)
        if problem:
            raise QuantizationError(f"{cfg}: layer {i} {p} (weight {out_f} x {in_f}): {problem}")
    out, made = [], {}          # a linear several layers share (one module, or tied weights) is quantized once
    with torch.no_grad():
        for i, p, m in tqdm(targets, desc="quantizing", disable=not progress, unit="linear"):
            key = (id(getattr(m, "weight", m)), id(getattr(m, "bias", None)))
            if key in made:
                out.append((i, p, made[key]))
                continue
            q = made[key] = h.quantize(cfg, as_linear(m))
            q.train(m.training)
            q.a3mod_quant = cfg
            if hasattr(m, "narrow_info"):        # a NarrowLinear (OPT/BERT MLP, BERT o): remembered for save/load
                q.a3mod_narrow = m.narrow_info()
            out.append((i, p, q))
    return out
