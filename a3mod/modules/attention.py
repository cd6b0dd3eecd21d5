"""ReducedHeadAttention: attention with separate (reduced) q/k and v/o head dims and per-group RoPE.

Shapes: B batch, T tokens, H query heads, Hkv key/value heads, g = H / Hkv, r_qk / r_vo head dims.
The softmax scale stays the original 1/sqrt(d_h) (passed explicitly to every backend). RoPE: the reduced
q/k head is in rotate_half layout over its first `rot_dim` dims; `rope_index[j]` says which dims of the
original rotary cos/sin (as the model's rotary embedding produces them) KV group j kept.
qk-norm (Qwen3 per head, OLMo-2 over the whole projection): the norm modules run on q/k before RoPE; a norm needs
the whole head, so such layers keep qk_dim = head_dim. softcap (Gemma-2): passed to the backend as `softcap`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configs import Part
from .configs import ConfigError, check_choices, spec, to_entry

DROP_KWARGS = ("use_cache", "output_attentions", "encoder_hidden_states", "encoder_attention_mask", "head_mask",
                "position_ids", "cache_position")


def layer_cache(cache, past_key_values, kwargs: dict):
    """The KV cache a decoder layer passed: `cache=` (transformers >= 5.24), `past_key_values=` (earlier) or
    `layer_past=` (GPT-NeoX); an EncoderDecoderCache gives its self-attention part. Pops `layer_past`."""
    for c in (cache, past_key_values, kwargs.pop("layer_past", None)):
        if c is not None:
            return getattr(c, "self_attention_cache", c)
    return None


# position_embeddings layouts: "half" = (cos, sin), each cat(freqs, freqs) over the rotary dims (the HF default);
# "sin_cos" = (sin, cos), each over the rot/2 frequencies once (GPT-J, CodeGen); "once" = (cos, sin) so (gpt-oss)
# "complex": one tensor cos + i sin (Llama 4); "half_flipped": "half" for a rotate_half of (x2, -x1) (NanoChat), i.e.
# the rotation by -angle
ROPE_TABLES = ("half", "sin_cos", "once", "complex", "half_flipped")


def half_table(pe, layout: str):
    """(cos, sin) in the "half" layout from the layer's position_embeddings."""
    if layout == "half":
        return pe
    if layout == "half_flipped":
        return pe[0], -pe[1]
    if layout == "complex":                                          # (B,T,rot/2) complex
        return torch.cat([pe.real, pe.real], -1), torch.cat([pe.imag, pe.imag], -1)
    sin, cos = pe if layout == "sin_cos" else pe[::-1]            # (B,T,rot/2) each
    return torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_attention(module, q, k, v, mask, scaling, dropout=0.0, softcap=None, s_aux=None, **_):
    """q (B,H,T,r_qk), k (B,Hkv,S,r_qk), v (B,Hkv,S,r_vo) -> out (B,T,H,r_vo), weights (B,H,T,S).

    softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma-2). s_aux (H,): per-head sink
    logits, one more softmax column that takes probability mass and adds nothing (gpt-oss)."""
    g = module.num_key_value_groups
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if softcap is None and mask is not None and mask.dtype != torch.bool:
        w = _masked_scores(q, k, mask, scaling)
    else:
        w = torch.matmul(q, k.transpose(2, 3)) * scaling
        if softcap is not None:
            w = torch.tanh(w / softcap) * softcap
        if mask is not None:
            w = w + mask if mask.dtype != torch.bool else w.masked_fill(~mask, torch.finfo(w.dtype).min)
    if s_aux is not None:
        B, H, T, _ = w.shape
        w = torch.cat([w, s_aux.to(w.dtype).view(1, H, 1, 1).expand(B, H, T, 1)], -1)
        w = w - w.amax(-1, keepdim=True)                  # as gpt-oss: no overflow in half precision
    w = nn.functional.softmax(w, dim=-1, dtype=torch.promote_types(w.dtype, torch.float32)).to(q.dtype)
    if s_aux is not None:
        w = w[..., :-1]
    w = nn.functional.dropout(w, p=dropout, training=module.training)
    return torch.matmul(w, v).transpose(1, 2).contiguous(), w


