"""Calibration statistics against a direct computation, Stats files, token windows, perplexity."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import a3mod
from a3mod import CalibrationError

from conftest import VOCAB, calib_ids, tiny_model

STAT_NAMES = ("q", "k", "v", "v1", "o", "o1", "h2")      # the statistic sums of a dense layer


def _capture(model):
    """Hooks that record each layer's attention input, o_proj input and down_proj input."""
    from a3mod.arch import layer_views

    seen = {i: {"x": [], "o": [], "h": []} for i in range(len(layer_views(model)))}
    handles = []
    for v in layer_views(model):
        i = v.index

        def on_attn(mod, args, kwargs, i=i):
            seen[i]["x"].append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach())

        handles.append(v.attn.register_forward_pre_hook(on_attn, with_kwargs=True))
        handles.append(v.o_module().register_forward_pre_hook(lambda m, a, i=i: seen[i]["o"].append(a[0].detach())))
        handles.append(v.down_module().register_forward_pre_hook(
            lambda m, a, i=i: seen[i]["h"].append(a[0].detach())))
    return seen, handles


def _sum_outer(z: torch.Tensor, heads: int):
    z = z.reshape(-1, heads, z.shape[-1] // heads).double()       # (N, heads, d)
    return torch.einsum("nhi,nhj->hij", z, z), z.sum(0)


def _close(a, b, rel=1e-6):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item() + 1e-12, err


@pytest.mark.parametrize("family,kw", [
    ("llama", dict(kv_heads=2, attention_bias=True)),
    ("qwen2", dict(kv_heads=1)),
    ("gpt2", dict()),
])
def test_collect_matches_direct_computation(family, kw):
    model = tiny_model(family, **kw)
    calib = calib_ids(3, 16)
    seen, handles = _capture(model)
    with torch.no_grad():
        model(calib, use_cache=False)
    for h in handles:
        h.remove()
    stats = a3mod.collect(model, calib, progress=False)
    assert stats.n == 48
    assert len(stats.layers) == 2
    from a3mod.arch import layer_views

    for v in layer_views(model):
        st = stats.layers[v.index]
        assert set(st) == set(STAT_NAMES)
        assert all(t.dtype == torch.float64 for t in st.values())
        x = seen[v.index]["x"][0].reshape(-1, v.dims.hidden).double()
        (wq, bq), (wk, bk), (wv, bv) = v.qkv_params()
        lin = lambda w, b: x @ w.double().T + (0 if b is None else b.double())  # noqa: E731
        q, k, val = lin(wq, bq), lin(wk, bk), lin(wv, bv)
        _close(st["q"], _sum_outer(q, v.dims.heads)[0])
        _close(st["k"], _sum_outer(k, v.dims.kv_heads)[0])
        vv, v1 = _sum_outer(val, v.dims.kv_heads)
        _close(st["v"], vv)
        _close(st["v1"], v1)
        oo, o1 = _sum_outer(seen[v.index]["o"][0], v.dims.heads)
        _close(st["o"], oo)
        _close(st["o1"], o1)
        h = seen[v.index]["h"][0].reshape(-1, seen[v.index]["h"][0].shape[-1]).double()
        _close(st["h2"], h.pow(2).sum(0))
        # the o statistic is the softmax-weighted value: for head 0 recompute it from q, k, v directly
        if family == "gpt2":
            d, T = v.dims.head_dim, 16
            qh, kh, vh = (t.view(3, T, -1)[..., :d] for t in (q, k, val))
            w = (qh @ kh.mT * v.attn.scaling).masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf).softmax(-1)
            o0 = (w @ vh).reshape(-1, d)
            _close(st["o"][0], o0.T @ o0)


def test_collect_is_batch_independent_and_clean():
    model = tiny_model("llama", kv_heads=2)
    model.train()
    calib = calib_ids(4, 16)
    a = a3mod.collect(model, calib, batch_size=1, progress=False)
    b = a3mod.collect(model, calib, batch_size=3, progress=False)
    assert model.training                                          # mode restored
    for m in model.modules():                                      # hooks removed
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert a.n == b.n == 64
    for la, lb in zip(a.layers, b.layers):
        for name in STAT_NAMES:
            _close(la[name], lb[name], rel=1e-10)


