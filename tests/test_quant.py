"""Weight quantization after compression: BnbInt8 / Bnb4bit (bitsandbytes) and HQQ (hqq) passes.

Composition with A3 and a baseline, accuracy ordering by bit width, storage accounting (model bytes,
bits per weight), save/load round trips, quantization alone (plain or loaded compressed models), errors.
Tiny models only; hidden 64 so every decoder-layer weight size is a multiple of the group sizes used.
"""
from __future__ import annotations

import copy
import json
import struct

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import a3mod
from a3mod import CheckpointError, QuantizationError
from a3mod.arch import get_path, spec_for

from conftest import calib_ids, input_ids, logits, rerecord_files, tiny_model

pytest.importorskip("bitsandbytes")
pytest.importorskip("hqq")

INT8, NF4, FP4, HQQ4, HQQ2 = (a3mod.BnbInt8(), a3mod.Bnb4bit(), a3mod.Bnb4bit("fp4", 128, False),
                              a3mod.HQQ(nbits=4, group_size=32), a3mod.HQQ(nbits=2, group_size=16))
QUANTS = [INT8, NF4, FP4, HQQ4]
TOL = {INT8: 0.08, NF4: 0.8, FP4: 0.9, HQQ4: 0.6, HQQ2: 1.5}     # relative logit error (Frobenius) allowed


def dims(family: str) -> dict:
    return dict(hidden=64, heads=4, inter=128, **({"kv_heads": 2} if family != "gpt2" else {}))


def model_of(family: str, **kw):
    return tiny_model(family, impl="eager", **{**dims(family), **kw})


def compress(family: str, method: str, quant=None, **kw):
    passes = a3mod.a3_passes(0.3) if method == "a3" else [a3mod.SVDLLM(ratio=0.3)]
    return a3mod.apply(model_of(family, **kw), passes + ([quant] if quant else []), calib=calib_ids(), progress=False)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def layer_modules(model):
    return [m for layer in get_path(model, spec_for(model).layers) for m in layer.modules()]


def plain_linears(model) -> list:
    return [m for m in layer_modules(model) if type(m) is nn.Linear or type(m).__name__ == "Conv1D"]


def quantized(model) -> list:
    return [m for m in layer_modules(model) if getattr(m, "a3mod_quant", None) is not None]


def gen(model, prompt):
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        return model.generate(prompt, **kw)