def _masked_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * q k^T + mask, (B,H,T,S), as one GEMM accumulating into a copy of the additive mask: the scale rides
    in the GEMM's alpha and the mask in its beta = 1, which saves the two T x S elementwise passes (* scaling,
    + mask) that dominate eager attention's non-GEMM time at long context. q (B,H,T,r), k (B,H,S,r)."""
    B, H, T, r = q.shape
    S = k.shape[2]
    w = torch.empty(B, H, T, S, dtype=torch.promote_types(q.dtype, mask.dtype), device=q.device)
    w.copy_(mask[..., :S].expand(B, H, T, S))
    w.view(B * H, T, S).baddbmm_(q.reshape(B * H, T, r).to(w.dtype), k.reshape(B * H, S, r).transpose(1, 2).to(w.dtype),
                                 alpha=scaling)
    return w


def _gather_dims(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B,T,R), index (n,rot) -> (B,n,T,rot) with out[b,j,t] = t[b,t,index[j]], in t's (B,T,n,rot) memory order
    (k's). torch.gather beats advanced indexing on CPU for longer sequences (evals/bench_speed.py measures it); at
    T = 1 (decode) advanced indexing needs fewer dispatches."""
    B, T, _ = t.shape
    if T == 1:
        return t[..., index].transpose(1, 2)
    n, r = index.shape
    return t.gather(-1, index.reshape(1, 1, n * r).expand(B, T, n * r)).view(B, T, n, r).transpose(1, 2)


def _forget_rope_layout(module, _keys) -> None:
    module._rope_key = None      # load_state_dict copies into rope_index in place: recompute the cached flags


@dataclass(frozen=True)
class AttentionConfig:
    """A ReducedHeadAttention: head counts and dims (full and kept), scale, biases, and the features of its family
    (see io/codecs.py for how it is stored). The kept RoPE dims are the module's `rope_index` buffer."""
    hidden: int = spec(kind="int", lo=1)
    heads: int = spec(kind="int", lo=1)
    kv_heads: int = spec(kind="int", lo=1)
    head_dim: int = spec(kind="int", lo=1)
    qk_dim: int = spec(kind="int", lo=1, le="head_dim")
    vo_dim: int = spec(kind="int", lo=1, le="head_dim")
    rot_dim: int = spec(kind="int", lo=0, le="qk_dim")
    scaling: float = spec(kind="float", lo=0.0, hi=1e6, lo_open=True)
    bias: dict = spec(kind="bias")
    sliding_window: int | None = spec(None, kind="int", lo=1)
    is_causal: bool = spec(True, kind="bool")
    dropout: float = spec(0.0, kind="float", lo=0.0, hi=1.0)
    out_dropout: float = spec(0.0, kind="float", lo=0.0, hi=1.0)
    out_proj: bool = spec(True, kind="bool", omit_default=True, only=False,
                          doc="the projection lives outside")
    qk_norm: str | None = spec(None, kind="str", choices={"head", "all"}, omit_default=True)
    qk_norm_after_rope: bool = spec(False, kind="bool", omit_default=True, only=True,
                                    doc="the q/k norms run after RoPE (HunYuan)")
    softcap: float | None = spec(None, kind="float", lo=0.0, hi=1e6, lo_open=True, omit_default=True)
    rope_table: str = spec("half", kind="str", choices=set(ROPE_TABLES), omit_default=True)
    alibi: str | None = spec(None, kind="str", choices={"position_bias", "alibi"}, omit_default=True)
    bool_mask: str = spec("keep", kind="str", choices={"keep", "masked"}, omit_default=True)
    residual: bool = spec(False, kind="bool", omit_default=True, only=True, doc="the attention adds the residual")
    sinks: bool = spec(False, kind="bool", omit_default=True, only=True,
                       doc="the attention has per-head sink logits")
    gate: bool = spec(False, kind="bool", omit_default=True, only=True,
                      doc="an output gate: each head's output times sigmoid(g_proj(x)) (Qwen3.5, Qwen3-Next)")
    gate_bias: bool = spec(False, kind="bool", omit_default=True, only=True, doc="g_proj has a bias")
    gate_per_head: bool = spec(False, kind="bool", omit_default=True, only=True,
                               doc="one gate per head, broadcast over its value dims (LFM3)")
    gate_act: str = spec("sigmoid", kind="str", choices={"softplus"}, omit_default=True,
                         doc="the gate's function: sigmoid, or softplus (Laguna)")
    temperature_scale: float | None = spec(None, kind="float", lo=0.0, hi=1e6, omit_default=True,
                                           doc="Llama 4 NoPE layers: queries times log1p(floor((pos+1)/floor)) * "
                                               "scale + 1")
    temperature_floor: float | None = spec(None, kind="float", lo=0.0, hi=1e12, lo_open=True, omit_default=True)

    def __post_init__(self):
        if not isinstance(self.bias, dict) or sorted(self.bias) != ["k", "o", "q", "v"]:
            raise ConfigError("bias", self.bias, "must map q, k, v, o to True / False")
        if not self.out_proj and self.bias["o"]:      # no output projection here, so no output bias either
            object.__setattr__(self, "bias", {**self.bias, "o": False})
        if self.heads % self.kv_heads:
            raise ConfigError("heads", self.heads, f"is not a multiple of kv_heads = {self.kv_heads}")
        if not 0 <= self.rot_dim <= self.qk_dim or self.rot_dim % 2:
            raise ConfigError("rot_dim", self.rot_dim, f"must be even (RoPE rotates pairs) and within [0, qk_dim = "
                                                       f"{self.qk_dim}]")
        check_choices(self)
        if (self.temperature_scale is None) != (self.temperature_floor is None):
            raise ConfigError("temperature_floor", self.temperature_floor, "and temperature_scale come together")
        if (self.gate_bias or self.gate_per_head or self.gate_act != "sigmoid") and not self.gate:
            name = "gate_per_head" if self.gate_per_head else "gate_bias" if self.gate_bias else "gate_act"
            raise ConfigError(name, getattr(self, name), "needs gate=True (a gate projection)")
        if self.gate and not self.out_proj:
            raise ConfigError("gate", True, "needs out_proj=True (the gate multiplies what o_proj reads)")
        if self.qk_norm_after_rope and self.qk_norm != "head":
            raise ConfigError("qk_norm_after_rope", True, f"needs qk_norm='head' (per-head norms), not "
                                                          f"{self.qk_norm!r}")
        if self.qk_norm and self.qk_dim != self.head_dim:
            raise ConfigError("qk_dim", self.qk_dim, f"must equal head_dim = {self.head_dim} under qk_norm (a norm "
                                                     f"over a head needs the full head dim)")


class ReducedHeadAttention(nn.Module):
    def __init__(self, config, layer_idx: int, cfg: AttentionConfig | None = None, *, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None, device=None, dtype=None, **fields):
        """`cfg` (or its fields as keywords); q_norm / k_norm: the original model's q/k norm modules under
        cfg.qk_norm. `config` is the model's config (the attention backend, the cache)."""
        super().__init__()
        cfg = cfg if cfg is not None else AttentionConfig(**fields)
        if cfg.qk_norm and (q_norm is None or k_norm is None):
            raise ConfigError("qk_norm", cfg.qk_norm, "needs the q_norm and k_norm modules")
        self.cfg, c = cfg, cfg
        kw = dict(device=device, dtype=dtype)
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_key_value_heads = c.heads, c.kv_heads
        self.num_key_value_groups = c.heads // c.kv_heads
        self.head_dim, self.qk_dim, self.vo_dim, self.rot_dim = c.head_dim, c.qk_dim, c.vo_dim, c.rot_dim
        self.scaling, self.sliding_window, self.is_causal = c.scaling, c.sliding_window, c.is_causal
        self.attention_dropout = c.dropout
        self.out_dropout = c.out_dropout      # dropout on the output (GPT-2's resid_dropout); train mode only
        self.q_proj = nn.Linear(c.hidden, c.heads * c.qk_dim, bias=c.bias["q"], **kw)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * c.qk_dim, bias=c.bias["k"], **kw)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * c.vo_dim, bias=c.bias["v"], **kw)
        # out_proj=False: the output projection lives outside this module (BERT's attention.output.dense);
        # forward then returns the concatenated head outputs (B,T,H*r_vo)
        self.o_proj = nn.Linear(c.heads * c.vo_dim, c.hidden, bias=c.bias["o"], **kw) if c.out_proj else None
        self.qk_norm, self.softcap = c.qk_norm, c.softcap  # the norms are applied before RoPE, at full head dim
        self.rope_table = c.rope_table      # layout of the position_embeddings the layer passes (see ROPE_TABLES)
        self.alibi = c.alibi                # keyword of the additive per-head position bias (ALiBi), or None
        self.bool_mask = c.bool_mask        # what True means in a boolean attention mask
        self.residual = c.residual          # forward(x, residual, ...) adds it to the output (BLOOM's attention)
        self.q_norm, self.k_norm = (q_norm, k_norm) if c.qk_norm else (None, None)
        self.sinks = nn.Parameter(torch.zeros(c.heads, **kw)) if c.sinks else None   # per-head sink logits (gpt-oss)
        # output gate (Qwen3.5 / Qwen3-Next): elementwise over every kept value dim of every head
        self.g_proj = nn.Linear(c.hidden, c.heads * (1 if c.gate_per_head else c.vo_dim), bias=c.gate_bias,
                                **kw) if c.gate else None
        idx = torch.arange(c.rot_dim, device=device).repeat(c.kv_heads, 1)
        self.register_buffer("rope_index", idx, persistent=True)          # (Hkv, rot_dim) long
        self._rope_key, self._rope_flags = None, (False, False)
        self.register_load_state_dict_post_hook(_forget_rope_layout)

    # ------------------------------------------------------------------------------------------ RoPE
    def _rope_layout(self) -> tuple[bool, bool]:
        """(shared, prefix): every KV group keeps the same dims; those dims are 0..rot_dim-1 in order. Computed from
        `rope_index` once per value (its storage and version) in eager mode. Under torch.compile / export the cached
        flags are used as constants (no data-dependent branch, no graph break); with none cached yet, the general
        per-group gather, which is exact for every index."""
        if torch.compiler.is_compiling():
            return self._rope_flags if self._rope_key is not None else (False, False)
        key = (self.rope_index.data_ptr(), self.rope_index._version, self.rope_index.device)
        if key != self._rope_key:
            shared = bool((self.rope_index == self.rope_index[:1]).all())
            prefix = shared and bool((self.rope_index[0] == torch.arange(
                self.rot_dim, device=self.rope_index.device)).all())
            self._rope_key, self._rope_flags = key, (shared, prefix)
        return self._rope_flags

    def _rope_tables(self, cos: torch.Tensor, sin: torch.Tensor):
        """cos/sin (B,T,R) -> per-group tables (B,Hkv|1,T,rot) gathered at the kept dims."""
        shared, prefix = self._rope_layout()
        if prefix and self.rot_dim == cos.shape[-1]:     # one shared identity index (e.g. full rank): no gather
            return cos[:, None], sin[:, None]
        idx = self.rope_index[:1] if shared else self.rope_index
        return _gather_dims(cos, idx), _gather_dims(sin, idx)

    def _mask(self, mask, bias, S: int, dtype):
        """The mask the backend gets: a boolean mask in the keep convention; with ALiBi, one additive float mask =
        the per-head bias (H, 1, L; its last S key columns) + 0 / -inf from the mask."""
        if mask is not None and mask.dtype == torch.bool and self.bool_mask == "masked":
            mask = ~mask
        if bias is None:
            return mask
        bias = bias[..., -S:].to(dtype)                       # MPT (H, 1, S); BLOOM (B*H, 1, S)
        bias = bias[None] if bias.shape[0] == self.num_heads else bias.view(-1, self.num_heads, *bias.shape[-2:])
        if mask is None:
            return bias
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return bias + mask[..., :S]

    def _apply_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        r = self.rot_dim
        if r == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        xr, xp = x[..., :r], x[..., r:]
        return torch.cat([xr * cos + rotate_half(xr) * sin, xp], dim=-1)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        cache = layer_cache(cache, past_key_values, kwargs)
        residual = None
        if self.residual:               # BLOOM: attention(x, residual, alibi=..., attention_mask=..., layer_past=...)
            residual, position_embeddings = position_embeddings, None
        B, T, _ = hidden_states.shape
        H, Hkv = self.num_heads, self.num_key_value_heads
        q, k = self.rotated_qk(hidden_states, position_embeddings)                       # (B,H|Hkv,T,r_qk)
        v = self.v_proj(hidden_states).view(B, T, Hkv, self.vo_dim).transpose(1, 2)    # (B,Hkv,T,r_vo)
        if self.cfg.temperature_scale is not None:       # Llama 4 NoPE layers: position-dependent query scale
            q = self._temperature(q, cache)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_mask = self._mask(attention_mask, kwargs.pop(self.alibi, None) if self.alibi else None,
                                    k.shape[2], q.dtype)
        impl = getattr(self.config, "_attn_implementation", "eager") or "eager"
        if self.sinks is not None and impl == "sdpa":      # sdpa has no sink column: the eager form computes it
            impl = "eager"
        attend = eager_attention if impl == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention)
        extra = {n: a for n, a in kwargs.items() if n not in DROP_KWARGS}
        if self.sinks is not None:
            extra["s_aux"] = self.sinks
        if self.softcap is not None:
            extra["softcap"] = self.softcap
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling,
                              dropout=self.attention_dropout if self.training else 0.0,
                              sliding_window=self.sliding_window, **extra)
        out = out.reshape(B, T, H * self.vo_dim)                                         # (B,T,H*r_vo)
        if self.g_proj is not None:
            gate = self.g_proj(hidden_states)                                     # (B,T,H*r_vo), per head (B,T,H)
            gate = torch.sigmoid(gate) if self.cfg.gate_act == "sigmoid" else nn.functional.softplus(
                gate.float()).to(gate.dtype)
            out = (out.view(B, T, H, self.vo_dim) * gate[..., None]).flatten(2) if self.cfg.gate_per_head else \
                out * gate
        if self.o_proj is None:
            return out, weights
        out = self.o_proj(out)                                                           # (B,T,d_m)
        if self.training and self.out_dropout:          # skip the no-op call (one dispatch per layer) in eval
            out = nn.functional.dropout(out, self.out_dropout, True)
        return (out if residual is None else out + residual), weights

    def rotated_qk(self, hidden_states: torch.Tensor, position_embeddings=None):
        """The queries (B,H,T,r_qk) and keys (B,Hkv,T,r_qk) the scores are made of: projected, normed where the
        model norms them, rotated by each KV group's kept RoPE dims (before any temperature, cache or softcap)."""
        B, T, _ = hidden_states.shape
        H, Hkv, g = self.num_heads, self.num_key_value_heads, self.num_key_value_groups
        q, k = self.q_proj(hidden_states), self.k_proj(hidden_states)                  # (B,T,H*r_qk), (B,T,Hkv*r_qk)
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, H, self.qk_dim).transpose(1, 2)                                 # (B,H,T,r_qk)
        k = k.view(B, T, Hkv, self.qk_dim).transpose(1, 2)                               # (B,Hkv,T,r_qk)
        if self.qk_norm == "head" and not self.cfg.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rot_dim:
            if position_embeddings is None:
                raise ValueError("this attention uses RoPE but was called without position_embeddings (cos, sin)")
            cos, sin = self._rope_tables(*half_table(position_embeddings, self.rope_table))  # (B,Hkv|1,T,rot)
            k = self._apply_rope(k, cos, sin)
            if cos.shape[1] == 1:
                q = self._apply_rope(q, cos, sin)
            else:  # each query head uses its KV group's table: (B,Hkv,g,T,r_qk)
                q = self._apply_rope(q.view(B, Hkv, g, T, -1), cos[:, :, None], sin[:, :, None]).view(B, H, T, -1)
        if self.cfg.qk_norm_after_rope:                  # HunYuan: per-head norms on the rotated q/k
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def _temperature(self, q: torch.Tensor, cache) -> torch.Tensor:
        """q (B,H,T,r) times log1p(floor((pos + 1) / floor)) * scale + 1 at each token's position (as Llama 4)."""
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        pos = torch.arange(q.shape[2], device=q.device) + past
        s = torch.log1p(torch.floor((pos.float() + 1.0) / self.cfg.temperature_floor)) * self.cfg.temperature_scale + 1
        return (q * s.view(1, 1, -1, 1)).to(q.dtype)

    # ------------------------------------------------------------------------------------ description
    SIDECAR_KEY = "attn"

    def plan_parts(self) -> list[Part]:
        """This module as parts of a layer plan: the q/k and v/o head dims (full -> kept)."""
        return [Part("qk", self.head_dim, self.qk_dim), Part("ov", self.head_dim, self.vo_dim)]

    def describe(self) -> dict:
        """The description entry `a3mod.load` rebuilds this module from: its config and its kept RoPE dims."""
        return {**to_entry(self.cfg), "rope_index": self.rope_index.tolist()}

    def extra_repr(self) -> str:
        rope = f"rope dims {self.rot_dim} (per KV group)" if self.rot_dim else "no rope"
        scale = (f"1/sqrt({self.head_dim})" if abs(self.scaling - self.head_dim ** -0.5) < 1e-12
                 else f"{self.scaling:g}")
        extra = (f", qk-norm {self.qk_norm} (q/k kept at full head dim)" if self.qk_norm else "") + (
            f", softcap={self.softcap:g}" if self.softcap is not None else "") + (
            (f", {self.cfg.gate_act} output gate" + (" per head" if self.cfg.gate_per_head else ""))
            if self.g_proj is not None else "") + (
            ", output projection outside" if self.o_proj is None else "")
        return (f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim {self.head_dim} -> "
                f"qk {self.qk_dim} / vo {self.vo_dim}, {rope}, scale={scale}{extra}")
