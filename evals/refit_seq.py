"""Experiment (issue 32, item 3): after A3 with both least-squares updates, re-fit every layer's output projection
and MLP down projection in order on the inputs the *compressed* model gives them (earlier layers compressed, this
layer's compressed attention in place) toward the *original* model's outputs.

For layer l, with h_O / h_C the original / compressed model's hidden states entering it (calibration windows):
  1. o_proj (the kept value dims in) <- ridge least squares of z_C -> a_O, where z_C is what the compressed layer's
     o_proj reads on h_C and a_O the original attention output on h_O;
  2. down_proj (the kept neurons in) <- the same of u_C -> m_O (the MLP's intermediate activations on the compressed
     path, the original MLP output);
  "drift" adds the residual-stream difference to each target (a_O + h_O - h_C; m_O + mid_O - mid_C), so the fit also
  pulls the stream back toward the original model's; "weighted" weights each token's squared error by 1 / the mean
  square of the original stream the next norm reads (a few tokens with massive activations no longer dominate);
  "inputs" also folds a ridge map from the compressed to the original norm outputs into q/k/v and gate/up. Same
  shapes, no extra GEMM; three passes of the windows through each compressed layer and one through each original
  layer. Llama-layout models (the adapter's o / down / norms). The drift variant is built into the passes as
  `A3OV/A3MLP(seq_refit=True)` (a3mod/pipeline/seq_refit.py); this prototype stays for the variants not built.

Used by evals/bench_quality.py (variants "a3-ov-mlp-update-refit-seq[-drift[-weighted|-inputs]]").
"""
from __future__ import annotations

import torch
from torch import nn

from a3mod.arch import get_path, layer_views
from a3mod.arch.capture import layer_calls, through_layer
from a3mod.math.solvers import ridge_refit


class _Fit:
    """Sums of u u^T and u t^T for `lin`'s input u (a forward pre-hook) and targets t given per window."""

    def __init__(self, lin: nn.Linear, target, weight=None):
        self.lin, self.target, self.g, self.c, self.n, self.w = lin, target, 0.0, 0.0, 0, 0
        self.weight = weight          # weight(w) -> (tokens,) per-token weights of the squared error, or None

    def __call__(self, mod, args):
        u = args[0].reshape(-1, args[0].shape[-1]).double()
        t = self.target(self.w).reshape(-1, self.lin.out_features).double()
        if self.lin.bias is not None:
            t = t - self.lin.bias.double()
        if self.weight is not None:
            s = self.weight(self.w).reshape(-1, 1).double().sqrt()
            u, t = u * s, t * s
        self.g, self.c, self.n = self.g + u.T @ u, self.c + u.T @ t, self.n + u.shape[0]

    def solve(self, damping: float) -> None:
        w = self.lin.weight
        w.copy_(ridge_refit(self.g / self.n, self.c / self.n, w.double().T, damping).T.to(w.dtype))


def _through(layer, i, calls, hidden, hooks, keep=False):
    """Every window through `layer` with (module, pre?, fn) hooks; the outputs when keep."""
    out, handles = [], []
    for mod, pre, fn in hooks:
        handles.append(mod.register_forward_pre_hook(fn) if pre else mod.register_forward_hook(fn))
    try:
        def get(b):
            for _, _, fn in hooks:
                if isinstance(fn, _Fit):
                    fn.w = b
            return hidden[b]
        through_layer(layer, i, calls, [tuple(h.shape[:2]) for h in hidden], get,
                      (lambda b, y: out.append(y)) if keep else None)
    finally:
        for h in handles:
            h.remove()
    return out


class _Transport:
    """Sums of x_C x_C^T and x_C x_O^T for a norm's output x_C (forward hook on the compressed layer's norm) and the
    original layer's x_O of the same window; `fold` multiplies the projections reading x by the ridge map
    M = argmin E|M x_C - x_O|^2 + lam |M - I|^2 (W <- W M: same shapes)."""

    def __init__(self, x_o: list):
        self.x_o, self.g, self.c, self.n, self.w = x_o, 0.0, 0.0, 0, 0

    def __call__(self, mod, args, y):
        u = y.reshape(-1, y.shape[-1]).double()
        t = self.x_o[self.w].reshape(-1, y.shape[-1]).double()
        self.g, self.c, self.n = self.g + u.T @ u, self.c + u.T @ t, self.n + u.shape[0]

    def fold(self, lins, damping: float) -> None:
        eye = torch.eye(self.g.shape[0], dtype=torch.float64)
        m_t = ridge_refit(self.g / self.n, self.c / self.n, eye, damping)        # M^T
        for lin in lins:
            lin.weight.copy_((lin.weight.double() @ m_t.T).to(lin.weight.dtype))


