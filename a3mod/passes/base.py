"""The pass protocol: small frozen, versioned configs (`PassConfig`), one registry (`PASSES`), one handler signature.

Every pass is a frozen dataclass subclassing `PassConfig` and registered with `@register_pass`; its handler is
registered with `@handler(Config, scope=...)` and always called as `handler(cfg, ctx)` with a `PassContext`:

    scope "layer"   ctx.work (rewrite.LayerWork, float64 weights of one layer), ctx.stats (that layer's statistic
                    sums), ctx.n (tokens); edits the work in place and returns a `Solution`: the component's
                    part of the layer plan and its loss curve (A3QK, A3OV, A3MLP, A3Experts). Runs layer by
                    layer, so streaming accepts every layer-scope pass.
    scope "model"   ctx.model, ctx.views, ctx.stats, ctx.calib, ctx.progress; returns the replacements
                    [(layer index, path in the layer, new module)] (baselines, Allocate, A3KV).
    scope "linear"  ctx.linear: one nn.Linear; returns its replacement (quantization: BnbInt8, Bnb4bit, HQQ).

`NEEDS` names the calibration statistic kinds a pass reads (a3mod.calib.stats.KINDS); a config whose options need
more overrides `stat_kinds()`.
`rebuilds_layers()`: the pass builds compact attention / MLP modules from the layer description, so
`a3mod.pipeline.verify` checks that description first (the low-rank baselines that only factor linears say False).
`pass_to_dict` / `pass_from_dict` round-trip configs through JSON with their type and VERSION; a config from a
newer a3mod is refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import A3ModError, RatioError
from ..validate import fraction, integer, is_int
from ..pipeline.plan import kept_dim as kept_dim  # the rounding rule lives with the components

SCOPES = ("layer", "model", "linear")
PASS_TYPES: dict[str, type] = {}            # config class name -> class (JSON round trip)


@dataclass(frozen=True)
class PassDef:
    """A registered pass: its config class, scope and handler (cfg, ctx) -> result."""
    cls: type
    scope: str
    fn: Callable


PASSES: dict[type, PassDef] = {}


@dataclass
class PassContext:
    """What a handler may read. Layer scope: work / stats / n; model scope: model, views, stats, calib, progress;
    linear scope: linear."""
    model: Any = None
    views: list | None = None
    stats: Any = None
    calib: Any = None
    progress: bool = True
    work: Any = None
    n: int = 0
    linear: Any = None
    layers: frozenset | None = None     # model scope: solve only these layers (apply's layer-by-layer schedule)
    curves: bool = False                # layer scope: the solution's loss curve is read (Allocate)


class PassConfig:
    """Base of every pass config (frozen dataclasses). VERSION: bumped when a field's meaning changes."""
    VERSION = 1
    NEEDS: tuple[str, ...] = ()

    def rebuilds_layers(self) -> bool:
        return True

    def stat_kinds(self) -> tuple[str, ...]:
        """The calibration statistic kinds this config reads (its class's NEEDS unless an option adds some)."""
        return tuple(type(self).NEEDS)

    def to_dict(self) -> dict:
        return pass_to_dict(self)

    def whole_model_stats(self) -> bool:
        """True when solving any layer reads every layer's statistics, which streaming and apply's layer-by-layer
        schedule never hold at once: a model-scope pass unless it says otherwise, a layer-scope pass whose
        `resolve` ranks across layers (A3QK portable without pair_order)."""
        return scope_of(self) == "model"

    def resolve(self, views, stats) -> "PassConfig":
        """This config with what it reads from the whole model's statistics filled in, before any layer is
        solved (A3QK(portable=True) -> its pair ranking); most configs return themselves."""
        return self


def register_pass(cls):
    """Class decorator: make a PassConfig dataclass known by name (for JSON round trip)."""
    if not (isinstance(cls, type) and issubclass(cls, PassConfig) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r}: a pass config is a frozen dataclass subclassing a3mod.passes.base.PassConfig")
    PASS_TYPES[cls.__name__] = cls
    return cls


def handler(cls, scope: str = "layer"):
    """Function decorator: register fn(cfg, ctx) as the handler of config `cls`, with its scope."""
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}; allowed: {SCOPES}")

    def deco(fn):
        PASSES[cls] = PassDef(cls, scope, fn)
        return fn
    return deco


def pass_def(p) -> PassDef:
    """The registered pass of config `p`, or an A3ModError listing the known ones."""
    d = PASSES.get(type(p))
    if d is None:
        raise A3ModError(f"{p!r} is not a pass config; known: {sorted(t.__name__ for t in PASSES)}")
    return d


def scope_of(p) -> str:
    return pass_def(p).scope


