"""What a3mod promises about a user's files, attacked: refused overwrites, planted code, foreign or stale inputs,
corrupted checkpoints, typed errors before any work. (Kills and random corruptions: test_faults.py.)"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import a3mod
from a3mod import CalibrationError, CheckpointError, RatioError
from a3mod.io import files
from a3mod.pipeline import workdir
from a3mod.cli.commands import main

from conftest import calib_ids, input_ids, logits, make_tokenizer, rerecord_files, tiny_model, write_text


def snapshot(path) -> dict:
    out = {}
    for root, _, names in os.walk(path):
        for f in names:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


@pytest.fixture
def model():
    return tiny_model("llama", kv_heads=2)


@pytest.fixture
def user_dir(tmp_path):
    """A folder of the user's own files (not a checkpoint)."""
    d = tmp_path / "project"
    (d / "src").mkdir(parents=True)
    (d / "notes.txt").write_text("precious")
    (d / "src" / "main.py").write_text("print('hi')")
    return d


# ------------------------------------------------------------------------------------ refused overwrites
def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(model, user_dir):
    before = snapshot(user_dir)
    with pytest.raises(CheckpointError, match=r"not an a3mod checkpoint.*notes\.txt") as e:
        a3mod.save(model, user_dir, overwrite=True)
    assert str(user_dir) in str(e.value)
    assert snapshot(user_dir) == before
    assert sorted(os.listdir(user_dir.parent)) == ["project"]          # no staging folder or lock left


