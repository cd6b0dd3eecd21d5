"""Read a GGUF checkpoint tensor by tensor, by the model's own keys, for streaming compression.

    src = GGUFSource(path, skeleton)            # skeleton: the model on the meta device (config from gguf_config)
    src.read(["model.layers.3.mlp.up_proj.weight"], torch.float32)   # -> {key: dequantized tensor}

Each tensor is read from the file with one positioned read of its own bytes and dequantized alone (gguf's
`dequantize`), then passed through transformers' own GGUF tensor processor (llama's q/k un-permutation, MoE
expert splits, ...) and name map, so the values are exactly those `from_pretrained(..., gguf_file=...)` loads,
while no more than one layer's tensors are ever held (the file is not memory-mapped for its data, so reading it
does not grow the resident set). `check_gguf` refuses what cannot be read before any work: not a GGUF, a truncated
file, an architecture transformers cannot read from GGUF.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import (GGUF_SUPPORTED_ARCHITECTURES, TENSOR_PROCESSORS,
                                                      TensorProcessor, get_gguf_hf_weights_map)

from ..errors import CheckpointError
from .guards import NO_CODE


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: itself (a .gguf file), or the one GGUF of a folder holding no safetensors (the
    first in name order if several, as `load_pretrained` picks); None otherwise."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not any(p.glob("*.safetensors")):
        found = sorted(p.glob("*.gguf"))
        return found[0] if found else None
    return None


def check_gguf(path: Path) -> gguf.GGUFReader:
    """The reader of GGUF file `path` (header and tensor table parsed), after checking that it is a GGUF, that
    every tensor's bytes lie inside the file (a truncated download is refused here) and that transformers reads
    its architecture. CheckpointError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:         # the reader raises ValueError, IndexError, ... on a damaged header
        raise CheckpointError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e}); it may be "
                              f"truncated or damaged") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(f"{str(path)!r} is truncated: its tensors need {end:,} bytes, the file has {size:,}")
    arch = architecture(reader)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{str(path)!r} holds a {arch!r} model; transformers reads GGUF files of "
                              f"{sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {'general', 'tokenizer'})}")
    return reader


def architecture(reader: gguf.GGUFReader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        return "<none>"
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def gguf_config(path: Path) -> PretrainedConfig:
    """The transformers config of GGUF file `path` (what `from_pretrained(..., gguf_file=...)` builds)."""
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **NO_CODE)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"transformers cannot build a config from {str(path)!r}: {e}") from None


class GGUFSource:
    """The tensors of a GGUF file, read by model key (see the module docstring)."""

    def __init__(self, path: Path, skel: nn.Module, layers_path: str):
        self.path = path
        self.reader = check_gguf(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        proc = TENSOR_PROCESSORS.get(architecture(self.reader), TensorProcessor)
        self.processor = proc(config=skel.config.to_dict())
        self.to_model = get_gguf_hf_weights_map(skel, self.processor)      # gguf name -> model key
        self.to_file = {k: g for g, k in self.to_model.items()}
        self.layers_path = layers_path + "."

    def read(self, keys: list[str], dtype: torch.dtype, device="cpu") -> dict[str, Tensor]:
        """{key: tensor} for model keys (floating tensors cast to `dtype`). Keys with one GGUF tensor each read
        that tensor; the rest (experts the file stores fused) process their whole block."""
        direct = [self.to_file[k] for k in keys if self.to_file.get(k) in self.tensors]
        rest = [k for k in keys if self.to_file.get(k) not in self.tensors]
        names = direct + sorted({n for k in rest for n in self._block(k)} - set(direct))
        found: dict[str, Tensor] = {}
        for name in names:
            found.update(self._process(name))
        lost = [k for k in keys if k not in found]
        if lost:
            raise CheckpointError(f"{str(self.path)!r} lacks {len(lost)} tensors the model needs, e.g. {lost[:3]}")
        out = {}
        for k in keys:
            t = found[k].to(device)
            out[k] = t.to(dtype) if t.is_floating_point() else t
        return out

    def _block(self, key: str) -> list[str]:
        """GGUF tensors of the block holding model key `key` (blk.{i}. for decoder layer i; the rest otherwise)."""
        if key.startswith(self.layers_path):
            i = key[len(self.layers_path):].split(".", 1)[0]
            return [n for n in self.tensors if n.startswith(f"blk.{i}.")]
        return [n for n in self.tensors if not n.startswith("blk.")]

    def _process(self, name: str) -> dict[str, Tensor]:
        """Model tensors that GGUF tensor `name` gives, as transformers' loader makes them."""
        t = self.tensors[name]
        with open(self.path, "rb") as f:
            raw = np.frombuffer(os.pread(f.fileno(), int(t.n_bytes), int(t.data_offset)), dtype=t.data.dtype)
        weights = gguf.quants.dequantize(raw.reshape(t.data.shape), t.tensor_type)
        scratch: dict = {"tensors": {}}
        res = self.processor.process(weights=weights, name=name, tensor_key_mapping=self.to_model,
                                     parsed_parameters=scratch)
        out = {k: torch.as_tensor(v) for k, v in scratch["tensors"].items()}
        if res.name in self.to_model:
            out[self.to_model[res.name]] = torch.from_numpy(np.array(res.weights, copy=True))
        return out
