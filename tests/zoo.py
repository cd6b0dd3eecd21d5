"""The zoo: every decoder-only causal-LM type of the installed transformers, as a tiny random model.

`zoo_types()` lists the model types that have a text-only `*ForCausalLM` class (encoder-decoders, encoders with
an LM head, speech / vision / multimodal wrappers are left out: they are not what a3mod compresses as causal LMs);
`tiny_zoo_model(t)` builds one from the type's own config class with every size field shrunk. Used by
tests/test_zoo.py and by evals/zoo_table.py, which writes the README's support table.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 128

# Types whose causal-LM class is not a plain text decoder: encoders and encoder-decoders with an LM head,
# multimodal / speech / vision wrappers, and models that need more than input_ids.
NOT_DECODER_ONLY = {
    "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "blenderbot", "blenderbot-small", "camembert",
    "data2vec-text", "electra", "ernie", "marian", "mbart", "megatron-bert", "mvp", "pegasus", "plbart", "prophetnet",
    "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "trocr", "whisper", "xlm", "xlm-roberta",
    "xlm-roberta-xl", "xmod", "xlnet", "reformer", "git", "fuyu", "got_ocr2", "mllama", "emu3", "moshi", "musicgen",
    "musicgen_melody", "phi4_multimodal", "llama4", "gemma3", "gemma3n", "gemma4", "gemma4_unified", "qwen3_5",
    "qwen3_5_moe", "qwen4_exp", "aria_text", "dots3_note", "moss_transcribe_diarize", "cpmant", "blt",
    "gemma4_assistant", "gemma4_unified_assistant",
}

# size fields, by the names configs use for them
_SIZES = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "mlp_dim": 128,
    "head_dim": 16, "kv_channels": 16,
    "vocab_size": VOCAB, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_seq_len": 128,
    "seq_length": 128,
    # partial rotary given in dims (GPT-J, CodeGen), multi-head latent attention, experts, linear attention / SSMs
    "rotary_dim": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 32,
    "q_lora_rank": 48, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "num_experts": 4,
    "moe_shared_expert_intermediate_size": 64,
    "n_routed_experts": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1,
    "topk_group": 1, "first_k_dense_replace": 1, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_head_dim": 16, "linear_num_heads": 4, "mamba_n_heads": 4, "mamba_d_head": 16,
    "mamba_d_state": 16, "ssm_state_size": 16, "state_size": 16,
    # Gemma 3n / 4 per-layer inputs (default: a 262,144-token table of 256-wide vectors per layer)
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 16,
    # DeepSeek sparse attention's indexer (real: 64 x 128 from q_lora 1536, a few % of a layer; default here: 8192 wide)
    "index_n_heads": 4, "index_head_dim": 16, "index_topk": 8,
}
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")


def zoo_types() -> list[str]:
    """Decoder-only causal-LM model types of the installed transformers (sorted)."""
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in CONFIG_MAPPING and t not in NOT_DECODER_ONLY)


def tiny_zoo_config(mtype: str):
    """The type's default config with every size field that exists shrunk (`_SIZES`), token ids inside the vocab,
    and as few layers as keep every distinct layer type of its default pattern (hybrids keep attention layers)."""
    cfg = CONFIG_MAPPING[mtype]()
    text = getattr(cfg, "text_config", None)
    for c in (cfg,) + ((text,) if text is not None and text is not cfg else ()):
        n_orig = next((getattr(c, k) for k in _LAYER_COUNTS if isinstance(getattr(c, k, None), int)), None)
        lt = getattr(c, "layer_types", None)
        n = 2
        if isinstance(lt, (list, tuple)) and lt:
            kinds = set(lt)
            n = max(2, next(i + 1 for i in range(len(lt)) if set(lt[: i + 1]) == kinds))
        for k, v in _SIZES.items():
            if k in c.to_dict() or hasattr(c, k):
                _set(c, k, n if k in _LAYER_COUNTS else v)
        if getattr(c, "qk_rope_head_dim", None):      # multi-head latent attention: head_dim is the RoPE part
            _set(c, "head_dim", _SIZES["qk_rope_head_dim"])
            _set(c, "num_key_value_heads", _SIZES["num_attention_heads"])
        if hasattr(c, "attn_layer_indices") and not getattr(c, "attn_layer_indices"):    # Bamba: one attention layer
            _set(c, "attn_layer_indices", [1])
        _ssm_sizes(c)
        for k, v in _FIXES.get(c.model_type, {}).items():     # defaults that do not build a model on their own
            _set(c, k, v(c) if callable(v) else v)
        for k, v in list(vars(c).items()):     # per-layer lists (layer_types, mlp_layer_types, ...): first n
            if isinstance(v, list) and n_orig and len(v) == n_orig and not k.startswith("_"):
                _set(c, k, v[:n])
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            tok = getattr(c, k, None)
            if isinstance(tok, int) and tok >= VOCAB:
                setattr(c, k, 1)
            elif isinstance(tok, list):
                setattr(c, k, [t if t < VOCAB else 1 for t in tok])
        c.initializer_range = 0.1
    if isinstance(cfg.to_dict().get("per_layer_config"), dict):     # Gemma 4: per-layer sizes (its global head_dim)
        d = cfg.to_dict()
        n = next(d[k] for k in _LAYER_COUNTS if isinstance(d.get(k), int))
        d["per_layer_config"] = {k: {**v, **({"head_dim": 2 * _SIZES["head_dim"]} if "head_dim" in v else {})}
                                 for k, v in d["per_layer_config"].items() if int(k) < n}
        try:
            cfg = type(cfg)(**d)
        except Exception:        # noqa: BLE001  a validator tying per-layer sizes to others (dots3) refuses it
            pass
    return cfg


# per type: config fields whose defaults are None / incomplete in transformers 5.24 (the model cannot be built
# from the default config at all), set to the smallest values that build
_FIXES = {
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 2},
    "dbrx": {"attn_config": lambda c: (setattr(c.attn_config, "rope_theta", 10000.0),
                                       setattr(c.attn_config, "clip_qkv", 8.0), c.attn_config)[2],
             "ffn_config": lambda c: (setattr(c.ffn_config, "hidden_size", _SIZES["hidden_size"]),   # its own copy
                                      setattr(c.ffn_config, "ffn_hidden_size", 32), c.ffn_config)[2]},
    "longcat_flash": {"qk_head_dim": 24, "expert_ffn_hidden_size": 32, "zero_expert_num": 2, "moe_topk": 2},
    # DeepSeek-V4: the grouped output projection's low rank (default 1024 per group, 8 groups) would outweigh the
    # tiny experts 100 to 1 (the real model's experts dominate)
    "deepseek_v4": {"o_lora_rank": 16},
    # Zamba2: keep what its real checkpoints have: a shared block used by several layers (two blocks, three uses:
    # layers 1 and 4 share block 0), per-use adapters in the shared MLP and attention, RoPE in the shared attention
    "zamba2": {"attention_hidden_size": 128, "attention_head_dim": 32, "kv_channels": 16, "num_query_groups": 4,
               "num_hidden_layers": 5, "layers_block_type": ["linear_attention", "hybrid", "hybrid", "linear_attention",
                                                             "hybrid"],
               "hybrid_layer_ids": [1, 2, 4], "num_mem_blocks": 2, "use_shared_attention_adapter": True,
               "adapter_rank": 8, "use_mem_rope": True,
               "num_key_value_heads": lambda c: c.num_attention_heads,    # its attention adapters need MHA
               "intermediate_size": 256},     # 4 x hidden as in Zamba2-1.2B / 2.7B: the MLP gives the whole ratio
    "zamba": {"attention_hidden_size": 128, "attention_head_dim": 32, "mamba_dt_rank": 8},
    "xlstm": {"embedding_dim": 64, "num_blocks": 2},
    "gemma3n_text": {"num_kv_shared_layers": 0, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 128,
                     "laurel_rank": 8},
    "smollm3": {"no_rope_layers": [1, 0]},
    # Laguna: a per-layer head count list (default 48 each)
    "laguna": {"num_attention_heads_per_layer": lambda c: [c.num_attention_heads] * c.num_hidden_layers},
    # Llama 4: temperature tuning and chunked attention inside the zoo's short windows (defaults: 8192 tokens)
    "llama4_text": {"floor_scale": 4, "attention_chunk_size": 6},
    # Granite 4.0-H: Mamba-2 layers with an attention layer every few (the default config has none)
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},     # real checkpoints: every 4th layer NoPE; keep one of each kind
    "cohere_compass_text": {"rope_parameters": lambda c: {t: {"rope_type": "default", "rope_theta": 10000.0}
                                                          for t in set(c.layer_types)}},
}


def _ssm_sizes(c) -> None:
    """State-space mixers (Mamba-2 and the hybrids built on it): heads x head dim must equal expand x hidden."""
    hidden = _SIZES["hidden_size"]
    for heads, dim, expand in (("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("n_mamba_heads", "mamba_headdim",
                               "mamba_expand"), ("mamba_num_heads", "mamba_head_dim", "expand")):
        if hasattr(c, heads) and hasattr(c, dim):
            e = getattr(c, expand, 2) or 2
            _set(c, dim, 16)
            _set(c, heads, e * hidden // 16)
            if hasattr(c, "mamba_d_ssm"):
                _set(c, "mamba_d_ssm", e * hidden)
    if hasattr(c, "attention_head_dim"):
        _set(c, "attention_head_dim", _SIZES["head_dim"])
    if c.model_type == "mamba2":
        _set(c, "num_heads", (getattr(c, "expand", 2) or 2) * hidden // c.head_dim)


def _set(c, k, v) -> None:
    try:
        setattr(c, k, v)
    except (AttributeError, TypeError, ValueError):      # a derived property (Jamba's layer_types)
        pass


def tiny_zoo_model(mtype: str, seed: int = 0):
    """A tiny random `*ForCausalLM` of `mtype` in eval mode (fp32), biases and norm scales randomised."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_zoo_config(mtype)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif p.dim() == 1 and ("norm" in name or "ln" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------------------- checks
