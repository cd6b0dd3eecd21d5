"""bitsandbytes handlers: BnbInt8 -> `Linear8bitLt`, Bnb4bit -> `Linear4bit`, with the library's own kernels.

Saved state (the modules' own state_dict): int8 `weight` (out, in) + `SCB` (out,) fp32 row scales +
`weight_format`; 4-bit packed `weight` + `weight.absmax`, `weight.quant_map`, [`weight.nested_*`] and the
packed `weight.quant_state.bitsandbytes__<type>` record. `restore` rebuilds the modules from exactly these.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from ..errors import CheckpointError
from .base import QuantHandler, register_quant
from .configs import Bnb4bit, BnbInt8


def _bias(m: nn.Module, b: torch.Tensor | None) -> None:
    if b is not None:
        m.bias = nn.Parameter(b.detach().clone(), requires_grad=False)


def _take(state: dict, key: str, what: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{what}: saved state lacks {key!r} (has {sorted(state)})")
    return state.pop(key)


def _check_shape(t: torch.Tensor, shape: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{what} has shape {tuple(t.shape)}, the sidecar's dims say {tuple(shape)}")


def _bias_from(state: dict, bias: bool, out_f: int, what: str, device, dtype) -> torch.Tensor | None:
    if not bias:
        return None
    b = _take(state, "bias", what).to(device)
    _check_shape(b, (out_f,), f"{what} bias")
    return b.to(dtype) if dtype is not None else b


def _no_rest(state: dict, what: str) -> None:
    if state:
        raise CheckpointError(f"{what}: unexpected saved tensors {sorted(state)}")


# ------------------------------------------------------------------------------------------- int8
class _FirstOnly(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" on every int8 matmul with fp32 or
    bf16 inputs (hundreds of lines per generated token): let the first one through."""
    PREFIX = "MatMul8bitLt: inputs will be cast"

    def __init__(self):
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.PREFIX):
            return True
        seen, self.seen = self.seen, True
        return not seen


def _quiet_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in log.filters):
        log.addFilter(_FirstOnly())


def _int8_module(cfg: BnbInt8, in_f: int, out_f: int, bias, cb: torch.Tensor, scb: torch.Tensor) -> nn.Module:
    from bitsandbytes.nn import Int8Params, Linear8bitLt

    _quiet_cast_warning()
    m = Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=cfg.threshold,
                     device="meta")
    m.weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    _bias(m, bias)
    return m


