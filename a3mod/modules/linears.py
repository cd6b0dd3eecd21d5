"""Facts about linear modules that every layer of a3mod reads: quantized or not, and their shape."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .configs import spec


@dataclass(frozen=True)
class QuantizedLinearConfig:
    """A quantized linear as a checkpoint describes it: its dims and bias (the codec-specific state, e.g. HQQ's
    group size or bitsandbytes' quant state, travels with its tensors: a3mod/quant/io.py rebuilds the module)."""
    in_features: int = spec(kind="int", lo=1)
    out_features: int = spec(kind="int", lo=1)
    bias: bool = spec(kind="bool")


def quantized_config(m: nn.Module) -> QuantizedLinearConfig:
    in_f, out_f = linear_shape(m)
    return QuantizedLinearConfig(int(in_f), int(out_f), getattr(m, "bias", None) is not None)


def is_quantized(m: nn.Module) -> bool:
    """A quantized linear: made by a3mod, or any bitsandbytes / hqq module."""
    return getattr(m, "a3mod_quant", None) is not None or type(m).__module__.split(".")[0] in ("bitsandbytes", "hqq")


def linear_shape(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a GPT-2 Conv1D or a quantized linear."""
    if type(m).__name__ == "Conv1D":
        return m.weight.shape[0], m.nf
    return m.in_features, m.out_features


def quantized_linears(module: nn.Module) -> dict[str, nn.Module]:
    """The quantized linears a3mod made inside `module`, by path."""
    return {n: m for n, m in module.named_modules() if getattr(m, "a3mod_quant", None) is not None}


# -------------------------------------------------------------------------------------------- apply
