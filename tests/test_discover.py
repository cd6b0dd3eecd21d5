"""Graph discovery (a3mod.arch.discover): roles read from the exported layer graph.

- agrees with the explicit adapter (arch.ARCHS) of every family that has one, on every role field;
- describes families without an adapter (GPT-J interleaved partial rotary computed in the layer, Phi partial
  rotary with parallel residual), MHA / GQA / MQA, fused layouts, q/k norms, softcap, eager vs sdpa;
- an unknown model type with a recognisable graph (a registered copy of Llama / Phi) is compressed from
  discovery alone: full rank reproduces the logits, 30 % compresses, save/load (meta skeleton) and cached
  generation work;
- a layer it cannot explain raises DiscoveryError naming what was found and what is missing.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys

import family_checks as fc
import pytest
import torch
import transformers
from conftest import VOCAB, model_from_config, tiny_model
from torch import nn

import a3mod
from a3mod import DiscoveryError, UnsupportedModelError
from a3mod.arch import ARCHS, ArchSpec, layer_views, spec_for

discovery = sys.modules["a3mod.arch.discover"]      # the module (a3mod.discover is the function)
_C = dict(vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.1, pad_token_id=0, bos_token_id=1,
          eos_token_id=1)
_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **_C)


def _config(family: str, **kw):
    """Tiny configs of families beyond conftest's (adapters may or may not exist for them)."""
    t = transformers
    build = {
        "qwen3": lambda: t.Qwen3Config(**_LM, num_key_value_heads=2, head_dim=8),
        "olmo2": lambda: t.Olmo2Config(**_LM, num_key_value_heads=2),
        "gemma": lambda: t.GemmaConfig(**_LM, num_key_value_heads=1, head_dim=16),
        "gemma2": lambda: t.Gemma2Config(**_LM, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
                                         attn_logit_softcapping=2.0),
        "starcoder2": lambda: t.Starcoder2Config(**_LM, num_key_value_heads=2, use_bias=True),
        "phi3": lambda: t.Phi3Config(**_LM, num_key_value_heads=2),
        "gpt_neox": lambda: t.GPTNeoXConfig(**_LM, rotary_pct=0.5),
        "opt": lambda: t.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=1),
        "bert": lambda: t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, pad_token_id=0),
        "roberta": lambda: t.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, pad_token_id=0),
        "phi": lambda: t.PhiConfig(**_LM, partial_rotary_factor=0.5),
        "mpt": lambda: t.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                   expansion_ratio=2),
        "gptj": lambda: t.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64),
    }
    cfg = build[family]()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def make_model(family: str, **kw):
    if family in ("llama", "mistral", "qwen2", "gpt2"):
        return tiny_model(family, kv_heads=None if family == "gpt2" else 2, **kw)
    cfg = _config(family)
    if family in ("bert", "roberta"):
        torch.manual_seed(0)
        return transformers.AutoModelForMaskedLM.from_config(cfg).eval()
    return model_from_config(cfg)


ADAPTED = ("llama", "mistral", "qwen2", "gpt2", "qwen3", "olmo2", "gemma", "gemma2", "starcoder2", "phi3",
           "gpt_neox", "opt", "bert", "roberta", "mpt")
_ROLE_FIELDS = ("layers", "attn", "mlp", "q", "k", "v", "qkv", "qkv_layout", "o", "o_from_layer", "gate", "gate_up",
                "down", "act", "rope", "conv1d", "qk_norm", "softcap")


def _role_fields(spec: ArchSpec) -> dict:
    have = {f.name for f in dataclasses.fields(ArchSpec)}
    out = {f: getattr(spec, f) for f in _ROLE_FIELDS if f in have}
    if not getattr(spec, "gate_up", None):
        out["up"] = spec.up
    if spec.rope:
        out["rotary"] = spec.rotary
    if getattr(spec, "qk_norm", None):
        out["qk_norm_names"] = spec.qk_norm_names
    return out


