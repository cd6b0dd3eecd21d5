"""The sequential re-fit (A3OV / A3MLP(seq_refit=True), a3mod.pipeline.seq_refit): equal to a brute-force reference
that re-fits o_proj and down_proj layer by layer from whole-model forwards, exact at full rank, never above the
error it starts from on the calibration windows, refused (model untouched) where it cannot run."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod.arch import get_path, layer_views
from a3mod.cli.commands import main
from a3mod.errors import A3ModError, UnsupportedModelError
from a3mod.pipeline import seq_refit

from conftest import calib_ids, input_ids, logits, make_tokenizer, tiny_model
from zoo import _ids, tiny_zoo_model


def passes(ratio: float = 0.3, refit: bool = True, update: bool = True, refit_damping=None, **rank) -> list:
    ps = a3mod.a3_passes(ratio) if not rank else [a3mod.A3QK(rank=rank["qk"]), a3mod.A3OV(rank=rank["ov"]),
                                                  a3mod.A3MLP(rank=rank["mlp"])]
    return [dataclasses.replace(p, update=update, seq_refit=refit, refit_damping=refit_damping)
            if hasattr(p, "seq_refit") and not isinstance(p, a3mod.A3QK) else p for p in ps]    # QK: its own tests


def _record(model, ids, mods: dict) -> dict:
    """{name: [output or input per window]} of `mods` ({name: (module, "in"|"out")}) over every window of ids."""
    got = {k: [] for k in mods}
    hs = []
    for k, (m, side) in mods.items():
        if side == "in":
            hs.append(m.register_forward_pre_hook(lambda mod, a, k=k: got[k].append(a[0].double())))
        else:
            hs.append(m.register_forward_hook(lambda mod, a, y, k=k: got[k].append(y.double())))
    with torch.no_grad():
        for b in range(ids.shape[0]):
            model(ids[b:b + 1])
    for h in hs:
        h.remove()
    return {k: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]) for k, v in got.items()}


def _solve(lin, u, t, damping):
    """argmin |U W - T|^2/n + lam |W - W0|^2, lam = damping * mean diag(U^T U / n), by a plain linear solve."""
    g = u.T @ u / u.shape[0]
    lam = damping * g.diagonal().mean()
    w0 = lin.weight.double().T
    return torch.linalg.solve(g + lam * torch.eye(g.shape[0], dtype=g.dtype), u.T @ t / u.shape[0] + lam * w0)


def _ridge(lin, u, t, damping, windows: int):
    """Brute force on the rows of `windows` equal windows; damping "heldout": the GRID value whose fit on the other
    windows has the least squared error on every HOLD-th one (the last of fewer), then fitted on all rows."""
    t = t - (lin.bias.double() if lin.bias is not None else 0)
    if damping == "heldout":
        per = u.shape[0] // windows
        held = torch.tensor([(b % seq_refit.HOLD == seq_refit.HOLD - 1) or (windows < seq_refit.HOLD and
                                                                          b == windows - 1) for b in range(windows)])
        held = held.repeat_interleave(per)
        errs = [((u[held] @ _solve(lin, u[~held], t[~held], d) - t[held]) ** 2).sum() for d in seq_refit.GRID]
        damping = seq_refit.GRID[int(torch.stack(errs).argmin())]
    w = _solve(lin, u, t, damping)
    with torch.no_grad():
        lin.weight.copy_(w.T.to(lin.weight.dtype))


def reference(orig, calib, ratio: float, damping=0.01):
    """A3 + both updates, then for each layer in order: o_proj, then down_proj, fitted by ridge least squares on
    what whole forwards of the compressed model give them, toward the original layer's parts plus the drift."""
    comp = copy.deepcopy(orig)
    a3mod.apply(comp, passes(ratio, refit=False), calib=calib, progress=False)
    vo = layer_views(orig)
    for i, v in enumerate(vo):
        lay = get_path(comp, v.spec.layers)[i]
        o, down = lay.self_attn.o_proj, lay.mlp.down_proj
        mid_o, mid_c = get_path(v.layer, v.spec.norms[1]), get_path(lay, v.spec.norms[1])
        r = _record(orig, calib, {"h": (v.layer, "in"), "a": (v.o_module(), "out"), "mid": (mid_o, "in"),
                                  "m": (v.down_module(), "out")})
        c = _record(comp, calib, {"h": (lay, "in"), "z": (o, "in")})
        _ridge(o, c["z"], r["a"] + r["h"] - c["h"], damping, calib.shape[0])
        c = _record(comp, calib, {"mid": (mid_c, "in"), "u": (down, "in")})
        _ridge(down, c["u"], r["m"] + r["mid"] - c["mid"], damping, calib.shape[0])
    return comp