def safetensors_header(path) -> tuple[dict, int]:
    """(header, byte length of the data section) of a safetensors file."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), len(raw) - 8 - n


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("cfg", [INT8, a3mod.BnbInt8(6.0), NF4, FP4, HQQ4, HQQ2, a3mod.HQQ(8, 128, 0)])
def test_config_json_round_trip(cfg):
    d = json.loads(json.dumps(a3mod.pass_to_dict(cfg)))
    assert a3mod.pass_from_dict(d) == cfg and d["type"] == type(cfg).__name__


@given(nbits=st.sampled_from([8, 4, 3, 2, 1]), group=st.integers(1, 64).map(lambda g: 8 * g), axis=st.sampled_from([0, 1]),
       qtype=st.sampled_from(["nf4", "fp4"]), block=st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096]),
       nested=st.booleans(), threshold=st.floats(0, 100))
def test_valid_configs_round_trip(nbits, group, axis, qtype, block, nested, threshold):
    for cfg in (a3mod.HQQ(nbits, group, axis), a3mod.Bnb4bit(qtype, block, nested), a3mod.BnbInt8(threshold)):
        assert a3mod.pass_from_dict(json.loads(json.dumps(a3mod.pass_to_dict(cfg)))) == cfg


@pytest.mark.parametrize("make,match", [
    (lambda: a3mod.Bnb4bit(quant_type="int4"), "quant_type='int4'; allowed: nf4, fp4"),
    (lambda: a3mod.Bnb4bit(blocksize=48), "blocksize=48; allowed: 32, 64"),
    (lambda: a3mod.Bnb4bit(blocksize=8192), "blocksize=8192"),
    (lambda: a3mod.Bnb4bit(blocksize=True), "blocksize=True"),
    (lambda: a3mod.Bnb4bit(compress_statistics=1), "compress_statistics=1 must be True or False"),
    (lambda: a3mod.HQQ(nbits=5), "nbits=5; allowed: 8, 4, 3, 2, 1"),
    (lambda: a3mod.HQQ(nbits=2.0), "nbits=2.0"),
    (lambda: a3mod.HQQ(group_size=12), "group_size=12 must be a positive multiple of 8"),
    (lambda: a3mod.HQQ(group_size=0), "group_size=0"),
    (lambda: a3mod.HQQ(axis=2), "axis=2"),
    (lambda: a3mod.BnbInt8(threshold=-1), "threshold=-1 must be a finite number >= 0"),
    (lambda: a3mod.BnbInt8(threshold=float("nan")), "threshold=nan"),
])
def test_bad_configs(make, match):
    with pytest.raises(QuantizationError, match=match):
        make()
    assert issubclass(QuantizationError, a3mod.A3ModError)


# ----------------------------------------------------------------------------- compose after compression
@pytest.mark.parametrize("family,method", [("llama", "a3"), ("gpt2", "a3"), ("llama", "svdllm"), ("gpt2", "svdllm")])
@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: repr(q))
def test_quantize_after_compression(family, method, quant):
    ref = compress(family, method)
    model = compress(family, method, quant)
    ids = input_ids()
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    assert rel_err(out, logits(ref, ids)) < TOL[quant]
    assert plain_linears(model) == []                                   # every decoder-layer linear replaced
    assert len(quantized(model)) == len(plain_linears(ref))
    assert all(m.a3mod_quant == quant for m in quantized(model))
    emb = model.get_input_embeddings()
    assert type(emb) is nn.Embedding and type(model.lm_head) is nn.Linear     # left alone
    assert torch.equal(emb.weight, ref.get_input_embeddings().weight)
    rep, rep_ref = a3mod.report(model), a3mod.report(ref)
    assert (rep.params, rep.params_orig, rep.ratio) == (rep_ref.params, rep_ref.params_orig, rep_ref.ratio)
    assert rep.bits_per_param < rep_ref.bits_per_param == 32.0
    assert rep.model_bytes < rep_ref.model_bytes
    assert [p["type"] for p in model.a3mod_info["passes"]][-1] == type(quant).__name__
    assert sum(r.quantized for r in rep.rows) == len(quantized(model))


def test_error_grows_as_bits_shrink():
    ref = compress("llama", "a3")
    ids = input_ids()
    base = logits(ref, ids)
    errs = [rel_err(logits(compress("llama", "a3", q), ids), base) for q in (INT8, NF4, HQQ2)]
    assert errs[0] < errs[1] < errs[2], errs


def test_int8_threshold_runs():
    ref = compress("llama", "a3")
    model = compress("llama", "a3", a3mod.BnbInt8(threshold=6.0))
    assert rel_err(logits(model, input_ids()), logits(ref, input_ids())) < TOL[INT8]


# ---------------------------------------------------------------------------------------- storage
def _linear_weight_bytes(model) -> tuple[int, int]:
    """(bytes of every decoder-layer linear's state except its bias, in x out summed), from the modules."""
    nbytes = weights = 0
    for layer in get_path(model, spec_for(model).layers):
        for m in layer.modules():
            if getattr(m, "a3mod_quant", None) is not None or type(m) is nn.Linear:
                nbytes += sum(t.nbytes for k, t in m.state_dict().items() if k != "bias")
                weights += m.in_features * m.out_features
    return nbytes, weights


@pytest.mark.parametrize("quant,lo,hi", [(None, 32, 32), (INT8, 8, 9), (NF4, 4, 5), (a3mod.HQQ(4, 64), 4, 5.1)],
                         ids=["fp32", "int8", "nf4", "hqq4-g64"])
def test_bits_per_param(quant, lo, hi):
    """Wide enough layers that per-linear constants (bitsandbytes' 1 KB nested code book) do not dominate."""
    model = tiny_model("llama", hidden=256, heads=4, kv_heads=2, inter=512, layers=1)
    if quant is not None:
        a3mod.apply(model, [quant], progress=False)
    rep = a3mod.report(model)
    nbytes, weights = _linear_weight_bytes(model)
    assert rep.linear_weights == weights == 4 * 256 * 256 - 2 * 256 * 128 + 3 * 256 * 512
    assert rep.bits_per_param == pytest.approx(8 * nbytes / weights, rel=1e-12)
    assert lo <= rep.bits_per_param <= hi
    if quant == INT8:      # int8 codes + one fp32 scale per output row + a 1-byte format tag per linear
        rows = 256 + 128 + 128 + 256 + 512 + 512 + 256
        assert nbytes == weights + 4 * rows + 7
    if quant == NF4:       # 4-bit codes + one 8-bit absmax per block of 64 (+ constants per linear)
        assert weights / 2 + weights / 64 < nbytes < weights / 2 + weights / 64 + 7 * 2048
    sd = model.state_dict()
    assert rep.model_bytes == sum(t.nbytes for t in sd.values())        # nothing tied here
    assert rep.params == rep.params_orig and rep.ratio == 0.0
    d = rep.to_dict()
    assert d["model_bytes"] == rep.model_bytes and d["bits_per_param"] == rep.bits_per_param
    assert "bits/param" in str(rep)


def test_tied_weights_counted_once():
    model = tiny_model("llama", **dims("llama"), tie_word_embeddings=True)
    a3mod.apply(model, [NF4], progress=False)
    unique = {t.data_ptr(): t.nbytes for t in model.state_dict().values()}
    assert a3mod.report(model).model_bytes == sum(unique.values())
    assert sum(t.nbytes for t in model.state_dict().values()) - a3mod.report(model).model_bytes == \
        model.lm_head.weight.nbytes


# ---------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("family,method,quant", [
    ("llama", "a3", INT8), ("llama", "a3", NF4), ("llama", "a3", FP4), ("llama", "a3", HQQ4), ("llama", "a3", HQQ2),
    ("gpt2", "a3", NF4), ("gpt2", "svdllm", HQQ4), ("llama", "svdllm", INT8),
], ids=str)
def test_round_trip(tmp_path, family, method, quant):
    model = compress(family, method, quant)
    ids, prompt = input_ids(), input_ids(1, 5)
    before, gen_before = logits(model, ids), gen(model, prompt)
    path = a3mod.save(model, tmp_path / "ckpt")
    side = json.loads((path / "a3mod.json").read_text())
    assert side["format"] == 3 and side["quant"]["config"] == a3mod.pass_to_dict(quant)
    listed = sum(len(e.get("quantized", {})) for e in side["layers"].values())
    assert listed == len(quantized(model))
    header, data_bytes = safetensors_header(path / "model.safetensors")
    stored = sum(end - begin for k, v in header.items() if k != "__metadata__" for begin, end in [v["data_offsets"]])
    rep = a3mod.report(model)
    assert rep.model_bytes == stored == data_bytes

    loaded = a3mod.load(path)
    loaded.set_attn_implementation("eager")
    assert torch.equal(logits(loaded, ids), before)                      # bit-identical
    assert torch.equal(gen(loaded, prompt), gen_before)
    assert plain_linears(loaded) == [] and len(quantized(loaded)) == len(quantized(model))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a3mod.report(loaded).to_dict() == rep.to_dict()
    assert loaded.a3mod_info == model.a3mod_info


