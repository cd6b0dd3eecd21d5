"""Discovery, part 5: `Discovery.to_spec`: an `ArchSpec` from the roles, or a `DiscoveryError` naming what does not
fit its fields."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from ...errors import DiscoveryError
from ..spec import ArchSpec

if TYPE_CHECKING:
    from .types import Discovery, LayerDiscovery

FIELDS = frozenset(f.name for f in dataclasses.fields(ArchSpec))
_MLP_FIELDS = ("gate", "up", "down", "gate_up_layout", "act", "act_config", "act_name", "mlp_dropout_module")


def rel(path: str, parent: str) -> str:
    return path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path


def spec_from_discovery(r: Discovery) -> ArchSpec:
    d, moe = _reference_layer(r)
    _check_fits(r, d)
    kw = _attention_fields(r, d) | _mlp_fields(d, moe)
    norms = (d.input_norm or d.attn_out_norm, d.mlp_norm or d.mlp_out_norm)
    if d.output_norm and not d.input_norm:
        norms = (d.mlp_norm, d.output_norm)
    if all(norms):
        kw["norms"] = norms
    attn, mlp = kw["attn"], (d.mlp_module if d.up is not None else None)
    drops = (d.attn_dropout_module, d.mlp_dropout_module)
    if "dropouts" in FIELDS and all(drops) and drops[0].startswith(attn + ".") and (
            not mlp or drops[1].startswith(mlp + ".")):
        kw["dropouts"] = (rel(drops[0], attn), rel(drops[1], mlp))
    if any(not (c.conv1d == d.q.conv1d) for c in (d.k, d.v, d.o, d.up, d.down) if c is not None):
        raise DiscoveryError(f"{r.model_type!r}: projections mix nn.Linear and Conv1D weight layouts")
    return ArchSpec(**{k: v for k, v in kw.items() if k in FIELDS})


def _reference_layer(r: Discovery) -> tuple[LayerDiscovery, LayerDiscovery | None]:
    """The layer whose roles the spec states (with the MLP facts of a layer that has a dense MLP or shared expert)
    and the first MoE layer; every layer must share their structure."""
    d = next((e for e in r.layers if e.rope), r.layers[0])     # NoPE layers among RoPE ones: arch.views.applies_rope
    others = [e.index for e in r.layers if spec_key(e) != spec_key(d) and not _nope_of(e, d)]
    if others:
        raise DiscoveryError(f"layers {others} differ in structure from layer {d.index}; an ArchSpec describes one "
                             "layout")
    dm = next((e for e in r.layers if e.up is not None), None)      # the MLP roles: a dense layer or shared expert
    moe = next((e for e in r.layers if e.moe), None)
    for e in r.layers:
        if dm is not None and e.up is not None and mlp_key(e) != mlp_key(dm):
            raise DiscoveryError(f"layer {e.index}'s MLP differs from layer {dm.index}'s ({mlp_key(e)} vs "
                                 f"{mlp_key(dm)}); an ArchSpec describes one layout")
        if moe is not None and e.moe and moe_key(e) != moe_key(moe):
            raise DiscoveryError(f"layer {e.index}'s MoE block differs from layer {moe.index}'s")
        if moe is not None and not e.moe and e.mlp_module != moe.moe:
            raise DiscoveryError(f"dense layer {e.index} keeps its MLP at {e.mlp_module!r}, the MoE layers theirs "
                                 f"at {moe.moe!r}: an ArchSpec describes one place")
    if dm is not None:       # the MLP facts below come from the layer that has them
        d = dataclasses.replace(d, **{f: getattr(dm, f) for f in _MLP_FIELDS})
    return d, moe


def _check_fits(r: Discovery, d: LayerDiscovery) -> None:
    """Raise a DiscoveryError listing every discovered fact no ArchSpec field expresses."""
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
    if d.scaling_attr is not None and abs(d.scaling_attr - d.scale) > 1e-6 * d.scale:
        problems.append(f"score scale {d.scale:g} differs from the attention module's scaling "
                        f"({d.scaling_attr if d.scaling_attr is not None else 'none, i.e. 1/sqrt(d_h)'})")
    if d.softcap is not None and d.softcap_attr is None:
        problems.append(f"no attribute of the attention module holds the softcap {d.softcap:g}")
    if problems:
        raise DiscoveryError(f"{r.model_type!r}: discovered the layer roles but they do not fit an ArchSpec: "
                             + "; ".join(problems))
    for cond, what, field in ((d.qkv_layout == "per_head", "a per-head fused q/k/v layout", "qkv_layout"),
                              (d.gate_up_layout is not None, "a fused gate_up projection", "gate_up"),
                              (d.q_norm is not None, "q/k norms", "qk_norm"),
                              (d.softcap is not None, "an attention logit softcap", "softcap")):
        _need(r, cond, what, field)


def _need(r: Discovery, cond: bool, what: str, field: str) -> None:
    if cond and field not in FIELDS:
        raise DiscoveryError(f"{r.model_type!r}: discovered {what}, which ArchSpec cannot express yet "
                             f"(no field {field!r})")


def _attention_fields(r: Discovery, d: LayerDiscovery) -> dict[str, Any]:
    attn = d.attn_module
    kw: dict[str, Any] = dict(layers=r.layers_path, attn=attn, conv1d=d.q.conv1d, rope=d.rope,
                              rotary=r.rotary if d.rope else None, rope_table=r.rope_table or "half")
    if d.scaling_attr is None and abs(d.head_dim ** -0.5 - d.scale) > 1e-6 * d.scale:
        kw["scaling"] = d.scale  # no attribute holds it (GPT-Neo scores unscaled): the graph's scale, self-checked
    if d.qkv_layout is None:
        kw.update(q=rel(d.q.module, attn), k=rel(d.k.module, attn), v=rel(d.v.module, attn), qkv=None)
    else:
        kw.update(q=None, k=None, v=None, qkv=rel(d.q.module, attn))
        if d.qkv_layout == "per_head":
            kw["qkv_layout"] = "per_head"
    if d.o.module.startswith(attn + ".") or not attn:
        kw["o"] = rel(d.o.module, attn)
    else:
        _need(r, True, f"an output projection {d.o.module} outside the attention module {attn}", "o_from_layer")
        kw.update(o=d.o.module, o_from_layer=True)
    if d.q_norm:
        kw.update(qk_norm=d.qk_norm_scope, qk_norm_names=(rel(d.q_norm, attn), rel(d.k_norm, attn)))
    if d.softcap is not None:
        kw["softcap"] = d.softcap_attr
    if d.out_gate is not None:
        gate, _, act = d.out_gate.partition("@")       # "@softplus": its function (Laguna)
        path, _, head = gate.partition("#")            # "#head": one gate per head (LFM3)
        kw.update(attn_gate="q" if path == "q" else rel(path, attn), attn_gate_head=bool(head),
                  attn_gate_act=act or "sigmoid")
    return kw


def _mlp_fields(d: LayerDiscovery, moe: LayerDiscovery | None) -> dict[str, Any]:
    mlp = d.mlp_module if d.up is not None else None
    kw: dict[str, Any] = dict(mlp=moe.moe if moe else mlp)
    if moe is not None:
        beside = bool(moe.shared) and not moe.shared.startswith(moe.moe + ".")     # on the layer (Granite 4.0-H)
        kw.update(experts=rel(moe.experts, moe.moe), shared=moe.shared if beside else moe.shared and
                  rel(moe.shared, moe.moe), shared_on_layer=beside)
    if d.up is None:
        return kw
    kw["down"] = rel(d.down.module, mlp)
    kw.update(act=d.act_config) if d.act_config else kw.update(act_name=d.act_name)
    if d.gate_up_layout is not None:
        kw.update(gate=None, gate_up=rel(d.up.module, mlp))
    else:
        kw.update(gate=rel(d.gate.module, mlp) if d.gate else None, up=rel(d.up.module, mlp))
    return kw


def _nope_of(e: LayerDiscovery, d: LayerDiscovery) -> bool:
    """`e` is `d` without RoPE or with other rotary dims (a NoPE layer, a layer type with its own partial rotary
    factor: `arch.views.applies_rope` and `arch.spec.layer_rot_dim` say which; the self-check verifies every layer
    whose facts differ, `pipeline.verify.view_key`)."""
    return e.rope in (None, d.rope) and spec_key(dataclasses.replace(e, rope=d.rope, rot_dim=d.rot_dim)) == spec_key(d)


def spec_key(d: LayerDiscovery) -> tuple:
    """The attention's structure (the MLP's is `mlp_key`: MoE models mix dense and expert layers)."""
    return (d.q.module, d.k.module, d.v.module, d.o.module, d.qkv_layout, d.rope, d.rot_dim, d.q_norm, d.out_gate)


def mlp_key(d: LayerDiscovery) -> tuple:
    """The MLP's roles relative to the module holding them (a dense layer's MLP or an MoE block's shared expert)."""
    m = d.mlp_module
    return (d.gate and rel(d.gate.module, m), rel(d.up.module, m), rel(d.down.module, m), d.gate_up_layout,
            d.act_config, d.act_name)


def moe_key(d: LayerDiscovery) -> tuple:
    return (d.moe, d.experts, d.shared)