@pytest.mark.parametrize("family,damping,windows", [("llama", None, 24), ("qwen2", None, 24),
                                                    ("llama", "heldout", 24), ("qwen2", "heldout", 3)])
def test_equal_to_the_brute_force_reference(family, damping, windows):
    orig = tiny_model(family, kv_heads=2, layers=3)
    calib = calib_ids(windows, 16)
    got = copy.deepcopy(orig)
    a3mod.apply(got, passes(0.3, refit_damping=damping), calib=calib, progress=False)
    ref = reference(orig, calib, 0.3, damping or 0.01)
    for (n, a), (_, b) in zip(got.named_parameters(), ref.named_parameters()):      # fp32 products, float64 sums
        assert (a - b).abs().max() <= 2e-4 * b.abs().max(), n
    plain = copy.deepcopy(orig)
    a3mod.apply(plain, passes(0.3, refit=False), calib=calib, progress=False)
    moved = [n for (n, a), (_, b) in zip(got.named_parameters(), plain.named_parameters()) if not torch.equal(a, b)]
    assert moved and all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in moved)
    assert got.a3mod_info["passes"][1]["seq_refit"] and got.a3mod_info["passes"][2]["seq_refit"]


def test_full_rank_reproduces_the_original():
    orig = tiny_model("llama", kv_heads=2, layers=3)
    got = copy.deepcopy(orig)
    a3mod.apply(got, passes(qk=8, ov=8, mlp=64), calib=calib_ids(16, 16), progress=False)
    ids = input_ids()
    ref = logits(orig, ids)
    assert (logits(got, ids) - ref).abs().max() <= 1e-4 * ref.abs().max()


def refit_errors(model, ps, calib) -> list[dict]:
    """apply(model, ps, calib) with every layer's re-fit errors ({part: (before, after, damping)}) recorded."""
    errors = []
    real = seq_refit.refit_layer

    def spy(*a, **k):
        h, err = real(*a, **k)
        errors.append(err)
        return h, err

    try:
        seq_refit.refit_layer = spy
        a3mod.apply(model, ps, calib=calib, progress=False)
    finally:
        seq_refit.refit_layer = real
    return errors


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.sampled_from([0.2, 0.4, 0.6]), update=st.booleans())
def test_each_refit_ends_no_worse_than_it_started(seed, ratio, update):
    model = tiny_model("llama", seed=seed % 7, kv_heads=2, layers=3)
    errors = refit_errors(model, passes(ratio, update=update), calib_ids(12, 16, seed=seed))
    assert [sorted(e) for e in errors] == [["down", "o"]] * 3
    for e in errors:
        for before, after, damping in e.values():
            assert after <= before * (1 + 1e-9) + 1e-12 and damping == 0.01


def test_heldout_damping_is_chosen_per_layer_and_part():
    """refit_damping="heldout": each re-fit reports a damping of GRID (not all the same here), and never ends above
    where it started on the calibration windows."""
    model = tiny_model("llama", kv_heads=2, layers=3)
    errors = refit_errors(model, passes(0.5, refit_damping="heldout"), calib_ids(64, 16))
    chosen = [d for e in errors for _, _, d in e.values()]
    assert len(chosen) == 6 and set(chosen) <= set(seq_refit.GRID) and len(set(chosen)) > 1
    assert all(after <= before * (1 + 1e-9) + 1e-12 for e in errors for before, after, _ in e.values())


@pytest.mark.parametrize("kw,match", [(dict(refit_damping="heldout"), "seq_refit=True"),
                                      (dict(seq_refit=True, refit_damping="best"), "refit_damping"),
                                      (dict(seq_refit=True, refit_damping=-0.1), "refit_damping"),
                                      (dict(seq_refit=True, refit_damping=True), "refit_damping")])
def test_bad_refit_damping_is_refused(kw, match):
    from a3mod.errors import RatioError

    for cls in (a3mod.A3OV, a3mod.A3MLP):
        with pytest.raises(RatioError, match=match):
            cls(ratio=0.2, **kw)
    assert a3mod.A3MLP(ratio=0.2, seq_refit=True, refit_damping=1).refit_damping == 1.0


def test_heldout_with_one_window_is_refused_before_any_work(tmp_path, monkeypatch):
    from a3mod.errors import CalibrationError
    from a3mod.pipeline import layerwise

    model = tiny_model("llama", kv_heads=2)
    before = _params(model)
    monkeypatch.setattr(layerwise, "_capture", lambda *a: pytest.fail("calibration started"))
    with pytest.raises(A3ModError, match="at least 2"):
        a3mod.apply(model, passes(0.3, refit_damping="heldout"), calib=calib_ids(1, 16), progress=False)
    assert _untouched(model, before)
    src = tmp_path / "src"
    model.save_pretrained(src)
    with pytest.raises(CalibrationError, match="at least 2 batches"):
        a3mod.compress_streaming(src, tmp_path / "out", passes(0.3, refit_damping="heldout")[:3], calib_ids(4, 16),
                                 batch_size=4, progress=False)
    assert not (tmp_path / "out").exists()


