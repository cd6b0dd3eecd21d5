"""Weight quantization after compression: BnbInt8, Bnb4bit (bitsandbytes) and HQQ (hqq) pass configs.

    a3mod.apply(model, [*a3mod.a3_passes(0.2), a3mod.Bnb4bit()], calib=calib)   # compress, then quantize
    a3mod.apply(a3mod.load("out/"), [a3mod.HQQ(nbits=4)])                       # quantize a compressed model

The libraries are imported only when a pass runs (pip install 'a3mod[quant]').
"""
from . import bnb_backend, hqq_backend  # noqa: F401  (register the handlers)
from .base import (
    QUANT_HANDLERS,
    QuantHandler,
    is_quantized,
    quant_swaps,
    quantized_linears,
    register_quant,
    split_quant,
)
from .configs import HQQ, Bnb4bit, BnbInt8, QuantizationError
from .kv_cache import KV_BACKENDS, cache_bytes, quantized_cache

__all__ = ["BnbInt8", "Bnb4bit", "HQQ", "QuantizationError", "QUANT_HANDLERS", "QuantHandler", "register_quant",
           "split_quant", "quant_swaps", "is_quantized", "quantized_linears", "quantized_cache", "cache_bytes",
           "KV_BACKENDS"]
