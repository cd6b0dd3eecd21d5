"""Bad inputs are typed errors before any work (the trust issue's classes): special files in a model folder, text
that is not UTF-8, an output where nothing can be written, NaN weights in the input model, a weights file mixing
float widths."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import a3mod
from a3mod import CalibrationError, CheckpointError
from a3mod.cli import main

from conftest import calib_ids, make_tokenizer, rerecord_files, tiny_model


@pytest.fixture
def ckpt(tmp_path):
    m = a3mod.apply(tiny_model("llama"), a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    return a3mod.save(m, tmp_path / "ck", tokenizer=make_tokenizer())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_a_fifo_in_a_model_folder_is_refused_not_read(ckpt):
    os.remove(ckpt / "a3mod.json")
    os.remove(ckpt / "config.json")
    os.mkfifo(ckpt / "config.json")                      # reading it would block forever

    def hung(*_):
        raise TimeoutError("a3mod.load blocked on a FIFO")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        with pytest.raises(CheckpointError, match="not a regular file"):
            a3mod.load(ckpt)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_symlink_out_of_a_checkpoint_is_refused(ckpt, tmp_path):
    other = tmp_path / "other.safetensors"
    os.replace(ckpt / "model.safetensors", other)
    os.symlink(other, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        a3mod.load(ckpt)


@pytest.mark.parametrize("data", [b"\xff\xfeh\x00i\x00", b"\x89PNG\r\n\x1a\n\x00\x00", b"caf\xe9 latin-1"])
def test_calibration_text_that_is_not_utf8_is_refused_before_the_model_loads(tmp_path, data, capsys):
    bad = tmp_path / "calib.txt"
    bad.write_bytes(data)
    with pytest.raises(CalibrationError, match="calib.txt"):
        a3mod.calibration_data(make_tokenizer(), str(bad), n_samples=1, seq_len=4)
    rc = main(["compress", "--model", "/nonexistent/model", "--calib", str(bad), "--out", str(tmp_path / "o"),
               "--ratio", "0.2", "--no-eval"])
    err = capsys.readouterr().err
    assert rc == 2 and "calib.txt" in err and "Traceback" not in err


def test_an_unwritable_output_is_refused_before_work(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("some calibration text " * 50)
    rc = main(["compress", "--out", "/proc/a3mod-out", "--ratio", "0.2", "--no-eval", "--model", "/nonexistent",
               "--calib", str(text)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot write to '/proc'" in err and "Traceback" not in err


def test_nan_weights_in_the_input_model_are_refused_and_the_model_untouched():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(a3mod.A3ModError, match=r"layers\.1\.mlp\.up_proj\.weight.*NaN"):
        a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert all(torch.equal(v, before[k]) or torch.isnan(v).any() for k, v in model.state_dict().items())
    assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("bad", [[math.inf], [-math.inf], [math.inf, -math.inf], [math.nan, 1.0]])
def test_each_non_finite_weight_is_named_and_large_finite_ones_are_not(bad):
    """The check sums a weight first (one read); an infinity, infinities that cancel to NaN, or a NaN must still be
    named, and a weight whose finite values overflow the sum must not be."""
    from a3mod.validate import nonfinite_weight

    model = tiny_model("llama")
    assert nonfinite_weight(model) is None
    with torch.no_grad():
        w = model.model.layers[1].self_attn.o_proj.weight
        w.view(-1)[: len(bad)] = torch.tensor(bad)
    assert nonfinite_weight(model) == "model.layers.1.self_attn.o_proj.weight"
    with torch.no_grad():
        w.fill_(3e38)                            # finite, but their fp32 sum overflows to inf
    assert not torch.isfinite(w.sum()) and nonfinite_weight(model) is None


def test_a_weights_file_mixing_float_widths_is_refused(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    k = next(k for k in sd if k.endswith("down_proj.weight"))
    sd[k] = sd[k].half()
    save_file(sd, str(ckpt / "model.safetensors"))
    import json
    side = rerecord_files(json.loads((ckpt / "a3mod.json").read_text()), ckpt)
    (ckpt / "a3mod.json").write_text(json.dumps(a3mod.io.sidecar.seal(side)))
    with pytest.raises(CheckpointError, match="mixes floating-point dtypes"):
        a3mod.load(ckpt)
