"""GGUF export for llama.cpp (`a3mod.save(model, "x.gguf", format="gguf", vocab_from=...)`, a3mod.export.llamacpp).

The written file is read back with the `gguf` package: every key llama.cpp's `llama` architecture reads, every
tensor, and a forward pass written from llama.cpp's own semantics (adjacent RoPE pairs rotated by
pos * base^(-2i/D) / rope_freqs[i], scale 1/sqrt(key_length)) reproduces the a3mod model's logits. When the
llama-cpp-python bindings are installed, llama.cpp itself scores the file too (skipped otherwise)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import a3mod
from a3mod.errors import ExportError
from a3mod.export import llamacpp

from zoo import _ids, tiny_zoo_model


def vocab_gguf(path, n: int):
    """A GGUF holding only a vocabulary of n tokens (what vocab_from reads)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, n)])      # llama.cpp needs one merge at least
    w.add_token_types([1] * n)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _read(path):
    r = gguf.GGUFReader(str(path))
    keys = {k: llamacpp._field_value(f)[0] for k, f in r.fields.items()}
    tensors = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]
        data = np.array(t.data) if t.tensor_type != gguf.GGMLQuantizationType.Q8_0 else \
            gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = torch.tensor(data).double().reshape(shape)
    return keys, tensors


def llamacpp_forward(path, ids: list[int]) -> torch.Tensor:
    """Logits (T, vocab) of a `llama` GGUF as llama.cpp computes them (float64 reference)."""
    f, w = _read(path)
    H, Hkv = f["llama.attention.head_count"], f["llama.attention.head_count_kv"]
    D, base = f["llama.attention.key_length"], f["llama.rope.freq_base"]
    eps, n = f["llama.attention.layer_norm_rms_epsilon"], len(ids)
    c = w.get("rope_freqs.weight", torch.ones(D // 2, dtype=torch.float64))
    theta = torch.arange(n, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, D, 2).double() / D) / c
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]                       # (T, 1, D/2)

    def rope(x):                                   # llama.cpp NORM: pairs (2i, 2i+1)
        out = torch.empty_like(x)
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    def rms(x, g):
        return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * g

    def lin(x, name):
        return x @ w[name + ".weight"].T + w.get(name + ".bias", 0)

    x = w["token_embd.weight"][torch.tensor(ids)]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(f["llama.block_count"]):
        h = rms(x, w[f"blk.{i}.attn_norm.weight"])
        q = rope(lin(h, f"blk.{i}.attn_q").view(n, H, D))
        k = rope(lin(h, f"blk.{i}.attn_k").view(n, Hkv, D)).repeat_interleave(H // Hkv, 1)
        v = lin(h, f"blk.{i}.attn_v").view(n, Hkv, D).repeat_interleave(H // Hkv, 1)
        s = torch.einsum("qhd,khd->hqk", q, k) / D ** 0.5 + mask
        x = x + lin(torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(n, H * D), f"blk.{i}.attn_output")
        h = rms(x, w[f"blk.{i}.ffn_norm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(h, f"blk.{i}.ffn_gate")) * lin(h, f"blk.{i}.ffn_up"),
                    f"blk.{i}.ffn_down")
    return rms(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


def _compressed(mtype: str, passes, shared_rope: bool):
    model = tiny_zoo_model(mtype)
    a3mod.apply(model, passes, calib=_ids(4, 16, 1), progress=False)
    if shared_rope:
        for m in model.modules():
            if isinstance(m, a3mod.ReducedHeadAttention):
                with torch.no_grad():
                    m.rope_index.copy_(m.rope_index[:1].expand_as(m.rope_index).clone())
    return model


@pytest.mark.parametrize("shared_rope", [False, True], ids=["union-rope", "shared-rope"])
@pytest.mark.parametrize("mtype", ["llama", "qwen2"])
def test_gguf_reproduces_the_model_in_llamacpp_semantics(mtype, shared_rope, tmp_path):
    model = _compressed(mtype, [a3mod.Allocate(budget=0.3)], shared_rope)
    vocab = vocab_gguf(tmp_path / "vocab.gguf", model.config.vocab_size)
    out = a3mod.save(model, tmp_path / "m.gguf", format="gguf", vocab_from=vocab)
    keys, tensors = _read(out)
    exp = a3mod.export.to_stock(model)
    c = exp.model.config
    assert keys["general.architecture"] == "llama" and keys["general.name"] == "tiny (a3mod)"
    assert keys["llama.attention.key_length"] == keys["llama.attention.value_length"] == c.head_dim
    assert keys["llama.rope.dimension_count"] == c.head_dim and keys["llama.feed_forward_length"] == \
        c.intermediate_size
    assert keys["tokenizer.ggml.tokens"][:4] == ["a", "b", "ab", "t3"]
    assert ("rope_freqs.weight" in tensors) == (exp.record["rope"] == "longrope")
    sd = exp.model.state_dict()
    assert torch.equal(llamacpp.permute(sd["model.layers.0.self_attn.q_proj.weight"], c.num_attention_heads).double(),
                       tensors["blk.0.attn_q.weight"])
    ids = _ids(1, 12, 0)[0].tolist()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].double()
    assert float((llamacpp_forward(out, ids) - ref).norm() / ref.norm()) < 1e-5


def test_gguf_types_and_refusals(tmp_path):
    model = _compressed("llama", a3mod.a3_passes(0.3), False)
    vocab = vocab_gguf(tmp_path / "vocab.gguf", model.config.vocab_size)
    ids = _ids(1, 10, 0)[0].tolist()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].double()
    for ftype, tol in (("f16", 5e-3), ("q8_0", 5e-2)):
        out = a3mod.save(model, tmp_path / f"m-{ftype}.gguf", format="gguf", vocab_from=vocab, gguf_type=ftype)
        assert float((llamacpp_forward(out, ids) - ref).norm() / ref.norm()) < tol
    with pytest.raises(ExportError, match="exists"):
        a3mod.save(model, tmp_path / "m-f16.gguf", format="gguf", vocab_from=vocab)
    with pytest.raises(ExportError, match="vocab_from"):
        a3mod.save(model, tmp_path / "n.gguf", format="gguf")
    before = vocab.read_bytes()
    with pytest.raises(ExportError, match="is the model or vocabulary"):
        a3mod.save(model, vocab, format="gguf", vocab_from=vocab, overwrite=True)
    assert vocab.read_bytes() == before                                 # the source is never replaced
    with pytest.raises(ExportError, match="has 5 tokens"):
        a3mod.save(model, tmp_path / "n.gguf", format="gguf", vocab_from=vocab_gguf(tmp_path / "v5.gguf", 5))
    with pytest.raises(ExportError, match="allowed: f32, f16, q8_0"):
        a3mod.save(model, tmp_path / "n.gguf", format="gguf", vocab_from=vocab, gguf_type="q4_k")
    gemma = _compressed("gemma", a3mod.a3_passes(0.3), False)
    with pytest.raises(ExportError, match="'gemma'"):
        a3mod.save(gemma, tmp_path / "g.gguf", format="gguf", vocab_from=vocab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-f16.gguf", "m-q8_0.gguf", "v5.gguf", "vocab.gguf"]


def test_cli_export_gguf(tmp_path, capsys):
    from a3mod.cli.commands import main
    from conftest import calib_ids, make_tokenizer, tiny_model

    model = tiny_model("llama", kv_heads=2)
    a3mod.apply(model, a3mod.a3_passes(0.3, portable=True), calib=calib_ids(), progress=False)
    src = a3mod.save(model, tmp_path / "a3", tokenizer=make_tokenizer())
    vocab = vocab_gguf(tmp_path / "vocab.gguf", model.config.vocab_size)
    assert main(["export", "--model", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "vocab_from" in capsys.readouterr().err                      # no source GGUF recorded: refused
    assert main(["export", "--model", str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf"),
                 "--vocab-from", str(vocab)]) == 0
    assert "wrote" in capsys.readouterr().out
    ids = [1, 5, 9, 2, 7]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].double()
    assert float((llamacpp_forward(tmp_path / "m.gguf", ids) - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("mtype,shared_rope", [("llama", False), ("llama", True), ("qwen2", True)])
def test_llama_cpp_runs_the_file(mtype, shared_rope, tmp_path):
    """llama.cpp itself (llama-cpp-python bindings) gives the a3mod model's logits from the exported file (its KV
    cache is f16: 1e-3); shared RoPE pairs exercise rope_freqs."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model = _compressed(mtype, [a3mod.Allocate(budget=0.3)], shared_rope)
    vocab = vocab_gguf(tmp_path / "vocab.gguf", model.config.vocab_size)
    out = a3mod.save(model, tmp_path / "m.gguf", format="gguf", vocab_from=vocab)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = _ids(1, 12, 0)[0].tolist()
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[:len(ids)])).double()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].double()
    assert float((got - ref).norm() / ref.norm()) < 1e-3
