"""Sequential re-fit (`A3OV(seq_refit=True)`, `A3MLP(seq_refit=True)`): every layer's o_proj / down_proj fitted
again on the inputs the *compressed* model gives them, toward the *original* model's outputs.

`apply`'s layer-by-layer schedule (pipeline/layerwise.py) and streaming (pipeline/stream.py: a second hidden-state
store, resumable like the first) then carry two residual streams of the calibration windows: h_O, the original
model's (its statistics are collected on it, as without this option), and h_C, the compressed model's (earlier
layers compressed and re-fitted). For layer l, with its compact modules solved from
its statistics and swapped in:

    original pass (the statistics pass; hooks beside): a_O = o_proj's output, mid_O = the stream after attention
        (the second norm's input), m_O = down_proj's output; checked to add up: mid_O = h_O + a_O, out = mid_O + m_O
    1. o_proj <- ridge fit of z_C -> a_O + (h_O - h_C)        z_C: what the compressed o_proj reads on h_C
    2. down   <- ridge fit of u_C -> m_O + (mid_O - mid_C)    u_C, mid_C: the compressed path with o_proj re-fitted
    3. h_C    <- the compressed layer on h_C

The targets carry the drift of the stream, so each fit also pulls h_C back toward h_O. Each fit is
`solvers.ridge_refit` (the pass's damping, toward the weights the pass solved), so its error on these windows lies
between the exact fit's and the solved weights' (never above where it started; `refit_layer` returns both).
Same shapes, no new GEMM. Beside the layer-by-layer schedule it holds three more hidden-state copies (h_C and two
targets) and the Gram of each re-fitted projection's input; compute: the compressed layer's attention (o_proj's
input), the layer up to down_proj's input, then the whole layer (h_C): about two more passes of the windows.
Derivation: docs/method_extensions.md, "Sequential re-fit".
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..arch import get_path
from ..arch.capture import through_layer
from ..arch.views import find_path
from ..calib.rotary import qkv_hooks, rotary_hook, scored
from ..calib.scores import refit_sums, sampled_scores
from ..calib.sums import GramSum
from ..errors import CalibrationError, UnsupportedModelError
from ..math import qk_refit
from ..math.solvers import ridge_refit
from ..modules import ReducedHeadAttention, ReducedMLP
from ..modules.attention import rotate_half

TOLERANCE = 1e-2        # relative: how closely the layer's parts must add up to the residual stream
KEEP_BYTES = 2 << 30    # down_proj's inputs up to this size are kept, so the layer's outputs need no third pass
HELDOUT = "heldout"     # refit_damping: chosen per layer and part from GRID on held-out windows
GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
HOLD = 4                # every HOLD-th window is held out (the last window when there are fewer)


def dampings(passes) -> dict[str, float | str]:
    """{"qk": damping, "o": damping, "down": damping} for the A3QK / A3OV / A3MLP passes with seq_refit=True (empty:
    none asks): their refit_damping, or their damping when it is None; HELDOUT: chosen per layer on held-out
    windows."""
    comp = {"A3QK": "qk", "A3OV": "o", "A3MLP": "down"}
    return {comp[type(p).__name__]: p.damping if p.refit_damping is None else p.refit_damping for p in passes
            if type(p).__name__ in comp and getattr(p, "seq_refit", False)}


def least_error(error_at) -> float:
    """The damping of GRID with the least error_at(damping) (the held-out windows' error of the fit it gives)."""
    return min(GRID, key=error_at)


def held_out(n_windows: int) -> set[int]:
    """The windows held out when the damping is chosen: every HOLD-th, or the last of fewer (none of one)."""
    every = set(range(HOLD - 1, n_windows, HOLD))
    return every or ({n_windows - 1} if n_windows > 1 else set())


class Targets:
    """Hooks on one original layer during its statistics pass: per window, the o_proj fit's target
    a_O + h_O - h_C and the down fit's partial target m_O + mid_O (float32, on the CPU), the residual layout checked.
    Windows arrive in order (one call of the layer each)."""

    def __init__(self, view, h_o: list[Tensor], h_c: list[Tensor], qk: bool = False):
        self.view, self.h_o, self.h_c = view, h_o, h_c
        self.att: list[Tensor] = []
        self.mlp: list[Tensor] = []
        self.scores: list[tuple[Tensor, Tensor]] | None = [] if qk and scored(view) else None
        self._a = self._mid = None

    @contextlib.contextmanager
    def hooked(self):
        v = self.view
        hooks = [get_path(v.layer, _mid_norm(v)).register_forward_pre_hook(self._on_mid),
                 v.down_module().register_forward_hook(self._on_down)]
        if v.attn is not None:
            hooks.append(v.o_module().register_forward_hook(self._on_o))
        if self.scores is not None:
            hooks += self._score_hooks()
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    def _score_hooks(self) -> list:
        """Hooks keeping each window's original scores and attention of the sampled queries (the QK re-fit's
        targets, `scores.sampled_scores`; float32 on the CPU)."""
        v, hooks = self.view, []
        rotary = rotary_hook(v, hooks)
        window = v.sliding_window(getattr(v.attn, "config", None))

        def on_qkv(q, k, _v):
            q, k, cos, sin = rotary(v.query_of(q), k)
            q, k = (x * cos[:, :, None] + rotate_half(x) * sin[:, :, None] for x in (q.float(), k.float()))
            s, p = sampled_scores(q, k, v.scaling(), window=window, softcap=v.softcap())
            self.scores.append((s.cpu(), p.cpu()))
        return hooks + qkv_hooks(v, on_qkv)

    def _on_o(self, mod, args, y):
        self._a = y.float()

    def _on_mid(self, mod, args):
        w, mid = len(self.mlp), args[0].float()
        h_o = self.h_o[w].to(mid.device).float()
        if self._a is not None:
            if w == 0:
                _check(self.view, "h + o_proj(...)", mid, h_o + self._a)
            self.att.append((self._a + h_o - self.h_c[w].to(mid.device).float()).cpu())
        self._mid, self._a = mid, None

    def _on_down(self, mod, args, y):
        self.mlp.append((y.float() + self._mid).cpu())

    def check_outputs(self, out: list[Tensor]) -> None:
        """The layer's output is the stream after attention plus the MLP's (window 0)."""
        _check(self.view, "mid + down_proj(...)", out[0].float(), self.mlp[0])


def _mid_norm(view) -> str:
    norm = view.spec.norms[1] if len(view.spec.norms) > 1 else None
    lacks = ("routed experts" if view.experts is not None else "no dense MLP" if not view.has_mlp
             else None if norm and find_path(view.layer, norm) is not None else "no norm before its MLP")
    if lacks:
        raise UnsupportedModelError(
            f"layer {view.index}: the sequential re-fit (seq_refit=True) needs pre-norm residual layers with a "
            f"dense MLP behind a second norm (Llama, Qwen2, Mistral layouts); this layer has {lacks}")
    return norm


def _check(view, what: str, got: Tensor, want: Tensor) -> None:
    problem = _mismatch(view, what, got, want)
    if problem:
        raise UnsupportedModelError(problem)


def _mismatch(view, what: str, got: Tensor, want: Tensor) -> str | None:
    err = float((got.float() - want.float()).norm() / got.float().norm().clamp_min(1e-30))
    if err <= TOLERANCE:
        return None
    return (f"layer {view.index}: the sequential re-fit (seq_refit=True) needs the attention and MLP outputs added "
            f"straight onto the residual stream; the stream here is not {what} (relative difference {err:.2g}: "
            f"post-norms, a parallel block or scaled residuals): leave seq_refit off for this model")


def _recorder(rec: dict):
    """put(key, tensor or tuple): keep the first value seen under key (a hook's return value stays None)."""
    def put(k, t) -> None:
        rec.setdefault(k, t[0] if isinstance(t, tuple) else t)
    return put


@torch.no_grad()
def layout_problem(model: nn.Module, views, ids: Tensor) -> str | None:
    """Why the sequential re-fit cannot run on `model` (None: it can), before any calibration: every active layer's
    structure (a dense MLP behind a second norm), then the residual identities on one short window through the whole
    model (mid = h + o_proj(..), out = mid + down_proj(..), the check each layer's statistics pass repeats)."""
    seen: dict[int, dict] = {}
    hooks = []
    try:
        for v in views:
            if v.left:
                continue
            put = _recorder(seen.setdefault(v.index, {}))
            hooks += [v.layer.register_forward_pre_hook(
                          lambda m, a, kw, put=put: put("h", a[0] if a else kw["hidden_states"]), with_kwargs=True),
                      v.layer.register_forward_hook(lambda m, a, y, put=put: put("out", y)),
                      get_path(v.layer, _mid_norm(v)).register_forward_pre_hook(lambda m, a, put=put: put("mid", a)),
                      v.down_module().register_forward_hook(lambda m, a, y, put=put: put("m", y))]
            if v.attn is not None:
                hooks.append(v.o_module().register_forward_hook(lambda m, a, y, put=put: put("a", y)))
        model(input_ids=ids)
    except UnsupportedModelError as e:
        return str(e)
    finally:
        for h in hooks:
            h.remove()
    for v in views:
        r = seen.get(v.index, {})
        if v.left or not r:
            continue
        problem = ((_mismatch(v, "h + o_proj(...)", r["mid"], r["h"] + r["a"]) if "a" in r else None)
                   or _mismatch(v, "mid + down_proj(...)", r["out"], r["mid"] + r["m"]))
        if problem:
            return problem
    return None


def out_linear(layer: nn.Module, view, part: str) -> nn.Linear:
    """The projection the re-fit changes in `layer` as it is now (compact modules swapped in): "o" or "down"."""
    if part == "o":
        attn = find_path(layer, view.spec.attn)
        lin = attn.o_proj if isinstance(attn, ReducedHeadAttention) else view.o_module()
    else:
        mlp = find_path(layer, view.mlp_path)
        lin = mlp.down_proj if isinstance(mlp, ReducedMLP) else view.down_module()
    if type(lin) is not nn.Linear:
        raise UnsupportedModelError(f"layer {view.index}: the sequential re-fit changes a plain nn.Linear "
                                    f"{part}_proj; this layer holds {type(lin).__name__}")
    return lin


class _Fit:
    """Sums of u u^T (`GramSum`), u t^T and |t|^2 for `lin`'s input u (a forward pre-hook) and the target t of the
    current window `w` (target(w, device), bias taken off): products in the compute dtype (float32 at least), summed
    in float64, apart for the `held` windows (the damping's choice); the window's forward stops there (`_Stop`).
    `keep`: also keep each window's input (model dtype, on the CPU)."""

    def __init__(self, lin: nn.Linear, target, keep: bool = False, held: set[int] = frozenset()):
        self.lin, self.target, self.w, self.keep, self.held = lin, target, 0, keep, held
        self.grams = [GramSum(), GramSum()]                     # u^T u of [the fitted, the held-out] windows
        self.sums = [[0.0, 0.0, 0] for _ in range(2)]           # [fit, held out] x [u^T t, |t|^2, tokens]
        self.inputs: list[Tensor] = []

    def __call__(self, mod, args):
        x = args[0]
        u = x.reshape(-1, x.shape[-1])
        u = u if u.dtype in (torch.float32, torch.float64) else u.float()
        t = self.target(self.w, u.device).reshape(-1, self.lin.out_features).to(u.dtype)
        if self.lin.bias is not None:
            t = t - self.lin.bias.to(u.dtype)
        fold = self.w in self.held
        self.grams[fold].add(u)
        s = self.sums[fold]
        s[0], s[1], s[2] = s[0] + (u.T @ t).double(), s[1] + float(t.double().square().sum()), s[2] + u.shape[0]
        if self.keep:
            self.inputs.append(x.to("cpu"))
        raise _Stop                     # what the layer computes after this input is not needed

    def _fold(self, f: int) -> list:
        """[g, c, tt, n] of fold f (0: fitted, 1: held out)."""
        g = self.grams[f].value()
        return [0.0 if g is None else g, *self.sums[f]]

    @staticmethod
    def _error(s, w: Tensor) -> float:
        """Mean squared error of u -> t with weight w (in, out) on sums s, relative to the target's mean square."""
        g, c, tt, _ = s
        e = (w * (g @ w)).sum() - 2 * (w * c).sum() + tt
        return float(e / max(tt, 1e-300))

    def _total(self) -> list:
        return [a + b for a, b in zip(self._fold(0), self._fold(1))]

    def choose(self, w0: Tensor) -> float:
        """The damping of GRID whose fit on the kept windows has the least error on the held-out ones."""
        (g, c, _, n), held = self._fold(0), self._fold(1)
        if not held[3]:
            raise CalibrationError("refit_damping='heldout' needs at least two calibration windows")
        return least_error(lambda d: self._error(held, ridge_refit(g / n, c / n, w0, d)))

    def solve(self, damping: float | str) -> tuple[float, float, float]:
        """Re-fit lin.weight in place on every window; (relative error before, after, the damping used)."""
        w0 = self.lin.weight.double().T
        damping = self.choose(w0) if damping == HELDOUT else damping
        g, c, tt, n = s = self._total()
        w = ridge_refit(g / n, c / n, w0, damping)
        before, after = self._error(s, w0), self._error(s, w)
        self.lin.weight.copy_(w.T.to(self.lin.weight.dtype))
        return before, after, damping


class _QKFit:
    """Sums of the QK re-fit of compressed attention `attn` (`scores.refit_sums`: its kept pairs' queries and keys
    on h_C toward the original scores and attention of `targets.scores`), apart for the `held` windows; called as
    a forward pre-hook of the attention (with kwargs), it stops the window's forward there."""

    def __init__(self, attn: ReducedHeadAttention, targets: Targets, scaling: float, held: set[int]):
        self.attn, self.targets, self.scaling, self.held, self.w = attn, targets, scaling, held, 0
        self.sums: list[tuple | None] = [None, None]                # (A, b, c) of [the fitted, the held-out] windows

    def __call__(self, mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        q, k = mod.rotated_qk(x, kwargs.get("position_embeddings"))                   # (B,H|Hkv,T,r)
        s, p = (t.to(x.device) for t in self.targets.scores[self.w])
        new = refit_sums(q.transpose(1, 2), k.transpose(1, 2), s, p, self.scaling)
        f = self.w in self.held
        self.sums[f] = new if self.sums[f] is None else tuple(a + b for a, b in zip(self.sums[f], new))
        raise _Stop

    def solve(self, damping: float | str) -> tuple[float, float, float]:
        """Fit the kept query pairs' gains on every window and multiply them into q_proj; (relative error before,
        after, the damping used)."""
        fit, held = self.sums
        if damping == HELDOUT:
            if held is None:
                raise CalibrationError("refit_damping='heldout' needs at least two calibration windows")
            damping = least_error(lambda d: float(qk_refit.theta_error(*held, qk_refit.fit_theta(*fit[:2], d)).sum()))
        a, b, c = fit if held is None else tuple(x + y for x, y in zip(fit, held))
        th = qk_refit.fit_theta(a, b, damping)
        scale = float(c.sum()) or 1.0
        before = float(qk_refit.theta_error(a, b, c, qk_refit.theta0(b)).sum()) / scale
        after = float(qk_refit.theta_error(a, b, c, th).sum()) / scale
        attn, gains = self.attn, qk_refit.gains_of(th)                                # (H, r/2, 2)
        for t in (attn.q_proj.weight, attn.q_proj.bias):
            if t is not None:
                cols = t.detach().double().reshape(attn.num_heads, attn.qk_dim, -1).mT    # (H, d_in | 1, r)
                t.data.copy_(qk_refit.gain_rows(cols, gains).mT.reshape(t.shape).to(t.dtype))
        return before, after, damping


class _Stop(Exception):
    """Raised by a fit's hook once it has read its input: the rest of the layer is not run for that window."""


def _through(layer, i, calls, shapes, h_c, hooks, fit=None, keep=False, put=None) -> list[Tensor]:
    """Every window's h_C through `layer` with (module, pre?, fn) hooks attached, `fit` told the window (the layer
    stops where the fit has read its input); the outputs (on the CPU) when keep: returned, or given to put(b, h)."""
    out, handles = [], []
    put = put or (lambda b, y: out.append(y))
    for mod, pre, fn in hooks:          # pre: True, "kw" (a pre-hook given the keyword arguments too) or False
        handles.append(mod.register_forward_pre_hook(fn, with_kwargs=pre == "kw") if pre else
                       mod.register_forward_hook(fn))
    device = next(layer.parameters()).device
    try:
        for b, shape in enumerate(shapes):
            if fit is not None:
                fit.w = b
            try:
                through_layer(layer, i, calls, [shape], lambda _, b=b: h_c[b],
                              (lambda _, y, b=b: put(b, y)) if keep else None, device)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return out


@torch.no_grad()
def refit_layer(layer: nn.Module, view, calls: dict, shapes: list, h_c, targets: Targets,
                damping: dict[str, float | str], put=None) -> tuple[list[Tensor], dict[str, tuple]]:
    """Re-fit compressed `layer`'s query gains (full-RoPE layers), its o_proj, then its down_proj (the parts in
    `damping`, see `dampings`) on h_C (h_c[b]: window b's) toward `targets`; returns (h_C after the layer: a list,
    or [] when given to put(b, h) instead, {part: (relative error before, after, damping used)})."""
    i, errors, held = view.index, {}, held_out(len(shapes))
    attn = find_path(layer, view.spec.attn) if view.attn is not None else None
    if "qk" in damping and targets.scores and isinstance(attn, ReducedHeadAttention) and attn.rot_dim == attn.qk_dim:
        fit = _QKFit(attn, targets, view.scaling(), held)
        _through(layer, i, calls, shapes, h_c, [(attn, "kw", fit)], fit)               # up to the scores only
        errors["qk"] = fit.solve(damping["qk"])
    if "o" in damping and view.attn is not None:
        fit = _Fit(out_linear(layer, view, "o"), lambda w, dev: targets.att[w].to(dev), held=held)
        _through(layer, i, calls, shapes, h_c, [(fit.lin, True, fit)], fit)        # attention only
        errors["o"] = fit.solve(damping["o"])
    if "down" in damping:
        lin = out_linear(layer, view, "down")
        tokens = sum(s[0] * s[1] for s in shapes)
        keep = tokens * lin.in_features * lin.weight.element_size() <= KEEP_BYTES
        mids: list[Tensor] = []               # every window's mid_C (the norm runs before down_proj)
        fit = _Fit(lin, lambda w, dev: targets.mlp[w].to(dev) - mids[w].to(dev).float(), keep, held)
        norm = get_path(layer, _mid_norm(view))
        _through(layer, i, calls, shapes, h_c, [(norm, True, lambda m, a: mids.append(a[0].to("cpu"))),
                                                (fit.lin, True, fit)], fit)
        errors["down"] = fit.solve(damping["down"])
        if keep:                              # out = mid_C + down_proj(u_C): no third pass through the layer
            return _outputs(lin, mids, fit.inputs, put), errors
    return _through(layer, i, calls, shapes, h_c, [], keep=True, put=put), errors


def _outputs(lin: nn.Linear, mids: list[Tensor], inputs: list[Tensor], put=None) -> list[Tensor]:
    """The layer's outputs from its kept stream after attention and down_proj's inputs (the layout check holds the
    layer to out = mid + down_proj(u)): returned, or given to put(b, h)."""
    out, dev = [], lin.weight.device
    for b, (mid, u) in enumerate(zip(mids, inputs)):
        y = (mid.to(dev) + lin(u.to(dev))).to("cpu")
        out.append(y) if put is None else put(b, y)
    return out
