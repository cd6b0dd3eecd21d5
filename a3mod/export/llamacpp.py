"""GGUF export for llama.cpp (format "gguf"): the stock export (stock.py) written as llama.cpp's `llama`
architecture with the `gguf` package's writer.

What changes from the stock checkpoint (docs/export.md, "GGUF"):
- llama.cpp's `llama` architecture rotates adjacent pairs (2i, 2i+1); transformers' heads pair i with i + D/2. The
  q/k rows (and biases) of every head are permuted exactly as llama.cpp's own converter does (`permute`).
- The kept RoPE frequencies go into `rope_freqs.weight`: llama.cpp rotates pair i by pos * base^(-2i/D) / c_i, so
  c_i = base^(-2i/D) / inv_freq_i (1e30 for a zero-frequency slot); absent when the original rope is kept.
- key_length = value_length = rope.dimension_count = the export head dim; one feed_forward_length.
- The vocabulary (tokenizer.* keys) is copied from a GGUF (`vocab_from`: the checkpoint the model came from):
  llama.cpp's pre-tokenizer names cannot be derived from a Hugging Face tokenizer without llama.cpp's converter.
Families: those whose layers llama.cpp's `llama` graph computes (RMSNorm, SiLU-gated MLP, rotary, optional q/k/v/o
biases): llama, mistral, qwen2 (and llama-layout types such as smollm3 without NoPE layers are not claimed).
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..io import files
from .stock import ZERO_FACTOR, base_classes, to_stock

LLAMA_LIKE = ("llama", "mistral", "qwen2")
TYPES = ("f32", "f16", "q8_0")
_KEEP_GENERAL = ("general.name", "general.license", "general.basename", "general.organization")


def _reader(path):
    try:
        return gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"vocab_from={str(path)!r} is not a readable GGUF file ({e})") from None


def _field_value(f):
    """A GGUFReader field as (python value, value type, array element type or None)."""
    t = f.types[0]
    if t == gguf.GGUFValueType.ARRAY:
        sub = f.types[-1]
        vals = [bytes(f.parts[i]).decode("utf-8", "replace") if sub == gguf.GGUFValueType.STRING
                else f.parts[i].tolist()[0] for i in f.data]
        return vals, t, sub
    if t == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace"), t, None
    return f.parts[f.data[0]].tolist()[0], t, None


def check_target(path, vocab_from, overwrite: bool, ftype: str, sources=()) -> Path:
    """The output file's absolute path, after the checks that need no model: ExportError for a type, a name
    or an existing file save_gguf would refuse, a missing vocabulary source, or an output that is the vocabulary
    source or one of `sources` (the model's own files: never replaced, even with overwrite)."""
    if ftype not in TYPES:
        raise ExportError(f"format 'gguf': ftype={ftype!r}; allowed: {', '.join(TYPES)}")
    out = Path(path).absolute()
    if out.suffix != ".gguf":
        raise ExportError(f"format 'gguf' writes one file named *.gguf; got {str(out)!r}")
    inputs = {Path(p).resolve() for p in (vocab_from, *sources) if p is not None}
    if out.resolve() in inputs:
        raise ExportError(f"{str(out)!r} is the model or vocabulary the export reads; write it somewhere else")
    if out.exists() and (not overwrite or not out.is_file()):
        raise ExportError(f"{str(out)!r} exists; pass overwrite=True (CLI: --overwrite) to replace the file")
    if vocab_from is None or not Path(vocab_from).is_file():
        raise ExportError(f"format 'gguf' copies the vocabulary (tokenizer.* keys) from a GGUF file: give "
                          f"vocab_from= (CLI --vocab-from), e.g. the GGUF the model was compressed from; got "
                          f"{vocab_from!r}")
    return out


def check_model(model: nn.Module) -> None:
    """ExportError for a model llama.cpp's `llama` graph does not compute."""
    mtype = base_classes(model)[1].model_type
    if mtype not in LLAMA_LIKE:
        raise ExportError(f"format 'gguf': model type {mtype!r}; llama.cpp's llama architecture computes "
                          f"{', '.join(LLAMA_LIKE)} (export others with format='hf')")
    c = model.config
    if getattr(c, "use_sliding_window", False) or (mtype == "mistral" and getattr(c, "sliding_window", None)):
        raise ExportError("format 'gguf': sliding-window attention is not written to the llama architecture")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ExportError(f"format 'gguf': hidden_act {c.hidden_act!r}; the llama architecture uses silu")


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF rotate_half rows -> llama.cpp's adjacent pairs, per head (llama.cpp's converter `permute`)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freq_factors(stock: nn.Module) -> np.ndarray | None:
    """c_i with llama.cpp's pos * base^(-2i/D) / c_i = pos * inv_freq_i of the stock model (None: default rope)."""
    rotary = stock.model.rotary_emb
    c = stock.config
    if c.rope_parameters.get("rope_type", "default") == "default":
        return None
    if abs(float(getattr(rotary, "attention_scaling", 1.0)) - 1.0) > 1e-12:
        raise ExportError("format 'gguf': a rope attention factor other than 1 (YaRN) is not written to the llama "
                          "architecture")
    d, base = c.head_dim, float(c.rope_parameters["rope_theta"])
    inv = rotary.inv_freq.double().cpu()
    default = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    return torch.where(inv > 0, default / inv.clamp_min(1e-300), torch.full_like(inv, ZERO_FACTOR)).float().numpy()


