"""Read a GGUF checkpoint tensor by tensor, by the model's own keys, for streaming compression.

    src = GGUFSource(path, skeleton, "model.layers")  # skeleton: the model on the meta device
    src.read(["model.layers.3.mlp.up_proj.weight"], torch.float32)   # -> {key: dequantized tensor}

Each tensor is read from the file with one positioned read of its own bytes and dequantized alone (gguf's
`dequantize`), then passed through transformers' own GGUF tensor processor (llama's q/k un-permutation, MoE
expert splits, ...) and name map, so the values are exactly those `from_pretrained(..., gguf_file=...)` loads,
while no more than one layer's tensors are ever held (the file is not memory-mapped for its data, so reading it
does not grow the resident set). `load_gguf_model` builds the whole model that way (a meta skeleton filled one
block at a time: the model plus one layer, where transformers' loader holds every dequantized tensor beside it).
`check_gguf` refuses what cannot be read before any work: not a GGUF, a truncated file, an architecture
transformers cannot read from GGUF.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, TENSOR_PROCESSORS, TensorProcessor

from ..arch import spec_for
from ..errors import CheckpointError, UnsupportedModelError
from .description import materialize_buffers
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


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a GGUF file and how to view them (as gguf's reader does)."""
    type: gguf.GGMLQuantizationType
    offset: int                 # absolute, in bytes
    n_bytes: int
    shape: tuple[int, ...]      # numpy shape of the raw data (quantized: rows x bytes per row)
    item: type                  # numpy dtype of the raw data


@dataclass(frozen=True)
class Header:
    architecture: str
    tensors: dict[str, TensorInfo]


# llama.cpp's architecture names that transformers' GGUF loader knows under another name (load_gguf_checkpoint)
ARCH_ALIASES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2",
                "t5encoder": "t5"}
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_ITEMS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


