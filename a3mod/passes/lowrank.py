"""The low-rank baselines: PlainSVD, SVDLLM, SVDLLM2 (SVD-LLM V2), ASVD. Each replaces decoder-layer linears by
`LowRankLinear`s.

`ratio` means what it means for A3: the fraction of decoder-layer linear parameters removed (uniform: every
linear keeps rank floor((1-ratio) m n / (m+n))). `rank` gives every linear that rank (capped at min(m, n);
at the cap the factorization is exact). ASVD adds sensitivity-based rank search and a KV-cache mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..arch import LayerView, get_path, linear_params
from ..errors import RatioError, UnsupportedModelError
from ..math import factorize as fz
from ..modules import LatentKVAttention, LowRankLinear
from ..modules.lowrank import LowRankConfig
from .a3 import RatioOrRank
from .base import PassConfig, PassContext, check_ratio_rank, handler, register_pass
from .search import Target, asvd_ranks, targets_of
from ..validate import boolean, fraction, integer, number


@dataclass(frozen=True)
class _Factored(RatioOrRank):
    """allow_larger (with rank): factor even linears whose two factors hold more parameters than the linear (rank
    above in*out / (in+out); exact at the full rank: for checks, never for compression). Refused otherwise."""
    allow_larger: bool = False

    def __post_init__(self):
        super().__post_init__()
        boolean(type(self).__name__, "allow_larger", self.allow_larger)


@register_pass
@dataclass(frozen=True)
class PlainSVD(_Factored):
    """Truncated SVD of every decoder-layer linear, no activation information (the floor to beat)."""
    NEEDS = ()

    def whole_model_stats(self) -> bool:
        return False

    def rebuilds_layers(self) -> bool:
        return False


@register_pass
@dataclass(frozen=True)
class SVDLLM(_Factored):
    """SVD-LLM: truncated SVD of W L, with L the Cholesky factor of the calibration inputs' X^T X."""
    NEEDS = ("gram",)

    def whole_model_stats(self) -> bool:       # uniform ranks: each layer from its own Grams
        return False

    def rebuilds_layers(self) -> bool:
        return False


@register_pass
@dataclass(frozen=True)
class SVDLLM2(_Factored):
    """SVD-LLM V2 (arXiv 2503.12340): SVD-LLM's whitened truncation computed from an eigendecomposition of X^T X
    (no Cholesky), and with `ratio` heterogeneous ranks: within each group of same-type matrices (every layer's
    q_proj, ...) matrix i removes Len(G) R Lt_i / sum Lt of its parameters, Lt_i = 1 / log(L_i), L_i its truncation
    loss ||(W - W_r) X^T||_F at the uniform rank r over the calibration tokens; `rank`: every linear that rank."""
    NEEDS = ("gram",)

    def whole_model_stats(self) -> bool:       # a ratio ranks every layer's matrices against each other
        return self.ratio is not None

    def rebuilds_layers(self) -> bool:
        return False


_ASVD_PROBE = dict(probe_samples=4, probe_seq_len=512)


