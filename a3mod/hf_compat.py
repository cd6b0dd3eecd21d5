"""Calling a Hugging Face model with a KV cache across transformers versions.

transformers 5.24 renamed the forward argument and output field `past_key_values` to `cache` (the old argument
still works with a deprecation warning until 5.40; the old output field is gone). Everything in a3mod that
passes or reads a model-level cache goes through these two functions.
"""
from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.lru_cache(maxsize=None)
def _cache_arg(cls: type) -> str:
    """The name a model class's forward takes its KV cache by (read once per class: calls sit on decode loops)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """{"cache": cache} when model.forward takes `cache`, else {"past_key_values": cache}."""
    return {_cache_arg(type(model)): cache}


def output_cache(out):
    """The cache a forward returned (`out.cache` or `out.past_key_values`), None if there is none."""
    for name in ("cache", "past_key_values"):
        c = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if c is not None:
            return c
    return None