def _transport(layer_c, i, calls, h_c, norm_path, x_o, lins, damping):
    tr = _Transport(x_o)
    seen = {"b": 0}

    def hook(m, a, y):
        tr.w = seen["b"]
        tr(m, a, y)
        seen["b"] += 1
    _through(layer_c, i, calls, h_c, [(get_path(layer_c, norm_path), False, hook)])
    tr.fold(lins, damping)


def _inv_ms(x: torch.Tensor) -> torch.Tensor:
    """1 / mean square over the hidden dim, per token: how much the next RMSNorm scales that token's stream down."""
    return 1.0 / x.double().square().mean(-1).clamp_min(1e-12)


@torch.no_grad()
def refit_sequential(orig: nn.Module, comp: nn.Module, calib: torch.Tensor, drift: bool, damping: float = 0.01,
                     progress: bool = False, inputs: bool = False, weighted: bool = False) -> None:
    """Re-fit `comp`'s (A3-compressed `orig`) o_proj and down_proj layer by layer in place (see the module doc)."""
    vo, vc = layer_views(orig), layer_views(comp)
    layers_o, layers_c = get_path(orig, vo[0].spec.layers), get_path(comp, vc[0].spec.layers)
    seen = [layer_calls(orig, layers_o, calib[b:b + 1]) for b in range(calib.shape[0])]
    calls = {(1, calib.shape[1]): seen[0]}
    h_o = [(s[0][0][0] if s[0][0] else s[0][1]["hidden_states"]).clone() for s in seen]
    h_c = [h.clone() for h in h_o]
    in_norm, mid_norm = vo[0].spec.norms
    for i, (a, b) in enumerate(zip(vo, vc)):
        att_o, mid_o, mlp_o, mid_c, x1_o, x2_o = [], [], [], [], [], []
        nxt = _through(layers_o[i], i, calls, h_o, [
            (a.o_module(), False, lambda m, x, y: att_o.append(y)),
            (get_path(a.layer, mid_norm), True, lambda m, x: mid_o.append(x[0])),
            (get_path(a.layer, in_norm), False, lambda m, x, y: x1_o.append(y)),
            (get_path(a.layer, mid_norm), False, lambda m, x, y: x2_o.append(y)),
            (a.down_module(), False, lambda m, x, y: mlp_o.append(y))], keep=True)
        if inputs:
            at = b.attn
            _transport(layers_c[i], i, calls, h_c, in_norm, x1_o, [at.q_proj, at.k_proj, at.v_proj], damping)
        fit = _Fit(b.o_module(), lambda w: att_o[w] + ((h_o[w] - h_c[w]) if drift else 0),
                   (lambda w: _inv_ms(mid_o[w])) if weighted else None)       # the mid norm reads mid_O
        _through(layers_c[i], i, calls, h_c, [(b.o_module(), True, fit)])
        fit.solve(damping)
        if inputs:
            _transport(layers_c[i], i, calls, h_c, mid_norm, x2_o, [b.mlp.gate_proj, b.mlp.up_proj], damping)
        fit = _Fit(b.down_module(), lambda w: mlp_o[w] + ((mid_o[w] - mid_c[w]) if drift else 0),
                   (lambda w: _inv_ms(mlp_o[w] + mid_o[w])) if weighted else None)   # the next layer's norm
        _through(layers_c[i], i, calls, h_c, [(get_path(b.layer, mid_norm), True, lambda m, x: mid_c.append(x[0])),
                                             (b.down_module(), True, fit)])
        fit.solve(damping)
        h_c, h_o = _through(layers_c[i], i, calls, h_c, [], keep=True), nxt
        if progress:
            print(f"refit layer {i}", flush=True)
