"""Codecs: one entry per kind of compact module a compressed model can hold, and the only place that knows how each
kind is described in a checkpoint (a3mod.json / config.json) and rebuilt from that description.

A codec has a `key` (its name in a layer's description), and three functions over one decoder layer (a `Site`):
    describe(site) -> dict | None     the kind's entry for this layer, None when the layer holds none
    validate(entry, path)             schema check of an entry read from a file (CheckpointError naming the field)
    build(site, entry)                swap the described module into a skeleton layer (weights come later)
`describe_layer`, `validate_entry` and `build_layer` run every registered codec in order; checkpoint, native,
streaming and the report iterate them instead of knowing the kinds.

How to add a kind of compact module (the worked example is ReducedMLP):
    1. a frozen config dataclass beside the module (modules/mlp.py: `MLPConfig`), its fields declared with
       `modules.configs.spec(kind=..., lo=..., le=..., choices=..., omit_default=..., only=...)`; rules tying
       fields together go in its __post_init__ (raise ConfigError(field, value, problem));
    2. the module takes it as its constructor argument and keeps it as `self.cfg`; its describe() is
       `{**to_entry(self.cfg), <its state: kept indices>}`;
    3. a codec here: describe reads the module, validate is `check_config(MLPConfig, entry, path, ...)` plus its
       state's checks, build is `ReducedMLP(from_entry(MLPConfig, entry), ...)`; `register(Codec("mlp", ...))`.
    Nothing else: save, load, from_pretrained, save_pretrained and streaming pick it up from the registry.
A new feature of an existing kind is one config field (its type, range and default are its schema and what is
written) plus the module's forward: `AttentionConfig.sinks` is `spec(False, kind="bool", omit_default=True,
only=True)` and the few lines of the forward that add the sink column.

Two forms of a description: a3mod.json holds the full one (every kept index: provenance and a cross-check of the
weights), config.json the slim one (`slim_layer`: dims and small facts only, so a 0.5B model's config stays small;
the kept RoPE dims are the attention's `rope_index` buffer in the weights, kept neurons are not needed once the
weights are sliced). A module built from a slim entry records its kept neurons as unknown (None).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..arch import ArchSpec, Dims, find_path, get_path, mlp_paths, set_child
from ..arch.experts import ExpertsView, narrowed
from ..arch.mla import is_mla, narrowed_mla
from ..modules import LatentKVAttention, LowRankLinear, NarrowLinear, ReducedHeadAttention, ReducedMLP
from ..modules.attention import AttentionConfig
from ..modules.latent_kv import LatentKVConfig
from ..modules.lowrank import LowRankConfig
from ..modules.mlp import MLPConfig
from ..modules.configs import from_entry, to_entry
from ..modules.inplace import ExpertsConfig, MLAConfig, mla_config
from ..modules.linears import QuantizedLinearConfig, linear_shape, quantized_config, quantized_linears
from ..modules.narrow import NarrowConfig
from .schema import PATH, check_config, fail, indices, keys


@dataclass
class Site:
    """One decoder layer: where codecs read (describe) and build. `rope` collects, by module path in the model, the
    kept RoPE dims a built attention must hold once its weights are loaded."""
    layer: nn.Module
    spec: ArchSpec
    index: int = 0
    config: Any = None
    dims: Dims | None = None
    device: Any = None
    dtype: Any = None
    rope: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def attn(self) -> nn.Module | None:
        return find_path(self.layer, self.spec.attn)


@dataclass(frozen=True)
class Codec:
    key: str
    describe: Callable[[Site], dict | None]
    validate: Callable[[Any, str], None]
    build: Callable[[Site, dict], None] | None = None      # None: rebuilt elsewhere (quantized: from its tensors)
    slim: Callable[[dict], dict] | None = None            # the entry without index lists (config.json), None: same


CODECS: dict[str, Codec] = {}        # build order: whole modules first, then linears inside them
EXCLUSIVE = (("attn", "latent_attn"),)


def register(codec: Codec) -> Codec:
    CODECS[codec.key] = codec
    return codec


def describe_layer(layer: nn.Module, spec: ArchSpec) -> dict:
    """The description of one decoder layer: each kind's entry. Empty for an untouched layer."""
    site = Site(layer, spec)
    return {c.key: e for c in CODECS.values() if (e := c.describe(site))}


