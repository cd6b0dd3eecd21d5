"""Checkpoints written by earlier a3mod code keep loading bit for bit (tests/fixtures/format<N>: written once by
the a3mod of that format, make_format1.py / make_fixtures.py say which commit), and a save is deterministic: the same
model gives the same bytes in every file. Format 2 holds quantized linears; format 3 is what a3mod writes now."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import a3mod

ROOT = Path(__file__).parent / "fixtures"
FIXTURES = ROOT / "format1"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
ALL = [f"format{n}/{p.name}" for n in (1, 2, 3) for p in sorted((ROOT / f"format{n}").iterdir()) if p.is_dir()]


def test_fixtures_present():
    assert {"llama_a3_30", "qwen2_allocate_all", "gpt2_asvd", "deepseek_v3_a3_30"} <= set(CASES)
    assert {"format2/llama_a3_30_int8", "format2/qwen2_a3_30_hqq8", "format3/qwen2_a3_updates",
            "format3/deepseek_v3_a3_30"} <= set(ALL)


@pytest.mark.parametrize("case", ALL)
def test_old_checkpoint_loads_bit_exactly(case):
    """Every stored tensor is loaded bit for bit by both loaders, both compute the same logits as each other, and
    those match the logits the writing code computed (to round-off: another CPU may round differently)."""
    _skip_without_library(case)
    expected = load_file(str(ROOT / f"{case}.expected.safetensors"))
    stored = load_file(str(ROOT / case / "model.safetensors"))
    outs = []
    for model in (a3mod.load(ROOT / case), AutoModelForCausalLM.from_pretrained(ROOT / case)):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in stored.items())
        with torch.no_grad():
            outs.append(model(expected["ids"]).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], expected["logits"], rtol=1e-5, atol=1e-5)


def _skip_without_library(case: str) -> None:
    if "_int8" in case or "_hqq" in case:
        pytest.importorskip("bitsandbytes" if "_int8" in case else "hqq")


@pytest.mark.parametrize("case", ALL)
def test_resave_is_deterministic(case, tmp_path):
    _skip_without_library(case)
    model = a3mod.load(ROOT / case)
    a, b = a3mod.save(model, tmp_path / "a"), a3mod.save(model, tmp_path / "b")
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    for f in names:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    # the description and the weights are those of the fixture (config.json now holds the slim description)
    side, old = (json.loads((d / "a3mod.json").read_text()) for d in (a, ROOT / case))
    drop = lambda s: {k: v for k, v in s.items() if k not in ("files", "sha256", "format")}   # noqa: E731
    assert drop(side) == drop(old) and (f"format{old['format']}", side["format"]) == (case.split("/")[0], 3)
    assert side["files"]["model.safetensors"] == old["files"]["model.safetensors"]
    assert (a / "model.safetensors").read_bytes() == (ROOT / case / "model.safetensors").read_bytes()


def _walk(x):
    yield x
    for v in (x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()):
        yield from _walk(v)


@pytest.mark.parametrize("case", ALL)
def test_a_resave_writes_format_3_with_a_slim_config(case, tmp_path):
    """Format 3: config.json's description holds no index lists (format 1 held them all); a3mod.json keeps them."""
    _skip_without_library(case)
    name = case.split("/")[1]
    out = a3mod.save(a3mod.load(ROOT / case), tmp_path / "m")
    cfg, side = (json.loads((out / f).read_text()) for f in ("config.json", "a3mod.json"))
    old_cfg = json.loads((ROOT / case / "config.json").read_text())
    assert cfg["a3mod"]["format"] == side["format"] == 3 and f"format{old_cfg['a3mod']['format']}" in case
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
