"""Text sources for calibration and evaluation beyond local text files: Hugging Face `datasets`.

A source is any of
  'wikitext2' / 'wikitext2-test'   WikiText-2 in the assets dir (a3mod.paths.DATASETS)
  a text file path
  a folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: give `folder@split`)
  'hf:NAME[:CONFIG][@SPLIT][#COLUMN]'   `datasets.load_dataset(NAME, CONFIG, split=SPLIT)` (default split 'train';
                                   needs the hub or the datasets cache), e.g. 'hf:wikitext:wikitext-2-raw-v1@train'
  a `datasets.Dataset` object (Python API)
Rows of the text column ('text', else the only string column, else #COLUMN) are joined with blank lines, as
WikiText-2 is ("\\n\\n".join(rows)).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import CalibrationError

_HF = re.compile(r"^hf:(?P<name>[^:@#]+)(?::(?P<config>[^@#]+))?(?:@(?P<split>[^#]+))?(?:#(?P<column>.+))?$")


def is_dataset_source(source) -> bool:
    """A datasets object, an 'hf:...' spec, or a save_to_disk folder (optionally `folder@split`)."""
    if not isinstance(source, (str, Path)):
        return hasattr(source, "column_names") and hasattr(source, "features")
    s = str(source)
    return s.startswith("hf:") or _disk_folder(s) is not None


def _disk_folder(s: str) -> tuple[Path, str | None] | None:
    path, _, split = s.rpartition("@") if "@" in s and not Path(s).exists() else (s, "", "")
    p = Path(path)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
                       or (p / "state.json").is_file()):
        return p, split or None
    return None


def check_source(source) -> None:
    """Syntax and existence checks that need no download (before any model work); CalibrationError otherwise."""
    if isinstance(source, str) and source.startswith("hf:") and not _HF.match(source):
        raise CalibrationError(f"dataset source {source!r}: expected 'hf:NAME[:CONFIG][@SPLIT][#COLUMN]'")


def dataset_text(source) -> str:
    """The joined text of a dataset source (see the module docstring)."""
    try:
        import datasets
    except ImportError:
        raise CalibrationError(f"text source {source!r} is a dataset: `pip install datasets`") from None
    column = None
    try:
        if isinstance(source, (str, Path)) and str(source).startswith("hf:"):
            check_source(str(source))
            m = _HF.match(str(source))
            column = m["column"]
            ds = datasets.load_dataset(m["name"], m["config"], split=m["split"] or "train")
        elif isinstance(source, (str, Path)):
            path, split = _disk_folder(str(source))
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise CalibrationError(f"{str(source)!r} holds splits {sorted(ds)}; give one as "
                                           f"'{path}@SPLIT'")
                ds = ds[split]
        else:
            ds = source
    except CalibrationError:
        raise
    except Exception as e:      # datasets raises many kinds (no network, unknown name or config)
        raise CalibrationError(f"dataset source {str(source)[:200]!r} cannot be loaded: "
                               f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise CalibrationError(f"a DatasetDict with splits {sorted(ds)}: pass one split, e.g. ds['train']")
    col = column or _text_column(ds)
    if col not in ds.column_names:
        raise CalibrationError(f"dataset has no column {col!r}; its columns: {ds.column_names}")
    rows = [r if isinstance(r, str) and r.strip() else "" for r in ds[col]]
    return "\n\n".join(rows)


def _text_column(ds) -> str:
    if "text" in ds.column_names:
        return "text"
    strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    if len(strings) != 1:
        raise CalibrationError(f"dataset columns {ds.column_names}: which one is the text? give it as '#COLUMN' "
                               f"('hf:NAME@SPLIT#COLUMN') or keep one string column")
    return strings[0]
