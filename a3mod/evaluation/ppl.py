"""Paper-style token perplexity: concatenated text, non-overlapping windows, loss on every position but the first."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..calib.stats import check_token_ids, vocab_size
from ..calib.text import read_text
from ..errors import A3ModError
from ..hf_compat import cache_kwargs
from ..validate import integer


def eval_tokens(tokenizer, source: str = "wikitext2-test") -> Tensor:
    """All token ids of an evaluation text ('wikitext2-test' = WikiText-2 raw test, "\\n\\n".join(rows))."""
    return tokenizer(read_text(source), return_tensors="pt", add_special_tokens=False).input_ids[0]


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor, seq_len: int = 2048, batch_size: int = 1,
               max_windows: int | None = None, progress: bool = True, cache=None, chunk: int = 128) -> dict:
    """exp(mean NLL) over floor(len/seq_len) non-overlapping windows (optionally the first `max_windows`).

    cache: optional factory () -> transformers Cache (e.g. `lambda: a3mod.quantized_cache(model)`): each window
    is then fed `chunk` tokens at a time through a fresh cache, so every chunk attends to the earlier tokens as
    the cache stores them (quantized beyond its residual window). batch_size is 1 then.
    Returns {"ppl", "nll", "tokens", "windows", "seq_len"}; `tokens` counts the scored positions.
    """
    for name, v, lo in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("max_windows", max_windows, 1)):
        if v is not None:
            integer("perplexity", name, v, lo=lo)
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise A3ModError(f"ids must be an integer tensor of token ids, got {type(ids).__name__} "
                         f"{getattr(ids, 'dtype', '')}")
    check_token_ids(ids, vocab_size(model), "evaluation")
    if cache is not None:
        batch_size = 1
        integer("perplexity", "chunk", chunk, what="tokens fed per step through the cache")
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise A3ModError(f"evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for b in tqdm(range(0, n, batch_size), desc=f"perplexity ({n}x{seq_len})", disable=not progress, unit="batch"):
            x = windows[b:b + batch_size].to(device)
            logits = _logits(model, x, cache, chunk)[:, :-1]                          # (B, T-1, V)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                               reduction="sum")
            nll += loss.item()
            count += x[:, 1:].numel()
    finally:
        model.train(was_training)
    return {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": n, "seq_len": seq_len}


def _logits(model: nn.Module, x: Tensor, cache, chunk: int) -> Tensor:
    """(B, T, V) float logits of `x`, in one forward or `chunk` tokens at a time through `cache()`."""
    if cache is None:
        return model(input_ids=x, use_cache=False).logits.float()
    c, out = cache(), []
    for s in range(0, x.shape[1], chunk):
        out.append(model(input_ids=x[:, s:s + chunk], use_cache=True, **cache_kwargs(model, c)).logits.float())
    return torch.cat(out, 1)