class _Cursor:
    """Little-endian reads from a buffered file (the header only: metadata values other than the few asked for
    are skipped, never built; gguf's reader makes a numpy object of every token of the vocabulary)."""

    def __init__(self, f):
        self.f = f

    def get(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        raw = self.f.read(n)
        if len(raw) != n:
            raise EOFError("the file ends inside its header")
        return struct.unpack("<" + fmt, raw)[0]

    def string(self) -> bytes:
        n = self.get("Q")
        raw = self.f.read(n)
        if len(raw) != n:
            raise EOFError("the file ends inside its header")
        return raw

    def value(self, vtype: int, keep: bool):
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item, count = self.get("I"), self.get("Q")
            if item in _SCALARS and not keep:
                self.f.seek(count * struct.calcsize("<" + _SCALARS[item]), os.SEEK_CUR)
                return None
            return [self.value(item, keep) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.get(_SCALARS[vtype])


def read_header(path: Path) -> Header:
    """The architecture and tensor table of GGUF file `path` (versions 2 and 3, little-endian)."""
    with open(path, "rb", buffering=1 << 20) as f:
        c = _Cursor(f)
        if c.get("I") != gguf.GGUF_MAGIC:
            raise ValueError("no GGUF magic")
        version = c.get("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (a3mod reads 2 and 3, little-endian)")
        n_tensors, n_kv = c.get("Q"), c.get("Q")
        meta = {}
        for _ in range(n_kv):
            key = c.string().decode("utf-8", "replace")
            vtype = c.get("I")
            meta[key] = c.value(vtype, keep=key in ("general.architecture", "general.alignment"))
        infos = []
        for _ in range(n_tensors):
            name = c.string().decode("utf-8", "replace")
            dims = [c.get("Q") for _ in range(c.get("I"))]
            infos.append((name, dims, gguf.GGMLQuantizationType(c.get("I")), c.get("Q")))
        align = int(meta.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT)
        start = -(-f.tell() // align) * align
    tensors = {}
    for name, dims, qtype, off in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        shape = tuple(reversed(dims))
        item = _ITEMS.get(qtype.name, np.uint8)
        if item is np.uint8:
            shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        tensors[name] = TensorInfo(qtype, start + off, n * size // block, shape, item)
    arch = meta.get("general.architecture")
    return Header(arch.decode("utf-8", "replace") if isinstance(arch, bytes) else "<none>", tensors)


def check_gguf(path: Path) -> Header:
    """The header of GGUF file `path` (architecture, tensor table), after checking that it is a GGUF, that every
    tensor's bytes lie inside the file (a truncated download is refused here) and that transformers reads its
    architecture. CheckpointError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e.strerror or e}") from None
    if magic != b"GGUF":
        raise CheckpointError(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        header = read_header(path)
    except (ValueError, EOFError, KeyError, OverflowError, struct.error) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e}); it may be "
                              f"truncated or damaged") from None
    size = path.stat().st_size
    end = max((t.offset + t.n_bytes for t in header.tensors.values()), default=0)
    if end > size:
        raise CheckpointError(f"{str(path)!r} is truncated: its tensors need {end:,} bytes, the file has {size:,}")
    if ARCH_ALIASES.get(header.architecture, header.architecture) not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{str(path)!r} holds a {header.architecture!r} model; transformers reads GGUF files "
                              f"of {sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {'general', 'tokenizer'})}")
    return header


def gguf_config(path: Path) -> PretrainedConfig:
    """The transformers config of GGUF file `path` (what `from_pretrained(..., gguf_file=...)` builds)."""
    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, **NO_CODE)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(f"transformers cannot build a config from {str(path)!r}: {e}") from None


class GGUFSource:
    """The tensors of a GGUF file, read by model key (see the module docstring). `header`: the file's, when the
    caller has checked it already (`check_gguf`)."""

    def __init__(self, path: Path, skel: nn.Module, layers_path: str, header: Header | None = None):
        self.path = path
        header = header or check_gguf(path)
        self.tensors = header.tensors
        arch = header.architecture
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=skel.config.to_dict())
        ids = [k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch]
        if not ids:
            raise CheckpointError(f"{str(path)!r}: the installed gguf package knows no tensor names of architecture "
                                  f"{arch!r}")
        names = gguf.get_tensor_name_map(ids[0], skel.config.num_hidden_layers)
        self.to_model = weights_map(skel, self.processor, names)          # gguf name -> model key
        self.sources: dict[str, list[str]] = {}                            # model key -> gguf names
        for g, k in self.to_model.items():
            self.sources.setdefault(k, []).append(g)
        self.layers_path = layers_path + "."

    def stored_dtype(self, key: str) -> None:
        """None: every tensor is dequantized (to float32), none is stored in a model dtype as such."""
        return None

    def read(self, keys: list[str], dtype: torch.dtype, device="cpu") -> dict[str, Tensor]:
        """{key: tensor} for model keys (floating tensors cast to `dtype`). Each key reads the GGUF tensors that
        make it (two for fused experts' [gate | up]); a key the name map misses processes its whole block."""
        names: list[str] = []
        for k in keys:
            made_of = [n for n in self.sources.get(k, ()) if n in self.tensors]
            names += made_of or self._block(k)
        scratch: dict = {"tensors": {}}            # where processors assemble tensors from several GGUF ones
        found: dict[str, Tensor] = {}
        for name in dict.fromkeys(names):
            found.update(self._process(name, scratch))
        found.update({k: torch.as_tensor(v) for k, v in scratch["tensors"].items()})
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

    def _process(self, name: str, scratch: dict) -> dict[str, Tensor]:
        """The model tensor GGUF tensor `name` gives, as transformers' loader makes it (processors that assemble
        one from several, fused experts' [gate | up], write into `scratch` instead)."""
        weights = self._dequantized(self.tensors[name])
        res = self.processor.process(weights=weights, name=name, tensor_key_mapping=self.to_model,
                                     parsed_parameters=scratch)
        if res.name in self.to_model:     # a copy only where the processor returned a strided view (q/k permute)
            return {self.to_model[res.name]: torch.from_numpy(np.ascontiguousarray(res.weights))}
        return {}

    def _dequantized(self, t: TensorInfo, rows: int = 4096) -> np.ndarray:
        """Tensor `t` as float32 (integers as they are): its bytes read into one buffer (no copy of the file's),
        quantized types dequantized `rows` rows at a time into the output (gguf's per-row temporaries stay small:
        a whole 150k-token embedding at once would need several times its size)."""
        raw = np.empty(t.n_bytes, np.uint8)
        with open(self.path, "rb") as f:
            if os.preadv(f.fileno(), [raw], t.offset) != t.n_bytes:
                raise CheckpointError(f"{str(self.path)!r} ended while reading a tensor; it may be truncated")
        raw = raw.view(t.item).reshape(t.shape)
        if t.item is not np.uint8 or raw.ndim < 2 or raw.shape[0] <= rows:
            return gguf.quants.dequantize(raw, t.type)
        first = gguf.quants.dequantize(raw[:rows], t.type)
        out = np.empty((raw.shape[0], *first.shape[1:]), first.dtype)
        out[:rows] = first
        for r in range(rows, raw.shape[0], rows):
            out[r:r + rows] = gguf.quants.dequantize(raw[r:r + rows], t.type)
        return out


def weights_map(module: nn.Module, processor, names, qual: str = "") -> dict[str, str]:
    """{GGUF tensor name: model key} of `module`'s state dict: transformers' `get_gguf_hf_weights_map` (each module
    tried under its own names, parents first, with the processor's name hooks) with one name table for all."""
    out: dict[str, str] = {}
    for key in module.state_dict():
        key = processor.preprocess_name(key)
        name, suffix = key, ""
        if key.endswith((".weight", ".bias")):
            name, suffix = key.rsplit(".", 1)
            suffix = "." + suffix
        found = names.get_name(name)
        if found is None:
            processor.perform_fallback_tensor_mapping(out, suffix, qual, key)
        else:
            out[found + suffix] = qual + key
    for child_name, child in module.named_children():
        sub = weights_map(child, processor, names, f"{qual}{child_name}.")
        out.update({k: v for k, v in sub.items() if k not in out})
    return out


def meta_causal_lm(config: PretrainedConfig, source: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `config` on the meta device; UnsupportedModelError naming `source` for a model type that
    is not a causal LM in transformers (an encoder-decoder GGUF, say)."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise UnsupportedModelError(f"{str(source)!r} holds a {config.model_type!r} model, which transformers has "
                                    f"no causal-LM class for; a3mod compresses causal LMs ({str(e)[:120]})") from None


def load_gguf_model(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of GGUF file `path` in `dtype` (eval mode, CPU), with the weights `from_pretrained(...,
    gguf_file=...)` gives, read block by block into a meta skeleton (see the module docstring)."""
    header = check_gguf(path)
    config = gguf_config(path)
    model = meta_causal_lm(config, path, dtype)
    layers = spec_for(model).layers
    src = GGUFSource(path, model, layers, header)
    seen, groups = set(), {}
    for k, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:                       # a tied alias (lm_head of tied embeddings): loaded once
            continue
        seen.add(id(t))
        i = k[len(layers) + 1:].split(".", 1)[0] if k.startswith(layers + ".") else None
        groups.setdefault(i, []).append(k)
    for keys in groups.values():
        model.load_state_dict(src.read(keys, dtype), strict=False, assign=True)
    model.tie_weights()
    materialize_buffers(model, "cpu")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{str(path)!r} does not hold every tensor of the {config.model_type} model: "
                              f"{left[:3]} are missing")
    model.generation_config = GenerationConfig.from_model_config(config)
    return model.eval()
