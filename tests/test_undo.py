"""The undo log of `apply` (a3mod.pipeline.undo): layers are swapped in as soon as they are solved, the modules
swapped out are kept (in memory up to a budget, in temporary files beyond it), and any error puts every one back.
Broken on purpose here: a solve that fails at a later layer, an interrupt, a spill of everything."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import a3mod
from a3mod.errors import A3ModError
from a3mod.pipeline import compress, undo
from a3mod.pipeline.undo import UndoLog

from conftest import calib_ids, input_ids, logits, tiny_model


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _same(model, snap):
    sd, types = snap
    now = model.state_dict()
    return [type(m) for m in model.modules()] == types and now.keys() == sd.keys() and \
        all(torch.equal(sd[k], now[k]) for k in sd)


@pytest.mark.parametrize("budget", ["0", str(1 << 30)], ids=["spilled", "in-memory"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_spilling_changes_nothing_in_the_result(monkeypatch, family, budget):
    ref = tiny_model(family, kv_heads=2)
    a3mod.apply(ref, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    monkeypatch.setenv("A3MOD_UNDO_MEMORY", budget)
    model = tiny_model(family, kv_heads=2)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert _same(model, _snapshot(ref))
    assert torch.equal(logits(model, input_ids()), logits(ref, input_ids()))


@pytest.mark.parametrize("error", [RuntimeError("LAPACK failed (injected)"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
@pytest.mark.parametrize("budget", ["0", "3000", str(1 << 30)], ids=["spilled", "partly", "in-memory"])
def test_a_failure_in_a_later_layer_restores_every_swapped_layer(monkeypatch, tmp_path, budget, error):
    model = tiny_model("llama", layers=4, kv_heads=2)
    snap, ref = _snapshot(model), logits(model, input_ids())
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    monkeypatch.setenv("A3MOD_UNDO_MEMORY", budget)
    made = []

    def mkdtemp(prefix):
        made.append(tmp_path / "undo")
        made[-1].mkdir()
        return str(made[-1])

    monkeypatch.setattr(undo.tempfile, "mkdtemp", mkdtemp)
    real = compress.build_layer

    def fails_at_layer_2(model, view, *a):
        if view.index == 2:
            raise error
        return real(model, view, *a)

    monkeypatch.setattr(compress, "build_layer", fails_at_layer_2)
    with pytest.raises(type(error)):
        a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert _same(model, snap) and torch.equal(logits(model, input_ids()), ref)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert bool(made) == (budget != str(1 << 30))                   # spilled below the budget
    assert not (tmp_path / "undo").exists()                        # the spill files are gone
    assert getattr(model, "a3mod_info", None) is None


def test_spill_frees_the_old_tensors_and_restore_rebuilds_them():
    layer = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    layer[0].register_buffer("scale", torch.arange(8.0))
    layer[1].weight = layer[0].weight.__class__(torch.randn(8))           # a separate tensor
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    old0 = layer[0]
    with UndoLog(layer, budget_bytes=0) as log:
        log.swap(layer, "0", nn.Identity())
        assert isinstance(layer[0], nn.Identity) and log.spilled == 1
        assert all(t.is_meta for t in [*old0.parameters(), *old0.buffers()])   # its memory is released
        spill_dir = log.dir
        assert spill_dir.exists()
        log.restore()
        assert layer[0] is old0 and isinstance(old0.weight, nn.Parameter) and old0.weight.requires_grad
        after = layer.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert not spill_dir.exists()


def test_tied_tensors_in_a_spilled_module_stay_tied():
    block = nn.Module()
    block.a, block.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    block.b.weight = block.a.weight
    holder = nn.Module()
    holder.block = block
    with UndoLog(holder, budget_bytes=0) as log:
        log.swap(holder, "block", nn.Identity())
        log.restore()
    assert holder.block.a.weight is holder.block.b.weight and not holder.block.a.weight.is_meta


@pytest.mark.parametrize("bad", ["lots", "-1", "1.5"])
def test_a_bad_budget_is_a_typed_error_before_any_work(monkeypatch, bad):
    model = tiny_model("llama")
    snap = _snapshot(model)
    monkeypatch.setenv("A3MOD_UNDO_MEMORY", bad)
    with pytest.raises(A3ModError, match="A3MOD_UNDO_MEMORY"):
        a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert _same(model, snap)


def test_a_submodule_the_new_module_took_over_is_not_spilled():
    """Compact modules may take over a part of the one they replace (a norm): spilling the old one must not turn
    the new one's part into meta tensors (bailing_hybrid's MLA did, before)."""
    old = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    layer = nn.Sequential(old)
    new = nn.Sequential(nn.Linear(4, 4), old[1])
    before = old[0].weight.clone()
    with UndoLog(layer, budget_bytes=0) as log:
        log.swap(layer, "0", new)
        assert old[0].weight.is_meta and not new[1].weight.is_meta
        log.restore()
    assert layer[0] is old and torch.equal(old[0].weight, before)
