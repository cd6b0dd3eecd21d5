"""Stock transformers export (`a3mod.save(model, out, format="hf")`, a3mod.export.stock): the folder is a checkpoint
of the base family's own model type, transformers loads it without a3mod, and its logits equal the a3mod model's
(zero padding, longrope factors exact in float32, the softmax scale folded into W_q, an output bias carried by a
value dim). Constructs the format cannot express are refused before any file is written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import a3mod
from a3mod.errors import CheckpointError, ExportError
from a3mod.export import stock
from a3mod.io import native

from zoo import _ids, tiny_zoo_model

# families whose stock classes read head_dim, intermediate_size and rope_parameters (exported exactly)
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2", "ministral3",
            "smollm3", "nemotron", "exaone", "arcee"]


def _compressed(mtype: str, passes=None, shared_rope: bool = False):
    model = tiny_zoo_model(mtype)
    a3mod.apply(model, passes or a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    if shared_rope:           # every KV group keeps group 0's pairs: fewer frequencies in all -> longrope, D < d_h
        for m in model.modules():
            if isinstance(m, a3mod.ReducedHeadAttention) and m.rot_dim and not m.qk_norm:
                with torch.no_grad():
                    m.rope_index.copy_(m.rope_index[:1].expand_as(m.rope_index).clone())
    return model


@torch.no_grad()
def _rel(model, other, ids) -> float:
    a, b = model(input_ids=ids).logits, other(input_ids=ids).logits
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("shared_rope", [False, True], ids=["per-group-rope", "shared-rope"])
@pytest.mark.parametrize("mtype", FAMILIES)
def test_stock_export_is_exact(mtype, shared_rope, tmp_path):
    model = _compressed(mtype, shared_rope=shared_rope)
    out = a3mod.save(model, tmp_path / "hf", format="hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == mtype and "a3mod" not in cfg
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not native.is_native(loaded) and type(loaded).__module__.startswith("transformers.")
    assert _rel(model, loaded, _ids(2, 12, 0)) < 1e-5
    rec = json.loads((out / stock.RECORD).read_text())
    c = model.config
    assert rec["kv_elements_per_token"]["export"] == c.num_hidden_layers * 2 * c.num_key_value_heads * rec["head_dim"]
    assert cfg["head_dim"] == rec["head_dim"] and (rec["rope"] == "longrope") == (
        cfg["rope_parameters"]["rope_type"] == "longrope")
    assert rec["decoder_layer_params"]["zeros"] >= 0 and rec["logit_error"] < 1e-5


def test_mixed_ranks_and_longrope_load_without_a3mod(tmp_path):
    """Allocate's per-layer dims, padded to one head dim and MLP width, loaded in a process that never imports
    a3mod; shared RoPE pairs make the frequencies a longrope vector."""
    base = tiny_zoo_model("llama")
    model = _compressed("llama", [a3mod.Allocate(budget=0.3)], shared_rope=True)
    widths = {layer.mlp.inter for layer in model.model.layers}
    out = a3mod.save(model, tmp_path / "hf", format="hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "longrope" and cfg["head_dim"] < base.config.head_dim
    assert cfg["intermediate_size"] == max(widths)
    ids = _ids(2, 12, 0)
    with torch.no_grad():
        torch.save({"ids": ids, "ref": model(input_ids=ids).logits}, tmp_path / "ref.pt")
    code = (f"import sys, torch, transformers\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
            f"d = torch.load({str(tmp_path / 'ref.pt')!r})\n"
            f"with torch.no_grad(): o = m(input_ids=d['ids']).logits\n"
            f"print(type(m).__name__, 'a3mod' in sys.modules, float((o - d['ref']).norm() / d['ref'].norm()))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    name, imported, rel = res.stdout.split()[-3:]
    assert (name, imported) == ("LlamaForCausalLM", "False") and float(rel) < 1e-5, res.stderr[-2000:]


def test_full_rank_export_has_no_padding(tmp_path):
    model = _compressed("llama", a3mod.a3_passes(0.0))
    out = a3mod.save(model, tmp_path / "hf", format="hf")
    rec = json.loads((out / stock.RECORD).read_text())
    assert rec["rope"] == "original" and rec["decoder_layer_params"]["zeros"] == 0
    assert rec["head_dim"] == model.config.head_dim and rec["intermediate_size"] == model.config.intermediate_size
    assert json.loads((out / "config.json").read_text())["rope_parameters"] == model.config.rope_parameters


def test_qwen2_output_bias_rides_in_a_value_dim():
    """A3OV folds Qwen2's value bias into an o_proj bias the stock class lacks: one spare value dim with bias 1 and
    o_proj column = the bias reproduces it exactly."""
    model = _compressed("qwen2")
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    exp = stock.to_stock(model)
    attn = exp.model.model.layers[0].self_attn
    assert attn.o_proj.bias is None and exp.record["head_dim"] > model.model.layers[0].self_attn.vo_dim
    assert stock.max_logit_error(model, exp.model) < 1e-5


def test_bf16_save_dtype(tmp_path):
    model = _compressed("llama")
    out = a3mod.save(model, tmp_path / "hf", format="hf", dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32          # the a3mod model is untouched


@given(base=st.sampled_from([1e4, 5e5, 1e6, 1e7]), head_dim=st.sampled_from([32, 64, 128, 256]),
       frac=st.floats(0.1, 1.0), seed=st.integers(0, 2**16))
@settings(max_examples=15, deadline=None)
def test_longrope_factors_reproduce_every_frequency_exactly(base, head_dim, frac, seed):
    """Any set of kept frequencies, each in the slot `assign_slots` gives it at the export head dim: transformers'
    float32 longrope frequency 1 / (factor * base^(2s/D)) equals the original bit for bit."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    n = max(1, int(frac * head_dim // 2))
    used = sorted(torch.randperm(head_dim // 2, generator=torch.Generator().manual_seed(seed))[:n].tolist())
    d = 2 * n + 2 * (seed % 3)
    slots = stock.assign_slots(used, d, inv, base)
    assert sorted(f for f in slots if f is not None) == used
    p = stock.slot_powers(base, d)
    for s, f in enumerate(slots):
        if f is not None:
            e = torch.tensor(stock.exact_factor(float(inv[f]), p[s]), dtype=torch.float32)
            assert torch.equal(1.0 / (e * p[s]), inv[f]), (s, f)


@pytest.mark.parametrize("mtype,what", [("gpt2", "fused qkv"), ("mixtral", "routed experts"),
                                        ("gemma3_text", "per layer type")])
def test_unexpressible_families_are_refused_before_writing(mtype, what, tmp_path):
    model = _compressed(mtype)
    with pytest.raises(ExportError, match=what):
        a3mod.save(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


def test_low_rank_linears_are_refused(tmp_path):
    model = tiny_zoo_model("llama")
    a3mod.apply(model, [a3mod.SVDLLM(ratio=0.3)], calib=_ids(4, 16, 1), progress=False)
    with pytest.raises(ExportError, match="LowRankLinear"):
        a3mod.save(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


def test_overwrite_replaces_an_export_and_nothing_else(tmp_path):
    model = _compressed("llama")
    out = a3mod.save(model, tmp_path / "hf", format="hf")
    with pytest.raises(CheckpointError, match="exists"):
        a3mod.save(model, out, format="hf")
    a3mod.save(model, out, format="hf", overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        a3mod.save(model, out, format="hf", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(a3mod.A3ModError, match="allowed: a3mod, hf"):
        a3mod.save(model, tmp_path / "x", format="onnx")


def test_cli_export(tmp_path, capsys):
    from a3mod.cli.commands import main
    from conftest import calib_ids, input_ids, make_tokenizer, tiny_model

    model = tiny_model("llama", kv_heads=2)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    src = a3mod.save(model, tmp_path / "a3", tokenizer=make_tokenizer())
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr().out
    assert "stock llama: head_dim" in printed and "zero weights" in printed
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / stock.RECORD).is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert _rel(model, loaded, input_ids()) < 1e-5
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "hf")]) == 2       # exists: refused
    assert "a3mod: error: output dir" in capsys.readouterr().err
    gpt2 = tiny_model("gpt2")
    a3mod.apply(gpt2, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    g = a3mod.save(gpt2, tmp_path / "g", tokenizer=make_tokenizer())
    assert main(["export", "--model", str(g), "--out", str(tmp_path / "g-hf")]) == 2
    assert "a3mod: error: format 'hf': gpt2 models have a fused qkv projection" in capsys.readouterr().err
    assert not (tmp_path / "g-hf").exists()


# ------------------------------------------------------------------------------------- portable selection
def _rope_rows(model) -> set:
    return {tuple(r) for m in model.modules() if isinstance(m, a3mod.ReducedHeadAttention)
            for r in m.rope_index.tolist()}


@pytest.mark.parametrize("mtype", ["llama", "gemma", "mistral"])
def test_portable_selection_exports_without_padding(mtype, tmp_path):
    model = _compressed(mtype, a3mod.a3_passes(0.3, portable=True))
    assert len(_rope_rows(model)) == 1                   # one set of kept pairs in every layer and KV group
    qk = a3mod.passes.A3QK
    rec = [p for p in model.a3mod_info["passes"] if p["type"] == "A3QK"][0]
    assert rec["portable"] and sorted(rec["pair_order"]) == list(range(model.config.head_dim // 2))
    out = a3mod.save(model, tmp_path / "hf", format="hf")
    r = json.loads((out / stock.RECORD).read_text())
    assert r["decoder_layer_params"]["zeros"] == 0
    assert r["kv_elements_per_token"]["export"] == r["kv_elements_per_token"]["a3mod"]
    assert _rel(model, AutoModelForCausalLM.from_pretrained(out).eval(), _ids(2, 12, 0)) < 1e-5
    # the recorded ranking reproduces the model exactly (what streaming and a re-run take)
    again = _compressed(mtype, [qk(ratio=0.3, pair_order=tuple(rec["pair_order"])), *a3mod.a3_passes(0.3)[1:]])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_portable_equals_per_group_selection_with_one_group_and_layer():
    """With one KV group in one layer the shared ranking is that group's own: the same pairs, the same model."""
    from a3mod.math import solvers

    g = torch.Generator().manual_seed(0)
    q2, k2 = torch.rand(1, 3, 16, generator=g, dtype=torch.float64), torch.rand(1, 16, generator=g, dtype=torch.float64)
    order = solvers.shared_pair_order([solvers.rope_pair_scores(q2, k2, 16, "rotate_half")[0]])
    for r in (2, 6, 10, 16):
        own, loss_own = solvers.qk_rope_select(q2, k2, 16, "rotate_half", r)
        shared, loss_shared = solvers.qk_rope_select(q2, k2, 16, "rotate_half", r, order)
        assert torch.equal(own, shared) and torch.allclose(loss_own, loss_shared)


def test_portable_errors():
    qk = a3mod.passes.A3QK
    with pytest.raises(a3mod.RatioError, match="permutation"):
        qk(ratio=0.3, pair_order=(0, 0, 1))
    with pytest.raises(a3mod.RatioError, match="rotate 8"):
        _compressed("llama", [qk(ratio=0.3, pair_order=(1, 0, 2))])
    with pytest.raises(a3mod.A3ModError, match="compress_streaming never holds"):
        from a3mod.passes.base import check_passes
        check_passes([qk(ratio=0.3, portable=True)], schedule="stream")
    with pytest.raises(a3mod.RatioError, match="--portable is an option of method a3"):
        from a3mod.pipeline import recipes
        recipes.passes("svd-llm", 0.2, portable=True, names={"portable": "--portable"})
