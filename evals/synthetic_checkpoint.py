"""Write a random-weight checkpoint of a real model's shapes to disk, one decoder layer per safetensors shard, never
holding more than one layer: for measuring what streaming compression of a model this machine cannot load peaks at.

    python evals/synthetic_checkpoint.py --shape llama-3-8b --out /tmp/llama8b-shaped     # ~16 GB of bf16
    python evals/bench_stream.py --model /tmp/llama8b-shaped --modes stream --n-samples 4

Weights are N(0, 0.02) (norms 1), so the numbers say nothing about quality; the tokenizer is the asset model's
(its ids are valid in the larger vocabulary), copied beside the weights so the calibration text can be tokenized.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHAPES = {   # the published configs' shapes (Llama-3-8B, Qwen2.5-7B)
    "llama-3-8b": dict(cls=LlamaConfig, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def random_like(name: str, t: torch.Tensor, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    if "norm" in name:
        return torch.ones(t.shape, dtype=dtype)
    return (torch.randn(t.shape, generator=g) * 0.02).to(dtype)


def write(shape: str, out: Path, dtype: torch.dtype = torch.bfloat16, layers: int | None = None) -> Path:
    kw = dict(SHAPES[shape])
    cls = kw.pop("cls")
    if layers is not None:
        kw["num_hidden_layers"] = layers
    config = cls(**kw, dtype=dtype)
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(config)
    sd = skel.state_dict()
    n = config.num_hidden_layers
    groups = [[k for k in sd if k.startswith(f"model.layers.{i}.")] for i in range(n)]
    groups.append([k for k in sd if not k.startswith("model.layers.")])
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    index = {}
    for j, keys in enumerate(groups):
        fname = f"model-{j + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: random_like(k, sd[k], g, dtype) for k in keys}, str(out / fname), metadata={"format": "pt"})
        index.update({k: fname for k in keys})
        print(f"wrote {fname}", file=sys.stderr, flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}, indent=1))
    config.save_pretrained(out)
    from common import asset_models

    asset = asset_models()[0]
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (asset / f).exists():
            shutil.copy(asset / f, out / f)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real model")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = ap.parse_args()
    write(args.shape, Path(args.out), getattr(torch, args.dtype), args.layers)


if __name__ == "__main__":
    main()
