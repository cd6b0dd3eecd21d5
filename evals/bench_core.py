"""Core benchmark: compress every real model in the assets dir with uniform A3 and measure it.

For each model and ratio: WikiText-2 token perplexity (paper protocol: concatenated raw test split,
non-overlapping windows; optionally only the first --eval-windows), decoder-layer linear params,
achieved ratio, KV bytes/token, and wall time of calibration and of solving. Calibration runs once
per model; every ratio reuses its statistics. Writes JSON + markdown (+ a PNG plot) and can refresh
the README table between the `<!-- core-results -->` markers.

    python evals/bench_core.py --ratios 0.1 0.2 0.3 --n-samples 32 --eval-windows 32 --update-readme
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

import a3mod
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, asset_models, eval_desc, machine, pyplot, save_figure, update_readme, write_results  # noqa: E402


def run_model(path: Path, args) -> list[dict]:
    model, tok = a3mod.load_pretrained(str(path))
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    ev = lambda m: a3mod.perplexity(m, ids, seq_len=args.eval_seq_len, max_windows=args.eval_windows)  # noqa: E731
    base = a3mod.report(model, context=args.eval_seq_len)
    rows = [{"model": path.name, "model_type": model.config.model_type, "method": "original", "ratio_target": 0.0,
             "ratio": 0.0, "params": base.params, "kv_bytes_per_token": base.kv_bytes_per_token(),
             "ppl": ev(model)["ppl"], "calib_s": None, "solve_s": None}]
    print(rows[-1], flush=True)
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=0)
    t = time.perf_counter()
    stats = a3mod.collect(model, calib)
    calib_s = time.perf_counter() - t
    for r in args.ratios:
        m = copy.deepcopy(model)
        t = time.perf_counter()
        a3mod.apply(m, a3mod.a3_passes(r), stats=stats)
        solve_s = time.perf_counter() - t
        rep = a3mod.report(m, context=args.eval_seq_len)
        rows.append({"model": path.name, "model_type": model.config.model_type, "method": "A3", "ratio_target": r,
                     "ratio": rep.ratio, "params": rep.params, "kv_bytes_per_token": rep.kv_bytes_per_token(),
                     "ppl": ev(m)["ppl"], "calib_s": calib_s, "solve_s": solve_s})
        print(rows[-1], flush=True)
        del m
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"WikiText-2 token perplexity, {meta['eval']}; calibration {meta['calib']}; "
             f"{meta['machine']}, fp32. Params = decoder-layer linear weights+biases (embeddings/lm_head excluded).", "",
             "| model | method | target | achieved ratio | params | KV bytes/token | ppl | calib s | solve s |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, p=1: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['ratio_target']:.0%} | {100 * r['ratio']:.2f}% | "
                     f"{r['params']:,} | {r['kv_bytes_per_token']:,} | {r['ppl']:.2f} | {f(r['calib_s'])} | "
                     f"{f(r['solve_s'], 2)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in sorted({r["model"] for r in rows}):
        rr = [r for r in rows if r["model"] == name]
        ax.plot([100 * r["ratio"] for r in rr], [r["ppl"] for r in rr], "o-", label=name)
    ax.set_xlabel("decoder-layer linear params removed (%)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("uniform A3")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows (paper: 128)")
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None, help="first N test windows only (default: all)")
    ap.add_argument("--out", default=str(ROOT / "evals" / "results"))
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    rows = []
    for path in asset_models():
        try:
            rows += run_model(path, args)
        except a3mod.UnsupportedModelError as e:
            print(f"skip {path.name}: {e}", file=sys.stderr)
    meta = {"eval": eval_desc(args), "calib": f"{args.n_samples} x {args.calib_seq_len} tokens of WikiText-2 "
            "validation, seed 0", "machine": machine(), "args": vars(args)}
    md = markdown(rows, meta)
    plot(rows, write_results(args.out, "core", meta, rows, md) / "core.png")
    if args.update_readme:
        update_readme(md, "core-results")


if __name__ == "__main__":
    main()
