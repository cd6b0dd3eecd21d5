"""Mixture-of-experts compression on random-weight models with the shapes of real MoE checkpoints (no MoE checkpoint
is available offline here, so the weights are random: time, memory and speed are real, quality is not measured).

    python evals/bench_moe.py [--shapes olmoe qwen2_moe mixtral --layers 2 --ratio 0.2 --n-samples 8 --seq-len 256]
                              [--update-readme]

For each shape: build the model (fp32, `--layers` decoder layers of the real widths), time a prefill of
`--prefill` tokens (median of 3), run uniform A3 (`a3mod.a3_passes(ratio)`: QK, OV, shared-expert MLP, and every
routed expert narrowed), then time the prefill again. Each shape runs in a fresh process; peak memory is its VmHWM
after building the model and after compressing (both include the model itself). Writes evals/results/moe.{json,md} and moe.png (prefill time, params per token).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# the widths of real checkpoints (their config.json), fewer layers
SHAPES = {
    "olmoe": dict(model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_attention_heads=16,
                  num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
                  real="allenai/OLMoE-1B-7B-0924"),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=2048, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632, intermediate_size=5632, num_attention_heads=16,
                      num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, vocab_size=151936,
                      real="Qwen/Qwen1.5-MoE-A2.7B"),
    "mixtral": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
                    real="mistralai/Mixtral-8x7B-v0.1 (1 layer: 1.4B parameters per layer)"),
}


def vm_hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def build(name: str, layers: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in SHAPES[name].items() if k not in ("model_type", "real")}
    cfg = AutoConfig.for_model(SHAPES[name]["model_type"], num_hidden_layers=layers, max_position_embeddings=4096,
                               **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)          # the family's own random init (std 0.02)
    return model.float().eval()


@torch.no_grad()
def prefill_s(model, ids, reps: int = 3) -> float:
    body = model.base_model
    body(input_ids=ids, use_cache=False)                     # warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        body(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(name: str, args) -> dict:
    import a3mod

    model = build(name, args.layers)
    mem_model = vm_hwm_gib()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, vocab, (args.n_samples, args.seq_len), generator=g)
    ids = torch.randint(0, vocab, (1, args.prefill), generator=g)
    rep0 = a3mod.report(model, context=args.prefill)
    t_orig = prefill_s(model, ids)
    t = time.perf_counter()
    a3mod.apply(model, a3mod.a3_passes(args.ratio), calib=calib, progress=False)
    t_compress = time.perf_counter() - t
    mem_peak = vm_hwm_gib()
    rep = a3mod.report(model, context=args.prefill)
    t_new = prefill_s(model, ids)
    moe = [r for r in rep.rows if r.experts]
    return {"shape": name, "real": SHAPES[name]["real"], "layers": args.layers,
            "experts": moe[0].experts if moe else 0, "top_k": moe[0].experts_active if moe else 0,
            "expert_width": f"{moe[0].expert_orig}->{moe[0].expert_dim}" if moe else "",
            "params": rep0.params, "params_after": rep.params, "ratio": rep.ratio,
            "active_params": rep0.to_dict()["active_params"], "active_params_after": rep.to_dict()["active_params"],
            "kv_ratio": rep.kv_bytes_per_token() / rep0.kv_bytes_per_token(True),
            "compress_s": t_compress, "prefill_s": t_orig, "prefill_s_after": t_new, "speedup": t_orig / t_new,
            "mem_model_gib": mem_model, "mem_peak_gib": mem_peak}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Random-weight models of real MoE shapes ({meta['layers']} decoder layers each), uniform A3 at "
             f"{meta['ratio']:.0%}, calibration {meta['n_samples']} x {meta['seq_len']} random tokens, prefill of "
             f"{meta['prefill']} tokens (median of 3), {meta['machine']}. Parameters: decoder-layer linears and "
             "experts.", "",
             "| shape (real checkpoint) | experts (top-k) | expert width | params | params / token | KV | compress s "
             "| peak GiB (model) | prefill s | speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} ({r['real']}) | {r['experts']} (top-{r['top_k']}) | {r['expert_width']} | "
                     f"{r['params'] / 1e6:,.0f}M -> {r['params_after'] / 1e6:,.0f}M ({r['ratio']:.1%} removed) | "
                     f"{r['active_params'] / 1e6:,.0f}M -> {r['active_params_after'] / 1e6:,.0f}M | "
                     f"x{r['kv_ratio']:.2f} | {r['compress_s']:.1f} | {r['mem_peak_gib']:.1f} "
                     f"({r['mem_model_gib']:.1f}) | {r['prefill_s']:.3f} -> {r['prefill_s_after']:.3f} | "
                     f"x{r['speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from common import machine, pyplot, save_figure, update_readme, write_results

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["olmoe", "qwen2_moe"], choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    meta = {k: getattr(args, k) for k in ("layers", "ratio", "n_samples", "seq_len", "prefill")}
    meta["machine"] = machine()
    if args.worker:                      # one shape in this fresh process: its own peak memory
        print("RESULT " + json.dumps(run(args.worker, args)), flush=True)
        return
    rows = []
    for name in args.shapes:
        cmd = [sys.executable, __file__, "--worker", name] + [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                                                              ("layers", "ratio", "n_samples", "seq_len", "prefill")]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(rows[-1], flush=True)
    md = markdown(rows, meta)
    out = write_results(args.out, "moe", meta, rows, md)
    if args.update_readme:
        update_readme(md, "moe-results")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        names = [r["shape"] for r in rows]
        x = range(len(rows))
        ax[0].bar([i - 0.2 for i in x], [r["prefill_s"] for r in rows], 0.4, label="original")
        ax[0].bar([i + 0.2 for i in x], [r["prefill_s_after"] for r in rows], 0.4, label=f"A3 {args.ratio:.0%}")
        ax[0].set_xticks(list(x), names)
        ax[0].set_ylabel(f"prefill of {args.prefill} tokens, s")
        ax[0].legend()
        ax[1].bar([i - 0.2 for i in x], [r["active_params"] / 1e6 for r in rows], 0.4, label="original")
        ax[1].bar([i + 0.2 for i in x], [r["active_params_after"] / 1e6 for r in rows], 0.4, label="A3")
        ax[1].set_xticks(list(x), names)
        ax[1].set_ylabel("decoder parameters per token (M)")
        fig.tight_layout()
        save_figure(fig, out / "moe.png")


if __name__ == "__main__":
    main()
