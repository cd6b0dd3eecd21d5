"""The adapter table: `ArchSpec`s of the model families a3mod knows by name. The only place that knows module
names of Hugging Face families; every other model type goes through graph discovery (a3mod.arch.discover)."""
from __future__ import annotations

from dataclasses import replace

from .spec import ArchSpec

_LLAMA = ArchSpec(layers="model.layers", attn="self_attn", mlp="mlp", q="q_proj", k="k_proj", v="v_proj",
                  gate="gate_proj")

_BERT = ArchSpec(layers="bert.encoder.layer", attn="attention.self", mlp="", q="query", k="key", v="value",
                o="attention.output.dense", o_from_layer=True, up="intermediate.dense", down="output.dense",
                norms=("attention.output.LayerNorm", "output.LayerNorm"), rope=None, rotary=None)   # encoder, post-norm

ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,               # q/k/v biases, o without bias; read from the modules themselves
    "gpt2": ArchSpec(layers="transformer.h", attn="attn", mlp="mlp", q=None, k=None, v=None, qkv="c_attn",
                     o="c_proj", gate=None, up="c_fc", down="c_proj", act="activation_function",
                     norms=("ln_1", "ln_2"), rope=None, conv1d=True, rotary=None),
    "qwen3": replace(_LLAMA, qk_norm="head"),          # per-head RMSNorm on q/k; sliding window per layer_types
    "olmo2": replace(_LLAMA, qk_norm="all", norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    "gemma": _LLAMA,               # head_dim independent of hidden; (1+w) RMSNorm, scaled embeddings: outside A3
    "gemma2": replace(_LLAMA, act="hidden_activation", softcap="attn_logit_softcapping"),
    "starcoder2": replace(_LLAMA, gate=None, up="c_fc", down="c_proj",   # biases from use_bias; LayerNorm
                          dropouts=("residual_dropout", "residual_dropout")),
    "phi3": replace(_LLAMA, q=None, k=None, v=None, qkv="qkv_proj", gate=None, gate_up="gate_up_proj"),
    "gpt_neox": ArchSpec(layers="gpt_neox.layers", attn="attention", mlp="mlp", q=None, k=None, v=None,
                         qkv="query_key_value", qkv_layout="per_head", o="dense", up="dense_h_to_4h",
                         down="dense_4h_to_h", rotary="gpt_neox.rotary_emb"),   # partial rotary (rotary_pct)
    "opt": ArchSpec(layers="model.decoder.layers", attn="self_attn", mlp="", q="q_proj", k="k_proj", v="v_proj",
                    o="out_proj", up="fc1", down="fc2", act="activation_function",
                    norms=("self_attn_layer_norm", "final_layer_norm"), rope=None, rotary=None),
    "mpt": ArchSpec(layers="transformer.blocks", attn="attn", mlp="ffn", q=None, k=None, v=None, qkv="Wqkv",
                    o="out_proj", up="up_proj", down="down_proj", act_name="gelu", norms=("norm_1", "norm_2"),
                    scale_attr="softmax_scale",
                    rope=None, rotary=None, dropouts=("resid_attn_dropout", "hidden_dropout"), alibi="position_bias",
                    bool_mask="masked", mlp_residual=True),   # ALiBi; the block adds the attention residual
    "bloom": ArchSpec(layers="transformer.h", attn="self_attention", mlp="mlp", q=None, k=None, v=None,
                      qkv="query_key_value", qkv_layout="per_head", o="dense", up="dense_h_to_4h", down="dense_4h_to_h",
                      act_name="gelu_pytorch_tanh", rope=None, rotary=None, scale_attr="inv_norm_factor",
                      dropouts=("hidden_dropout", "hidden_dropout"), alibi="alibi", attn_residual=True,
                      mlp_residual=True),   # ALiBi; both residual adds inside the attention / MLP modules
    "falcon": ArchSpec(layers="transformer.h", attn="self_attention", mlp="mlp", q=None, k=None, v=None,
                       qkv="query_key_value", qkv_layout="grouped", o="dense", up="dense_h_to_4h",
                       down="dense_4h_to_h", act="activation", rotary="transformer.rotary_emb", alibi="alibi",
                       dropouts=("_none", "_none"),
                       scale_attr="inv_norm_factor"),   # multi-query, grouped (new decoder) and per-head qkv alike
    "gpt_oss": replace(_LLAMA, experts="experts", sinks="sinks", rope_table="once"),   # MoE only; sinks; biases
    # multi-head latent attention: q(_b)_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj read by a3mod.arch.mla
    "deepseek_v2": replace(_LLAMA, q=None, k=None, v=None, mla=True, experts="experts", shared="shared_experts"),
    "deepseek_v3": replace(_LLAMA, q=None, k=None, v=None, mla=True, experts="experts", shared="shared_experts"),
    # complex-frequency RoPE on interleaved pairs, an L2 q/k norm after it in the RoPE layers (QK whole there), NoPE
    # layers with temperature-tuned queries, chunked attention (the model's mask), dense and MoE layers
    "llama4_text": replace(_LLAMA, mlp="feed_forward", rope="interleaved", rope_table="complex", qk_norm="head",
                           qk_norm_names=("qk_norm", "qk_norm"), qk_norm_after_rope=True, attn_temperature=True,
                           experts="experts", shared="shared_expert"),
    # every head is normalised (q, k and v: v_norm), and K/V may be shared across layers: the attention stays as it is
    # and the MLPs give its share of a ratio (passes.balance.raised_ratio); per-layer inputs stay too
    "gemma4_text": replace(_LLAMA, act="hidden_activation",
                           attn_whole="norms over each query, key and value head (v_norm) need the whole head, and "
                                      "layers may share K/V"),
    "gemma4_unified_text": replace(_LLAMA, act="hidden_activation",
                                   attn_whole="norms over each query, key and value head (v_norm) need the whole "
                                              "head, and layers may share K/V"),
    # latent attention with parts A3's latent-attention forms do not model (an elementwise output gate from x:
    # HY-V4; a gated query norm: AXK2), compressed sparse attention (DeepSeek-V4: K = V from one projection, a
    # compressor's extra entries, a grouped low-rank output): the attention stays, the MLPs / experts give its share
    "hy_v4": replace(_LLAMA, experts="experts", shared="shared_experts",
                     attn_whole="latent attention with an elementwise output gate (gate_proj): A3's latent-attention "
                                "forms do not model the gate"),
    "axk2": replace(_LLAMA, experts="experts", shared="shared_experts",
                    attn_whole="latent attention with a gated query projection (q_gate_proj): A3's latent-attention "
                               "forms do not model the gate"),
    "deepseek_v4": replace(_LLAMA, experts="experts", shared="shared_experts",
                           attn_whole="compressed sparse attention: K = V from one projection (kv_proj) plus a "
                                      "compressor's entries, and a grouped low-rank output projection"),
    # one mixer per layer, at the same path: Mamba-2 (left), attention (no RoPE), a plain MLP (relu^2) or an MoE block
    "nemotron_h": ArchSpec(layers="model.layers", attn="mixer", mlp="mixer", q="q_proj", k="k_proj", v="v_proj",
                           gate=None, act="mlp_hidden_act", norms=("norm", "norm"), rope=None, rotary=None,
                           experts="experts", shared="shared_experts"),
    # Mamba-2 layers (left) and hybrid layers that run one of `num_mem_blocks` shared transformer blocks (tied
    # across the layers that use it) beside their Mamba-2 mixer; per-use adapters inside the shared MLP
    "zamba2": replace(_LLAMA, attn="shared_transformer.self_attn", mlp="shared_transformer.feed_forward", gate=None,
                      gate_up="gate_up_proj", mlp_adapters="gate_up_proj_adapter_list",
                      norms=("shared_transformer.input_layernorm", "shared_transformer.pre_ff_layernorm"),
                      attn_whole="one attention block shared by several layers, with per-use low-rank adapters on "
                                 "q/k/v and its input the concatenation [hidden | embeddings]: not modelled by A3's "
                                 "attention forms yet"),
    "bert": _BERT,
    "roberta": replace(_BERT, layers="roberta.encoder.layer"),
}


def supported_types() -> list[str]:
    return sorted(ARCHS)


# facts graph discovery does not read, for types without an adapter: applied to the spec it builds (arch.lookup)
DISCOVERED_FACTS: dict[str, dict] = {
    "hunyuan_v1_dense": {"qk_norm_after_rope": True},       # query_layernorm / key_layernorm after RoPE
    "hunyuan_v1_moe": {"qk_norm_after_rope": True},
    # weightless RMSNorm on the rotated q/k; its rotate_half is (x2, -x1): the rotation by -angle
    "nanochat": {"qk_norm_after_rope": True, "rope_table": "half_flipped"},
    "mimo_v2_flash": {"v_scale": "v_scale"},                # values times attention_value_scale
}