def _params(model) -> dict:
    return {n: p.clone() for n, p in model.state_dict().items()}


def _untouched(model, before: dict) -> bool:
    now = model.state_dict()
    return set(now) == set(before) and all(torch.equal(now[n], before[n]) for n in before)


@pytest.mark.parametrize("mtype,error", [("gemma2", UnsupportedModelError), ("mixtral", UnsupportedModelError)])
def test_layouts_it_does_not_cover_are_refused_and_the_model_is_untouched(mtype, error, monkeypatch):
    from a3mod.pipeline import layerwise

    model = tiny_zoo_model(mtype)
    before = _params(model)
    monkeypatch.setattr(layerwise, "_capture", lambda *a: pytest.fail("calibration started"))
    with pytest.raises(error, match="seq_refit"):
        a3mod.apply(model, passes(0.3), calib=_ids(4, 16, 1), progress=False)
    assert _untouched(model, before)


@pytest.mark.parametrize("mtype,ok", [("llama", True), ("qwen2", True), ("mistral", True), ("gemma2", False),
                                      ("gemma3_text", False), ("cohere", False), ("mixtral", False)])
def test_layout_probe(mtype, ok):
    model = tiny_zoo_model(mtype)
    problem = seq_refit.layout_problem(model, layer_views(model), _ids(1, 12, 0))
    assert (problem is None) == ok, problem


def test_statistics_given_instead_of_calibration_are_refused():
    model = tiny_model("llama", kv_heads=2)
    stats = a3mod.collect(model, calib_ids(8, 16), kinds=["a3", "hgram", "ogram"], progress=False)
    before = _params(model)
    with pytest.raises(A3ModError, match="needs calib="):
        a3mod.apply(model, passes(0.3), stats=stats, progress=False)
    assert _untouched(model, before)


@pytest.mark.parametrize("family,offload,damping", [("llama", False, None), ("llama", True, None),
                                                    ("qwen2", False, None), ("qwen2", True, "heldout")])
def test_streaming_equals_in_memory(tmp_path, family, offload, damping):
    """compress_streaming carries the compressed stream beside the original one (two hidden-state stores): the
    checkpoint equals apply + save."""
    from test_stream import assert_same_checkpoint, in_memory, saved_source

    src = saved_source(tmp_path, family)
    calib, ps = calib_ids(16, 16), passes(0.3, refit_damping=damping)[:3]
    ref = in_memory(tmp_path, src, ps, calib)
    off = tmp_path / "off" if offload else None
    out = a3mod.compress_streaming(src, tmp_path / "out", ps, calib, progress=False, offload_dir=off)
    assert_same_checkpoint(out, ref, rel=1e-5)
    assert off is None or list(off.iterdir()) == []


def test_streaming_resumes_both_streams(tmp_path, monkeypatch):
    from a3mod.pipeline import workdir
    from test_stream import Interrupt, assert_same_checkpoint, killed_at, saved_source

    src = saved_source(tmp_path, "llama")
    calib, ps = calib_ids(16, 16), passes(0.3)[:3]
    ref = a3mod.compress_streaming(src, tmp_path / "ref", ps, calib, progress=False)
    write = workdir.write_layer
    monkeypatch.setattr(workdir, "write_layer", killed_at(2))
    with pytest.raises(Interrupt):
        a3mod.compress_streaming(src, tmp_path / "out", ps, calib, progress=False)
    assert list(workdir.work_dir(tmp_path / "out").glob("hiddenc_*"))       # the compressed stream's checkpoint
    monkeypatch.setattr(workdir, "write_layer", write)
    out = a3mod.compress_streaming(src, tmp_path / "out", ps, calib, progress=False)
    assert_same_checkpoint(out, ref, rel=0.0)


