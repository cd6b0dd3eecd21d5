"""a3mod's sealed folder format: safetensors + HF config + an `a3mod.json` sidecar. No pickle.

The sidecar describes every reduced module (dims, biases, kept RoPE dims, kept MLP neurons), so `read`
builds the skeleton on the meta device, swaps in reduced modules, and assigns the weights: no calibration.
Output goes to a temporary sibling directory that is renamed into place only when complete. This module knows
nothing of the native Hugging Face type: `write` is given the config to store, and `read` returns the model of the
original class. The user-facing `a3mod.save` / `a3mod.load` (io/checkpoint.py) and the native classes'
quantized path (io/native.py) both sit on it.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, GenerationConfig

from ..arch import spec_for
from ..errors import A3ModError, CheckpointError
from ..modules.linears import is_quantized
from ..modules import ReducedMLP
from ..quant import io as quant_io
from . import description, files, sidecar, tensors
from .files import SIDECAR
from .guards import NO_CODE, as_dtype, check_files, check_folder

WEIGHTS = "model.safetensors"


def is_a3mod_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SIDECAR).is_file()


def model_sources(model: nn.Module) -> list[str]:
    """Local folders the model was loaded from (`save` never replaces them)."""
    return [s for s in {getattr(model, "name_or_path", None), getattr(model.config, "_name_or_path", None)} if s]


def write_sidecar(tmp: Path, side: dict) -> None:
    """The last file of a checkpoint: `side` plus the size and sha256 of every file already in `tmp`, sealed with
    its own checksum (a3mod.io.sidecar), deterministic text."""
    recorded = {f.name: {"bytes": f.stat().st_size, "sha256": files.sha256_file(f)}
                for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / SIDECAR).write_text(sidecar.dumps(sidecar.seal({**side, "files": recorded})))


def write(model: nn.Module, out_dir: str | os.PathLike, config, tokenizer=None, overwrite: bool = False,
          extra_files: dict[str, str | bytes] | None = None, dtype: torch.dtype | str | None = "auto") -> Path:
    """Write `model` (compressed or not) to `out_dir` with config.json from `config` (a config object describing
    the model; `a3mod.save` gives the native one); returns the folder's absolute path. The folder is published
    atomically (a3mod.io.files); the other arguments are `a3mod.save`'s (io/checkpoint.py documents them)."""
    sources = model_sources(model)
    extra = dict(extra_files or {})
    files.check_extra_names(extra, reserved=(WEIGHTS, "config.json", "generation_config.json"))
    side = description.describe_model(model)
    dtype = save_dtype(model, dtype)
    state, aliases = tensors.dedup_tensors(model.state_dict())
    config = copy.copy(config)
    config.dtype = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), None)  # what is stored
    with files.staged_output(out_dir, overwrite, sources) as tmp:
        config.save_pretrained(tmp)                                     # model_type "a3mod" (a3mod.io.native)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tensors.write(tmp / WEIGHTS, tensors.cast_plan(tensors.plan_of(state), dtype),
                      {"format": "pt", "a3mod": str(description.WEIGHTS_FORMAT)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_sidecar(tmp, {**side, "aliases": aliases, **({"extra": sorted(extra)} if extra else {})})
        for name, data in extra.items():
            if (tmp / name).exists():
                raise CheckpointError(f"extra file name {name!r} is a file the checkpoint already holds (its "
                                      f"tokenizer's?); choose another name")
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return files.resolved(out_dir)



def save_dtype(model: nn.Module, dtype) -> torch.dtype | None:
    """The dtype `save` stores floating-point weights in (None: as they are); see `save`."""
    if isinstance(dtype, str) and dtype == "auto":
        dtype = getattr(model, "a3mod_source_dtype", None)
        if dtype is None or any(is_quantized(m) for m in model.modules()):
            return None
    dtype = as_dtype(dtype)
    if dtype is not None and not dtype.is_floating_point:
        raise A3ModError(f"save: dtype={dtype} is not a floating-point dtype")
    if dtype is not None and any(is_quantized(m) for m in model.modules()):
        raise A3ModError(f"save: dtype={dtype} for a model with quantized linears; their compute dtype is fixed when "
                         f"they are quantized (save it with dtype='auto')")
    return dtype


def read_sidecar(p: Path, verify: bool = True) -> dict:
    """The validated sidecar of checkpoint folder `p`; with `verify`, every file it records must have its
    recorded size and sha256 (sizes are always checked). CheckpointError naming the field or file otherwise."""
    if not is_a3mod_checkpoint(p):
        raise CheckpointError(f"{str(p)!r} is not an a3mod checkpoint (no {SIDECAR})")
    side = sidecar.parse((p / SIDECAR).read_bytes())
    lacks = [k for k in ("files", "sha256") if k not in side]
    if lacks:
        raise CheckpointError(f"{SIDECAR} in {str(p)!r} lacks {lacks} (its file records and its own checksum, which "
                              f"a3mod.save always writes): edited, or not written by a3mod")
    sidecar.check_seal(side)
    sidecar.validate(side)
    for name, rec in side.get("files", {}).items():
        f = p / name
        if not f.is_file():
            raise CheckpointError(f"{str(p)!r} lacks {name}, which {SIDECAR} records")
        if f.stat().st_size != rec["bytes"]:
            raise CheckpointError(f"{name} in {str(p)!r} has {f.stat().st_size} bytes, {SIDECAR} records "
                                  f"{rec['bytes']} (truncated or replaced)")
        if verify and files.sha256_file(f) != rec["sha256"]:
            raise CheckpointError(f"{name} in {str(p)!r} is corrupted or was modified: its sha256 differs from the "
                                  f"one {SIDECAR} records (load(..., verify=False) skips this check)")
    return side


def _read_weights(p: Path, device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(p / WEIGHTS), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{WEIGHTS} in {str(p)!r} cannot be read as safetensors: {str(e)[:200]}") from None


def read(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | str | None = None,
         verify: bool = True) -> nn.Module:
    """Rebuild a model written by `write` (of its original class): meta skeleton, reduced modules from the
    sidecar, weights assigned.

    The sidecar is validated before any module is built; `verify` (default) also checks the sha256 of every file
    the sidecar records (it reads every byte once). No code from the folder runs (a3mod.io.guards.check_folder)."""
    dtype = as_dtype(dtype)
    p = Path(path)
    check_files(p)                                         # before any file of it is read
    side = read_sidecar(p, verify)
    check_folder(p)
    try:
        config = AutoConfig.from_pretrained(p, **NO_CODE)
    except (OSError, ValueError, TypeError, CheckpointError, KeyError) as e:
        raise CheckpointError(f"config.json in {str(p)!r} cannot be read: {str(e)[:200]}") from None
    with torch.device("meta"):
        model = description.skeleton(side.get("model_class"), config)
    rope = description.build_reduced(model, side, "meta", None)
    sd = _read_weights(p, device)
    stored = next((t.dtype for t in sd.values() if t.is_floating_point()), None)
    for k, src in side.get("aliases", {}).items():
        if src not in sd:
            raise CheckpointError(f"{SIDECAR} says {k!r} is tied to {src!r}, which {WEIGHTS} lacks")
        sd[k] = sd[src]
    quantized = quant_io.restore(model, spec_for(model).layers, side, sd, device, dtype)   # takes their tensors
    description.remember_narrow(model, side)
    _check_weights(sd, model.state_dict())
    if dtype is not None:
        sd = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in sd.items()}
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    tensors.retie(model, side.get("aliases", {}))
    tensors.realign(model)
    _check_loaded(model, missing, quantized, rope)
    description.materialize_buffers(model, device)
    description.attach_latent_rotary(model)
    _finish(model, p, side, config)
    model.a3mod_source_dtype = stored                    # a re-save keeps the stored dtype
    return model


def _check_weights(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every stored tensor has a place in the described model, its shape, a compatible dtype (one floating-point
    dtype for all: a model computes in one) and finite values."""
    widths = sorted({str(t.dtype) for t in sd.values() if t.is_floating_point()})
    if len(widths) > 1:
        odd = next(k for k, t in sd.items() if t.is_floating_point() and str(t.dtype) != widths[0])
        raise CheckpointError(f"{WEIGHTS} mixes floating-point dtypes {widths} (e.g. {odd!r}); a3mod writes one")
    for k, t in sd.items():
        if k not in expected:
            raise CheckpointError(f"weight {k!r} in {WEIGHTS} has no place in the model the sidecar describes")
        if tuple(t.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"weight {k!r} has shape {tuple(t.shape)} in {WEIGHTS} but the sidecar "
                                  f"describes {tuple(expected[k].shape)}")
        if t.is_floating_point() != expected[k].is_floating_point() or t.dtype == torch.bool != (
                expected[k].dtype == torch.bool):
            raise CheckpointError(f"weight {k!r} is {t.dtype} in {WEIGHTS}; the model holds {expected[k].dtype} there")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"weight {k!r} in {WEIGHTS} has NaN or infinite values")


def _check_loaded(model: nn.Module, missing: list[str], quantized: tuple[str, ...], rope: dict) -> None:
    """No weight left on the meta device; kept neurons and RoPE dims agree between the sidecar and the file."""
    still = [k for k in missing if not k.startswith(quantized) and description.get_path_tensor(model, k).is_meta]
    if still:
        raise CheckpointError(f"{WEIGHTS} lacks {len(still)} weights the model needs, e.g. {still[:3]}")
    for name, mod in model.named_modules():
        if isinstance(mod, ReducedMLP) and mod.kept is not None and len(mod.kept) != mod.inter:
            raise CheckpointError(f"{SIDECAR}: {name} 'kept' lists {len(mod.kept)} neurons, {name}.up_proj.weight "
                                  f"has {mod.inter}")
        if name in rope and not torch.equal(mod.rope_index.cpu(), rope[name]):
            raise CheckpointError(f"{name}.rope_index in {WEIGHTS} differs from the kept RoPE dims in {SIDECAR}")


def _finish(model: nn.Module, p: Path, side: dict, config) -> None:
    """Generation config, provenance (a3mod_info), eval mode; config.json must describe what the sidecar does."""
    if (p / "generation_config.json").exists():
        try:
            model.generation_config = GenerationConfig.from_pretrained(p, **NO_CODE)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"generation_config.json in {str(p)!r} cannot be read: {str(e)[:200]}") from None
    model.a3mod_info = {k: side.get(k) for k in ("passes", "calib_tokens", "orig_layer_params")}
    model.a3mod_info.update({k: side[k] for k in description.INFO_EXTRAS if k in side})
    model.eval()
    if hasattr(type(config), "a3mod_base_config"):     # a native config (io/native.py): model_type "a3mod"
        _check_config_matches(p, config, side)


def _check_config_matches(p: Path, config, side: dict) -> None:
    """config.json's description must be a3mod.json's (slim forms compared: config.json holds no index lists)."""
    described = getattr(config, "a3mod", None) if config is not None else None
    if description.slim(described or {}).get("layers") != description.slim(side)["layers"]:
        raise CheckpointError(f"config.json in {str(p)!r} describes other reduced modules than {SIDECAR} (edited or "
                              f"from another model); {SIDECAR} is sealed, so the folder is inconsistent")


def verify_folder(p: Path, config) -> dict:
    """The checks `load` makes of an a3mod.save folder, for transformers' own loading of it (from_pretrained):
    seal, schema, file sizes and checksums, and config.json describing what a3mod.json does."""
    side = read_sidecar(p, verify=True)
    _check_config_matches(p, config, side)
    return side

