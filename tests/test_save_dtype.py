"""Checkpoints are saved in the source checkpoint's dtype by default (a bf16 model compressed in float32 comes out in
bf16, half the bytes), or the dtype asked for; streaming does the same; an overflowing cast writes nothing."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import a3mod
from a3mod.cli import main

from conftest import calib_ids, input_ids, make_tokenizer, tiny_model


def _dtypes(folder) -> set:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys() if f.get_slice(k).get_dtype().startswith(("F", "BF"))}


@pytest.fixture
def bf16_source(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", kv_heads=2).to(torch.bfloat16).save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    return src


def test_default_save_keeps_the_source_dtype(tmp_path, bf16_source):
    model, _ = a3mod.load_pretrained(str(bf16_source))                  # float32 compute
    assert model.dtype == torch.float32 and model.a3mod_source_dtype == torch.bfloat16
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    auto = a3mod.save(model, tmp_path / "auto")
    full = a3mod.save(model, tmp_path / "f32", dtype=torch.float32)
    assert _dtypes(auto) == {"BF16"} and _dtypes(full) == {"F32"}
    assert json.loads((auto / "config.json").read_text())["dtype"] == "bfloat16"
    ratio = (auto / "model.safetensors").stat().st_size / (full / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    back = a3mod.load(auto)
    assert back.dtype == torch.bfloat16 and back.a3mod_source_dtype == torch.bfloat16
    ref = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())
    again = a3mod.save(back, tmp_path / "again")                        # a re-save keeps bf16
    assert (again / "model.safetensors").read_bytes() == (auto / "model.safetensors").read_bytes()
    native = a3mod.load(a3mod.save(model, tmp_path / "none", dtype=None))
    assert native.dtype == torch.float32


def test_bad_save_dtypes_are_refused_before_writing(tmp_path):
    model = a3mod.apply(tiny_model("llama"), a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    for bad in ("int8", torch.int64, "fp8"):
        with pytest.raises(a3mod.A3ModError, match="dtype"):
            a3mod.save(model, tmp_path / "x", dtype=bad)
        assert not (tmp_path / "x").exists()


def test_a_cast_that_overflows_writes_nothing(tmp_path):
    model = a3mod.apply(tiny_model("llama"), a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e6           # beyond float16's 65504
    with pytest.raises(a3mod.CheckpointError, match="overflow torch.float16"):
        a3mod.save(model, tmp_path / "x", dtype=torch.float16)
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


def test_streaming_saves_in_the_source_dtype(tmp_path, bf16_source):
    calib, passes = calib_ids(), a3mod.a3_passes(0.3)
    out = a3mod.compress_streaming(bf16_source, tmp_path / "out", passes, calib, progress=False)
    assert _dtypes(out) == {"BF16"}
    from safetensors.torch import load_file

    src, got = load_file(str(bf16_source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    outside = [k for k in got if ".layers." not in k]       # read in the stored dtype, written as they are
    assert outside and all(torch.equal(got[k], src[k]) for k in outside)
    model, _ = a3mod.load_pretrained(str(bf16_source))
    a3mod.apply(model, passes, calib=calib, progress=False)
    ref = a3mod.save(model, tmp_path / "ref")
    a, b = a3mod.load(out), a3mod.load(ref)
    x = input_ids()
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=2e-2, atol=2e-2)   # bf16 round-off of two routes
    f32 = a3mod.compress_streaming(bf16_source, tmp_path / "f32", passes, calib, progress=False,
                                   save_dtype=torch.float32)
    assert _dtypes(f32) == {"F32"}


def test_cli_save_dtype(tmp_path, bf16_source, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a small calibration text. " * 200)
    common = ["compress", "--model", str(bf16_source), "--calib", str(text), "--n-samples", "2",
              "--calib-seq-len", "16", "--ratio", "0.3", "--no-eval"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert "bfloat16" in capsys.readouterr().out and _dtypes(tmp_path / "a") == {"BF16"}
    assert main(common + ["--out", str(tmp_path / "b"), "--save-dtype", "float32"]) == 0
    assert _dtypes(tmp_path / "b") == {"F32"}
