"""Baselines side by side: original, A3, ASVD, SVD-LLM and plain SVD on the same model, data and seed.

For every real model in the assets dir and every ratio: WikiText-2 token perplexity (paper protocol on
the first --eval-windows test windows), achieved ratio of decoder-layer linear params removed (the same
count for every method), KV bytes/token, compression wall time and prefill tokens/s. Calibration runs
once per model (all statistic kinds in one pass); every method and ratio reuses it. ASVD's sensitivity
probes also run once per model (cached on the statistics) and their time is added to every ASVD row.
Writes compare.json, compare.md and compare.png to --out, and with --update-readme the README table
between the `<!-- compare-results -->` markers.

    python evals/compare.py --ratios 0.1 0.2 0.3 --n-samples 32 --eval-windows 16 --update-readme
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import a3mod
from a3mod.pipeline import recipes
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, asset_models, eval_desc, machine, ppl_vs_ratio_plot, update_readme, write_results  # noqa: E402

METHODS = {recipes.LABELS[m]: (lambda r, a, m=m: recipes.passes(m, r, probe_samples=a.probe_samples,
                                                                  probe_seq_len=a.probe_seq_len))
           for m in ("a3", "asvd", "svd-llm", "svd")}


@torch.no_grad()
def prefill_tps(models: list, seq_len: int, reps: int) -> list[float]:
    """Median tokens/s of a (1, seq_len) forward without cache for each model, measured interleaved
    (a, b, a, b, ...) after one warm-up each, so that machine noise hits every model alike."""
    x = torch.randint(10, 1000, (1, seq_len))
    times: list[list[float]] = [[] for _ in models]
    for m in models:
        m(input_ids=x, use_cache=False)
    for _ in range(reps):
        for i, m in enumerate(models):
            t = time.perf_counter()
            m(input_ids=x, use_cache=False)
            times[i].append(time.perf_counter() - t)
    return [seq_len / statistics.median(t) for t in times]


def run_model(path: Path, args) -> list[dict]:
    model, tok = a3mod.load_pretrained(str(path))
    model.eval()
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    ev = lambda m: a3mod.perplexity(m, ids, seq_len=args.eval_seq_len, max_windows=args.eval_windows)["ppl"]  # noqa: E731

    def row(m, method, target, compress_s):
        rep = a3mod.report(m, context=args.eval_seq_len)
        tps, tps_orig = prefill_tps([m, model], args.prefill_len, args.prefill_reps)
        r = {"model": path.name, "model_type": m.config.model_type, "method": method, "ratio_target": target,
             "ratio": rep.ratio, "params": rep.params, "kv_bytes_per_token": rep.kv_bytes_per_token(),
             "compress_s": compress_s, "prefill_tps": tps, "prefill_speedup": tps / tps_orig, "ppl": ev(m)}
        print(r, flush=True)
        return r

    rows = [row(model, "original", 0.0, None)]
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=args.seed)
    t = time.perf_counter()
    stats = a3mod.collect(model, calib, kinds=("a3", "gram", "absmean"))
    calib_s = time.perf_counter() - t
    print(f"calibration (all statistics, {calib.numel():,} tokens): {calib_s:.1f} s", flush=True)
    for method in args.methods:
        for r in args.ratios:
            m = copy.deepcopy(model)
            cached = set(stats.extra)
            t = time.perf_counter()
            a3mod.apply(m, METHODS[method](r, args), calib=calib, stats=stats)
            solve_s = time.perf_counter() - t
            # every row pays the shared calibration; ASVD rows also pay the (once-per-model) sensitivity probes,
            # which only the first ASVD row's solve time includes
            search_s = sum(float(v) for k, v in stats.extra.items() if k.endswith(":seconds"))
            reused = search_s if method == "ASVD" and cached == set(stats.extra) else 0.0
            rows.append({**row(m, method, r, calib_s + solve_s + reused), "calib_s": calib_s, "solve_s": solve_s,
                         "search_s": search_s if method == "ASVD" else None})
            del m
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"WikiText-2 token perplexity, {meta['eval']}; calibration {meta['calib']}; {meta['probe']}; "
             f"{meta['machine']}, fp32. Ratio = decoder-layer linear params removed (the same count for every method). "
             f"Compress s = shared calibration pass + solve (+ ASVD's sensitivity probes). Prefill: 1 x "
             f"{meta['args']['prefill_len']} tokens, no cache, median of {meta['args']['prefill_reps']} runs "
             f"interleaved with the original (the speedup is that ratio).", "",
             "| model | method | target | achieved ratio | params | KV bytes/token | ppl | dPPL | compress s | prefill tok/s | prefill vs original |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["model"]: r["ppl"] for r in rows if r["method"] == "original"}
    for r in rows:
        cs = "-" if r["compress_s"] is None else f"{r['compress_s']:.0f}"
        d = r["ppl"] - base[r["model"]]
        lines.append(f"| {r['model']} | {r['method']} | {r['ratio_target']:.0%} | {100 * r['ratio']:.2f}% | "
                     f"{r['params']:,} | {r['kv_bytes_per_token']:,} | {r['ppl']:.2f} | {d:+.2f} | {cs} | "
                     f"{r['prefill_tps']:.0f} | {r['prefill_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    ppl_vs_ratio_plot(sorted(rows, key=lambda r: r["model"]), path, METHODS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows (paper: 128)")
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-samples", type=int, default=4, help="ASVD sensitivity probe windows")
    ap.add_argument("--probe-seq-len", type=int, default=512, help="ASVD sensitivity probe length")
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None, help="first N test windows only (default: all)")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--prefill-reps", type=int, default=3)
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
    meta = {"eval": eval_desc(args), "calib": f"{args.n_samples} x {args.calib_seq_len} tokens of WikiText-2 validation, "
                                 f"seed {args.seed}",
            "probe": f"ASVD probes {args.probe_samples} x {args.probe_seq_len} calibration tokens",
            "machine": machine(), "args": vars(args)}
    md = markdown(rows, meta)
    plot(rows, write_results(args.out, "compare", meta, rows, md) / "compare.png")
    if args.update_readme:
        update_readme(md, "compare-results")


if __name__ == "__main__":
    main()