def test_overwrite_refuses_cwd_its_ancestors_home_and_empty_paths(model, tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    before = snapshot(tmp_path)
    for target, needle in ((".", "current directory"), (str(work.parent), "current directory"),
                           ("~", "current directory"), ("/", "current directory")):
        with pytest.raises(CheckpointError, match=needle):
            a3mod.save(model, target, overwrite=True)
    for target in ("", "   "):
        with pytest.raises(CheckpointError, match="empty"):
            a3mod.save(model, target, overwrite=True)
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "a"
    with pytest.raises(CheckpointError, match="home directory"):
        a3mod.save(model, "~", overwrite=True)
    assert snapshot(tmp_path) == before
    assert home.is_dir()


def test_overwrite_refuses_the_source_model(tmp_path, model):
    src = a3mod.save(model, tmp_path / "ckpt")
    before = snapshot(src)
    loaded = a3mod.load(src)
    with pytest.raises(CheckpointError, match="source model"):
        a3mod.save(loaded, src, overwrite=True)
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    make_tokenizer().save_pretrained(hf)
    text = write_text(tmp_path / "t.txt")
    rc = main(["compress", "--model", str(hf), "--out", str(hf), "--overwrite", "--ratio", "0.2", "--calib", text,
               "--n-samples", "2", "--calib-seq-len", "16", "--no-eval"])
    assert rc == 2
    rc = main(["compress", "--model", str(hf / ".."), "--out", str(tmp_path), "--overwrite", "--ratio", "0.2",
               "--calib", text, "--n-samples", "2", "--calib-seq-len", "16", "--no-eval"])
    assert rc == 2
    with pytest.raises(CheckpointError, match="source model"):
        a3mod.compress_streaming(hf, hf, a3mod.a3_passes(0.2), calib_ids(), overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match="source model"):
        a3mod.compress_streaming(hf, tmp_path, a3mod.a3_passes(0.2), calib_ids(), overwrite=True, progress=False)
    assert snapshot(src) == before
    assert (hf / "model.safetensors").exists() and (hf / "config.json").exists()


def test_overwrite_refuses_links_subfolders_and_paths_under_a_file(tmp_path, model):
    ck = a3mod.save(model, tmp_path / "ckpt")
    (ck / "extra").mkdir()
    with pytest.raises(CheckpointError, match="folders a3mod never writes"):
        a3mod.save(model, ck, overwrite=True)
    (ck / "extra").rmdir()
    link = tmp_path / "link"
    link.symlink_to(ck)
    with pytest.raises(CheckpointError, match="symbolic link"):
        a3mod.save(model, link, overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="which is a file"):
        a3mod.save(model, tmp_path / "f" / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    a3mod.save(model, empty, overwrite=True)                # an empty folder may be replaced
    assert (empty / "a3mod.json").is_file()


def test_cli_refuses_a_bad_out_before_loading_anything(tmp_path, monkeypatch, capsys):
    import a3mod.io.loading

    monkeypatch.setattr(a3mod.io.loading, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    text = write_text(tmp_path / "t.txt")
    base = ["compress", "--model", str(tmp_path), "--ratio", "0.2", "--calib", text, "--no-eval"]
    assert main([*base, "--out", str(tmp_path / "file" / "out")]) == 2
    assert "which is a file" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path), "--overwrite"]) == 2
    assert main([*base, "--out", str(tmp_path / "new"), "--calib", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_leftovers_of_a_killed_replace_are_repaired(tmp_path, model):
    out = a3mod.save(model, tmp_path / "ckpt")
    old = snapshot(out)
    aside = tmp_path / ".ckpt.a3mod-old-dead"        # a writer killed between rename-aside and rename-in
    out.rename(aside)
    stage = tmp_path / ".ckpt.a3mod-tmp-dead"
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"half")
    with pytest.warns(UserWarning, match="restored"):
        with pytest.raises(CheckpointError, match="exists"):     # recovery first, then the usual refusal
            a3mod.save(model, tmp_path / "ckpt")
    assert snapshot(out) == old
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_replace_by_exchange_and_by_rename_aside(tmp_path, model, monkeypatch, atomic_exchange):
    if not atomic_exchange:
        monkeypatch.setattr(files, "exchange", lambda a, b: False)
    out = a3mod.save(tiny_model("llama", kv_heads=2, seed=3), tmp_path / "ckpt")
    a3mod.save(model, out, overwrite=True)
    assert torch.equal(logits(a3mod.load(out), input_ids()), logits(model, input_ids()))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_second_writer_is_locked_out(tmp_path, model):
    out = tmp_path / "ckpt"
    with files.output_lock(out):
        pid = os.fork()
        if pid == 0:                                      # another process tries the same output
            try:
                a3mod.save(model, out)
                os._exit(3)
            except CheckpointError as e:
                os._exit(0 if "another process is writing" in str(e) else 4)
            except BaseException:
                os._exit(5)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        a3mod.save(model, out)                            # the holder itself may write (reentrant)
    assert not (tmp_path / ".ckpt.a3mod-lock").exists()
    a3mod.save(model, out, overwrite=True)


# ------------------------------------------------------------------------------------- no code runs
def _plant(folder, tmp_path) -> str:
    """An auto_map with a payload that would create `marker` if any of it ran."""
    marker = tmp_path / "PWNED"
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evilnet", auto_map={"AutoConfig": "evil.EvilConfig",
                                               "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n")
    return marker


def test_planted_auto_map_never_runs(tmp_path, model, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("a prompt asked to run code"))
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    make_tokenizer().save_pretrained(hf)
    marker = _plant(hf, tmp_path)
    ck = a3mod.save(model, tmp_path / "ck", tokenizer=make_tokenizer())
    _plant(ck, tmp_path)
    side = rerecord_files(json.loads((ck / "a3mod.json").read_text()), ck)   # past the checksums: the loader's own
    (ck / "a3mod.json").write_text(json.dumps(a3mod.io.sidecar.seal(side)))  # refusal
    for call in (lambda: a3mod.load_pretrained(str(hf)), lambda: a3mod.load(ck), lambda: a3mod.load_pretrained(str(ck)),
                 lambda: a3mod.compress_streaming(hf, tmp_path / "o", a3mod.a3_passes(0.2), calib_ids(),
                                                  progress=False)):
        with pytest.raises(CheckpointError, match="auto_map"):
            call()
    assert main(["report", "--model", str(hf)]) == 2
    assert "a3mod: error:" in capsys.readouterr().err
    from a3mod.evaluation.harness import A3ModLM
    with pytest.raises(CheckpointError, match="auto_map"):
        A3ModLM(str(hf), device="cpu")
    from transformers import AutoModelForCausalLM                   # transformers itself refuses, no prompt
    with pytest.raises(CheckpointError, match="custom code"):
        a3mod.io.loading._hf_call(AutoModelForCausalLM.from_pretrained, str(hf), **a3mod.io.guards.NO_CODE)
    assert not marker.exists()


