"""Passes: configs (frozen dataclasses) and their registered per-layer handlers."""
from .a3 import A3MLP, A3OV, A3QK, a3_passes
from .base import HANDLERS, PASS_TYPES, pass_from_dict, pass_to_dict

__all__ = ["A3QK", "A3OV", "A3MLP", "a3_passes", "HANDLERS", "PASS_TYPES", "pass_from_dict", "pass_to_dict"]