def test_load_refuses_a_sidecar_that_disagrees(tmp_path):
    path = a3mod.save(compress("llama", "a3", HQQ4), tmp_path / "ckpt")
    side = json.loads((path / "a3mod.json").read_text())

    def edited(fn):
        s = json.loads(json.dumps(side))
        fn(s)
        (path / "a3mod.json").write_text(json.dumps(a3mod.io.sidecar.seal(s)))

    edited(lambda s: s["quant"]["config"].update(nbits=2))
    with pytest.raises(CheckpointError, match="nbits"):
        a3mod.load(path)
    edited(lambda s: s.pop("quant"))
    with pytest.raises(CheckpointError, match="no 'quant' config"):
        a3mod.load(path)
    edited(lambda s: s["quant"].update(config={"type": "A3QK", "ratio": 0.1, "rank": None}))
    with pytest.raises(CheckpointError, match="not a quantization config"):
        a3mod.load(path)
    edited(lambda s: s["layers"]["0"]["quantized"]["mlp.up_proj"].update(out_features=7))
    with pytest.raises(CheckpointError, match="mlp.up_proj"):
        a3mod.load(path)


def test_load_refuses_code_in_hqq_dtype_names(tmp_path):
    from safetensors.torch import load_file, save_file

    path = a3mod.save(compress("llama", "a3", HQQ4), tmp_path / "ckpt")
    sd = load_file(str(path / "model.safetensors"))
    key = next(k for k in sd if k.endswith(".compute_dtype"))
    sd[key] = torch.tensor([ord(c) for c in "__import__('os')"], dtype=torch.uint8)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="truncated or replaced"):          # the recorded size, first
        a3mod.load(path)
    side = json.loads((path / "a3mod.json").read_text())
    rerecord_files(side, path)                                                # past the checksums: the dtype check
    (path / "a3mod.json").write_text(json.dumps(a3mod.io.sidecar.seal(side)))
    with pytest.raises(CheckpointError, match="not the name of a torch dtype"):
        a3mod.load(path)


