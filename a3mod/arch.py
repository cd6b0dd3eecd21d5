"""Architecture knowledge as data: where the layers, projections and norms of each model type live.

This is the only file that knows module names of Hugging Face model families. Everything else works
on the normalised `LayerView` it returns.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where one model family keeps its parts (attribute paths relative to the model / a layer)."""

    layers: str                    # path of the ModuleList of decoder layers, from the model
    attn: str                      # attention module, from a layer
    mlp: str                       # MLP module, from a layer; "" when its linears live on the layer itself
                                   # (OPT fc1/fc2, BERT intermediate/output): A3MLP then narrows those linears
    q: str | None                  # separate q/k/v projections (from the attention module) ...
    k: str | None
    v: str | None
    qkv: str | None = None         # ... or one fused projection whose output is [q | k | v]
    qkv_layout: str = "blocks"     # fused output: "blocks" [q | k | v], or "per_head" (H, 3, d_h) (GPT-NeoX)
    o: str = "o_proj"              # projection consuming the attention output
    o_from_layer: bool = False     # `o` is a path from the layer, outside the attention module (BERT)
    gate: str | None = None        # gated MLP: down(act(gate(x)) * up(x)); else down(act(up(x)))
    gate_up: str | None = None     # ... or one fused projection whose output is [gate | up] (Phi-3)
    up: str = "up_proj"
    down: str = "down_proj"
    act: str = "hidden_act"        # config attribute holding the activation name
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    rope: str | None = "rotate_half"   # RoPE layout: "rotate_half", "interleaved" or None (no RoPE)
    conv1d: bool = False           # weights stored as (in, out) (GPT-2 Conv1D) rather than nn.Linear's (out, in)
    rotary: str | None = "model.rotary_emb"   # the model's rotary embedding (x, position_ids) -> (cos, sin)
    qk_norm: str | None = None     # norm on q/k after the projection, before RoPE: "head" (over each head's d_h,
                                   # Qwen3), "all" (over the whole projection output H*d_h, OLMo-2) or None
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")     # the q/k norm modules, from the attention module
    softcap: str | None = None     # attention-module attribute holding the logit softcap or None (Gemma-2)
    dropouts: tuple[str, str] = ("resid_dropout", "dropout")  # output dropout of attention / MLP (module or float)


_LLAMA = ArchSpec(layers="model.layers", attn="self_attn", mlp="mlp", q="q_proj", k="k_proj", v="v_proj",
                  gate="gate_proj")

_BERT = ArchSpec(layers="bert.encoder.layer", attn="attention.self", mlp="", q="query", k="key", v="value",
                o="attention.output.dense", o_from_layer=True, up="intermediate.dense", down="output.dense",
                norms=("attention.output.LayerNorm", "output.LayerNorm"), rope=None, rotary=None)   # encoder, post-norm

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,               # q/k/v biases, o without bias; read from the modules themselves
    "gpt2": ArchSpec(layers="transformer.h", attn="attn", mlp="mlp", q=None, k=None, v=None, qkv="c_attn",
                     o="c_proj", gate=None, up="c_fc", down="c_proj", act="activation_function",
                     norms=("ln_1", "ln_2"), rope=None, conv1d=True, rotary=None),
    "qwen3": replace(_LLAMA, qk_norm="head"),          # per-head RMSNorm on q/k; sliding window per layer_types
    "olmo2": replace(_LLAMA, qk_norm="all", norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    "gemma": _LLAMA,               # head_dim independent of hidden; (1+w) RMSNorm, scaled embeddings: outside A3
    "gemma2": replace(_LLAMA, act="hidden_activation", softcap="attn_logit_softcapping"),
    "starcoder2": replace(_LLAMA, gate=None, up="c_fc", down="c_proj",   # biases from use_bias; LayerNorm
                          dropouts=("residual_dropout", "residual_dropout")),
    "phi3": replace(_LLAMA, q=None, k=None, v=None, qkv="qkv_proj", gate=None, gate_up="gate_up_proj"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", attn="attention", mlp="mlp", q=None, k=None, v=None,
                         qkv="query_key_value", qkv_layout="per_head", o="dense", up="dense_h_to_4h",
                         down="dense_4h_to_h", rotary="gpt_neox.rotary_emb"),   # partial rotary (rotary_pct)
    "opt": ArchSpec(layers="model.decoder.layers", attn="self_attn", mlp="", q="q_proj", k="k_proj", v="v_proj",
                    o="out_proj", up="fc1", down="fc2", act="activation_function",
                    norms=("self_attn_layer_norm", "final_layer_norm"), rope=None, rotary=None),
    "bert": _BERT,
    "roberta": replace(_BERT, layers="roberta.encoder.layer"),
}


