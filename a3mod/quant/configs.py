"""Weight-quantization pass configs: small frozen dataclasses, JSON round trip through pass_to_dict/pass_from_dict.

A quantization pass goes last in `a3mod.apply`'s passes (at most one); it replaces every linear inside the
decoder layers (compact a3mod modules' linears included) by the library's quantized module.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ..errors import A3ModError
from ..passes.base import PassConfig, register_pass


class QuantizationError(A3ModError):
    """A quantization config, pass order or layer shape the quantization library cannot take."""


BNB_4BIT_TYPES = ("nf4", "fp4")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)     # bitsandbytes.functional.quantize_4bit's list
HQQ_NBITS = (8, 4, 3, 2, 1)
HQQ_AXES = (0, 1)


def _int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@register_pass
@dataclass(frozen=True)
class BnbInt8(PassConfig):
    """bitsandbytes LLM.int8 (`Linear8bitLt`): int8 weights with one fp32 scale per output row.

    threshold: activation outlier threshold of the mixed-precision decomposition; 0 = pure int8.
    """
    threshold: float = 0.0

    def __post_init__(self):
        t = self.threshold
        if not (isinstance(t, numbers.Real) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
            raise QuantizationError(f"BnbInt8: threshold={t!r} must be a finite number >= 0 (0 = pure int8, "
                                    "6.0 = the LLM.int8 paper's outlier threshold)")
        object.__setattr__(self, "threshold", float(t))


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
        if self.quant_type not in BNB_4BIT_TYPES:
            raise QuantizationError(f"Bnb4bit: quant_type={self.quant_type!r}; allowed: {', '.join(BNB_4BIT_TYPES)}")
        if not (_int(self.blocksize) and self.blocksize in BNB_BLOCKSIZES):
            raise QuantizationError(f"Bnb4bit: blocksize={self.blocksize!r}; allowed: "
                                    f"{', '.join(map(str, BNB_BLOCKSIZES))}")
        if not isinstance(self.compress_statistics, bool):
            raise QuantizationError(f"Bnb4bit: compress_statistics={self.compress_statistics!r} must be True or False")
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
        if not (_int(self.nbits) and self.nbits in HQQ_NBITS):
            raise QuantizationError(f"HQQ: nbits={self.nbits!r}; allowed: {', '.join(map(str, HQQ_NBITS))}")
        if not (_int(self.group_size) and self.group_size >= 8 and self.group_size % 8 == 0):
            raise QuantizationError(f"HQQ: group_size={self.group_size!r} must be a positive multiple of 8 "
                                    "(e.g. 32, 64, 128)")
        if not (_int(self.axis) and self.axis in HQQ_AXES):
            raise QuantizationError(f"HQQ: axis={self.axis!r}; allowed: 0 (groups along outputs) or 1 (along inputs)")
        for n in ("nbits", "group_size", "axis"):
            object.__setattr__(self, n, int(getattr(self, n)))
