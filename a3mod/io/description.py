"""A compressed model's description (what a3mod.json and config.json's "a3mod" hold) and the dense skeleton it is
rebuilt on: the model-level half of the codecs (io/codecs.py), shared by checkpoint, native and streaming."""
from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..version import __version__
from ..arch import dims_of, get_path, spec_for
from ..errors import CheckpointError
from ..modules import LatentKVAttention, NarrowLinear, ReducedHeadAttention
from ..quant import io as quant_io
from .codecs import Site, build_layer, describe_layer, slim_layer
from .files import SIDECAR

# The description's format (a3mod.json and config.json's "a3mod"); readers take every one listed in sidecar.FORMATS.
#   1  the first; its config.json carried the whole description, kept-index lists included, until commit a16302e,
#      which slimmed config.json without a new number (readers never branch on it: both forms load)
#   2  1 with quantized linears ("quant"), so that readers without them refuse it
#   3  every save since: config.json's description is the slim one (dims and small facts; index lists only in
#      a3mod.json and the weights), quantized or not ("quant" tells); readers from before it refuse it
FORMAT = 3
WEIGHTS_FORMAT = 1     # model.safetensors' layout (its metadata "a3mod"): unchanged since format 1


INFO_EXTRAS = ("heal", "sequential")   # optional provenance in a3mod_info, written only when set


def describe_model(model: nn.Module) -> dict:
    spec = spec_for(model)
    layers = {}
    for i, layer in enumerate(get_path(model, spec.layers)):
        entry = describe_layer(layer, spec)
        if entry:
            layers[str(i)] = entry
    info = getattr(model, "a3mod_info", {})
    quant = quant_io.model_entry(model)
    base = getattr(type(model), "a3mod_base", type(model))         # the original class of a native one
    return {"format": FORMAT, "a3mod_version": __version__,
            "model_type": model.config.model_type, "model_class": base.__name__,
            "passes": info.get("passes", []),
            "calib_tokens": info.get("calib_tokens"), "orig_layer_params": info.get("orig_layer_params"),
            "layers": layers, **({"quant": quant} if quant else {}),
            **{k: info[k] for k in INFO_EXTRAS if info.get(k)}}


def slim(side: dict) -> dict:
    """The config.json form of a description: every layer entry without its index lists (codecs.slim_layer)."""
    return {**side, "layers": {k: slim_layer(e) for k, e in side["layers"].items()}} if "layers" in side else side


def build_reduced(model: nn.Module, side: dict, device, dtype) -> dict[str, torch.Tensor]:
    """Swap in the reduced modules the description holds; returns its kept RoPE dims by module name."""
    spec = spec_for(model)
    dims = dims_of(model.config, spec)
    layers = get_path(model, spec.layers)
    rope = {}
    for key, entry in side["layers"].items():
        i = int(key)
        if not 0 <= i < len(layers):
            raise CheckpointError(f"sidecar names layer {i}, the model has {len(layers)} layers")
        site = Site(layers[i], spec, i, model.config, dims, device, dtype, rope)
        try:
            build_layer(site, entry)
        except (ValueError, TypeError, KeyError, RuntimeError, AttributeError) as e:
            raise CheckpointError(f"{SIDECAR} layer {i} is inconsistent: {e}") from e
    return rope


def materialize_buffers(model: nn.Module, device) -> None:
    """Non-persistent buffers (rotary inv_freq, BERT's position_ids) are not in the file: take them from a fresh
    module built from the config (the module itself, with its loaded weights, stays)."""
    for name, mod in list(model.named_modules()):
        _materialize(model, name, mod, device)


def rebuild_nonpersistent(model: nn.Module) -> None:
    """Recompute every non-persistent buffer of `model` (rotary tables, Falcon-H1's mup_vector) from its config, as
    `materialize_buffers` does for a meta skeleton, each on its own device; the loaded weights stay."""
    for name, mod in list(model.named_modules()):
        bufs = {n: mod._buffers[n] for n in mod._non_persistent_buffers_set if mod._buffers.get(n) is not None}
        bufs = {n: b for n, b in bufs.items() if not b.is_meta}
        if not bufs:
            continue
        device = next(iter(bufs.values())).device
        for n, b in bufs.items():
            mod._buffers[n] = torch.empty(b.shape, dtype=b.dtype, device="meta")
        _materialize(model, name, mod, device)


