"""`a3mod.apply`: rewrite a model in place with compact modules computed by closed-form passes."""
from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..arch import active, layer_views, shared_groups
from ..calib import distributed
from ..calib.stats import WHOLE_MODEL_KINDS, Stats
from ..errors import A3ModError, CalibrationError, UnsupportedModelError
from ..io import native
from ..io.codecs import describe_layer
from ..modules import LatentKVAttention, LowRankLinear, NarrowLinear, ReducedHeadAttention, ReducedMLP
from ..passes import pass_to_dict
from ..passes.a3 import build_layer, preflight
from ..passes.allocate import Allocate, allocated_ranks
from ..passes.balance import balance
from ..passes.base import PassContext, check_passes, needs, pass_list, run_pass, scope_of
from ..quant import is_quantized, quant_swaps, split_quant
from ..quant.base import handler_for
from ..report import linear_param_count, report
from ..validate import nonfinite_weight
from . import layerwise, seq_refit
from .job import ApplyJob
from .undo import UndoLog
from .verify import verify_model

COMPACT = (ReducedHeadAttention, ReducedMLP, LowRankLinear, LatentKVAttention, NarrowLinear)


def apply(model: nn.Module, passes, calib: Tensor | None = None, stats: Stats | None = None,
          progress: bool = True) -> nn.Module:
    """Compress (and/or quantize) `model` in place and return it.

    passes: A3 pass configs (A3QK, A3OV, A3MLP), each with its own ratio or rank; or one baseline
            (PlainSVD, SVDLLM, ASVD); optionally followed by one quantization pass (BnbInt8, Bnb4bit, HQQ),
            which may also be given alone (then the model may already be compressed, e.g. from a3mod.load).
    calib:  (n_samples, seq_len) token ids (see `calibration_data`), or
    stats:  statistics from `collect(model, calib, kinds=...)`, to apply several ratios without recalibrating.
    Each layer is swapped in as soon as it is solved; the modules swapped out are kept (beyond 1 GiB, or
    $A3MOD_UNDO_MEMORY bytes, in temporary files: `a3mod.pipeline.undo`) until the rewrite and its self-check
    succeeded, so an error anywhere puts every one back and leaves the model as it was.
    """
    passes = pass_list(passes)
    if stats is not None and not isinstance(stats, Stats):
        raise CalibrationError(f"stats must be a3mod.Stats (from a3mod.collect or Stats.load), got "
                               f"{type(stats).__name__}")
    passes, quant = split_quant(passes)
    if passes or quant is None:
        passes = check_passes(passes)
    if quant is not None:
        handler_for(quant)                      # its library is installed, before any solving
    check_finite(model)
    views = layer_views(model)
    with UndoLog(model) as undo:
        try:
            with torch.no_grad():       # no autograd graph: it would keep every float64 solve alive
                job = ApplyJob(model=model, views=views, passes=passes, calib=calib, stats=stats,
                               progress=progress, undo=undo)
                info = _rewrite(job, quant)
        except BaseException:
            undo.restore()              # every swapped module back: the model is as it was
            raise
    model.a3mod_info = info
    return native.adopt(model)          # save_pretrained now writes the compressed description (a3mod.io.native)


def _rewrite(job: ApplyJob, quant) -> dict:
    """Compress (each layer swapped in as soon as it is solved; baselines reading every layer: once all are) and
    quantize, every swap logged in `job.undo`; returns the model's new a3mod_info."""
    views = job.views
    swaps, info = _compress(job) if job.passes else ([], _info_so_far(job.model, views))
    if swaps:
        _self_check(job.model, job.calib)
    qswaps = quant_swaps(quant, views, swaps, job.progress) if quant is not None else []
    for i, path, new in qswaps:
        job.undo.swap(views[i].layer, path, new)
    if quant is not None:
        info["passes"] = [*info["passes"], pass_to_dict(quant)]
    return info