def validate_entry(entry: dict, path: str, slim: bool = False) -> None:
    """Check a layer's entry; `slim`: the config.json form, whose index lists may be absent."""
    keys(entry, path, (), tuple(CODECS))
    for a, b in EXCLUSIVE:
        if a in entry and b in entry:
            fail(path, f"has both {a} and {b}")
    for c in CODECS.values():
        if c.key in entry:
            e = entry[c.key]
            if slim and c.key == "attn" and isinstance(e, dict) and "rope_index" not in e:
                e = {**e, "rope_index": [[0] * e.get("rot_dim", 0)] * e.get("kv_heads", 0)}    # in the weights
            c.validate(e, f"{path}.{c.key}")


def slim_layer(entry: dict) -> dict:
    """The config.json form of a layer's entry: each kind's entry without its index lists."""
    return {k: (CODECS[k].slim(e) if CODECS[k].slim else e) for k, e in entry.items()}


def build_layer(site: Site, entry: dict) -> None:
    """Swap every module `entry` describes into the skeleton layer (ValueError / KeyError / ... on a description
    that does not fit the layer; the caller names the file)."""
    for c in CODECS.values():
        if c.key in entry and c.build is not None:
            c.build(site, entry[c.key])


# ------------------------------------------------------------------------------------------ schemas
def _attn(a: dict, path: str) -> None:
    """The entry of a ReducedHeadAttention: its AttentionConfig (checked from the dataclass) and its kept RoPE dims."""
    check_config(AttentionConfig, a, path, required=("rope_index",))
    idx = a["rope_index"]
    if not isinstance(idx, list):
        fail(f"{path}.rope_index", f"must be a list, got {type(idx).__name__}")
    flat = [x for row in idx for x in (row if isinstance(row, list) else [row])]
    indices(flat, f"{path}.rope_index", a["kv_heads"] * a["rot_dim"], a["head_dim"], ascending=False)


def _latent(a: dict, path: str) -> None:
    """The entry of a LatentKVAttention: its LatentKVConfig (checked from the dataclass)."""
    check_config(LatentKVConfig, a, path)

def _mlp(m: dict, path: str) -> None:
    """The entry of a ReducedMLP: its MLPConfig (checked from the dataclass) and the neurons it kept (or None)."""
    check_config(MLPConfig, m, path, required=("kept",))
    if m["kept"] is not None:
        indices(m["kept"], f"{path}.kept", m["inter"], m["orig_inter"], ascending=True)


def _experts(x: dict, path: str) -> None:
    """Routed experts narrowed in place: an ExpertsConfig (checked from the dataclass) and its state, `kept` (one
    ascending index list per expert, or absent where not recorded) and `fallback` (expert indices). An entry of
    format 1 gives `kept` without `experts` / `width`: read as the lists' count and length."""
    x = _experts_entry(x, path)
    check_config(ExpertsConfig, x, path, optional=("kept", "fallback"))
    for j, r in enumerate(x.get("kept") or []):
        indices(r, f"{path}.kept[{j}]", x["width"], x["orig_inter"], ascending=True)
    if "fallback" in x:
        indices(x["fallback"], f"{path}.fallback", None, x["experts"], ascending=True)


def _experts_entry(x, path: str):
    """The entry with `experts` / `width` filled in from `kept` where only that was written (format 1)."""
    if not (isinstance(x, dict) and "kept" in x and "experts" not in x and "width" not in x):
        return x
    kept = x["kept"]
    if not (isinstance(kept, list) and kept and all(isinstance(r, list) for r in kept)):
        fail(f"{path}.kept", "must be a non-empty list (one per expert) of neuron index lists")
    if any(len(r) != len(kept[0]) for r in kept):
        fail(f"{path}.kept", "every expert keeps the same number of neurons")
    return {**x, "experts": len(kept), "width": len(kept[0])}


def _quantized(d, path: str) -> None:
    """{module path: QuantizedLinearConfig entry}."""
    keys(d, path, (), tuple(d) if isinstance(d, dict) else ())
    for p, e in d.items():
        if not PATH.match(p):
            fail(path, f"names {p!r}, which is not a module path")
        check_config(QuantizedLinearConfig, e, f"{path}.{p}")


def _narrow(d, path: str) -> None:
    """{module path: NarrowConfig entry + the kept indices of its narrowed side (or None)}."""
    keys(d, path, (), tuple(d) if isinstance(d, dict) else ())
    for p, e in d.items():
        if not PATH.match(p):
            fail(path, f"names {p!r}, which is not a module path")
        q = f"{path}.{p}"
        check_config(NarrowConfig, e, q, required=("kept",))
        side = from_entry(NarrowConfig, e).side
        if e["kept"] is not None:
            indices(e["kept"], f"{q}.kept", e[f"{side}_features"], e[f"orig_{side}"], ascending=True)

