"""The primitives of a3mod.json's schema: each checks one value and raises a CheckpointError naming its path
(e.g. "a3mod.json: layers.3.attn.rope_index[5] = 999 is outside [0, 64)"). What counts as an integer or a number
and how a span is written are a3mod.validate's (the checks of user arguments); only the message names a path."""
from __future__ import annotations

import dataclasses
import math
import re

from ..errors import CheckpointError
from ..modules.configs import ConfigError, from_entry
from ..validate import is_int, is_real, span

PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")     # a module path inside a layer
BIG = 1 << 40


def fail(path: str, msg: str):
    raise CheckpointError(f"a3mod.json: {path} {msg}")


def keys(d, path: str, required: tuple, optional: tuple = ()) -> dict:
    if not isinstance(d, dict):
        fail(path, f"must be an object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        fail(path, f"lacks {missing}")
    extra = sorted(k for k in d if k not in required and k not in optional)
    if extra:
        fail(path, f"has unknown keys {extra}")
    return d


def integer(v, path: str, lo: int = 0, hi: int = BIG) -> int:
    if not isinstance(v, int) or not is_int(v):          # JSON integers only (no numpy scalars)
        fail(path, f"= {v!r} must be an integer")
    if not lo <= v < hi:
        fail(path, f"= {v} is outside [{lo}, {hi})")
    return v


def boolean(v, path: str) -> bool:
    if not isinstance(v, bool):
        fail(path, f"= {v!r} must be true or false")
    return v


def number(v, path: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> float:
    if not isinstance(v, (int, float)) or not is_real(v) or not math.isfinite(v):
        fail(path, f"= {v!r} must be a finite number")
    if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        fail(path, f"= {v!r} is outside {span(lo, hi, lo_open, hi_open)}")
    return float(v)


def string(v, path: str, allowed=None) -> str:
    if not isinstance(v, str):
        fail(path, f"= {v!r} must be a string")
    if allowed is not None and v not in allowed:
        fail(path, f"= {v!r}; allowed: {sorted(allowed)}")
    return v


def indices(v, path: str, n: int | None, bound: int, ascending: bool) -> None:
    if not isinstance(v, list):
        fail(path, f"must be a list of indices, got {type(v).__name__}")
    if n is not None and len(v) != n:
        fail(path, f"has {len(v)} entries, expected {n}")
    for j, x in enumerate(v):
        integer(x, f"{path}[{j}]", 0, bound)
    if ascending and any(a >= b for a, b in zip(v, v[1:])):
        fail(path, "must be strictly ascending (each original index once)")


def bias_flags(v, path: str, names: str) -> None:
    keys(v, path, tuple(names))
    for n in names:
        boolean(v[n], f"{path}.{n}")


def dropouts(e: dict, path: str, names) -> None:
    for n in names:
        if n in e:
            number(e[n], f"{path}.{n}", 0.0, 1.0)


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def check_field(f: dataclasses.Field, v, path: str, entry: dict) -> None:
    """One value against its config field's metadata (modules/configs.py)."""
    m = f.metadata
    if m.get("only") is not None and v is not m["only"]:
        fail(path, f"= {v!r}; only {str(m['only']).lower()} is written ({m['doc']})")
    if v is None and f.default is None:
        return
    kind = m["kind"]
    if kind == "int":
        le = entry[m["le"]] if isinstance(m.get("le"), str) else m.get("le")
        integer(v, path, m["lo"] if m.get("lo") is not None else 0, BIG if le is None else le + 1)
    elif kind == "float":
        number(v, path, m["lo"], m["hi"], lo_open=m["lo_open"], hi_open=m["hi_open"])
    elif kind == "bool":
        boolean(v, path)
    elif kind == "bias":
        bias_flags(v, path, "qkvo")
    elif kind == "str":
        allowed = m.get("choices")
        if allowed is not None and m.get("omit_default"):
            allowed = set(allowed) - {f.default}            # the default is never written
        string(v, path, allowed)


def check_config(cls, entry, path: str, required: tuple = (), optional: tuple = ()) -> None:
    """A description entry against config class `cls` (a modules/configs.py dataclass): its keys (the fields plus
    `required` / `optional` extras), every field's type and range, then the rules that tie fields together."""
    fields = dataclasses.fields(cls)
    needed = tuple(f.name for f in fields if f.default is dataclasses.MISSING)
    keys(entry, path, needed + required, tuple(f.name for f in fields if f.name not in needed) + optional)
    for f in fields:
        if f.name in entry:
            check_field(f, entry[f.name], f"{path}.{f.name}", entry)
    try:
        from_entry(cls, entry)
    except ConfigError as e:
        fail(f"{path}.{e.field}", f"= {_show(e.value)}{'' if e.problem.startswith(';') else ' '}{e.problem}")