@torch.no_grad()
def _self_check(model: nn.Module, calib: Tensor | None) -> None:
    """Run the compressed model once (a short window, then one cached step where it generates): an exception is
    an A3ModError naming it (`apply` then puts every swapped module back)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    ids = (calib[:1, :8] if calib is not None and calib.numel() else
           torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)))
    ids = ids.to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        if model.can_generate() if hasattr(model, "can_generate") else False:
            out = model(input_ids=ids[:, :-1], use_cache=True)
            cache = out.get("cache", out.get("past_key_values"))        # transformers >= 5.24 names it `cache`
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            model(input_ids=ids[:, -1:], use_cache=True, **{name: cache})
        else:
            model(input_ids=ids)
    except Exception as e:          # noqa: BLE001  (whatever the compressed forward raises)
        raise A3ModError(f"the compressed model fails its first forward ({type(e).__name__}: {str(e)[:300]}); "
                         f"the model is restored as it was: please report this model type") from e
    finally:
        model.train(was_training)


def check_finite(model: nn.Module) -> None:
    """A3ModError naming the first weight that holds NaN or infinite values (compressing it would spread them into
    every rotated weight of its layer, and the checkpoint would not load)."""
    name = nonfinite_weight(model)
    if name is not None:
        raise A3ModError(f"model weight {name!r} holds NaN or infinite values; a3mod compresses finite models "
                         f"only (the model is left as it is)")


def _compress(job: ApplyJob) -> tuple[list, dict]:
    """The compact modules the compression passes make, swapped in (each logged in `job.undo`), and the model's new
    a3mod_info."""
    alloc = job.passes[0] if isinstance(job.passes[0], Allocate) and job.passes[0].per_layer() else None
    if alloc is not None:
        _check_allocation(job, alloc)
    _check_model(job)
    model, views = job.model, job.views
    orig = [linear_param_count(v.layer) for v in views]
    _check_seq_refit(job)
    if alloc is not None:
        job.passes = _allocated(job, alloc)
    job.passes = _resolve_first(job)
    _whole_model_kinds(job)
    done = _layer_by_layer(job)
    if done is not None:
        return done[0], _info(job, done[1], orig)
    stats = Stats.ensure(model, job.calib, job.kinds, job.stats if job.stats is not None else job.collected,
                         progress=job.progress,
                         who=str([type(p).__name__ for p in job.passes]))
    if stats is not None:
        stats.check(min_tokens=views[0].dims.head_dim + 1)
        if len(stats.layers) != len(views):
            raise CalibrationError(f"stats cover {len(stats.layers)} layers, the model has {len(views)}")
        stats = pooled(stats, job.groups)
    job.stats = stats
    if scope_of(job.passes[0]) == "layer":
        job.passes = [p.resolve(views, stats) for p in job.passes]       # e.g. A3QK(portable=True) -> pair_order
    if scope_of(job.passes[0]) == "model":          # every layer built, then swapped in
        swaps = run_pass(job.passes[0], PassContext(model=model, views=views, stats=stats, calib=job.calib,
                                                    progress=job.progress))
        for i, path, new in swaps:
            job.undo.swap(views[i].layer, path, new)
    else:
        swaps = _a3_swaps(job)
    return swaps, _info(job, stats.n if stats else 0, orig)


def _info(job: ApplyJob, tokens: int, orig: list[int]) -> dict:
    return {"passes": [pass_to_dict(p) for p in job.passes], "calib_tokens": tokens, "orig_layer_params": orig}


def _check_model(job: ApplyJob) -> None:
    """Before any calibration: the model is neither compressed nor quantized, the passes fit it (shared blocks, kept
    dims, the layer descriptions at full rank); the passes balanced around parts kept whole."""
    model, views, passes = job.model, job.views, job.passes
    if any(set(describe_layer(v.layer, v.spec)) - {"quantized"} for v in views):    # a codec finds a compact kind
        raise A3ModError("model is already compressed by a3mod; apply all passes in one call to the original")
    if any(is_quantized(m) for v in views for m in v.layer.modules()):
        raise A3ModError("model is quantized; compress the unquantized model (compression passes first, then one "
                         "quantization pass, in one call)")
    job.groups = shared_groups(views)                # blocks several layers run (Zamba2): solved once, tie kept
    if job.groups and scope_of(passes[0]) == "model":
        raise UnsupportedModelError(
            f"{type(model).__name__}: layers {job.groups} run one shared block each; {type(passes[0]).__name__} "
            f"reduces every layer on its own and would untie them (a larger model): use uniform A3 (a3mod.a3_passes)")
    if scope_of(passes[0]) == "layer":
        job.passes = balance(passes, views)          # QK kept whole under q/k norms: the others give its share
        preflight(job.passes, views)                 # kept dims fit every layer, before any calibration
    if any(p.rebuilds_layers() for p in job.passes):
        verify_model(model, views)                   # the description reproduces every layer structure at full rank


def _layer_by_layer(job: ApplyJob):
    """(swaps, calibration tokens) of `apply`'s layer-by-layer schedule where it runs, else None (every layer's
    statistics are then collected in one forward)."""
    model, kinds = job.model, job.kinds
    if not layerwise.wanted(job.passes, kinds, job.calib, job.stats):
        return None
    if job.groups:
        warnings.warn(f"a3mod: layers {job.groups} of {type(model).__name__} run shared blocks, solved from all "
                      f"their uses: every layer's {sorted(kinds & layerwise.BIG_KINDS)} statistics are collected in "
                      f"one forward and held at once (not one layer at a time)", stacklevel=4)
        return None
    if layerwise.replays(model, job.views, job.calib):
        return layerwise.layerwise_swaps(job)
    if seq_refit.dampings(job.passes):
        raise UnsupportedModelError(f"{type(model).__name__}'s layers cannot be replayed one by one (they pass "
                                    f"other state along): the sequential re-fit (seq_refit=True) needs that; "
                                    f"leave it off for this model")
    warnings.warn(f"a3mod: {type(model).__name__}'s layers cannot be replayed one by one (they pass other state "
                  f"along or share it through their arguments): every layer's {sorted(kinds)} statistics are "
                  f"collected in one forward and held at once", stacklevel=4)
    return None


def _check_seq_refit(job: ApplyJob) -> None:
    """A sequential re-fit runs in the layer-by-layer schedule only: refuse, before any work, what rules it out."""
    if not seq_refit.dampings(job.passes):
        return
    if job.stats is not None and job.calib is not None and job.stats.kinds <= WHOLE_MODEL_KINDS:
        job.stats.check_origin(job.model, job.calib)     # the original model's loss statistic ("taylor"): reused
        job.stats, job.collected = None, job.stats.only(job.stats.kinds)     # (a copy: merges leave it as it was)
    why = (f"it needs calib= (the calibration windows), not stats= (beside calib=, stats= may hold only "
           f"{sorted(WHOLE_MODEL_KINDS)}: stats.only({set(WHOLE_MODEL_KINDS)}))"
           if job.stats is not None or job.calib is None
           else f"layers {job.groups} run shared blocks (solved from all their uses at once)" if job.groups else
           "it runs in one process (not under torch.distributed)" if distributed.active() else
           f"refit_damping='heldout' holds windows out, and calib has {job.calib.shape[0]} window (at least 2)"
           if seq_refit.HELDOUT in seq_refit.dampings(job.passes).values() and job.calib.shape[0] < 2 else None)
    if why:
        raise A3ModError(f"seq_refit=True (A3OV / A3MLP) re-fits each layer on the compressed model's stream, layer "
                         f"by layer: {why}")
    was = job.model.training
    job.model.eval()
    try:
        problem = seq_refit.layout_problem(job.model, job.views, job.calib[:1, :16].to(job.views[0].anchor().device))
    finally:
        job.model.train(was)
    if problem:
        raise UnsupportedModelError(f"{type(job.model).__name__}: {problem}")


def _check_allocation(job: ApplyJob, alloc: Allocate) -> None:
    """Allocate(qk_update / seq_refit) before any work: its options on uniform stand-ins (the A3 passes it runs as),
    which every check before calibration then looks at; refused on shared blocks (per-layer ranks would untie them)."""
    if shared_groups(job.views):
        raise UnsupportedModelError(f"{type(job.model).__name__}: layers {shared_groups(job.views)} run one shared "
                                    f"block each; Allocate gives every layer its own ranks and would untie them: use "
                                    f"uniform A3 (a3mod.a3_passes)")
    if job.calib is None and job.stats is None:
        raise CalibrationError("Allocate needs calib= (or stats=) for its ranks")
    job.passes = alloc.layer_passes()


def _allocated(job: ApplyJob, alloc: Allocate) -> list:
    """Allocate(qk_update / seq_refit) as per-layer A3 passes: the ranks from the loss curves of the small statistics
    ("a3", with qk_update "qkgram" too: QK's curves after the QK update; those given, or one forward of them alone),
    so the large Grams can still be collected one layer at a time."""
    kinds = {"a3", "qkgram"} if alloc.qk_update else {"a3"}        # both small: every layer's at once
    small = job.stats if job.stats is not None else Stats.ensure(job.model, job.calib, kinds, job.collected,
                                                                 progress=job.progress, who="Allocate (ranks)")
    if job.stats is None:
        job.collected = small            # the layer-by-layer run (or the forward of what else is missing) reuses it
    ranks = allocated_ranks(alloc, job.views, small)
    return alloc.layer_passes(ranks, len(job.views))


def _whole_model_kinds(job: ApplyJob) -> None:
    """Statistics that need the whole model at once (`stats.WHOLE_MODEL_KINDS`: a backward pass of the loss) collected
    first, so the layer-by-layer schedule reuses them (`job.collected`) and collects the rest one layer at a time."""
    whole = job.kinds & WHOLE_MODEL_KINDS
    if whole and job.stats is None and job.calib is not None:
        job.collected = Stats.ensure(job.model, job.calib, whole, job.collected, progress=job.progress,
                                     who="A3MLP(select='taylor')")


def _resolve_first(job: ApplyJob) -> list:
    """Where a layer-scope pass ranks across layers from small statistics (A3QK(portable=True): the "a3" kind) and
    others need the large Grams, resolve it from one forward of the small kinds alone, so the Grams can still be
    collected one layer at a time (the same passes as resolving from everything)."""
    passes, kinds = job.passes, job.kinds
    whole = [p for p in passes if p.whole_model_stats()]
    if (not whole or scope_of(passes[0]) != "layer" or job.calib is None or job.stats is not None
            or not (kinds & layerwise.BIG_KINDS or seq_refit.dampings(passes))
            or {k for p in whole for k in needs(p)} & layerwise.BIG_KINDS):
        return passes
    small = Stats.ensure(job.model, job.calib, {k for p in whole for k in needs(p)}, progress=job.progress)
    return [p.resolve(job.views, small) for p in passes]


def _info_so_far(model, views) -> dict:
    """a3mod_info of a model a quantization pass alone is applied to (compressed before, or not at all)."""
    info = dict(getattr(model, "a3mod_info", None) or {})
    info.setdefault("passes", [])
    info.setdefault("calib_tokens", 0)
    if info.get("orig_layer_params") is None:
        info["orig_layer_params"] = [linear_param_count(v.layer) for v in views]
    return info


def pooled(stats: Stats, groups: list[list[int]]) -> Stats:
    """`stats` with the layers of each group (the uses of one shared block) holding the mean of their sums: the
    statistics of the block over all its uses (every use sees every calibration token). A new object; `stats` is
    left as it is."""
    if not groups:
        return stats
    layers = list(stats.layers)
    for g in groups:
        keys = set(layers[g[0]])
        if any(set(layers[i]) != keys for i in g):
            raise CalibrationError(f"the statistics of layers {g} (one shared block) hold different kinds")
        mean = {k: sum(layers[i][k] for i in g) / len(g) for k in keys}
        for i in g:
            layers[i] = mean
    return replace(stats, layers=layers)


def _a3_swaps(job: ApplyJob) -> list:
    """Solve each layer and swap its compact modules in at once (the layer's originals go to `job.undo`), so the model
    never holds two copies of more than the undo log's memory budget. The later uses of a shared block get the
    modules solved for its first use (the same objects: the block stays tied)."""
    groups = job.groups
    out, lead, first = [], {i: g[0] for g in groups for i in g[1:]}, {}
    for v in tqdm(active(job.views), desc="solving", disable=not job.progress, unit="layer"):
        built = (first[lead[v.index]] if v.index in lead
                 else distributed.solve(build_layer, job.model, v, job.passes, job.stats))
        if any(v.index == g[0] for g in groups):
            first[v.index] = built
        for path, new in built:
            job.undo.swap(v.layer, path, new)
        out += [(v.index, path, new) for path, new in built]
    return out


def data_dependent(passes) -> list[str]:
    """The passes whose kept dims depend on the calibration data (per-layer allocation, rank search)."""
    return [type(p).__name__ for p in passes if type(p).__name__ == "Allocate" or getattr(p, "mixed", False)
            or (type(p).__name__ == "ASVD" and getattr(p, "rank_search", False))]


def preview(model: nn.Module, passes, inplace: bool = False):
    """The report (per-layer kept dims, params, FLOPs, KV bytes) `apply(model, passes, calib)` will give, without
    calibrating: the passes run on one short random window, since uniform kept dims depend on shapes only. Passes
    that choose dims from data (Allocate, A3KV(mixed=True), ASVD's rank search) are an A3ModError. The model is
    left untouched unless `inplace` (then it is rewritten, with meaningless weights)."""

    passes = list(passes)
    bad = data_dependent(passes)
    if bad:
        raise A3ModError(f"{bad[0]} chooses kept dims from calibration data, so no plan exists before calibrating; "
                         f"preview uniform passes (e.g. a3mod.a3_passes(ratio)) instead")
    views = layer_views(model)
    tokens = max(64, 2 * views[0].dims.head_dim + 2)
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    target = model if inplace else copy.deepcopy(model)
    apply(target, passes, calib=ids, progress=False)
    return report(target)


def compact_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every a3mod module inside `model`'s decoder layers, by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, COMPACT)}

