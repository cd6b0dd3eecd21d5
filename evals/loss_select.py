"""Experiment (issue 32): choose the MLP neurons A3 keeps by what the *language-model loss* loses, not by the output's
squared error alone.

A3's MLP selection (CUR) keeps the neurons with the largest E[h_q^2] ||W_down[q]||^2: the expected squared size of
what neuron q writes into the residual stream, every direction of the stream and every token weighted alike. The
per-token loss sensitivity E_t[(h_tq g_tq)^2] measured here first is built into the library as
`A3MLP(select="taylor")` (a3mod/calib/taylor.py). This probe keeps the other score it was compared with, from one
backward pass of the calibration windows through the original model (g_t = dL/dy_t, the loss gradient at the MLP's
output y = down_proj(h), which is also the residual stream's gradient there):

  "fisher":  E[h_q^2] * W_down[q] F W_down[q]^T, F = E[g g^T]   CUR with the stream's directions weighted by the
             loss's empirical Fisher (d x d per layer) instead of the identity

Only the selection changes: the kept neurons' weights, the least-squares update of down_proj and the sequential
re-fit are the library's (the update minimises the output error given the kept set, which no output metric changes).
The scores replace `solvers.mlp_order` while `apply` runs (`selection`), each layer found by its down_proj weights.
Used by evals/bench_quality.py (variants "...-fisher").
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import a3mod.math.solvers as solvers
from a3mod.arch import layer_views


def loss_scores(model: nn.Module, calib: torch.Tensor, progress: bool = False) -> dict:
    """{"fisher": [(d, d)], "down": [the layer's down_proj weight sum]}, per decoder layer, float64 sums over the
    calibration windows (one window a forward + backward, the loss the mean next-token cross entropy)."""
    views = layer_views(model)
    downs = [v.down_module() for v in views]
    fisher = [0.0] * len(downs)
    hooks = []
    for i, lin in enumerate(downs):
        def back(m, gin, gout, i=i):
            g = gout[0].detach().reshape(-1, gout[0].shape[-1]).double()                 # (T, d)
            fisher[i] = fisher[i] + g.T @ g
        hooks.append(lin.register_full_backward_hook(back))
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    try:
        for b in range(calib.shape[0]):
            ids = calib[b:b + 1]
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)       # gradients flow from here
            logits = model(inputs_embeds=emb).logits[0, :-1]
            nn.functional.cross_entropy(logits.float(), ids[0, 1:]).backward()
            if progress:
                print(f"\rloss scores: window {b + 1}/{calib.shape[0]}", end="", flush=True)
    finally:
        for h in hooks:
            h.remove()
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    return {"fisher": fisher, "down": [float(d.weight.detach().double().abs().sum()) for d in downs]}


def _layer_of(scores: dict, w_down: torch.Tensor) -> int:
    s = float(w_down.double().abs().sum())
    return min(range(len(scores["down"])), key=lambda i: abs(scores["down"][i] - s))


@contextlib.contextmanager
def selection(scores: dict, kind: str):
    """`solvers.mlp_order` ranks every layer's neurons by the loss-aware score `kind` ("fisher") while the block
    runs."""
    real = solvers.mlp_order

    def order(h2: torch.Tensor, w_down: torch.Tensor):                 # h2 (d_i,), w_down (d_i, d)
        f = scores[kind][_layer_of(scores, w_down)].to(w_down.device, torch.float64)
        w = w_down.double()
        score = (h2.double() * ((w @ f) * w).sum(-1)).to(h2)
        return score.argsort(descending=True), score
    solvers.mlp_order = order
    try:
        yield
    finally:
        solvers.mlp_order = real
