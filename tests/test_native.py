"""a3mod's native model type (a3mod.io.native): compressed folders that transformers' own from_pretrained, save_pretrained,
Trainer and PEFT read and write exactly, old a3mod.json checkpoints still loading, and no silent dense model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaForCausalLM

import a3mod
from a3mod import CheckpointError
from a3mod.io import files, sidecar

from conftest import calib_ids, input_ids, tiny_model
from zoo import tiny_zoo_model

FAMILIES = ["llama", "qwen2", "gpt2", "mixtral", "deepseek_v3"]


def _model(family: str):
    try:
        return tiny_model(family).eval()
    except KeyError:                     # families conftest has no tiny config for: the zoo's
        return tiny_zoo_model(family).eval()


def compressed(family: str = "llama"):
    model = _model(family)
    return a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(n=8, seq_len=32) % 100, progress=False)


def ids():
    return input_ids() % 100


def out(model, x):
    o = model(x)
    return (o.logits if hasattr(o, "logits") else o.last_hidden_state).detach()


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_round_trips_a_compressed_model_exactly(family, tmp_path):
    """save_pretrained -> AutoModelForCausalLM.from_pretrained and a3mod.save -> from_pretrained: the same logits,
    bit for bit, and the reduced modules rebuilt (config.json describes them: model_type "a3mod")."""
    model, x = compressed(family), ids()
    ref = out(model, x)
    assert type(model).__name__.startswith("A3mod") and isinstance(model, type(model).a3mod_base)
    model.save_pretrained(tmp_path / "hf")
    a3mod.save(model, tmp_path / "a3")
    for d in ("hf", "a3"):
        cfg = json.loads((tmp_path / d / "config.json").read_text())
        assert cfg["model_type"] == "a3mod" and cfg["a3mod_base_model_type"] == model.config.model_type
        assert cfg["a3mod"]["layers"] == a3mod.io.native.description(model)["layers"] != {}
        back = AutoModelForCausalLM.from_pretrained(tmp_path / d)
        assert type(back) is type(model)
        torch.testing.assert_close(out(back, x), ref, rtol=0, atol=0)
        assert str(back) == str(model)                      # the reduced dims, module by module
    torch.testing.assert_close(out(a3mod.load(tmp_path / "hf"), x), ref, rtol=0, atol=0)


def test_dtype_device_map_and_shards(tmp_path):
    """transformers' own loading options: dtype, device_map, a checkpoint in several shards."""
    model, x = compressed(), ids()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    torch.testing.assert_close(out(back, x), out(model, x), rtol=0, atol=0)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    a3mod.save(model, tmp_path / "a3")                   # a3mod's own loader casts the same way
    torch.testing.assert_close(out(half, x), out(a3mod.load(tmp_path / "a3", dtype="bfloat16"), x), rtol=0, atol=0)
    assert a3mod.load(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_encoder_family_round_trips(tmp_path):
    from test_families_b import config_b

    from conftest import model_from_config
    model = model_from_config(config_b("bert"), auto=AutoModel).eval()
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert type(model).__name__ == "A3modBertModel"
    x = input_ids()
    model.save_pretrained(tmp_path)
    back = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(out(back, x), out(model, x), rtol=0, atol=0)


def test_without_a3mod_transformers_refuses_loudly(tmp_path):
    """In a process that never imports a3mod, transformers refuses the folder naming the model type "a3mod": it
    never builds a dense model with random weights (what ignore_mismatched_sizes did before)."""
    compressed().save_pretrained(tmp_path)
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "AutoModelForCausalLM.from_pretrained(sys.argv[1], ignore_mismatched_sizes=True)\n"
            "assert 'a3mod' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode != 0 and "model type `a3mod`" in r.stderr, r.stderr[-500:]


def test_the_callers_config_still_builds_dense_models():
    """apply gives the model a native copy of its config: the caller's object stays the original type."""
    model = _model("llama")
    cfg = model.config
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    assert model.config is not cfg and type(cfg).__name__ == "LlamaConfig"
    assert all(getattr(m, "config", model.config) is model.config for m in model.modules())
    fresh = AutoModelForCausalLM.from_config(cfg)
    assert type(fresh) is LlamaForCausalLM and not a3mod.pipeline.compress.compact_modules(fresh)


def _as_old_checkpoint(path) -> None:
    """Rewrite an a3mod.save folder as a3mod before the native type wrote it: config.json of the original type,
    the sidecar's file record and seal updated (so only the format differs)."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = cfg.pop("a3mod_base_model_type")
    del cfg["a3mod"]
    (path / "config.json").write_text(json.dumps(cfg))
    side = json.loads((path / "a3mod.json").read_text())
    side["files"]["config.json"] = {"bytes": (path / "config.json").stat().st_size,
                                    "sha256": files.sha256_file(path / "config.json")}
    (path / "a3mod.json").write_text(sidecar.dumps(sidecar.seal(side)))


def test_old_checkpoints_load_and_resave_native(tmp_path):
    model, x = compressed(), ids()
    a3mod.save(model, tmp_path / "old")
    _as_old_checkpoint(tmp_path / "old")
    old = a3mod.load(tmp_path / "old")
    torch.testing.assert_close(out(old, x), out(model, x), rtol=0, atol=0)
    assert a3mod.io.native.is_native(old)
    old.save_pretrained(tmp_path / "new")
    torch.testing.assert_close(out(AutoModelForCausalLM.from_pretrained(tmp_path / "new"), x), out(model, x),
                               rtol=0, atol=0)


def test_config_that_disagrees_with_the_sealed_sidecar_is_refused(tmp_path):
    """config.json is checked by a3mod.json's checksum; re-recorded, a config whose description differs from the
    sealed one is still refused by a3mod.load."""
    ck = tmp_path / "ck"
    a3mod.save(compressed(), ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["a3mod"]["layers"].pop("1")
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="sha256|bytes"):
        a3mod.load(ck)
    side = json.loads((ck / "a3mod.json").read_text())
    side["files"]["config.json"] = {"bytes": (ck / "config.json").stat().st_size,
                                    "sha256": files.sha256_file(ck / "config.json")}
    (ck / "a3mod.json").write_text(sidecar.dumps(sidecar.seal(side)))
    with pytest.raises(CheckpointError, match="describes other reduced modules"):
        a3mod.load(ck)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["layers"]["0"]["attn"].update(qk_dim=999), r"qk_dim = 999 is outside"),
    (lambda d: d["layers"]["0"].update(bogus=1), "unknown keys"),
    (lambda d: d.update(layers={"99": d["layers"]["0"]}), "layer 99"),
    (lambda d: d.update(quant={"config": {"type": "HQQ"}, "compute_dtype": "float32"}),
     "quantized a3mod model but holds no a3mod.json"),
])
def test_corrupted_description_in_config_is_refused_by_from_pretrained(edit, match, tmp_path):
    compressed().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg["a3mod"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match) as e:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "a3mod.json" not in str(e.value) or "holds no a3mod.json" in str(e.value)   # names the file it read


def test_trainer_save_model_and_peft_round_trip(tmp_path):
    """Trainer.save_model writes a loadable folder; a LoRA adapter on a compressed model saves, reloads onto the
    checkpoint from_pretrained gives, and merges to the same logits."""
    peft = pytest.importorskip("peft")
    from transformers import Trainer, TrainingArguments

    model, x = compressed(), ids()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[],
                                                          use_cpu=True))
    trainer.save_model(str(tmp_path / "trained"))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "trained")
    torch.testing.assert_close(out(back, x), out(model, x), rtol=0, atol=0)

    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                                                      init_lora_weights=False))
    ref = out(lora, x)
    lora.save_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "trained"),
                                           tmp_path / "adapter")
    torch.testing.assert_close(out(again, x), ref, rtol=1e-5, atol=1e-5)
    merged = again.merge_and_unload()
    torch.testing.assert_close(out(merged, x), ref, rtol=1e-4, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(out(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), x), out(merged, x),
                               rtol=0, atol=0)


def test_native_models_copy_and_pickle(tmp_path):
    import copy
    import pickle

    model, x = compressed(), ids()
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(twin) is type(model)
        torch.testing.assert_close(out(twin, x), out(model, x), rtol=0, atol=0)


@pytest.mark.parametrize("quant", [a3mod.HQQ(nbits=4, group_size=8), a3mod.BnbInt8()])
def test_quantized_models_round_trip_through_a3mods_format(quant, tmp_path):
    """Quantization after A3: save_pretrained writes a3mod's format (sealed a3mod.json) and from_pretrained reads
    it back through a3mod.load, exactly; options a3mod.load cannot honour are refused by name."""
    model = _model("llama")
    a3mod.apply(model, [*a3mod.a3_passes(0.3), quant], calib=calib_ids(), progress=False)
    x = ids()
    model.save_pretrained(tmp_path / "q")
    assert (tmp_path / "q" / "a3mod.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    torch.testing.assert_close(out(back, x), out(model, x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="one device"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="auto")
    with pytest.raises(CheckpointError, match="low_cpu_mem_usage"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", low_cpu_mem_usage=True)


def test_loaded_tensors_are_realigned(tmp_path):
    """Tensors in a safetensors memory map start at any byte offset, and CPU kernels round differently on unaligned
    data; every load path hands back 64-byte aligned tensors, tied ones still tied."""
    from a3mod.io.tensors import realign

    model = compressed("llama")
    model.save_pretrained(tmp_path / "hf")
    a3mod.save(model, tmp_path / "a3")
    for back in (AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), AutoModelForCausalLM.from_pretrained(tmp_path / "a3"),
                 a3mod.load(tmp_path / "a3")):
        assert all(p.data_ptr() % 64 == 0 for p in back.parameters())
        assert all(b.data_ptr() % 64 == 0 for b in back.buffers() if b.numel())
    base = torch.zeros(17)
    m = torch.nn.Linear(4, 4, bias=False)
    m.weight.data = base[1:17].view(4, 4)                # 4 bytes past an aligned start
    tied = torch.nn.ModuleList([m, torch.nn.Linear(4, 4, bias=False)])
    tied[1].weight = m.weight
    realign(tied)
    assert m.weight.data_ptr() % 64 == 0 and tied[1].weight is m.weight and torch.equal(m.weight, base[1:].view(4, 4))


def test_config_json_holds_dims_not_index_lists(tmp_path):
    """config.json describes dims and small facts (the slim form); the kept indices are in a3mod.json (a3mod.save)
    and the RoPE dims in the weights; an index buffer out of range in the weights is refused on load."""
    model = compressed()
    a3mod.save(model, tmp_path / "a3")
    model.save_pretrained(tmp_path / "hf")
    for d in ("a3", "hf"):
        layers = json.loads((tmp_path / d / "config.json").read_text())["a3mod"]["layers"]
        assert all("rope_index" not in e["attn"] and e["mlp"]["kept"] is None for e in layers.values())
    full = json.loads((tmp_path / "a3" / "a3mod.json").read_text())["layers"]
    assert all(e["mlp"]["kept"] and e["attn"]["rope_index"] for e in full.values())
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    key = next(k for k in sd if k.endswith("rope_index"))
    sd[key] = torch.full_like(sd[key], 999)
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="rope_index"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_config_json_stays_small_at_real_widths(tmp_path):
    """Qwen2.5-0.5B's widths (hidden 896, MLP 4864, 14 / 2 heads) at 20%: config.json grows by dims only, not by the
    3,891 kept neurons of every layer (it was 73 KB a layer; a3mod.json keeps the indices)."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    a3mod.apply(model, a3mod.a3_passes(0.2), calib=torch.randint(0, 256, (4, 64)), progress=False)
    out = a3mod.save(model, tmp_path / "m")
    assert (out / "config.json").stat().st_size < 5_000
    assert (out / "a3mod.json").stat().st_size > 40_000                  # the provenance is kept there
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids()).logits, model(ids()).logits,
                               rtol=0, atol=0)