# ----------------------------------------------------------------------------- agreement with adapters
@pytest.mark.parametrize("family", [f for f in ADAPTED if f in ARCHS])
def test_discovery_agrees_with_adapter(family):
    model = make_model(family)
    result = a3mod.discover(model)
    assert _role_fields(result.to_spec()) == _role_fields(ARCHS[model.config.model_type])
    d, dims = result.layers[0], layer_views(model)[0].dims      # the adapter's geometry, from the config
    assert (d.hidden, d.heads, d.kv_heads, d.head_dim, d.rot_dim) == \
        (dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.rot_dim)
    assert [x.index for x in result.layers] == list(range(model.config.num_hidden_layers))
    assert result.exported == 1 and result.layers[1].same_as == 0


# adapters discovery cannot reproduce, and why (their layers are checked by the self-check and their own tests)
NOT_DISCOVERED = {"bloom": "scores come from alibi.baddbmm(q, k), which discovery does not read as attention",
                  "falcon": "its qkv split indexes with lists and broadcast_to, which the channel replay does not follow",
                  "gpt_oss": "its attention sinks join the softmax as a concatenated column, which discovery does not "
                             "read as attention (tests/test_moe.py checks the adapter)",
                  "deepseek_v2": "latent attention is described by structure, not by the graph (tests/test_mla.py)",
                  "deepseek_v3": "latent attention is described by structure, not by the graph (tests/test_mla.py)",
                  "llama4_text": "its RoPE multiplies complex numbers (view_as_complex), which the channel replay does "
                                 "not follow (tests/test_llama4.py checks the adapter)",
                  "gemma4_text": "its attention is kept whole by design; per-layer head dims (tests/test_families_2026.py)",
                  "gemma4_unified_text": "as gemma4_text (tests/test_families_2026.py)",
                  "hy_v4": "its gated latent attention is kept whole by design (tests/test_families_2026.py)",
                  "axk2": "its gated latent attention is kept whole by design (tests/test_families_2026.py)",
                  "deepseek_v4": "its compressed sparse attention is kept whole by design; the indexer's top-k and "
                                 "the compressor's entries are not one graph of attention (tests/test_families_2026.py)",
                  "nemotron_h": "one mixer per layer at one path (attention, MLP or Mamba-2): no single layer shows "
                                "both roles (tests/test_hybrid.py checks the adapter)",
                  "zamba2": "the shared block's q/k/v each sum a projection and a per-use adapter, and its MLP's "
                            "gate/up output adds one: no single projection per role (tests/test_zamba2.py checks the "
                            "adapter)"}


def test_every_adapted_family_is_checked():
    missing = set(ARCHS) - set(ADAPTED) - set(NOT_DISCOVERED)
    assert not missing, f"adapters without a discovery test: {missing}"


# ------------------------------------------------------------------------------------ descriptions
@pytest.mark.parametrize("family,kw,kind,kv", [
    ("llama", dict(kv_heads=4), "MHA", 4), ("llama", dict(kv_heads=2), "GQA", 2), ("llama", dict(kv_heads=1), "MQA", 1),
    ("mistral", dict(kv_heads=2, head_dim=16), "GQA", 2)])
def test_attention_kind_and_head_geometry(family, kw, kind, kv):
    model = tiny_model(family, **kw)
    d = a3mod.discover(model).layers[0]
    assert (d.attention_kind, d.kv_heads, d.heads) == (kind, kv, 4)
    assert d.head_dim == kw.get("head_dim", 8) and d.rot_dim == d.head_dim and d.rope == "rotate_half"
    assert len(d.q.channels) == 4 * d.head_dim and len(d.k.channels) == kv * d.head_dim


@pytest.mark.parametrize("kv", [4, 2])
def test_eager_graph_reads_like_sdpa(kv):
    """matmul -> softmax -> matmul with repeat_kv (eager) gives the same roles as sdpa with enable_gqa."""
    model = tiny_model("llama", kv_heads=kv, impl="eager")
    eager = a3mod.discover(model, attn_implementation=None).layers[0]
    sdpa = a3mod.discover(model).layers[0]
    assert (eager.attention_op, sdpa.attention_op) == ("eager", "sdpa")
    assert model.config._attn_implementation == "eager"          # restored
    same = lambda d: dataclasses.replace(d, attention_op="", causal=None, found=())
    assert same(eager) == same(sdpa)
    assert eager.scale == pytest.approx(8 ** -0.5)


