"""`spec_for(model)`: the adapter of a model type, else the spec graph discovery builds for it."""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .adapters import ARCHS, DISCOVERED_FACTS, supported_types
from .discover import discovered_spec
from .spec import ArchSpec


def spec_for(model: nn.Module) -> ArchSpec:
    """The adapter for `model`; a model type without one gets the spec graph discovery builds (`discover.py`),
    or a `DiscoveryError` (an `UnsupportedModelError`) listing the supported types and what discovery missed."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in ARCHS:         # no adapter: read the roles from the layer's computation graph

        with torch.device("cpu"):      # the probe runs on CPU even inside a meta-device context (from_pretrained)
            spec = discovered_spec(model, f"model_type {mtype!r} has no a3mod architecture adapter (supported: "
                                          f"{', '.join(supported_types())})")
        return replace(spec, **DISCOVERED_FACTS.get(mtype, {}))
    return _for_base_model(model, ARCHS[mtype])


def _for_base_model(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    """Paths in ARCHS start at the model with a head (e.g. "bert.encoder.layer"); a bare base model
    (BertModel, LlamaModel) has them without its `base_model_prefix`."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if getattr(model, "base_model", None) is not model or not spec.layers.startswith(prefix):
        return spec
    strip = lambda p: p[len(prefix):] if p and p.startswith(prefix) else p  # noqa: E731
    return replace(spec, layers=strip(spec.layers), rotary=strip(spec.rotary))
