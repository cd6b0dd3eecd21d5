"""`a3mod.save(model, out, format=...)`: one verb for every format a compressed model is written in.

    "a3mod"  a3mod's sealed checkpoint (a3mod.io.checkpoint.save): every compact module, exact reload, checksums;
             loads where a3mod is installed (a3mod.load, or transformers' from_pretrained after `import a3mod`).
    "hf"     a stock checkpoint of the base family's own model type (a3mod.export.stock): transformers and the
             engines reading its config load it with no a3mod code; zero padding where the family has one head
             dim / MLP width per model (the cost is printed and written to a3mod_export.json).
    "gguf"   one llama.cpp GGUF file (a3mod.export.llamacpp): the stock export as llama.cpp's `llama`
             architecture (llama, mistral, qwen2), q/k permuted to llama.cpp's pairs, kept RoPE frequencies in
             `rope_freqs`; the vocabulary is copied from `vocab_from` (a GGUF); `gguf_type` f32, f16 or q8_0.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import A3ModError
from ..io import checkpoint
from . import llamacpp, stock

FORMATS = ("a3mod", "hf", "gguf")


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         extra_files: dict[str, str | bytes] | None = None, dtype: torch.dtype | str | None = "auto",
         format: str = "a3mod", vocab_from: str | os.PathLike | None = None, gguf_type: str = "f32") -> Path:
    """Write `model` to `out_dir` in `format` (see the module docstring); returns the folder's absolute path.
    The other arguments are `a3mod.io.checkpoint.save`'s; the files are published atomically in every format."""
    if format not in FORMATS:
        raise A3ModError(f"save: format={format!r}; allowed: {', '.join(FORMATS)}")
    if format == "a3mod":
        return checkpoint.save(model, out_dir, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra_files,
                               dtype=dtype)
    if extra_files:
        raise A3ModError(f"save: extra_files are written beside a3mod checkpoints only (format={format!r})")
    if format == "gguf":
        return llamacpp.save_gguf(model, out_dir, vocab_from=vocab_from, overwrite=overwrite, ftype=gguf_type)
    return stock.save_hf(model, out_dir, tokenizer=tokenizer, overwrite=overwrite, dtype=dtype)
