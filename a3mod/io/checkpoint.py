"""`a3mod.save` / `a3mod.load`: a3mod's sealed folder (io/sealed.py) written with the native config, and every
folder a3mod writes read back as its native class (io/native.py).

    save: description -> native config.json (model_type "a3mod") -> sealed.write (atomic, checksummed)
    load: a3mod.json present -> sealed.read -> native.adopt; else a native folder (save_pretrained, push_to_hub)
          -> transformers' own from_pretrained of the native class
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from . import native, sealed
from .description import describe_model
from .guards import as_dtype, check_files
from .sealed import WEIGHTS, is_a3mod_checkpoint, model_sources, read_sidecar, save_dtype  # noqa: F401


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         extra_files: dict[str, str | bytes] | None = None, dtype: torch.dtype | str | None = "auto") -> Path:
    """Write `model` (compressed or not) to `out_dir`; returns its absolute path.

    The folder is assembled next to `out_dir` and published atomically (a3mod.io.files): `out_dir` holds the old
    checkpoint or the new one, never a mix. overwrite=True replaces only an a3mod checkpoint or an empty folder,
    never the folder the model was loaded from. extra_files: {name: text} added beside the checkpoint (e.g.
    compress_result.json, README.md): plain names, none a3mod writes itself; their names are recorded (so an
    overwrite knows them as a3mod's), not their checksums (edit a model card freely). overwrite: True replaces an
    a3mod checkpoint whose files are all a3mod's; "keep-others" also keeps the user's files in it (copied over).
    dtype: of the stored floating-point weights; "auto" (default) is the dtype of the checkpoint the model was
    loaded from (`load_pretrained` / `load` record it: a bf16 model compressed in float32 is saved in bf16), None
    keeps the weights' own."""
    config = native.config_for(model.config, describe_model(model))
    return sealed.write(model, out_dir, config, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra_files,
                        dtype=dtype)


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | str | None = None,
         verify: bool = True) -> nn.Module:
    """Rebuild a model saved by `a3mod.save` (meta skeleton, reduced modules from the sidecar, weights assigned)
    or by `save_pretrained` of a native model, as its native class.

    The sidecar is validated before any module is built; `verify` (default) also checks the sha256 of every file
    the sidecar records (it reads every byte once). No code from the folder runs (a3mod.io.guards.check_folder)."""
    dtype = as_dtype(dtype)
    p = Path(path)
    check_files(p)                                         # before any file of it is read
    if not is_a3mod_checkpoint(p) and native.is_native_folder(p):
        return native.load_folder(p, device, dtype)        # written by save_pretrained: transformers' own loading
    return native.adopt(sealed.read(p, device, dtype, verify))
