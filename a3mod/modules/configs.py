"""Frozen configs of the compact modules. Each is at once the module's constructor argument, what the module's
`describe()` writes into a checkpoint's description, and the schema that description is checked against when read
(io/schema.check_config reads the field metadata below: kind, range, choices, which values are written).

A field is declared with `spec(...)`:
    kind        "int", "float", "bool", "str" or "bias" (a {"q","k","v","o"} -> bool map)
    lo, le      integer range [lo, le] (le may name an earlier field: qk_dim <= head_dim)
    lo, hi      float range, open or closed ends by lo_open / hi_open
    choices     allowed strings; omit_default: the default value is not written (and not accepted as written)
    only        the one value ever written (a flag stored only when set: residual, sinks)
Rules that tie fields together live in each config's `__post_init__` and raise `ConfigError(field, value, problem)`,
which the schema reports under that field's path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, field


class ConfigError(ValueError):
    """A value a compact module cannot take: names the field (the schema reports it as `<path>.<field>`)."""

    def __init__(self, name: str, value, problem: str):
        self.field, self.value, self.problem = name, value, problem
        sep = "" if problem.startswith(";") else " "
        super().__init__(f"{name}={value!r}{sep}{problem}")


def spec(default=MISSING, *, kind: str, lo=None, le=None, hi=None, lo_open: bool = False, hi_open: bool = True,
         choices=None, omit_default: bool = False, only=None, doc: str = ""):
    """A config field with the metadata the schema checks (see the module docstring)."""
    meta = dict(kind=kind, lo=lo, le=le, hi=hi, lo_open=lo_open, hi_open=hi_open, choices=choices,
                omit_default=omit_default, only=only, doc=doc)
    return field(default=default, metadata=meta)


def check_choices(cfg) -> None:
    """Every field with `choices` holds one of them (or its default): ConfigError otherwise."""
    for f in dataclasses.fields(cfg):
        v, allowed = getattr(cfg, f.name), f.metadata.get("choices")
        if allowed is not None and v != f.default and v not in allowed:
            raise ConfigError(f.name, v, f"; allowed: {sorted(allowed)}")


def to_entry(cfg) -> dict:
    """The description of a config: every field, except defaults the field does not write."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("omit_default") and v == f.default:
            continue
        out[f.name] = dict(v) if isinstance(v, dict) else v
    return out


def from_entry(cls, entry: dict):
    """The config a description entry holds (keys that are not fields are ignored: the module's own state)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in entry.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Part:
    """One component of one layer: full and kept dims, and the original units kept (None: all, in order)."""

    comp: str
    full: int
    kept: int
    index: tuple[int, ...] | None = None

    @property
    def reduced(self) -> bool:
        return self.kept != self.full
