"""Compile and export compressed models: no graph breaks from a3mod's modules, fullgraph compile, torch.export,
ONNX (dynamo) in onnxruntime, static-cache generate, and the ExecuTorch static-cache export (a3mod.export.executorch)."""
from __future__ import annotations

import pytest
import torch
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

import a3mod
from a3mod import export

from conftest import calib_ids, input_ids, tiny_model

FAMILIES = ["llama", "qwen2", "gpt2"]


def _pair(family: str):
    """(original, compressed with different q/k and v/o dims) of one tiny model."""
    kw = {} if family == "gpt2" else {"kv_heads": 2}
    orig, model = tiny_model(family, **kw).eval(), tiny_model(family, **kw).eval()
    a3mod.apply(model, [a3mod.A3QK(ratio=0.5), a3mod.A3OV(ratio=0.25), a3mod.A3MLP(ratio=0.3)], calib=calib_ids(),
                progress=False)
    return orig, model


@pytest.mark.parametrize("family", FAMILIES)
def test_no_graph_breaks_and_fullgraph_compile(family):
    orig, model = _pair(family)
    x = input_ids()
    counts = []
    for m in (orig, model):
        torch._dynamo.reset()
        counts.append(torch._dynamo.explain(m)(x).graph_break_count)
    assert counts[1] == counts[0] == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_rope_layout_is_recomputed_after_an_in_place_load():
    """The cached RoPE layout (shared / identity index) follows rope_index when load_state_dict copies into it."""
    _, model = _pair("llama")
    a = model.model.layers[0].self_attn
    x = input_ids()
    model(x)                                     # caches the layout
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    key = "model.layers.0.self_attn.rope_index"
    sd[key] = sd[key].flip(-1).contiguous()
    model.load_state_dict(sd)
    assert a._rope_key is None
    ref = model(x).logits
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x).logits, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_matches(family):
    _, model = _pair(family)
    x = input_ids()
    program = torch.export.export(model, (x,), kwargs={"use_cache": False})
    torch.testing.assert_close(program.module()(x, use_cache=False).logits, model(x, use_cache=False).logits,
                               rtol=1e-5, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _, model = _pair("llama")
    x = input_ids()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).logits

    torch.onnx.export(Logits(model), (x,), dynamo=True).save(str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).logits.detach(), rtol=1e-4, atol=1e-4)


def test_static_cache_generate_and_executorch_export():
    """generate with a static cache == dynamic; the ExecuTorch static-cache program (per-layer k/v cache dims)
    generates the same tokens token by token."""
    _, model = _pair("llama")
    attn = model.model.layers[0].self_attn
    assert attn.qk_dim != attn.vo_dim                   # keys and values of different widths in one cache
    x = input_ids(batch=1, seq_len=5)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    dynamic = model.generate(x, **kw)
    assert torch.equal(model.generate(x, cache_implementation="static", **kw), dynamic)
    program = export.export_with_static_cache(model, max_cache_len=32)
    assert torch.equal(TorchExportableModuleWithStaticCache.generate(program, x, max_new_tokens=6), dynamic)
