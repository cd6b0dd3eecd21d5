"""Streaming straight from a GGUF file: `a3mod.compress_streaming("x.gguf", ...)` / `compress --stream --model x.gguf`
reads and dequantizes one tensor at a time (a3mod.io.gguf_source) and writes what the in-memory path writes after
`from_pretrained(..., gguf_file=...)` on the same calibration; resumable; bad files refused before any work."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import TensorProcessor

import a3mod
from a3mod.errors import A3ModError, CheckpointError
from a3mod.export.llamacpp import permute
from a3mod.io.gguf_source import GGUFSource, gguf_config, load_gguf_model, read_header, weights_map
from a3mod.pipeline import workdir

from conftest import calib_ids, input_ids, make_tokenizer, tiny_model
from test_stream import Interrupt, _tensors, assert_same_checkpoint, killed_at

Q8 = gguf.GGMLQuantizationType.Q8_0
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _add(w: gguf.GGUFWriter, name: str, t: torch.Tensor) -> None:
    """Matrices as Q8_0 (embeddings as f16), vectors as f32: three of the reader's dequantization paths."""
    a = t.detach().float().numpy()
    if a.ndim == 1:
        w.add_tensor(name, a.astype(np.float32))
    elif name == "token_embd.weight":
        w.add_tensor(name, a.astype(np.float16))
    else:
        q = gguf.quants.quantize(a, Q8)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=Q8)


