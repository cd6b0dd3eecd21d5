"""Capturing what decoder layers receive, one helper for every part of a3mod that needs it: discovery and the
self-check (run the model until the layers they read have been called), streaming (every layer's arguments without
running any layer) and ASVD's rank search (replay recorded layer outputs instead of recomputing them).

    calls = layer_inputs(model, layers, ids, wanted=[0, 5])         # {i: (args, kwargs)}, forward stopped early
    calls = layer_inputs(model, layers, ids, run_layers=False)      # every layer, none of them run
    with recording_inputs(layers, wanted) as calls: run_until_stopped(model, ids)   # beside other hooks
    with replaying(layers, outputs, upto=3): model(ids)             # layers 0..2 return their recorded outputs
    args, kw = with_hidden(layer_calls(model, layers, ids)[i], h); layers[i](*args, **kw)     # layer i on h
    through_layer(layers[i], i, {shape: calls}, [shape] * n, get, put)                # every window through it
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


class StopForward(Exception):
    """Raised by a capture hook once every wanted layer has its inputs: the rest of the forward is skipped."""


def probe_ids(model: nn.Module, seq_len: int) -> Tensor:
    """A fixed (1, seq_len) probe of token ids inside the model's vocabulary, on the model's device."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (torch.arange(seq_len, device=dev) * 7 + 3).remainder(vocab)[None]


@contextlib.contextmanager
def recording_inputs(layers: nn.ModuleList, wanted=None, run_layers: bool = True) -> Iterator[dict]:
    """Record (args, kwargs) of the first call of each wanted layer (default: all) into the yielded dict; the
    forward stops (StopForward) once all are recorded. run_layers=False: the layers are not run at all, each passes
    its hidden states on unchanged (their arguments are what a3mod needs, not their outputs)."""
    wanted = set(range(len(layers)) if wanted is None else wanted)
    calls: dict[int, tuple[tuple, dict]] = {}

    def record(i, args, kwargs):
        calls.setdefault(i, (args, dict(kwargs)))
        if wanted <= set(calls):
            raise StopForward

    if run_layers:
        handles = [layers[i].register_forward_pre_hook(lambda m, a, k, i=i: record(i, a, k), with_kwargs=True)
                   for i in sorted(wanted)]
    else:
        def passing(i):
            def forward(*args, **kwargs):
                if i in wanted:
                    record(i, args, kwargs)
                return args[0] if args else kwargs["hidden_states"]
            return forward
        saved = _override(layers, [passing(i) for i in range(len(layers))])
    try:
        yield calls
    finally:
        if run_layers:
            for h in handles:
                h.remove()
        else:
            _restore(layers, saved)


@torch.no_grad()
def run_until_stopped(model: nn.Module, ids: Tensor) -> None:
    """One forward on `ids` without a cache, stopped early by a hook raising StopForward."""
    try:
        try:
            model(input_ids=ids, use_cache=False)
        except TypeError:                  # models without a use_cache argument
            model(input_ids=ids)
    except StopForward:
        pass


def layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: Tensor, wanted=None,
                 run_layers: bool = True) -> dict[int, tuple[tuple, dict]]:
    """{layer index: (args, kwargs)} of the wanted layers (default: all) when `ids` runs through `model`; layers
    that were not called are missing from the result."""
    with recording_inputs(layers, wanted, run_layers) as calls:
        run_until_stopped(model, ids)
    return calls


@contextlib.contextmanager
def recording_outputs(layers: nn.ModuleList) -> Iterator[list]:
    """Each layer's output of the forward passes run inside, in a list by layer index (the last call's): what
    `replaying` plays back."""
    outs: list = [None] * len(layers)
    handles = [layer.register_forward_hook(lambda m, a, y, i=i: outs.__setitem__(i, y))
               for i, layer in enumerate(layers)]
    try:
        yield outs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replaying(layers: nn.ModuleList, outputs: list, upto: int) -> Iterator[None]:
    """Layers before `upto` return their recorded `outputs` instead of computing them."""
    saved = _override(layers[:upto], [(lambda out: (lambda *a, **k: out))(outputs[i]) for i in range(upto)])
    try:
        yield
    finally:
        _restore(layers[:upto], saved)


def _override(layers, forwards: list) -> list:
    """Set each layer's instance `forward`; returns what the instances held before (accelerate keeps its device
    hooks' wrapper there: it is put back, not deleted)."""
    saved = [layer.__dict__.get("forward") for layer in layers]
    for layer, fwd in zip(layers, forwards):
        layer.forward = fwd
    return saved


def _restore(layers, saved: list) -> None:
    for layer, fwd in zip(layers, saved):
        if fwd is None:
            del layer.forward
        else:
            layer.forward = fwd


def layer_calls(model: nn.Module, layers: nn.ModuleList, ids: Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) every decoder layer receives when `ids` runs through the model (no layer is run: each passes
    its hidden states on unchanged; the run stops after the last one)."""
    calls = layer_inputs(getattr(model, "base_model", model), layers, ids, run_layers=False)
    return [calls[i] for i in range(len(layers))]


def with_hidden(call: tuple[tuple, dict], h: Tensor | None) -> tuple[tuple, dict]:
    """A recorded layer call with its hidden states replaced by `h`."""
    args, kwargs = call
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def through_layer(layer: nn.Module, i: int, calls: dict, shapes: list, get, put=None, device=None) -> None:
    """Run calibration window b (for each b, shape in `shapes`) through `layer` (layer i): its hidden states get(b),
    its other arguments the ones captured for windows of that shape (`calls[shape][i]`); put(b, hidden states out),
    moved to the CPU, unless put is None. Streaming and `apply`'s layer-by-layer schedule both step this way."""
    for b, shape in enumerate(shapes):
        h = get(b)
        args, kw = with_hidden(calls[shape][i], h if device is None else h.to(device))
        y = layer(*args, **kw)
        if put is not None:
            put(b, (y[0] if isinstance(y, tuple) else y).to("cpu"))

