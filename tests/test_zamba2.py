"""Zamba2: Mamba-2 layers (left as they are) and hybrid layers that each run one of `num_mem_blocks` shared transformer
blocks (weights tied across the layers using it, per-use low-rank adapters in its MLP). The shared MLP is narrowed
once, from the statistics of all its uses, and the tie stays; the shared attention is kept whole (the report says
why). The tiny config keeps what real checkpoints have: two blocks, three uses (layers 1 and 4 share block 0)."""
from __future__ import annotations

import pytest
import torch

import a3mod
from a3mod.arch import layer_views, shared_groups
from a3mod.math import solvers
from a3mod.modules import NarrowLinear

from zoo import _ids, _logits, tiny_zoo_model

CALIB = _ids(4, 16, 1)


def _unique_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _mlp(model, i):
    return model.model.layers[i].shared_transformer.feed_forward


def _down_inputs(model, layers) -> torch.Tensor:
    """The intermediate activations h (tokens, I) entering each listed layer's MLP down projection, stacked."""
    seen, hooks = [], [_mlp(model, i).down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
                       for i in layers]
    try:
        with torch.no_grad():
            for row in CALIB:
                model(input_ids=row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in seen]).double()


def test_the_shared_blocks_and_their_uses_are_found():
    model = tiny_zoo_model("zamba2")
    views = layer_views(model)
    assert [v.index for v in views if v.left] == [0, 3]               # Mamba-2 layers
    assert shared_groups(views) == [[1, 4]]                            # block 0 runs in layers 1 and 4
    assert all(v.mixer.startswith("attention kept whole") for v in views if not v.left)


def test_shared_mlp_is_solved_from_all_its_uses_and_stays_tied(tmp_path):
    """The kept neurons of block 0 are A3's selection on the Gram of both uses together; layers 1 and 4 then hold
    the same narrowed linears (so the model shrinks instead of untying), and save / load keeps them one tensor."""
    model = tiny_zoo_model("zamba2")
    before, ids = _unique_params(model), _ids(2, 12, 0)
    h = _down_inputs(model, [1, 4])
    stats = a3mod.collect(model, CALIB, progress=False)
    kept_stats = [{k: t.clone() for k, t in layer.items()} for layer in stats.layers]
    a3mod.apply(model, [a3mod.A3MLP(ratio=0.3)], stats=stats, progress=False)
    assert all(torch.equal(t, kept_stats[i][k]) for i, layer in enumerate(stats.layers) for k, t in layer.items())
    one, four, two = _mlp(model, 1), _mlp(model, 4), _mlp(model, 2)
    for name in ("gate_up_proj", "down_proj"):
        assert isinstance(getattr(one, name), NarrowLinear) and getattr(one, name) is getattr(four, name)
    assert one.gate_up_proj_adapter_list[0][1] is four.gate_up_proj_adapter_list[0][1]
    assert one.gate_up_proj_adapter_list[2][1].out_features == one.gate_up_proj.out_features
    r, w = one.down_proj.in_features, model.model.layers[1].shared_transformer.feed_forward.down_proj.kept
    w_down = tiny_zoo_model("zamba2").model.layers[1].shared_transformer.feed_forward.down_proj.weight.double()
    expect = solvers.mlp_select(h.square().sum(0), w_down.t(), r)[0]
    assert w == expect.tolist()                                         # pooled over both uses
    assert two.down_proj.in_features == r and two.down_proj is not one.down_proj     # block 1: its own
    after = _unique_params(model)
    assert after < before
    rep = a3mod.report(model)
    assert rep.shared == [[1, 4]] and "layers [1, 4] run one shared block" in str(rep)
    ref = _logits(model, ids)
    a3mod.save(model, tmp_path / "c")
    back = a3mod.load(tmp_path / "c")
    assert torch.equal(_logits(back, ids), ref)
    l1, l4 = _mlp(back, 1).down_proj.weight, _mlp(back, 4).down_proj.weight
    assert l1.data_ptr() == l4.data_ptr() and _unique_params(back) == after


@pytest.mark.filterwarnings("ignore:a3mod. A3MLP.update=True. estimates")
def test_the_update_fits_the_gram_of_every_use():
    """A3MLP(update=True) on a shared MLP: the kept down columns are the least-squares fit over both uses' tokens."""
    model, cfg = tiny_zoo_model("zamba2"), a3mod.A3MLP(ratio=0.3, update=True)
    h = _down_inputs(model, [1, 4])
    w_down = _mlp(model, 1).down_proj.weight.detach().double()          # (d_m, I)
    with pytest.warns(UserWarning, match=r"run shared blocks.*\['hgram'\] statistics are collected in one forward"):
        a3mod.apply(model, [cfg], calib=CALIB, progress=False)
    down = _mlp(model, 1).down_proj
    assert down is _mlp(model, 4).down_proj
    kept = torch.tensor(down.kept)
    expect = solvers.mlp_refit(w_down.t(), h.t() @ h / h.shape[0], kept, cfg.damping, errors=False)[0]
    assert torch.allclose(down.weight.double(), expect.t(), rtol=1e-4, atol=1e-5)


def test_full_rank_reproduces_the_model():
    model = tiny_zoo_model("zamba2")
    ids = _ids(2, 12, 0)
    ref = _logits(model, ids)
    a3mod.apply(model, [a3mod.A3MLP(ratio=0.0)], calib=CALIB, progress=False)
    assert torch.allclose(_logits(model, ids), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: a3mod.SVDLLM(ratio=0.2), lambda: a3mod.PlainSVD(ratio=0.2),
                                  lambda: a3mod.Allocate(budget=0.2)])