def _tensor(writer, name: str, t: torch.Tensor, ftype: str) -> None:
    """One tensor in the file's type: 1-D tensors (norms, biases, rope factors) stay f32; q8_0 where rows are a
    multiple of 32, else f16 (as llama.cpp's converter does)."""
    a = t.detach().float().cpu().numpy()
    if a.ndim == 1 or ftype == "f32":
        writer.add_tensor(name, a.astype(np.float32))
    elif ftype == "q8_0" and a.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, a.astype(np.float16))


def _hparams(writer, c, vocab: int, ftype: str) -> None:
    writer.add_context_length(int(c.max_position_embeddings))
    writer.add_embedding_length(int(c.hidden_size))
    writer.add_block_count(int(c.num_hidden_layers))
    writer.add_feed_forward_length(int(c.intermediate_size))
    writer.add_head_count(int(c.num_attention_heads))
    writer.add_head_count_kv(int(c.num_key_value_heads))
    writer.add_key_length(int(c.head_dim))
    writer.add_value_length(int(c.head_dim))
    writer.add_rope_dimension_count(int(c.head_dim))
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(c.rms_norm_eps))
    writer.add_vocab_size(vocab)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ftype])


def _tensors(writer, stock: nn.Module, ftype: str) -> None:
    c, sd = stock.config, stock.state_dict()
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    _tensor(writer, "token_embd.weight", sd["model.embed_tokens.weight"], ftype)
    _tensor(writer, "output_norm.weight", sd["model.norm.weight"], "f32")
    if not c.tie_word_embeddings:
        _tensor(writer, "output.weight", sd["lm_head.weight"], ftype)
    factors = rope_freq_factors(stock)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                t = sd.get(f"model.layers.{i}.{hf}.{kind}")
                if t is None:
                    continue
                if gg in ("attn_q", "attn_k"):
                    t = permute(t, H if gg == "attn_q" else Hkv)
                _tensor(writer, f"blk.{i}.{gg}.{kind}", t, ftype if kind == "weight" else "f32")


def save_gguf(model: nn.Module, path: str | os.PathLike, vocab_from=None, overwrite: bool = False,
              ftype: str = "f32") -> Path:
    """Write `model` as a llama.cpp GGUF file (see the module docstring); returns its absolute path. ExportError
    before anything is written for what the llama architecture cannot hold; the file is written to a temporary
    sibling and renamed into place (never a half-written GGUF at `path`)."""
    out = check_target(path, vocab_from, overwrite, ftype)
    check_model(model)
    vocab = _reader(vocab_from)
    stock = to_stock(model).model
    keys = {k: _field_value(f) for k, f in vocab.fields.items()
            if k.startswith("tokenizer.") or k in _KEEP_GENERAL}
    n_vocab = len(keys.get("tokenizer.ggml.tokens", ([],))[0])
    if n_vocab != stock.config.vocab_size:
        raise ExportError(f"vocab_from={str(vocab_from)!r} has {n_vocab} tokens; the model has "
                          f"{stock.config.vocab_size}")
    tmp = out.parent / f".{out.name}.a3mod-tmp-{os.getpid()}"
    with files.output_lock(out):
        try:
            writer = gguf.GGUFWriter(str(tmp), "llama")
            _hparams(writer, stock.config, n_vocab, ftype)
            for k, (val, vtype, sub) in keys.items():
                if k == "general.name":
                    writer.add_name(f"{val} (a3mod)")
                else:
                    writer.add_key_value(k, val, vtype, sub)
            _tensors(writer, stock, ftype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
    return out

