"""A deterministic safetensors writer: the same tensors always give the same bytes.

safetensors' own `save_file` keeps the metadata in a hash map, so its order (and the file's bytes) changes from
run to run. Here the header lists metadata keys sorted and tensors by (element size descending, name) (which keeps
every tensor aligned to its element size, as safetensors does), and the data is streamed tensor by tensor, so a
checkpoint larger than memory can be written from getters (`a3mod.pipeline.stream`).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..errors import CheckpointError

ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        ST_DTYPES[getattr(torch, _name)] = _code
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}

Plan = list[tuple[str, torch.dtype, tuple, Callable[[], Tensor]]]     # (name, dtype, shape, getter)


def plan_of(tensors: dict[str, Tensor]) -> Plan:
    return [(k, t.dtype, tuple(t.shape), lambda t=t: t) for k, t in tensors.items()]


def cast_plan(plan: Plan, dtype: torch.dtype | None) -> Plan:
    """`plan` with its floating-point tensors converted to `dtype` as they are written (None: as they are)."""
    if dtype is None:
        return plan

    def cast(name, get):
        def convert():
            t = get()
            out = t.to(dtype)
            if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{name}: values overflow {dtype} (largest magnitude {float(t.abs().max()):g}); "
                                      f"save in a wider dtype (dtype=torch.float32 / --save-dtype float32)")
            return out
        return convert

    return [(k, dtype, shape, cast(k, get)) if dt.is_floating_point and dt != dtype else (k, dt, shape, get)
            for k, dt, shape, get in plan]


def file_plan(f: Path) -> Plan:
    """The tensors of an existing safetensors file, read one at a time when written."""
    def getter(k):
        def get():
            with safe_open(str(f), "pt") as h:
                return h.get_tensor(k)
        return get

    with safe_open(str(f), "pt") as h:
        return [(k, TORCH_DTYPES[h.get_slice(k).get_dtype()], tuple(h.get_slice(k).get_shape()), getter(k))
                for k in h.keys()]


def write(path: str | Path, plan: Plan, metadata: dict[str, str]) -> None:
    """Write the planned tensors to `path` (see the module docstring)."""
    for name, dt, _, _ in plan:
        if dt not in ST_DTYPES:
            raise CheckpointError(f"{name}: dtype {dt} cannot be stored in safetensors")
    size = lambda dt: torch.empty(0, dtype=dt).element_size()  # noqa: E731
    plan = sorted(plan, key=lambda e: (-size(e[1]), e[0]))
    header, off = {"__metadata__": dict(sorted(metadata.items()))}, 0
    for name, dt, shape, _ in plan:
        n = math.prod(shape) * size(dt)
        header[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, dt, shape, get in plan:
            t = get()
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{name}: got {t.dtype} {tuple(t.shape)}, planned {dt} {tuple(shape)}")
            if t.numel():
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t           # before the next getter runs: one tensor read from a source in memory at a time


def realign(model: nn.Module, align: int = 64) -> nn.Module:
    """Copy CPU tensors that transformers left in the safetensors file's memory map at an unaligned address into
    fresh (aligned) memory. CPU kernels take other code paths for unaligned data, so the same weights at another
    address give other round-off: with this, a loaded model computes bit for bit what the saved one did. Tied
    tensors stay tied (parameters are changed in place; buffers are copied once per storage)."""
    for p in model.parameters():
        if p.device.type == "cpu" and p.data_ptr() % align:
            p.data = p.data.clone()
    copies: dict = {}
    for mod in model.modules():
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device.type == "cpu" and b.data_ptr() % align:
                key = (b.data_ptr(), b.dtype, tuple(b.shape), b.stride())
                mod._buffers[name] = copies.setdefault(key, b.clone())
    return model


def dedup_tensors(sd: dict) -> tuple[dict, dict]:
    """Tensors sharing storage (tied embeddings) are written once; aliases maps each dropped key to the kept one."""
    seen, kept, aliases = {}, {}, {}
    for k, t in sd.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            aliases[k] = seen[key]
        else:
            seen[key] = k
            kept[k] = t.detach().contiguous()
    # different kept in one storage (views of a larger buffer): safetensors refuses them, so copy those
    storages = Counter((t.device, t.untyped_storage().data_ptr()) for t in kept.values())
    for k, t in kept.items():
        if storages[(t.device, t.untyped_storage().data_ptr())] > 1:
            kept[k] = t.clone()
    return kept, aliases


def retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Make each module whose every tensor was saved as an alias of one other module's same-named tensor that module
    itself (a shared block's linears, narrowed or quantized once: the same object in every layer using it, as when
    saved). Modules of different types (an embedding tied to the LM head) keep their own objects."""
    srcs: dict[str, set] = {}
    for k, src in aliases.items():
        (mk, _, nk), (ms, _, ns) = k.rpartition("."), src.rpartition(".")
        srcs.setdefault(mk, set()).add(ms if nk == ns and mk and ms else None)
    for mk, found in srcs.items():
        if len(found) != 1 or None in found:
            continue
        try:
            mod, src = model.get_submodule(mk), model.get_submodule(next(iter(found)))
        except AttributeError:          # a tensor's own state (bitsandbytes 4-bit: weight.absmax), not a module's
            continue
        own = [n for n, _ in mod.named_parameters()]
        if type(mod) is type(src) and own and all(f"{mk}.{n}" in aliases for n in own):
            parent, _, name = mk.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, src)