def test_collect_int32_tokens():
    model = tiny_model("gpt2")
    a = a3mod.collect(model, calib_ids(), progress=False)
    b = a3mod.collect(model, calib_ids().int(), progress=False)
    assert all(torch.equal(a.layers[i][k], b.layers[i][k]) for i in range(2) for k in STAT_NAMES)


def test_stats_moment_and_save_load(tmp_path):
    stats = a3mod.collect(tiny_model("qwen2", kv_heads=2), calib_ids(), progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    back = a3mod.Stats.load(path)
    assert back.n == stats.n and len(back.layers) == len(stats.layers)
    for la, lb in zip(stats.layers, back.layers):
        assert la.keys() == lb.keys()
        for k in la:
            assert la[k].dtype == lb[k].dtype and torch.equal(la[k], lb[k])


def test_saved_stats_compress_identically(tmp_path):
    model = tiny_model("llama", kv_heads=2)
    stats = a3mod.collect(model, calib_ids(), progress=False)
    stats.save(tmp_path / "s.safetensors")
    a = a3mod.apply(tiny_model("llama", kv_heads=2), a3mod.a3_passes(0.3), stats=stats, progress=False)
    b = a3mod.apply(tiny_model("llama", kv_heads=2), a3mod.a3_passes(0.3),
                    stats=a3mod.Stats.load(tmp_path / "s.safetensors"), progress=False)
    c = a3mod.apply(tiny_model("llama", kv_heads=2), a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]) for k in sa)


# ------------------------------------------------------------------------------------- token windows
def test_calibration_data_windows(text_file, tokenizer):
    ids = a3mod.eval_tokens(tokenizer, text_file)
    assert ids.dtype == torch.int64 and ids.dim() == 1 and 300 < ids.numel() < 700
    calib = a3mod.calibration_data(tokenizer, text_file, n_samples=5, seq_len=16, seed=3)
    assert calib.shape == (5, 16) and calib.dtype == torch.int64
    assert int(calib.max()) < VOCAB
    full = ids.tolist()
    for row in calib.tolist():                                   # every window is a contiguous slice
        assert any(full[s:s + 16] == row for s in range(len(full) - 15))
    assert torch.equal(calib, a3mod.calibration_data(tokenizer, text_file, n_samples=5, seq_len=16, seed=3))
    other = a3mod.calibration_data(tokenizer, text_file, n_samples=5, seq_len=16, seed=4)
    assert not torch.equal(calib, other)


def test_calibration_data_feeds_apply(text_file, tokenizer):
    calib = a3mod.calibration_data(tokenizer, text_file, n_samples=4, seq_len=16)
    model = a3mod.apply(tiny_model("llama"), a3mod.a3_passes(0.25), calib=calib, progress=False)
    assert model.a3mod_info["calib_tokens"] == 64


def test_calibration_data_text_of_exactly_seq_len(tmp_path, tokenizer):
    path = tmp_path / "exact.txt"
    path.write_text(" ".join(f"w{i}" for i in range(16)) + "\n")
    calib = a3mod.calibration_data(tokenizer, str(path), n_samples=2, seq_len=16)
    assert calib.tolist() == [list(range(2, 18))] * 2


