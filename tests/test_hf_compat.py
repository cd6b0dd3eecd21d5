"""a3mod.hf_compat: the model-level KV cache argument and output across transformers versions."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from a3mod.hf_compat import cache_kwargs, output_cache

from conftest import tiny_model


def test_cache_round_trip_matches_full_forward():
    """Prefill through cache_kwargs / output_cache, then one cached step, equals one forward of all tokens; the
    cache holds every token (it was really passed, whichever name this transformers uses)."""
    model = tiny_model("llama", kv_heads=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids[:, :6], use_cache=True, **cache_kwargs(model, cache))
    assert output_cache(out) is cache and cache.get_seq_length() == 6
    step = model(input_ids=ids[:, 6:], use_cache=True, **cache_kwargs(model, output_cache(out))).logits
    torch.testing.assert_close(step[:, -1], model(input_ids=ids).logits[:, -1], rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 7


def test_output_cache_none_without_cache():
    model = tiny_model("llama", kv_heads=2).eval()
    assert output_cache(model(input_ids=torch.zeros(1, 3, dtype=torch.long), use_cache=False)) is None
    assert output_cache({"logits": 1}) is None
