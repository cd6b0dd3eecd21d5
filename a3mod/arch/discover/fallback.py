"""Discovery, part 5: `Discovery.to_spec` (an `ArchSpec` from the roles) and the `arch.spec_for` fallback for model
types without an adapter (`discovered_spec`, cached per model class and config)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from ...errors import DiscoveryError
from .describe import find_layers, layer_signature, discover
from .types import Discovery, LayerDiscovery

# -------------------------------------------------------------------------------------- ArchSpec
def _rel(path: str, parent: str) -> str:
    return path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path


def spec_from_discovery(r: Discovery):
    from ..spec import ArchSpec

    fields = {f.name for f in dataclasses.fields(ArchSpec)}
    d = r.layers[0]
    others = [e.index for e in r.layers if _spec_key(e) != _spec_key(d)]
    if others:
        raise DiscoveryError(f"layers {others} differ in structure from layer {d.index}; an ArchSpec describes one "
                             "layout")
    dm = next((e for e in r.layers if e.up is not None), None)      # the MLP roles: a dense layer or shared expert
    moe = next((e for e in r.layers if e.moe), None)
    for e in r.layers:
        if dm is not None and e.up is not None and _mlp_key(e) != _mlp_key(dm):
            raise DiscoveryError(f"layer {e.index}'s MLP differs from layer {dm.index}'s ({_mlp_key(e)} vs "
                                 f"{_mlp_key(dm)}); an ArchSpec describes one layout")
        if moe is not None and e.moe and _moe_key(e) != _moe_key(moe):
            raise DiscoveryError(f"layer {e.index}'s MoE block differs from layer {moe.index}'s")
        if moe is not None and not e.moe and e.mlp_module != moe.moe:
            raise DiscoveryError(f"dense layer {e.index} keeps its MLP at {e.mlp_module!r}, the MoE layers theirs "
                                 f"at {moe.moe!r}: an ArchSpec describes one place")
    if dm is not None:       # the MLP facts below come from the layer that has them
        d = dataclasses.replace(d, **{f: getattr(dm, f) for f in _MLP_FIELDS})

    def need(cond: bool, what: str, field: str):
        if cond and field not in fields:
            raise DiscoveryError(f"{r.model_type!r}: discovered {what}, which ArchSpec cannot express yet "
                                 f"(no field {field!r})")

    problems = []
    if d.qkv_layout == "other":
        problems.append(f"q/k/v channel layout of {d.q.module}/{d.k.module}/{d.v.module} is neither separate, "
                        "[q|k|v] blocks nor per-head (H, 3, d_h)")
    if d.rope == "other":
        problems.append("RoPE pairs channels in a layout that is neither rotate_half nor interleaved")
    if d.rope and d.rope_source != "position_embeddings":
        problems.append("RoPE cos/sin are computed inside the layer, not passed in as position_embeddings")
    if d.rope and r.rotary is None:
        problems.append("no module of the model produces the layers' (cos, sin)")
    if d.rope and r.rope_table not in (None, "half", "interleaved", "sin_cos"):
        problems.append("the (cos, sin) table is neither cat(freqs, freqs), interleaved nor (sin, cos) halves")
    if d.gate_up_layout not in (None, "[gate|up]"):
        problems.append(f"fused gate/up layout {d.gate_up_layout}")
    if d.v_head_dim != d.head_dim:
        problems.append(f"value head dim {d.v_head_dim} != query/key head dim {d.head_dim}")
    if d.up is not None and d.act_config is None and d.act_name is None:
        problems.append(f"no config attribute names the MLP activation {d.act}")
    literal_scale = d.scaling_attr is None and abs(d.head_dim ** -0.5 - d.scale) > 1e-6 * d.scale
    if d.scaling_attr is not None and abs(d.scaling_attr - d.scale) > 1e-6 * d.scale:
        problems.append(f"score scale {d.scale:g} differs from the attention module's scaling "
                        f"({d.scaling_attr if d.scaling_attr is not None else 'none, i.e. 1/sqrt(d_h)'})")
    if d.softcap is not None and d.softcap_attr is None:
        problems.append(f"no attribute of the attention module holds the softcap {d.softcap:g}")
    if problems:
        raise DiscoveryError(f"{r.model_type!r}: discovered the layer roles but they do not fit an ArchSpec: "
                             + "; ".join(problems))
    need(d.qkv_layout == "per_head", "a per-head fused q/k/v layout", "qkv_layout")
    need(d.gate_up_layout is not None, "a fused gate_up projection", "gate_up")
    need(d.q_norm is not None, "q/k norms", "qk_norm")
    need(d.softcap is not None, "an attention logit softcap", "softcap")
    attn = d.attn_module
    mlp = d.mlp_module if d.up is not None else None
    kw: dict[str, Any] = dict(layers=r.layers_path, attn=attn, mlp=moe.moe if moe else mlp, conv1d=d.q.conv1d,
                              rope=d.rope, rotary=r.rotary if d.rope else None, rope_table=r.rope_table or "half")
    if moe is not None:
        kw.update(experts=_rel(moe.experts, moe.moe), shared=moe.shared and _rel(moe.shared, moe.moe))
    if d.up is not None:
        kw["down"] = _rel(d.down.module, mlp)
        kw.update(act=d.act_config) if d.act_config else kw.update(act_name=d.act_name)
    if literal_scale:           # no attribute holds it (GPT-Neo scores unscaled): the graph's scale, self-checked
        kw["scaling"] = d.scale
    if d.qkv_layout is None:
        kw.update(q=_rel(d.q.module, attn), k=_rel(d.k.module, attn), v=_rel(d.v.module, attn), qkv=None)
    else:
        kw.update(q=None, k=None, v=None, qkv=_rel(d.q.module, attn))
        if d.qkv_layout == "per_head":
            kw["qkv_layout"] = "per_head"
    if d.o.module.startswith(attn + ".") or not attn:
        kw["o"] = _rel(d.o.module, attn)
    else:
        need(True, f"an output projection {d.o.module} outside the attention module {attn}", "o_from_layer")
        kw.update(o=d.o.module, o_from_layer=True)
    if d.up is None:
        pass
    elif d.gate_up_layout is not None:
        kw.update(gate=None, gate_up=_rel(d.up.module, mlp))
    else:
        kw.update(gate=_rel(d.gate.module, mlp) if d.gate else None, up=_rel(d.up.module, mlp))
    if d.q_norm:
        kw.update(qk_norm=d.qk_norm_scope, qk_norm_names=(_rel(d.q_norm, attn), _rel(d.k_norm, attn)))
    if d.softcap is not None:
        kw["softcap"] = d.softcap_attr
    norms = (d.input_norm or d.attn_out_norm, d.mlp_norm or d.mlp_out_norm)
    if d.output_norm and not d.input_norm:
        norms = (d.mlp_norm, d.output_norm)
    if all(norms):
        kw["norms"] = norms
    drops = (d.attn_dropout_module, d.mlp_dropout_module)
    if "dropouts" in fields and all(drops) and drops[0].startswith(attn + ".") and (
            not mlp or drops[1].startswith(mlp + ".")):
        kw["dropouts"] = (_rel(drops[0], attn), _rel(drops[1], mlp))
    if any(not (c.conv1d == d.q.conv1d) for c in (d.k, d.v, d.o, d.up, d.down) if c is not None):
        raise DiscoveryError(f"{r.model_type!r}: projections mix nn.Linear and Conv1D weight layouts")
    return ArchSpec(**{k: v for k, v in kw.items() if k in fields})


def _spec_key(d: LayerDiscovery) -> tuple:
    """The attention's structure (the MLP's is `_mlp_key`: MoE models mix dense and expert layers)."""
    return (d.q.module, d.k.module, d.v.module, d.o.module, d.qkv_layout, d.rope, d.rot_dim, d.q_norm)


_MLP_FIELDS = ("gate", "up", "down", "gate_up_layout", "act", "act_config", "act_name", "mlp_dropout_module")


def _mlp_key(d: LayerDiscovery) -> tuple:
    """The MLP's roles relative to the module holding them (a dense layer's MLP or an MoE block's shared expert)."""
    m = d.mlp_module
    return (d.gate and _rel(d.gate.module, m), _rel(d.up.module, m), _rel(d.down.module, m), d.gate_up_layout,
            d.act_config, d.act_name)


