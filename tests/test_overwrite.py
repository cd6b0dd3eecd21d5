"""Overwrite replaces only what a3mod wrote: the files a checkpoint's a3mod.json lists (its own and the extra files
it wrote beside them); other files make it refuse, naming them, unless the caller says to keep them. Extra file names
are plain names that are not a3mod's own."""
from __future__ import annotations

import pytest

import a3mod
from a3mod import CheckpointError

from conftest import calib_ids, input_ids, tiny_model


@pytest.fixture
def model():
    return a3mod.apply(tiny_model("llama"), a3mod.a3_passes(0.3), calib=calib_ids(), progress=False)


def test_overwrite_refuses_files_a3mod_did_not_write(tmp_path, model):
    out = a3mod.save(model, tmp_path / "ck", extra_files={"README.md": "card"})
    (out / "notes.txt").write_text("mine")
    (out / "lm_eval_results.json").write_text("{}")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(CheckpointError, match=r"lm_eval_results.json', 'notes.txt'.*keep-others"):
        a3mod.save(model, out, overwrite=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before          # nothing touched
    a3mod.save(model, out, overwrite="keep-others", extra_files={"README.md": "new card"})
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == "new card"
    assert (out / "lm_eval_results.json").exists()
    torch_equal = a3mod.load(out)(input_ids()).logits.equal(model(input_ids()).logits)
    assert torch_equal


def test_a3mods_own_extra_files_are_replaced(tmp_path, model):
    out = a3mod.save(model, tmp_path / "ck", extra_files={"README.md": "a", "compress_result.json": "{}"})
    a3mod.save(model, out, overwrite=True, extra_files={"README.md": "b"})
    assert (out / "README.md").read_text() == "b" and not (out / "compress_result.json").exists()


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "sub/x", ".hidden", "a3mod.json", "model.safetensors",
                                  "config.json", "", "..", "a\\b", "A3MOD.JSON", "Model.safetensors", "x" * 300])
def test_extra_file_names_are_plain_and_not_a3mods(tmp_path, model, name):
    with pytest.raises(CheckpointError, match="extra file name"):
        a3mod.save(model, tmp_path / "ck", extra_files={name: "x"})
    assert list(tmp_path.iterdir()) == []                                      # nothing written anywhere


@pytest.mark.parametrize("data", [None, 5, ["a"], bytearray(b"x"), "\ud800"])
def test_extra_file_contents_are_text_or_bytes(tmp_path, model, data):
    """A value that is not text or bytes (or text that cannot be written as UTF-8): a typed error naming the file,
    before anything is written."""
    with pytest.raises(CheckpointError, match="extra file 'notes.md': its content must be text"):
        a3mod.save(model, tmp_path / "ck", extra_files={"notes.md": data})
    assert list(tmp_path.iterdir()) == []


def test_save_pretrained_of_a_quantized_model_never_replaces_a_folder(tmp_path):
    pytest.importorskip("hqq")
    base = tiny_model("llama", hidden=64, heads=4, inter=128)
    q = a3mod.apply(base, [*a3mod.a3_passes(0.25), a3mod.HQQ(nbits=4, group_size=32)], calib=calib_ids(),
                    progress=False)
    q.save_pretrained(tmp_path / "q")
    (tmp_path / "q" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists") as e:
        q.save_pretrained(tmp_path / "q")
    assert "overwrite=True)" in str(e.value) and "a3mod.save" in str(e.value)    # an option that exists
    assert (tmp_path / "q" / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="max_shard_size"):                # not silently dropped
        q.save_pretrained(tmp_path / "q2", max_shard_size="1MB")
    assert not (tmp_path / "q2").exists()


def test_cli_overwrite_keeps_other_files_only_when_asked(tmp_path, capsys):
    from a3mod.cli import main

    text = tmp_path / "t.txt"
    text.write_text("calibration text for a tiny model. " * 100)
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src)
    from conftest import make_tokenizer
    make_tokenizer().save_pretrained(src)
    common = ["compress", "--model", str(src), "--calib", str(text), "--n-samples", "2", "--calib-seq-len", "16",
              "--ratio", "0.3", "--no-eval", "--out", str(tmp_path / "out")]
    assert main(common) == 0
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(common + ["--keep-other-files"]) == 2 and "give both" in capsys.readouterr().err
    assert main(common + ["--overwrite"]) == 2 and "notes.txt" in capsys.readouterr().err
    assert main(common + ["--overwrite"]) == 2                      # still refused: nothing was removed
    assert main(common + ["--overwrite", "--keep-other-files"]) == 0
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert main(common + ["--overwrite", "--keep-other-files"]) == 0    # the card and result are a3mod's own
