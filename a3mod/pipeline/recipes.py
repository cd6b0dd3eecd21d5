"""Method names -> pass lists: the one table the CLI (`--method`) and every benchmark use.

    recipes.passes("a3", ratio=0.2)    # [A3QK(0.2), A3OV(0.2), A3MLP(0.2), A3Experts(0.2)] (experts: MoE layers)
    recipes.passes("a3-mix", ratio=0.2, across="all")    # [Allocate(0.2, across="all")]
    recipes.passes("a3", kv_ratio=0.5)                   # [A3KV(0.5)]  (attention only, to a KV budget)
    recipes.passes("asvd", kv_ratio=0.5)                 # [ASVD(kv_ratio=0.5)]  (KV-cache mode)

`LABELS` gives each method the name the result tables print.
"""
from __future__ import annotations

from ..errors import RatioError
from ..passes import A3KV, A3MLP, A3OV, A3QK, ASVD, SVDLLM, SVDLLM2, A3Experts, Allocate, PlainSVD

METHODS = ("a3", "a3-mix", "asvd", "svd-llm", "svd-llm-v2", "svd")
MIX_OPTIONS = ("mlp_update", "ov_update", "qk_update", "seq_refit")     # a3 options Allocate (a3-mix) takes too
LABELS = {"a3": "A3", "a3-mix": "A3-mix", "asvd": "ASVD", "svd-llm": "SVD-LLM", "svd-llm-v2": "SVD-LLM V2",
          "svd": "SVD"}


def passes(method: str, ratio: float | None = None, *, kv_ratio: float | None = None, across: str = "layers",
           qk_ratio: float | None = None, ov_ratio: float | None = None, mlp_ratio: float | None = None,
           multiple_of: int | None = None, alpha: float = 0.5, rank_search: bool = True, probe_samples: int = 4,
           probe_seq_len: int = 512, mlp_update: bool = False, ov_update: bool = False, qk_update: bool = False,
           portable: bool = False, seq_refit: bool = False, refit_damping: float | str | None = None,
           mlp_select: str = "cur", kv_budget: float | str | None = None,
           names: dict[str, str] | None = None) -> list:
    """The passes of `method` (see METHODS) at `ratio` (fraction of decoder-layer linear parameters removed) or
    `kv_ratio` (fraction of the KV cache removed). qk/ov/mlp_ratio override `ratio` per A3 component; multiple_of
    rounds A3's kept dims; mlp_update / ov_update re-fit A3's MLP down_proj / o_proj by least squares
    (`A3MLP(update=True)`, `A3OV(update=True)`); qk_update fits A3QK's RoPE pairs and query gains to the
    attention-weighted score error (`A3QK(update=True)`); portable keeps one set of RoPE pairs in every layer
    (`A3QK(portable=True)`: no padding in a stock export); seq_refit re-fits o/down on the compressed stream (damping
    refit_damping); mlp_select "obs": A3MLP's structured OBS (with mlp_update), "taylor": its loss-aware selection
    (a backward pass); alpha, rank_search, probe_*: ASVD's.
    Method a3-mix takes the updates and the re-fit too (`Allocate`), and with across="all" kv_budget ("uniform": a
    KV cache no larger than uniform A3's, or the fraction of it to remove).
    RatioError for a combination that does not make sense, naming it (`names` maps parameter names to how the caller
    spells them, e.g. CLI flags)."""
    n = lambda k: (names or {}).get(k, k)  # noqa: E731
    overrides = any(x is not None for x in (qk_ratio, ov_ratio, mlp_ratio))
    if method not in METHODS:
        raise RatioError(f"method {method!r}; allowed: {', '.join(METHODS)}")
    _check_a3_options(method, n, kv_ratio=kv_ratio, multiple_of=multiple_of, across=across, kv_budget=kv_budget,
                      mlp_update=mlp_update, ov_update=ov_update, qk_update=qk_update, portable=portable,
                      mlp_select=mlp_select, seq_refit=seq_refit, refit_damping=refit_damping)
    if kv_ratio is not None and method not in ("asvd", "a3", "a3-mix"):
        raise RatioError(f"{n('kv_ratio')} is for methods a3, a3-mix or asvd, not {method!r}")
    if method in ("a3", "a3-mix") and kv_ratio is not None:
        if ratio is not None or overrides:
            raise RatioError(f"{n('kv_ratio')} (A3KV, attention only) takes no {n('ratio')} / qk/ov/mlp ratios")
        return [A3KV(kv_ratio=kv_ratio, mixed=method == "a3-mix")]
    if method == "asvd":
        if (ratio is None) == (kv_ratio is None):
            raise RatioError(f"method asvd needs exactly one of {n('ratio')} and {n('kv_ratio')}")
        return [ASVD(ratio=ratio, kv_ratio=kv_ratio, alpha=alpha, rank_search=rank_search,
                     probe_samples=probe_samples, probe_seq_len=probe_seq_len)]
    if ratio is None:
        raise RatioError(f"method {method} needs {n('ratio')} (fraction of decoder-layer linear params removed)")
    if method == "a3":
        pick = lambda x: ratio if x is None else x  # noqa: E731
        m = multiple_of
        return [A3QK(ratio=pick(qk_ratio), multiple_of=m, portable=portable, update=qk_update),
                A3OV(ratio=pick(ov_ratio), multiple_of=m, update=ov_update, seq_refit=seq_refit,
                     refit_damping=refit_damping),
                A3MLP(ratio=pick(mlp_ratio), multiple_of=m, update=mlp_update, seq_refit=seq_refit,
                      refit_damping=refit_damping, select=mlp_select),
                A3Experts(ratio=pick(mlp_ratio), multiple_of=m)]
    if overrides:
        raise RatioError(f"qk/ov/mlp ratios are A3 options; method {method} takes only {n('ratio')}")
    if method == "a3-mix":
        return [Allocate(budget=ratio, across=across, kv_budget=kv_budget, mlp_update=mlp_update, ov_update=ov_update,
                         qk_update=qk_update, seq_refit=seq_refit, refit_damping=refit_damping)]
    return [{"svd-llm": SVDLLM, "svd-llm-v2": SVDLLM2, "svd": PlainSVD}[method](ratio=ratio)]

