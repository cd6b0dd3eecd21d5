"""Export a compressed model with a static KV cache (transformers' ExecuTorch recipe, per-layer cache shapes).

transformers' `TorchExportableModuleWithStaticCache` sizes every layer's cache from the config (one num_kv_heads and
head_dim, keys and values alike). A compressed layer has its own k (qk) and v (vo) head dims, so the cache here is
sized from the modules themselves: keys (B, Hkv, L, r_qk), values (B, Hkv, L, r_vo), layer by layer.

    program = a3mod.export.export_with_static_cache(model, max_cache_len=128)
    tokens = TorchExportableModuleWithStaticCache.generate(program, prompt_ids, max_new_tokens=20)  # transformers'
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

from ..arch import layer_views


def _kv_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
    """(kv_heads, k_dim, v_dim) per decoder layer of `model`: a compressed attention's own dims, else the model's."""
    out = []
    for v in layer_views(model):
        attn = v.attn
        qk, vo = getattr(attn, "qk_dim", None), getattr(attn, "vo_dim", None)
        heads = getattr(attn, "num_key_value_heads", None)
        if qk is None or vo is None or heads is None:
            d = v.dims
            qk, vo, heads = d.head_dim, d.head_dim, d.kv_heads
        out.append((heads, qk, vo))
    return out


def static_cache_module(model: nn.Module, batch_size: int = 1, max_cache_len: int = 128):
    """transformers' `TorchExportableModuleWithStaticCache` around `model`, its cache sized per layer from the
    compressed modules (k and v head dims apart)."""
    gen = model.generation_config
    gen.use_cache, gen.cache_implementation = True, "static"
    gen.cache_config = {"batch_size": batch_size, "max_cache_len": max_cache_len}
    wrapped = TorchExportableModuleWithStaticCache(model, batch_size=batch_size, max_cache_len=max_cache_len)
    shapes = _kv_shapes(model)
    p = next(model.parameters())
    for i, (layer, (heads, k_dim, v_dim)) in enumerate(zip(wrapped.static_cache.layers, shapes)):
        layer.is_initialized = False
        k = torch.zeros(batch_size, heads, 0, k_dim, dtype=p.dtype, device=p.device)    # size 0: no data
        v = torch.zeros(batch_size, heads, 0, v_dim, dtype=p.dtype, device=p.device)
        layer.lazy_initialization(k, v)
        wrapped.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
        wrapped.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
        wrapped.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)
    return wrapped


def export_with_static_cache(model: nn.Module, batch_size: int = 1, max_cache_len: int = 128,
                             strict: bool = True) -> torch.export.ExportedProgram:
    """`torch.export` of `static_cache_module(model, ...)` on one token, as transformers'
    `convert_and_export_with_cache` does (the program runs token by token, cache_position given)."""
    module = static_cache_module(model, batch_size, max_cache_len)
    p = next(model.parameters())
    with torch.no_grad():
        return torch.export.export(module, args=(), strict=strict, kwargs={
            "input_ids": torch.zeros(batch_size, 1, dtype=torch.long, device=p.device),
            "cache_position": torch.zeros(1, dtype=torch.long, device=p.device)})
