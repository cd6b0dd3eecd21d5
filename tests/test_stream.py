"""a3mod.compress_streaming: layer-by-layer compression equals the in-memory apply + save; resume; errors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import a3mod
from a3mod.pipeline import steps, workdir
from a3mod.errors import A3ModError, CheckpointError

from conftest import calib_ids, input_ids, logits, tiny_model


def saved_source(tmp_path, family, shard: bool = False, **kw):
    """A tiny random model of `family` written with save_pretrained (sharded into many files with `shard`)."""
    if family != "gpt2":
        kw.setdefault("kv_heads", 2)
    model = tiny_model(family, layers=3, **kw)
    src = tmp_path / f"src-{family}"
    model.save_pretrained(src, **({"max_shard_size": "20KB"} if shard else {}))
    return src


def in_memory(tmp_path, src, passes, calib):
    model = _load_hf(src)
    a3mod.apply(model, passes, calib=calib, progress=False)
    return a3mod.save(model, tmp_path / "ref")


def _load_hf(src):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def _tensors(path):
    """The checkpoint's tensors with tied aliases resolved (a3mod.save also dedups empty tensors, which all
    share address 0, e.g. GPT-2's (H, 0) rope_index: a difference of bookkeeping, not of content)."""
    side = json.loads((path / "a3mod.json").read_text())
    t = load_file(str(path / "model.safetensors"))
    t.update({k: t[v] for k, v in side.pop("aliases").items()})
    for k in ("files", "sha256", "extra"):   # checksums of bytes (compared through the tensors above), and the
        # names of the files the CLI wrote beside the checkpoint (the in-memory path also writes a model card)
        side.pop(k, None)
    return t, side


def assert_streaming_equals_in_memory(model, tmp_path, passes=None, calib=None):
    """compress_streaming of `model`'s saved folder == a3mod.save after apply in memory; returns (streamed
    checkpoint, the compressed in-memory model)."""
    src = tmp_path / "src"
    model.save_pretrained(src)
    calib = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1)) \
        if calib is None else calib
    passes = passes or a3mod.a3_passes(0.3)
    a3mod.apply(model, passes, calib=calib, progress=False)
    ref = a3mod.save(model, tmp_path / "ref")
    out = a3mod.compress_streaming(src, tmp_path / "out", passes, calib, progress=False)
    assert_same_checkpoint(out, ref)
    return out, model


def assert_same_checkpoint(a, b, rel=1e-6):
    (ta, sa), (tb, sb) = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        if ta[k].is_floating_point():
            scale = tb[k].abs().max().item() if tb[k].numel() else 0.0
            assert (ta[k] - tb[k]).abs().max().item() <= rel * max(scale, 1e-12), k
        else:
            assert torch.equal(ta[k], tb[k]), k
    assert sa == sb


