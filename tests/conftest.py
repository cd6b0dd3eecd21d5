"""Shared helpers: tiny random models of every supported family, an offline tokenizer, a small text file.

Everything here is built from scratch on the CPU: no network, no model files, no ../shared assets.
"""
from __future__ import annotations

import os
import random

import pytest
import torch
import tqdm
import transformers
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()
# Tiny matrices: intra-op threads only add synchronisation (10-100x slower on a loaded 2-core box).
torch.set_num_threads(1)
# No tqdm monitor thread: test_faults forks the test process, and a thread holding a lock at fork time would hang
# the child.
tqdm.tqdm.monitor_interval = 0

settings.register_profile(
    "a3mod", derandomize=True, database=None, deadline=None, max_examples=15, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("a3mod")

VOCAB = 100
FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
ROPE_FAMILIES = ("llama", "mistral", "qwen2")


# ------------------------------------------------------------------------------------------ models
def tiny_config(family: str, *, hidden: int = 32, heads: int = 4, kv_heads: int | None = None,
                head_dim: int | None = None, layers: int = 2, inter: int = 64, init: float = 0.1, **extra):
    """A tiny random config of `family`. `init` (the weight std) is large enough for non-trivial attention."""
    if family == "gpt2":
        assert kv_heads in (None, heads) and head_dim in (None, hidden // heads), "GPT-2 is MHA, d_h = d_m / H"
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads,
                                       n_inner=inter, n_positions=64, initializer_range=init,
                                       bos_token_id=1, eos_token_id=1, pad_token_id=0, **extra)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family]
    kw = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=64,
              initializer_range=init, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    kw.update(extra)
    return cls(**kw)


def model_from_config(config, seed: int = 0, auto=None):
    """Random weights; biases and norm scales (zero / one after HF init) are randomised too, so that every
    bias path (q/k/v biases, value-bias folding, centred statistics) is exercised. `auto`: the Auto class
    (default AutoModelForCausalLM; AutoModel / AutoModelForMaskedLM for encoders)."""
    torch.manual_seed(seed)
    model = (auto or transformers.AutoModelForCausalLM).from_config(config).eval()
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 2 * std)
            elif p.dim() == 1:                      # RMSNorm / LayerNorm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def tiny_model(family: str, seed: int = 0, impl: str | None = None, **kw):
    """A tiny random causal LM of `family` in eval mode (fp32); `impl` sets the attention implementation."""
    model = model_from_config(tiny_config(family, **kw), seed)
    if impl is not None:
        model.set_attn_implementation(impl)
    return model


def calib_ids(n: int = 4, seq_len: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq_len), generator=g)


def input_ids(batch: int = 2, seq_len: int = 12, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq_len), generator=g)


@torch.no_grad()
def logits(model, ids: torch.Tensor, **kw) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False, **kw).logits


def attn_modules(model):
    from a3mod.arch import get_path, spec_for

    spec = spec_for(model)
    return [get_path(layer, spec.attn) for layer in get_path(model, spec.layers)]


def mlp_modules(model):
    from a3mod.arch import get_path, spec_for

    spec = spec_for(model)
    return [get_path(layer, spec.mlp) for layer in get_path(model, spec.layers)]


def assert_close_logits(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """|got - ref| <= rel * (max |ref|): the tolerance scales with the logits."""
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= rel * max(scale, 1e-3), f"max |diff| {err:.3g} > {rel:g} x logit scale {scale:.3g}"


# --------------------------------------------------------------------------------------- tokenizer
WORDS = [f"w{i}" for i in range(60)]


def make_tokenizer():
    """An offline WordLevel tokenizer over WORDS (ids 2..61), wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>",
                                                pad_token="<unk>")


def write_text(path, n_lines: int = 40, seed: int = 0) -> str:
    """A small text file of random WORDS (about 400 tokens); returns its path as a string."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) for _ in range(n_lines)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    return write_text(tmp_path / "corpus.txt")


def assert_sidecar_edits_refused(path, layer: str, key: str, edits) -> None:
    """For each dict in `edits`: update the checkpoint's sidecar entry layers[layer][key] with it, re-seal, and
    expect a3mod.load to raise CheckpointError (the schema / consistency checks, not the checksum)."""
    import json

    import a3mod
    from a3mod.io import sidecar
    from a3mod.errors import CheckpointError

    side = json.loads((path / "a3mod.json").read_text())
    for bad in edits:
        s = json.loads(json.dumps(side))
        s["layers"][layer][key].update(bad)
        s.pop("sha256")
        (path / "a3mod.json").write_text(sidecar.dumps(sidecar.seal(s)))
        with pytest.raises(CheckpointError):
            a3mod.load(path)


def rerecord_files(side: dict, path) -> dict:
    """Record the current size and sha256 of every file `side` lists (as a3mod.save does), so a test can edit a
    checkpoint's files and reach the checks behind the checksums; returns `side`."""
    from a3mod.io.files import sha256_file

    for name in side["files"]:
        f = os.path.join(path, name)
        side["files"][name] = {"bytes": os.path.getsize(f), "sha256": sha256_file(f)}
    return side
