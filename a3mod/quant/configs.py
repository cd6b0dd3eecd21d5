"""Weight-quantization pass configs: small frozen dataclasses, JSON round trip through pass_to_dict/pass_from_dict.

A quantization pass goes last in `a3mod.apply`'s passes (at most one); it replaces every linear inside the
decoder layers (compact a3mod modules' linears included) by the library's quantized module.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import A3ModError
from ..passes.base import PassConfig, register_pass
from ..validate import boolean, choice, is_int, number


class QuantizationError(A3ModError):
    """A quantization config, pass order or layer shape the quantization library cannot take."""


BNB_4BIT_TYPES = ("nf4", "fp4")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)     # bitsandbytes.functional.quantize_4bit's list
HQQ_NBITS = (8, 4, 3, 2, 1)
HQQ_AXES = (0, 1)


@register_pass
@dataclass(frozen=True)
class BnbInt8(PassConfig):
    """bitsandbytes LLM.int8 (`Linear8bitLt`): int8 weights with one fp32 scale per output row.

    threshold: activation outlier threshold of the mixed-precision decomposition; 0 = pure int8.
    """
    threshold: float = 0.0

    def __post_init__(self):
        t = number("BnbInt8", "threshold", self.threshold, 0.0, what="0 = pure int8, 6.0 = the LLM.int8 paper's "
                   "outlier threshold", error=QuantizationError)
        object.__setattr__(self, "threshold", t)


@register_pass
@dataclass(frozen=True)
class Bnb4bit(PassConfig):
    """bitsandbytes 4-bit (`Linear4bit`): NF4 or FP4 codes, one absmax per `blocksize` weights.

    compress_statistics: also quantize the absmax values to 8 bits (QLoRA's double quantization).
    """
    quant_type: str = "nf4"
    blocksize: int = 64
    compress_statistics: bool = True

    def __post_init__(self):
        choice("Bnb4bit", "quant_type", self.quant_type, BNB_4BIT_TYPES, what=", ".join(BNB_4BIT_TYPES),
               error=QuantizationError)
        choice("Bnb4bit", "blocksize", self.blocksize, BNB_BLOCKSIZES, what=", ".join(map(str, BNB_BLOCKSIZES)),
               error=QuantizationError)
        boolean("Bnb4bit", "compress_statistics", self.compress_statistics, error=QuantizationError)
        object.__setattr__(self, "blocksize", int(self.blocksize))


@register_pass
@dataclass(frozen=True)
class HQQ(PassConfig):
    """HQQ (`hqq.core.quantize.HQQLinear`): `nbits` codes, a scale and a zero per group of `group_size` weights.

    axis: 1 groups along the input dim (rows of W, the usual choice), 0 along the output dim. Every quantized
    weight's element count must be a multiple of group_size.
    """
    nbits: int = 4
    group_size: int = 64
    axis: int = 1

    def __post_init__(self):
        choice("HQQ", "nbits", self.nbits, HQQ_NBITS, what=", ".join(map(str, HQQ_NBITS)), error=QuantizationError)
        if not (is_int(self.group_size) and self.group_size >= 8 and self.group_size % 8 == 0):
            raise QuantizationError(f"HQQ: group_size={self.group_size!r} must be a positive multiple of 8 "
                                    "(e.g. 32, 64, 128)")
        choice("HQQ", "axis", self.axis, HQQ_AXES, what="0 (groups along outputs) or 1 (along inputs)",
               error=QuantizationError)
        for n in ("nbits", "group_size", "axis"):
            object.__setattr__(self, n, int(getattr(self, n)))
