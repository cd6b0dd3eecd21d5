"""Load any supported checkpoint: an a3mod output dir, an HF folder or hub id, a GGUF file or a folder with one.

No code from a checkpoint ever runs: every transformers loader call passes `trust_remote_code=False`, and a local
folder whose config.json (or tokenizer_config.json) has an `auto_map`, or a `model_type` this transformers does
not know, is refused with a CheckpointError before transformers sees it. Weights are read only from safetensors
(or GGUF, dequantized tensor by tensor as transformers does: a3mod.io.gguf_source); pickle files (`*.bin`,
`*.pt`) are never opened.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import A3ModError, CheckpointError
from .checkpoint import is_a3mod_checkpoint, load
from .gguf_source import load_gguf_model
from .guards import NO_CODE, as_dtype, check_folder, recorded_dtype

_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")



def _gguf(path: Path) -> tuple[str, dict]:
    """(dir or id to load from, extra kwargs) for GGUF inputs."""
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return str(path), {"gguf_file": ggufs[0].name}
    return str(path), {}


def _weights_kwargs(path: Path, kw: dict) -> dict:
    """safetensors only for local folders (GGUF aside): a folder holding only pickle weights is refused."""
    if kw or not path.is_dir():
        return kw
    if any(path.glob("*.safetensors")):
        return {"use_safetensors": True}
    pickles = [f.name for pat in _PICKLES for f in path.glob(pat)]
    if pickles:
        raise CheckpointError(f"{str(path)!r} holds weights only as pickle files ({sorted(pickles)[:3]}); a3mod reads "
                              f"safetensors or GGUF only (pickle can run code). Convert once where you trust the file")
    return kw


def load_pretrained(path: str, dtype: torch.dtype | str = torch.float32, device: str = "cpu", verify: bool = True):
    """(model, tokenizer) from `path`. a3mod checkpoints reload their reduced modules without calibration
    (`verify`: check the checksums their sidecar records)."""

    dtype = as_dtype(dtype)
    p = Path(path)
    if is_a3mod_checkpoint(p):
        model = load(p, device=device, dtype=dtype, verify=verify)
        return model, _hf_call(AutoTokenizer.from_pretrained, str(p), **NO_CODE)
    src, kw = _gguf(p)
    local = p.exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not p.exists() and (local or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise A3ModError(f"model path {path!r} does not exist (and hub ids are off: HF_HUB_OFFLINE=1; "
                         f"set A3MOD_ONLINE=1 for the `a3mod` CLI to reach a hub)")
    if p.exists():
        if p.is_dir() and not kw and not (p / "config.json").is_file():
            raise CheckpointError(f"{str(p)!r} holds no config.json (nor a .gguf file): not a model folder")
        check_folder(src)
    tok = _tokenizer(src, kw, local)
    if kw:              # GGUF: filled block by block (transformers' loader holds every dequantized tensor beside it)
        model = load_gguf_model(Path(src) / kw["gguf_file"], dtype).to(device)
    else:
        model = _hf_call(AutoModelForCausalLM.from_pretrained, src, dtype=dtype, local_files_only=local,
                         **_weights_kwargs(Path(src), kw), **NO_CODE).to(device)
    model.eval()
    model.a3mod_source_dtype = None if kw else recorded_dtype(src)    # what `save` stores by default (not a GGUF's)
    return model, tok


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a local model folder or GGUF file (as `load_pretrained` gives it, without the weights)."""
    p = Path(path)
    if p.exists() and not is_a3mod_checkpoint(p):
        src, kw = _gguf(p)
        check_folder(src)
        return _tokenizer(src, kw, True)
    return _hf_call(AutoTokenizer.from_pretrained, str(p), **NO_CODE)


def _tokenizer(src: str, kw: dict, local: bool):
    # a tokenizer.json beside a GGUF is used as is; otherwise the tokenizer comes from the checkpoint itself
    tok_kw = {} if kw and (Path(src) / "tokenizer.json").exists() else kw
    return _hf_call(AutoTokenizer.from_pretrained, src, local_files_only=local, **tok_kw, **NO_CODE)


def _hf_call(fn, *args, **kwargs):
    """A transformers loader call; its refusal to run custom code becomes a CheckpointError."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise CheckpointError(f"{args[0]!r} needs custom code to load; a3mod never runs code from a checkpoint "
                                  f"({first})") from None
        raise CheckpointError(f"{args[0]!r} cannot be loaded by transformers: {first}") from e
