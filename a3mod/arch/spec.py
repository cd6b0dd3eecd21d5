"""Architecture facts as data (the leaf of a3mod.arch): `ArchSpec` says where one model family keeps its parts;
`Dims` is the head geometry read from the config; helpers that read modules by path and linears' weights."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


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
    qkv_layout: str = "blocks"     # fused output: "blocks" [q | k | v], "per_head" (H, 3, d_h) (GPT-NeoX), or
                                   # "grouped" (Hkv, g + 2, d_h) (Falcon: g queries, then the group's key and value)
    o: str = "o_proj"              # projection consuming the attention output
    o_from_layer: bool = False     # `o` is a path from the layer, outside the attention module (BERT)
    gate: str | None = None        # gated MLP: down(act(gate(x)) * up(x)); else down(act(up(x)))
    gate_up: str | None = None     # ... or one fused projection whose output is [gate | up] (Phi-3)
    up: str = "up_proj"
    down: str = "down_proj"
    act: str = "hidden_act"        # config attribute holding the activation name
    act_name: str | None = None    # ... or the activation's transformers ACT2FN name itself (no config attribute)
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    rope: str | None = "rotate_half"   # RoPE layout: "rotate_half", "interleaved" or None (no RoPE)
    rope_table: str = "half"       # layout of the (cos, sin) the model passes: "half" (cat(freqs, freqs), the HF
                                   # default), "complex" (one complex tensor cos + i sin, each freq once: Llama 4), or
                                   # default, also for interleaved heads), "interleaved" (each freq twice in a row)
                                   # or "sin_cos" ((sin, cos), each freq once: GPT-J, CodeGen)
                                   # or "once" ((cos, sin), each freq once: gpt-oss)
    conv1d: bool = False           # weights stored as (in, out) (GPT-2 Conv1D) rather than nn.Linear's (out, in)
    rotary: str | None = "model.rotary_emb"   # the model's rotary embedding (x, position_ids) -> (cos, sin)
    qk_norm: str | None = None     # norm on q/k after the projection, before RoPE: "head" (over each head's d_h,
                                   # Qwen3), "all" (over the whole projection output H*d_h, OLMo-2) or None
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")     # the q/k norm modules, from the attention module
    qk_norm_after_rope: bool = False   # the q/k norms run after RoPE, not before (HunYuan)
    scale_attr: str = "scaling"    # attention-module attribute holding the softmax scale (MPT: softmax_scale)
    scaling: float | None = None   # softmax scale when the attention module holds none (GPT-Neo: 1.0);
                                   # None: the module's `scale_attr`, else 1/sqrt(d_h)
    softcap: str | None = None     # attention-module attribute holding the logit softcap or None (Gemma-2)
    dropouts: tuple[str, str] = ("resid_dropout", "dropout")  # output dropout of attention / MLP (module or float)
    alibi: str | None = None       # keyword the layer passes the additive per-head position bias (ALiBi) under (MPT:
                                   # "position_bias", (H, 1, L), its last key-length columns used); None: no ALiBi
    bool_mask: str = "keep"        # a boolean attention mask's True means "keep" (HF default) or "masked" (MPT)
    mlp_residual: bool = False     # the MLP module adds the residual the layer hands it: mlp(x, residual) (MPT)
    attn_residual: bool = False    # the attention adds the residual handed as its 2nd argument (BLOOM)
    mla: bool = False              # multi-head latent attention (DeepSeek-V2/V3: a3mod.arch.mla); q/k/v unused
    sinks: str | None = None       # attention-module parameter (H,) of per-head sink logits in the softmax (gpt-oss)
    attn_gate: str | None = None   # output gate, attn_out * sigmoid(gate) before `o`, elementwise per head dim:
                                   # "q" (the q projection emits each head's [query | gate], Qwen3.5 / Qwen3-Next)
                                   # or the path of its own projection from the attention module (AFMoE's gate_proj)
    attn_gate_head: bool = False   # ... one gate per head, broadcast over its dims (LFM3's g_proj: H outputs)
    attn_gate_bias: str | None = None  # ... plus a per-head bias parameter of the attention module (Beam's gate_bias)
    attn_gate_act: str = "sigmoid" # ... its function: "sigmoid" or "softplus" (Laguna)
    v_scale: str | None = None     # attention attribute: a constant factor on the values (MiMo-V2), folded into v
    attn_whole: str | None = None  # why every layer's attention stays as it is (Gemma 4: norms over each q, k and v
                                   # head, K/V shared across layers); the MLPs are compressed and give its share
    attn_temperature: bool = False # NoPE layers scale queries by log1p(floor((pos + 1) / floor_scale)) * attn_scale
                                   # + 1 where the attention's `attn_temperature_tuning` is set (Llama 4)
    experts: str | None = None     # mixture of experts: the routed experts module inside the layer's `mlp` block
                                   # (fused 3-D parameters, a3mod.arch.experts); layers without it are dense
    shared: str | None = None      # ... and the block's shared-expert MLP (gate / up / down named as a dense MLP)
    shared_on_layer: bool = False  # `shared` sits on the layer beside the MoE block, a path from the layer (Granite 4)
    mlp_adapters: str | None = None    # ModuleList (from the MLP) of per-use low-rank adds on the fused gate_up output,
                                   # Sequential(Linear(d_m, r), Linear(r, 2I)) or Identity, picked by the layer the
                                   # MLP runs in (Zamba2's shared block): narrowed with gate_up's rows


def module_copy(mod: nn.Module) -> nn.Module:
    """A shallow copy of `mod` with its own parameter / buffer / submodule / hook dicts (so replacing a parameter
    or child of the copy leaves `mod` as it is); every other attribute is shared."""
    new = copy.copy(mod)
    for name, val in vars(mod).items():
        if isinstance(val, dict):
            new.__dict__[name] = type(val)(val)
    return new


def get_path(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted `path` ("" is `root` itself)."""
    for part in path.split(".") if path else ():
        root = getattr(root, part)
    return root


