"""Fault injection: writers SIGKILLed at every step and at random instants, and randomly corrupted files.

Each kill runs the writer in a forked child of the test process (cheap: torch and a3mod are already imported),
kills it with SIGKILL (no cleanup handlers run) and then checks the output path: it must hold the complete old
checkpoint or the complete new one (loaded with checksum verification), and a rerun must give exactly the
uninterrupted result. Corruptions (hypothesis: flipped bytes, truncation) of the sidecar, config, weights and
statistics files must raise a typed a3mod error or load to identical logits, never NaN or another model.
"""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import a3mod
from a3mod.io import files, sealed, tensors
from a3mod.pipeline import workdir
from a3mod.cli.commands import main

from conftest import calib_ids, input_ids, logits, make_tokenizer, tiny_model, write_text

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# the steps of every writer: each is a point to kill at, just before and just after it
STEPS = [(files, "staging_dir"), (files, "rename"), (files, "exchange"), (files, "remove_tree"),
         (files, "fsync_tree"), (files, "atomic_write"), (tensors, "write"), (sealed, "write_sidecar"),
         (workdir, "write_layer"), (workdir.Store, "commit"), (workdir, "remove_work"), (os, "replace")]


def _child(fn, k: int | None) -> None:
    """In the forked child: SIGKILL itself at the k-th step boundary (if k), run fn, exit 0 when it finished."""
    try:
        if k is not None:
            count = [0]

            def boundary():
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)

            def wrap(orig):
                def step(*a, **kw):
                    boundary()
                    out = orig(*a, **kw)
                    boundary()
                    return out
                return step

            for owner, name in STEPS:
                setattr(owner, name, wrap(getattr(owner, name)))
        fn()
        os._exit(0)
    except BaseException:            # noqa: BLE001  (any error: report it to the parent)
        import traceback

        traceback.print_exc()
        os._exit(1)


def run(fn, k: int | None = None, delay: float | None = None) -> str:
    """'finished', 'killed' or 'failed': fn() in a forked child, SIGKILLed at step boundary k or after `delay` s."""
    pid = os.fork()
    if pid == 0:
        _child(fn, k)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 120
    while True:                       # a child that hangs (a lock held by another thread at fork) fails the test
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("a forked writer hung for 120 s")
        time.sleep(0.005)
    if os.WIFSIGNALED(status):
        return "killed"
    return "finished" if os.WEXITSTATUS(status) == 0 else "failed"


def _logits_of(path) -> torch.Tensor:
    return logits(a3mod.load(path), input_ids())


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _holds_old_or_new(out: Path, old: torch.Tensor, new: torch.Tensor) -> str:
    got = _logits_of(out)               # verified: every file has its recorded sha256
    if torch.equal(got, old):
        return "old"
    assert torch.equal(got, new), "the output is neither the old nor the new checkpoint"
    return "new"


# ------------------------------------------------------------------------------------------- save
@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_save_killed_at_every_step_keeps_old_or_new(tmp_path, monkeypatch, atomic_exchange):
    if not atomic_exchange:
        monkeypatch.setattr(files, "exchange", lambda a, b: False)
    old_m, new_m = tiny_model("llama", kv_heads=2, seed=1), tiny_model("llama", kv_heads=2, seed=2)
    out = tmp_path / "ckpt"
    a3mod.save(old_m, out)
    old, new = logits(old_m, input_ids()), logits(new_m, input_ids())
    k = 1
    while True:
        a3mod.save(old_m, out, overwrite=True)                  # each kill starts from the old checkpoint
        status = run(lambda: a3mod.save(new_m, out, overwrite=True), k=k)
        assert status != "failed"
        if status == "finished":
            break
        if atomic_exchange or out.exists():
            _holds_old_or_new(out, old, new)                    # at every instant
        else:                                                   # between rename-aside and rename-in only
            assert [n for n in _leftovers(tmp_path, "ckpt") if ".a3mod-old-" in n]
        with files.output_lock(out):                            # what the next writer does first
            files.recover(out)
        _holds_old_or_new(out, old, new)
        assert _leftovers(tmp_path, "ckpt") == []
        k += 1
    assert k > 8                                                # every step was a kill point
    assert _holds_old_or_new(out, old, new) == "new"


def test_save_killed_at_random_instants(tmp_path):
    old_m, new_m = tiny_model("llama", kv_heads=2, seed=1), tiny_model("llama", kv_heads=2, seed=2)
    out = tmp_path / "ckpt"
    old, new = logits(old_m, input_ids()), logits(new_m, input_ids())
    a3mod.save(old_m, out)
    took = []
    for _ in range(3):
        t = time.perf_counter()
        assert run(lambda: a3mod.save(new_m, out, overwrite=True)) == "finished"
        took.append(time.perf_counter() - t)
    rng = random.Random(0)
    outcomes = []
    for delay in [0.0, *(rng.uniform(0, 1.1 * min(took)) for _ in range(11))]:
        a3mod.save(old_m, out, overwrite=True)
        status = run(lambda: a3mod.save(new_m, out, overwrite=True), delay=delay)
        outcomes.append(_holds_old_or_new(out, old, new))
        assert status in ("killed", "finished")
        a3mod.save(new_m, tmp_path / "other", overwrite=True)     # a writer nearby is unaffected
        with files.output_lock(out):
            files.recover(out)
        assert _leftovers(tmp_path, "ckpt") == []
    assert "old" in outcomes