def test_named_source_without_assets(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("A3MOD_ASSETS", str(tmp_path))
    with pytest.raises(a3mod.A3ModError, match="wikitext2"):
        a3mod.calibration_data(tokenizer, "wikitext2", n_samples=1, seq_len=8)
    with pytest.raises(a3mod.A3ModError, match="no-such-file.txt"):
        a3mod.eval_tokens(tokenizer, str(tmp_path / "no-such-file.txt"))


# ----------------------------------------------------------------------------------------- perplexity
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_by_hand(text_file, tokenizer, batch_size):
    model = tiny_model("llama", kv_heads=2)
    ids = a3mod.eval_tokens(tokenizer, text_file)
    seq = 16
    res = a3mod.perplexity(model, ids, seq_len=seq, batch_size=batch_size, progress=False)
    n = ids.numel() // seq
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = ids[w * seq:(w + 1) * seq][None]
            lg = model(x).logits[0, :-1].double()
            total += nn.functional.cross_entropy(lg, x[0, 1:], reduction="sum").item()
            count += seq - 1
    assert res["windows"] == n and res["tokens"] == count and res["seq_len"] == seq
    assert res["nll"] == pytest.approx(total / count, rel=1e-6)
    assert res["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert 1.0 < res["ppl"] < 10 * VOCAB


def test_perplexity_max_windows_and_too_short(tokenizer, text_file):
    model = tiny_model("gpt2")
    ids = a3mod.eval_tokens(tokenizer, text_file)
    first = a3mod.perplexity(model, ids, seq_len=8, max_windows=2, progress=False)
    assert first["windows"] == 2 and first["tokens"] == 14
    assert first == a3mod.perplexity(model, ids[:16], seq_len=8, progress=False)
    with pytest.raises(a3mod.A3ModError, match="7 tokens, fewer than one window of seq_len=8"):
        a3mod.perplexity(model, ids[:7], seq_len=8, progress=False)


def test_full_rank_keeps_perplexity(text_file, tokenizer):
    ids = a3mod.eval_tokens(tokenizer, text_file)
    model = tiny_model("mistral", kv_heads=2)
    before = a3mod.perplexity(model, ids, seq_len=16, progress=False)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=a3mod.calibration_data(tokenizer, text_file, 4, 16),
                progress=False)
    after = a3mod.perplexity(model, ids, seq_len=16, progress=False)
    assert after["ppl"] == pytest.approx(before["ppl"], rel=1e-5)


def test_calibration_from_datasets(tmp_path, tokenizer):
    """A datasets.Dataset, a save_to_disk folder (DatasetDict: folder@split) and a text file with the same rows
    give the same windows; column choice and bad sources are CalibrationErrors naming what is allowed."""
    datasets = pytest.importorskip("datasets")
    from a3mod import calibration_data

    rows = [f"line {i} of the calibration text, with some words.\n" if i % 5 else "" for i in range(200)]
    (tmp_path / "t.txt").write_text("".join(r or "\n" for r in rows))
    ds = datasets.Dataset.from_dict({"text": rows, "id": list(range(200))})
    ref = calibration_data(tokenizer, str(tmp_path / "t.txt"), 3, 16, seed=4)
    assert torch.equal(calibration_data(tokenizer, ds, 3, 16, seed=4), ref)
    ds.save_to_disk(str(tmp_path / "disk"))
    assert torch.equal(calibration_data(tokenizer, str(tmp_path / "disk"), 3, 16, seed=4), ref)
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert torch.equal(calibration_data(tokenizer, f"{tmp_path / 'dd'}@train", 3, 16, seed=4), ref)
    with pytest.raises(CalibrationError, match=r"splits \['train'\]"):
        calibration_data(tokenizer, str(tmp_path / "dd"), 3, 16)
    two = datasets.Dataset.from_dict({"a": ["x"] * 3, "b": ["y"] * 3})
    with pytest.raises(CalibrationError, match="which one is the text"):
        calibration_data(tokenizer, two, 1, 2)
    with pytest.raises(CalibrationError, match="hf:NAME"):
        calibration_data(tokenizer, "hf:", 1, 2)

def test_unreachable_hub_dataset_is_a_calibration_error(tokenizer, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from a3mod import calibration_data

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)      # no network wait in the test
    with pytest.raises(CalibrationError, match="cannot be loaded"):
        calibration_data(tokenizer, "hf:surely-not-a-dataset-a3mod@train", 1, 2)


def test_cli_calibrates_from_a_dataset_folder(tmp_path, tokenizer, text_file):
    datasets = pytest.importorskip("datasets")
    from a3mod.cli.commands import main

    from conftest import tiny_model
    src = tmp_path / "model"
    tiny_model("llama", kv_heads=2).save_pretrained(src)
    tokenizer.save_pretrained(src)
    rows = open(text_file).read().split("\n")
    datasets.Dataset.from_dict({"text": rows}).save_to_disk(str(tmp_path / "disk"))
    assert main(["compress", "--model", str(src), "--ratio", "0.2", "--out", str(tmp_path / "out"), "--calib",
                 str(tmp_path / "disk"), "--n-samples", "2", "--calib-seq-len", "16", "--no-eval"]) == 0
    assert main(["compress", "--model", str(src), "--ratio", "0.2", "--out", str(tmp_path / "o2"), "--calib",
                 "hf:", "--no-eval"]) == 2


def test_heal_lowers_the_distillation_loss_and_round_trips(tmp_path):
    """a3mod.heal: the KL to the original on the calibration windows falls; only the decoder layers change; the
    healed model saves and loads exactly, with the run recorded; bad arguments are refused before any step."""
    import copy

    from a3mod import A3ModError

    model = tiny_model("llama", kv_heads=2).eval()
    teacher, calib = copy.deepcopy(model), calib_ids(n=8, seq_len=32)
    a3mod.apply(model, a3mod.a3_passes(0.4), calib=calib, progress=False)

    def kl():
        with torch.no_grad():
            lt = torch.log_softmax(teacher(calib).logits, -1)
            return float((lt.exp() * (lt - torch.log_softmax(model(calib).logits, -1))).sum(-1).mean())

    before, emb = kl(), model.model.embed_tokens.weight.clone()
    rec = a3mod.heal(model, teacher, calib, steps=40, lr=3e-3, progress=False)
    assert kl() < 0.5 * before and rec["loss_last"] < rec["loss_first"]
    assert torch.equal(model.model.embed_tokens.weight, emb)
    assert not any(p.grad is not None for p in model.parameters())
    back = a3mod.load(a3mod.save(model, tmp_path / "h"))
    assert torch.equal(back(calib).logits, model(calib).logits) and back.a3mod_info["heal"]["steps"] == 40
    for kw, match in (({"steps": 0}, "steps=0"), ({"lr": 2.0}, "lr=2.0")):
        with pytest.raises(A3ModError, match=match):
            a3mod.heal(model, teacher, calib, progress=False, **kw)
    with pytest.raises(A3ModError, match="teacher is the model"):
        a3mod.heal(model, model, calib, progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collecting_statistics_leaves_the_activations_the_model_runs_on_alone(dtype):
    """The statistic hooks read activations and never change them (a float64 model's MLP input was squared in place
    by the "a3" kind's sum of squares: every later layer saw other inputs)."""
    from a3mod.arch import layer_views
    from a3mod.calib.stats import recording

    model = tiny_model("llama", layers=3).to(dtype).eval()
    ids = calib_ids(2, 16)
    with torch.no_grad():
        ref = model(ids).logits
        with recording(layer_views(model), ["a3", "hgram", "ogram", "gram", "absmean"]) as accs:
            got = model(ids).logits
    assert accs[0]["h2"].dtype == torch.float64
    assert torch.equal(got, ref)


@pytest.mark.parametrize("d", [7, 511, 512, 700, 2048, 2049, 2600])
def test_add_gram_sums_the_full_gram_in_float64(d, monkeypatch):
    """The block-row Gram (upper triangle, mirrored) of batches gathered in chunks (uneven batches: chunks, a batch
    long enough to be one alone, a remainder at the end) equals X^T X in float64 to fp32 products' round-off; a batch
    changed in place after it was added does not change the sum; bf16 batches are multiplied in fp32; a float64
    input gives float64 products."""
    from a3mod.calib import sums

    monkeypatch.setattr(sums, "CHUNK_ROWS", 100)
    g = torch.Generator().manual_seed(d)
    scale = 1 + torch.rand(d, generator=g) * 10
    xs = [torch.randn(r, d, generator=g) * scale for r in (70, 70, 70, 130, 30)]
    acc = {}
    for x in xs:
        sums.add_gram(acc, "hh", x)
        x.mul_(-3.0).add_(1.0)                     # the model reusing its buffer
    sums.finish(acc)
    ref = sum(x.double().add(-1.0).div(-3.0).mT @ x.double().add(-1.0).div(-3.0) for x in xs)
    assert acc["hh"].dtype == torch.float64
    torch.testing.assert_close(acc["hh"], acc["hh"].mT, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert float((acc["hh"] - ref).abs().max() / ref.abs().max()) < 1e-5
    bf = {}
    for x in xs:
        sums.add_gram(bf, "hh", x.bfloat16())
    xb = torch.cat([x.bfloat16().double() for x in xs])
    assert float((sums.finish(bf)["hh"] - xb.mT @ xb).abs().max() / (xb.mT @ xb).abs().max()) < 1e-6
    acc64 = {}
    sums.add_gram(acc64, "hh", xs[0].double())
    x0 = xs[0].double()
    torch.testing.assert_close(sums.finish(acc64)["hh"], x0.mT @ x0, rtol=1e-12, atol=1e-9)