def set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_path(root, parent) if parent else root, name, new)


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
    kv = 1 if getattr(config, "multi_query", False) is True else (  # GPT-BigCode / Falcon-7B: one K/V head
        getattr(config, "num_key_value_heads", None) or heads)
    if getattr(config, "new_decoder_architecture", False):          # Falcon-40B / 180B: num_kv_heads groups
        kv = config.num_kv_heads
    try:
        hd = getattr(config, "head_dim", None)
    except Exception:               # noqa: BLE001  a per-layer head_dim (Gemma 4) refuses a global read
        hd = None
    hd = hd or config.hidden_size // heads
    rot = int(hd * partial_rotary_factor(config)) if spec.rope else 0
    rot += rot % 2                  # an odd product: the rotary embedding's arange(0, rot, 2) still gives whole pairs
    if spec.rope and isinstance(getattr(config, "rotary_dim", None), int):    # GPT-J / CodeGen: rotary dims given
        rot = min(config.rotary_dim, hd)
    return Dims(config.hidden_size, heads, kv, hd, rot, spec.rope)


def layer_rot_dim(config, index: int, dims: Dims) -> int:
    """Rotary dims of layer `index`: the partial rotary factor of its layer type where rope parameters are given per
    type and differ (Laguna: 0.5 in full-attention layers, 1 in sliding ones), else the model's."""
    rp, types = getattr(config, "rope_parameters", None), getattr(config, "layer_types", None)
    if dims.rope and isinstance(rp, dict) and isinstance(types, (list, tuple)) and index < len(types):
        own = rp.get(types[index])      # a "proportional" rope rotates every dim (some at zero frequency: LFM3)
        if isinstance(own, dict) and own.get("partial_rotary_factor") is not None and \
                own.get("rope_type", "default") == "default":
            r = int(dims.head_dim * float(own["partial_rotary_factor"]))
            return r + r % 2
    return dims.rot_dim


def partial_rotary_factor(config) -> float:
    """Fraction of each head's dims that RoPE rotates (transformers 5 keeps it in `rope_parameters`)."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):    # per layer type (MiMo-V2)
        factors = {v.get("partial_rotary_factor") for v in rp.values()}
        rp = next(iter(rp.values())) if len(factors) == 1 else None
    if isinstance(rp, dict) and rp.get("partial_rotary_factor") is not None:
        return float(rp["partial_rotary_factor"])
    return float(getattr(config, "partial_rotary_factor", None) or 1.0)


def linear_params(mod: nn.Module, conv1d: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias (out,) or None) of an nn.Linear or a GPT-2 Conv1D."""
    w = mod.weight.t() if conv1d else mod.weight
    return w, mod.bias


def out_features(mod: nn.Module) -> int:
    """Output width of an nn.Linear, a GPT-2 Conv1D or any module with `out_features`."""
    return mod.nf if type(mod).__name__ == "Conv1D" else mod.out_features


def is_linear(m: nn.Module) -> bool:
    """What a3mod counts as a linear layer: nn.Linear (and subclasses) or a GPT-2 Conv1D."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
