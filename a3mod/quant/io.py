"""Sidecar entries for quantized linears (a3mod.save) and rebuilding them from the saved tensors (a3mod.load).

Sidecar: top-level "quant" = {"config": pass dict, "compute_dtype": "float32"}; per layer "quantized" =
{path in layer: {"in_features", "out_features", "bias"}}. Their tensors are the quantized modules' own
state_dict entries under "<layers>.<i>.<path>.".
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch import get_path, set_child
from ..errors import A3ModError, CheckpointError
from ..passes.base import pass_from_dict, pass_to_dict
from .base import QUANT_HANDLERS, handler_for, linear_shape


def model_entry(model: nn.Module) -> dict | None:
    """{"config", "compute_dtype"} of a quantized model, or None."""
    cfgs = {m.a3mod_quant for m in model.modules() if getattr(m, "a3mod_quant", None) is not None}
    if not cfgs:
        return None
    if len(cfgs) > 1:
        raise A3ModError(f"model mixes quantization configs {sorted(map(repr, cfgs))}; a3mod saves one per model")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {"config": pass_to_dict(cfgs.pop()), "compute_dtype": str(dtype).removeprefix("torch.")}


def _config(side: dict):
    q = side.get("quant")
    try:
        cfg = pass_from_dict(q["config"])
        dtype = getattr(torch, q["compute_dtype"])
    except (A3ModError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"sidecar 'quant' entry {q!r} is not a quantization config + compute dtype: {e}") from e
    if type(cfg) not in QUANT_HANDLERS or not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"sidecar 'quant' entry {q!r}: {type(cfg).__name__} / {q['compute_dtype']!r} is not "
                              f"a quantization config ({', '.join(t.__name__ for t in QUANT_HANDLERS)}) and a dtype")
    return cfg, dtype


def restore(model: nn.Module, layers_path: str, side: dict, sd: dict, device, dtype) -> tuple[str, ...]:
    """Replace every linear the sidecar lists as quantized by the library module rebuilt from its tensors in `sd`
    (popped from it). Returns their state_dict prefixes."""
    entries = {int(i): e["quantized"] for i, e in side["layers"].items() if e.get("quantized")}
    if not entries:
        return ()
    if not side.get("quant"):
        raise CheckpointError("sidecar lists quantized linears but has no 'quant' config")
    cfg, saved_dtype = _config(side)
    h = handler_for(cfg)
    layers = get_path(model, layers_path)
    prefixes = []
    for i, lin in sorted(entries.items()):
        for path, dims in lin.items():
            prefix = f"{layers_path}.{i}.{path}."
            try:
                skeleton = get_path(layers[i], path)
                if tuple(linear_shape(skeleton)) != (dims["in_features"], dims["out_features"]):
                    raise ValueError(f"it is {tuple(linear_shape(skeleton))} (in, out) in the model, "
                                     f"the sidecar says {(dims['in_features'], dims['out_features'])}")
            except (AttributeError, IndexError, KeyError, ValueError) as e:
                raise CheckpointError(f"sidecar: quantized linear layer {i} {path!r} does not fit the model: "
                                      f"{e}") from e
            state = {k[len(prefix):]: sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}
            try:
                m = h.restore(cfg, state, in_features=dims["in_features"], out_features=dims["out_features"],
                              bias=bool(dims["bias"]), device=device, dtype=dtype or saved_dtype)
            except CheckpointError as e:
                raise CheckpointError(f"layer {i} {path}: {e}") from e
            m.a3mod_quant = cfg
            set_child(layers[i], path, m)
            prefixes.append(prefix)
    return tuple(prefixes)
