"""Compact modules that replace a layer's attention and MLP. Plain nn.Linear children; no passes imported."""
from .attention import ReducedHeadAttention
from .mlp import ReducedMLP

__all__ = ["ReducedHeadAttention", "ReducedMLP"]
