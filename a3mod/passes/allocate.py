"""A3-mix: per-layer (and optionally per-component) ranks from the closed-form losses, under a parameter budget.

Every A3 handler returns its component's loss for every number of kept units (one spectrum or one sorted
score list), so allocation needs no perplexity probes. Losses are normalised per layer and component so that
they are comparable: normalize="uniform" (default) divides each curve by its own value at uniform A3's rank,
so the allocation minimises the sum of each component's error relative to what uniform A3 would cost it
there. The older choices, "relative" (by the whole output energy, loss at zero kept units) and "absolute",
let a few outlier units (massive activations) dominate a layer's energy: on SmolLM2 they cut layer 11's
MLP to 8 neurons and lose to uniform (20%, 8 x 2048 windows: uniform 34.54, relative 46.40, uniform-normalised
33.76, at the same parameter count). The curves are convex (tail sums of sorted non-negative values), so greedy
removal of the cheapest unit is optimal for the separable problem.

across="layers" (default): each component (QK, OV, MLP) removes exactly as many units as uniform A3 at
`budget` would, moved between layers; the parameter count equals uniform A3's exactly, and identical layers
get uniform ranks. across="all": units also move between components, by loss increase per parameter,
until at least uniform A3's parameter count is removed (overshoot below one unit). Left alone it keeps
the KV cache nearly whole (QK/OV units are cheap in parameters and costly in loss): kv_budget="uniform"
also requires the KV cache to lose at least what uniform A3 at `budget` removes, or a float the fraction
of the cache to remove. Two budgets make the greedy a small Lagrangian search: for each price `mu` of a
cached element (in parameters), remove units by loss increase per (params + mu * cached elements) until
one budget is met, then by the other budget's own price until both are; keep the feasible allocation of
least total loss over the grid KV_PRICES.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from ..arch import active
from ..errors import A3ModError, RatioError, UnsupportedModelError
from ..pipeline.plan import COMPONENTS as PLAN
from ..pipeline.rewrite import LayerWork
from ..validate import boolean, choice, fraction
from .a3 import A3MLP, A3OV, A3QK, A3Experts, build_layer
from .balance import raised_ratio
from .base import PassConfig, PassContext, handler, register_pass, run_pass

COMPONENTS = ("qk", "ov", "mlp", "experts")     # experts: every routed expert of an MoE layer at one width
NORMALIZE = ("uniform", "relative", "absolute")
KV_PRICES = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)  # x params/cached
_PASS = {"qk": A3QK, "ov": A3OV, "mlp": A3MLP, "experts": A3Experts}


@register_pass
@dataclass(frozen=True)
class Allocate(PassConfig):
    """Mixed-rank A3 removing `budget` (fraction of decoder-layer linear params, as uniform A3's ratio)."""
    budget: float
    across: str = "layers"
    normalize: str = "uniform"
    min_keep: float = 0.0          # every layer-component keeps at least this fraction of uniform A3's units
    kv_budget: float | str | None = None   # across="all": KV cache fraction removed at least, or "uniform"
    mlp_update: bool = False       # re-fit each kept MLP by least squares (A3MLP(update=True)) after allocating
    ov_update: bool = False        # re-fit each o_proj by least squares (A3OV(update=True)) after allocating
    qk_update: bool = False        # A3QK(update=True): pairs and query gains fitted to the score error
    seq_refit: bool = False        # A3OV / A3MLP(seq_refit=True): o/down re-fitted on the compressed stream
    refit_damping: float | str | None = None    # the re-fit's damping (A3OV / A3MLP's refit_damping)
    NEEDS = ("a3",)

    def stat_kinds(self) -> tuple[str, ...]:
        if self.per_layer():
            return tuple(dict.fromkeys(k for p in self.layer_passes() for k in p.stat_kinds()))
        return ("a3",) + ("hgram",) * self.mlp_update + ("ogram",) * self.ov_update

    def per_layer(self) -> bool:
        """Whether `apply` resolves this into per-layer A3 passes (`layer_passes` with `ranks`) before it collects any
        Gram: with the QK update or the sequential re-fit, which run inside A3's layer-scope passes. The ranks then
        come from the small statistics' loss curves: A3's own for OV and the MLP (selection before the updates, which
        allocated as well as the post-update MLP curves on SmolLM2: 56.46 vs 56.52), with qk_update QK's after the
        QK update (kind "qkgram"), so every large Gram is collected one layer at a time."""
        return self.qk_update or self.seq_refit

    def layer_passes(self, ranks: dict[tuple[int, str], int] | None = None, layers: int = 0) -> list:
        """The A3 passes this allocation runs as: with `ranks` {(layer, component): kept dim} over `layers` decoder
        layers (absent: the component stays whole there); without, uniform at `budget` with the same options (what
        the checks before calibration look at)."""
        def dims(comp: str) -> dict:
            return (dict(ratio=self.budget) if ranks is None else
                    dict(ranks=tuple(ranks.get((i, comp)) for i in range(layers))))
        fit = dict(seq_refit=self.seq_refit, refit_damping=self.refit_damping)
        return [A3QK(**dims("qk"), update=self.qk_update), A3OV(**dims("ov"), update=self.ov_update, **fit),
                A3MLP(**dims("mlp"), update=self.mlp_update, **fit), A3Experts(**dims("experts"))]

    def __post_init__(self):
        for name in ("mlp_update", "ov_update", "qk_update", "seq_refit"):
            boolean("Allocate", name, getattr(self, name), error=RatioError)
        if self.refit_damping is not None and not self.seq_refit:
            raise RatioError(f"Allocate: refit_damping={self.refit_damping!r} is the sequential re-fit's damping: "
                             f"set seq_refit=True too (or leave refit_damping None)")
        mk = fraction("Allocate", "min_keep", self.min_keep, hi_open=False, what="fraction of uniform's units kept")
        choice("Allocate", "normalize", self.normalize, NORMALIZE)
        budget = fraction("Allocate", "budget", self.budget, what="the fraction of parameters removed")
        choice("Allocate", "across", self.across, ("layers", "all"))
        kv = self.kv_budget
        if kv is not None:
            if self.across != "all":
                raise A3ModError(f"Allocate: kv_budget={kv!r} needs across='all' (across='layers' already removes "
                                 "exactly uniform A3's KV cache)")
            if kv != "uniform":
                kv = fraction("Allocate", "kv_budget", kv, what="allowed: None, 'uniform' or a fraction of the KV "
                              "cache to remove in [0, 1)")
        for name, v in (("budget", budget), ("min_keep", mk), ("kv_budget", kv)):
            object.__setattr__(self, name, v)


@dataclass
class Curve:
    """One layer-component: normalised loss for k = 0..units kept units of `granule` dims each."""
    layer: int
    comp: str
    granule: int
    loss: torch.Tensor       # (units + 1,), loss[units] = 0
    cost: int                # parameters per unit
    uniform: int             # units uniform A3 keeps
    kv: int = 0              # cached elements per token per unit (K for QK, V for OV, 0 for MLPs)

    @property
    def units(self) -> int:
        return self.loss.numel() - 1


def curves(views, stats, budget: float, normalize: str = "uniform", mlp_update: bool = False,
           qk_update: bool = False) -> list[Curve]:
    """Loss curves of every layer and component (one full-rank solve each); mlp_update: the MLP's curves after its
    least-squares update (A3MLP(update=True)); qk_update: QK's those of the QK update's greedy pair removal with
    fitted gains (A3QK(update=True), in full-RoPE layers)."""
    out = []
    raised = raised_ratio(views, budget, set(COMPONENTS))     # QK whole under q/k norms: the others give its share
    for v in active(views):
        work = LayerWork.from_view(v)
        d, a, m = v.dims, work.attn, work.mlp
        full = {} if a is None else {"qk": a.wq.shape[-1], "ov": a.wv.shape[-1]}     # None: a mixer layer's MLP only
        if m is not None:    # an MoE layer may have no dense MLP (only A3KV runs on MoE layers)
            full["mlp"] = m.up[0].shape[0]
        biases = {"q": a is not None and a.q_bias, "k": a is not None and a.k_bias,
                  "up": m is not None and m.up[1] is not None}
        rot = bool(a is not None and a.rot_dim)
        if work.experts is not None:
            ev = v.experts_view()
            full["experts"] = ev.inter
        if v.qk_norm and not v.spec.mla and "qk" in full:
            del full["qk"]       # a norm needs the whole head: no QK curve (and no A3QK) in this layer
        for comp in full:
            c = PLAN[comp]
            granule = c.granule(full[comp], rot)
            if comp == "experts":
                cost = c.dim_params(d.hidden, d.heads, d.kv_heads, {"up": ev.bias}, gated=ev.gated, experts=ev.num)
            else:
                cost = c.dim_params(d.hidden, d.heads, d.kv_heads, biases, gated=m is not None and m.gate is not None,
                                    attn_gate=getattr(a, "wg", None) is not None and not a.gate_head)
            update = (comp == "mlp" and mlp_update) or (comp == "qk" and qk_update)
            cfg = _PASS[comp](rank=full[comp], **({"update": True} if update else {}))
            sol = run_pass(cfg, PassContext(work=work, stats=stats.layers[v.index], n=stats.n, curves=True))
            loss = sol.loss[:: granule // sol.granule].double()                  # per allocation unit
            uni = c.kept(full[comp], budget if comp == "qk" else raised, None, rot) // granule
            ref = {"relative": loss[0], "uniform": loss[uni], "absolute": 1.0}[normalize]
            loss = loss / ref if ref > 0 else torch.zeros_like(loss)
            kv = d.kv_heads * granule if comp in ("qk", "ov") else 0
            out.append(Curve(v.index, comp, granule, loss, cost * granule, uni, kv))
    return out


def allocate(cs: list[Curve], across: str, min_keep: float = 0.0, kv_goal: int = 0) -> list[int]:
    """Kept units per curve: greedy removal of the unit with the smallest loss increase (per parameter if
    across='all'). kv_goal (across='all'): also remove at least this many cached elements per token."""
    kept = [c.units for c in cs]
    floor = [max(1, math.ceil(min_keep * c.uniform)) for c in cs]
    if across == "layers":
        for comp in COMPONENTS:
            g = [i for i, c in enumerate(cs) if c.comp == comp]
            _remove(cs, kept, floor, g, [1] * len(cs), {"units": sum(cs[i].units - cs[i].uniform for i in g)})
        return kept
    goal = sum((c.units - c.uniform) * c.cost for c in cs)
    if kv_goal <= 0:
        _remove(cs, kept, floor, range(len(cs)), [c.cost for c in cs], {"params": goal})
        return kept
    scale = sum(c.units * c.cost for c in cs) / max(1, sum(c.units * c.kv for c in cs))
    best, best_loss = None, math.inf
    for mu in KV_PRICES:
        k = list(kept)
        price = [c.cost + mu * scale * c.kv for c in cs]
        left = _remove(cs, k, floor, range(len(cs)), price, {"params": goal, "kv": kv_goal}, until="any")
        if left["params"] > 0:
            _remove(cs, k, floor, range(len(cs)), [c.cost for c in cs], left)
        elif left["kv"] > 0:
            _remove(cs, k, floor, [i for i, c in enumerate(cs) if c.kv], [c.kv for c in cs], left)
        if sum((c.units - n) * c.kv for c, n in zip(cs, k)) < kv_goal:
            continue                                  # floors left too few cached units to remove
        loss = sum(float(c.loss[n]) for c, n in zip(cs, k))
        if loss < best_loss:
            best, best_loss = k, loss
    if best is None:
        raise RatioError(f"Allocate: the KV budget ({kv_goal} cached elements per token) cannot be met with "
                         f"min_keep={min_keep}")
    return best


def _remove(cs, kept, floor, group, price, goals: dict, until: str = "all") -> dict:
    """Greedy: remove the unit of `group` with the smallest loss increase per price until every goal (or, with
    until='any', one goal) is met. Goals: 'units', 'params' (Curve.cost), 'kv' (Curve.kv). Edits `kept`;
    returns what is left of each goal."""
    left = dict(goals)
    per = {"units": lambda c: 1, "params": lambda c: c.cost, "kv": lambda c: c.kv}

    def open_():
        done = [v <= 0 for v in left.values()]
        return not (any(done) if until == "any" else all(done))

    def key(i):  # loss increase of removing one more unit (rounded: equal up to round-off is a tie);
        c = cs[i]  # ties go to the curve keeping the most units, so identical curves shrink in turn
        delta = float(c.loss[kept[i] - 1] - c.loss[kept[i]]) / price[i]
        return float(f"{delta:.10g}"), -kept[i], i

    heap = [key(i) for i in group if kept[i] > floor[i] and price[i] > 0]
    heapq.heapify(heap)
    while open_() and heap:
        i = heapq.heappop(heap)[-1]
        kept[i] -= 1
        for g in left:
            left[g] -= per[g](cs[i])
        if kept[i] > floor[i]:
            heapq.heappush(heap, key(i))
    return left


def allocated_ranks(cfg: Allocate, views, stats) -> dict[tuple[int, str], int]:
    """{(layer, component): kept dim} of allocation `cfg` from `stats` (the MLP curves after the update when
    cfg.mlp_update and the statistics hold "hgram", QK's after the QK update when cfg.qk_update and they hold
    "qkgram"; A3's own otherwise)."""
    cs = curves(views, stats, cfg.budget, cfg.normalize, cfg.mlp_update and "hgram" in stats.kinds,
                cfg.qk_update and "qkgram" in stats.kinds)
    kv = cfg.kv_budget
    kv_goal = 0 if kv is None else (sum((c.units - c.uniform) * c.kv for c in cs) if kv == "uniform"
                                    else math.ceil(kv * sum(c.units * c.kv for c in cs)))
    kept = allocate(cs, cfg.across, cfg.min_keep, kv_goal)
    return {(c.layer, c.comp): k * c.granule for c, k in zip(cs, kept)}


@handler(Allocate, scope="model")
def apply_allocate(cfg: Allocate, ctx: PassContext):
    model, views, stats = ctx.model, ctx.views, ctx.stats
    if cfg.kv_budget is not None and any(v.qk_norm for v in active(views)):
        raise UnsupportedModelError(f"Allocate(kv_budget={cfg.kv_budget!r}): qk-norm layers keep q/k at the full head "
                                    "dim (the K cache cannot shrink), which this KV budget does not model yet; leave "
                                    "kv_budget unset")
    if cfg.per_layer():
        raise A3ModError("Allocate(qk_update / seq_refit) runs as per-layer A3 passes: give it to a3mod.apply, which "
                         "resolves it (Allocate.layer_passes)")
    ranks = allocated_ranks(cfg, views, stats)
    swaps = []
    for v in active(views):
        update = {"mlp": cfg.mlp_update, "ov": cfg.ov_update}
        passes = [_PASS[c](rank=ranks[v.index, c], **({"update": True} if update.get(c) else {}))
                  for c in COMPONENTS if (v.index, c) in ranks]
        swaps += [(v.index, path, new) for path, new in build_layer(model, v, passes, stats)]
    return swaps


@register_pass
@dataclass(frozen=True)
class A3KV(PassConfig):
    """Attention-only A3 for a KV-cache budget: QK and OV shrink so the cache loses `kv_ratio` of its bytes.

    mixed=False: every layer keeps the same q/k and v/o head dims (uniform A3QK + A3OV at kv_ratio).
    mixed=True: per-layer, per-component dims from the closed-form losses, removing the same number of
    cached elements as uniform (greedy by normalised loss increase per cached element).
    """
    kv_ratio: float
    mixed: bool = False
    NEEDS = ("a3",)

    def __post_init__(self):
        kv = fraction("A3KV", "kv_ratio", self.kv_ratio, what="the fraction of the KV cache removed")
        boolean("A3KV", "mixed", self.mixed)
        object.__setattr__(self, "kv_ratio", kv)


@handler(A3KV, scope="model")
def apply_a3kv(cfg: A3KV, ctx: PassContext):
    model, views, stats = ctx.model, ctx.views, ctx.stats
    if views and views[0].spec.qk_norm:
        raise UnsupportedModelError(f"A3KV: {views[0].spec.qk_norm!r} qk-norm layers keep q/k at the full head dim "
                                    "(the K cache cannot shrink), which this KV budget does not model yet; use "
                                    "a3mod.a3_passes(ratio) or Allocate(budget)")
    cs = [c for c in curves(views, stats, cfg.kv_ratio) if c.comp in ("qk", "ov")]
    for c in cs:                                  # budget unit: cached elements per token
        c.cost = views[c.layer].dims.kv_heads * c.granule
    kept = allocate(cs, "all") if cfg.mixed else [c.uniform for c in cs]   # cost = kv here: one budget
    ranks = {(c.layer, c.comp): k * c.granule for c, k in zip(cs, kept)}
    return [(v.index, path, new) for v in active(views) if v.attn is not None for path, new in
            build_layer(model, v, [_PASS[c](rank=ranks[v.index, c]) for c in ("qk", "ov")], stats, mlp=False)]