@pytest.mark.parametrize("family,shard,kw", [
    ("llama", False, dict()),
    ("llama", True, dict(tie_word_embeddings=True)),
    ("gpt2", True, dict()),
    ("qwen2", False, dict()),
    # layers 1-2 slide (window 8 < 16 calibration tokens), layer 0 does not: per-layer masks must be captured
    ("qwen2", False, dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ("mistral", False, dict(sliding_window=8)),
])
def test_streaming_equals_in_memory(tmp_path, family, shard, kw):
    src = saved_source(tmp_path, family, shard, **kw)
    if shard:
        assert (src / "model.safetensors.index.json").exists()
    calib = calib_ids(4, 16)
    passes = a3mod.a3_passes(0.3)
    ref = in_memory(tmp_path, src, passes, calib)
    out = a3mod.compress_streaming(src, tmp_path / "out", passes, calib, progress=False)
    assert out == tmp_path / "out"
    assert_same_checkpoint(out, ref)
    assert not workdir.work_dir(out).exists()
    model = a3mod.load(out)
    ids = input_ids()
    ref_model = a3mod.load(ref)
    assert torch.equal(logits(model, ids), logits(ref_model, ids))
    gen = model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_offload_and_batches_give_the_same_checkpoint(tmp_path, batch_size):
    src = saved_source(tmp_path, "llama")
    calib, passes = calib_ids(4, 16), a3mod.a3_passes(0.3)          # batch 3: a full batch and a batch of 1
    ref = a3mod.compress_streaming(src, tmp_path / "ref", passes, calib, progress=False)
    off = tmp_path / "offload"
    out = a3mod.compress_streaming(src, tmp_path / "out", passes, calib, batch_size=batch_size, offload_dir=off,
                                   progress=False)
    assert_same_checkpoint(out, ref, rel=1e-5 if batch_size > 1 else 0.0)
    assert list(off.iterdir()) == []                                  # hidden-state files cleaned up


class Interrupt(Exception):
    pass


def killed_at(layer: int):
    """A workdir.write_layer that raises Interrupt when asked to write `layer` (a run killed during that layer)."""
    write = workdir.write_layer

    def write_then_stop(work, i, *a):
        if i == layer:
            raise Interrupt(f"killed during layer {layer}")
        write(work, i, *a)
    return write_then_stop


@pytest.mark.parametrize("offload", [False, True])
def test_resume_continues_after_the_last_finished_layer(tmp_path, monkeypatch, offload):
    src = saved_source(tmp_path, "llama")
    calib, passes = calib_ids(4, 16), a3mod.a3_passes(0.3)
    kw = dict(progress=False, offload_dir=tmp_path / "off" if offload else None)
    ref = a3mod.compress_streaming(src, tmp_path / "ref", passes, calib, **kw)
    write = workdir.write_layer
    monkeypatch.setattr(workdir, "write_layer", killed_at(2))
    with pytest.raises(Interrupt):
        a3mod.compress_streaming(src, tmp_path / "out", passes, calib, **kw)
    work = workdir.work_dir(tmp_path / "out")
    assert sorted(p.name for p in work.glob("layer_*.json")) == ["layer_0000.json", "layer_0001.json"]
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(workdir, "write_layer", write)
    built = []
    build = steps.build_layer
    monkeypatch.setattr(steps, "build_layer", lambda m, v, *a: built.append(v.index) or build(m, v, *a))
    out = a3mod.compress_streaming(src, tmp_path / "out", passes, calib, **kw)
    assert built == [2]                                  # layers 0 and 1 were neither recalibrated nor solved
    assert_same_checkpoint(out, ref, rel=0.0)
    assert not work.exists()


def test_resume_refuses_other_arguments_unless_restart(tmp_path, monkeypatch):
    src = saved_source(tmp_path, "llama")
    calib = calib_ids(4, 16)
    monkeypatch.setattr(workdir, "write_layer", lambda *a: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        a3mod.compress_streaming(src, tmp_path / "out", a3mod.a3_passes(0.3), calib, progress=False)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"different passes.*restart=True"):
        a3mod.compress_streaming(src, tmp_path / "out", a3mod.a3_passes(0.2), calib, progress=False)
    with pytest.raises(CheckpointError, match="different calib"):
        a3mod.compress_streaming(src, tmp_path / "out", a3mod.a3_passes(0.3), calib_ids(4, 16, seed=5), progress=False)
    out = a3mod.compress_streaming(src, tmp_path / "out", a3mod.a3_passes(0.2), calib, progress=False, restart=True)
    assert json.loads((out / "a3mod.json").read_text())["passes"][0] == {"type": "A3QK", "ratio": 0.2, "rank": None,
                                                                         "multiple_of": None, "version": 1,
                                                                         "portable": False, "pair_order": None,
                                                                         "update": False, "damping": 0.01,
                                                                         "ranks": None, "seq_refit": False,
                                                                         "refit_damping": None}


def test_refuses_whole_model_passes_and_existing_output(tmp_path):
    src = saved_source(tmp_path, "llama")
    calib = calib_ids(4, 16)
    for bad in ([a3mod.SVDLLM(ratio=0.2)], [a3mod.A3QK(ratio=0.2), a3mod.HQQ(nbits=4)], []):
        with pytest.raises(A3ModError, match="layer-scope passes|empty"):
            a3mod.compress_streaming(src, tmp_path / "out", bad, calib, progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="exists"):
        a3mod.compress_streaming(src, tmp_path / "taken", a3mod.a3_passes(0.2), calib, progress=False)
    with pytest.raises(A3ModError, match="neither an HF folder"):
        a3mod.compress_streaming(tmp_path / "taken", tmp_path / "out", a3mod.a3_passes(0.2), calib, progress=False)


def test_cli_stream_matches_cli_in_memory(tmp_path, text_file, capsys):
    from a3mod.cli.commands import main

    from conftest import make_tokenizer

    src = saved_source(tmp_path, "llama")
    make_tokenizer().save_pretrained(src)
    common = ["--model", str(src), "--ratio", "0.3", "--calib", text_file, "--n-samples", "4", "--calib-seq-len",
              "16", "--eval-source", text_file, "--eval-seq-len", "16"]
    assert main(["compress", *common, "--out", str(tmp_path / "mem")]) == 0
    assert main(["compress", "--stream", "--offload-dir", str(tmp_path / "off"), *common,
                 "--out", str(tmp_path / "str")]) == 0
    assert "a3mod report: llama" in capsys.readouterr().out
    assert_same_checkpoint(tmp_path / "str", tmp_path / "mem", rel=0.0)
    mem, st = (json.loads((tmp_path / d / "compress_result.json").read_text()) for d in ("mem", "str"))
    assert st["ppl_after"]["ppl"] == pytest.approx(mem["ppl_after"]["ppl"], rel=1e-6)
    assert st["report"] == mem["report"] and st["calib_tokens"] == 64
    assert main(["compress", "--stream", "--method", "svd", *common, "--out", str(tmp_path / "x")]) == 2
    assert "--stream runs the A3 passes" in capsys.readouterr().err
