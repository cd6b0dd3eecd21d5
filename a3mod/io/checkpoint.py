"""Save / load compressed models: safetensors + HF config + an `a3mod.json` sidecar. No pickle.

The sidecar describes every reduced module (dims, biases, kept RoPE dims, kept MLP neurons), so `load`
builds the skeleton on the meta device, swaps in reduced modules, and assigns the weights: no calibration.
Output goes to a temporary sibling directory that is renamed into place only when complete.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..arch import dims_of, find_path, get_path, mlp_paths, spec_for
from ..arch.experts import ExpertsView, narrowed
from ..arch.mla import is_mla, narrowed_mla
from . import files, sidecar, tensors
from ..errors import CheckpointError
from ..modules import LatentKVAttention, LowRankLinear, NarrowLinear, ReducedHeadAttention, ReducedMLP
from ..quant import io as quant_io
from ..pipeline.rewrite import set_child

COMPACT_ATTENTION = (ReducedHeadAttention, LatentKVAttention)
SIDECAR = "a3mod.json"
WEIGHTS = "model.safetensors"
FORMAT = 1
QUANT_FORMAT = 2       # written when the model holds quantized linears (older readers refuse it)


def is_a3mod_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / SIDECAR).is_file()


def describe_model(model: nn.Module) -> dict:
    spec = spec_for(model)
    layers = {}
    for i, layer in enumerate(get_path(model, spec.layers)):
        entry = describe_layer(layer, spec)
        if entry:
            layers[str(i)] = entry
    info = getattr(model, "a3mod_info", {})
    quant = quant_io.model_entry(model)
    from .. import __version__
    base = getattr(type(model), "a3mod_base", type(model))         # the original class of a native one
    return {"format": QUANT_FORMAT if quant else FORMAT, "a3mod_version": __version__,
            "model_type": model.config.model_type, "model_class": base.__name__,
            "passes": info.get("passes", []),
            "calib_tokens": info.get("calib_tokens"), "orig_layer_params": info.get("orig_layer_params"),
            "layers": layers, **({"quant": quant} if quant else {}),
            **({"heal": info["heal"]} if info.get("heal") else {})}


def describe_layer(layer: nn.Module, spec) -> dict:
    """The sidecar entry of one decoder layer: what its compact modules say of themselves (`describe()`), low-rank
    and narrowed linears, quantized linears. Empty for an untouched layer."""
    mlp_path, experts_path = mlp_paths(layer, spec)
    attn, mlp = find_path(layer, spec.attn), None if mlp_path is None else find_path(layer, mlp_path)
    entry = {}
    if isinstance(attn, COMPACT_ATTENTION):           # the module describes itself (its SIDECAR_KEY entry)
        entry[attn.SIDECAR_KEY] = attn.describe()
    if getattr(attn, "a3mod_mla", None):              # latent attention narrowed in place (a3mod.arch.mla)
        entry["mla"] = {"qk_nope": attn.qk_nope_head_dim, "v": attn.v_head_dim, **attn.a3mod_mla}
    inside = spec.attn + "." if isinstance(attn, LatentKVAttention) else None      # described above
    lin = {n: dict(in_features=m.in_features, rank=m.rank, out_features=m.out_features, bias=m.bias is not None)
           for n, m in layer.named_modules()
           if isinstance(m, LowRankLinear) and not (inside and n.startswith(inside))}
    if lin:
        entry["linears"] = lin
    narrow = {n: _narrow_entry(m) for n, m in layer.named_modules()
              if isinstance(m, NarrowLinear) or getattr(m, "a3mod_narrow", None) is not None}
    if narrow:
        entry["narrow"] = narrow
    quantized = quant_io.layer_entry(layer)
    if quantized:
        entry["quantized"] = quantized
    if isinstance(mlp, ReducedMLP):
        entry[mlp.SIDECAR_KEY] = mlp.describe()
    info = experts_path and getattr(get_path(layer, experts_path), "a3mod_experts", None)
    if info:                                          # routed experts narrowed in place (a3mod.arch.experts)
        entry["experts"] = {"orig_inter": info["orig_inter"], "kept": info["kept"],
                            **({"fallback": info["fallback"]} if info.get("fallback") else {})}
    return entry


def _narrow_entry(m: nn.Module) -> dict:
    """Sidecar entry of a NarrowLinear, or of the quantized linear that replaced one (its `a3mod_narrow`)."""
    in_f, out_f = quant_io.linear_shape(m)
    info = m.narrow_info() if isinstance(m, NarrowLinear) else m.a3mod_narrow
    return dict(in_features=int(in_f), out_features=int(out_f), bias=getattr(m, "bias", None) is not None, **info)


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


def model_sources(model: nn.Module) -> list[str]:
    """Local folders the model was loaded from (`save` never replaces them)."""
    return [s for s in {getattr(model, "name_or_path", None), getattr(model.config, "_name_or_path", None)} if s]


def write_sidecar(tmp: Path, side: dict) -> None:
    """The last file of a checkpoint: `side` plus the size and sha256 of every file already in `tmp`, sealed with
    its own checksum (a3mod.io.sidecar), deterministic text."""
    recorded = {f.name: {"bytes": f.stat().st_size, "sha256": files.sha256_file(f)}
                for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / SIDECAR).write_text(sidecar.dumps(sidecar.seal({**side, "files": recorded})))


def save(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write `model` (compressed or not) to `out_dir`; returns its absolute path.

    The folder is assembled next to `out_dir` and published atomically (a3mod.io.files): `out_dir` holds the old
    checkpoint or the new one, never a mix. overwrite=True replaces only an a3mod checkpoint or an empty folder,
    never the folder the model was loaded from. extra_files: {name: text} added beside the checkpoint (e.g.
    compress_result.json, README.md), not covered by its checksums."""
    from . import native

    sources = model_sources(model)
    side = describe_model(model)
    with files.staged_output(out_dir, overwrite, sources) as tmp:
        native.config_for(model.config, side).save_pretrained(tmp)     # model_type "a3mod" (a3mod.io.native)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        state, aliases = dedup_tensors(model.state_dict())
        tensors.write(tmp / WEIGHTS, tensors.plan_of(state), {"format": "pt", "a3mod": str(FORMAT)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_sidecar(tmp, {**side, "aliases": aliases})
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return files._resolved(out_dir)


def build_reduced(model: nn.Module, side: dict, device, dtype) -> dict[str, torch.Tensor]:
    """Swap in the reduced modules the sidecar describes; returns the sidecar's kept RoPE dims by module name."""
    spec = spec_for(model)
    dims = dims_of(model.config, spec)
    layers = get_path(model, spec.layers)
    rope = {}
    for key, entry in side["layers"].items():
        i = int(key)
        if not 0 <= i < len(layers):
            raise CheckpointError(f"sidecar names layer {i}, the model has {len(layers)} layers")
        try:
            if "attn" in entry:
                a = dict(entry["attn"])
                idx = torch.tensor(a.pop("rope_index"), dtype=torch.long, device="cpu")
                if idx.numel() != a["kv_heads"] * a["rot_dim"]:
                    raise ValueError(f"rope_index has {idx.numel()} entries, kv_heads x rot_dim = "
                                     f"{a['kv_heads']} x {a['rot_dim']}")
                idx = idx.reshape(a["kv_heads"], a["rot_dim"])
                if idx.numel() and int(idx.max()) >= dims.rot_dim:
                    raise ValueError(f"rope_index holds {int(idx.max())}, outside the model's {dims.rot_dim} "
                                     f"rotary dims")
                if a.get("qk_norm"):     # the skeleton's own q/k norm modules (their weights come with the file)
                    old = get_path(layers[i], spec.attn)
                    a["q_norm"], a["k_norm"] = (getattr(old, n) for n in spec.qk_norm_names)
                attn = ReducedHeadAttention(model.config, i, device=device, dtype=dtype, **a)
                rope[f"{spec.layers}.{i}.{spec.attn}"] = idx
                set_child(layers[i], spec.attn, attn)
            if "mlp" in entry:
                m = dict(entry["mlp"])
                kept = m.pop("kept")
                if kept is not None and not all(0 <= k < m["orig_inter"] for k in kept):
                    raise ValueError(f"mlp 'kept' has neuron indices outside [0, orig_inter={m['orig_inter']})")
                mlp = ReducedMLP(m["hidden"], m["inter"], m["act"], m["gated"], m["up_bias"], m["down_bias"],
                                 orig_inter=m["orig_inter"], dropout=m.get("dropout", 0.0),
                                 residual=m.get("residual", False), device=device, dtype=dtype)
                mlp.kept = kept
                path = mlp_paths(layers[i], spec)[0]
                if path is None:
                    raise ValueError("an 'mlp' entry for a layer whose MoE block has no shared expert")
                set_child(layers[i], path, mlp)
            if "mla" in entry:
                old, x = get_path(layers[i], spec.attn), entry["mla"]
                if not is_mla(old):
                    raise ValueError(f"an 'mla' entry for a layer whose attention is a {type(old).__name__}")
                if (x["orig_nope"], x["orig_v"]) != (old.qk_nope_head_dim, old.v_head_dim):
                    raise ValueError(f"mla orig_nope / orig_v {x['orig_nope']} / {x['orig_v']} differ from the model's "
                                     f"{old.qk_nope_head_dim} / {old.v_head_dim}")
                if x["qk_nope"] > x["orig_nope"] or x["v"] > x["orig_v"]:
                    raise ValueError("mla keeps more dims than the model has")
                set_child(layers[i], spec.attn, narrowed_mla(old, None, None, None, None, None, x["qk_nope"], x["v"]))
            if "experts" in entry:
                path = mlp_paths(layers[i], spec)[1]
                if path is None:
                    raise ValueError("an 'experts' entry for a layer without routed experts")
                old = get_path(layers[i], path)
                x = entry["experts"]
                if ExpertsView(old, dims.hidden).inter != x["orig_inter"]:
                    raise ValueError(f"experts orig_inter {x['orig_inter']} differs from the model's "
                                     f"{ExpertsView(old, dims.hidden).inter}")
                kept = torch.tensor(x["kept"], dtype=torch.long, device="cpu")
                set_child(layers[i], path, narrowed(old, dims.hidden, kept, x.get("fallback")))
            if "latent_attn" in entry:
                set_child(layers[i], spec.attn, LatentKVAttention(model.config, i, device=device, dtype=dtype,
                                                                  **entry["latent_attn"]))
            for path, nl in entry.get("narrow", {}).items():
                get_path(layers[i], path)          # the path must exist in the skeleton
                set_child(layers[i], path, NarrowLinear(**nl, device=device, dtype=dtype))
            for path, lr in entry.get("linears", {}).items():
                get_path(layers[i], path)          # the path must exist in the skeleton
                set_child(layers[i], path, LowRankLinear(**lr, device=device, dtype=dtype))
        except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{SIDECAR} layer {i} is inconsistent: {e}") from e
    return rope


def materialize_buffers(model: nn.Module, device) -> None:
    """Non-persistent buffers (rotary inv_freq, BERT's position_ids) are not in the file: take them from a fresh
    module built from the config (the module itself, with its loaded weights, stays)."""
    for name, mod in list(model.named_modules()):
        meta = [n for n, b in mod.named_buffers(recurse=False) if b.is_meta]
        if meta:
            try:
                fresh = type(mod)(config=model.config)
            except TypeError as e:
                if not _init_buffers(model, mod, meta, device):
                    raise CheckpointError(f"cannot rebuild buffers of {name} ({type(mod).__name__}): {e}") from e
                continue
            for n in meta:
                mod._buffers[n] = getattr(fresh, n).to(device)


def _init_buffers(model: nn.Module, mod: nn.Module, names: list[str], device) -> bool:
    """Buffers of a module not built from the config (Gemma's scaled embedding: `embed_scale`): the model's own
    `_init_weights` fills them, as in `from_pretrained`, with the loaded parameters marked initialized so they
    stay. Returns False when the model has no `_init_weights` or it left a buffer on the meta device."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return False
    for n in names:
        mod._buffers[n] = torch.empty_like(mod._buffers[n], device=device)
    params = list(mod.parameters(recurse=False))
    flags = [p.__dict__.get("_is_hf_initialized") for p in params]
    for p in params:
        p._is_hf_initialized = True
    try:
        init(mod)
    finally:
        for p, f in zip(params, flags):
            if f is None:
                del p._is_hf_initialized
            else:
                p._is_hf_initialized = f
    return not any(mod._buffers[n].is_meta for n in names)


def read_sidecar(p: Path, verify: bool = True) -> dict:
    """The validated sidecar of checkpoint folder `p`; with `verify`, every file it records must have its
    recorded size and sha256 (sizes are always checked). CheckpointError naming the field or file otherwise."""
    if not is_a3mod_checkpoint(p):
        raise CheckpointError(f"{str(p)!r} is not an a3mod checkpoint (no {SIDECAR})")
    side = sidecar.parse((p / SIDECAR).read_bytes())
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
    from safetensors import SafetensorError

    try:
        return load_file(str(p / WEIGHTS), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{WEIGHTS} in {str(p)!r} cannot be read as safetensors: {str(e)[:200]}") from None


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | str | None = None,
         verify: bool = True) -> nn.Module:
    """Rebuild a model saved by `a3mod.save`: meta skeleton, reduced modules from the sidecar, weights assigned.

    The sidecar is validated before any module is built; `verify` (default) also checks the sha256 of every file
    the sidecar records (about 1 s per GB). No code from the folder runs (a3mod.io.loading.check_folder)."""
    from transformers import AutoConfig, GenerationConfig

    from .loading import NO_CODE, as_dtype, check_folder

    from . import native

    dtype = as_dtype(dtype)
    p = Path(path)
    if not is_a3mod_checkpoint(p) and native.is_native_folder(p):
        return native.load_folder(p, device, dtype)        # written by save_pretrained: transformers' own loading
    side = read_sidecar(p, verify)
    check_folder(p)
    try:
        config = AutoConfig.from_pretrained(p, **NO_CODE)
    except (OSError, ValueError, TypeError, CheckpointError, KeyError) as e:
        raise CheckpointError(f"config.json in {str(p)!r} cannot be read: {str(e)[:200]}") from None
    with torch.device("meta"):
        model = _skeleton(side.get("model_class"), config)
    rope = build_reduced(model, side, "meta", None)
    sd = _read_weights(p, device)
    for k, src in side.get("aliases", {}).items():
        if src not in sd:
            raise CheckpointError(f"{SIDECAR} says {k!r} is tied to {src!r}, which {WEIGHTS} lacks")
        sd[k] = sd[src]
    quantized = quant_io.restore(model, spec_for(model).layers, side, sd, device, dtype)   # takes their tensors
    _remember_narrow(model, side)
    expected = model.state_dict()
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
    if dtype is not None:
        sd = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in sd.items()}
    missing, _ = model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    tensors.realign(model)
    still = [k for k in missing if not k.startswith(quantized) and get_path_tensor(model, k).is_meta]
    if still:
        raise CheckpointError(f"{WEIGHTS} lacks {len(still)} weights the model needs, e.g. {still[:3]}")
    for name, mod in model.named_modules():
        if isinstance(mod, ReducedMLP) and mod.kept is not None and len(mod.kept) != mod.inter:
            raise CheckpointError(f"{SIDECAR}: {name} 'kept' lists {len(mod.kept)} neurons, {name}.up_proj.weight "
                                  f"has {mod.inter}")
        if name in rope and not torch.equal(mod.rope_index.cpu(), rope[name]):
            raise CheckpointError(f"{name}.rope_index in {WEIGHTS} differs from the kept RoPE dims in {SIDECAR}")
    materialize_buffers(model, device)
    latent = [m for m in model.modules() if isinstance(m, LatentKVAttention)]
    if latent and spec_for(model).rotary and latent[0].rot_dim:
        for m in latent:
            m.attach_rotary(get_path(model, spec_for(model).rotary))
    if (p / "generation_config.json").exists():
        try:
            model.generation_config = GenerationConfig.from_pretrained(p, **NO_CODE)
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"generation_config.json in {str(p)!r} cannot be read: {str(e)[:200]}") from None
    model.a3mod_info = {k: side.get(k) for k in ("passes", "calib_tokens", "orig_layer_params")}
    if "heal" in side:
        model.a3mod_info["heal"] = side["heal"]
    model.eval()
    described = getattr(config, "a3mod", None)
    if native.is_native(config) and (described or {}).get("layers") != side["layers"]:
        raise CheckpointError(f"config.json in {str(p)!r} describes other reduced modules than {SIDECAR} (edited or "
                              f"from another model); {SIDECAR} is sealed, so the folder is inconsistent")
    return native.adopt(model)


def _remember_narrow(model: nn.Module, side: dict) -> None:
    """Quantized linears restored in place of a NarrowLinear keep its original dims (for report and re-save)."""
    layers = get_path(model, spec_for(model).layers)
    for key, entry in side["layers"].items():
        for path, nl in entry.get("narrow", {}).items():
            m = get_path(layers[int(key)], path)
            if not isinstance(m, NarrowLinear):
                m.a3mod_narrow = {k: nl[k] for k in ("orig_in", "orig_out", "kept")}


def transformers_class(name) -> type | None:
    """The transformers model class called `name` (BertModel, OPTForCausalLM, ...), or None."""
    import transformers
    from transformers import PreTrainedModel

    cls = getattr(transformers, name, None) if isinstance(name, str) and name else None
    return cls if isinstance(cls, type) and issubclass(cls, PreTrainedModel) else None


def _skeleton(class_name: str | None, config) -> nn.Module:
    """The transformers class the sidecar names built from `config`; AutoModelForCausalLM for sidecars that name
    none or a class outside transformers."""
    from transformers import AutoModelForCausalLM

    cls = transformers_class(class_name)
    return cls._from_config(config) if cls is not None else AutoModelForCausalLM.from_config(config)


def get_path_tensor(model: nn.Module, key: str) -> torch.Tensor:
    mod_path, _, name = key.rpartition(".")
    return getattr(get_path(model, mod_path) if mod_path else model, name)
