"""LatentKVAttention: K and V from rank-r factors whose latents are what the KV cache stores (ASVD's KV mode).

k = k_proj.out_proj(k_proj.in_proj(x)), likewise v. The cache holds the latents k_proj.in_proj(x) (B,1,T,r_k)
and v_proj.in_proj(x) (B,1,T,r_v) instead of K (B,Hkv,T,d_h) and V, so it shrinks to (r_k + r_v) / (2 Hkv d_h).
Each call rebuilds K and V for every cached token and applies RoPE at cache-index positions (queries too):
RoPE scores depend only on position differences, so this equals the original model, left padding included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention import DROP_KWARGS, eager_attention, layer_cache, rotate_half
from .configs import ConfigError, spec, to_entry
from .lowrank import LowRankLinear


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    """x (B,h,T,d_h); cos/sin (B,1,T,rot): rotate_half RoPE on the first `rot` dims."""
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat([xr * cos + rotate_half(xr) * sin, xp], dim=-1)


@dataclass(frozen=True)
class LatentKVConfig:
    """A LatentKVAttention: head counts and dims, the ranks of the K and V factors (what the cache holds per
    token), RoPE dims, scale, biases."""
    hidden: int = spec(kind="int", lo=1)
    heads: int = spec(kind="int", lo=1)
    kv_heads: int = spec(kind="int", lo=1)
    head_dim: int = spec(kind="int", lo=1)
    k_rank: int = spec(kind="int", lo=1)
    v_rank: int = spec(kind="int", lo=1)
    rot_dim: int = spec(kind="int", lo=0, le="head_dim")
    scaling: float = spec(kind="float", lo=0.0, hi=1e6, lo_open=True)
    bias: dict = spec(kind="bias")
    is_causal: bool = spec(True, kind="bool")
    dropout: float = spec(0.0, kind="float", lo=0.0, hi=1.0)
    out_dropout: float = spec(0.0, kind="float", lo=0.0, hi=1.0)

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ConfigError("heads", self.heads, f"is not a multiple of kv_heads = {self.kv_heads}")
        if not 0 <= self.rot_dim <= self.head_dim or self.rot_dim % 2:
            raise ConfigError("rot_dim", self.rot_dim, f"must be even and within [0, head_dim = {self.head_dim}]")
        for n in ("k_rank", "v_rank"):
            if getattr(self, n) > self.kv_heads * self.head_dim:
                raise ConfigError(n, getattr(self, n), f"exceeds kv_heads x head_dim = {self.kv_heads * self.head_dim}")


class LatentKVAttention(nn.Module):
    def __init__(self, config, layer_idx: int, cfg: LatentKVConfig | None = None, *, device=None, dtype=None,
                 **fields):
        """`cfg` (or its fields as keywords); `config` is the model's config (the attention backend)."""
        super().__init__()
        c = self.cfg = cfg if cfg is not None else LatentKVConfig(**fields)
        hidden, heads, kv_heads, head_dim, bias = c.hidden, c.heads, c.kv_heads, c.head_dim, c.bias
        k_rank, v_rank, rot_dim, scaling = c.k_rank, c.v_rank, c.rot_dim, c.scaling
        is_causal, dropout, out_dropout = c.is_causal, c.dropout, c.out_dropout
        kw = dict(device=device, dtype=dtype)
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_key_value_heads = heads, kv_heads
        self.num_key_value_groups = heads // kv_heads
        self.head_dim, self.rot_dim, self.scaling = head_dim, rot_dim, scaling
        self.is_causal, self.attention_dropout, self.out_dropout = is_causal, dropout, out_dropout
        self.sliding_window = None
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=bias["q"], **kw)
        self.k_proj = LowRankLinear(in_features=hidden, rank=k_rank, out_features=kv_heads * head_dim, bias=bias["k"],
                                    **kw)
        self.v_proj = LowRankLinear(in_features=hidden, rank=v_rank, out_features=kv_heads * head_dim, bias=bias["v"],
                                    **kw)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=bias["o"], **kw)
        self._rotary = None

    def attach_rotary(self, rotary: nn.Module | None) -> None:
        """The model's rotary embedding, (x, position_ids) -> (cos, sin); held by reference, not as a child."""
        self.__dict__["_rotary"] = rotary

    @property
    def kv_elems_per_token(self) -> int:
        return self.k_proj.rank + self.v_proj.rank

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        cache = layer_cache(cache, past_key_values, kwargs)
        B, T, _ = hidden_states.shape
        H, Hkv, d = self.num_heads, self.num_key_value_heads, self.head_dim
        q = self.q_proj(hidden_states).view(B, T, H, d).transpose(1, 2)                # (B,H,T,d_h)
        lk = self.k_proj.in_proj(hidden_states)[:, None]                              # (B,1,T,r_k)
        lv = self.v_proj.in_proj(hidden_states)[:, None]                              # (B,1,T,r_v)
        if cache is not None:
            lk, lv = cache.update(lk, lv, self.layer_idx)                  # (B,1,S,r)
        S = lk.shape[2]
        k = self.k_proj.out_proj(lk[:, 0]).view(B, S, Hkv, d).transpose(1, 2)        # (B,Hkv,S,d_h)
        v = self.v_proj.out_proj(lv[:, 0]).view(B, S, Hkv, d).transpose(1, 2)
        if self.rot_dim:
            if self._rotary is None:
                raise RuntimeError("LatentKVAttention uses RoPE but has no rotary embedding attached "
                                   "(a3mod.load and a3mod.apply attach the model's)")
            pos = torch.arange(S, device=k.device)[None].expand(B, -1)                 # cache-index positions
            cos, sin = self._rotary(k, pos)                                            # (B,S,rot)
            cos, sin = cos[:, None], sin[:, None]
            k = _rope(k, cos, sin, self.rot_dim)
            q = _rope(q, cos[:, :, S - T:], sin[:, :, S - T:], self.rot_dim)
        impl = getattr(self.config, "_attn_implementation", "eager") or "eager"
        attend = eager_attention if impl == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention)
        extra = {n: a for n, a in kwargs.items() if n not in DROP_KWARGS}
        out, weights = attend(self, q, k, v, attention_mask, scaling=self.scaling,
                              dropout=self.attention_dropout if self.training else 0.0, **extra)
        out = self.o_proj(out.reshape(B, T, H * d))                                    # (B,T,d_m)
        return nn.functional.dropout(out, self.out_dropout, self.training), weights

    SIDECAR_KEY = "latent_attn"

    def describe(self) -> dict:
        """The description entry `a3mod.load` rebuilds this module from: its config."""
        return to_entry(self.cfg)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"cached latents k {self.k_proj.rank} + v {self.v_proj.rank} per token "
                f"(was {2 * self.num_key_value_heads * self.head_dim})")
