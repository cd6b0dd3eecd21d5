"""Passes: configs (frozen, versioned `PassConfig` dataclasses) and their handlers in one registry (`PASSES`), each
with a scope: "layer" (A3QK, A3OV, A3MLP, A3Experts), "model" (baselines, Allocate, A3KV) or "linear" (quantization)."""
from .a3 import A3MLP, A3OV, A3QK, A3Experts, a3_passes
from .allocate import A3KV, Allocate
from .base import PASS_TYPES, PASSES, PassConfig, PassContext, pass_from_dict, pass_to_dict, scope_of
from .lowrank import ASVD, SVDLLM, SVDLLM2, PlainSVD

__all__ = ["A3QK", "A3OV", "A3MLP", "A3Experts", "a3_passes", "Allocate", "A3KV", "ASVD", "SVDLLM", "SVDLLM2",
           "PlainSVD",
           "PASSES", "PASS_TYPES", "PassConfig", "PassContext", "pass_from_dict", "pass_to_dict", "scope_of"]