def supported_types() -> list[str]:
    return sorted(ARCHS)


def spec_for(model: nn.Module) -> ArchSpec:
    """The adapter for `model`; a model type without one gets the spec graph discovery builds (`discover.py`),
    or a `DiscoveryError` (an `UnsupportedModelError`) listing the supported types and what discovery missed."""
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in ARCHS:         # no adapter: read the roles from the layer's computation graph
        from .discover import discovered_spec

        return discovered_spec(model, f"model_type {mtype!r} has no a3mod architecture adapter (supported: "
                                      f"{', '.join(supported_types())})")
    return _for_base_model(model, ARCHS[mtype])


def _for_base_model(model: nn.Module, spec: ArchSpec) -> ArchSpec:
    """Paths in ARCHS start at the model with a head (e.g. "bert.encoder.layer"); a bare base model
    (BertModel, LlamaModel) has them without its `base_model_prefix`."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if getattr(model, "base_model", None) is not model or not spec.layers.startswith(prefix):
        return spec
    strip = lambda p: p[len(prefix):] if p and p.startswith(prefix) else p  # noqa: E731
    return replace(spec, layers=strip(spec.layers), rotary=strip(spec.rotary))


def get_path(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted `path` ("" is `root` itself)."""
    for part in path.split(".") if path else ():
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
    rot = int(hd * partial_rotary_factor(config)) if spec.rope else 0
    return Dims(config.hidden_size, heads, kv, hd, rot, spec.rope)


def partial_rotary_factor(config) -> float:
    """Fraction of each head's dims that RoPE rotates (transformers 5 keeps it in `rope_parameters`)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and rp.get("partial_rotary_factor") is not None:
        return float(rp["partial_rotary_factor"])
    return float(getattr(config, "partial_rotary_factor", None) or 1.0)


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
        ws = self.split_qkv(w.t())
        bs = self.split_qkv(b) if b is not None else [None] * 3
        return [(x.t(), y) for x, y in zip(ws, bs)]

    def split_qkv(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The fused qkv output (..., fused) -> [q (..., H*d_h), k (..., Hkv*d_h), v (..., Hkv*d_h)]."""
        d = self.dims
        if self.spec.qkv_layout == "per_head":      # (..., H, 3, d_h), MHA only
            z = t.unflatten(-1, (d.heads, 3, d.head_dim))
            return [z[..., j, :].flatten(-2) for j in range(3)]
        if self.spec.qkv_layout != "blocks":
            raise UnsupportedModelError(f"qkv_layout {self.spec.qkv_layout!r}; known: 'blocks', 'per_head'")
        return list(t.split([d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim], dim=-1))

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

    def qk_norm_modules(self) -> tuple[nn.Module, nn.Module] | None:
        """(q_norm, k_norm) of a qk-norm family, else None."""
        return tuple(getattr(self.attn, n) for n in self.spec.qk_norm_names) if self.spec.qk_norm else None

    def softcap(self) -> float | None:
        """Attention logit softcap (tanh capping of the scores) or None."""
        s = self.spec.softcap
        return None if s is None else getattr(self.attn, s)

    def o_module(self) -> nn.Module:
        return get_path(self.layer if self.spec.o_from_layer else self.attn, self.spec.o)

    def down_module(self) -> nn.Module:
        return get_path(self.mlp, self.spec.down)

    def linear_groups(self) -> dict[str, list[str]]:
        """Projection paths (relative to the layer) grouped by the input they share.

        attn_in: q/k/v (or the fused qkv), attn_out: o, mlp_in: gate/up, mlp_mid: down.
        """
        s = self.spec
        a, m = (lambda n: f"{s.attn}.{n}"), (lambda n: f"{s.mlp}.{n}" if s.mlp else n)
        mlp_in = [m(s.gate_up)] if s.gate_up else [m(s.gate), m(s.up)] if s.gate else [m(s.up)]
        return {"attn_in": [a(s.qkv)] if s.qkv else [a(s.q), a(s.k), a(s.v)],
                "attn_out": [s.o if s.o_from_layer else a(s.o)], "mlp_in": mlp_in, "mlp_mid": [m(s.down)]}

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
