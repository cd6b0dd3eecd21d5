"""apply's layer-by-layer schedule (a3mod.pipeline.layerwise): the same compressed model as collecting every layer's
statistics in one forward, one layer's statistics held at a time, the fallback where layers cannot be replayed
one by one, and the model restored when a layer fails."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import a3mod
from a3mod.arch import layer_views
from a3mod.pipeline import compress, layerwise, steps

from conftest import calib_ids, input_ids, logits, tiny_model
from zoo import _ids, tiny_zoo_model


def updating(ratio: float) -> list:
    """A3 at `ratio` with both least-squares updates (they read the large Grams: the layer-by-layer schedule)."""
    return [dataclasses.replace(p, update=True) if hasattr(p, "update") else p for p in a3mod.a3_passes(ratio)]


def kinds(passes) -> set[str]:
    return {k for p in passes for k in p.stat_kinds()}


def both_schedules(model, passes, calib):
    """(layer by layer from calib=, every layer's statistics first through stats=)."""
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    a3mod.apply(a, passes, calib=calib, progress=False)
    a3mod.apply(b, passes, stats=a3mod.collect(b, calib, kinds=kinds(passes), progress=False), progress=False)
    return a, b


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "mixtral"])
def test_layer_by_layer_gives_the_model_collecting_everything_first_gives(family, monkeypatch):
    model = tiny_zoo_model(family).eval() if family == "mixtral" else tiny_model(family, kv_heads=2 if family == "llama" else None)
    calls = []
    real = layerwise.layerwise_swaps
    monkeypatch.setattr(layerwise, "layerwise_swaps", lambda *a, **k: calls.append(1) or real(*a, **k))
    calib = _ids(6, 16, 1) if family == "mixtral" else calib_ids(6, 16)
    a, b = both_schedules(model, updating(0.3), calib)
    assert calls == [1]                                 # the calib= run took the layer-by-layer schedule
    ids = _ids(2, 12, 2) if family == "mixtral" else input_ids()
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert a.a3mod_info == b.a3mod_info
    assert a3mod.report(a).to_dict() == a3mod.report(b).to_dict()


def test_one_layers_statistics_at_a_time(monkeypatch):
    model = tiny_model("llama", kv_heads=2, layers=3)
    held = []
    real = steps.build_layer

    def spy(m, view, passes, stats):
        held.append([i for i, d in enumerate(stats.layers) if d])
        return real(m, view, passes, stats)

    monkeypatch.setattr(steps, "build_layer", spy)
    a3mod.apply(model, updating(0.3), calib=calib_ids(4, 16), progress=False)
    assert held == [[v.index] for v in layer_views(model)]


def test_plain_a3_and_given_stats_keep_collecting_everything_first(monkeypatch):
    """Without the large Grams (plain A3, portable or not) or with stats= given, apply keeps its one-forward
    collection."""
    monkeypatch.setattr(layerwise, "layerwise_swaps", lambda *a, **k: pytest.fail("layer-by-layer schedule taken"))
    model = tiny_model("llama", kv_heads=2)
    a3mod.apply(copy.deepcopy(model), a3mod.a3_passes(0.3), calib=calib_ids(4, 16), progress=False)
    st = a3mod.collect(model, calib_ids(4, 16), kinds=kinds(updating(0.3)), progress=False)
    a3mod.apply(copy.deepcopy(model), updating(0.3), stats=st, progress=False)
    portable = [dataclasses.replace(p, portable=True) if type(p).__name__ == "A3QK" else p for p in a3mod.a3_passes(0.3)]
    assert portable[0].whole_model_stats()
    a3mod.apply(copy.deepcopy(model), portable, calib=calib_ids(4, 16), progress=False)


