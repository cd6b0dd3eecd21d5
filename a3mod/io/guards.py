"""Guards every read of a model folder passes: no code from a checkpoint ever runs.

Every transformers loader call passes `NO_CODE` (trust_remote_code=False), and `check_folder` refuses a local folder
whose config.json (or tokenizer_config.json) has an `auto_map`, or a `model_type` this transformers does not know,
before transformers sees it. `as_dtype` reads a dtype or its name.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..errors import A3ModError, CheckpointError

NO_CODE = {"trust_remote_code": False}


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable JSON file: {str(e)[:200]}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(d).__name__}")
    return d


def check_files(folder: str | os.PathLike) -> None:
    """Every entry of a local model folder is a regular file or a folder (a FIFO, socket or device would hang or
    feed a reader: refused); in an a3mod checkpoint (it holds a3mod.json) no symlink leads out of the folder or
    nowhere. CheckpointError naming the entry."""
    p = Path(folder)
    if not p.is_dir():
        return
    root, ours = p.resolve(), os.path.lexists(p / "a3mod.json")
    for e in os.scandir(p):
        if e.is_symlink() and ours:
            target = Path(e.path).resolve()
            if not (target == root or root in target.parents) or not target.exists():
                raise CheckpointError(f"{e.path!r} is a symbolic link to {str(target)!r}, outside the checkpoint "
                                      f"folder (or to nothing); a3mod reads a checkpoint's own files only")
        try:
            mode = os.stat(e.path).st_mode
        except OSError:
            continue                       # a dangling link of another tool's folder: not read
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise CheckpointError(f"{e.path!r} is not a regular file (a FIFO, socket or device); a3mod reads only "
                                  f"regular files from a model folder")


def check_folder(folder: str | os.PathLike) -> None:
    """Refuse (CheckpointError) a local model folder that would make transformers run code: an `auto_map` in
    config.json or tokenizer_config.json, or a `model_type` this transformers has no built-in class for; and one
    holding special files (`check_files`)."""
    p = Path(folder)
    check_files(p)
    cfg = p / "config.json"
    if cfg.is_file():
        c = _read_json(cfg)
        if "auto_map" in c:
            raise CheckpointError(f"{str(cfg)!r} has an auto_map (custom modeling code: {sorted(c['auto_map'])}); "
                                  f"a3mod never runs code from a checkpoint. If its model_type "
                                  f"{c.get('model_type')!r} is built into transformers, remove auto_map")
        mtype = c.get("model_type")
        if mtype == "a3mod":          # a3mod's native type (a3mod.io.native): the original type must be built in
            mtype = c.get("a3mod_base_model_type")
        if not isinstance(mtype, str) or mtype not in CONFIG_MAPPING or mtype == "a3mod":
            raise CheckpointError(f"{str(cfg)!r} has model_type {mtype!r}, which transformers "
                                  f"{_tf_version()} has no built-in class for; a3mod does not run custom code")
    tcfg = p / "tokenizer_config.json"
    if tcfg.is_file() and "auto_map" in _read_json(tcfg):
        raise CheckpointError(f"{str(tcfg)!r} has an auto_map (custom tokenizer code); a3mod never runs code from a "
                              f"checkpoint")


def _tf_version() -> str:
    return transformers.__version__


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "float64": torch.float64}


def as_dtype(dtype) -> torch.dtype | None:
    """A torch dtype from a dtype or its name ("bfloat16", "bf16", "torch.float16", ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise A3ModError(f"dtype {dtype!r}; allowed: {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[name]


def recorded_dtype(folder: str | os.PathLike) -> torch.dtype | None:
    """The floating-point dtype a model folder's config.json records for its weights ("dtype", or the older
    "torch_dtype"), None when it records none (GGUF, hub ids, older configs) or something else."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return None
    c = _read_json(cfg)
    name = c.get("dtype") or c.get("torch_dtype")
    dtype = DTYPES.get(str(name).removeprefix("torch.")) if isinstance(name, str) else None
    return dtype if dtype is not None and dtype.is_floating_point else None
