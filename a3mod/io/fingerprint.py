"""Fingerprints that tie statistics and resumable work to the model and calibration data they came from.

- `model_fingerprint(model)`: sha256 of the model's structural config and a sampled weight digest (every
  state-dict tensor's name, shape and up to 4096 evenly strided values as float32). Two models of the same shapes
  but other weights differ; the same weights in another float dtype they can represent exactly agree.
- `tokens_fingerprint(ids)`: sha256 and shape of the calibration token ids (so another seed, source or sample
  count is a different set).
- `file_digest(path)`: size plus sha256 of the safetensors header (a GGUF's first MiB) and of 64 evenly spaced
  64 KiB blocks of the data (a sampled digest: cheap on 100 GB checkpoints; it catches a replaced or re-saved
  file, not one flipped byte between samples; use `a3mod.io.files.sha256_file` for that).
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import Tensor, nn

_VOLATILE = {"transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions",
             "output_hidden_states", "return_dict", "architectures"}
SAMPLES = 4096


def config_digest(config) -> str:
    """sha256 of the config's structural fields (not the volatile ones, not a GGUF loader's quantization_config,
    which names the file the weights were dequantized from: transformers' loader sets it, a3mod's does not)."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config)) if config is not None else {}
    d = {k: v for k, v in raw.items() if not k.startswith("_") and k not in _VOLATILE and not _gguf_provenance(k, v)}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _gguf_provenance(key: str, value) -> bool:
    method = value.get("quant_method") if isinstance(value, dict) else getattr(value, "quant_method", None)
    return key == "quantization_config" and str(getattr(method, "value", method)).lower() == "gguf"


def _sample(t: Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // SAMPLES)
    return flat[::step][:SAMPLES].to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex of the config digest and the sampled weights (see the module docstring)."""
    h = hashlib.sha256(config_digest(getattr(model, "config", None)).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
        if t.is_meta:
            raise ValueError(f"model_fingerprint: {name} is on the meta device")
        if t.numel():
            h.update(_sample(t))
    return h.hexdigest()


def tokens_fingerprint(ids: Tensor) -> dict:
    """{"sha256", "shape"} of (n, T) token ids (as int64, so int32 and int64 copies agree)."""
    c = ids.detach().to("cpu", torch.int64).contiguous()
    return {"sha256": hashlib.sha256(c.numpy().tobytes()).hexdigest(), "shape": list(c.shape)}


def file_digest(path: str | os.PathLike, blocks: int = 64, block: int = 1 << 16) -> dict:
    """{"bytes", "sampled_sha256"} of a safetensors file (see the module docstring)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if head[:4] == b"GGUF":                    # no safetensors header length: its first MiB stands for it
            n = 1 << 20
        h.update(head + f.read(min(n, size)))
        start = f.tell()
        span = max(0, size - start - block)
        for j in range(blocks):
            f.seek(start + (span * j) // max(1, blocks - 1))
            h.update(f.read(block))
    return {"bytes": size, "sampled_sha256": h.hexdigest()}