def _check_a3_options(method: str, n, *, kv_ratio, multiple_of, across, kv_budget, mlp_update, ov_update, qk_update,
                      portable, mlp_select, seq_refit, refit_damping) -> None:
    """RatioError for an A3 option given to a method (or mode) that does not take it; n(name): how the caller spells
    a parameter."""
    if multiple_of is not None and (method != "a3" or kv_ratio is not None):
        raise RatioError(f"{n('multiple_of')} {multiple_of} rounds the dims of method a3 with {n('ratio')}; not of "
                         f"method {method}" + (f" {n('kv_ratio')}" if kv_ratio is not None else ""))
    for flag, on in (("mlp_update", mlp_update), ("ov_update", ov_update), ("qk_update", qk_update),
                     ("portable", portable),
                     ("mlp_select", mlp_select != "cur"), ("seq_refit", seq_refit)):
        mixed = flag in MIX_OPTIONS and method == "a3-mix"
        if on and (method != "a3" and not mixed or kv_ratio is not None):
            raise RatioError(f"{n(flag)} is an option of method a3{' or a3-mix' if flag in MIX_OPTIONS else ''} "
                             f"with {n('ratio')}; not of method {method}"
                             + (f" {n('kv_ratio')}" if kv_ratio is not None else ""))
    if kv_budget is not None and (method != "a3-mix" or across != "all"):
        raise RatioError(f"{n('kv_budget')} is an option of method a3-mix with {n('across')} all")
    if refit_damping is not None and not seq_refit:
        raise RatioError(f"{n('refit_damping')} is the damping of {n('seq_refit')}: give both")
    if mlp_select == "obs" and not mlp_update:
        raise RatioError(f"{n('mlp_select')} {mlp_select} keeps the neurons the MLP's least-squares update rebuilds "
                         f"worst: it needs {n('mlp_update')}")
