"""arch.capture: the one helper that records what decoder layers receive (discovery, the self-check, streaming)
and replays their outputs (ASVD's rank search)."""
from __future__ import annotations

import torch

from a3mod.arch.capture import layer_inputs, recording_outputs, replaying

from conftest import input_ids, tiny_model


def _counting(layers):
    """How often each layer really ran (its attention module was called)."""
    counts = [0] * len(layers)
    hooks = [l.self_attn.register_forward_hook(lambda m, a, o, i=i: counts.__setitem__(i, counts[i] + 1))
             for i, l in enumerate(layers)]
    return counts, hooks


def test_inputs_are_what_the_layers_receive_and_the_forward_stops_early():
    model = tiny_model("llama", layers=4)
    layers, ids = model.model.layers, input_ids()
    seen = {}
    hooks = [l.register_forward_pre_hook(lambda m, a, k, i=i: seen.setdefault(i, (a, k)), with_kwargs=True)
             for i, l in enumerate(layers)]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    counts, hooks = _counting(layers)
    calls = layer_inputs(model, layers, ids, wanted=[1])
    for h in hooks:
        h.remove()
    assert set(calls) == {1} and counts == [1, 0, 0, 0]            # stopped as layer 1 was called
    args, kwargs = calls[1]
    ref_args, ref_kwargs = seen[1]
    hidden = lambda a, k: a[0] if a else k["hidden_states"]  # noqa: E731
    torch.testing.assert_close(hidden(args, kwargs), hidden(ref_args, ref_kwargs), rtol=0, atol=0)


def test_without_running_layers_every_layer_gets_its_arguments():
    model = tiny_model("llama", layers=3)
    counts, hooks = _counting(model.model.layers)
    calls = layer_inputs(model.model, model.model.layers, input_ids(), run_layers=False)
    for h in hooks:
        h.remove()
    assert sorted(calls) == [0, 1, 2] and counts == [0, 0, 0]
    assert not any("forward" in vars(l) for l in model.model.layers)        # the layers are themselves again
    assert all("position_embeddings" in kw for _, kw in calls.values())


def test_replayed_outputs_give_the_same_logits():
    model, ids = tiny_model("qwen2", layers=3), input_ids()
    with torch.no_grad(), recording_outputs(model.model.layers) as outs:
        ref = model(input_ids=ids, use_cache=False).logits
    assert all(o is not None for o in outs) and not any(l._forward_hooks for l in model.model.layers)
    counts, hooks = _counting(model.model.layers)
    with torch.no_grad(), replaying(model.model.layers, outs, upto=2):
        got = model(input_ids=ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert counts[2] == 1 and not any("forward" in vars(l) for l in model.model.layers)
