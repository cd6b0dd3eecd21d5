"""Configs of the transformers modules a3mod narrows in place rather than replaces (they keep their class and
forward): latent attention (arch/mla.py) and fused routed experts (arch/experts.py). Like the configs of a3mod's own
modules, each is the kind's description in a checkpoint and the schema it is checked against (io/codecs.py)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .configs import ConfigError, spec


@dataclass(frozen=True)
class MLAConfig:
    """Latent attention narrowed in place: the kept position-free q/k dims and value dims per head, and the model's
    own."""
    qk_nope: int = spec(kind="int", lo=1)
    v: int = spec(kind="int", lo=1)
    orig_nope: int = spec(kind="int", lo=1)
    orig_v: int = spec(kind="int", lo=1)

    def __post_init__(self):
        for n, o in (("qk_nope", "orig_nope"), ("v", "orig_v")):
            if getattr(self, n) > getattr(self, o):
                raise ConfigError(n, getattr(self, n), f"keeps more dims than the model's {o} = {getattr(self, o)}")


def mla_config(mod: nn.Module | None) -> MLAConfig | None:
    """The MLAConfig of a latent attention module a3mod narrowed (its `a3mod_mla` record), else None."""
    info = getattr(mod, "a3mod_mla", None)
    return MLAConfig(mod.qk_nope_head_dim, mod.v_head_dim, info["orig_nope"], info["orig_v"]) if info else None


@dataclass(frozen=True)
class ExpertsConfig:
    """Routed experts narrowed in place: each of `experts` keeps `width` of its `orig_inter` neurons. Its state beside
    it in a description: `kept` (one ascending index list per expert, where recorded) and `fallback` (the experts
    whose neurons were scored from their weights alone)."""
    orig_inter: int = spec(kind="int", lo=1)
    experts: int = spec(kind="int", lo=1)
    width: int = spec(kind="int", lo=1, le="orig_inter")