def _describe_attn(site: Site) -> dict | None:
    a = site.attn
    return a.describe() if isinstance(a, ReducedHeadAttention) else None


def _build_attn(site: Site, entry: dict) -> None:
    a = dict(entry)
    rows = a.pop("rope_index", None)            # absent in config.json: the buffer comes with the weights
    if rows is None:
        rows = [[0] * a["rot_dim"]] * a["kv_heads"]
    idx = torch.tensor(rows, dtype=torch.long, device="cpu")
    if idx.numel() != a["kv_heads"] * a["rot_dim"]:
        raise ValueError(f"rope_index has {idx.numel()} entries, kv_heads x rot_dim = "
                         f"{a['kv_heads']} x {a['rot_dim']}")
    idx = idx.reshape(a["kv_heads"], a["rot_dim"])
    if idx.numel() and int(idx.max()) >= site.dims.rot_dim:
        raise ValueError(f"rope_index holds {int(idx.max())}, outside the model's {site.dims.rot_dim} rotary dims")
    norms = {}
    if a.get("qk_norm"):     # the skeleton's own q/k norm modules (their weights come with the file)
        old = get_path(site.layer, site.spec.attn)
        norms = dict(zip(("q_norm", "k_norm"), (getattr(old, n) for n in site.spec.qk_norm_names)))
    attn = ReducedHeadAttention(site.config, site.index, from_entry(AttentionConfig, a), device=site.device,
                                dtype=site.dtype, **norms)
    if "rope_index" in entry:
        site.rope[f"{site.spec.layers}.{site.index}.{site.spec.attn}"] = idx
    set_child(site.layer, site.spec.attn, attn)


def _describe_latent(site: Site) -> dict | None:
    a = site.attn
    return a.describe() if isinstance(a, LatentKVAttention) else None


def _build_latent(site: Site, entry: dict) -> None:
    set_child(site.layer, site.spec.attn, LatentKVAttention(site.config, site.index, from_entry(LatentKVConfig, entry),
                                                            device=site.device, dtype=site.dtype))


def _describe_mla(site: Site) -> dict | None:
    cfg = mla_config(site.attn)             # latent attention narrowed in place (arch/mla.py)
    return to_entry(cfg) if cfg else None


def _build_mla(site: Site, x: dict) -> None:
    old = get_path(site.layer, site.spec.attn)
    if not is_mla(old):
        raise ValueError(f"an 'mla' entry for a layer whose attention is a {type(old).__name__}")
    cfg = from_entry(MLAConfig, x)
    if (cfg.orig_nope, cfg.orig_v) != (old.qk_nope_head_dim, old.v_head_dim):
        raise ValueError(f"mla orig_nope / orig_v {cfg.orig_nope} / {cfg.orig_v} differ from the model's "
                         f"{old.qk_nope_head_dim} / {old.v_head_dim}")
    set_child(site.layer, site.spec.attn, narrowed_mla(old, None, None, None, None, None, cfg.qk_nope, cfg.v))


# ------------------------------------------------------------------------------------------ MLPs
def _describe_mlp(site: Site) -> dict | None:
    path = mlp_paths(site.layer, site.spec)[0]
    mlp = None if path is None else find_path(site.layer, path)
    return mlp.describe() if isinstance(mlp, ReducedMLP) else None


def _build_mlp(site: Site, entry: dict) -> None:
    m = dict(entry)
    kept = m.pop("kept")
    if kept is not None and not all(0 <= k < m["orig_inter"] for k in kept):
        raise ValueError(f"mlp 'kept' has neuron indices outside [0, orig_inter={m['orig_inter']})")
    mlp = ReducedMLP(from_entry(MLPConfig, m), device=site.device, dtype=site.dtype)
    mlp.kept = kept
    path = mlp_paths(site.layer, site.spec)[0]
    if path is None:
        raise ValueError("an 'mlp' entry for a layer whose MoE block has no shared expert")
    set_child(site.layer, path, mlp)


def _describe_experts(site: Site) -> dict | None:
    """{orig_inter, kept} where the kept neurons are recorded (experts and width are the lists' count and length),
    else the ExpertsConfig {orig_inter, experts, width}; plus `fallback` where some expert fell back."""
    path = mlp_paths(site.layer, site.spec)[1]
    info = path and getattr(get_path(site.layer, path), "a3mod_experts", None)
    if not info:                     # routed experts narrowed in place (arch/experts.py)
        return None
    kept = info.get("kept")
    which = {"orig_inter": info["orig_inter"], "kept": kept} if kept is not None else \
        to_entry(ExpertsConfig(info["orig_inter"], info["experts"], info["width"]))
    return {**which, **({"fallback": info["fallback"]} if info.get("fallback") else {})}


