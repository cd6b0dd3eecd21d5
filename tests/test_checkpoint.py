"""a3mod.save / a3mod.load: bit-exact round trips, atomic writes, and sidecars that disagree with the weights."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import a3mod
from a3mod import CheckpointError, ReducedHeadAttention, ReducedMLP

from conftest import attn_modules, calib_ids, input_ids, logits, mlp_modules, rerecord_files, tiny_model


def compressed(family: str, ratio: float = 0.3, **kw):
    if family != "gpt2":
        kw.setdefault("kv_heads", 2)
    model = tiny_model(family, impl="eager", **kw)
    return a3mod.apply(model, a3mod.a3_passes(ratio), calib=calib_ids(), progress=False)


def snapshot(path) -> dict:
    """{relative path: bytes} of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("family,kw", [
    ("llama", dict(tie_word_embeddings=True)),
    ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=12)),
    ("mistral", dict(sliding_window=8)),
    ("qwen2", dict()),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
])
def test_round_trip_is_bit_exact(tmp_path, family, kw):
    model = compressed(family, **kw)
    out = a3mod.save(model, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    assert sorted(os.listdir(out)) == sorted(["a3mod.json", "config.json", "generation_config.json",
                                              "model.safetensors"])
    loaded = a3mod.load(out)
    assert not loaded.training
    loaded.set_attn_implementation("eager")
    assert_same_state(model, loaded)
    ids = input_ids()
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    for a, b in zip(attn_modules(loaded), attn_modules(model)):
        assert isinstance(a, ReducedHeadAttention)
        assert (a.qk_dim, a.vo_dim, a.rot_dim, a.scaling, a.sliding_window, a.attention_dropout, a.out_dropout) == \
               (b.qk_dim, b.vo_dim, b.rot_dim, b.scaling, b.sliding_window, b.attention_dropout, b.out_dropout)
        assert torch.equal(a.rope_index, b.rope_index)
    for a, b in zip(mlp_modules(loaded), mlp_modules(model)):
        assert isinstance(a, ReducedMLP)
        assert (a.inter, a.orig_inter, a.kept, a.act, a.dropout) == (b.inter, b.orig_inter, b.kept, b.act, b.dropout)
    if family == "gpt2":       # GPT-2's resid_pdrop (default 0.1) survives as output dropout
        assert [(a.out_dropout, m.dropout) for a, m in zip(attn_modules(loaded), mlp_modules(loaded))] == \
               [(0.1, 0.1)] * 2
    if family == "mistral":
        assert [a.sliding_window for a in attn_modules(loaded)] == [8, 8]
    assert loaded.a3mod_info == model.a3mod_info
    assert a3mod.report(loaded).to_dict() == a3mod.report(model).to_dict()
    # no weights left on the meta device, rotary buffers rebuilt
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))


