"""KV-cache quantization on top of A3's smaller cache: the two savings multiply.

    cache = a3mod.quantized_cache(model, backend="hqq", nbits=4)      # transformers Cache, one layer per layer
    model.generate(ids, past_key_values=cache, max_new_tokens=...)   # `cache=` from transformers 5.24 on
    a3mod.cache_bytes(cache)                                           # bytes the cache really holds

Backends (transformers' quantized cache layers; no kernels of our own):
  "hqq"  HQQQuantizedLayer: nbits in {1, 2, 3, 4, 8}, asymmetric groups along the head dim (axis 1), the most
         recent `residual_length` tokens kept unquantized (KIVI). Works on CPU and GPU (needs the hqq package).
         transformers' `QuantizedCache` uses one group size for every layer, which A3's reduced head dims
         (e.g. 52) do not divide; here each tensor gets the largest group size <= `group_size` that divides
         its head dim, so groups never straddle heads.
  "fp8"  Fp8QuantizedLayer: float8_e4m3 with one scale per tensor, frozen after the first update. Works on CPU
         and GPU with plain torch.
  ("quanto" needs optimum-quanto, which is not a dependency; it is not offered.)
Sliding-window layers are refused, as transformers' QuantizedCache does.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, Fp8QuantizedLayer, HQQQuantizedLayer

from ..arch import layer_views
from ..validate import choice, integer
from .configs import QuantizationError

KV_BACKENDS = ("hqq", "fp8")


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def _hqq_layer_class():
    class HeadGroupedHQQLayer(HQQQuantizedLayer):
        """HQQ cache layer whose group size divides the head dim of whatever it quantizes (keys, values, latents)."""

        def __init__(self, *, max_group_size: int, **kw):
            super().__init__(**kw)
            self.max_group_size = max_group_size

        def _quantize(self, tensor, axis):        # tensor (B, h, T, d)
            self.q_group_size = _largest_divisor(tensor.shape[-1], self.max_group_size)
            # hqq bit-packs whole rows of groups (2 or 4 per byte): pad the tokens to a multiple of 4; and its
            # 3-bit unpacking assumes a 2-D shape: quantize the (B*h*T, d) view
            tokens = tensor.shape[-2]
            x = nn.functional.pad(tensor, (0, 0, 0, -tokens % 4))
            q, meta = super()._quantize(x.reshape(-1, x.shape[-1]), axis)
            meta["tokens"], meta["padded_shape"] = tokens, x.shape
            return q, meta

        def _dequantize(self, qtensor):
            meta = qtensor[1]
            return super()._dequantize(qtensor).view(meta["padded_shape"])[..., : meta["tokens"], :]

    return HeadGroupedHQQLayer


def quantized_cache(model: nn.Module, backend: str = "hqq", nbits: int = 4, group_size: int = 64,
                    residual_length: int = 128):
    """A transformers `Cache` for `model` (compressed or not) whose layers quantize keys and values."""
    if backend not in KV_BACKENDS:
        raise QuantizationError(f"KV-cache backend {backend!r}; allowed: {', '.join(KV_BACKENDS)}")
    if backend == "hqq":
        choice("quantized_cache(backend='hqq')", "nbits", nbits, (1, 2, 3, 4, 8), error=QuantizationError)
    integer("quantized_cache", "group_size", group_size, error=QuantizationError)
    integer("quantized_cache", "residual_length", residual_length, lo=0, error=QuantizationError)
    views = layer_views(model)
    windowed = [v.index for v in views if _windowed(model.config, v)]
    if windowed:
        raise QuantizationError(f"layers {windowed} use sliding-window attention; quantized KV caches support "
                                "full-attention layers only")
    if backend == "fp8":
        return Cache(layers=[Fp8QuantizedLayer() for _ in views])
    try:
        import hqq  # noqa: F401
    except ImportError as e:
        raise QuantizationError(f"the hqq KV-cache backend needs the hqq package ({e}); pip install hqq") from e
    cls = _hqq_layer_class()
    return Cache(layers=[cls(nbits=nbits, axis_key=1, axis_value=1, q_group_size=group_size,
                             residual_length=residual_length, max_group_size=group_size) for _ in views])


def _windowed(config, view) -> bool:
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[view.index] != "full_attention"
    return bool(getattr(view.attn, "sliding_window", getattr(config, "sliding_window", None)))


def _tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(t) for t in x)
    if isinstance(x, dict):
        return sum(_tensor_bytes(t) for t in x.values())
    return 0


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache: quantized states with their scales/zeros plus unquantized residuals."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_bytes(getattr(layer, name, None))
    return total