def test_unknown_model_type_tokenizer_code_and_pickles_are_refused(tmp_path, model):
    hf = tmp_path / "hf"
    model.save_pretrained(hf)
    make_tokenizer().save_pretrained(hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "model_type": "nosuchtype"}))
    with pytest.raises(CheckpointError, match="nosuchtype"):
        a3mod.load_pretrained(str(hf))
    (hf / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "tokenizer_config.json").write_text(json.dumps({**tc, "auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    with pytest.raises(CheckpointError, match="custom tokenizer code"):
        a3mod.load_pretrained(str(hf))
    (hf / "tokenizer_config.json").write_text(json.dumps(tc))
    torch.save(model.state_dict(), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        a3mod.load_pretrained(str(hf))


# --------------------------------------------------------------------------------- foreign / stale inputs
def test_statistics_of_another_model_or_other_tokens_are_refused(model):
    calib = calib_ids()
    other = tiny_model("llama", kv_heads=2, seed=7)           # same shapes, other weights
    stats = a3mod.collect(other, calib, progress=False)
    with pytest.raises(CalibrationError, match="another model"):
        a3mod.apply(model, a3mod.a3_passes(0.2), stats=stats, progress=False)
    mine = a3mod.collect(model, calib, progress=False)
    with pytest.raises(CalibrationError, match="other calibration tokens"):
        a3mod.apply(model, a3mod.a3_passes(0.2), stats=mine, calib=calib_ids(seed=9), progress=False)
    import copy
    a3mod.apply(copy.deepcopy(model), a3mod.a3_passes(0.2), stats=mine, calib=calib, progress=False)   # fine


def test_stats_file_round_trip_keeps_fingerprints_and_refuses_other_files(tmp_path, model):
    stats = a3mod.collect(model, calib_ids(), progress=False)
    stats.save(tmp_path / "s.safetensors")
    back = a3mod.Stats.load(tmp_path / "s.safetensors")
    assert (back.model, back.calib, back.n) == (stats.model, stats.calib, stats.n)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(CalibrationError, match="not an a3mod statistics file"):
        a3mod.Stats.load(tmp_path / "w.safetensors")
    with pytest.raises(CalibrationError, match="not an a3mod statistics file"):
        stats.save(tmp_path / "w.safetensors")              # never replaces a file that is not statistics
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match="not a readable"):
        a3mod.Stats.load(tmp_path / "t.safetensors")


def test_cli_stats_of_another_seed_is_refused_unless_recompute(tmp_path, capsys):
    hf = tmp_path / "hf"
    tiny_model("llama", kv_heads=2).save_pretrained(hf)
    make_tokenizer().save_pretrained(hf)
    text = write_text(tmp_path / "t.txt")
    base = ["compress", "--model", str(hf), "--ratio", "0.2", "--calib", text, "--n-samples", "3", "--calib-seq-len",
            "16", "--no-eval", "--stats", str(tmp_path / "s.safetensors")]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    first = (tmp_path / "s.safetensors").read_bytes()
    assert main([*base, "--out", str(tmp_path / "b"), "--seed", "1"]) == 2
    assert "other calibration tokens" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "b"), "--n-samples", "2"]) == 2
    assert (tmp_path / "s.safetensors").read_bytes() == first
    assert main([*base, "--out", str(tmp_path / "b"), "--seed", "1", "--recompute-stats"]) == 0
    assert (tmp_path / "s.safetensors").read_bytes() != first
    assert main([*base, "--out", str(tmp_path / "c"), "--seed", "1"]) == 0       # now it matches
    result = json.loads((tmp_path / "c" / "compress_result.json").read_text())
    assert result["calibration"]["seed"] == 1 and result["versions"]["a3mod"] == a3mod.__version__


class Interrupt(Exception):
    pass


def _interrupt_at_layer(monkeypatch, i):
    write = workdir.write_layer

    def write_then_stop(work, j, *a):
        if j == i:
            raise Interrupt()
        write(work, j, *a)
    monkeypatch.setattr(workdir, "write_layer", write_then_stop)