def write_gguf(model, path, arch: str):
    """`model` (llama or qwen2 layout) as a GGUF of llama.cpp architecture `arch`, the way llama.cpp's converter
    writes it (llama: q/k rows permuted to adjacent RoPE pairs)."""
    c, sd = model.config, model.state_dict()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    for add, v in [(w.add_context_length, c.max_position_embeddings), (w.add_embedding_length, c.hidden_size),
                   (w.add_block_count, c.num_hidden_layers), (w.add_feed_forward_length, c.intermediate_size),
                   (w.add_head_count, c.num_attention_heads), (w.add_head_count_kv, c.num_key_value_heads),
                   (w.add_vocab_size, c.vocab_size)]:
        add(int(v))
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    _add(w, "token_embd.weight", sd["model.embed_tokens.weight"])
    _add(w, "output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        _add(w, "output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf, gg in GGUF_NAMES.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf}.{kind}")
                if t is not None and arch == "llama" and gg in ("attn_q", "attn_k"):
                    t = permute(t, c.num_attention_heads if gg == "attn_q" else c.num_key_value_heads)
                if t is not None:
                    _add(w, f"blk.{i}.{gg}.{kind}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_source(tmp_path, family: str):
    """(original model, its GGUF file in a folder of its own)."""
    model = tiny_model(family, layers=3, kv_heads=2)
    (tmp_path / "g").mkdir(exist_ok=True)
    return model, write_gguf(model, tmp_path / "g" / f"{family}.gguf", family)


def from_gguf(path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_source_reads_what_transformers_loads(tmp_path, family):
    model, path = gguf_source(tmp_path, family)
    ref = from_gguf(path)
    ids = input_ids()
    assert (ref(ids).logits - model(ids).logits).abs().max() < 0.05       # the file holds the model (Q8_0)
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(gguf_config(path))
    keys = [k for k in skel.state_dict() if k != "lm_head.weight" or not skel.config.tie_word_embeddings]
    got = GGUFSource(path, skel, "model.layers").read(keys, torch.float32)
    want = ref.state_dict()
    assert sorted(got) == sorted(keys)
    for k in keys:
        assert torch.equal(got[k], want[k]), k                              # bit for bit, dequantized alike
    table = read_header(path).tensors                                       # the lean header reader == gguf's
    assert {t.name: (t.tensor_type, t.data_offset, t.n_bytes, t.data.shape, t.data.dtype)
            for t in gguf.GGUFReader(str(path)).tensors} == \
        {n: (t.type, t.offset, t.n_bytes, t.shape, np.dtype(t.item)) for n, t in table.items()}
    mine = load_gguf_model(path)                      # the in-memory loader: block by block, the same weights
    assert mine.state_dict().keys() == want.keys() and all(torch.equal(mine.state_dict()[k], want[k]) for k in want)
    assert torch.equal(mine(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streaming_from_gguf_equals_in_memory(tmp_path, family):
    _, path = gguf_source(tmp_path, family)
    calib, passes = calib_ids(4, 16), a3mod.a3_passes(0.3)
    model = from_gguf(path)
    a3mod.apply(model, passes, calib=calib, progress=False)
    ref = a3mod.save(model, tmp_path / "ref")
    out = a3mod.compress_streaming(path, tmp_path / "out", passes, calib, progress=False)
    assert_same_checkpoint(out, ref, rel=0.0)
    loaded = a3mod.load(out)
    assert torch.equal(loaded(input_ids()).logits, model(input_ids()).logits)
    assert _tensors(out)[0]["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32   # the compute dtype


def test_streaming_from_gguf_resumes(tmp_path, monkeypatch):
    _, path = gguf_source(tmp_path, "qwen2")
    calib, passes = calib_ids(4, 16), a3mod.a3_passes(0.3)
    ref = a3mod.compress_streaming(path.parent, tmp_path / "ref", passes, calib, progress=False)   # the folder
    write = workdir.write_layer
    write_then_stop = killed_at(1)
    monkeypatch.setattr(workdir, "write_layer", write_then_stop)
    with pytest.raises(Interrupt):
        a3mod.compress_streaming(path, tmp_path / "out", passes, calib, progress=False)
    assert [p.name for p in workdir.work_dir(tmp_path / "out").glob("layer_*.json")] == ["layer_0000.json"]
    monkeypatch.setattr(workdir, "write_layer", write)
    out = a3mod.compress_streaming(path, tmp_path / "out", passes, calib, progress=False)
    assert_same_checkpoint(out, ref, rel=0.0)
    monkeypatch.setattr(workdir, "write_layer", write_then_stop)
    with pytest.raises(Interrupt):
        a3mod.compress_streaming(path, tmp_path / "out2", passes, calib, progress=False)
    monkeypatch.setattr(workdir, "write_layer", write)
    path.write_bytes(path.read_bytes()[:-64] + b"\x01" * 64)    # another file at the same path: work not reused
    with pytest.raises(CheckpointError, match="different source"):
        a3mod.compress_streaming(path, tmp_path / "out2", passes, calib, progress=False)


def _bad_arch(path):
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_bad_gguf_files_are_refused_before_any_work(tmp_path):
    _, path = gguf_source(tmp_path, "llama")
    calib, passes = calib_ids(4, 16), a3mod.a3_passes(0.3)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    short = tmp_path / "short.gguf"
    short.write_bytes(path.read_bytes()[:200])
    other = tmp_path / "rwkv.gguf"
    _bad_arch(other)
    for bad, what in [(cut, "truncated"), (junk, r"not a GGUF file \(it starts with b'PK"),
                      (short, "not a readable GGUF file"), (other, "holds a 'rwkv6' model; transformers reads")]:
        with pytest.raises(CheckpointError, match=what) as e:
            a3mod.compress_streaming(bad, tmp_path / "out", passes, calib, progress=False)
        assert str(bad) in str(e.value)
        assert not (tmp_path / "out").exists() and not workdir.work_dir(tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(A3ModError, match="neither an HF folder.*nor a .gguf file"):
        a3mod.compress_streaming(tmp_path / "empty", tmp_path / "out", passes, calib, progress=False)


def test_cli_streams_a_gguf(tmp_path, text_file, capsys):
    from a3mod.cli.commands import main

    _, path = gguf_source(tmp_path, "llama")
    make_tokenizer().save_pretrained(path.parent)           # a tokenizer.json beside a GGUF is used as it is
    common = ["--model", str(path), "--ratio", "0.3", "--calib", text_file, "--n-samples", "4", "--calib-seq-len",
              "16", "--eval-source", text_file, "--eval-seq-len", "16"]
    assert main(["compress", *common, "--out", str(tmp_path / "mem")]) == 0
    assert main(["compress", "--stream", *common, "--out", str(tmp_path / "str")]) == 0
    out = capsys.readouterr().out
    assert out.count("KV bytes/token") == 2                 # one report line in each run
    t_mem, t_str = _tensors(tmp_path / "mem")[0], _tensors(tmp_path / "str")[0]
    assert sorted(t_mem) == sorted(t_str) and all(torch.equal(t_mem[k], t_str[k]) for k in t_mem)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    assert main(["compress", "--stream", *common[:0], "--model", str(cut), *common[2:],
                 "--out", str(tmp_path / "x")]) == 2
    assert "a3mod: error:" in capsys.readouterr().err


def test_fused_experts_are_assembled_from_their_gguf_parts(tmp_path):
    """A MoE GGUF stores each layer's experts as ffn_gate_exps / ffn_up_exps / ffn_down_exps; transformers' processor
    assembles [gate | up] into one parameter from two file tensors: the source reads both (F32 here: exact)."""
    from zoo import tiny_zoo_model

    model = tiny_zoo_model("qwen3_moe")
    sd, n_layers = model.state_dict(), model.config.num_hidden_layers
    names = {v: k for k, v in weights_map(model, TensorProcessor(), gguf.get_tensor_name_map(
        gguf.MODEL_ARCH.QWEN3MOE, n_layers)).items()}
    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "qwen3moe")
    for k, t in sd.items():
        a = t.detach().float().numpy()
        if k.endswith("experts.gate_up_proj"):
            i = k.split(".")[2]
            half = a.shape[1] // 2
            w.add_tensor(f"blk.{i}.ffn_gate_exps.weight", np.ascontiguousarray(a[:, :half]))
            w.add_tensor(f"blk.{i}.ffn_up_exps.weight", np.ascontiguousarray(a[:, half:]))
        elif k.endswith("experts.down_proj"):
            w.add_tensor(f"blk.{k.split('.')[2]}.ffn_down_exps.weight", a)
        elif k in names:
            w.add_tensor(names[k], a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(model.config)
    keys = list(sd)
    got = GGUFSource(tmp_path / "moe.gguf", skel, "model.layers").read(keys, torch.float32)
    assert all(torch.equal(got[k], sd[k]) for k in keys)
    layer0 = [k for k in keys if k.startswith("model.layers.0.")]
    assert sorted(GGUFSource(tmp_path / "moe.gguf", skel, "model.layers").read(layer0, torch.float32)) == \
        sorted(layer0)


def test_a_gguf_of_a_model_that_is_not_a_causal_lm_is_refused_by_name(tmp_path, monkeypatch):
    from transformers import T5Config

    from a3mod.errors import UnsupportedModelError
    from a3mod.pipeline import stream

    _, path = gguf_source(tmp_path, "llama")
    monkeypatch.setattr(stream, "gguf_config", lambda p: T5Config(num_layers=1, d_model=32))    # a t5 GGUF's config
    with pytest.raises(UnsupportedModelError, match=r"holds a 't5' model, which transformers has no causal-LM"):
        a3mod.compress_streaming(path, tmp_path / "out", a3mod.a3_passes(0.3), calib_ids(4, 16), progress=False)
    assert not (tmp_path / "out").exists()


def test_a_gguf_model_has_one_fingerprint_whichever_loader_dequantized_it():
    """transformers' GGUF loader records quantization_config = {quant_method: gguf, gguf_file: ...} on the config,
    a3mod's block-by-block loader does not: statistics collected on one are accepted for the other."""
    from transformers import LlamaConfig
    from a3mod.io.fingerprint import config_digest

    c = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    base = config_digest(c)
    c.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    assert config_digest(c) == base
    c.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    assert config_digest(c) != base
