"""A3MLP(select="taylor"): the loss-aware MLP selection (calib/taylor.py, kind "taylor") and its place in `apply`."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
import a3mod.calib.stats as stats_mod
from a3mod.arch import layer_views
from a3mod.errors import RatioError
from a3mod.passes import pass_from_dict, pass_to_dict
from a3mod.passes.base import needs
from conftest import assert_close_logits, calib_ids, input_ids, logits, mlp_modules, tiny_model


def _mask_gradients(model, calib) -> list[torch.Tensor]:
    """Per layer, sum over tokens of (dL/dm)^2 for a per-token mask m on down_proj's input (m = 1), L the summed
    next-token cross entropy of each window: the definition of the statistic, by autograd on explicit masks."""
    views = layer_views(model)
    out = [0.0] * len(views)
    for b in range(calib.shape[0]):
        ids = calib[b:b + 1]
        masks = [torch.ones(ids.shape[1], _width(v.down_module()), dtype=torch.float64, requires_grad=True)
                 for v in views]
        hooks = [v.down_module().register_forward_pre_hook(lambda m, a, mk=mk: (a[0] * mk,))
                 for v, mk in zip(views, masks)]
        try:
            lg = model(input_ids=ids).logits[0, :-1]
            torch.nn.functional.cross_entropy(lg, ids[0, 1:], reduction="sum").backward()
        finally:
            for h in hooks:
                h.remove()
        out = [o + mk.grad.square().sum(0) for o, mk in zip(out, masks)]
    return out


def _width(down) -> int:
    """down_proj's input width (nn.Linear, or GPT-2's Conv1D with its (in, out) weight)."""
    return getattr(down, "in_features", None) or down.weight.shape[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_taylor_statistic_is_the_mask_gradient_fisher(family):
    model = tiny_model(family).double()
    calib = calib_ids(3, 16)
    stats = a3mod.collect(model, calib, kinds=("taylor",), progress=False)
    assert not any(p.grad is not None for p in model.parameters())          # no weight gradients were made
    assert all(p.requires_grad for p in model.parameters())                 # and the parameters are as they were
    assert stats.kinds >= {"taylor"} and stats.n == calib.numel()
    for layer, want in zip(stats.layers, _mask_gradients(model, calib)):
        assert set(layer) == {"ht"}
        torch.testing.assert_close(layer["ht"], want, rtol=1e-9, atol=1e-12)


def test_taylor_keeps_the_neurons_of_largest_statistic():
    base, calib = tiny_model("llama", inter=64), calib_ids(8, 16)
    stats = a3mod.collect(base, calib, kinds=("a3", "taylor"), progress=False)
    got = a3mod.apply(copy.deepcopy(base), [a3mod.A3MLP(ratio=0.4, select="taylor")], stats=stats, progress=False)
    cur = a3mod.apply(copy.deepcopy(base), [a3mod.A3MLP(ratio=0.4)], stats=stats, progress=False)
    for v, mlp, plain in zip(layer_views(base), mlp_modules(got), mlp_modules(cur)):
        r = mlp.down_proj.weight.shape[1]
        want = stats.layers[v.index]["ht"].argsort(descending=True)[:r].sort().values
        assert list(mlp.kept) == want.tolist()
        torch.testing.assert_close(mlp.down_proj.weight, v.down_module().weight[:, want])   # selection alone
    assert any(list(a.kept) != list(b.kept) for a, b in zip(mlp_modules(got), mlp_modules(cur)))


@settings(max_examples=6, deadline=None)
@given(family=st.sampled_from(["llama", "qwen2"]), update=st.booleans(), seed=st.integers(0, 3))
def test_full_rank_taylor_reproduces_the_model(family, update, seed):
    torch.manual_seed(seed)
    model = tiny_model(family, inter=48)
    ref = logits(model, input_ids())
    a3mod.apply(model, [a3mod.A3MLP(rank=48, select="taylor", update=update)], calib=calib_ids(8, 16),
                progress=False)
    assert_close_logits(logits(model, input_ids()), ref, rel=1e-5)


def test_taylor_in_the_layer_by_layer_schedule_runs_its_backward_once(monkeypatch):
    """With the updates (layer by layer) and the sequential re-fit, the loss gradients come from one backward pass
    before the layers are solved (`compress._whole_model_kinds`), the same statistic a one-forward run reads."""
    calls = []
    real = stats_mod.taylor_sums
    monkeypatch.setattr(stats_mod, "taylor_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, calib = tiny_model("llama", inter=64), calib_ids(8, 16)
    p = a3mod.A3MLP(ratio=0.3, update=True, select="taylor")
    layerwise = a3mod.apply(copy.deepcopy(base), [p], calib=calib, progress=False)
    assert len(calls) == 1
    stats = a3mod.collect(base, calib, kinds=needs(p), progress=False)
    given_stats = a3mod.apply(copy.deepcopy(base), [p], stats=stats, progress=False)
    x = input_ids()
    assert_close_logits(logits(layerwise, x), logits(given_stats, x), rel=1e-6)
    calls.clear()
    a3mod.apply(copy.deepcopy(base), [a3mod.A3OV(ratio=0.3, update=True, seq_refit=True),
                                      a3mod.A3MLP(ratio=0.3, update=True, seq_refit=True, select="taylor")],
                calib=calib, progress=False)
    assert len(calls) == 1


def test_the_refit_reuses_a_given_loss_statistic(monkeypatch):
    """apply(stats=stats.only({"taylor"}), calib=) with seq_refit=True: no backward pass, the same model as from
    calib= alone, the given statistics left as they were; statistics of other kinds (or another draw) refused."""
    calls = []
    real = stats_mod.taylor_sums
    monkeypatch.setattr(stats_mod, "taylor_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    base, calib = tiny_model("llama", inter=64), calib_ids(8, 16)
    passes = [a3mod.A3OV(ratio=0.3, update=True, seq_refit=True),
              a3mod.A3MLP(ratio=0.3, update=True, seq_refit=True, select="taylor")]
    alone = a3mod.apply(copy.deepcopy(base), passes, calib=calib, progress=False)
    full = a3mod.collect(base, calib, kinds=("a3", "taylor"), progress=False)
    loss = full.only({"taylor"})
    assert loss.kinds == {"taylor"} and full.kinds >= {"a3", "taylor"} and loss.layers[0]["ht"] is full.layers[0]["ht"]
    calls.clear()
    reused = a3mod.apply(copy.deepcopy(base), passes, stats=loss, calib=calib, progress=False)
    assert calls == [] and loss.kinds == {"taylor"}
    assert_close_logits(logits(reused, input_ids()), logits(alone, input_ids()), rel=1e-6)
    with pytest.raises(a3mod.A3ModError, match="may hold only"):
        a3mod.apply(copy.deepcopy(base), passes, stats=full, calib=calib, progress=False)
    with pytest.raises(a3mod.CalibrationError, match="other calibration tokens"):
        a3mod.apply(copy.deepcopy(base), passes, stats=loss, calib=calib_ids(8, 16, seed=5), progress=False)
    with pytest.raises(a3mod.CalibrationError, match="unknown statistic kinds"):
        full.only({"fisher"})


def test_taylor_config_cli_and_streaming(tmp_path, text_file, capsys):
    p = a3mod.A3MLP(ratio=0.3, select="taylor")
    assert pass_from_dict(pass_to_dict(p)) == p and set(needs(p)) == {"a3", "taylor"}
    assert set(needs(a3mod.A3MLP(ratio=0.3, update=True, select="taylor"))) == {"a3", "hgram", "taylor"}
    with pytest.raises(RatioError, match="allowed: cur, obs, taylor"):
        a3mod.A3MLP(ratio=0.3, select="fisher")
    src = tmp_path / "src"
    tiny_model("llama", inter=64).save_pretrained(src)
    with pytest.raises(a3mod.A3ModError, match="backward pass"):
        a3mod.compress_streaming(src, tmp_path / "s", [p], calib_ids(4, 16), progress=False)
    assert not (tmp_path / "s").exists()
    from a3mod.cli.commands import main
    from conftest import make_tokenizer

    make_tokenizer().save_pretrained(src)
    args = ["compress", "--model", str(src), "--ratio", "0.3", "--calib", text_file, "--n-samples", "8",
            "--calib-seq-len", "16", "--no-eval"]
    assert main([*args, "--mlp-select", "taylor", "--out", str(tmp_path / "o")]) == 0
    side = json.loads((tmp_path / "o" / "a3mod.json").read_text())
    assert side["passes"][2]["select"] == "taylor"
    capsys.readouterr()
    assert main([*args, "--mlp-select", "taylor", "--stream", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "a3mod: error:" in err and "backward pass" in err and not (tmp_path / "x").exists()