def run_pass(p, ctx: PassContext):
    """Call `p`'s handler on `ctx`, without autograd (a graph through the float64 solves would keep every solve's
    intermediates alive until the pass returns)."""
    with torch.no_grad():
        return pass_def(p).fn(p, ctx)


def needs(p) -> tuple[str, ...]:
    """Calibration statistic kinds (a3mod.calib.stats.KINDS) a pass reads."""
    return tuple(p.stat_kinds())


def pass_to_dict(p) -> dict:
    return {"type": type(p).__name__, "version": type(p).VERSION, **dataclasses.asdict(p)}


def pass_from_dict(d: dict):
    """The config a `pass_to_dict` dict describes, validated by its constructor; A3ModError for an unknown type,
    unknown fields or a newer VERSION. A hand-written dict may leave out its version (read as version 1)."""
    if not isinstance(d, dict):
        raise A3ModError(f"a pass must be a dict with a 'type', got {type(d).__name__}")
    d = dict(d)
    name = d.pop("type", None)
    if name not in PASS_TYPES:
        raise A3ModError(f"unknown pass type {name!r}; known: {sorted(PASS_TYPES)}")
    cls = PASS_TYPES[name]
    version = d.pop("version", 1)
    if not is_int(version) or not 1 <= version <= cls.VERSION:
        raise A3ModError(f"{name} version {version!r}; this a3mod reads versions 1..{cls.VERSION} (a newer a3mod "
                         f"wrote it?)")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise A3ModError(f"{name}: unknown fields {unknown}; known: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_ratio_rank(name: str, ratio: float | None, rank: int | None) -> None:
    if (ratio is None) == (rank is None):
        raise RatioError(f"{name}: give exactly one of ratio= or rank= (got ratio={ratio}, rank={rank})")
    if ratio is not None:
        fraction(name, "ratio", ratio, what="the fraction of parameters removed")
    if rank is not None:
        integer(name, "rank", rank, error=RatioError)


def check_multiple(name: str, multiple_of: int | None, rank: int | None) -> None:
    if multiple_of is None:
        return
    integer(name, "multiple_of", multiple_of, what="or None", error=RatioError)
    if rank is not None:
        raise RatioError(f"{name}: multiple_of={multiple_of} rounds a ratio's kept dim; rank={rank} is used as "
                         f"given (drop one of them)")


def pass_list(passes) -> list:
    """`passes` as a list (A3ModError for what is not a list of pass configs: None, a string, one config)."""
    if passes is None or isinstance(passes, (str, bytes, dict)) or not hasattr(passes, "__iter__"):
        raise A3ModError(f"passes={passes!r} must be a list of pass configs, e.g. a3mod.a3_passes(0.2)")
    return list(passes)


def check_passes(passes, schedule: str = "memory") -> list:
    """The compression passes of one run, checked before any work: a list of registered pass configs, each once,
    a model-scope pass (baselines, Allocate, A3KV) alone, no quantization pass (split off before). schedule:
    "memory" (`apply`) or "stream" (`compress_streaming`: layer-scope passes only, each layer solved on its own)."""
    passes = pass_list(passes)
    if not passes:
        raise A3ModError("passes is empty; give e.g. a3mod.a3_passes(0.2)" + (
            "" if schedule == "stream" else " or [A3QK(ratio=..), A3OV(..), A3MLP(..)]"))
    names = [type(p).__name__ for p in passes]
    scopes = [pass_def(p).scope for p in passes]
    if schedule == "stream" and any(s != "layer" for s in scopes):
        layer = sorted(t.__name__ for t, d in PASSES.items() if d.scope == "layer")
        bad = [n for n, s in zip(names, scopes) if s != "layer"]
        raise A3ModError(f"compress_streaming runs layer-scope passes ({', '.join(layer)}); {bad} need the whole "
                         f"model (baselines ASVD/SVDLLM/PlainSVD, Allocate, A3KV) or are quantization: use "
                         f"a3mod.apply on a loaded model")
    whole_stats = [n for n, p in zip(names, passes) if p.whole_model_stats()]
    if schedule == "stream" and whole_stats:
        raise A3ModError(f"{whole_stats[0]} reads every layer's statistics before solving one, which "
                         f"compress_streaming never holds at once: use a3mod.apply, or give what it would read "
                         f"(A3QK: pair_order, as a3mod.json's passes record it)")
    if len(set(names)) != len(names):
        raise A3ModError(f"each pass may appear once, got {names}")
    whole = [n for n, s in zip(names, scopes) if s == "model"]
    if whole and len(passes) > 1:
        raise A3ModError(f"{whole[0]} rewrites every linear itself; give it alone, not with {names}")
    linear = [n for n, s in zip(names, scopes) if s == "linear"]
    if linear:
        raise A3ModError(f"{linear[0]} is a quantization pass: give at most one, last")
    return passes
