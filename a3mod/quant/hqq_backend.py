"""HQQ handler: HQQ -> `hqq.core.quantize.HQQLinear` (PyTorch backend: dequantize + matmul, any device).

Saved state: HQQLinear's own safetensors-compatible state_dict (`W_q`, `scale`, `zero`, the meta-data
encoded as small tensors, `bias`). Compute dtype (and the dtype of scale/zero) = the model's float dtype.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import CheckpointError
from .base import QuantHandler, register_quant
from .configs import HQQ

_DTYPE_KEYS = ("compute_dtype", "unpack_view_dtype")      # hqq eval()s these strings when loading


def _config(cfg: HQQ) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=cfg.nbits, group_size=cfg.group_size, axis=cfg.axis)


_GROUPS_PER_BYTE = {8: 1, 4: 2, 3: 1, 2: 4, 1: 8}     # rows of groups hqq packs together (3-bit pads its rows)


def hqq_check(cfg: HQQ, in_f: int, out_f: int) -> str | None:
    """hqq reshapes W to (n / group_size, group_size) (axis=1) or (group_size, n / group_size) (axis=0) and packs
    whole rows: n must be a multiple of group_size, with axis=1 times the rows packed together."""
    n, per = in_f * out_f, (_GROUPS_PER_BYTE[cfg.nbits] if cfg.axis == 1 else 1)
    if n % (cfg.group_size * per) == 0:
        return None
    packing = f" x {per} (hqq packs {per} groups of {cfg.nbits}-bit codes together)" if per > 1 else ""
    fit = next((g for g in range(cfg.group_size - 8, 7, -8) if n % (g * per) == 0), None)
    hint = f"group_size={fit} fits this linear" if fit else "no smaller multiple of 8 fits this linear"
    return f"its {n} weights are not a multiple of group_size={cfg.group_size}{packing}; {hint}"


def hqq_quantize(cfg: HQQ, lin: nn.Linear) -> nn.Module:
    from hqq.core.quantize import HQQLinear

    w = lin.weight
    tmp = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta", dtype=w.dtype)
    tmp.weight = nn.Parameter(w.detach().clone(), requires_grad=False)     # hqq may work in place on its input
    if lin.bias is not None:
        tmp.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return HQQLinear(tmp, _config(cfg), del_orig=True, compute_dtype=w.dtype, device=str(w.device))


def hqq_restore(cfg: HQQ, state: dict, *, in_features, out_features, bias, device, dtype) -> nn.Module:
    from hqq.core.quantize import HQQLinear

    what = "HQQ linear"
    state = {k: t.to(device) for k, t in state.items()}
    if "W_q" not in state:
        raise CheckpointError(f"{what}: saved state lacks 'W_q' (has {sorted(state)})")
    if bias != ("bias" in state):
        raise CheckpointError(f"{what}: the sidecar says bias={bias}, the saved state "
                              f"{'has' if not bias else 'lacks'} one")
    for k in _DTYPE_KEYS:
        if k in state:
            _check_dtype_name(state[k], k, what)
    m = HQQLinear(None, _config(cfg), compute_dtype=dtype, device=str(device), initialize=False)
    try:
        m.load_state_dict(state)
    except (KeyError, IndexError, ValueError, TypeError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"{what}: hqq cannot read the saved state: {e}") from e
    got = (m.in_features, m.out_features, m.meta["nbits"], m.meta["group_size"], m.meta["axis"])
    want = (in_features, out_features, cfg.nbits, cfg.group_size, cfg.axis)
    if got != want:
        raise CheckpointError(f"{what}: saved (in, out, nbits, group_size, axis) {got} differ from the "
                              f"sidecar's {want}")
    return m


def _check_dtype_name(t: torch.Tensor, key: str, what: str) -> None:
    """hqq decodes these entries with eval(): accept only the name of a torch dtype."""
    text = "".join(chr(int(c)) for c in t.reshape(-1).tolist()) if t.dtype == torch.uint8 else None
    ok = text is not None and re.fullmatch(r"torch\.[a-z0-9_]+", text) is not None
    if not ok or not isinstance(getattr(torch, text.split(".", 1)[1], None), torch.dtype):
        raise CheckpointError(f"{what}: saved {key!r} is {text!r}, not the name of a torch dtype")


register_quant(HQQ, QuantHandler("hqq", hqq_quantize, hqq_restore, hqq_check))
