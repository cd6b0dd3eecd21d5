"""Mixed ranks and KV budgets on the real asset models.

Part 1: uniform A3 vs A3-mix (`Allocate`, across layers and across layers + components) at each --ratios,
at the same parameter count (across="layers" matches uniform's count exactly).
Part 2: KV-cache budgets: A3KV (uniform and mixed) vs ASVD's KV mode at each --kv-ratios, and KV-cache
quantization (--kv-quant, a3mod.quantized_cache) stacked on the original and on A3KV. KV bytes/token from the
report and measured in the cache (after a 1 x 64 forward; quantized caches after one whole window fed in
--kv-chunk chunks, scored the same way, so the codes, scales and unquantized residual are all counted).
WikiText-2 token perplexity as in bench_core. Writes mix.json / mix.md and, with --update-readme, the
README table between `<!-- mix-results -->` markers.

    python evals/bench_mix.py --ratios 0.2 0.3 --kv-ratios 0.25 0.5 --n-samples 32 --eval-windows 16 --update-readme
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
from a3mod.pipeline import recipes
from a3mod.hf_compat import cache_kwargs, output_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, asset_models, cached_stats, eval_desc, machine, pyplot, save_figure, update_readme, write_results  # noqa: E402


@torch.no_grad()
def cached_bytes(model, make_cache, window: torch.Tensor, chunk: int) -> float:
    """Bytes per token the KV cache really holds: after a 1 x 64 forward (plain cache), or after one whole
    evaluation window fed `chunk` tokens at a time (quantized cache: codes, scales, unquantized residual)."""
    if make_cache is None:
        out = model(input_ids=window[None, :64], use_cache=True)
        return a3mod.cache_bytes(output_cache(out)) / 64
    cache = make_cache()
    for s in range(0, window.numel(), chunk):
        model(input_ids=window[None, s:s + chunk], use_cache=True, **cache_kwargs(model, cache))
    return a3mod.cache_bytes(cache) / window.numel()


def run_model(path: Path, args) -> list[dict]:
    model, tok = a3mod.load_pretrained(str(path))
    model.eval()
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=0)
    stats = cached_stats(model, calib, ("a3",) if args.skip_asvd else ("a3", "absmean"), args.stats_cache, path.name)
    rows = []

    def run(part, method, target, passes, kvq=None):
        m = copy.deepcopy(model) if passes else model
        t = time.perf_counter()
        if passes:
            a3mod.apply(m, passes, calib=calib, stats=stats)
        solve_s = time.perf_counter() - t
        rep = a3mod.report(m, context=args.eval_seq_len)
        cache = None if kvq is None else (lambda: a3mod.quantized_cache(m, kvq[0], kvq[1], residual_length=args.kv_residual))
        ppl = a3mod.perplexity(m, ids, seq_len=args.eval_seq_len, max_windows=args.eval_windows, cache=cache,
                               chunk=args.kv_chunk)["ppl"]
        rows.append({"model": path.name, "part": part, "method": method, "target": target, "ratio": rep.ratio,
                     "params": rep.params, "kv_bytes_per_token": rep.kv_bytes_per_token(),
                     "kv_bytes_measured": cached_bytes(m, cache, ids[:args.eval_seq_len], args.kv_chunk),
                     "solve_s": solve_s, "ppl": ppl})
        print(rows[-1], flush=True)

    run("params", "original", 0.0, None)
    for r in ([] if args.skip_mix else args.ratios):
        run("params", "A3 uniform", r, recipes.passes("a3", r))
        run("params", "A3-mix (layers)", r, recipes.passes("a3-mix", r))
        run("params", "A3-mix (layers+components)", r, recipes.passes("a3-mix", r, across="all"))
    for kv in args.kv_ratios:
        run("kv", "A3KV uniform", kv, recipes.passes("a3", kv_ratio=kv))
        run("kv", "A3KV mixed", kv, recipes.passes("a3-mix", kv_ratio=kv))
        if not args.skip_asvd:
            run("kv", "ASVD KV mode", kv, recipes.passes("asvd", kv_ratio=kv, probe_samples=args.probe_samples,
                                                         probe_seq_len=args.probe_seq_len))
    for spec in args.kv_quant:
        backend, _, bits = spec.partition(":")
        kvq = (backend, int(bits or 8))
        run("kv", f"original + {spec} KV cache", 0.0, None, kvq)
        for kv in args.kv_ratios:
            run("kv", f"A3KV + {spec} KV cache", kv, recipes.passes("a3", kv_ratio=kv), kvq)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"WikiText-2 token perplexity, {meta['eval']}; calibration {meta['calib']}; {meta['machine']}, fp32. "
             "KV bytes/token: report / measured in the cache.", "",
             "| model | budget | method | target | achieved param ratio | params | KV bytes/token | ppl |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kv = f"{r['kv_bytes_per_token']:,} / {r['kv_bytes_measured']:,.0f}"
        lines.append(f"| {r['model']} | {r['part']} | {r['method']} | {r['target']:.0%} | {100 * r['ratio']:.2f}% | "
                     f"{r['params']:,} | {kv} | {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Left: perplexity vs params removed (uniform vs mix). Right: perplexity vs measured KV bytes/token."""
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part, x, xlabel in ((a, "params", "ratio", "decoder-layer params removed"),
                                (b, "kv", "kv_bytes_measured", "KV-cache bytes / token (measured)")):
        pts = [r for r in rows if r["part"] == part or r["method"] == "original"]
        for method in dict.fromkeys(r["method"] for r in pts):
            rs = sorted((r for r in pts if r["method"] == method), key=lambda r: r[x])
            ax.plot([r[x] for r in rs], [r["ppl"] for r in rs], "o-", label=method)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("WikiText-2 perplexity (log)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--kv-ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--probe-samples", type=int, default=1)
    ap.add_argument("--probe-seq-len", type=int, default=256)
    ap.add_argument("--kv-quant", nargs="*", default=["hqq:4", "hqq:2"],
                    help="KV-cache quantizations stacked on the original and on A3KV: backend[:bits] (hqq:4, fp8)")
    ap.add_argument("--kv-residual", type=int, default=128, help="tokens kept unquantized in the KV cache")
    ap.add_argument("--kv-chunk", type=int, default=128, help="tokens per forward when scoring through a cache")
    ap.add_argument("--stats-cache", default=None, help="folder to keep / reuse the calibration statistics in")
    ap.add_argument("--skip-asvd", action="store_true", help="leave out ASVD's KV mode (its probes are slow)")
    ap.add_argument("--skip-mix", action="store_true", help="leave out the A3-mix vs uniform part")
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "evals" / "results"))
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for path in asset_models():
        try:
            rows += run_model(path, args)
        except a3mod.UnsupportedModelError as e:
            print(f"skip {path.name}: {e}", file=sys.stderr)
    meta = {"eval": eval_desc(args), "calib": f"{args.n_samples} x {args.calib_seq_len} WikiText-2 validation "
            "tokens, seed 0", "machine": machine(), "args": vars(args)}
    md = markdown(rows, meta)
    plot(rows, write_results(args.out, "mix", meta, rows, md) / "mix.png")
    if args.update_readme:
        update_readme(md, "mix-results")


if __name__ == "__main__":
    main()