def test_streaming_resume_refuses_changed_source_weights(tmp_path, monkeypatch):
    src = tmp_path / "src"
    tiny_model("llama", kv_heads=2, layers=3).save_pretrained(src)
    calib, passes = calib_ids(4, 16), a3mod.a3_passes(0.3)
    _interrupt_at_layer(monkeypatch, 1)
    with pytest.raises(Interrupt):
        a3mod.compress_streaming(src, tmp_path / "out", passes, calib, progress=False)
    monkeypatch.undo()
    tiny_model("llama", kv_heads=2, layers=3, seed=5).save_pretrained(src)       # same sizes and config
    with pytest.raises(CheckpointError, match="different source"):
        a3mod.compress_streaming(src, tmp_path / "out", passes, calib, progress=False)


def test_two_streaming_runs_sharing_an_offload_dir_stay_apart(tmp_path, monkeypatch):
    off = tmp_path / "off"
    srcs = []
    for seed in (0, 1):
        srcs.append(tmp_path / f"src{seed}")
        tiny_model("llama", kv_heads=2, layers=3, seed=seed).save_pretrained(srcs[-1])
    calib, passes = calib_ids(4, 16), a3mod.a3_passes(0.3)
    refs = [a3mod.compress_streaming(s, tmp_path / f"ref{j}", passes, calib, progress=False)
            for j, s in enumerate(srcs)]
    _interrupt_at_layer(monkeypatch, 2)
    with pytest.raises(Interrupt):
        a3mod.compress_streaming(srcs[0], tmp_path / "a", passes, calib, offload_dir=off, progress=False)
    monkeypatch.undo()
    b = a3mod.compress_streaming(srcs[1], tmp_path / "b", passes, calib, offload_dir=off, progress=False)
    a = a3mod.compress_streaming(srcs[0], tmp_path / "a", passes, calib, offload_dir=off, progress=False)
    for got, ref in ((a, refs[0]), (b, refs[1])):
        assert load_file(str(got / "model.safetensors")).keys() == load_file(str(ref / "model.safetensors")).keys()
        assert (got / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert list(off.iterdir()) == []


# ------------------------------------------------------------------------------ corrupted checkpoints
@pytest.fixture
def ckpt(tmp_path):
    m = a3mod.apply(tiny_model("llama", kv_heads=2), a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    return a3mod.save(m, tmp_path / "ck")


def _resealed(ck, fn):
    side = json.loads((ck / "a3mod.json").read_text())
    fn(side)
    (ck / "a3mod.json").write_text(json.dumps(a3mod.io.sidecar.seal(side)))


@pytest.mark.parametrize("edit,field", [
    (lambda a: a.update(rope_index=[999] * len(a["rope_index"]) if not isinstance(a["rope_index"][0], list)
                        else [[999] * len(r) for r in a["rope_index"]]), r"rope_index\[0\] = 999 is outside"),
    (lambda a: a["rope_index"][0].__setitem__(0, -1), r"rope_index\[0\] = -1 is outside"),
    (lambda a: a.update(scaling=1e300), r"scaling = 1e\+300 is outside"),
    (lambda a: a.update(scaling="0.1"), r"scaling = '0.1' must be a finite number"),
    (lambda a: a.update(scaling=float("nan")), r"scaling = nan must be a finite number"),
    (lambda a: a.update(dropout=5.0), r"dropout = 5.0 is outside"),
    (lambda a: a.update(sliding_window=-4), r"sliding_window = -4 is outside"),
    (lambda a: a.update(heads=3), r"heads = 3 is not a multiple of kv_heads"),
    (lambda a: a.update(qk_dim=True), r"qk_dim = True must be an integer"),
    (lambda a: a.update(surprise=1), r"unknown keys \['surprise'\]"),
    (lambda a: a.pop("vo_dim"), r"lacks \['vo_dim'\]"),
    (lambda a: a.update(rope_table="bogus"), r"rope_table = 'bogus'"),
    (lambda a: a.update(alibi="os.system"), r"alibi = 'os.system'"),
    (lambda a: a.update(bool_mask="keep"), r"bool_mask = 'keep'"),
    (lambda a: a.update(residual=1), r"residual = 1; only true is written"),
])
def test_sidecar_values_out_of_range_are_named(ckpt, edit, field):
    _resealed(ckpt, lambda s: edit(s["layers"]["0"]["attn"]))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\." + field if "unknown" not in field
                       and "lacks" not in field else field):
        a3mod.load(ckpt)


def test_malformed_sidecars_are_checkpoint_errors(ckpt):
    for text in ("{", "[1, 2]", "[" * 100000 + "]" * 100000, '{"format": 1}', "\xff\xfe"):
        (ckpt / "a3mod.json").write_text(text, encoding="latin-1")
        with pytest.raises(CheckpointError):
            a3mod.load(ckpt)


def test_unsealed_edit_and_flipped_weight_byte_are_found(ckpt):
    ref = logits(a3mod.load(ckpt), input_ids())
    side = (ckpt / "a3mod.json").read_text()
    (ckpt / "a3mod.json").write_text(side.replace('"is_causal": true', '"is_causal": false', 1))
    with pytest.raises(CheckpointError, match="checksum"):
        a3mod.load(ckpt)
    (ckpt / "a3mod.json").write_text(side)
    w = bytearray((ckpt / "model.safetensors").read_bytes())
    w[-5] ^= 0x10
    (ckpt / "model.safetensors").write_bytes(bytes(w))
    with pytest.raises(CheckpointError, match="corrupted or was modified"):
        a3mod.load(ckpt)
    assert not torch.equal(logits(a3mod.load(ckpt, verify=False), input_ids()), ref)   # the opt-out loads it


def test_a_float_tensor_where_indices_belong(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    key = next(k for k in sd if k.endswith("rope_index"))
    sd[key] = sd[key].float()
    save_file(sd, str(ckpt / "model.safetensors"))
    _resealed(ckpt, lambda s: rerecord_files(s, ckpt))
    with pytest.raises(CheckpointError, match="rope_index.*float32"):
        a3mod.load(ckpt)


def test_truncated_weights_are_a_checkpoint_error(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:1000])
    _resealed(ckpt, lambda s: rerecord_files(s, ckpt))
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        a3mod.load(ckpt)


def test_checkpoint_bytes_are_deterministic(tmp_path, model):
    m = a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)
    a = snapshot(a3mod.save(m, tmp_path / "a", tokenizer=make_tokenizer()))
    b = snapshot(a3mod.save(m, tmp_path / "b", tokenizer=make_tokenizer()))
    assert a == b


