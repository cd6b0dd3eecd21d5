"""Discovery, part 6: the `arch.spec_for` fallback for model types without an adapter (`discovered_spec`, cached
per model class and config)."""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...errors import DiscoveryError
from ..mla import is_mla
from ..spec import ArchSpec, dims_of, get_path, layer_rot_dim
from .describe import discover, find_layers, find_moe, layer_signature
from .tospec import rel

if TYPE_CHECKING:
    from .types import LayerDiscovery

# ------------------------------------------------------------------------------- arch.spec_for fallback
SPECS: dict = {}       # (model class, config JSON) -> ArchSpec: discovery runs once per architecture


def clear_spec_cache() -> None:
    """Forget every discovered spec (the next spec_for discovers again, as a fresh process would)."""
    SPECS.clear()


def discovered_spec(model: nn.Module, context: str = ""):
    """The `ArchSpec` graph discovery builds for a model type without an explicit adapter (cached per model
    class and config, so a compressed model keeps the spec of its original). `DiscoveryError` otherwise."""
    key = _cache_key(model)
    if key is not None and key in SPECS:
        return SPECS[key]
    spec = _mla_spec(model)
    if spec is not None:        # latent attention: described by structure (the graph replay cannot follow it)
        if key is not None:
            SPECS[key] = spec
        return spec
    missing = _unmodelled(model)
    if missing:
        raise DiscoveryError(f"{context}{'; ' if context else ''}graph discovery could not describe it: {missing}")
    try:
        result = discover(_stand_in(model))
        spec = with_param_facts(model, result.to_spec(), result.layers[0].heads)
        ref = next((e for e in result.layers if e.rope), result.layers[0])
        _check_dims(model, spec, ref)
    except DiscoveryError as e:
        raise DiscoveryError(f"{context}{'; ' if context else ''}graph discovery could not describe it: {e}") from e
    if key is not None:
        SPECS[key] = spec
    return spec


def with_param_facts(model: nn.Module, spec: ArchSpec, heads: int) -> ArchSpec:
    """`spec` with the attention's per-head parameters the graph replay does not name: `sinks` (a learned logit per
    head as one more softmax column: gpt-oss, MiMo-V2, Granite-SWA, Flint; the graph shows a concatenated score
    column) and `attn_gate_bias` (a per-head bias on the output gate: Beam). The full-rank self-check confirms both."""
    for layer in get_path(model, spec.layers):
        try:
            attn = layer.get_submodule(spec.attn)
        except AttributeError:          # a hybrid's mixer layer
            continue
        for name, p in attn.named_parameters(recurse=False):
            if "sink" in name and tuple(p.shape) == (heads,):
                return replace(spec, sinks=name)
            if spec.attn_gate and "gate" in name and "bias" in name and tuple(p.shape) == (heads,):
                spec = replace(spec, attn_gate_bias=name)      # a per-head bias on the output gate (Beam)
    return spec


def _mla_spec(model: nn.Module):
    """An ArchSpec for a model whose layers hold multi-head latent attention (`arch.mla.is_mla`: DeepSeek-style
    q(_b)_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj), read from the module structure, MoE blocks included; the
    full-rank self-check (a3mod.pipeline.verify) confirms it before anything is compressed. None for other models."""
    try:
        path, layers = find_layers(model)
    except DiscoveryError:
        return None
    attn = next((n for layer in layers for n, c in layer.named_children() if is_mla(c)), None)
    if attn is None or _mla_extras(layers, attn):
        return None          # parts a3mod does not model (an output gate, a gated query) are refused by _unmodelled
    moe = next((m for layer in layers if (m := find_moe(layer)) is not None), None)
    rotary = next((n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "rotary_emb"), None)
    return ArchSpec(layers=path, attn=attn, mlp=moe[0] if moe else "mlp", q=None, k=None, v=None, gate="gate_proj",
                    mla=True, rotary=rotary, experts=moe and rel(moe[1], moe[0]),
                    shared=moe[2] and rel(moe[2], moe[0]) if moe else None)


# the parts of DeepSeek-style latent attention a3mod reads or leaves whole: DeepSeek sparse attention's indexer reads
# the layer input and q_a's output only (its own projections), so it stays as it is and the rest is compressed
_MLA_PARTS = {"q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
              "o_proj", "indexer", "rotary_emb"}


def _mla_extras(layers, attn: str) -> list[str]:
    """Children with parameters of the latent attention modules that are not `_MLA_PARTS`."""
    mods = [m for layer in layers if is_mla(m := getattr(layer, attn, None))]     # not a hybrid's other mixers
    return sorted({n for m in mods for n, c in m.named_children()
                   if n not in _MLA_PARTS and any(True for _ in c.parameters()) and not _head_gate(c, m)})


