"""The ratio asked when a part stays whole: A3 passes that share one ratio ask it of all their components' parameters;
where a part cannot give its share in closed form (QK under q/k norms, Gemma 4's attention) the other components
give it at one raised ratio (docs/method_extensions.md, "The ratio asked when a part stays whole")."""
from __future__ import annotations

from dataclasses import replace

from ..arch import active, find_path
from ..errors import RatioError
from ..pipeline.plan import COMPONENTS
from ..report import linear_param_count
from .a3 import A3QK, COMPONENT_OF, full_dims

PASS_OF = {c: p for p, c in COMPONENT_OF.items()}


def balance(passes, views) -> list:
    """The uniform request met where a component cannot give its share. A3 passes that share one ratio r (as
    `a3_passes(r)` makes them) ask for r of the parameters of those components in the layers a3mod compresses.
    QK stays whole in a layer with q/k norms (a norm needs the whole head), so its share is taken from the other
    components, all raised to one ratio (`raised_ratio`). Anything else (different ratios, ranks, no blocked QK)
    is returned as it is."""
    ratios = {type(p): p.ratio for p in passes if type(p) in COMPONENT_OF}
    if A3QK not in ratios or None in ratios.values() or len(set(ratios.values())) != 1:
        return passes
    r = ratios[A3QK]
    new = raised_ratio(views, r, {COMPONENT_OF[t] for t in ratios})
    if new == r:
        return passes
    return [replace(p, ratio=new) if type(p) in ratios and type(p) is not A3QK else p for p in passes]


def raised_ratio(views, r: float, comps) -> float:
    """The one ratio r' at which the components `comps` other than QK remove r of all their parameters (QK's
    included) in the layers a3mod compresses, QK giving r where it can and nothing under q/k norms:
    r' = r (P_all - P_qk,free) / P_rest (rounded to 6 digits; the one rounding rule then applies to every kept
    dim). r itself when no layer keeps QK whole; a RatioError naming the largest reachable ratio when r' would
    leave a component less than its smallest kept dim."""
    blocked, free_qk, rest, top = 0, 0, 0, 1.0
    for v in active(views):
        whole = find_path(v.layer, v.spec.attn) if v.spec.attn_whole and comps & {"qk", "ov"} else None
        if whole is not None:                                # an attention kept whole by design (Gemma 4)
            blocked += linear_param_count(whole)
        full = full_dims(v)
        for c, n in _component_params(v).items():
            if c not in comps:
                continue
            if c == "qk":
                blocked, free_qk = (blocked + n, free_qk) if v.qk_norm and not v.spec.mla else \
                    (blocked, free_qk + n)
                continue
            rest += n
            top = min(top, 1 - COMPONENTS[c].granule(full[c], False) / full[c])
    if not blocked:
        return r
    total = blocked + free_qk + rest
    new = r * (total - free_qk) / rest if rest else float("inf")
    if new > top + 1e-12:
        reach = (free_qk * r + rest * top) / total if rest else 0.0
        why = (f"the attention stays whole ({views[0].spec.attn_whole})" if views[0].spec.attn_whole else
               "QK stays whole in the layers with q/k norms")
        raise RatioError(f"ratio {r:g} cannot be reached: {why} "
                         f"({blocked / total:.1%} of the parameters a3mod compresses here), and the other components "
                         f"can give at most {top:.3f} each: the largest reachable ratio is {reach:.3f}")
    return round(new, 6)


def _component_params(v) -> dict[str, int]:
    """Parameters of each component of a layer (per kept dim times the full dim; biases left out)."""
    d, full = v.dims, full_dims(v)
    gated = v.has_mlp and (v.spec.gate is not None or v.spec.gate_up is not None)
    out = {c: COMPONENTS[c].dim_params(d.hidden, d.heads, d.kv_heads, {}, gated=gated,
                                       attn_gate=v.spec.attn_gate is not None and not v.spec.attn_gate_head) * f
           for c, f in full.items() if c != "experts"}
    if "experts" in full:
        ev = v.experts_view()
        out["experts"] = COMPONENTS["experts"].dim_params(d.hidden, d.heads, d.kv_heads, {}, gated=ev.gated,
                                                          experts=ev.num) * full["experts"]
    return out
