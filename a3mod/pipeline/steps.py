"""The per-layer steps both layer-by-layer schedules run: `apply`'s (pipeline/layerwise.py, the model in memory) and
streaming's (pipeline/stream.py, one layer loaded from a folder or a GGUF at a time). Each schedule decides where a
layer comes from, where its hidden states live and where its compact modules go; the steps in between are these:

    acc = collect_layer(layer, view, calls, shapes, get, put, kinds, device)   # windows through it, statistics summed
    swaps = solve_layer(model, views, view, passes, acc, n)                    # [(path, compact module)]

(`apply` without the large Grams, and with statistics given, collects every layer in one forward instead:
pipeline/compress.py.)"""
from __future__ import annotations

from torch import nn

from ..arch.capture import through_layer
from ..calib.stats import Stats, recording
from ..passes.a3 import build_layer
from ..passes.base import PassContext, run_pass, scope_of


def collect_layer(layer: nn.Module, view, calls: dict, shapes: list, get, put, kinds, device=None) -> dict:
    """Every calibration window through original `layer` (`arch.capture.through_layer`: inputs get(b), outputs
    put(b, h)) with the statistic hooks of `view` for `kinds` attached (none for a left layer or no kinds): the
    statistic sums."""
    with recording([] if view.left or not kinds else [view], sorted(kinds)) as accs:
        through_layer(layer, view.index, calls, shapes, get, put, device)
    return accs[0] if accs else {}


def solve_layer(model: nn.Module, views, view, passes, acc: dict, n: int) -> list[tuple[str, nn.Module]]:
    """[(path, compact module)] of layer `view` from its own statistic sums `acc` over `n` tokens (checked to be
    enough): A3's layer-scope passes, or a model-scope pass that solves each layer on its own (SVD-LLM, plain SVD:
    `PassContext.layers`)."""
    stats = Stats(n, [{} for _ in views])
    stats.layers[view.index] = acc
    stats.check(min_tokens=view.dims.head_dim + 1)
    if scope_of(passes[0]) == "layer":
        return build_layer(model, view, passes, stats)
    ctx = PassContext(model=model, views=views, stats=stats, progress=False, layers=frozenset({view.index}))
    return [(path, new) for _, path, new in run_pass(passes[0], ctx)]