@pytest.mark.parametrize("mtype", ["hy_v4", "gemma4_text"])
def test_models_whose_layers_cannot_be_replayed_one_by_one_fall_back(mtype):
    """HY-V4's indexer hands its top-k to the next layer; Gemma 4's layers share K/V through an object in their
    arguments (replayed window by window within a layer, the sharing layer reads another window's K/V): the check
    on two windows sees it, and apply collects every layer's statistics in one forward (the same model as stats=)."""
    model = tiny_zoo_model(mtype).eval()
    calib = _ids(4, 16, 1)
    assert not layerwise.replays(model, layer_views(model), calib)
    with pytest.warns(UserWarning, match="cannot be replayed one by one"):
        a, b = both_schedules(model, updating(0.3), calib)
    ids = _ids(2, 12, 2)
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_a_failing_layer_restores_the_model(monkeypatch):
    model = tiny_model("llama", kv_heads=2)
    before = copy.deepcopy(model.state_dict())
    real, seen = steps.build_layer, []

    def fail_second(m, view, passes, stats):
        seen.append(view.index)
        if len(seen) == 2:
            raise RuntimeError("solver failed")
        return real(m, view, passes, stats)

    monkeypatch.setattr(steps, "build_layer", fail_second)
    with pytest.raises(RuntimeError, match="solver failed"):
        a3mod.apply(model, updating(0.3), calib=calib_ids(4, 16), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not compress.compact_modules(model)


def test_stats_of_a_kind_no_layer_has_count_as_collected():
    """An all-MoE model has no dense MLP: the hgram statistics A3MLP(update=True) asks for are empty in every layer,
    and stats= from collect(kinds=...) with them is accepted (it was refused as missing those kinds)."""
    model = tiny_zoo_model("mixtral").eval()
    passes = updating(0.3)
    st = a3mod.collect(model, _ids(4, 16, 1), kinds=kinds(passes), progress=False)
    assert "hgram" in st.kinds and not any("hh" in d for d in st.layers)
    a3mod.apply(model, passes, stats=st, progress=False)


@pytest.mark.parametrize("p", [a3mod.SVDLLM(ratio=0.3), a3mod.SVDLLM2(rank=6)], ids=lambda p: type(p).__name__)
def test_svdllm_with_uniform_ranks_calibrates_layer_by_layer(p, monkeypatch):
    """SVD-LLM's per-linear Grams (18 GB for Qwen2.5-1.5B) are held one layer at a time: the same model."""
    model = tiny_model("llama", kv_heads=2, layers=3)
    held, real = [], steps.run_pass

    def spy(cfg, ctx):
        held.append((sorted(ctx.layers), [i for i, d in enumerate(ctx.stats.layers) if d]))
        return real(cfg, ctx)

    monkeypatch.setattr(steps, "run_pass", spy)
    a, b = both_schedules(model, [p], calib_ids(6, 16))
    assert held == [([i], [i]) for i in range(3)]
    ids = input_ids()
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert a3mod.report(a).to_dict() == a3mod.report(b).to_dict()


def test_svdllm2_ranking_across_layers_collects_everything_first(monkeypatch):
    monkeypatch.setattr(layerwise, "layerwise_swaps", lambda *a, **k: pytest.fail("layer-by-layer schedule taken"))
    assert a3mod.SVDLLM2(ratio=0.3).whole_model_stats() and not a3mod.SVDLLM(ratio=0.3).whole_model_stats()
    a3mod.apply(tiny_model("llama", kv_heads=2), [a3mod.SVDLLM2(ratio=0.3)], calib=calib_ids(4, 16), progress=False)


def test_an_instance_forward_wrapper_survives_and_the_mode_is_restored():
    """accelerate keeps its device hooks' wrapper in a layer's instance `forward`: the capture puts it back (it was
    deleted), the model's train mode is restored and no hook stays attached."""
    model = tiny_model("llama", kv_heads=2, layers=3).train()
    calls = []
    for layer in model.model.layers:
        real = layer.forward
        layer.forward = (lambda f: (lambda *a, **k: calls.append(1) or f(*a, **k)))(real)
    a3mod.apply(model, updating(0.3), calib=calib_ids(4, 16), progress=False)
    assert model.training and all("forward" in layer.__dict__ for layer in model.model.layers)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    calls.clear()
    model.eval()(input_ids())
    assert len(calls) == 3


def test_dry_run_does_not_solve_the_updates(tmp_path, capsys, recwarn):
    from a3mod.cli.commands import main

    path = tmp_path / "m"
    tiny_model("llama", kv_heads=2).save_pretrained(path)
    from conftest import make_tokenizer
    make_tokenizer().save_pretrained(path)
    assert main(["compress", "--model", str(path), "--ratio", "0.3", "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert not [w for w in recwarn if "update=True" in str(w.message)]
    assert not (tmp_path / "o").exists()


def test_portable_pairs_are_ranked_first_and_the_grams_still_come_one_layer_at_a_time(monkeypatch):
    """A3QK(portable=True) ranks RoPE pairs over every layer's "a3" statistics: those are collected in one forward,
    the pair order resolved, and the updates' Grams still one layer at a time; the same model as stats=."""
    passes = [dataclasses.replace(p, portable=True) if type(p).__name__ == "A3QK" else p for p in updating(0.3)]
    calls, real = [], layerwise.layerwise_swaps
    monkeypatch.setattr(layerwise, "layerwise_swaps", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, b = both_schedules(tiny_model("llama", kv_heads=2, layers=3), passes, calib_ids(6, 16))
    assert calls == [1]
    assert torch.equal(logits(a, input_ids()), logits(b, input_ids()))
    assert a.a3mod_info == b.a3mod_info and a.a3mod_info["passes"][0]["pair_order"] is not None
