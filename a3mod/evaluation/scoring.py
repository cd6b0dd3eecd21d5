"""a3mod's own log-likelihoods, written from the definitions (no lm-eval): the reference the lm-eval
integration is checked against, and handy for quick scoring.

Tokenisation follows lm-eval's HF model: a context's trailing spaces move to the continuation; the
continuation's tokens are those of tokenizer(context + continuation) after the context's; an empty context
conditions on `prefix_token_id`. Rolling log-likelihood scores every token of a text, the first one after
the prefix token, each window of `max_length` inputs predicting as many new tokens as it can.
"""
from __future__ import annotations

import torch
from torch import nn


def _logprobs(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Row k: log-softmax of the next-token distribution after ids[:k+1], (len(ids), V) float64."""
    x = torch.tensor([ids], device=next(model.parameters()).device)
    return torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].double(), -1)


@torch.no_grad()
def continuation_logprob(model: nn.Module, tokenizer, context: str, continuation: str,
                         prefix_token_id: int | None = None) -> tuple[float, bool]:
    """(sum of log p(continuation | context), whether greedy decoding yields the continuation)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = whole[len(ctx):]
    if not ctx:
        ctx, cont = [prefix_token_id if prefix_token_id is not None else tokenizer.eos_token_id], whole
    lp = _logprobs(model, (ctx + cont)[:-1])[-len(cont):]                           # (len(cont), V)
    tgt = torch.tensor(cont, device=lp.device)
    return lp.gather(-1, tgt[:, None]).sum().item(), bool((lp.argmax(-1) == tgt).all())


@torch.no_grad()
def rolling_logprob(model: nn.Module, tokenizer, text: str, max_length: int,
                    prefix_token_id: int | None = None) -> float:
    """Sum of log p(token) over every token of `text`, in windows of at most `max_length` inputs."""
    toks = tokenizer(text, add_special_tokens=False).input_ids
    seq = [prefix_token_id if prefix_token_id is not None else tokenizer.eos_token_id] + toks
    total, done = 0.0, 0
    while done < len(toks):
        end = min(len(toks), done + max_length)
        start = max(0, end - max_length)
        lp = _logprobs(model, seq[start:end])                      # row k predicts seq[start+k+1] = toks[start+k]
        tgt = torch.tensor(toks[done:end], device=lp.device)
        total += lp[done - start:end - start].gather(-1, tgt[:, None]).sum().item()
        done = end
    return total
