"""The zoo: every decoder-only causal-LM type of the installed transformers, as a tiny random model (tests/zoo.py).

Each type is either compressed (full-rank equivalence, 30% finite and on target, cached generate == uncached,
save/load bit exact) or refused with a typed a3mod error that names the reason and leaves the model untouched;
never a silent mismatch, never a raw exception from a3mod. Types whose tiny config does not run in transformers
itself are reported, not failed. `python evals/zoo_table.py` writes the same results into the README.
"""
from __future__ import annotations

import pytest

from zoo import check_type, zoo_types

# families a3mod must keep compressing (a regression here is a failure, not a refusal)
MUST_COMPRESS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox", "phi3", "olmo2",
                 "opt", "starcoder2", "glm", "glm4", "helium", "ernie4_5", "persimmon", "phi", "cohere", "granite",
                 "stablelm", "olmo", "smollm3", "gemma3_text", "gpt_neo", "lfm2", "gpt_bigcode", "olmo_hybrid", "gptj", "bamba", "jamba", "mpt", "bloom", "falcon",
                 # mixture of experts (tests/test_moe.py)
                 "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "granitemoeshared", "phimoe", "glm4_moe",
                 "gpt_oss", "minimax", "ernie4_5_moe", "dots1", "solar_open", "lfm2_moe",
                 # multi-head latent attention (tests/test_mla.py)
                 "deepseek_v2", "deepseek_v3", "glm4_moe_lite", "bailing_hybrid"}


@pytest.mark.parametrize("mtype", zoo_types())
def test_zoo(mtype, tmp_path):
    r = check_type(mtype, tmp_path)
    assert r.status in ("compressed", "refused", "not run")
    if mtype in MUST_COMPRESS:
        assert r.status == "compressed", f"{mtype}: {r.status}: {r.detail}"
    if r.status == "refused":
        assert len(r.detail) > 30, r.detail          # names what is missing