def test_partial_rotary_detected():
    """Phi rotates the first half of each head (rotate_half within it); GPT-NeoX too, with a per-head qkv;
    GPT-J rotates pairs (2j, 2j+1) of the first rotary_dim dims, from a (sin, cos) table of rot/2 frequencies."""
    phi = a3mod.discover(make_model("phi")).layers[0]
    assert (phi.rope, phi.rot_dim, phi.head_dim, phi.rope_source) == ("rotate_half", 4, 8, "position_embeddings")
    assert phi.parallel_residual and phi.biases == ("q", "k", "v", "o", "up", "down")
    assert (phi.o.module, phi.up.module, phi.down.module, phi.gate) == ("self_attn.dense", "mlp.fc1", "mlp.fc2", None)
    neox = a3mod.discover(make_model("gpt_neox")).layers[0]
    assert (neox.rope, neox.rot_dim, neox.qkv_layout, neox.parallel_residual) == ("rotate_half", 4, "per_head", True)
    assert neox.q.channels[:10] == (0, 1, 2, 3, 4, 5, 6, 7, 24, 25)         # (H, 3, d_h): head 1 starts at 24
    assert neox.k.channels[:2] == (8, 9) and neox.v.channels[:2] == (16, 17)
    model = make_model("gptj")
    gptj = a3mod.discover(model)
    d = gptj.layers[0]
    assert (d.rope, d.rot_dim) == ("interleaved", 4)
    attn_cls = type(model.transformer.h[0].attn)
    if "position_embeddings" in inspect.signature(attn_cls.forward).parameters:
        # transformers >= 5.24: (sin, cos) halves come from the model; interleaved partial RoPE is compressed exactly
        assert d.rope_source == "position_embeddings" and gptj.rope_table == "sin_cos", attn_cls
        ids = torch.randint(0, 64, (1, 10))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        a3mod.apply(model, a3mod.a3_passes(0.0), calib=torch.randint(0, 64, (2, 16)), progress=False)
        with torch.no_grad():
            assert torch.allclose(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
    else:       # earlier: GPT-J computes cos/sin inside the layer
        assert (d.rope_source, d.attention_op) == ("inside the layer", "eager")
        with pytest.raises(DiscoveryError, match="computed inside the layer"):
            gptj.to_spec()


def test_fused_projections():
    gpt2 = a3mod.discover(make_model("gpt2")).layers[0]
    assert gpt2.qkv_layout == "blocks" and gpt2.q.conv1d and gpt2.q.module == "attn.c_attn"
    assert gpt2.k.channels == tuple(range(32, 64)) and gpt2.v.channels == tuple(range(64, 96))
    phi3 = a3mod.discover(make_model("phi3")).layers[0]
    assert (phi3.qkv_layout, phi3.attention_kind, phi3.gate_up_layout) == ("blocks", "GQA", "[gate|up]")
    assert phi3.k.channels == tuple(range(32, 48)) and phi3.v.channels == tuple(range(48, 64))
    assert phi3.gate.channels == tuple(range(64)) and phi3.up.channels == tuple(range(64, 128))
    assert phi3.act == "SiLUActivation" and phi3.act_config == "hidden_act"


def test_qk_norm_softcap_and_scale():
    qwen3, olmo2 = (a3mod.discover(make_model(f)).layers[0] for f in ("qwen3", "olmo2"))
    assert (qwen3.q_norm, qwen3.k_norm, qwen3.qk_norm_scope) == ("self_attn.q_norm", "self_attn.k_norm", "head")
    assert olmo2.qk_norm_scope == "all" and olmo2.input_norm is None
    assert (olmo2.attn_out_norm, olmo2.mlp_out_norm) == ("post_attention_layernorm", "post_feedforward_layernorm")
    g2 = a3mod.discover(make_model("gemma2")).layers[0]         # HF Gemma-2 refuses sdpa: eager graph
    assert g2.attention_op == "eager" and g2.softcap == 2.0 and g2.scale == pytest.approx(12 ** -0.5)
    assert g2.softcap_attr == "attn_logit_softcapping" and g2.mlp_norm == "pre_feedforward_layernorm"
    opt = a3mod.discover(make_model("opt")).layers[0]           # q scaled before sdpa(scale=1)
    assert opt.scale == pytest.approx(8 ** -0.5) and opt.o.module == "self_attn.out_proj"
    assert (opt.up.module, opt.down.module, opt.act) == ("fc1", "fc2", "ReLU")


def test_summary_reads_like_an_architecture_card(capsys):
    result = a3mod.discover(make_model("gpt_neox"))
    print(result)
    text = capsys.readouterr().out
    assert text.strip() == result.summary()
    for fact in ("gpt_neox", "2 x GPTNeoXLayer", "gpt_neox.layers", "MHA (4 heads, 4 kv heads, head_dim 8)",
                 "attention.query_key_value (per_head", "RoPE rotate_half, 4/8 dims (partial rotary)",
                 "attention.dense +bias", "GELUActivation", "parallel", "biases     q, k, v, o, up, down",
                 "rotary module gpt_neox.rotary_emb"):
        assert fact in text, fact
    llama = a3mod.discover(tiny_model("llama", kv_heads=2)).summary()
    for fact in ("GQA (4 heads, 2 kv heads", "SiLUActivation(mlp.gate_proj) * mlp.up_proj -> mlp.down_proj",
                 "pre-attn input_layernorm", "sequential", "biases     none", "layers 0-1:"):
        assert fact in llama, fact
    how = a3mod.discover(tiny_model("llama", kv_heads=2)).summary(evidence=True)
    for fact in ("attention op: aten.scaled_dot_product_attention", "query <- self_attn.q_proj via view, transpose",
                 "neg, cat", "down = mlp.down_proj", "activation SiLUActivation (silu)"):
        assert fact in how, fact


def test_all_layers_exports_each_layer():
    model = tiny_model("qwen2", kv_heads=2)
    one, every = a3mod.discover(model), a3mod.discover(model, all_layers=True)
    assert (one.exported, every.exported) == (1, 2)
    assert every.layers[1].same_as is None and every.layers[1].index == 1
    assert dataclasses.replace(one.layers[1], same_as=None) == every.layers[1]
    assert one.layers[0].biases == ("q", "k", "v")


# ------------------------------------------------------------------------- unknown model types
class MyLlamaConfig(transformers.LlamaConfig):
    model_type = "mycustomllama"


class MyLlamaForCausalLM(transformers.LlamaForCausalLM):
    config_class = MyLlamaConfig


class MyPhiConfig(transformers.PhiConfig):
    model_type = "mycustomphi"


class MyPhiForCausalLM(transformers.PhiForCausalLM):
    config_class = MyPhiConfig


for _cfg, _cls in ((MyLlamaConfig, MyLlamaForCausalLM), (MyPhiConfig, MyPhiForCausalLM)):
    transformers.AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    transformers.AutoModelForCausalLM.register(_cfg, _cls, exist_ok=True)


def _custom(kind: str, **kw):
    if kind == "llama":
        return MyLlamaConfig(**{**_LM, "num_key_value_heads": 2, **kw})
    return MyPhiConfig(**{**_LM, "partial_rotary_factor": 0.5, "resid_pdrop": 0.0, **kw})


@pytest.mark.parametrize("kind", ["llama", "phi"])
def test_unknown_model_type_compressed_from_discovery(kind, tmp_path):
    """GQA Llama and partial-rotary, parallel-residual Phi under model types no adapter knows."""
    cfg = _custom(kind)
    make = lambda: model_from_config(cfg)
    assert cfg.model_type not in ARCHS
    spec = spec_for(make())
    assert spec.layers == "model.layers" and spec.rotary == "model.rotary_emb"
    assert (spec.q, spec.gate) == (("q_proj", "gate_proj") if kind == "llama" else ("q_proj", None))
    fc.full_rank_reproduces_outputs(make)
    rep = fc.compresses_at(make, 0.3)
    assert rep.params < rep.params_orig
    fc.cached_generate_matches_uncached(make, impls=("sdpa",))
    discovery.clear_spec_cache()                   # the reload discovers again, on its meta-device skeleton
    fc.save_load_round_trip(make, tmp_path)


def test_discovered_spec_on_meta_skeleton_matches():
    cfg = _custom("llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    real = discovery.discovered_spec(model_from_config(cfg))
    discovery.clear_spec_cache()
    with torch.device("meta"):
        skeleton = MyLlamaForCausalLM(cfg)
    assert discovery.discovered_spec(skeleton) == real


def test_compressed_unknown_model_rediscovers_its_original():
    """With the cache empty (a fresh process), a compressed model is described by a probe of its original."""
    model = model_from_config(_custom("phi", hidden_size=48, num_attention_heads=6))
    before = discovery.discovered_spec(model)
    a3mod.apply(model, a3mod.a3_passes(0.3), calib=torch.randint(0, VOCAB, (2, 16)), progress=False)
    discovery.clear_spec_cache()
    assert spec_for(model) == before
    assert 0.2 < a3mod.report(model).ratio < 0.4
    d = a3mod.discover(model)               # the compact modules export (issue 17): the reduced graph is read
    assert d.layers[0].intermediate == model.model.layers[0].mlp.inter < model.config.intermediate_size


def test_config_disagreeing_with_graph_is_refused():
    """Llama ignores partial_rotary_factor (it rotates whole heads) while the config-based dims read half:
    discovery refuses rather than let the rest of a3mod use the wrong rotary dims."""
    model = model_from_config(_custom("llama", partial_rotary_factor=0.5, hidden_size=40, num_attention_heads=5,
                                      num_key_value_heads=5))
    assert a3mod.discover(model).layers[0].rot_dim == 8
    with pytest.raises(DiscoveryError, match=r"the graph shows \(40, 5, 5, 8, 8\)"):
        spec_for(model)


# ---------------------------------------------------------------------------------- unexplainable
def test_attention_without_query_projection_raises():
    model = model_from_config(_custom("llama", hidden_size=24, num_attention_heads=3, num_key_value_heads=3))
    for layer in model.model.layers:
        layer.self_attn.q_proj = nn.Identity()              # q is the normed hidden state itself
    with pytest.raises(DiscoveryError, match="no projection feeds the attention query") as e:
        a3mod.discover(model)
    assert "hidden_states" in str(e.value) and "layer 0" in str(e.value)
    with pytest.raises(UnsupportedModelError) as e:
        a3mod.apply(model, a3mod.a3_passes(0.2), calib=torch.randint(0, VOCAB, (2, 8)), progress=False)
    msg = str(e.value)
    assert isinstance(e.value, DiscoveryError)
    assert "'mycustomllama' has no a3mod architecture adapter" in msg and "llama" in msg and "query" in msg


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _NoAttention(nn.Module):
    """Repeated blocks with linears but no attention at all."""

    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig(vocab_size=VOCAB)
        self.embed, self.blocks = nn.Embedding(VOCAB, 8), nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids, **_):
        x = self.embed(input_ids)
        for b in self.blocks:
            x = b(x)
        return x


def test_layer_without_attention_raises():
    with pytest.raises(DiscoveryError, match="no attention op found.*ops seen: .*linear.*relu"):
        a3mod.discover(_NoAttention())
    with pytest.raises(DiscoveryError, match="no ModuleList of repeated blocks"):
        a3mod.discover(nn.Sequential(nn.Linear(4, 4)))


def test_sum_of_projections_is_ambiguous():
    class TwoQ(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.a, self.b = attn.q_proj, nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = model_from_config(_custom("llama", hidden_size=16, num_attention_heads=2, num_key_value_heads=2))
    for layer in model.model.layers:
        layer.self_attn.q_proj = TwoQ(layer.self_attn)
    with pytest.raises(DiscoveryError, match=r"query is fed by several projections \(self_attn.q_proj.a, "
                                             r"self_attn.q_proj.b\)"):
        a3mod.discover(model)