def test_model_scope_passes_refuse_a_shared_block_by_name(make):
    """The baselines factor each layer's linears on their own and Allocate picks each layer's dims: on a shared
    block either would untie it (a larger model). A typed error naming the layers, before any work; the model is
    left as it was."""
    model = tiny_zoo_model("zamba2")
    ref = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(a3mod.UnsupportedModelError, match=r"layers \[\[1, 4\]\] run one shared block"):
        a3mod.apply(model, [make()], calib=CALIB, progress=False)
    assert all(torch.equal(t, ref[n]) for n, t in model.state_dict().items())


def test_streaming_refuses_a_shared_block_before_writing(tmp_path):
    model = tiny_zoo_model("zamba2")
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(a3mod.UnsupportedModelError, match="streaming holds one layer at a time"):
        a3mod.compress_streaming(tmp_path / "src", tmp_path / "out", [a3mod.A3MLP(ratio=0.3)], CALIB, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("quant", ["hqq", "int8", "nf4"])
def test_quantized_shared_block_stays_one_module_through_save_and_load(quant, tmp_path):
    """A quantization pass after A3 quantizes a shared block's linears once (the same module in every layer using
    it); a3mod.load rebuilds that sharing from the saved aliases and computes what was saved, bit for bit."""
    pytest.importorskip("hqq" if quant == "hqq" else "bitsandbytes")
    cfg = {"hqq": lambda: a3mod.HQQ(group_size=8), "int8": lambda: a3mod.BnbInt8(),
           "nf4": lambda: a3mod.Bnb4bit(blocksize=64)}[quant]()
    model, ids = tiny_zoo_model("zamba2"), _ids(2, 12, 0)
    a3mod.apply(model, a3mod.a3_passes(0.3) + [cfg], calib=CALIB, progress=False)
    assert _mlp(model, 1).down_proj is _mlp(model, 4).down_proj
    ref = _logits(model, ids)
    a3mod.save(model, tmp_path / "q")
    back = a3mod.load(tmp_path / "q")
    assert _mlp(back, 1).down_proj is _mlp(back, 4).down_proj
    assert _mlp(back, 2).down_proj is not _mlp(back, 1).down_proj
    assert torch.equal(_logits(back, ids), ref)


def test_cli_compresses_zamba2_and_refuses_streaming_it(tmp_path, capsys):
    """`a3mod compress` on a Zamba2 folder: the report lists the shared block and the checkpoint loads tied;
    `--stream` is refused with one `a3mod: error:` line naming the layers, nothing written."""
    from a3mod.cli import main
    from conftest import make_tokenizer, write_text

    src, text = tmp_path / "zamba2", write_text(tmp_path / "corpus.txt")
    tiny_zoo_model("zamba2").save_pretrained(src)
    make_tokenizer().save_pretrained(src)
    common = ["compress", "--model", str(src), "--ratio", "0.3", "--calib", text, "--n-samples", "4",
              "--calib-seq-len", "16", "--no-eval"]
    assert main([*common, "--out", str(tmp_path / "out")]) == 0
    assert "layers [1, 4] run one shared block" in capsys.readouterr().out
    back = a3mod.load(tmp_path / "out")
    assert _mlp(back, 1).down_proj is _mlp(back, 4).down_proj
    assert main([*common, "--stream", "--out", str(tmp_path / "streamed")]) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("a3mod: error:"))
    assert "layers [[1, 4]] run one shared block" in line
    assert "Traceback" not in err and not (tmp_path / "streamed").exists()


def test_a_rolled_back_compression_keeps_the_block_tied(monkeypatch):
    """An error after the swaps (here the final self-check) puts every module back; with the undo log spilling to
    disk (budget 0) a tied block's tensors must come back as one tensor, not one copy per layer."""
    from a3mod.pipeline import compress

    monkeypatch.setenv("A3MOD_UNDO_MEMORY", "0")
    model = tiny_zoo_model("zamba2")
    before, ref = _unique_params(model), _logits(model, _ids(2, 12, 0))

    def fails(*a, **k):
        raise a3mod.A3ModError("the self-check failed")
    monkeypatch.setattr(compress, "_self_check", fails)
    with pytest.raises(a3mod.A3ModError, match="self-check failed"):
        a3mod.apply(model, [a3mod.A3MLP(ratio=0.3)], calib=CALIB, progress=False)
    assert _mlp(model, 1).gate_up_proj.weight is _mlp(model, 4).gate_up_proj.weight
    assert _unique_params(model) == before and torch.equal(_logits(model, _ids(2, 12, 0)), ref)


def test_quantization_alone_quantizes_a_tied_linear_once():
    """Tied weights in separate modules (an uncompressed Zamba2, or the adapters' first linears after A3): one
    quantized module serves every layer using it."""
    pytest.importorskip("hqq")
    model = tiny_zoo_model("zamba2")
    a3mod.apply(model, [a3mod.HQQ(group_size=8)], progress=False)
    assert _mlp(model, 1).down_proj is _mlp(model, 4).down_proj
    model = tiny_zoo_model("zamba2")
    a3mod.apply(model, a3mod.a3_passes(0.3) + [a3mod.HQQ(group_size=8)], calib=CALIB, progress=False)
    assert _mlp(model, 1).gate_up_proj_adapter_list[0][0] is _mlp(model, 4).gate_up_proj_adapter_list[0][0]
