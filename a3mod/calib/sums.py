"""The sums calibration statistics are made of: pure tensor functions over one batch of activations, float64 results
(the products in the compute dtype where that is exact enough: see each)."""
from __future__ import annotations

import torch
from torch import Tensor


def outer(x: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """x (..., heads*d) -> (sum of per-head outer products (heads, d, d), sum (heads, d)), float64.

    One contiguous float64 copy in (heads, N, d) layout (transpose, then convert), so the batched matmul
    reads plain row-major blocks: half the time of a strided (N, heads, d) view, the same numbers.
    """
    z = x.reshape(-1, heads, x.shape[-1] // heads).transpose(0, 1).double()     # (heads, N, d) contiguous
    return z.mT @ z, z.sum(1)


def sq_sum(x: Tensor) -> Tensor:
    """x (..., d) -> sum of x**2 over every leading dim, (d,) float64 (exact squares of fp32 values). `x` is left
    as it is: a float64 x is squared into a new buffer (squaring in place would change the activations the model
    runs on), a lower-precision one in its float64 copy (no second N x d buffer)."""
    xf = x.reshape(-1, x.shape[-1])
    return (xf.square() if xf.dtype == torch.float64 else xf.double().square_()).sum(0)


def add_gram(acc: dict, name: str, x: Tensor) -> None:
    """acc[name] (d, d) float64 += X^T X for x (..., d): products in the compute dtype (fp32 at least), summed in
    float64 in place. A wide Gram is built from the block rows of its upper triangle, each mirrored below the
    diagonal: ~2/3 of the products of a full X^T X, and no d x d temporary (a Gram 8,960 wide is 640 MB in float64)."""
    xf = x.reshape(-1, x.shape[-1])
    xf = xf if xf.dtype == torch.float64 else xf.float()
    d = xf.shape[1]
    g = acc.get(name)
    if g is None:
        g = acc[name] = torch.zeros(d, d, dtype=torch.float64, device=xf.device)
    step = d if d < 512 else 256 if d <= 2048 else 512     # the fastest block widths measured on CPU
    for i in range(0, d, step):
        row = xf[:, i:i + step].mT @ xf[:, i:]              # (b, d - i): block row i of the upper triangle
        b = row.shape[0]
        g[i:i + b, i:] += row
        g[i + b:, i:i + b] += row[:, b:].mT


def add(d: dict, name: str, t: Tensor) -> None:
    d[name] = d[name] + t if name in d else t