def _moe_key(d: LayerDiscovery) -> tuple:
    return (d.moe, d.experts, d.shared)



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
        spec = result.to_spec()
        _check_dims(model, spec, result.layers[0])
    except DiscoveryError as e:
        raise DiscoveryError(f"{context}{'; ' if context else ''}graph discovery could not describe it: {e}") from e
    if key is not None:
        SPECS[key] = spec
    return spec


def _mla_spec(model: nn.Module):
    """An ArchSpec for a model whose layers hold multi-head latent attention (`arch.mla.is_mla`: DeepSeek-style
    q(_b)_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj), read from the module structure, MoE blocks included; the
    full-rank self-check (a3mod.pipeline.verify) confirms it before anything is compressed. None for other models."""
    from ..mla import is_mla
    from ..spec import ArchSpec
    from .describe import find_moe

    try:
        path, layers = find_layers(model)
    except DiscoveryError:
        return None
    attn = next((n for layer in layers for n, c in layer.named_children() if is_mla(c)), None)
    if attn is None or any(hasattr(layer.get_submodule(attn), "indexer") for layer in layers
                           if hasattr(layer, attn)):
        return None          # DeepSeek sparse attention (an indexer beside MLA) is refused by _unmodelled
    moe = next((m for layer in layers if (m := find_moe(layer)) is not None), None)
    rotary = next((n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] == "rotary_emb"), None)
    return ArchSpec(layers=path, attn=attn, mlp=moe[0] if moe else "mlp", q=None, k=None, v=None, gate="gate_proj",
                    mla=True, rotary=rotary, experts=moe and _rel(moe[1], moe[0]),
                    shared=moe[2] and _rel(moe[2], moe[0]) if moe else None)


