"""The zoo: every decoder-only causal-LM type of the installed transformers, as a tiny random model.

`zoo_types()` lists the model types that have a text-only `*ForCausalLM` class (encoder-decoders, encoders with
an LM head, speech / vision / multimodal wrappers are left out: they are not what a3mod compresses as causal LMs);
`tiny_zoo_model(t)` builds one from the type's own config class with every size field shrunk. Used by
tests/test_zoo.py and by evals/zoo_table.py, which writes the README's support table.
"""
from __future__ import annotations

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
}


def zoo_types() -> list[str]:
    """Decoder-only causal-LM model types of the installed transformers (sorted)."""
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in CONFIG_MAPPING and t not in NOT_DECODER_ONLY)


def tiny_zoo_config(mtype: str):
    """The type's default config with every size field that exists shrunk (`_SIZES`), tied ids inside the vocab."""
    cfg = CONFIG_MAPPING[mtype]()
    text = getattr(cfg, "text_config", None)
    for c in (cfg,) + ((text,) if text is not None and text is not cfg else ()):
        for k, v in _SIZES.items():
            if k in c.to_dict() or hasattr(c, k):
                try:
                    setattr(c, k, v)
                except (AttributeError, TypeError, ValueError):
                    pass
        for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            tok = getattr(c, k, None)
            if isinstance(tok, int) and tok >= VOCAB:
                setattr(c, k, 1)
            elif isinstance(tok, list):
                setattr(c, k, [t if t < VOCAB else 1 for t in tok])
        if getattr(c, "layer_types", None) is not None:
            c.layer_types = list(c.layer_types)[: _SIZES["num_hidden_layers"]]
        c.initializer_range = 0.1
    return cfg


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
