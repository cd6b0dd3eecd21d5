"""transformers' own loading of an a3mod folder (AutoModelForCausalLM.from_pretrained) runs a3mod's checks: the
seal and checksums of an a3mod.save folder, config.json agreeing with a3mod.json, every weight present (never random
init), finite weights."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import a3mod
from a3mod import CheckpointError

from conftest import calib_ids, tiny_model


@pytest.fixture
def model():
    return a3mod.apply(tiny_model("llama"), a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)


def _flip_a_byte(f):
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x01
    f.write_bytes(bytes(data))


def test_a_bit_flipped_weight_of_an_a3mod_save_folder_is_refused(tmp_path, model):
    out = a3mod.save(model, tmp_path / "a3")
    _flip_a_byte(out / "model.safetensors")
    with pytest.raises(CheckpointError, match="sha256"):
        AutoModelForCausalLM.from_pretrained(out)


def test_an_edited_config_description_of_an_a3mod_save_folder_is_refused(tmp_path, model):
    out = a3mod.save(model, tmp_path / "a3")
    cfg = json.loads((out / "config.json").read_text())
    cfg["a3mod"]["layers"]["0"]["mlp"]["act"] = "relu"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        AutoModelForCausalLM.from_pretrained(out)


def test_a_missing_weight_is_refused_not_randomly_initialised(tmp_path, model):
    model.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks 1 weights.*layers\.1\.mlp\.down_proj\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="down_proj"):
        a3mod.load(tmp_path / "hf")


def test_nan_weights_are_refused(tmp_path, model):
    model.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="NaN"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("key,dtype", [("model.layers.0.mlp.down_proj.weight", torch.int32),
                                       ("model.layers.0.self_attn.rope_index", torch.float32)])
def test_a_tensor_stored_as_the_wrong_kind_is_refused(tmp_path, model, key, dtype):
    """Integers where the model holds floating-point values (or the other way round): transformers would cast them
    silently; both loaders refuse, naming the tensor."""
    model.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    sd[key] = sd[key].to(dtype)
    save_file(sd, str(f), metadata={"format": "pt"})
    for load in (AutoModelForCausalLM.from_pretrained, a3mod.load):
        with pytest.raises(CheckpointError, match=f"{key}.* is stored as {dtype}"):
            load(tmp_path / "hf")


def test_loading_info_still_returned_when_asked(tmp_path, model):
    model.save_pretrained(tmp_path / "hf")
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    x = torch.randint(0, 100, (1, 6))
    torch.testing.assert_close(back(x).logits, model(x).logits, rtol=0, atol=0)
