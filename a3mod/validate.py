"""One place for checking the numbers and options a user passes (pass configs, quantization configs, heal): each
check returns the value as a plain Python type or raises `error` with one message shape,
    "<owner>: <name>=<value> <what is wrong>"
e.g. "Allocate: budget=1.0 is outside [0, 1) (the fraction of parameters removed)". Booleans are never numbers,
NaN and infinities are never in a range. (a3mod.json's schema, io/schema.py, uses these predicates with path-style
messages.)
"""
from __future__ import annotations

import math
import numbers

import torch

from .errors import A3ModError, RatioError


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def span(lo, hi, lo_open: bool, hi_open: bool) -> str:
    """How every a3mod message writes a range: "[0, 1)", "(0, 1]"."""
    return f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def number(owner: str, name: str, v, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
           hi_open: bool = False, what: str = "", error=A3ModError) -> float:
    """A finite real in the span as a float."""
    ok = is_real(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        if math.isinf(lo) and math.isinf(hi):
            problem = "must be a finite number"
        elif math.isinf(hi):
            problem = f"must be a finite number {'>' if lo_open else '>='} {lo:g}"
        else:
            problem = f"is outside {span(lo, hi, lo_open, hi_open)}"
        raise error(f"{owner}: {name}={v!r} {problem}" + (f" ({what})" if what else ""))
    return float(v)


def fraction(owner: str, name: str, v, *, lo_open: bool = False, hi_open: bool = True, what: str = "",
             error=RatioError) -> float:
    """v in [0, 1) (or (0, 1), [0, 1] by the flags) as a float."""
    return number(owner, name, v, 0.0, 1.0, lo_open=lo_open, hi_open=hi_open, what=what, error=error)


def integer(owner: str, name: str, v, lo: int = 1, hi: int | None = None, *, what: str = "",
            error=A3ModError) -> int:
    """An integer (not a bool) >= lo (and <= hi) as an int."""
    if not (is_int(v) and v >= lo and (hi is None or v <= hi)):
        kind = {1: "a positive integer", 0: "a non-negative integer"}.get(lo, f"an integer >= {lo}")
        kind = kind if hi is None else f"an integer in [{lo}, {hi}]"
        raise error(f"{owner}: {name}={v!r} must be {kind}" + (f" ({what})" if what else ""))
    return int(v)


def boolean(owner: str, name: str, v, error=A3ModError) -> bool:
    if not isinstance(v, bool):
        raise error(f"{owner}: {name}={v!r} must be True or False")
    return v


def choice(owner: str, name: str, v, allowed, *, what: str = "", error=A3ModError):
    """One of `allowed` (a bool matches only a bool, and where `allowed` holds integers only an integer matches:
    True is not 1, 2.0 is not 2)."""
    ints = all(is_int(a) for a in allowed)
    if (ints and not is_int(v)) or not any(v == a and isinstance(v, bool) == isinstance(a, bool) for a in allowed):
        shown = what or ", ".join(map(repr, allowed))
        raise error(f"{owner}: {name}={v!r}; allowed: {shown}")
    return v


def _finite(t: torch.Tensor) -> bool:
    """Whether every element of `t` is finite. A NaN or infinity makes the sum non-finite, so a finite sum settles
    it in one read (20x faster than isfinite(t).all() on a large weight); a non-finite sum (or an overflow) is
    checked element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def nonfinite_weight(model) -> str | None:
    """The name of the first floating-point parameter of `model` holding NaN or infinite values, else None."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not p.is_meta and not _finite(p):
                return name
    return None