# ------------------------------------------------------------------------- typed errors before work
def test_bad_values_are_typed_errors_before_any_work(model, monkeypatch):
    import a3mod.calib.stats

    monkeypatch.setattr(a3mod.calib.stats, "collect", lambda *a, **k: pytest.fail("calibration started"))
    with pytest.raises(a3mod.A3ModError, match="passes=None"):
        a3mod.apply(model, None)
    with pytest.raises(RatioError, match="multiple_of=64.*full dimension 8"):
        a3mod.apply(model, a3mod.a3_passes(0.2, multiple_of=64), calib=calib_ids())
    monkeypatch.undo()
    with pytest.raises(CalibrationError, match=r"span \[0, 150\].*vocabulary \[0, 100\)"):
        a3mod.collect(model, torch.arange(151).view(1, -1), progress=False)
    with pytest.raises(CalibrationError, match="batch_size=0"):
        a3mod.collect(model, calib_ids(), batch_size=0, progress=False)
    with pytest.raises(a3mod.A3ModError, match="outside the model's vocabulary"):
        a3mod.perplexity(model, torch.full((64,), 100), seq_len=16, progress=False)


@pytest.mark.parametrize("argv", [["--batch-size", "0"], ["--eval-seq-len", "0"], ["--n-samples", "-1"],
                                  ["--multiple-of", "0"], ["--eval-windows", "x"]])
def test_cli_bad_numbers_exit_2_without_traceback(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--ratio", "0.2", "--out", str(tmp_path / "o"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "a3mod: error:" in err and argv[0] in err and "Traceback" not in err


def test_cli_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["report", "--model", str(tmp_path)]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="holds no config.json"):
        main(["--debug", "report", "--model", str(tmp_path)])
