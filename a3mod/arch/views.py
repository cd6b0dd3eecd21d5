"""`LayerView`: one decoder layer seen through its adapter (weights by role, normalised), and `layer_views`."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .experts import ExpertsView
from .lookup import spec_for
from .mla import MLAView
from .spec import ArchSpec, Dims, dims_of, get_path, layer_rot_dim, linear_params


@dataclass
class LayerView:
    """One decoder layer seen through its adapter. `q/k/v/o/up/gate/down` give (weight (out,in), bias)."""

    index: int
    layer: nn.Module
    attn: nn.Module | None
    mlp: nn.Module | None
    spec: ArchSpec
    dims: Dims
    left: str | None = None        # why a3mod leaves this layer untouched (a hybrid's mixer layer without an MLP)
    mlp_path: str | None = None    # path of `mlp` from the layer: the dense MLP, or an MoE block's shared expert
    experts: nn.Module | None = None   # an MoE layer's routed experts (a3mod.arch.experts), else None
    experts_path: str | None = None
    mixer: str | None = None       # why the attention part is left (a hybrid's mixer beside a reduced MLP); attn None

    @property
    def has_mlp(self) -> bool:
        """The layer has a dense MLP (or a shared expert) that A3MLP reduces."""
        return self.mlp is not None

    def mla_view(self):
        return MLAView(self.attn)

    def experts_view(self):
        return ExpertsView(self.experts, self.dims.hidden)

    def qkv_params(self):
        """[(Wq, bq), (Wk, bk), (Wv, bv)] with W (out, in) (the query rows only, under an output gate on q)."""
        s = self.spec
        if s.qkv is None:
            (wq, bq), k, (wv, bv) = [linear_params(getattr(self.attn, n), s.conv1d) for n in (s.q, s.k, s.v)]
            if s.attn_gate == "q":
                wq, bq = self.query_of(wq.t()).t(), None if bq is None else self.query_of(bq)
            f = float(getattr(self.attn, s.v_scale, 1.0)) if s.v_scale else 1.0
            if f != 1.0:                 # a constant factor on the values (MiMo-V2): part of v_proj from here on
                wv, bv = wv * f, None if bv is None else bv * f
            return [(wq, bq), k, (wv, bv)]
        w, b = linear_params(getattr(self.attn, s.qkv), s.conv1d)
        ws = self.split_qkv(w.t())
        bs = self.split_qkv(b) if b is not None else [None] * 3
        return [(x.t(), y) for x, y in zip(ws, bs)]

    def split_qkv(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The fused qkv output (..., fused) -> [q (..., H*d_h), k (..., Hkv*d_h), v (..., Hkv*d_h)]."""
        d = self.dims
        if self.spec.qkv_layout == "per_head":      # (..., H, 3, d_h), MHA only
            z = t.unflatten(-1, (d.heads, 3, d.head_dim))
            return [z[..., j, :].flatten(-2) for j in range(3)]
        if self.spec.qkv_layout == "grouped":       # (..., Hkv, g + 2, d_h): each KV group's g queries, key, value
            z = t.unflatten(-1, (d.kv_heads, d.groups + 2, d.head_dim))
            g = d.groups
            return [z[..., :g, :].flatten(-3), z[..., g, :].flatten(-2), z[..., g + 1, :].flatten(-2)]
        if self.spec.qkv_layout != "blocks":
            raise UnsupportedModelError(f"qkv_layout {self.spec.qkv_layout!r}; known: 'blocks', 'per_head', 'grouped'")
        return list(t.split([d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim], dim=-1))

    def query_of(self, t: torch.Tensor) -> torch.Tensor:
        """The q projection's output (..., out) -> the queries (..., H*d_h): under attn_gate "q" each head emits
        [query | gate] (..., H, 2, d_h); otherwise all of it."""
        return self._q_half(t, 0) if self.spec.attn_gate == "q" else t

    def _q_half(self, t: torch.Tensor, j: int) -> torch.Tensor:
        """Half j of each head's [query | gate] channels: (..., H*2*d_h) -> (..., H*d_h)."""
        return t.unflatten(-1, (self.dims.heads, 2, self.dims.head_dim))[..., j, :].flatten(-2)

    def gate_params(self):
        """(W (H*d_h, in), b or None) of the attention's output gate, or None without one."""
        s = self.spec
        if s.attn_gate is None:
            return None
        if s.attn_gate != "q":
            w, b = linear_params(get_path(self.attn, s.attn_gate), s.conv1d)
            if s.attn_gate_bias:            # per head, over each of its gate rows
                hb = getattr(self.attn, s.attn_gate_bias).repeat_interleave(w.shape[0] // self.dims.heads)
                b = hb if b is None else b + hb
            return w, b
        w, b = linear_params(getattr(self.attn, s.q), s.conv1d)
        return self._q_half(w.t(), 1).t(), None if b is None else self._q_half(b, 1)

    def o_params(self):
        return linear_params(self.o_module(), self.spec.conv1d)

    def mlp_params(self):
        """(gate or None, up, down), each (W (out, in), b)."""
        s = self.spec
        if s.gate_up:                                # fused [gate | up] along the output
            w, b = linear_params(get_path(self.mlp, s.gate_up), s.conv1d)
            (wg, wu), (bg, bu) = w.chunk(2, dim=0), (b.chunk(2) if b is not None else (None, None))
            gate, up = (wg, bg), (wu, bu)
        else:
            gate = linear_params(get_path(self.mlp, s.gate), s.conv1d) if s.gate else None
            up = linear_params(get_path(self.mlp, s.up), s.conv1d)
        return gate, up, linear_params(self.down_module(), s.conv1d)

    def qkv_modules(self) -> list[nn.Module]:
        s = self.spec
        return [getattr(self.attn, s.qkv)] if s.qkv else [getattr(self.attn, n) for n in (s.q, s.k, s.v)]

    @property
    def has_sinks(self) -> bool:
        """This layer's attention holds the sink logits (MiMo-V2 has them in some layers only)."""
        return self.spec.sinks is not None and getattr(self.attn, self.spec.sinks, None) is not None

    @property
    def qk_norm(self) -> str | None:
        """The q/k norm scope of this layer ("head" / "all"), None without one (Llama 4: only its RoPE layers)."""
        return self.spec.qk_norm if self.qk_norm_modules() is not None else None

    def qk_norm_modules(self) -> tuple[nn.Module, nn.Module] | None:
        """(q_norm, k_norm) of a qk-norm family (when this layer has them), else None."""
        if not self.spec.qk_norm or self.attn is None:
            return None
        mods = tuple(getattr(self.attn, n, None) for n in self.spec.qk_norm_names)
        return None if any(m is None for m in mods) else mods

    def temperature(self) -> tuple[float, float] | None:
        """(attn_scale, floor_scale) of Llama 4's temperature-tuned queries in a NoPE layer, else None."""
        a = self.attn
        if not self.spec.attn_temperature or not getattr(a, "attn_temperature_tuning", False) or self.dims.rot_dim:
            return None
        return float(a.attn_scale), float(a.floor_scale)

    def softcap(self) -> float | None:
        """Attention logit softcap (tanh capping of the scores) or None."""
        s = self.spec.softcap
        return None if s is None else getattr(self.attn, s)

    # --------------------------------------------------------------- facts about the attention and the MLP
    def scaling(self) -> float:
        """The softmax scale: the attention module's `spec.scale_attr`, else the description's literal, else
        1/sqrt(d_h)."""
        s = getattr(self.attn, self.spec.scale_attr, None)
        return float(s if s is not None else self.spec.scaling if self.spec.scaling is not None
                     else self.dims.head_dim ** -0.5)

    def attn_dropout(self) -> float:
        """Dropout on the attention weights: attention_dropout (a float, or an nn.Dropout in Persimmon), GPT-2's
        attn_dropout, OPT / BERT's dropout."""
        return next((dropout_p(self.attn, n) for n in ("attention_dropout", "attn_dropout", "dropout")
                     if getattr(self.attn, n, None) is not None), 0.0)

    def out_dropouts(self) -> tuple[float, float]:
        """Dropout on the attention output and on the MLP output (GPT-2's resid_dropout; train mode only)."""
        return dropout_p(self.attn, self.spec.dropouts[0]), dropout_p(self.mlp, self.spec.dropouts[1])

    def sliding_window(self, config) -> int | None:
        """The attention's own window, else the config's for a layer its `layer_types` call sliding (all layers
        when it has none); 0 means none (Qwen2-MoE without use_sliding_window)."""
        if hasattr(self.attn, "sliding_window"):
            if getattr(self.attn, "is_sliding", None) is False:    # EXAONE 4: the window of sliding layers only
                return None
            return self.attn.sliding_window or None
        types = getattr(config, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) > self.index and "sliding" not in str(types[self.index]):
            return None
        return getattr(config, "sliding_window", None) or None

    def is_causal(self) -> bool:
        return getattr(self.attn, "is_causal", True)

    def o_module(self) -> nn.Module:
        return get_path(self.layer if self.spec.o_from_layer else self.attn, self.spec.o)

    def anchor(self) -> torch.Tensor:
        """The weight whose dtype and device the layer's compact modules take: o_proj's, else (a mixer layer) the
        MLP's down projection's or the routed experts' first parameter."""
        if self.attn is not None:
            return self.o_module().weight
        return self.down_module().weight if self.has_mlp else next(self.experts.parameters())

    def down_module(self) -> nn.Module:
        return get_path(self.mlp, self.spec.down)

    def linear_groups(self) -> dict[str, list[str]]:
        """Projection paths (relative to the layer) grouped by the input they share.

        attn_in: q/k/v (or the fused qkv), attn_out: o, mlp_in: gate/up, mlp_mid: down.
        """
        s = self.spec
        a, m = (lambda n: f"{s.attn}.{n}"), (lambda n: join(self.mlp_path, n))
        gate = [a(s.attn_gate)] if s.attn_gate not in (None, "q") else []
        groups = {"attn_in": [a(s.qkv)] if s.qkv else [a(s.q), a(s.k), a(s.v)] + gate,
                  "attn_out": [s.o if s.o_from_layer else a(s.o)]}
        if self.mixer:       # a hybrid's mixer layer: only its MLP
            groups = {}
        elif s.mla:            # the latent attention's projections of the layer input, and its output
            first = "q_proj" if getattr(self.attn, "q_proj", None) is not None else "q_a_proj"
            groups = {"attn_in": [a(first), a("kv_a_proj_with_mqa")], "attn_out": [a(s.o)]}
        if self.has_mlp:       # an MoE layer's routed experts are not linears; its shared expert is
            groups["mlp_in"] = [m(s.gate_up)] if s.gate_up else [m(s.gate), m(s.up)] if s.gate else [m(s.up)]
            groups["mlp_mid"] = [m(s.down)]
        return groups

    def act_name(self, config) -> str:
        return self.spec.act_name or getattr(config, self.spec.act)


def dropout_p(mod: nn.Module, name: str) -> float:
    """Dropout probability held by `mod.<name>`: an nn.Dropout (GPT-2) or a plain float (StarCoder2)."""
    d = getattr(mod, name, None)
    if isinstance(d, nn.Dropout):
        return float(d.p)
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else 0.0


# model types whose full-attention layers apply no RoPE (NoPE) when the model also has sliding-window layers:
# Cohere2 rotates only in sliding layers with a window; EXAONE 4 in every layer unless the config sets a window
# (Cohere2-MoE also where its attention's `force_rope` is set: dense prefix layers)
# (AFMoE, Flint, Lara-mini: in their sliding layers only, whatever the window)
GLOBAL_NOPE = {"cohere2": "sliding", "cohere2_moe": "sliding", "exaone4": "window", "exaone_moe": "window",
               "kolibri1": "window",
               "afmoe": "local", "flint": "local", "lara_mini": "local"}


def applies_rope(config, index: int, attn: nn.Module | None) -> bool:
    """False for a NoPE layer: the config's `no_rope_layers` (SmolLM3, Llama 4: 1 = RoPE), the attention's own
    `use_rope` flag, no rope parameters for the layer's type (Beam), or a full-attention layer of a GLOBAL_NOPE
    family. Reads the config first, so a compressed model's views agree with the original's."""
    flags = getattr(config, "no_rope_layers", None)
    if isinstance(flags, (list, tuple)) and index < len(flags):
        return bool(flags[index])
    flag = getattr(attn, "use_rope", None)
    if isinstance(flag, (bool, int)):
        return bool(flag)
    types = getattr(config, "layer_types", None) or []
    rp = getattr(config, "rope_parameters", None)         # per layer type, None for a NoPE type (Beam's full layers)
    if isinstance(rp, dict) and index < len(types) and types[index] in rp and rp[types[index]] is None:
        return False
    rule = GLOBAL_NOPE.get(getattr(config, "model_type", None))
    if rule is None:
        return True
    sliding = index < len(types) and types[index] == "sliding_attention"
    window = getattr(config, "sliding_window", None)
    if rule == "local":
        return sliding
    if rule == "sliding":
        return (sliding and window is not None) or bool(getattr(attn, "force_rope", False))
    return window is None or sliding


def layer_views(model: nn.Module) -> list[LayerView]:
    """A `LayerView` for every decoder layer of an (uncompressed) `model`, in order (views[i].index == i). A layer
    without the described attention module (a hybrid's linear-attention, convolution or state-space layer) gets
    a view with `left` saying why; passes, statistics and the report skip it and it is kept as it is."""
    spec = spec_for(model)
    dims = dims_of(model.config, spec)
    views = []
    for i, layer in enumerate(get_path(model, spec.layers)):
        mlp_path, experts_path = mlp_paths(layer, spec)
        mixer, left = mixer_reason(layer, spec), left_reason(layer, spec)
        attn = None if mixer else find_path(layer, spec.attn)
        rot = layer_rot_dim(model.config, i, dims) if applies_rope(model.config, i, attn) else 0    # 0: NoPE
        d = dims if rot == dims.rot_dim else replace(dims, rot_dim=rot)
        kv = kv_heads_of(attn, spec, d)
        d = d if kv == d.kv_heads else replace(d, kv_heads=kv)
        views.append(LayerView(i, layer, attn, None if mlp_path is None else
                               find_path(layer, mlp_path), spec, d, left, mlp_path,
                               None if experts_path is None else find_path(layer, experts_path), experts_path,
                               None if left else mixer))
    if all(v.left or (v.mixer and not spec.attn_whole) for v in views):
        raise UnsupportedModelError(f"no layer of {type(model).__name__} has the attention {spec.attn!r}: "
                                    f"{views[0].left if views else 'no layers'}")
    return views


def mixer_reason(layer: nn.Module, spec: ArchSpec) -> str | None:
    """Why a3mod leaves the attention part of `layer` (a hybrid's linear-attention, convolution or state-space
    mixer: no attention module where the description has it, or one without the described projections), or None."""
    attn = find_path(layer, spec.attn)
    if attn is not None and spec.attn_whole:
        return f"attention kept whole: {spec.attn_whole}"
    if attn is None:
        mixers = ", ".join(f"{n} ({type(m).__name__})" for n, m in layer.named_children()
                           if "norm" not in n.lower() and not n.lower().startswith(("ln", "drop"))
                           and n not in (spec.mlp.split(".")[0], spec.shared if spec.shared_on_layer else None)
                           ) or "none"
        return f"no attention {spec.attn!r} module: a mixer a3mod does not reduce (children: {mixers})"
    names = ["kv_b_proj"] if spec.mla else [spec.qkv] if spec.qkv else [spec.q, spec.k, spec.v]
    names += [] if spec.o_from_layer else [spec.o]
    lacks = [n for n in names if find_path(attn, n) is None]
    if lacks and spec.mlp == spec.attn and has_described_mlp(layer, spec):    # Nemotron-H: one mixer per layer
        return f"an MLP layer ({type(attn).__name__} at {spec.attn!r}): no attention here"
    if not lacks or type(attn).__module__.startswith("a3mod."):    # described, or a3mod's compact attention
        return None
    return (f"its {spec.attn!r} is a {type(attn).__name__} without {', '.join(lacks)}: a mixer a3mod does not "
            f"reduce (a hybrid's linear attention?)")


def left_reason(layer: nn.Module, spec: ArchSpec) -> str | None:
    """Why a3mod leaves `layer` as it is altogether, or None. A mixer layer with the described MLP is not left: its
    MLP is reduced and its mixer kept (`mixer_reason`); an attention layer without an MLP module is left."""
    mixer = mixer_reason(layer, spec)
    if mixer is None:
        return None if find_path(layer, spec.mlp) is not None else (
            f"no MLP {spec.mlp!r} module: a mixer a3mod does not reduce")
    return None if has_described_mlp(layer, spec) else mixer


def has_described_mlp(layer: nn.Module, spec: ArchSpec) -> bool:
    """`layer` holds the MLP the description names: routed experts, or the dense MLP's (or shared expert's) linears
    (an original or a3mod's reduced one)."""
    mlp_path, experts_path = mlp_paths(layer, spec)
    if experts_path is not None:
        return True
    mlp = None if mlp_path is None or not spec.mlp else find_path(layer, mlp_path)
    if mlp is None:
        return False
    if type(mlp).__module__.startswith("a3mod."):
        return True
    names = [spec.gate_up] if spec.gate_up else [n for n in (spec.gate, spec.up) if n]
    return all(find_path(mlp, n) is not None for n in names + [spec.down])


def join(*parts: str | None) -> str:
    """Dotted path of the non-empty parts."""
    return ".".join(p for p in parts if p)


def mlp_paths(layer: nn.Module, spec: ArchSpec) -> tuple[str | None, str | None]:
    """(path of the dense MLP or of an MoE block's shared expert, path of the routed experts) in `layer`; None for
    what the layer does not have. A layer is an MoE layer when its `spec.mlp` block holds `spec.experts`."""
    block = find_path(layer, spec.mlp)
    if block is None or (spec.mlp == spec.attn and _is_attention(block, spec)):    # Nemotron-H's attention layers
        return None, None
    if spec.experts and find_path(block, spec.experts) is not None:
        where, root = (spec.shared, layer) if spec.shared_on_layer else (join(spec.mlp, spec.shared), block)
        shared = where if spec.shared and find_path(root, spec.shared) is not None else None
        return shared, join(spec.mlp, spec.experts)
    return spec.mlp, None


def kv_heads_of(attn: nn.Module | None, spec: ArchSpec, d: Dims) -> int:
    """This layer's K/V heads: a3mod's compact attention says it; else its k projection's width over the head dim
    (MiMo-V2's sliding layers have twice the model's); else the model's."""
    if attn is None or spec.mla or not spec.k:
        return d.kv_heads
    own = getattr(attn, "num_key_value_heads", None)
    if type(attn).__module__.startswith("a3mod.") and isinstance(own, int):
        return own
    k = find_path(attn, spec.k)
    if k is None or not hasattr(k, "out_features"):
        return d.kv_heads
    n, r = divmod(k.out_features, d.head_dim)
    return n if r == 0 and n and d.heads % n == 0 else d.kv_heads


def _is_attention(mod: nn.Module, spec: ArchSpec) -> bool:
    """`mod` is the described attention (its projections, or a3mod's compact attention): where one path holds the
    attention in some layers and the MLP in others (Nemotron-H's `mixer`), an attention layer has no MLP."""
    return any(find_path(mod, n) is not None for n in (spec.q, spec.qkv) if n)


def find_path(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at `path`, or None when `root` has none there."""
    try:
        return get_path(root, path)
    except AttributeError:
        return None


def active(views: list[LayerView]) -> list[LayerView]:
    """The views a3mod compresses (not `left`)."""
    return [v for v in views if not v.left]


def shared_groups(views: list[LayerView]) -> list[list[int]]:
    """Layers that run one block with the same parameters (Zamba2's shared transformer blocks, tied across the
    layers that use them): the indices of each block's uses, when it has several (layers sharing any parameter of
    their attention / MLP are one group). They are solved once, from the statistics of all their uses, and then
    hold the same compact modules (the tie stays)."""
    def params(v):
        return [p for m in (v.mlp, None if v.mixer else v.attn) if m is not None for p in m.parameters()]

    root: dict[int, int] = {}
    owner: dict[int, int] = {}

    def find(i: int) -> int:
        while root[i] != i:
            i = root[i]
        return i
    for v in active(views):
        root.setdefault(v.index, v.index)
        for p in params(v):
            j = owner.setdefault(id(p), v.index)
            root[find(v.index)] = find(j)
    by: dict[int, list[LayerView]] = {}
    for v in active(views):
        by.setdefault(find(v.index), []).append(v)
    groups = [g for g in by.values() if len(g) > 1]
    for g in groups:
        own = [{id(p) for p in params(v)} for v in g]
        if any(o != own[0] for o in own):
            raise UnsupportedModelError(f"layers {[v.index for v in g]} share some but not all parameters of their "
                                        f"attention / MLP: a3mod reduces a block shared whole, or blocks of their own")
        if any(v.attn is not None and not v.mixer for v in g):
            raise UnsupportedModelError(f"layers {[v.index for v in g]} share their attention: a3mod's reduced "
                                        f"attention holds its layer's index (the KV cache), so one module cannot "
                                        f"serve several layers; only shared MLPs are reduced (the attention whole)")
    return [[v.index for v in g] for g in groups]