def test_tied_embeddings_stay_tied(tmp_path):
    model = compressed("llama", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    a3mod.save(model, tmp_path / "ckpt")
    side = json.loads((tmp_path / "ckpt" / "a3mod.json").read_text())
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert len(side["aliases"]) == 1                                  # written once
    (alias, source), = side["aliases"].items()
    assert {alias, source} == {"lm_head.weight", "model.embed_tokens.weight"}
    assert source in stored and alias not in stored
    loaded = a3mod.load(tmp_path / "ckpt")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_round_trip_uncompressed_model(tmp_path):
    model = tiny_model("llama", impl="eager", kv_heads=2)
    a3mod.save(model, tmp_path / "plain")
    side = json.loads((tmp_path / "plain" / "a3mod.json").read_text())
    assert side["layers"] == {} and side["passes"] == []
    loaded = a3mod.load(tmp_path / "plain")
    loaded.set_attn_implementation("eager")
    assert_same_state(model, loaded)
    assert torch.equal(logits(loaded, input_ids()), logits(model, input_ids()))


def test_loaded_model_generates_and_refuses_a_second_apply(tmp_path):
    model = compressed("qwen2")
    a3mod.save(model, tmp_path / "ckpt")
    loaded = a3mod.load(tmp_path / "ckpt")
    loaded.set_attn_implementation("eager")
    prompt = input_ids(1, 5)
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        assert torch.equal(loaded.generate(prompt, **kw), model.generate(prompt, **kw))
    with pytest.raises(a3mod.A3ModError, match="already compressed"):
        a3mod.apply(loaded, a3mod.a3_passes(0.1), calib=calib_ids(), progress=False)


def test_load_with_dtype(tmp_path):
    model = compressed("llama")
    a3mod.save(model, tmp_path / "ckpt")
    loaded = a3mod.load(tmp_path / "ckpt", dtype=torch.bfloat16)
    sd = loaded.state_dict()
    for k, t in model.state_dict().items():
        if t.is_floating_point():
            assert sd[k].dtype == torch.bfloat16 and torch.equal(sd[k], t.to(torch.bfloat16)), k
        else:
            assert torch.equal(sd[k], t), k                             # rope_index stays int64
    assert a3mod.report(loaded).dtype_bytes == 2
    assert torch.isfinite(logits(loaded, input_ids()).float()).all()


def test_saved_files_get_normal_permissions(tmp_path):
    a3mod.save(compressed("gpt2"), tmp_path / "ckpt")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------- safe writes
def test_existing_dir_without_overwrite_is_left_untouched(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = snapshot(out)
    with pytest.raises(CheckpointError, match="exists") as e:
        a3mod.save(compressed("gpt2"), out)
    assert str(out) in str(e.value)
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_overwrite_replaces_the_dir(tmp_path):
    out = tmp_path / "ckpt"
    a3mod.save(compressed("llama"), out)                # an earlier a3mod checkpoint (with a file added to it)
    (out / "stale.txt").write_text("old")
    model = compressed("gpt2")
    with pytest.raises(CheckpointError, match="stale.txt"):             # not a3mod's: never deleted
        a3mod.save(model, out, overwrite=True)
    os.remove(out / "stale.txt")
    a3mod.save(model, out, overwrite=True)
    assert_same_state(a3mod.load(out), model)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch, overwrite):
    import a3mod.io.sealed as ck

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "ckpt"
    if overwrite:
        a3mod.save(compressed("gpt2"), out)            # a previous result
    before = snapshot(parent)
    monkeypatch.setattr(ck.tensors, "write", boom)
    with pytest.raises(OSError, match="simulated"):
        a3mod.save(compressed("llama"), out, overwrite=overwrite)
    assert sorted(os.listdir(parent)) == (["ckpt"] if overwrite else [])   # no temp dirs left behind
    assert snapshot(parent) == before                                       # a previous result survives


# ---------------------------------------------------------------------------------- bad checkpoints
@pytest.fixture
def saved_llama(tmp_path):
    model = compressed("llama", heads=4, kv_heads=2)      # qk = vo = 6, rot 6
    path = a3mod.save(model, tmp_path / "ckpt")
    return path


def edit_sidecar(path, fn) -> None:
    side = json.loads((path / "a3mod.json").read_text())
    fn(side)
    (path / "a3mod.json").write_text(json.dumps(a3mod.io.sidecar.seal(side)))     # still sealed: test the schema


def test_load_without_sidecar(tmp_path, saved_llama):
    """Without a3mod.json a folder loads only if config.json is a3mod's native type (as save_pretrained writes it,
    then through transformers' own loading); an original-type config.json without a sidecar is refused."""
    ref = a3mod.load(saved_llama)
    os.remove(saved_llama / "a3mod.json")
    ids = input_ids()
    torch.testing.assert_close(a3mod.load(saved_llama)(ids).logits, ref(ids).logits, rtol=0, atol=0)
    cfg = json.loads((saved_llama / "config.json").read_text())
    cfg["model_type"] = cfg.pop("a3mod_base_model_type")
    del cfg["a3mod"]
    (saved_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="a3mod.json") as e:
        a3mod.load(saved_llama)
    assert str(saved_llama) in str(e.value)
    with pytest.raises(CheckpointError, match="not an a3mod checkpoint"):
        a3mod.load(tmp_path / "does-not-exist")


def test_load_rejects_other_format(saved_llama):
    edit_sidecar(saved_llama, lambda s: s.update(format=99))
    with pytest.raises(CheckpointError, match="format 99"):
        a3mod.load(saved_llama)


def test_sidecar_qk_dim_larger_than_weights(saved_llama):
    def grow(s):
        s["layers"]["1"]["attn"]["qk_dim"] = 8
    edit_sidecar(saved_llama, grow)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.(q|k)_proj\.weight"):
        a3mod.load(saved_llama)


def test_sidecar_vo_dim_mismatch(saved_llama):
    edit_sidecar(saved_llama, lambda s: s["layers"]["0"]["attn"].update(vo_dim=4))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.(v|o)_proj\.weight"):
        a3mod.load(saved_llama)


def test_sidecar_mlp_width_mismatch(saved_llama):
    edit_sidecar(saved_llama, lambda s: s["layers"]["1"]["mlp"].update(inter=40))     # the schema sees 'kept'
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.kept has 45 entries, expected 40"):
        a3mod.load(saved_llama)
    edit_sidecar(saved_llama, lambda s: s["layers"]["1"]["mlp"].update(kept=None))    # the weights disagree
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.(gate|up|down)_proj\.weight"):
        a3mod.load(saved_llama)


def test_sidecar_qk_dim_mismatch_gpt2(tmp_path):
    path = a3mod.save(compressed("gpt2"), tmp_path / "ckpt")
    edit_sidecar(path, lambda s: s["layers"]["0"]["attn"].update(qk_dim=s["layers"]["0"]["attn"]["qk_dim"] - 1))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.0\.attn\.(q|k)_proj\.(weight|bias)"):
        a3mod.load(path)


def test_sidecar_rope_index_mismatch(saved_llama):
    def swap(s):
        idx = s["layers"]["0"]["attn"]["rope_index"]
        idx[1] = idx[0][::-1] if idx[1] == idx[0] else idx[0]
    edit_sidecar(saved_llama, swap)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.rope_index"):
        a3mod.load(saved_llama)


def test_sidecar_names_a_missing_layer(saved_llama):
    edit_sidecar(saved_llama, lambda s: s["layers"].update({"7": s["layers"]["0"]}))
    with pytest.raises(CheckpointError, match="layer 7"):
        a3mod.load(saved_llama)


def test_alias_to_missing_tensor(saved_llama):
    edit_sidecar(saved_llama, lambda s: s.update(aliases={"lm_head.weight": "model.nothing.weight"}))
    with pytest.raises(CheckpointError, match="model.nothing.weight"):
        a3mod.load(saved_llama)


def test_weights_file_missing_a_tensor(saved_llama):
    sd = load_file(str(saved_llama / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(saved_llama / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"has \d+ bytes, a3mod.json records"):     # the recorded size
        a3mod.load(saved_llama)
    edit_sidecar(saved_llama, lambda s: s.pop("files"))       # the file records removed: refused, not trusted
    with pytest.raises(CheckpointError, match=r"lacks \['files'\]"):
        a3mod.load(saved_llama)


def test_weights_file_with_unknown_tensor(saved_llama):
    sd = load_file(str(saved_llama / "model.safetensors"))
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(sd, str(saved_llama / "model.safetensors"))
    edit_sidecar(saved_llama, lambda s: rerecord_files(s, saved_llama))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.extra\.weight"):
        a3mod.load(saved_llama)


def test_sidecar_qk_dim_smaller_than_rot_dim(saved_llama):
    edit_sidecar(saved_llama, lambda s: s["layers"]["1"]["attn"].update(qk_dim=4))
    with pytest.raises(CheckpointError, match=r"layers\.1|layer 1"):
        a3mod.load(saved_llama)


@pytest.mark.parametrize("edit", [{"rot_dim": 4}, {"kv_heads": 4}])
def test_sidecar_inconsistent_rope_shape(saved_llama, edit):
    edit_sidecar(saved_llama, lambda s: s["layers"]["0"]["attn"].update(edit))
    with pytest.raises(CheckpointError, match=r"layers\.0|layer 0"):
        a3mod.load(saved_llama)


def test_copy_of_checkpoint_loads(tmp_path, saved_llama):
    """Nothing in a checkpoint refers to its own path."""
    shutil.copytree(saved_llama, tmp_path / "moved")
    assert_same_state(a3mod.load(tmp_path / "moved"), a3mod.load(saved_llama))


def test_resave_a_loaded_model(tmp_path):
    model = compressed("mistral")
    a3mod.save(model, tmp_path / "a")
    a3mod.save(a3mod.load(tmp_path / "a"), tmp_path / "b")
    assert json.loads((tmp_path / "a" / "a3mod.json").read_text()) == \
        json.loads((tmp_path / "b" / "a3mod.json").read_text())
    assert_same_state(a3mod.load(tmp_path / "b"), model)


def test_save_over_a_file(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a directory")
    with pytest.raises(CheckpointError, match="ckpt"):
        a3mod.save(compressed("gpt2"), target, overwrite=True)
    assert target.read_text() == "not a directory"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("edit", ["drop_one", "out_of_range"])
def test_sidecar_kept_neurons_mismatch(saved_llama, edit):
    def change(s):
        kept = s["layers"]["1"]["mlp"]["kept"]
        if edit == "drop_one":
            kept.pop()
        else:
            kept[-1] = 64
    edit_sidecar(saved_llama, change)
    with pytest.raises(CheckpointError, match=r"layers\.1|layer 1"):
        a3mod.load(saved_llama)