def _slim_experts(x: dict) -> dict:
    return {k: v for k, v in _experts_entry(x, "experts").items() if k != "kept"}


def _build_experts(site: Site, x: dict) -> None:
    path = mlp_paths(site.layer, site.spec)[1]
    if path is None:
        raise ValueError("an 'experts' entry for a layer without routed experts")
    old = get_path(site.layer, path)
    x = _experts_entry(x, "experts")
    cfg = from_entry(ExpertsConfig, x)
    inter = ExpertsView(old, site.dims.hidden).inter
    if inter != cfg.orig_inter:
        raise ValueError(f"experts orig_inter {cfg.orig_inter} differs from the model's {inter}")
    if "kept" in x:
        kept = torch.tensor(x["kept"], dtype=torch.long, device="cpu")
    else:                            # not recorded (config.json): the shapes are what the weights need
        kept = torch.arange(cfg.width, device="cpu").expand(cfg.experts, -1)
    new = narrowed(old, site.dims.hidden, kept, x.get("fallback"))
    if "kept" not in x:
        new.a3mod_experts.update(kept=None, experts=cfg.experts, width=cfg.width)
    set_child(site.layer, path, new)


# ------------------------------------------------------------------------------------------ linears
def _describe_lowrank(site: Site) -> dict | None:
    inside = site.spec.attn + "." if isinstance(site.attn, LatentKVAttention) else None   # described by it
    return {n: m.describe() for n, m in site.layer.named_modules()
            if isinstance(m, LowRankLinear) and not (inside and n.startswith(inside))} or None


def _validate_lowrank(d, path: str) -> None:
    """{module path: LowRankConfig entry}."""
    keys(d, path, (), tuple(d) if isinstance(d, dict) else ())
    for p, e in d.items():
        if not PATH.match(p):
            fail(path, f"names {p!r}, which is not a module path")
        check_config(LowRankConfig, e, f"{path}.{p}")


def _build_linears(cls: type, cfg_cls: type, state: tuple[str, ...] = ()) -> Callable[[Site, dict], None]:
    """build for {module path: entry}: `cls(config, **state)` per path, the config read from the entry
    (`from_entry`), its state (kept indices) passed beside it."""
    def build(site: Site, entry: dict) -> None:
        for path, e in entry.items():
            get_path(site.layer, path)          # the path must exist in the skeleton
            cfg = from_entry(cfg_cls, {k: v for k, v in e.items() if k not in state})
            set_child(site.layer, path, cls(cfg, **{k: e[k] for k in state if k in e}, device=site.device,
                                             dtype=site.dtype))
    return build


def _describe_narrow(site: Site) -> dict | None:
    return {n: _narrow_entry(m) for n, m in site.layer.named_modules()
            if isinstance(m, NarrowLinear) or getattr(m, "a3mod_narrow", None) is not None} or None


def _narrow_entry(m: nn.Module) -> dict:
    """Entry of a NarrowLinear, or of the quantized linear that replaced one (its `a3mod_narrow`)."""
    in_f, out_f = linear_shape(m)
    info = m.narrow_info() if isinstance(m, NarrowLinear) else m.a3mod_narrow
    return dict(in_features=int(in_f), out_features=int(out_f), bias=getattr(m, "bias", None) is not None, **info)


def _describe_quantized(site: Site) -> dict | None:
    """{path: dims} of the quantized linears (their modules are rebuilt from their tensors, quant/io.py)."""
    out = {path: to_entry(quantized_config(m)) for path, m in quantized_linears(site.layer).items()}
    return out or None


register(Codec("attn", _describe_attn, _attn, _build_attn,
               slim=lambda a: {k: v for k, v in a.items() if k != "rope_index"}))
register(Codec("mlp", _describe_mlp, _mlp, _build_mlp, slim=lambda m: {**m, "kept": None}))
register(Codec("mla", _describe_mla, lambda m, path: check_config(MLAConfig, m, path), _build_mla))
register(Codec("experts", _describe_experts, _experts, _build_experts, slim=_slim_experts))
register(Codec("latent_attn", _describe_latent, _latent, _build_latent))
register(Codec("narrow", _describe_narrow, _narrow, _build_linears(NarrowLinear, NarrowConfig, ("kept",)),
               slim=lambda d: {p: {**e, "kept": None} for p, e in d.items()}))
register(Codec("linears", _describe_lowrank, _validate_lowrank, _build_linears(LowRankLinear, LowRankConfig)))
register(Codec("quantized", _describe_quantized, _quantized))