@register_pass
@dataclass(frozen=True)
class ASVD(PassConfig):
    """ASVD: SVD of W diag(mean|x|^alpha), scaling undone; ranks by perplexity sensitivity.

    Give one of: ratio (fraction of decoder-layer linear params removed), rank (every linear), or
    kv_ratio (KV-cache mode: only k/v are factorized and the cache stores their rank-r latents;
    kv_ratio = fraction of the KV cache removed). rank_search (with ratio or kv_ratio): per-layer ranks
    from calibration perplexity probes on the first probe_samples x probe_seq_len calibration tokens;
    otherwise uniform ranks.
    """
    ratio: float | None = None
    rank: int | None = None
    kv_ratio: float | None = None
    alpha: float = 0.5
    rank_search: bool = True
    allow_larger: bool = False
    probe_samples: int = _ASVD_PROBE["probe_samples"]
    probe_seq_len: int = _ASVD_PROBE["probe_seq_len"]
    NEEDS = ("absmean",)

    def rebuilds_layers(self) -> bool:      # KV-cache mode builds LatentKVAttention from the attention's description
        return self.kv_ratio is not None

    def __post_init__(self):
        given = [n for n in ("ratio", "rank", "kv_ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise RatioError(f"ASVD: give exactly one of ratio=, rank=, kv_ratio= (got {given or 'none'})")
        if self.kv_ratio is None:
            check_ratio_rank("ASVD", self.ratio, self.rank)          # same checks as every other pass
        else:
            fraction("ASVD", "kv_ratio", self.kv_ratio, lo_open=True, what="the fraction of the KV cache removed")
        number("ASVD", "alpha", self.alpha, 0.0, 10.0, what="the exponent of mean|x| in the scaling: 0 = plain SVD, "
               "0.5 = the paper's; above 10 the scales under- or overflow float64 on real activations")
        integer("ASVD", "probe_samples", self.probe_samples, 1)
        integer("ASVD", "probe_seq_len", self.probe_seq_len, 2)
        boolean("ASVD", "rank_search", self.rank_search)
        boolean("ASVD", "allow_larger", self.allow_larger)
        for n, cast in (("ratio", float), ("kv_ratio", float), ("alpha", float), ("rank", int),
                        ("probe_samples", int), ("probe_seq_len", int)):
            if getattr(self, n) is not None:            # plain Python numbers (numpy scalars break JSON)
                object.__setattr__(self, n, cast(getattr(self, n)))




# ------------------------------------------------------------------------------------------ ranks
def _uniform_ranks(cfg, views, targets: list[Target]) -> list[int]:
    if getattr(cfg, "kv_ratio", None) is not None:
        return [max(1, fz.floor((1.0 - cfg.kv_ratio) * t.out_f)) for t in targets]
    if cfg.rank is not None:
        ranks = [min(cfg.rank, t.out_f, t.in_f) for t in targets]
        bigger = [(t, r) for t, r in zip(targets, ranks) if r * (t.out_f + t.in_f) > t.out_f * t.in_f]
        if bigger and not cfg.allow_larger:
            t, r = bigger[0]
            m, n = t.out_f, t.in_f
            raise RatioError(f"{type(cfg).__name__}: rank={cfg.rank} makes {len(bigger)} linears larger as two "
                             f"factors, e.g. layer {t.layer} {t.path} ({m} x {n}: {r * (m + n)} > {m * n} "
                             f"parameters); ranks up to {m * n // (m + n)} save parameters there (allow_larger=True "
                             f"factors anyway)")
        return ranks
    bias = lambda t: 0 if _weight(views[t.layer], t)[1] is None else t.out_f  # noqa: E731  (biases count too)
    return [fz.rank_for_keep(t.out_f, t.in_f, 1.0 - cfg.ratio, bias(t)) for t in targets]


def _weight(view: LayerView, t: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
    w, b = linear_params(get_path(view.layer, t.path), view.spec.conv1d)
    return w[t.rows], (None if b is None else b[t.rows])


def _factor_all(views, targets, ranks, factor_fn, progress, name) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """factor_fn(target, W (out, in), rank) -> (B, A) for every target, with a progress bar; each pair in W's
    dtype as soon as it is made (the float64 solves are not held)."""
    out = []
    for t, r in tqdm(list(zip(targets, ranks)), desc=name, disable=not progress, unit="linear"):
        w = _weight(views[t.layer], t)[0]
        out.append(tuple(f.to(w.dtype) for f in factor_fn(t, w, r)))
    return out


def _lowrank(b: torch.Tensor, a: torch.Tensor, bias, like: torch.Tensor) -> LowRankLinear:
    m = LowRankLinear(LowRankConfig(in_features=a.shape[1], rank=a.shape[0], out_features=b.shape[0],
                                    bias=bias is not None), device=like.device, dtype=like.dtype)
    with torch.no_grad():
        m.in_proj.weight.copy_(a)
        m.out_proj.weight.copy_(b)
        if bias is not None:
            m.out_proj.bias.copy_(bias)
    return m


def _replace_linears(views, targets, factors) -> list:
    out = []
    for t, (b, a) in zip(targets, factors):
        mod = get_path(views[t.layer].layer, t.path)
        lr = _lowrank(b, a, _weight(views[t.layer], t)[1], mod.weight)
        lr.train(mod.training)
        out.append((t.layer, t.path, lr))
    return out


# ---------------------------------------------------------------------------------------- handlers
@handler(PlainSVD, scope="model")
def apply_plain(cfg: PlainSVD, ctx: PassContext):
    views, progress = ctx.views, ctx.progress
    targets = targets_of(views, kv=False, only=ctx.layers)
    ranks = _uniform_ranks(cfg, views, targets)
    fn = lambda t, w, r: fz.svd_factors(w, r)  # noqa: E731
    return _replace_linears(views, targets, _factor_all(views, targets, ranks, fn, progress, "plain SVD"))


@handler(SVDLLM, scope="model")
def apply_svdllm(cfg: SVDLLM, ctx: PassContext):
    views, stats, progress = ctx.views, ctx.stats, ctx.progress
    targets = targets_of(views, kv=False, only=ctx.layers)
    ranks = _uniform_ranks(cfg, views, targets)
    fn = lambda t, w, r: fz.svdllm_factors(w, stats.layers[t.layer][f"x2.{t.group}"] / stats.n, r)  # noqa: E731
    return _replace_linears(views, targets, _factor_all(views, targets, ranks, fn, progress, "SVD-LLM"))


@handler(SVDLLM2, scope="model")
def apply_svdllm2(cfg: SVDLLM2, ctx: PassContext):
    views, stats, progress = ctx.views, ctx.stats, ctx.progress
    targets = targets_of(views, kv=False, only=ctx.layers)
    gram = lambda t: stats.layers[t.layer][f"x2.{t.group}"]  # noqa: E731
    ranks = _uniform_ranks(cfg, views, targets)
    if cfg.ratio is not None:           # ranks from the spectra first, then one decomposition at a time
        spectra = [fz.whitened_spectrum(_weight(views[t.layer], t)[0], gram(t))
                   for t in tqdm(targets, desc="SVD-LLM V2 spectra", disable=not progress, unit="linear")]
        ranks = _svdllm2_ranks(cfg.ratio, views, targets, ranks, spectra)
    fn = lambda t, w, r: fz.stable_truncate(fz.stable_whitened_svd(w, gram(t)), r)  # noqa: E731
    return _replace_linears(views, targets, _factor_all(views, targets, ranks, fn, progress, "SVD-LLM V2"))


def _svdllm2_ranks(ratio: float, views, targets: list[Target], uniform: list[int], spectra) -> list[int]:
    """SVD-LLM V2's allocation: per group of same-type matrices (same path in every layer), matrix i removes
    ratio_i = Len(G) R Lt_i / sum_G Lt of its parameters, Lt_i = 1 / log(L_i) with L_i its truncation loss at the
    uniform rank (clipped to [0, 0.99]); ranks by `rank_for_keep` as for uniform ranks."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault((t.path, t.role, t.out_f, t.in_f), []).append(i)
    ranks = list(uniform)
    for members in groups.values():
        loss = [float(spectra[i][uniform[i]:].square().sum().sqrt()) for i in members]
        lt = [1.0 / max(math.log(x), 1e-6) if x > 1.0 else 1e6 for x in loss]      # L <= 1: nothing to lose
        for i, w in zip(members, lt):
            r_i = min(0.99, max(0.0, len(members) * ratio * w / sum(lt)))
            t = targets[i]
            bias = 0 if _weight(views[t.layer], t)[1] is None else t.out_f
            ranks[i] = fz.rank_for_keep(t.out_f, t.in_f, 1.0 - r_i, bias)
    return ranks


@handler(ASVD, scope="model")
def apply_asvd(cfg: ASVD, ctx: PassContext):
    model, views, stats, calib, progress = ctx.model, ctx.views, ctx.stats, ctx.calib, ctx.progress
    kv = cfg.kv_ratio is not None
    if kv:
        _check_kv_mode(model, views)
    targets = targets_of(views, kv=kv)
    scale = lambda t: fz.asvd_scale(stats.layers[t.layer][f"xa.{t.group}"] / stats.n, cfg.alpha)  # noqa: E731
    if cfg.rank is None and cfg.rank_search:
        ranks = asvd_ranks(cfg, model, views, targets, scale, stats, calib, progress)
    else:
        ranks = _uniform_ranks(cfg, views, targets)
    keep = [i for i, r in enumerate(ranks) if r is not None]          # rank None: the search left it dense
    targets, ranks = [targets[i] for i in keep], [ranks[i] for i in keep]
    fn = lambda t, w, r: fz.asvd_factors(w, stats.layers[t.layer][f"xa.{t.group}"] / stats.n, cfg.alpha, r)  # noqa: E731
    factors = _factor_all(views, targets, ranks, fn, progress, "ASVD")
    if not kv:
        return _replace_linears(views, targets, factors)
    by_layer: dict[int, dict[str, tuple]] = {}
    for t, f in zip(targets, factors):
        by_layer.setdefault(t.layer, {})[t.role] = f
    rotary = get_path(model, views[0].spec.rotary) if views[0].spec.rotary and views[0].dims.rot_dim else None
    return [(i, views[i].spec.attn, _latent_attention(model.config, views[i], f["k"], f["v"], rotary))
            for i, f in sorted(by_layer.items())]


def _check_kv_mode(model, views) -> None:
    c, d = model.config, views[0].dims
    if views[0].spec.attn_gate:
        raise UnsupportedModelError(f"ASVD KV-cache mode does not support an attention output gate (from "
                                    f"{views[0].spec.attn_gate!r}); use ratio= instead")
    if views[0].spec.qk_norm or views[0].softcap() is not None:
        raise UnsupportedModelError(f"ASVD KV-cache mode does not support qk-norm ({views[0].spec.qk_norm}) or "
                                    f"attention logit softcap ({views[0].softcap()}); use ratio= instead")
    if getattr(c, "sliding_window", None) is not None and getattr(c, "use_sliding_window", True):
        raise UnsupportedModelError(f"ASVD kv_ratio= (KV-cache mode) does not support sliding-window attention "
                                    f"(config.sliding_window={c.sliding_window}); use ratio= instead")
    if d.rope not in (None, "rotate_half"):
        raise UnsupportedModelError(f"ASVD KV-cache mode supports rotate_half RoPE or no RoPE, not {d.rope!r}")


def _latent_attention(config, v: LayerView, fk, fv, rotary) -> LatentKVAttention:
    d, old = v.dims, v.attn
    (wq, bq), (_, bk), (_, bv) = v.qkv_params()
    wo, bo = v.o_params()
    attn = LatentKVAttention(
        config, v.index, hidden=d.hidden, heads=d.heads, kv_heads=d.kv_heads, head_dim=d.head_dim,
        k_rank=fk[1].shape[0], v_rank=fv[1].shape[0], rot_dim=d.rot_dim,
        scaling=v.scaling(), bias=dict(q=bq is not None, k=bk is not None, v=bv is not None, o=bo is not None),
        is_causal=v.is_causal(), dropout=v.attn_dropout(), out_dropout=v.out_dropouts()[0], device=wq.device,
        dtype=wq.dtype)
    with torch.no_grad():
        for lin, (w, b) in ((attn.q_proj, (wq, bq)), (attn.o_proj, (wo, bo))):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        for lr, (b_, a_), bias in ((attn.k_proj, fk, bk), (attn.v_proj, fv, bv)):
            lr.in_proj.weight.copy_(a_)
            lr.out_proj.weight.copy_(b_)
            if bias is not None:
                lr.out_proj.bias.copy_(bias)
    attn.attach_rotary(rotary)
    attn.train(old.training)
    return attn

