"""Architecture knowledge: where the layers, projections and norms of each model type live.

    spec.py      ArchSpec (one family's layout as data), Dims, path and weight helpers  (the leaf)
    adapters.py  ARCHS: the adapter table of known families
    lookup.py    spec_for(model): adapter, else graph discovery
    views.py     LayerView / layer_views: a decoder layer's weights by role
    discover/    graph discovery for model types without an adapter

Only this package knows module names of Hugging Face families; everything else works on `LayerView`s.
"""
from .adapters import ARCHS, supported_types
from .lookup import spec_for
from .spec import (
    ArchSpec,
    Dims,
    dims_of,
    get_path,
    is_linear,
    linear_params,
    out_features,
    partial_rotary_factor,
    set_child,
)
from .views import LayerView, active, find_path, join, layer_views, mlp_paths, shared_groups

__all__ = ["ARCHS", "ArchSpec", "Dims", "LayerView", "active", "dims_of", "find_path", "get_path", "is_linear",
           "join", "layer_views", "linear_params", "mlp_paths", "out_features", "partial_rotary_factor", "set_child",
           "shared_groups", "spec_for", "supported_types"]
