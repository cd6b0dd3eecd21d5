"""The A3 pass configs (frozen, versioned: `passes.base`): A3QK, A3OV, A3MLP, A3Experts and `a3_passes`, and the
cross-layer RoPE pair ranking A3QK(portable=True) resolves to. Their handlers are in passes/a3.py."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..arch import active
from ..errors import RatioError
from ..math import solvers
from ..pipeline.rewrite import rope_perm
from ..validate import boolean, integer, number
from .base import PassConfig, check_multiple, check_ratio_rank, register_pass


@dataclass(frozen=True)
class RatioOrRank(PassConfig):
    """Give exactly one: `ratio` (fraction of the component's parameters removed) or `rank` (kept dim)."""
    ratio: float | None = None
    rank: int | None = None
    NEEDS = ("a3",)

    def __post_init__(self):
        check_ratio_rank(type(self).__name__, self.ratio, self.rank)
        if self.ratio is not None:              # plain Python numbers (numpy scalars JSON-round-trip badly)
            object.__setattr__(self, "ratio", float(self.ratio))
        if self.rank is not None:
            object.__setattr__(self, "rank", int(self.rank))


@dataclass(frozen=True)
class _A3Dims(RatioOrRank):
    """multiple_of (with ratio): round the kept dim to a multiple of this as well (8 or 16 suit SIMD and
    tensor-core kernels: odd head dims run slower, see evals/bench_speed.py). Default: whole RoPE pairs for q/k,
    even v/o heads, multiples of 8 for MLPs of >= 512 neurons.
    ranks (instead of ratio / rank): the kept dim of every decoder layer, by layer index (None: the component stays
    whole there), as `Allocate` resolves to (`at_layer` gives one layer's config)."""
    multiple_of: int | None = None
    ranks: tuple[int | None, ...] | None = None

    def __post_init__(self):
        if self.ranks is None:
            super().__post_init__()
            check_multiple(type(self).__name__, self.multiple_of, self.rank)
            return
        name = type(self).__name__
        if self.ratio is not None or self.rank is not None or self.multiple_of is not None:
            raise RatioError(f"{name}: ranks= gives every layer's kept dim; it takes no ratio=, rank= or "
                             f"multiple_of= (got ratio={self.ratio}, rank={self.rank}, multiple_of={self.multiple_of})")
        if not isinstance(self.ranks, (list, tuple)) or not self.ranks:
            raise RatioError(f"{name}: ranks={self.ranks!r} must be a non-empty list of kept dims (or None), one per "
                             f"decoder layer")
        object.__setattr__(self, "ranks", tuple(None if r is None else integer(name, "ranks[i]", r, error=RatioError)
                                                for r in self.ranks))

    def at_layer(self, index: int):
        """This config for layer `index` alone: itself without `ranks`; with them, rank= that layer's kept dim (None:
        the component stays whole in that layer)."""
        if self.ranks is None:
            return self
        r = self.ranks[index] if index < len(self.ranks) else None
        return None if r is None else replace(self, ranks=None, rank=r)


@register_pass
@dataclass(frozen=True)
class A3QK(_A3Dims):
    """Shrink the query/key head dim: ratio = fraction of q_proj + k_proj parameters removed.

    portable: under RoPE, keep the same RoPE pairs in every KV group of every layer, ranked by the calibration
    scores summed over all of them (`solvers.shared_pair_order`), so a stock export (`a3mod.save(format="hf")`)
    needs no padding: one head dim and one vector of frequencies. `apply` resolves it into `pair_order` (the
    ranking, recorded with the passes); give `pair_order` to reuse a ranking (e.g. when streaming).

    update: under RoPE, choose the kept pairs and fit a complex gain per kept query pair (a 2 x 2 rotation-scale
    of its two q_proj rows, which commutes with RoPE) to the attention-weighted, per-query-centred score error of
    the original model (kind "qkgram"; `a3mod.math.qk_refit`, docs/method_extensions.md "QK update"): same shapes
    and KV cache, exact at full rank, never worse on that objective than plain selection of the same pairs.
    Layers without full RoPE (partial rotary, NoPE, qk-norm, latent attention) keep A3's solution. With
    `pair_order` / portable the pairs are those of the ranking and only the gains are fitted. damping: the ridge
    pull of the gains toward 1, relative to the Gram's mean diagonal.

    seq_refit (with update): then, layer by layer, fit the kept query pairs' gains again on the queries and keys the
    *compressed* model gives the layer, toward the *original* model's scores under its attention
    (`a3mod.pipeline.seq_refit`, docs/method_extensions.md "Sequential QK re-fit"); refit_damping as A3OV's."""
    portable: bool = False
    pair_order: tuple[int, ...] | None = None
    update: bool = False
    damping: float = 0.01
    seq_refit: bool = False
    refit_damping: float | str | None = None

    def __post_init__(self):
        super().__post_init__()
        boolean("A3QK", "portable", self.portable, error=RatioError)
        boolean("A3QK", "update", self.update, error=RatioError)
        number("A3QK", "damping", self.damping, lo=0.0, error=RatioError)
        object.__setattr__(self, "damping", float(self.damping))
        check_refit("A3QK", self)
        if self.seq_refit and not self.update:
            raise RatioError("A3QK: seq_refit=True re-fits the query gains of the QK update: set update=True too")
        po = self.pair_order
        if po is not None:
            po = tuple(po) if isinstance(po, (list, tuple)) else po
            if not isinstance(po, tuple) or sorted(po) != list(range(len(po))) or not po:
                raise RatioError(f"A3QK: pair_order={self.pair_order!r} must be a ranking (a permutation of "
                                 f"0..n-1) of the RoPE pairs")
            object.__setattr__(self, "pair_order", tuple(int(i) for i in po))

    def whole_model_stats(self) -> bool:
        return self.portable and self.pair_order is None

    def stat_kinds(self) -> tuple[str, ...]:
        return ("a3", "qkgram") if self.update else ("a3",)

    def resolve(self, views, stats) -> "A3QK":
        """portable without pair_order: the ranking from all layers' statistics."""
        if not self.portable or self.pair_order is not None or stats is None:
            return self
        return replace(self, pair_order=tuple(portable_pair_order(views, stats)))


def check_refit(name: str, cfg) -> None:
    """seq_refit a boolean; refit_damping None, a number >= 0 (made a float) or "heldout", and only with seq_refit."""
    boolean(name, "seq_refit", cfg.seq_refit, error=RatioError)
    if cfg.refit_damping is not None and cfg.refit_damping != "heldout":
        number(name, "refit_damping", cfg.refit_damping, lo=0.0, error=RatioError,
               what='or None (the damping) or "heldout"')
        object.__setattr__(cfg, "refit_damping", float(cfg.refit_damping))
    if cfg.refit_damping is not None and not cfg.seq_refit:
        raise RatioError(f"{name}: refit_damping={cfg.refit_damping!r} is the sequential re-fit's damping: "
                         f"set seq_refit=True too (or leave refit_damping None)")


@dataclass(frozen=True)
class _A3Refit(_A3Dims):
    """update: re-fit the output projection by least squares after the reduction (kind REFIT_KIND statistics);
    damping >= 0: the ridge pull toward the reduction's own weights, relative to the Gram's mean diagonal.
    seq_refit: then, layer by layer, re-fit it again on the inputs the *compressed* model gives it (earlier layers
    and this layer's compressed parts in place) toward the *original* model's output plus the residual-stream drift
    (`a3mod.pipeline.seq_refit`; docs/method_extensions.md "Sequential re-fit"): the same shapes, about two more
    passes of the calibration windows through each compressed layer; pre-norm residual layers with a dense MLP.
    refit_damping: the re-fit's damping: None (the pass's damping), a number >= 0, or "heldout" (per layer, the one of
    `seq_refit.GRID` whose fit on the other windows is best on every HOLD-th window; then fitted on all of them)."""
    update: bool = False
    damping: float = 0.01
    seq_refit: bool = False
    refit_damping: float | str | None = None
    REFIT_KIND = ""

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        boolean(name, "update", self.update, error=RatioError)
        number(name, "damping", self.damping, lo=0.0, error=RatioError)
        object.__setattr__(self, "damping", float(self.damping))
        check_refit(name, self)

    def stat_kinds(self) -> tuple[str, ...]:
        return ("a3", self.REFIT_KIND) if self.update else ("a3",)


@register_pass
@dataclass(frozen=True)
class A3OV(_A3Refit):
    """Shrink the value/output head dim: ratio = fraction of v_proj + o_proj parameters removed.

    update: then re-fit o_proj on the kept value dims of every head jointly, W_o' = (T^T G T)^-1 T^T G W_o with
    G = E[z z^T] the Gram of o_proj's input (all heads) and T the block map of each KV group's kept value basis
    (docs/method_extensions.md, "OV least-squares update"): exact at full rank, never worse on the calibration
    tokens than A3OV's own o_proj (latent attention too: its heads' value blocks, no value bias)."""
    REFIT_KIND = "ogram"


@register_pass
@dataclass(frozen=True)
class A3MLP(_A3Refit):
    """Keep the most important MLP neurons: ratio = fraction of MLP parameters removed.

    update: also re-fit the kept neurons' down_proj rows by least squares to what the dropped neurons contributed,
    W_K + H_KK^-1 H_KD W_D with H = E[h h^T] the Gram of the intermediate activations (docs/method_extensions.md,
    "MLP least-squares update"): same shapes, exact at full rank, never worse on the calibration tokens than
    selection alone. It estimates a d_i x d_i Gram, so it needs many tokens (a warning below `REFIT_TOKENS` per
    neuron) and holds that Gram per layer in memory (float64). damping: the ridge pull toward the selected rows,
    times H_KK's mean diagonal.
    select: which neurons are kept: "cur" (A3's score E[h_i^2] ||W_down[i]||^2), "obs" (structured OBS with
    update=True: greedy removal by the error left after the update, `solvers.mlp_obs_order`; H damped as above) or
    "taylor" (the language-model loss's sensitivity to each neuron, E[(h_i dL/dh_i)^2], from a backward pass of the
    calibration windows through the whole model: kind "taylor", `calib.taylor`; not in streaming)."""
    select: str = "cur"
    REFIT_KIND = "hgram"
    SELECTS = ("cur", "obs", "taylor")

    def __post_init__(self):
        super().__post_init__()
        if self.select not in self.SELECTS:
            raise RatioError(f"A3MLP: select={self.select!r}; allowed: {', '.join(self.SELECTS)}")
        if self.select == "obs" and not self.update:
            raise RatioError("A3MLP: select='obs' keeps the neurons the least-squares update reconstructs worst: "
                             "set update=True too")

    def stat_kinds(self) -> tuple[str, ...]:
        return super().stat_kinds() + (("taylor",) if self.select == "taylor" else ())


@register_pass
@dataclass(frozen=True)
class A3Experts(_A3Dims):
    """Keep the most important neurons of every routed expert of an MoE layer (the same number in each; the router
    and top-k untouched): ratio = fraction of the routed experts' parameters removed. The score of a neuron is the
    MLP CUR score over the tokens routed to that expert, each weighted by its squared combine weight (the weight
    scales the expert's output after the down projection; Llama 4 scales the input instead, which the activations
    already carry). An expert routed fewer than `min_tokens` calibration tokens is scored from its weights alone
    (||gate row||^2 ||up row||^2 ||down column||^2: isotropic inputs). Dense layers: nothing to do.
    update: then re-fit each expert's kept down-projection columns by least squares, as A3MLP(update=True) does,
    from the Gram of its combine-weighted activations over the tokens routed to it (kind "ehgram": E x d_e x d_e
    float64 per layer); experts scored from their weights keep their columns. damping: as A3MLP's."""
    min_tokens: int = 16
    update: bool = False
    damping: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        integer(type(self).__name__, "min_tokens", self.min_tokens, lo=0, error=RatioError)
        boolean(type(self).__name__, "update", self.update, error=RatioError)
        number(type(self).__name__, "damping", self.damping, lo=0.0, error=RatioError)
        object.__setattr__(self, "damping", float(self.damping))

    def stat_kinds(self) -> tuple[str, ...]:
        return ("a3", "ehgram") if self.update else ("a3",)


def a3_passes(ratio: float, multiple_of: int | None = None, portable: bool = False) -> list:
    """Uniform A3 at `ratio`: the same fraction removed from QK, OV and MLP (kept dims rounded to `multiple_of`);
    portable: the same RoPE pairs in every layer and KV group (A3QK), for a stock export without padding."""
    return [A3QK(ratio=ratio, multiple_of=multiple_of, portable=portable), A3OV(ratio=ratio, multiple_of=multiple_of),
            A3MLP(ratio=ratio, multiple_of=multiple_of), A3Experts(ratio=ratio, multiple_of=multiple_of)]


def _pair_moments(view, st: dict, n: int):
    """(q2 (Hkv, g, rot), k2 (Hkv, rot)): E[q_j^2], E[k_j^2] of a layer's rotary dims in rotate_half layout."""
    d = view.dims
    p = rope_perm(d.head_dim, d.rot_dim, d.rope)[:d.rot_dim]
    q2 = (st["q"].diagonal(dim1=-2, dim2=-1) / n)[:, p].reshape(d.kv_heads, d.groups, -1)
    return q2, (st["k"].diagonal(dim1=-2, dim2=-1) / n)[:, p]


def portable_pair_order(views, stats) -> torch.Tensor:
    """The RoPE pair ranking shared by every KV group of every layer (`solvers.shared_pair_order`) from the layers
    with rotary q/k that A3QK reduces (qk-norm layers keep whole heads)."""
    scores = []
    for v in active(views):
        if v.spec.mla or v.qk_norm or not v.dims.rot_dim:
            continue
        q2, k2 = _pair_moments(v, stats.layers[v.index], stats.n)
        scores.append(solvers.rope_pair_scores(q2, k2, v.dims.rot_dim, "rotate_half")[0])
    if not scores:
        raise RatioError("A3QK(portable=True): no layer has rotary q/k dims A3QK reduces (no RoPE, qk-norm or "
                         "latent attention); leave portable off")
    return solvers.shared_pair_order(scores)
