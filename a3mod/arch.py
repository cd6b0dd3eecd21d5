"""Architecture knowledge as data: where the layers, projections and norms of each model type live.

This is the only file that knows module names of Hugging Face model families. Everything else works
on the normalised `LayerView` it returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its parts (attribute paths relative to the model / a layer)."""

    layers: str                    # path of the ModuleList of decoder layers, from the model
    attn: str                      # attention module, from a layer
    mlp: str                       # MLP module, from a layer
    q: str | None                  # separate q/k/v projections (from the attention module) ...
    k: str | None
    v: str | None
    qkv: str | None = None         # ... or one fused projection whose output is [q | k | v]
    o: str = "o_proj"              # projection consuming the attention output
    gate: str | None = None        # gated MLP: down(act(gate(x)) * up(x)); else down(act(up(x)))
    up: str = "up_proj"
    down: str = "down_proj"
    act: str = "hidden_act"        # config attribute holding the activation name
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    rope: str | None = "rotate_half"   # RoPE layout: "rotate_half", "interleaved" or None (no RoPE)
    conv1d: bool = False           # weights stored as (in, out) (GPT-2 Conv1D) rather than nn.Linear's (out, in)
    rotary: str | None = "model.rotary_emb"   # the model's rotary embedding (x, position_ids) -> (cos, sin)


_LLAMA = ArchSpec(layers="model.layers", attn="self_attn", mlp="mlp", q="q_proj", k="k_proj", v="v_proj",
                  gate="gate_proj")

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,               # q/k/v biases, o without bias; read from the modules themselves
    "gpt2": ArchSpec(layers="transformer.h", attn="attn", mlp="mlp", q=None, k=None, v=None, qkv="c_attn",
                     o="c_proj", gate=None, up="c_fc", down="c_proj", act="activation_function",
                     norms=("ln_1", "ln_2"), rope=None, conv1d=True, rotary=None),
}


def supported_types() -> list[str]:
    return sorted(ARCHS)


def spec_for(model: nn.Module) -> ArchSpec:
    """The adapter for `model`, or an `UnsupportedModelError` listing the supported types."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in ARCHS:
        raise UnsupportedModelError(
            f"model_type {mtype!r} has no a3mod architecture adapter; supported: {', '.join(supported_types())}")
    return ARCHS[mtype]


def get_path(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


@dataclass
class Dims:
    """Head geometry of one attention layer (original, before compression)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    rot_dim: int                   # rotary dims per head (0 without RoPE; < head_dim for partial rotary)
    rope: str | None

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def dims_of(config, spec: ArchSpec) -> Dims:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    rot = int(hd * getattr(config, "partial_rotary_factor", 1.0)) if spec.rope else 0
    return Dims(config.hidden_size, heads, kv, hd, rot, spec.rope)


def linear_params(mod: nn.Module, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of an nn.Linear or a GPT-2 Conv1D."""
    w = mod.weight.t() if conv1d else mod.weight
    return w, mod.bias


@dataclass
class LayerView:
    """One decoder layer seen through its adapter. `q/k/v/o/up/gate/down` give (weight (out,in), bias)."""

    index: int
    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    spec: ArchSpec
    dims: Dims

    def qkv_params(self):
        """[(Wq, bq), (Wk, bk), (Wv, bv)] with W (out, in)."""
        s, d = self.spec, self.dims
        if s.qkv is None:
            return [linear_params(getattr(self.attn, n), s.conv1d) for n in (s.q, s.k, s.v)]
        w, b = linear_params(getattr(self.attn, s.qkv), s.conv1d)
        sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        ws = w.split(sizes, dim=0)
        bs = b.split(sizes) if b is not None else [None] * 3
        return list(zip(ws, bs))

    def o_params(self):
        return linear_params(getattr(self.attn, self.spec.o), self.spec.conv1d)

    def mlp_params(self):
        """(gate or None, up, down), each (W (out, in), b)."""
        s = self.spec
        gate = linear_params(getattr(self.mlp, s.gate), s.conv1d) if s.gate else None
        return gate, linear_params(getattr(self.mlp, s.up), s.conv1d), linear_params(getattr(self.mlp, s.down), s.conv1d)

    def qkv_modules(self) -> list[nn.Module]:
        s = self.spec
        return [getattr(self.attn, s.qkv)] if s.qkv else [getattr(self.attn, n) for n in (s.q, s.k, s.v)]

    def o_module(self) -> nn.Module:
        return getattr(self.attn, self.spec.o)

    def down_module(self) -> nn.Module:
        return getattr(self.mlp, self.spec.down)

    def linear_groups(self) -> dict[str, list[str]]:
        """Projection paths (relative to the layer) grouped by the input they share.

        attn_in: q/k/v (or the fused qkv), attn_out: o, mlp_in: gate/up, mlp_mid: down.
        """
        s = self.spec
        a, m = (lambda n: f"{s.attn}.{n}"), (lambda n: f"{s.mlp}.{n}")
        return {"attn_in": [a(s.qkv)] if s.qkv else [a(s.q), a(s.k), a(s.v)], "attn_out": [a(s.o)],
                "mlp_in": [m(s.gate), m(s.up)] if s.gate else [m(s.up)], "mlp_mid": [m(s.down)]}

    def act_name(self, config) -> str:
        return getattr(config, self.spec.act)


def out_features(mod: nn.Module) -> int:
    """Output width of an nn.Linear, a GPT-2 Conv1D or any module with `out_features`."""
    return mod.nf if type(mod).__name__ == "Conv1D" else mod.out_features


def layer_views(model: nn.Module) -> list[LayerView]:
    """A `LayerView` for every decoder layer of an (uncompressed) `model`."""
    spec = spec_for(model)
    dims = dims_of(model.config, spec)
    return [LayerView(i, layer, get_path(layer, spec.attn), get_path(layer, spec.mlp), spec, dims)
            for i, layer in enumerate(get_path(model, spec.layers))]