# ------------------------------------------------------------------------------------ quantization alone
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_quantize_uncompressed(tmp_path, family):
    ref = model_of(family)
    model = model_of(family)
    a3mod.apply(model, [NF4], progress=False)
    assert plain_linears(model) == []
    if family == "gpt2":     # fused Conv1D c_attn: transposed into a Linear, then quantized
        assert model.transformer.h[0].attn.c_attn.quant_state.shape == (192, 64)
    assert rel_err(logits(model, input_ids()), logits(ref, input_ids())) < TOL[NF4]
    rep = a3mod.report(model)
    assert rep.params == rep.params_orig == a3mod.report(ref).params and rep.ratio == 0.0
    assert model.a3mod_info["passes"] == [a3mod.pass_to_dict(NF4)]
    loaded = a3mod.load(a3mod.save(model, tmp_path / "ckpt"))
    loaded.set_attn_implementation("eager")
    assert torch.equal(logits(loaded, input_ids()), logits(model, input_ids()))


def test_quantize_a_loaded_compressed_checkpoint(tmp_path):
    compressed = compress("llama", "a3")
    loaded = a3mod.load(a3mod.save(compressed, tmp_path / "a3"))
    loaded.set_attn_implementation("eager")
    a3mod.apply(loaded, [HQQ4], progress=False)
    assert plain_linears(loaded) == []
    assert rel_err(logits(loaded, input_ids()), logits(compressed, input_ids())) < TOL[HQQ4]
    assert [p["type"] for p in loaded.a3mod_info["passes"]] == ["A3QK", "A3OV", "A3MLP", "A3Experts", "HQQ"]
    assert a3mod.report(loaded).ratio == a3mod.report(compressed).ratio
    again = a3mod.load(a3mod.save(loaded, tmp_path / "a3-hqq"))
    again.set_attn_implementation("eager")
    assert torch.equal(logits(again, input_ids()), logits(loaded, input_ids()))
    with pytest.raises(a3mod.A3ModError, match="already compressed"):       # compression still refused
        a3mod.apply(again, [*a3mod.a3_passes(0.1), NF4], calib=calib_ids(), progress=False)


# ---------------------------------------------------------------------------------------------- errors
def _untouched(model, ref) -> None:
    assert not hasattr(model, "a3mod_info")
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    sa, sb = model.state_dict(), ref.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