def int8_quantize(cfg: BnbInt8, lin: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    cb, scb, _ = bnb.functional.int8_vectorwise_quant(lin.weight.detach().to(torch.float16))   # as Int8Params does
    return _int8_module(cfg, lin.in_features, lin.out_features, lin.bias, cb, scb)


def int8_restore(cfg: BnbInt8, state: dict, *, in_features, out_features, bias, device, dtype) -> nn.Module:
    what = "BnbInt8 linear"
    state = dict(state)
    cb, scb = _take(state, "weight", what).to(device), _take(state, "SCB", what).to(device)
    fmt = state.pop("weight_format", None)
    if fmt is not None and int(fmt) != 0:
        raise CheckpointError(f"{what}: weight_format={int(fmt)}; only 0 (row-major) is supported")
    _check_shape(cb, (out_features, in_features), f"{what} weight")
    _check_shape(scb, (out_features,), f"{what} SCB")
    if cb.dtype != torch.int8:
        raise CheckpointError(f"{what}: weight dtype {cb.dtype}, expected torch.int8")
    b = _bias_from(state, bias, out_features, what, device, dtype)
    _no_rest(state, what)
    return _int8_module(cfg, in_features, out_features, b, cb, scb)


# ------------------------------------------------------------------------------------------ 4-bit
def _flat_linear4bit_class():
    """`Linear4bit` whose CPU forward dequantizes the weight as the flat tensor it was quantized as.

    bitsandbytes 0.50's CPU dequantize_4bit / gemm_4bit kernels take `quant_state.shape` (out, in) and start a
    new absmax block at every row, while the format (and quantize_4bit, and the CUDA kernels) block the flat
    tensor: when `in % blocksize != 0` (e.g. A3's 576 x 1232 down_proj) every row after the first reads the
    wrong scales (relative error 0.5 instead of 0.09 on weights with outlier columns). Dequantizing with the
    shape (1, out*in) makes the kernel block the flat tensor; then it is an ordinary linear. Other devices use
    the library's forward unchanged.
    """
    global _FLAT4
    if _FLAT4 is None:
        import bitsandbytes.functional as F
        from bitsandbytes.nn import Linear4bit

        class FlatLinear4bit(Linear4bit):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                qs = self.weight.quant_state
                if x.device.type != "cpu" or qs.shape[1] % qs.blocksize == 0:
                    return super().forward(x)
                flat = copy.copy(qs)
                flat.shape = torch.Size((1, qs.shape[0] * qs.shape[1]))
                w = F.dequantize_4bit(self.weight.data.view(-1, 1), flat).view(qs.shape)        # (out, in)
                dt = self.compute_dtype or x.dtype
                b = None if self.bias is None else self.bias.to(dt)
                return nn.functional.linear(x.to(dt), w.to(dt), b).to(x.dtype)

        _FLAT4 = FlatLinear4bit
    return _FLAT4


_FLAT4 = None


def _fourbit_module(cfg: Bnb4bit, in_f: int, out_f: int, bias) -> nn.Module:
    m = _flat_linear4bit_class()(in_f, out_f, bias=bias is not None, compress_statistics=cfg.compress_statistics,
                                 quant_type=cfg.quant_type, device="meta")
    # bitsandbytes' AVX512-BF16 CPU path repacks the weight on the first forward (needs out % 32 == 0, computes in
    # bf16, and re-quantizes the statistics lossily when saved): use the portable dequantize + matmul path.
    m.support_avx512bf16_for_cpu = False
    _bias(m, bias)
    return m


def fourbit_quantize(cfg: Bnb4bit, lin: nn.Linear) -> nn.Module:
    import bitsandbytes.functional as F
    from bitsandbytes.nn import Params4bit

    w = lin.weight.detach()
    m = _fourbit_module(cfg, lin.in_features, lin.out_features, lin.bias)
    # Quantize the flattened weight: bitsandbytes 0.50's CPU quantize_4bit mis-blocks 2-D tensors whose rows are
    # not a multiple of the blocksize (relative error 0.25-0.56 instead of 0.09 for nf4, e.g. A3's 576 x 1232
    # down_proj); the blocks of the flat tensor are the ones the format defines (see FlatLinear4bit for the
    # matching dequantize).
    packed, qs = F.quantize_4bit(w.reshape(-1).contiguous(), blocksize=cfg.blocksize,
                                 compress_statistics=cfg.compress_statistics, quant_type=cfg.quant_type)
    qs.shape = torch.Size(w.shape)
    m.weight = Params4bit(packed, requires_grad=False, quant_state=qs, blocksize=cfg.blocksize,
                          compress_statistics=cfg.compress_statistics, quant_type=cfg.quant_type, module=m,
                          bnb_quantized=True)
    m.quant_state = qs                                          # as Params4bit.to() sets it on its module
    return m


def fourbit_restore(cfg: Bnb4bit, state: dict, *, in_features, out_features, bias, device, dtype) -> nn.Module:
    from bitsandbytes.nn import Params4bit

    what = "Bnb4bit linear"
    state = dict(state)
    data = _take(state, "weight", what)
    _check_shape(data, ((in_features * out_features + 1) // 2, 1), f"{what} packed weight")
    stats = {k[len("weight."):]: state.pop(k) for k in [k for k in state if k.startswith("weight.")]}
    b = _bias_from(state, bias, out_features, what, device, dtype)
    _no_rest(state, what)
    m = _fourbit_module(cfg, in_features, out_features, b)
    try:
        m.weight = Params4bit.from_prequantized(data, stats, requires_grad=False, device=device, module=m)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{what}: bitsandbytes cannot read the saved quantization state: {e}") from e
    qs = m.weight.quant_state
    got = (tuple(qs.shape), qs.quant_type, qs.blocksize, qs.nested)
    want = ((out_features, in_features), cfg.quant_type, cfg.blocksize, cfg.compress_statistics)
    if got != want:
        raise CheckpointError(f"{what}: saved (shape, quant_type, blocksize, nested) {got} differ from the "
                              f"sidecar's {want}")
    return m


register_quant(BnbInt8, QuantHandler("bitsandbytes", int8_quantize, int8_restore))
register_quant(Bnb4bit, QuantHandler("bitsandbytes", fourbit_quantize, fourbit_restore))