def test_streaming_refuses_it_with_sequential_statistics(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", kv_heads=2).save_pretrained(src)
    with pytest.raises(A3ModError, match="choose one"):
        a3mod.compress_streaming(src, tmp_path / "out", passes(0.3)[:3], calib_ids(4, 16), sequential=True)
    assert not (tmp_path / "out").exists()


def test_cli_seq_refit_end_to_end(tmp_path, text_file):
    src = tmp_path / "tiny"
    orig = tiny_model("llama", kv_heads=2)
    orig.save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    args = ["compress", "--model", str(src), "--ratio", "0.3", "--calib", text_file, "--n-samples", "8",
            "--calib-seq-len", "16", "--no-eval", "--updates", "on"]
    assert main([*args, "--seq-refit", "--out", str(out)]) == 0
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    side = json.loads((out / "a3mod.json").read_text())
    assert [p.get("seq_refit") for p in side["passes"]][1:3] == [True, True]
    assert [p.get("refit_damping") for p in side["passes"]][1:3] == ["heldout", "heldout"]      # the CLI's default
    a, b = a3mod.load(str(out)), a3mod.load(str(tmp_path / "plain"))
    assert not torch.equal(a.model.layers[0].mlp.down_proj.weight, b.model.layers[0].mlp.down_proj.weight)
    for bad in (["--stats", str(tmp_path / "st.safetensors")], ["--stream", "--sequential"]):
        assert main([*args, "--seq-refit", *bad, "--out", str(tmp_path / "x")]) == 2
        assert not (tmp_path / "x").exists() and not (tmp_path / "st.safetensors").exists()
    assert main([*args, "--seq-refit", "--stream", "--out", str(tmp_path / "s")]) == 0
    c = a3mod.load(str(tmp_path / "s"))
    ids = input_ids()
    assert torch.allclose(logits(c, ids), logits(a, ids), rtol=1e-4, atol=1e-5)


def test_cli_seq_refit_keeps_the_loss_statistic_in_stats(tmp_path, text_file, monkeypatch):
    """--seq-refit --mlp-select taylor --stats F: the first run writes the loss statistic to F, the second reuses it
    (no backward pass) and gives the same model."""
    import a3mod.calib.stats as stats_mod

    calls = []
    real = stats_mod.taylor_sums
    monkeypatch.setattr(stats_mod, "taylor_sums", lambda *a, **k: calls.append(1) or real(*a, **k))
    src = tmp_path / "tiny"
    tiny_model("llama", kv_heads=2).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    f = tmp_path / "st.safetensors"
    args = ["compress", "--model", str(src), "--ratio", "0.3", "--calib", text_file, "--n-samples", "8",
            "--calib-seq-len", "16", "--no-eval", "--updates", "on", "--seq-refit", "--mlp-select", "taylor",
            "--stats", str(f)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert len(calls) == 1 and a3mod.Stats.load(f).kinds == {"taylor"}
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert len(calls) == 1
    a, b = a3mod.load(str(tmp_path / "a")), a3mod.load(str(tmp_path / "b"))
    assert torch.equal(logits(a, input_ids()), logits(b, input_ids()))


def test_outputs_from_kept_inputs_equal_a_third_pass(monkeypatch):
    """down_proj's kept inputs give the layer's outputs (mid + down_proj(u)) as a third pass through the layer would."""
    orig = tiny_model("llama", kv_heads=2, layers=3)
    calib = calib_ids(12, 16)
    a, b = copy.deepcopy(orig), copy.deepcopy(orig)
    a3mod.apply(a, passes(0.3), calib=calib, progress=False)
    monkeypatch.setattr(seq_refit, "KEEP_BYTES", 0)
    a3mod.apply(b, passes(0.3), calib=calib, progress=False)
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), n


def test_cli_refit_damping(tmp_path, text_file, capsys):
    src = tmp_path / "tiny"
    tiny_model("llama", kv_heads=2).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    args = ["compress", "--model", str(src), "--ratio", "0.3", "--calib", text_file, "--n-samples", "8",
            "--calib-seq-len", "16", "--no-eval", "--updates", "on"]
    assert main([*args, "--seq-refit", "--refit-damping", "heldout", "--out", str(tmp_path / "h")]) == 0
    side = json.loads((tmp_path / "h" / "a3mod.json").read_text())
    assert [p.get("refit_damping") for p in side["passes"]][1:3] == ["heldout", "heldout"]
    assert main([*args, "--seq-refit", "--refit-damping", "0.01", "--out", str(tmp_path / "d")]) == 0
    side = json.loads((tmp_path / "d" / "a3mod.json").read_text())
    assert [p.get("refit_damping") for p in side["passes"]][1:3] == [0.01, 0.01]
    for bad, says in ((["--refit-damping", "0.1"], "--refit-damping is the damping of --seq-refit"),
                      (["--seq-refit", "--refit-damping", "best"], "neither heldout nor a number"),
                      (["--seq-refit", "--refit-damping", "-1"], "finite number >= 0")):
        capsys.readouterr()
        with pytest.raises(SystemExit) if "best" in bad or "-1" in bad else contextlib.nullcontext():
            assert main([*args, *bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "a3mod: error:" in err and says in err and "Traceback" not in err
        assert not (tmp_path / "x").exists()
