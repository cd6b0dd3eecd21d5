"""`a3mod.apply`: rewrite a model in place with compact modules computed by closed-form passes."""
from __future__ import annotations

from torch import Tensor, nn
from tqdm.auto import tqdm

from .arch import layer_views
from .calib import Stats, collect
from .errors import A3ModError, CalibrationError
from .modules import ReducedHeadAttention
from .passes import HANDLERS, pass_to_dict
from .report import linear_param_count
from .rewrite import LayerWork, set_child


def _check_passes(passes) -> list:
    passes = list(passes)
    if not passes:
        raise A3ModError("passes is empty; give e.g. a3mod.a3_passes(0.2) or [A3QK(ratio=..), A3OV(..), A3MLP(..)]")
    for p in passes:
        if type(p) not in HANDLERS:
            raise A3ModError(f"{p!r} is not a pass config; known: {sorted(t.__name__ for t in HANDLERS)}")
    names = [type(p).__name__ for p in passes]
    if len(set(names)) != len(names):
        raise A3ModError(f"each pass may appear once, got {names}")
    return passes


def apply(model: nn.Module, passes, calib: Tensor | None = None, stats: Stats | None = None,
          progress: bool = True) -> nn.Module:
    """Compress `model` in place and return it.

    passes: A3 pass configs (A3QK, A3OV, A3MLP), each with its own ratio or rank.
    calib:  (n_samples, seq_len) token ids (see `calibration_data`), or
    stats:  statistics from `collect(model, calib)`, to apply several ratios without recalibrating.
    The whole model is solved first and only then rewritten, so an error leaves it untouched.
    """
    passes = _check_passes(passes)
    views = layer_views(model)
    if any(isinstance(v.attn, ReducedHeadAttention) for v in views):
        raise A3ModError("model is already compressed by a3mod; apply all A3 passes in one call to the original")
    if stats is None:
        if calib is None:
            raise CalibrationError("apply needs calib= (token ids) or stats= (from a3mod.collect)")
        stats = collect(model, calib, progress=progress)
    stats.check(min_tokens=views[0].dims.head_dim + 1)
    if len(stats.layers) != len(views):
        raise CalibrationError(f"stats cover {len(stats.layers)} layers, the model has {len(views)}")
    orig = [linear_param_count(v.layer) for v in views]
    built = []
    for v in tqdm(views, desc="solving", disable=not progress, unit="layer"):
        work = LayerWork.from_view(v)
        for p in passes:
            HANDLERS[type(p)](p, work, stats.layers[v.index], stats.n)
        built.append((work, work.build(model.config, v.o_module().weight.dtype, v.o_module().weight.device)))
    for work, (attn, mlp) in built:
        set_child(work.view.layer, work.view.spec.attn, attn)
        set_child(work.view.layer, work.view.spec.mlp, mlp)
    model.a3mod_info = {"passes": [pass_to_dict(p) for p in passes], "calib_tokens": stats.n,
                        "orig_layer_params": orig}
    return model
