"""Passes: configs (frozen dataclasses) and their registered handlers (per layer for A3, whole model for baselines)."""
from .a3 import A3MLP, A3OV, A3QK, a3_passes
from .base import HANDLERS, MODEL_HANDLERS, PASS_TYPES, pass_from_dict, pass_to_dict
from .allocate import A3KV, Allocate
from .lowrank import ASVD, SVDLLM, PlainSVD

__all__ = ["A3QK", "A3OV", "A3MLP", "a3_passes", "Allocate", "A3KV", "ASVD", "SVDLLM", "PlainSVD",
           "HANDLERS", "MODEL_HANDLERS",
           "PASS_TYPES", "pass_from_dict", "pass_to_dict"]
