"""Pass configs: small frozen dataclasses, one registered handler each, JSON round-trip."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable

from ..errors import A3ModError, RatioError

PASS_TYPES: dict[str, type] = {}
HANDLERS: dict[type, Callable] = {}         # per-layer handlers (A3): fn(cfg, work, layer_stats, n_tokens)
MODEL_HANDLERS: dict[type, Callable] = {}   # whole-model handlers (baselines): fn(cfg, model, views, stats, calib,
                                            #   progress) -> list of (layer index, path in layer, new module)


def register_pass(cls):
    """Class decorator: make a config dataclass known by name (for JSON round-trip)."""
    PASS_TYPES[cls.__name__] = cls
    return cls


def handler(cls):
    """Function decorator: the handler that applies config `cls` to one layer's work."""
    def deco(fn):
        HANDLERS[cls] = fn
        return fn
    return deco


def model_handler(cls):
    """Function decorator: the handler that applies config `cls` to a whole model (returns the replacements)."""
    def deco(fn):
        MODEL_HANDLERS[cls] = fn
        return fn
    return deco


def needs(p) -> tuple[str, ...]:
    """Calibration statistic kinds (a3mod.calib.KINDS) a pass reads."""
    return tuple(getattr(type(p), "NEEDS", ()))


def pass_to_dict(p) -> dict:
    return {"type": type(p).__name__, **dataclasses.asdict(p)}


def pass_from_dict(d: dict):
    d = dict(d)
    name = d.pop("type", None)
    if name not in PASS_TYPES:
        raise A3ModError(f"unknown pass type {name!r}; known: {sorted(PASS_TYPES)}")
    return PASS_TYPES[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_ratio_rank(name: str, ratio: float | None, rank: int | None) -> None:
    if (ratio is None) == (rank is None):
        raise RatioError(f"{name}: give exactly one of ratio= or rank= (got ratio={ratio}, rank={rank})")
    if ratio is not None and not (isinstance(ratio, numbers.Real) and not isinstance(ratio, bool)
                                  and 0.0 <= ratio < 1.0):
        raise RatioError(f"{name}: ratio={ratio!r} is outside [0, 1) (the fraction of parameters removed)")
    if rank is not None and not (isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and rank >= 1):
        raise RatioError(f"{name}: rank={rank!r} must be a positive integer")


def check_multiple(name: str, multiple_of: int | None, rank: int | None) -> None:
    if multiple_of is None:
        return
    if not (isinstance(multiple_of, numbers.Integral) and not isinstance(multiple_of, bool) and multiple_of >= 1):
        raise RatioError(f"{name}: multiple_of={multiple_of!r} must be a positive integer (or None)")
    if rank is not None:
        raise RatioError(f"{name}: multiple_of={multiple_of} rounds a ratio's kept dim; rank={rank} is used as "
                         f"given (drop one of them)")


def kept_dim(name: str, full: int, ratio: float | None, rank: int | None, multiple: int,
             multiple_of: int | None = None) -> int:
    """Dimension kept out of `full`: round((1-ratio)*full) to a multiple of `multiple` (the structure's: RoPE
    pairs, ...) and of `multiple_of` (the user's), at least one such multiple and at most `full`; or `rank`."""
    if rank is not None:
        if rank > full:
            raise RatioError(f"{name}: rank={rank} exceeds the full dimension {full}")
        if rank % multiple:
            raise RatioError(f"{name}: rank={rank} must be a multiple of {multiple} here"
                             + (" (RoPE keeps whole pairs)" if multiple == 2 else ""))
        return rank
    if multiple_of is not None:
        multiple = math.lcm(multiple, int(multiple_of))
        if multiple > full and ratio > 0:
            raise RatioError(f"{name}: multiple_of={multiple_of} makes every kept dim a multiple of {multiple}, more "
                             f"than the full dimension {full}: nothing could be removed; use a smaller multiple_of")
    r = int(round((1.0 - ratio) * full / multiple)) * multiple
    return min(full, max(multiple, r))
