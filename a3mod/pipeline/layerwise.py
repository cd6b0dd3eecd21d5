"""`apply`'s layer-by-layer schedule: the statistics of one layer at a time, in memory.

`a3mod.collect` runs the calibration windows through the whole model once and holds every layer's statistics
until the passes have solved; the Grams the least-squares updates read (`hgram`: intermediate x intermediate per
MLP, `ogram`: per attention output) make that 0.6 GB a layer on Qwen2.5-1.5B (18 GB for 28 layers). This schedule
computes the same statistics as `collect` (each layer sees the activations of the *original* model) from the same
calibration windows, one layer at a time, as streaming does:

1. capture every layer's call arguments once per window shape and layer 0's hidden states for every window
   (`arch.capture.layer_calls`: the layers are not run);
2. per layer: run every window through the original layer with the statistic hooks attached (`calib.recording`),
   keep its outputs as the next layer's inputs, solve and build its compact modules (the steps
   `pipeline.steps.collect_layer` / `solve_layer`, which streaming runs too),
   swap them in (logged in the undo log) and drop the layer's statistics;
3. with A3OV / A3MLP(seq_refit=True), re-fit the layer's o_proj / down_proj on the compressed model's stream of
   the same windows (pipeline/seq_refit.py: targets from the original layer's pass of step 2).

Peak: the model, the hidden states of the calibration windows (twice: inputs and outputs of one layer), and one
layer's statistics. `apply` picks it for passes that read those Grams (A3 with the updates, SVD-LLM with uniform
ranks) and solve each layer from its own statistics, when given calib= (not stats=), in one process.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..arch import get_path
from ..arch.capture import layer_calls, layer_inputs, with_hidden
from ..calib import distributed
from ..calib.stats import Stats, check_request, check_token_ids, vocab_size
from . import seq_refit
from .steps import collect_layer, solve_layer

BIG_KINDS = frozenset({"gram", "hgram", "ogram", "ehgram"})    # per-layer Grams too large to hold for every layer


def wanted(passes, kinds: set[str], calib: Tensor | None, stats: Stats | None) -> bool:
    """Whether `apply` runs this schedule: calibration to collect (no stats given), kinds that hold large Grams or a
    sequential re-fit (pipeline/seq_refit.py), every pass solved layer by layer with nothing read from other
    layers, one process."""
    return (calib is not None and stats is None and bool(kinds & BIG_KINDS or seq_refit.dampings(passes))
            and not distributed.active() and not any(p.whole_model_stats() for p in passes))


@torch.no_grad()
def replays(model: nn.Module, views, calib: Tensor) -> bool:
    """Whether this schedule gives every layer the hidden states the model's own forward gives it, bit for bit, on
    the first two calibration windows run as `layerwise_swaps` runs them (each layer over both windows before the
    next layer). False where layers pass other state along (HY-V4's indexer hands its top-k to the next layer, Gemma
    4's layers share K/V through an object in their arguments) or the loop does more than chain them: `apply` then
    collects every layer's statistics in one forward instead."""
    check_request(calib, ("a3",))                    # bad token ids: the typed error, before any forward
    check_token_ids(calib, vocab_size(model))
    layers = get_path(model, views[0].spec.layers)
    device = next(model.parameters()).device
    windows = [calib[b:b + 1].to(device) for b in range(min(2, calib.shape[0]))]
    was_training = model.training
    model.eval()
    try:
        body = getattr(model, "base_model", model)
        true = [layer_inputs(body, layers, ids) for ids in windows]
        calls, hidden = _capture(model, layers, windows)
        shapes = [tuple(ids.shape) for ids in windows]
        for v in views:
            if any(v.index not in t or not torch.equal(h.to(device), _hidden(t[v.index]))
                   for t, h in zip(true, hidden)):
                return False
            hidden, _ = _run_layer(layers[v.index], v, calls, shapes, hidden, ())
    except torch.OutOfMemoryError:
        raise
    except Exception:           # noqa: BLE001  (a layer that cannot be called alone: not replayable)
        return False
    finally:
        model.train(was_training)
    return True


def _capture(model: nn.Module, layers: nn.ModuleList, windows: list[Tensor]) -> tuple[dict, list[Tensor]]:
    """Every layer's call arguments once per window shape, and layer 0's hidden states for every window (on the
    CPU, as streaming keeps them: an accelerator holds one window's at a time)."""
    calls, hidden = {}, []
    for ids in windows:
        seen = layer_calls(model, layers, ids)
        hidden.append(_hidden(seen[0]).to("cpu"))
        calls.setdefault(tuple(ids.shape), [with_hidden(c, None) for c in seen])
    return calls, hidden


def _hidden(call: tuple[tuple, dict]) -> Tensor:
    args, kw = call
    return args[0] if args else kw["hidden_states"]


@torch.no_grad()
def layerwise_swaps(job) -> tuple[list, int]:
    """Solve every active layer of `job.model` from its own statistics (the original model's activations of
    `job.calib`), swapping its compact modules in as it goes (A3's passes, or one baseline that solves layer by layer;
    each swap logged in `job.undo`); returns ([(layer, path, module)], calibration tokens)."""
    model, views, passes, calib, kinds = job.model, job.views, job.passes, job.calib, job.kinds
    check_request(calib, sorted(kinds))
    check_token_ids(calib, vocab_size(model))
    layers = get_path(model, views[0].spec.layers)
    device = next(model.parameters()).device
    windows = [calib[b:b + 1].to(device) for b in range(calib.shape[0])]      # one window a batch, as collect
    was_training = model.training
    model.eval()
    try:
        calls, hidden = _capture(model, layers, windows)
        shapes = [tuple(ids.shape) for ids in windows]
        n, out = int(calib.numel()), []
        given = job.collected                        # statistics already collected (Allocate, "taylor"): merged
        todo = kinds - given.kinds if given is not None else kinds
        damping = seq_refit.dampings(passes)
        h_c = list(hidden) if damping else None          # the compressed model's stream (sequential re-fit)
        bar = tqdm(views, desc="calibrating + solving", disable=not job.progress, unit="layer")
        for v in bar:
            targets = seq_refit.Targets(v, hidden, h_c, "qk" in damping) if damping and not v.left else None
            with targets.hooked() if targets else contextlib.nullcontext():
                nxt, acc = _run_layer(layers[v.index], v, calls, shapes, hidden, todo)
            if given is not None:
                acc = {**given.layers[v.index], **acc}
            if targets:
                targets.check_outputs(nxt)
            for path, new in ([] if v.left else solve_layer(model, views, v, passes, acc, n)):
                job.undo.swap(v.layer, path, new)
                out.append((v.index, path, new))
            del acc                   # this layer's Grams go before the next layer's are summed
            if damping:
                h_c, err = seq_refit.refit_layer(layers[v.index], v, calls, shapes, h_c, targets,
                                                 {} if v.left else damping)
                bar.set_postfix({k: f"{a:.3f}->{b:.3f} (damping {d:g})" for k, (a, b, d) in err.items()})
            hidden = nxt
    finally:
        model.train(was_training)
    return out, n


def _run_layer(layer: nn.Module, view, calls: dict, shapes: list, hidden: list[Tensor], kinds) -> tuple[list, dict]:
    """Every window's hidden states through original `layer` with the statistic hooks of `view` attached (none for
    a left layer): (the outputs, the statistic sums)."""
    nxt = []
    acc = collect_layer(layer, view, calls, shapes, hidden.__getitem__, lambda b, y: nxt.append(y), kinds,
                        next(layer.parameters()).device)
    return nxt, acc