@pytest.mark.parametrize("passes,match", [
    ([NF4, *a3mod.a3_passes(0.3)], "Bnb4bit must come last"),
    ([*a3mod.a3_passes(0.3), INT8, NF4], "at most one quantization pass"),
    ([INT8, HQQ4], "at most one quantization pass"),
    ([a3mod.SVDLLM(ratio=0.3), a3mod.A3QK(ratio=0.3), NF4], "rewrites every linear itself"),
    ([*a3mod.a3_passes(0.3), a3mod.HQQ(nbits=2, group_size=64)], "group_size=64 x 4 .*group_size=48 fits"),
    ([a3mod.HQQ(nbits=4, group_size=40)], r"not a multiple of group_size=40"),
], ids=["not-last", "two", "two-alone", "baseline-plus-a3", "hqq-packing", "hqq-group"])
def test_bad_pass_lists_leave_the_model_untouched(passes, match):
    model, ref = model_of("llama"), model_of("llama")
    with pytest.raises(a3mod.A3ModError, match=match):
        a3mod.apply(model, passes, calib=calib_ids(), progress=False)
    _untouched(model, ref)


def test_quantized_model_refuses_more_passes():
    model = model_of("llama")
    a3mod.apply(model, [INT8], progress=False)
    with pytest.raises(a3mod.A3ModError, match="model is quantized"):
        a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    with pytest.raises(QuantizationError, match="already quantized"):
        a3mod.apply(model, [NF4], progress=False)
    assert model.a3mod_info["passes"] == [a3mod.pass_to_dict(INT8)]


@pytest.mark.parametrize("in_features", [1232, 100, 1536])
def test_nf4_rows_not_a_multiple_of_the_blocksize(in_features):
    """Regression: bitsandbytes' CPU quantize_4bit mis-blocks 2-D weights whose rows are not a multiple of the
    blocksize (A3's 576 x 1232 down_proj lost 56% instead of 9%); a3mod quantizes the flat weight."""
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 96)
    from a3mod.quant.base import handler_for
    cfg = a3mod.Bnb4bit(quant_type="nf4")
    q = handler_for(cfg).quantize(cfg, lin)
    x = torch.randn(8, in_features)
    rel = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.13


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_4bit_rows_not_a_multiple_of_the_blocksize_dequantize_flat(quant_type, compress_statistics):
    """Regression: bitsandbytes 0.50.0's CPU dequantize started a new block at every row of a 2-D quant state
    (0.50.2, installed here, does not); a3mod's Linear4bit dequantizes the flat weight, so the layer equals the flat
    round trip of its weight exactly, and weights with outlier columns (as in real down_proj weights) keep the
    format's error (the per-row blocking lost ~50% where the kernel had the bug)."""
    import bitsandbytes.functional as F

    from a3mod.quant.base import handler_for
    torch.manual_seed(0)
    lin = nn.Linear(1232, 96)                            # 1232 = 19.25 blocks of 64 per row
    with torch.no_grad():
        lin.weight[:, ::97] *= 30.0
    cfg = a3mod.Bnb4bit(quant_type=quant_type, compress_statistics=compress_statistics)
    q = handler_for(cfg).quantize(cfg, lin)
    w = lin.weight.detach()
    packed, qs = F.quantize_4bit(w.reshape(-1), blocksize=64, quant_type=quant_type,
                                 compress_statistics=compress_statistics)
    w_flat = F.dequantize_4bit(packed, qs).view(w.shape)            # blocks of the flat tensor (the format)
    qs2 = copy.copy(qs)
    qs2.shape = torch.Size(w.shape)
    w_rows = F.dequantize_4bit(packed, qs2)                          # the CPU kernel's per-row blocking
    x = torch.randn(8, 1232)
    with torch.no_grad():
        torch.testing.assert_close(q(x), nn.functional.linear(x, w_flat, lin.bias), rtol=1e-5, atol=1e-5)
        err = ((q(x) - lin(x)).norm() / lin(x).norm()).item()
        err_rows = ((nn.functional.linear(x, w_rows, lin.bias) - lin(x)).norm() / lin(x).norm()).item()
    assert err < 0.25 and err <= err_rows * (1 + 1e-6), (err, err_rows)
