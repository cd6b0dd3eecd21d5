"""Data-parallel calibration: 2 CPU ranks (gloo), each running half of the windows, give the statistics and the
compressed model of one process running all of them (in-memory apply and streaming)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import a3mod

from conftest import calib_ids, make_tokenizer, tiny_model, write_text

PASSES = a3mod.a3_passes(0.3)
WORLD = 2


def _model():
    return tiny_model("llama", kv_heads=2, layers=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat_stats(stats) -> dict:
    return {f"{i}.{k}": t for i, d in enumerate(stats.layers) for k, t in d.items()}


def _rank(rank: int, port: int, tmp: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD)
    try:
        calib = calib_ids(6, 16)                                       # every rank passes all windows
        assert a3mod.calib.distributed.shard(calib).shape == (3, 16)         # and runs its half
        model = _model()
        stats = a3mod.collect(model, calib, progress=False)
        a3mod.apply(model, PASSES, stats=stats, progress=False)
        save_file({**{f"stats.{k}": v for k, v in _flat_stats(stats).items()},
                   **{f"model.{k}": v.contiguous() for k, v in model.state_dict().items()},
                   "n": torch.tensor(stats.n)}, os.path.join(tmp, f"rank{rank}.safetensors"))
        out = a3mod.compress_streaming(os.path.join(tmp, "src"), os.path.join(tmp, "streamed"), PASSES, calib,
                                       progress=False)
        assert str(out) == os.path.join(tmp, "streamed")
        os.environ["WORLD_SIZE"] = str(WORLD)                          # as torchrun sets it
        from a3mod.cli.commands import main
        assert main(_cli_args(tmp, "cli-2")) == 0
    finally:
        torch.distributed.destroy_process_group()


def _cli_args(tmp: str, out: str) -> list[str]:
    return ["compress", "--model", os.path.join(tmp, "src"), "--ratio", "0.3", "--calib", os.path.join(tmp, "text"),
            "--n-samples", "4", "--calib-seq-len", "16", "--no-eval", "--out", os.path.join(tmp, out)]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, key: str) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, key
    if a.is_floating_point():
        scale = b.abs().max().item() if b.numel() else 0.0
        assert (a - b).abs().max().item() <= rel * max(scale, 1e-30), key
    else:
        assert torch.equal(a, b), key


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
def test_two_ranks_equal_one_process(tmp_path):
    _model().save_pretrained(tmp_path / "src")
    make_tokenizer().save_pretrained(tmp_path / "src")
    write_text(tmp_path / "text")
    # fork: the ranks inherit the imported modules (spawn re-imports torch + transformers, ~10 s a rank on 2 cores);
    # safe because conftest pins torch to one thread before any op, so there is no OpenMP pool to inherit
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method=method)

    calib = calib_ids(6, 16)
    model = _model()
    stats = a3mod.collect(model, calib, progress=False)
    a3mod.apply(model, PASSES, stats=stats, progress=False)
    ref_stats, ref_model = _flat_stats(stats), model.state_dict()
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for got in ranks:
        assert int(got["n"]) == stats.n == 6 * 16
        assert {k[6:] for k in got if k.startswith("stats.")} == ref_stats.keys()
        for k, v in ref_stats.items():
            _close(got[f"stats.{k}"], v, 1e-10, k)                   # float64 sums, other summation order
        assert {k[6:] for k in got if k.startswith("model.")} == ref_model.keys()
        for k, v in ref_model.items():
            _close(got[f"model.{k}"], v, 1e-6, k)
    for k in ranks[0]:                                                # every rank ends with the same model
        assert torch.equal(ranks[0][k], ranks[1][k]) or k.startswith("stats."), k

    streamed = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    single = a3mod.compress_streaming(tmp_path / "src", tmp_path / "single", PASSES, calib, progress=False)
    ref = load_file(str(single / "model.safetensors"))
    assert streamed.keys() == ref.keys()
    for k in ref:
        _close(streamed[k], ref[k], 1e-6, k)
    loaded = a3mod.load(tmp_path / "streamed")
    assert loaded.a3mod_info["calib_tokens"] == 6 * 16
    assert not (tmp_path / ".streamed.a3mod-work").exists()

    from a3mod.cli.commands import main                                        # torchrun -m a3mod.cli.commands compress, 2 ranks
    assert main(_cli_args(str(tmp_path), "cli-1")) == 0
    two, one = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli-2", "cli-1"))
    assert two.keys() == one.keys()
    for k in one:
        _close(two[k], one[k], 1e-6, k)


class _Interrupt(Exception):
    pass


def _resume_rank(rank: int, port: int, tmp: str) -> None:
    """Both ranks are killed as layer 2 starts; the rerun continues there on both ranks."""
    from a3mod.pipeline import stream
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD)
    try:
        calib, one_layer, ran = calib_ids(6, 16), stream._one_layer, []

        def stop_at_2(run, i):
            if i == 2:
                raise _Interrupt(f"rank {rank} killed at layer 2")
            one_layer(run, i)

        stream._one_layer = stop_at_2
        with pytest.raises(_Interrupt):
            a3mod.compress_streaming(os.path.join(tmp, "src"), os.path.join(tmp, "out"), PASSES, calib,
                                     progress=False)
        torch.distributed.barrier()
        assert not os.path.exists(os.path.join(tmp, "out"))
        stream._one_layer = lambda run, i: ran.append(i) or one_layer(run, i)
        a3mod.compress_streaming(os.path.join(tmp, "src"), os.path.join(tmp, "out"), PASSES, calib, progress=False)
        assert ran == [2], ran                          # layers 0 (rank 0's) and 1 (rank 1's) were kept
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is needed")
def test_two_ranks_resume_after_an_interruption(tmp_path):
    _model().save_pretrained(tmp_path / "src")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_resume_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method=method)
    calib = calib_ids(6, 16)
    single = a3mod.compress_streaming(tmp_path / "src", tmp_path / "single", PASSES, calib, progress=False)
    got, ref = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "out", single))
    assert got.keys() == ref.keys()
    for k in ref:
        _close(got[k], ref[k], 1e-6, k)
    assert not (tmp_path / ".out.a3mod-work").exists()