def _materialize(model: nn.Module, name: str, mod: nn.Module, device) -> None:
    meta = [n for n, b in mod.named_buffers(recurse=False) if b.is_meta]
    if not meta:
        return
    try:
        fresh = type(mod)(config=model.config)
    except TypeError as e:
        if not _init_buffers(model, name, mod, meta, device):
            raise CheckpointError(f"cannot rebuild buffers of {name} ({type(mod).__name__}): {e}") from e
        return
    for n in meta:
        mod._buffers[n] = getattr(fresh, n).to(device)


def _init_buffers(model: nn.Module, path: str, mod: nn.Module, names: list[str], device) -> bool:
    """Buffers of a module not built from the config (Gemma's scaled embedding: `embed_scale`; Falcon-H1's Mamba
    `mup_vector`, which the model's `_init_weights` writes from the decoder stack): the model's own `_init_weights`
    fills them, as in `from_pretrained`, on the module and then on each module above it until none is left unset,
    with every loaded parameter marked initialized so it stays. Returns False when the model has no `_init_weights`
    or a buffer stays unset (NaN-filled before, so a skipped one is seen)."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return False
    for n in names:
        b = mod._buffers[n]
        mod._buffers[n] = torch.full(b.shape, float("nan"), dtype=b.dtype, device=device) if b.is_floating_point() \
            else torch.zeros(b.shape, dtype=b.dtype, device=device)
    unset = lambda: any(mod._buffers[n].is_floating_point() and bool(mod._buffers[n].isnan().any())  # noqa: E731
                        for n in names)
    parts = path.split(".") if path else []
    for owner in [mod] + [model.get_submodule(".".join(parts[:k])) for k in range(len(parts) - 1, -1, -1)]:
        _init_keeping_params(init, owner)
        if not unset():
            return True
    return False


def _init_keeping_params(init, mod: nn.Module) -> None:
    """`init(mod)` with every parameter under `mod` marked initialized (transformers' init functions skip those)."""
    params = list(mod.parameters())
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


def remember_narrow(model: nn.Module, side: dict) -> None:
    """Quantized linears restored in place of a NarrowLinear keep its original dims (for report and re-save)."""
    layers = get_path(model, spec_for(model).layers)
    for key, entry in side["layers"].items():
        for path, nl in entry.get("narrow", {}).items():
            m = get_path(layers[int(key)], path)
            if not isinstance(m, NarrowLinear):
                m.a3mod_narrow = {k: nl[k] for k in ("orig_in", "orig_out", "kept", "side") if k in nl}


def transformers_class(name) -> type | None:
    """The transformers model class called `name` (BertModel, OPTForCausalLM, ...), or None."""
    cls = getattr(transformers, name, None) if isinstance(name, str) and name else None
    return cls if isinstance(cls, type) and issubclass(cls, PreTrainedModel) else None


def skeleton(class_name: str | None, config) -> nn.Module:
    """The transformers class the sidecar names built from `config`; AutoModelForCausalLM for sidecars that name
    none or a class outside transformers."""
    cls = transformers_class(class_name)
    return cls._from_config(config) if cls is not None else AutoModelForCausalLM.from_config(config)


def get_path_tensor(model: nn.Module, key: str) -> torch.Tensor:
    mod_path, _, name = key.rpartition(".")
    return getattr(get_path(model, mod_path) if mod_path else model, name)


def attach_latent_rotary(model: nn.Module) -> None:
    """Latent-KV attention modules read RoPE from the model's rotary module: hand it to each."""
    latent = [m for m in model.modules() if isinstance(m, LatentKVAttention)]
    spec = spec_for(model) if latent else None
    if latent and spec.rotary and latent[0].rot_dim:
        for m in latent:
            m.attach_rotary(get_path(model, spec.rotary))


def check_indices(model: nn.Module) -> None:
    """The index buffers loaded from a weights file point inside the original dims: every attention's kept RoPE dims
    (`rope_index`) lie in [0, the model's rotary dims). CheckpointError naming the module otherwise."""
    spec = spec_for(model)
    rot = dims_of(model.config, spec).rot_dim
    for name, m in model.named_modules():
        idx = getattr(m, "rope_index", None) if isinstance(m, ReducedHeadAttention) else None
        if idx is not None and idx.numel() and not idx.is_meta and (int(idx.min()) < 0 or int(idx.max()) >= rot):
            raise CheckpointError(f"{name}.rope_index holds [{int(idx.min())}, {int(idx.max())}], outside the "
                                  f"model's {rot} rotary dims (a corrupted or edited weights file)")
