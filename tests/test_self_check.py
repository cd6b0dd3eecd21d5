"""apply runs the compressed model once before returning: a compressed module that fails its forward is a typed
error, and the model is put back exactly as it was (broken on purpose here)."""
from __future__ import annotations

import pytest
import torch

import a3mod
from a3mod.modules import ReducedHeadAttention, ReducedMLP
from conftest import calib_ids, input_ids, logits, tiny_model


@pytest.mark.parametrize("budget", ["0", str(1 << 30)], ids=["spilled", "in-memory"])     # a3mod.pipeline.undo
@pytest.mark.parametrize("broken", [ReducedMLP, ReducedHeadAttention])
def test_a_failing_compressed_forward_is_refused_and_the_model_restored(monkeypatch, broken, budget):
    monkeypatch.setenv("A3MOD_UNDO_MEMORY", budget)
    model = tiny_model("llama", kv_heads=2)
    ref = logits(model, input_ids())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]

    real = broken.forward

    def fail(self, *a, **k):        # only at reduced dims: the full-rank rewrite check (verify) still passes
        c = self.cfg
        if (c.inter < c.orig_inter) if broken is ReducedMLP else (c.vo_dim < c.head_dim):
            raise RuntimeError("shapes do not match (injected)")
        return real(self, *a, **k)

    monkeypatch.setattr(broken, "forward", fail)
    with pytest.raises(a3mod.A3ModError, match="fails its first forward .*injected.*restored"):
        a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    monkeypatch.undo()
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, input_ids()), ref)
    assert getattr(model, "a3mod_info", None) is None
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)      # and it compresses after
    assert any(isinstance(m, ReducedMLP) for m in model.modules())


def test_the_check_runs_a_cached_step_of_a_generating_model(monkeypatch):
    """A forward that fails only when it reads a cache is caught too."""
    model = tiny_model("qwen2")
    real = ReducedHeadAttention.forward

    def cached_only(self, hidden_states, *a, **k):
        if hidden_states.shape[1] == 1 and self.cfg.vo_dim < self.cfg.head_dim:
            raise RuntimeError("cache step (injected)")
        return real(self, hidden_states, *a, **k)

    monkeypatch.setattr(ReducedHeadAttention, "forward", cached_only)
    with pytest.raises(a3mod.A3ModError, match="cache step"):
        a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