def _head_gate(c: nn.Module, mla: nn.Module) -> bool:
    """A linear emitting one value per head (Ling 3's head-wise output gate, attn_out * sigmoid(g) per head): it
    scales each head's output as a whole, which commutes with A3OV's per-head rotation of MLA's value dims (and the
    statistics see the gated outputs); the self-check confirms the description."""
    return isinstance(c, nn.Linear) and c.out_features == getattr(mla, "num_heads", -1)


def _unmodelled(model: nn.Module) -> str | None:
    """A feature a3mod knows it does not model yet, named before discovery tries (and fails less clearly)."""
    c = getattr(model, "config", None)
    try:
        rank = getattr(c, "kv_lora_rank", None)
    except Exception:       # noqa: BLE001  (a heterogeneous per-layer config refuses global reads)
        rank = None
    if isinstance(rank, int) and rank > 0:
        try:
            path, layers = find_layers(model)
        except DiscoveryError:
            layers = []
        attn = next((n for layer in layers for n, c in layer.named_children() if is_mla(c)), None)
        extras = _mla_extras(layers, attn) if attn else []
        if extras:
            return (f"multi-head latent attention with parts a3mod does not model yet ({', '.join(extras)}: e.g. an "
                    f"output gate, which A3OV's rotation of the value dims does not commute with)")
        return (f"multi-head latent attention (MLA: kv_lora_rank={rank}) in a layout a3mod does not read (expected "
                "q(_b)_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)")
    if any(hasattr(m, "attn_temperature_tuning") and hasattr(m, "use_rope") for m in model.modules()):
        return ("Llama 4 attention (RoPE as complex frequencies, an L2 q/k norm after it, NoPE layers with "
                "temperature-tuned queries, chunked attention) is not supported yet")
    return None


def _stand_in(model: nn.Module) -> nn.Module:
    """What to discover: the model itself, or for a meta-device skeleton (as `a3mod.load` builds) or a model
    already holding a3mod's compact modules (not traceable, and not the original roles) a small CPU probe of
    the original architecture."""
    compact = any(type(m).__module__.startswith("a3mod.") for m in model.modules())
    if compact:
        try:
            with torch.device("meta"):
                model = getattr(type(model), "a3mod_base", type(model))(model.config)   # the dense original
        except Exception as e:
            raise DiscoveryError(f"the model holds a3mod's compact modules and {type(model).__name__}(config) "
                                 f"could not rebuild the original to discover it: {e}") from e
    return _probe(model) if compact or any(p.is_meta for p in model.parameters()) else model


def _probe(model: nn.Module) -> nn.Module:
    """A CPU stand-in for a meta-device skeleton (as `a3mod.load` builds): the same modules with the shortest prefix
    of decoder layers holding every distinct layer structure (one layer unless the model is a hybrid), random
    weights. Discovery only needs the graph, not the values."""
    path, layers = find_layers(model)
    kinds = {layer_signature(m) for m in layers}
    n = next(i + 1 for i in range(len(layers)) if {layer_signature(m) for m in list(layers)[: i + 1]} == kinds)
    probe = copy.deepcopy(model)                       # meta tensors: no memory
    parent, _, name = path.rpartition(".")
    owner = probe.get_submodule(parent) if parent else probe
    setattr(owner, name, nn.ModuleList(list(getattr(owner, name))[:n]))
    probe.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(probe.parameters()) + list(probe.buffers()):
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
            else:
                t.zero_()
        try:            # computed buffers (rotary inv_freq, GPT-J's sin/cos table) as the model's own init makes them
            probe.init_weights()
        except Exception:   # noqa: BLE001  (a model without HF init keeps the random buffers: graph only)
            pass
    return probe.eval()


def _cache_key(model: nn.Module):
    to_json = getattr(getattr(model, "config", None), "to_json_string", None)
    try:
        return (type(model), to_json(use_diff=False)) if to_json else None
    except (TypeError, ValueError):
        return None


def _check_dims(model: nn.Module, spec, d: LayerDiscovery) -> None:
    """The rest of a3mod reads head geometry from the config (`arch.dims_of`): it must agree with the graph."""
    try:
        dims = dims_of(model.config, spec)
    except AttributeError as e:
        raise DiscoveryError(f"the config lacks a standard attribute for the head geometry ({e})") from e
    got = (dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, layer_rot_dim(model.config, d.index, dims))
    want = (d.hidden, d.heads, d.kv_heads, d.head_dim, d.rot_dim)
    if got != want:
        names = "hidden, heads, kv_heads, head_dim, rot_dim"
        raise DiscoveryError(f"the config reads ({names}) = {got}, the graph shows {want}")
