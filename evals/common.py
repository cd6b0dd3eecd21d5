"""Shared by the benchmark scripts: the asset models, the run description, result files, README tables."""
from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

import torch

from a3mod.paths import assets_dir

ROOT = Path(__file__).resolve().parents[1]


def asset_models() -> list[Path]:
    root = assets_dir()
    if root is None or not (root / "models").is_dir():
        sys.exit("no assets dir with models/ (set A3MOD_ASSETS)")
    return sorted(p for p in (root / "models").iterdir() if p.is_dir())


def machine() -> str:
    return f"{platform.machine()} CPU x{os.cpu_count()}, torch {torch.__version__}"


def eval_desc(args) -> str:
    return (f"first {args.eval_windows} x {args.eval_seq_len}-token windows of the test split"
            if args.eval_windows else f"full test split in {args.eval_seq_len}-token windows")


def write_results(out: str | Path, name: str, meta: dict, rows: list[dict], md: str) -> Path:
    """<out>/<name>.json (meta + rows) and <out>/<name>.md; prints the markdown. Returns the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(md)
    print(md)
    return out


def update_readme(md: str, marker: str) -> None:
    """Replace the README text between `<!-- marker -->` and `<!-- /marker -->` with `md`."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    if f"<!-- {marker} -->" not in text:
        sys.exit(f"README has no <!-- {marker} --> markers")
    readme.write_text(re.sub(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)",
                             lambda m: m.group(1) + md + m.group(2), text, flags=re.S))
