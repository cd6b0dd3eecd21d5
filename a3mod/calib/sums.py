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


CHUNK_ROWS = 2048     # rows gathered before one Gram product: larger GEMMs and fewer d x d float64 additions than one
#                       window at a time, for at most 8 KB x d of pending rows per Gram (evals/bench_compress.py
#                       --updates); where many Grams are summed at once (a whole-model `collect`), that is the cost


class GramSum:
    """X^T X over every batch added, in float64. The batches are gathered into chunks of about CHUNK_ROWS rows (a
    batch that long is one by itself); each chunk's Gram is made of products in the compute dtype (fp32 at least),
    from the block rows of its upper triangle, each mirrored below the diagonal (~2/3 of the products of a full
    X^T X), and added to the total."""

    def __init__(self):
        self.pending: list[Tensor] = []
        self.rows = 0
        self.total: Tensor | None = None

    def add(self, x: Tensor) -> None:
        xf = x.reshape(-1, x.shape[-1])
        keep_dtype = xf.dtype in (torch.float32, torch.float64)
        if not self.pending and xf.shape[0] >= self._chunk(xf.shape[1]):
            self._multiply(xf if keep_dtype else xf.float())    # a chunk by itself: no copy
            return
        self.pending.append(xf.clone() if keep_dtype else xf.float())   # own copy: the model may reuse its buffer
        self.rows += xf.shape[0]
        if self.rows >= self._chunk(xf.shape[1]):
            self.flush()

    @staticmethod
    def _chunk(d: int) -> int:
        """Rows per product: CHUNK_ROWS, fewer for a narrow Gram (its pending rows stay near its own size)."""
        return min(CHUNK_ROWS, max(d, 1024))

    def flush(self) -> None:
        if self.pending:
            x = torch.cat(self.pending) if len(self.pending) > 1 else self.pending[0]
            self.pending, self.rows = [], 0
            self._multiply(x)

    def _multiply(self, x: Tensor) -> None:
        """total += x^T x for x (N, d)."""
        d = x.shape[1]
        if self.total is None:
            self.total = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        step = d if d < 512 else 256 if d <= 2048 else 512     # the fastest block widths measured on CPU
        for i in range(0, d, step):
            row = x[:, i:i + step].mT @ x[:, i:]              # (b, d - i): block row i of the upper triangle
            b = row.shape[0]
            self.total[i:i + b, i:] += row
            self.total[i + b:, i:i + b] += row[:, b:].mT

    def value(self) -> Tensor:
        self.flush()
        return self.total


def add_gram(acc: dict, name: str, x: Tensor) -> None:
    """acc[name] += X^T X for x (..., d) (a GramSum until `finish(acc)`)."""
    if name not in acc:
        acc[name] = GramSum()
    acc[name].add(x)


def finish(acc: dict) -> dict:
    """`acc` with every GramSum replaced by its float64 total (what the statistics hold)."""
    for k, v in acc.items():
        if isinstance(v, GramSum):
            acc[k] = v.value()
    return acc


def add(d: dict, name: str, t: Tensor) -> None:
    d[name] = d[name] + t if name in d else t
