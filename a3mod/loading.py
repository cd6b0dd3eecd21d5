"""Load any supported checkpoint: an a3mod output dir, an HF folder or hub id, a GGUF file or a folder with one."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import A3ModError


def _gguf(path: Path) -> tuple[str, dict]:
    """(dir or id to load from, extra kwargs) for GGUF inputs."""
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return str(path), {"gguf_file": ggufs[0].name}
    return str(path), {}


def load_pretrained(path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from `path`. a3mod checkpoints reload their reduced modules without calibration."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import is_a3mod_checkpoint, load

    p = Path(path)
    if is_a3mod_checkpoint(p):
        model = load(p, device=device, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(p))
        return model, tok
    src, kw = _gguf(p)
    local = p.exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    if not p.exists() and (local or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise A3ModError(f"model path {path!r} does not exist (and hub ids are off: HF_HUB_OFFLINE=1; "
                         f"set A3MOD_ONLINE=1 for the `a3mod` CLI to reach a hub)")
    # a tokenizer.json beside a GGUF is used as is; otherwise the tokenizer comes from the checkpoint itself
    tok_kw = {} if kw and (Path(src) / "tokenizer.json").exists() else kw
    tok = AutoTokenizer.from_pretrained(src, local_files_only=local, **tok_kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=local, **kw).to(device)
    model.eval()
    return model, tok