@dataclass
class Result:
    """What a3mod did with one model type: "compressed" (every check passed), "refused" (a typed a3mod error
    naming the reason, the model untouched) or "not run" (the tiny config does not run in transformers itself)."""

    mtype: str
    status: str
    detail: str


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _greedy(model, prompt, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=use_cache,
                              pad_token_id=0, attention_mask=torch.ones_like(prompt))


def short_reason(e: Exception) -> str:
    """The part of an a3mod error that names what is missing, on one line."""
    msg = " ".join(str(e).split())
    if "could not describe it:" in msg:
        msg = "discovery: " + msg.split("could not describe it:", 1)[1].strip()
    elif "full-rank rewrite of" in msg:
        part = msg.split("full-rank rewrite of ", 1)[1].split(" does not", 1)[0]
        unused = msg.split("parameters it does not use: ", 1)[1].split(". Nothing", 1)[0] if "does not use" in msg \
            else ""
        msg = f"self-check: the rewrite of {part} does not reproduce the layer" + (
            f" (unmodelled parameters: {unused})" if unused else "")
    return msg[:240]


def check_type(mtype: str, tmp_dir) -> Result:
    """Full-rank equivalence, 30% finite and on target, cached generate == uncached, save/load bit exact (a3mod.load
    and transformers' from_pretrained of a save_pretrained folder); or a
    typed refusal that leaves the model as it was. An untyped error from a3mod propagates (a test failure)."""
    import a3mod
    from a3mod.errors import A3ModError

    ids, calib = _ids(2, 12, 0), _ids(4, 16, 1)
    try:
        model = tiny_zoo_model(mtype)
        ref = _logits(model, ids)
    except Exception as e:                       # transformers' own model at this size
        return Result(mtype, "not run", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}")
    try:
        a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib, progress=False)
    except A3ModError as e:
        assert torch.equal(_logits(model, ids), ref), f"{mtype}: a refused apply changed the model"
        return Result(mtype, "refused", short_reason(e))
    rel = float((_logits(model, ids) - ref).norm() / ref.norm())
    assert rel < 1e-4, f"{mtype}: ratio 0 is not exact (relative error {rel:.2e})"
    model = tiny_zoo_model(mtype)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=calib, progress=False)
    out = _logits(model, ids)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref), mtype
    rep = a3mod.report(model)
    ratio = rep.ratio_reducible                      # a hybrid's mixers and left layers keep their parameters
    assert 0.2 <= ratio <= 0.4, f"{mtype}: ratio {ratio:.3f} of the attention and MLP parts for target 0.3"
    prompt = _ids(1, 6, 5)
    cached, uncached = _greedy(model, prompt, True), _greedy(model, prompt, False)
    assert torch.equal(cached, uncached), f"{mtype}: cached generate != uncached"
    loaded = a3mod.load(a3mod.save(model, Path(tmp_dir) / mtype))
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), f"{mtype}: save/load differs"
    assert torch.equal(_logits(loaded, ids), out), f"{mtype}: loaded model's logits differ"
    from transformers import AutoModelForCausalLM      # a3mod's native type: transformers' own loading too

    model.save_pretrained(Path(tmp_dir) / f"{mtype}-hf")
    native = AutoModelForCausalLM.from_pretrained(Path(tmp_dir) / f"{mtype}-hf").eval()
    assert torch.equal(_logits(native, ids), out), f"{mtype}: save_pretrained -> from_pretrained logits differ"
    kv = rep.kv_bytes_per_token() / rep.kv_bytes_per_token(True)
    left, mixers = sum(bool(r.left) for r in rep.rows), sum(bool(r.mixer) for r in rep.rows)
    return Result(mtype, "compressed", f"at 30%: {ratio:.1%} of attention + MLP params removed, KV cache x{kv:.2f}" + (
        f"; {left} of {len(rep.rows)} layers left as they are" if left else "") + (
        f"; {mixers} of {len(rep.rows)} layers: hybrid mixer kept, its MLP compressed" if mixers else "") + (
        f"; attention kept whole ({rep.attn_whole}), MLPs compressed" if rep.attn_whole else ""))
