"""Kind "taylor": each MLP neuron's loss sensitivity, from one backward pass of the calibration windows.

A3's MLP score E[h_q^2] ||W_down[q]||^2 ranks a neuron by the squared size of what it writes into the residual stream,
every direction and token alike. The language-model loss does not weigh them alike. With h_tq the neuron's activation
on token t (down_proj's input) and g_tq = dL/dh_tq (L: the next-token cross entropy summed over the window's tokens,
the original model), the first-order change of the loss when neuron q is removed on token t is -h_tq g_tq, and

    taylor_q = sum_t (h_tq g_tq)^2                                          (key "ht", (d_i,) per layer, float64)

is the empirical Fisher of a mask on neuron q (the squared first-order term per token; LLM-Pruner's first-order
importance, per token). `A3MLP(select="taylor")` keeps the neurons with the largest taylor_q
(docs/method_extensions.md, "Loss-aware MLP selection").

Cost: one forward and one backward pass of the whole model per window (no weight gradients: the parameters are frozen
for the pass, the gradient flows from the input embeddings), so it needs the whole model at once (not streaming) and
the activations of one window for the backward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

KEY = "ht"


def taylor_sums(model: nn.Module, views, calib: Tensor, batch_size: int = 1, progress: bool = False
                ) -> list[dict[str, Tensor]]:
    """[{KEY: (d_i,) float64 sum over calib's tokens of (h * dL/dh)^2}] per view (empty for a view without a dense
    MLP or left as is), `calib` (n, T) run through `model` in batches with the loss gradient of each token."""
    sums: list[dict[str, Tensor]] = [{} for _ in views]
    hooks = []

    def watch(acc: dict, h: Tensor) -> None:            # down_proj's input: its gradient arrives in the backward
        if h.requires_grad:
            x = h.detach()
            h.register_hook(lambda g: _add(acc, x, g))
    for j, v in enumerate(views):
        if not v.left and v.has_mlp:
            hooks.append(v.down_module().register_forward_pre_hook(lambda m, a, acc=sums[j]: watch(acc, a[0])))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            for b in tqdm(range(0, calib.shape[0], batch_size), desc="loss gradients (taylor)", disable=not progress,
                          unit="batch"):
                ids = calib[b:b + batch_size].to(device)
                emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)        # (B, T, d)
                logits = model(inputs_embeds=emb, use_cache=False).logits[:, :-1]            # (B, T-1, V)
                logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
                nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                            reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
        for p, r in frozen:
            p.requires_grad_(r)
        model.train(was_training)
    return sums


def _add(acc: dict[str, Tensor], h: Tensor, g: Tensor) -> None:
    """acc[KEY] += sum over the batch's tokens of (h * g)^2; h, g (..., d_i): activations and dL/dh."""
    t = (h.double() * g.double()).square().reshape(-1, h.shape[-1]).sum(0)
    acc[KEY] = t if KEY not in acc else acc[KEY] + t
