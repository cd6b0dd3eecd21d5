"""Compact modules that replace a layer's attention, MLP or linears. Plain nn.Linear children; no passes imported."""
from .attention import ReducedHeadAttention
from .latent_kv import LatentKVAttention
from .lowrank import LowRankLinear
from .mlp import ReducedMLP
from .narrow import NarrowLinear

__all__ = ["ReducedHeadAttention", "ReducedMLP", "LowRankLinear", "LatentKVAttention", "NarrowLinear"]