# ------------------------------------------------------------------------------------ CLI compress
def test_cli_compress_killed_then_rerun_gives_the_uninterrupted_result(tmp_path):
    hf = tmp_path / "hf"
    tiny_model("llama", kv_heads=2).save_pretrained(hf)
    make_tokenizer().save_pretrained(hf)
    text = write_text(tmp_path / "t.txt")

    def argv(out):
        return ["compress", "--model", str(hf), "--ratio", "0.3", "--calib", text, "--n-samples", "3",
                "--calib-seq-len", "16", "--no-eval", "--out", str(out), "--overwrite"]

    assert main(argv(tmp_path / "ref")) == 0
    ref = (tmp_path / "ref" / "model.safetensors").read_bytes()
    out = tmp_path / "out"
    a3mod.save(tiny_model("llama", kv_heads=2, seed=4), out)             # an earlier result at --out
    old = _logits_of(out)
    t = time.perf_counter()
    assert run(lambda: main(argv(tmp_path / "timing"))) == "finished"
    took = time.perf_counter() - t
    rng = random.Random(1)
    for k in [*range(1, 14, 3), None, None, None]:
        status = run(lambda: main(argv(out)), k=k, delay=None if k else rng.uniform(0.3 * took, 1.1 * took))
        assert status in ("killed", "finished")
        got = _logits_of(out)
        assert torch.equal(got, old) or (out / "model.safetensors").read_bytes() == ref
        assert main(argv(out)) == 0                                       # the rerun
        assert (out / "model.safetensors").read_bytes() == ref
        assert _leftovers(tmp_path, "out") == []
        a3mod.save(tiny_model("llama", kv_heads=2, seed=4), out, overwrite=True)


# --------------------------------------------------------------------------------------- streaming
def test_streaming_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", kv_heads=2, layers=3).save_pretrained(src)
    calib, passes = calib_ids(4, 16), a3mod.a3_passes(0.3)
    off = tmp_path / "off"

    def go(out):
        return a3mod.compress_streaming(src, out, passes, calib, offload_dir=off, progress=False)

    ref = go(tmp_path / "ref")
    ref_bytes = {n: (ref / n).read_bytes() for n in ("model.safetensors", "a3mod.json")}
    t = time.perf_counter()
    assert run(lambda: go(tmp_path / "timing")) == "finished"
    took = time.perf_counter() - t
    rng = random.Random(2)
    kills = 0
    for k in [*range(1, 40, 4), None, None, None, None]:
        out = tmp_path / f"out{kills}"
        status = run(lambda: go(out), k=k, delay=None if k else rng.uniform(0, took))
        kills += 1
        assert status in ("killed", "finished")
        if out.exists():                  # published: complete (verified), and nothing left to resume
            a3mod.load(out)
        else:
            go(out)                       # resume
        assert {n: (out / n).read_bytes() for n in ref_bytes} == ref_bytes
        assert not workdir.work_dir(out).exists() or status == "killed"


# --------------------------------------------------------------------------------------- corruption
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    m = a3mod.apply(tiny_model("llama", kv_heads=2), a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    return a3mod.save(m, tmp_path_factory.mktemp("ck") / "ck"), logits(m, input_ids())


def _corrupt(data: bytes, kind: str, pos: float, mask: int) -> bytes:
    i = min(len(data) - 1, int(pos * len(data)))
    if kind == "flip":
        return data[:i] + bytes([data[i] ^ mask]) + data[i + 1:]
    if kind == "truncate":
        return data[:i]
    return data[:i] + data[i + 1:]                      # delete one byte


@settings(max_examples=25)
@given(name=st.sampled_from(["a3mod.json", "config.json", "model.safetensors", "generation_config.json"]),
       kind=st.sampled_from(["flip", "truncate", "delete"]), pos=st.floats(0, 1), mask=st.integers(1, 255))
def test_corrupted_checkpoint_raises_or_loads_identically(checkpoint_dir, tmp_path_factory, name, kind, pos, mask):
    import shutil

    ck, ref = checkpoint_dir
    d = tmp_path_factory.mktemp("c") / "ck"
    shutil.copytree(ck, d)
    (d / name).write_bytes(_corrupt((ck / name).read_bytes(), kind, pos, mask))
    try:
        got = _logits_of(d)
    except a3mod.A3ModError:
        return
    assert torch.isfinite(got).all() and torch.equal(got, ref)


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    model = tiny_model("llama", kv_heads=2)
    stats = a3mod.collect(model, calib_ids(), progress=False)
    path = tmp_path_factory.mktemp("s") / "stats.safetensors"
    stats.save(path)
    return path, model, stats


@settings(max_examples=25)
@given(kind=st.sampled_from(["flip", "truncate", "delete"]), pos=st.floats(0, 1), mask=st.integers(1, 255))
def test_corrupted_statistics_raise_or_are_identical(stats_file, tmp_path_factory, kind, pos, mask):
    path, model, stats = stats_file
    bad = tmp_path_factory.mktemp("s") / "bad.safetensors"
    bad.write_bytes(_corrupt(path.read_bytes(), kind, pos, mask))
    try:
        got = a3mod.Stats.load(bad)
    except a3mod.A3ModError:
        return
    assert (got.n, got.model, got.calib) == (stats.n, stats.model, stats.calib)
    for a, b in zip(got.layers, stats.layers):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
