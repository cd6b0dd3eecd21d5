"""The least-squares updates (A3MLP / A3OV update=True, Allocate mlp_update): through the passes, the statistics and
both schedules."""
from __future__ import annotations

import warnings

import pytest
import torch

import a3mod
from a3mod.arch import get_path, layer_views
from a3mod.errors import RatioError
from a3mod.passes import pass_from_dict, pass_to_dict
from a3mod.passes.base import needs
from conftest import assert_close_logits, calib_ids, input_ids, logits, mlp_modules, tiny_model
from test_stream import assert_streaming_equals_in_memory


def _mlp_inputs(model, calib) -> list[torch.Tensor]:
    """What enters every layer's MLP on `calib` (the post-attention-norm hidden states), one tensor per layer."""
    got, hooks = [], []
    for m in mlp_modules(model):
        hooks.append(m.register_forward_pre_hook(lambda mod, inp: got.append(inp[0].detach().reshape(-1, inp[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(input_ids=calib, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return got


def test_stats_hold_the_gram_of_what_enters_down_proj():
    model, calib = tiny_model("llama"), calib_ids(4, 16)
    stats = a3mod.collect(model, calib, kinds=("hgram",), progress=False)
    assert stats.kinds == {"hgram"}
    v = layer_views(model)[1]
    seen = []
    h = v.down_module().register_forward_pre_hook(lambda m, i: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=calib, use_cache=False)
    h.remove()
    x = seen[0].double()
    torch.testing.assert_close(stats.layers[1]["hh"], x.T @ x, rtol=1e-5, atol=1e-5)


def test_full_rank_update_reproduces_the_model():
    model = tiny_model("llama", inter=48)
    ref = logits(model, input_ids())
    a3mod.apply(model, [a3mod.A3MLP(rank=48, update=True)], calib=calib_ids(8, 16), progress=False)
    assert_close_logits(logits(model, input_ids()), ref, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_update_lowers_every_mlps_error_on_the_calibration_tokens(family):
    """Only A3MLP runs, so each MLP sees the same inputs before and after: with the update its squared output error
    on the calibration tokens is below selection alone's, layer by layer, with the same kept neurons and shapes."""
    calib = calib_ids(16, 16)
    orig = tiny_model(family, inter=64)
    xs = _mlp_inputs(orig, calib)
    outs = {}
    for update in (False, True):
        m = tiny_model(family, inter=64)
        a3mod.apply(m, [a3mod.A3MLP(ratio=0.4, update=update)], calib=calib, progress=False)
        outs[update] = [mlp for mlp in mlp_modules(m)]
    for i, (o, x) in enumerate(zip(mlp_modules(orig), xs)):
        with torch.no_grad():
            y = o(x)
            err = {u: (outs[u][i](x) - y).pow(2).sum().item() for u in outs}
        assert outs[True][i].kept == outs[False][i].kept
        assert err[True] < err[False], (i, err)


def test_update_composes_with_attention_passes_and_survives_save_load(tmp_path):
    model, calib = tiny_model("qwen2", inter=64), calib_ids(8, 16)
    passes = [a3mod.A3QK(ratio=0.3), a3mod.A3OV(ratio=0.3), a3mod.A3MLP(ratio=0.3, update=True)]
    a3mod.apply(model, passes, calib=calib, progress=False)
    out = a3mod.save(model, tmp_path / "c")
    back = a3mod.load(out)
    assert torch.equal(logits(back, input_ids()), logits(model, input_ids()))
    assert back.a3mod_info["passes"][2]["update"] is True


def test_streaming_with_update_equals_in_memory(tmp_path):
    passes = [a3mod.A3QK(ratio=0.3), a3mod.A3OV(ratio=0.3), a3mod.A3MLP(ratio=0.3, update=True, damping=0.05)]
    assert_streaming_equals_in_memory(tiny_model("llama"), tmp_path, passes, calib_ids(8, 16))


def test_config_options_are_checked_and_round_trip():
    p = a3mod.A3MLP(ratio=0.2, update=True, damping=0.1)
    assert pass_from_dict(pass_to_dict(p)) == p
    assert set(needs(p)) == {"a3", "hgram"} and needs(a3mod.A3MLP(ratio=0.2)) == ("a3",)
    for bad in (dict(update="yes"), dict(update=1), dict(damping=-0.1), dict(damping=float("nan")),
                dict(damping=float("inf")), dict(damping=True)):
        with pytest.raises(RatioError, match="A3MLP: (update|damping)="):
            a3mod.A3MLP(ratio=0.2, **bad)


def test_warns_when_the_calibration_is_small_for_the_gram():
    model = tiny_model("llama", inter=64)
    with pytest.warns(UserWarning, match="64 x 64 activation Gram from 64 calibration tokens"):
        a3mod.apply(model, [a3mod.A3MLP(ratio=0.3, update=True)], calib=calib_ids(4, 16), progress=False)
    model = tiny_model("llama", inter=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        a3mod.apply(model, [a3mod.A3MLP(ratio=0.3, update=True)], calib=calib_ids(64, 16), progress=False)
    assert get_path(model, "model.layers.0.mlp").down_proj.weight.shape[1] == 45


def test_allocate_with_mlp_update_allocates_on_the_post_update_losses():
    """Allocate(mlp_update=True) reads every MLP's loss curve after the update (the refitted error of each CUR
    prefix), keeps uniform A3's parameter count, and re-fits each kept MLP: lower total MLP error than allocating
    and keeping the selection alone."""
    from a3mod.math import solvers
    from a3mod.passes.allocate import curves
    calib = calib_ids(16, 16)
    orig = tiny_model("llama", inter=64, layers=3)
    xs = _mlp_inputs(orig, calib)
    stats = a3mod.collect(orig, calib, kinds=("a3", "hgram"), progress=False)
    views = layer_views(orig)
    cs = [c for c in curves(views, stats, 0.3, mlp_update=True) if c.comp == "mlp"]
    for c, v in zip(cs, views):
        w = v.down_module().weight.detach().double().t()
        h2 = stats.layers[v.index]["h2"]
        want = solvers.mlp_refit_losses(w, stats.layers[v.index]["hh"] / stats.n,
                                        (h2 * w.pow(2).sum(-1)).argsort(descending=True))
        torch.testing.assert_close(c.loss * want[c.uniform] if want[c.uniform] > 0 else c.loss, want)
    got, count = {}, {}
    for update in (False, True):
        m = tiny_model("llama", inter=64, layers=3)
        p = a3mod.Allocate(budget=0.3, mlp_update=update)
        assert set(needs(p)) == ({"a3", "hgram"} if update else {"a3"})
        a3mod.apply(m, [p], calib=calib, progress=False)
        got[update], count[update] = mlp_modules(m), sum(q.numel() for q in m.parameters())
    assert count[True] == count[False]
    err = {u: 0.0 for u in got}
    for i, (o, x) in enumerate(zip(mlp_modules(orig), xs)):
        with torch.no_grad():
            for u in got:
                err[u] += (got[u][i](x) - o(x)).pow(2).sum().item()
    assert err[True] < err[False], err
    with pytest.raises(RatioError, match="mlp_update=1"):
        a3mod.Allocate(budget=0.2, mlp_update=1)
    with pytest.raises(RatioError, match="ov_update='no'"):
        a3mod.Allocate(budget=0.2, ov_update="no")
    assert needs(a3mod.Allocate(budget=0.2, mlp_update=True, ov_update=True)) == ("a3", "hgram", "ogram")


def test_allocate_with_ov_update_refits_o_proj_at_the_same_ranks():
    calib = calib_ids(16, 16)
    orig = tiny_model("llama", kv_heads=2, layers=3)
    out = {}
    for update in (False, True):
        m = tiny_model("llama", kv_heads=2, layers=3)
        a3mod.apply(m, [a3mod.Allocate(budget=0.3, ov_update=update)], calib=calib, progress=False)
        out[update] = m
    dims = [[tuple(p.shape) for p in o.parameters()] for o in out.values()]
    assert dims[0] == dims[1]
    with torch.no_grad():
        err = {u: (m(calib).logits - orig(calib).logits).pow(2).mean().item() for u, m in out.items()}
    assert err[True] < err[False], err


# ------------------------------------------------------------------------------------------- OV update
@pytest.mark.parametrize("family,kw", [("llama", dict(kv_heads=2)), ("gpt2", {}), ("qwen2", dict(kv_heads=2))])
def test_ov_update_full_rank_exact_and_lowers_the_calibration_error(family, kw):
    model = tiny_model(family, **kw)
    ref = logits(model, input_ids())
    a3mod.apply(model, [a3mod.A3OV(rank=8, update=True)], calib=calib_ids(8, 16), progress=False)
    assert_close_logits(logits(model, input_ids()), ref, rel=1e-5)
    calib = calib_ids(32, 16)
    orig = tiny_model(family, **kw)
    errs = {}
    for update in (False, True):                      # attention-only reductions: layer 0 sees the same input
        m = tiny_model(family, **kw)
        p = a3mod.A3OV(ratio=0.5, update=update)
        assert set(needs(p)) == ({"a3", "ogram"} if update else {"a3"})
        a3mod.apply(m, [p], calib=calib, progress=False)
        with torch.no_grad():
            errs[update] = (m(calib).logits - orig(calib).logits).pow(2).mean().item()
    assert errs[True] < errs[False], errs


def test_ov_update_streams_like_in_memory(tmp_path):
    passes = [a3mod.A3QK(ratio=0.3), a3mod.A3OV(ratio=0.3, update=True), a3mod.A3MLP(ratio=0.3, update=True)]
    assert_streaming_equals_in_memory(tiny_model("qwen2", kv_heads=2), tmp_path, passes, calib_ids(8, 16))


# ------------------------------------------------------------------------------------------- sequential
def test_sequential_streaming_calibrates_on_the_compressed_inputs(tmp_path):
    """Layer 0 sees the same inputs either way (identical), later layers differ; the output loads, records how it
    was calibrated, and with nothing to compress (full ranks) the sequential run equals the plain one exactly."""
    from test_stream import _tensors
    model = tiny_model("llama", layers=3)
    src = tmp_path / "src"
    model.save_pretrained(src)
    calib = calib_ids(8, 16)
    passes = [a3mod.A3QK(ratio=0.3), a3mod.A3OV(ratio=0.3, update=True), a3mod.A3MLP(ratio=0.3, update=True)]
    plain = a3mod.compress_streaming(src, tmp_path / "plain", passes, calib, progress=False)
    seq = a3mod.compress_streaming(src, tmp_path / "seq", passes, calib, progress=False, sequential=True)
    (tp, _), (ts, _) = _tensors(plain), _tensors(seq)
    assert tp.keys() == ts.keys()
    layer = lambda k: int(k.split("layers.")[1].split(".")[0]) if "layers." in k else None  # noqa: E731
    for k in tp:
        if layer(k) == 0:
            assert torch.equal(tp[k], ts[k]), k
    assert any(not torch.equal(tp[k], ts[k]) for k in tp if layer(k) == 2 and tp[k].is_floating_point())
    m = a3mod.load(seq)
    assert m.a3mod_info.get("sequential") is True and "sequential" not in a3mod.load(plain).a3mod_info
    assert torch.isfinite(logits(m, input_ids())).all()
    full = [a3mod.A3QK(rank=8), a3mod.A3OV(rank=8), a3mod.A3MLP(rank=64)]
    a = a3mod.compress_streaming(src, tmp_path / "fa", full, calib, progress=False)
    b = a3mod.compress_streaming(src, tmp_path / "fb", full, calib, progress=False, sequential=True)
    assert_close_logits(logits(a3mod.load(b), input_ids()), logits(a3mod.load(a), input_ids()), rel=1e-5)


def test_sequential_is_checked():
    with pytest.raises(a3mod.A3ModError, match="sequential=1"):
        a3mod.compress_streaming("nowhere", "out", [a3mod.A3QK(ratio=0.2)], calib_ids(), sequential=1)


def test_obs_selection_through_the_pass(tmp_path):
    """A3MLP(select="obs", update=True): checked, round-trips, exact at full rank, keeps the set the solver ranks
    first (from the stats' Gram), with the update's weights; streams like in memory."""
    p = a3mod.A3MLP(ratio=0.3, update=True, select="obs")
    assert pass_from_dict(pass_to_dict(p)) == p and set(needs(p)) == {"a3", "hgram"}
    with pytest.raises(RatioError, match="select='best'; allowed: cur, obs"):
        a3mod.A3MLP(ratio=0.3, update=True, select="best")
    with pytest.raises(RatioError, match="update=True"):
        a3mod.A3MLP(ratio=0.3, select="obs")
    model = tiny_model("llama", inter=48)
    ref = logits(model, input_ids())
    a3mod.apply(model, [a3mod.A3MLP(rank=48, update=True, select="obs")], calib=calib_ids(8, 16), progress=False)
    assert_close_logits(logits(model, input_ids()), ref, rel=1e-5)
    from a3mod.math import solvers

    orig, calib = tiny_model("llama", inter=64), calib_ids(32, 16)
    stats = a3mod.collect(orig, calib, kinds=("a3", "hgram"), progress=False)
    got = tiny_model("llama", inter=64)
    a3mod.apply(got, [p], stats=stats, progress=False)
    for v, mlp in zip(layer_views(orig), mlp_modules(got)):
        w = v.down_module().weight.detach().double().t()
        hh = stats.layers[v.index]["hh"] / stats.n
        r = mlp.down_proj.weight.shape[1]
        kept = solvers.mlp_obs_order(w, hh, r, 0.01)[:r].sort().values
        assert list(mlp.kept) == kept.tolist()
        want = solvers.mlp_refit(w, hh, kept, 0.01, errors=False)[0].t()
        torch.testing.assert_close(mlp.down_proj.weight.double(), want, rtol=1e-5, atol=1e-6)
    assert_streaming_equals_in_memory(tiny_model("qwen2"), tmp_path, [p], calib_ids(16, 16))


def test_cli_mlp_select(tmp_path, text_file, capsys):
    from a3mod.cli.commands import main
    from conftest import make_tokenizer

    src = tmp_path / "tiny"
    tiny_model("llama", inter=64).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    args = ["compress", "--model", str(src), "--ratio", "0.3", "--calib", text_file, "--n-samples", "8",
            "--calib-seq-len", "16", "--no-eval"]
    assert main([*args, "--updates", "on", "--mlp-select", "obs", "--out", str(tmp_path / "o")]) == 0
    side = __import__("json").loads((tmp_path / "o" / "a3mod.json").read_text())
    assert side["passes"][2]["select"] == "obs" and side["passes"][2]["update"] is True
    for bad, says in ((["--updates", "off", "--mlp-select", "obs"], "--mlp-select obs keeps the neurons"),
                      (["--method", "svd-llm", "--mlp-select", "obs"], "--mlp-select is an option of method a3")):
        capsys.readouterr()
        assert main([*args, *bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "a3mod: error:" in err and says in err and not (tmp_path / "x").exists()
