"""Checkpoints written by earlier a3mod code keep loading bit for bit (tests/fixtures/format1: written once by
make_format1.py at the commit that defined format 1), and a save is deterministic: the same model gives the same
bytes in every file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import a3mod

FIXTURES = Path(__file__).parent / "fixtures" / "format1"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_fixtures_present():
    assert {"llama_a3_30", "qwen2_allocate_all", "gpt2_asvd", "deepseek_v3_a3_30"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_format1_checkpoint_loads_bit_exactly(name):
    """Every stored tensor is loaded bit for bit by both loaders, both compute the same logits as each other, and
    those match the logits the writing code computed (to round-off: another CPU may round differently)."""
    expected = load_file(str(FIXTURES / f"{name}.expected.safetensors"))
    stored = load_file(str(FIXTURES / name / "model.safetensors"))
    outs = []
    for model in (a3mod.load(FIXTURES / name), AutoModelForCausalLM.from_pretrained(FIXTURES / name)):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in stored.items())
        with torch.no_grad():
            outs.append(model(expected["ids"]).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], expected["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_resave_is_deterministic(name, tmp_path):
    model = a3mod.load(FIXTURES / name)
    a, b = a3mod.save(model, tmp_path / "a"), a3mod.save(model, tmp_path / "b")
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    for f in names:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # the description and the weights are those of the fixture (config.json now holds the slim description)
    side, old = (json.loads((d / "a3mod.json").read_text()) for d in (a, FIXTURES / name))
    drop = lambda s: {k: v for k, v in s.items() if k not in ("files", "sha256", "format")}   # noqa: E731
    assert drop(side) == drop(old) and (old["format"], side["format"]) == (1, 3)
    assert side["files"]["model.safetensors"] == old["files"]["model.safetensors"]
    assert (a / "model.safetensors").read_bytes() == (FIXTURES / name / "model.safetensors").read_bytes()


def _walk(x):
    yield x
    for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()):
        yield from _walk(v)


@pytest.mark.parametrize("name", CASES)
def test_a_resave_writes_format_3_with_a_slim_config(name, tmp_path):
    """Format 3: config.json's description holds no index lists (format 1 held them all); a3mod.json keeps them."""
    out = a3mod.save(a3mod.load(FIXTURES / name), tmp_path / "m")
    cfg, side = (json.loads((out / f).read_text()) for f in ("config.json", "a3mod.json"))
    old_cfg = json.loads((FIXTURES / name / "config.json").read_text())
    assert cfg["a3mod"]["format"] == side["format"] == 3 and old_cfg["a3mod"]["format"] == 1
    lists = lambda d: [v for v in _walk(d) if isinstance(v, list) and len(v) > 8]   # noqa: E731
    assert lists(cfg["a3mod"]["layers"]) == [] and (lists(side["layers"]) != [] or name == "gpt2_asvd")   # low rank only


@pytest.mark.parametrize("fmt", [0, 4, True, "3"])
def test_a_format_this_a3mod_does_not_know_is_refused(fmt, tmp_path):
    from a3mod.errors import CheckpointError
    from a3mod.io import sidecar

    out = a3mod.save(a3mod.load(FIXTURES / "llama_a3_30"), tmp_path / "m")
    side = json.loads((out / "a3mod.json").read_text())
    side["format"] = fmt
    (out / "a3mod.json").write_text(sidecar.dumps(sidecar.seal({k: v for k, v in side.items() if k != "sha256"})))
    with pytest.raises(CheckpointError, match=r"this a3mod reads formats \[1, 2, 3\]"):
        a3mod.load(out)