def _unmodelled(model: nn.Module) -> str | None:
    """A feature a3mod knows it does not model yet, named before discovery tries (and fails less clearly)."""
    c = getattr(model, "config", None)
    try:
        rank = getattr(c, "kv_lora_rank", None)
    except Exception:       # noqa: BLE001  (a heterogeneous per-layer config refuses global reads)
        rank = None
    if isinstance(rank, int) and rank > 0:
        if any(n.rsplit(".", 1)[-1] == "indexer" for n, _ in model.named_modules()):
            return (f"multi-head latent attention with a sparse-attention indexer (DeepSeek-V3.2 DSA, kv_lora_rank="
                    f"{rank}): the indexer's own projections are not modelled yet")
        return (f"multi-head latent attention (MLA: kv_lora_rank={rank}) in a layout a3mod does not read (expected "
                "q(_b)_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)")
    if any(hasattr(m, "attn_temperature_tuning") and hasattr(m, "use_rope") for m in model.modules()):
        return ("Llama 4 attention (RoPE as complex frequencies, an L2 q/k norm after it, NoPE layers with "
                "temperature-tuned queries, chunked attention) is not supported yet")
    sinks = next((n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "sinks"), None)
    if sinks is not None:
        return f"attention sinks ({sinks}: a learned per-head logit in the softmax) are not supported yet"
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
    from ..spec import dims_of

    try:
        dims = dims_of(model.config, spec)
    except AttributeError as e:
        raise DiscoveryError(f"the config lacks a standard attribute for the head geometry ({e})") from e
    got = (dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.rot_dim)
    want = (d.hidden, d.heads, d.kv_heads, d.head_dim, d.rot_dim)
    if got != want:
        names = "hidden, heads, kv_heads, head_dim, rot_dim"
        raise DiscoveryError(f"the config reads ({names}) = {got}, the graph shows {want}")
