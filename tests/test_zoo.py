"""The zoo: every decoder-only causal-LM type of the installed transformers, as a tiny random model (tests/zoo.py).

Each type is either compressed (full-rank equivalence, 30% finite and on target, cached generate == uncached,
save/load bit exact) or refused with a typed a3mod error that names the reason and leaves the model untouched;
never a silent mismatch, never a raw exception from a3mod. Types whose tiny config does not run in transformers
itself are reported, not failed. `python evals/zoo_table.py` writes the same results into the README.
"""
from __future__ import annotations

import pytest
import torch

from zoo import check_type, zoo_types

# families a3mod must keep compressing (a regression here is a failure, not a refusal)
MUST_COMPRESS = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox", "phi3", "olmo2",
                 "opt", "starcoder2", "glm", "glm4", "helium", "ernie4_5", "persimmon", "phi", "cohere", "granite",
                 "stablelm", "olmo", "smollm3", "gemma3_text", "gpt_neo", "lfm2", "gpt_bigcode", "olmo_hybrid", "gptj", "bamba", "jamba", "mpt", "bloom", "falcon",
                 "apertus", "apertus1p5_text",
                 # NoPE layers among RoPE ones (a3mod.arch.views.applies_rope)
                 "cohere2", "cohere2_moe", "exaone4", "exaone_moe",
                 # q/k norms after RoPE (ArchSpec.qk_norm_after_rope)
                 "hunyuan_v1_dense", "hunyuan_v1_moe",
                 # gated attention: attn_out * sigmoid(gate) before o_proj (tests/test_gated.py)
                 "qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "afmoe", "lfm3", "beam", "laguna",
                 # Llama 4 (adapter; tests/test_llama4.py); Gemma 4: attention kept whole, MLPs give the ratio
                 "llama4_text", "gemma4_text", "gemma4_unified_text",
                 # attention sinks found by discovery (tests/test_families_2026.py); NoPE global layers (flint)
                 "granite_swa", "granitemoe_swa", "flint", "mimo_v2_flash",
                 # DeepSeek sparse attention: latent attention compressed, the indexer kept whole
                 "deepseek_v32", "glm_moe_dsa",
                 # attention kept whole (gated latent attention; DeepSeek-V4's compressed sparse attention), MLPs and
                 # experts compressed (tests/test_families_2026.py)
                 "hy_v4", "axk2", "deepseek_v4",
                 # rotate_half of (x2, -x1) and norms after RoPE (nanochat); NoPE global layers (lara_mini, kolibri1)
                 "nanochat", "lara_mini", "kolibri1",
                 # hybrids: mixers kept, every MLP compressed (tests/test_hybrid.py)
                 "qwen3_5_text", "falcon_h1", "granitemoehybrid", "kimi_linear", "olmo_hybrid", "nemotron_h",
                 # one shared transformer block per few layers, tied, per-use adapters (tests/test_zamba2.py)
                 "zamba2",
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


def test_learned_activation_parameters_survive(tmp_path):
    """Apertus' xIELU has learned parameters: the reduced MLP keeps the original's (not ACT2FN's defaults), at full
    rank exactly, and through save/load and from_pretrained."""
    import a3mod
    from transformers import AutoModelForCausalLM

    from zoo import _ids, _logits, tiny_zoo_model

    model = tiny_zoo_model("apertus")
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.mlp.act_fn.alpha_p.fill_(0.3 + 0.1 * i)
            layer.mlp.act_fn.alpha_n.fill_(-0.7 - 0.1 * i)
    ids = _ids(2, 12, 0)
    ref = _logits(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=_ids(4, 16, 1), progress=False)
    assert torch.equal(model.model.layers[1].mlp.act_fn.alpha_p, torch.tensor([0.4]))
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(a3mod.load(a3mod.save(model, tmp_path / "a")), ids), _logits(model, ids),
                               rtol=0, atol=0)
    model.save_pretrained(tmp_path / "hf")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids),
                               _logits(model, ids), rtol=0, atol=0)



def test_qk_norms_after_rope_are_described_and_checked():
    """HunYuan normalises q/k after RoPE: the reduced attention's config says so (written to the checkpoint only when
    set), and the flag without per-head norms is a ConfigError naming it."""
    import a3mod
    from a3mod.modules.attention import AttentionConfig
    from a3mod.modules.configs import ConfigError
    from zoo import _ids, tiny_zoo_model

    model = tiny_zoo_model("hunyuan_v1_dense")
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    entry = model.model.layers[0].self_attn.describe()
    assert entry["qk_norm_after_rope"] is True and entry["qk_norm"] == "head"
    qwen = tiny_zoo_model("qwen3")
    a3mod.apply(qwen, a3mod.a3_passes(0.3), calib=_ids(4, 16, 1), progress=False)
    assert "qk_norm_after_rope" not in qwen.model.layers[0].self_attn.describe()
    with pytest.raises(ConfigError, match="qk_norm_after_rope"):
        AttentionConfig(hidden=8, heads=2, kv_heads=2, head_dim=4, qk_dim=4, vo_dim=4, rot_dim=4, scaling=0.5,
                        bias=dict(q=False, k=False, v=False, o=False), qk_norm_after_rope=True)
