"""Mixed ranks and KV budgets on the real asset models.

Part 1: uniform A3 vs A3-mix (`Allocate`, across layers and across layers + components) at each --ratios,
at the same parameter count (across="layers" matches uniform's count exactly).
Part 2: KV-cache budgets: A3KV (uniform and mixed) vs ASVD's KV mode at each --kv-ratios; KV bytes/token
from the report and measured from the cache of a 1 x 64-token forward.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, asset_models, eval_desc, machine, update_readme, write_results  # noqa: E402


@torch.no_grad()
def cached_bytes(model) -> int:
    """Bytes per token the KV cache really holds after a 1 x 64 forward."""
    out = model(input_ids=torch.randint(10, 1000, (1, 64)), use_cache=True)
    return sum(l.keys[0, :, 0].numel() * l.keys.element_size() + l.values[0, :, 0].numel() * l.values.element_size()
               for l in out.past_key_values.layers)


def run_model(path: Path, args) -> list[dict]:
    model, tok = a3mod.load_pretrained(str(path))
    model.eval()
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=0)
    stats = a3mod.collect(model, calib, kinds=("a3", "absmean"))
    rows = []

    def run(part, method, target, passes):
        m = copy.deepcopy(model) if passes else model
        t = time.perf_counter()
        if passes:
            a3mod.apply(m, passes, calib=calib, stats=stats)
        rep = a3mod.report(m, context=args.eval_seq_len)
        rows.append({"model": path.name, "part": part, "method": method, "target": target, "ratio": rep.ratio,
                     "params": rep.params, "kv_bytes_per_token": rep.kv_bytes_per_token(),
                     "kv_bytes_measured": cached_bytes(m), "solve_s": time.perf_counter() - t,
                     "ppl": a3mod.perplexity(m, ids, seq_len=args.eval_seq_len, max_windows=args.eval_windows)["ppl"]})
        print(rows[-1], flush=True)

    run("params", "original", 0.0, None)
    for r in args.ratios:
        run("params", "A3 uniform", r, a3mod.a3_passes(r))
        run("params", "A3-mix (layers)", r, [a3mod.Allocate(budget=r)])
        run("params", "A3-mix (layers+components)", r, [a3mod.Allocate(budget=r, across="all")])
    for kv in args.kv_ratios:
        run("kv", "A3KV uniform", kv, [a3mod.A3KV(kv_ratio=kv)])
        run("kv", "A3KV mixed", kv, [a3mod.A3KV(kv_ratio=kv, mixed=True)])
        run("kv", "ASVD KV mode", kv, [a3mod.ASVD(kv_ratio=kv, probe_samples=args.probe_samples,
                                                  probe_seq_len=args.probe_seq_len)])
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"WikiText-2 token perplexity, {meta['eval']}; calibration {meta['calib']}; {meta['machine']}, fp32. "
             "KV bytes/token: report / measured in the cache.", "",
             "| model | budget | method | target | achieved param ratio | params | KV bytes/token | ppl |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kv = f"{r['kv_bytes_per_token']:,} / {r['kv_bytes_measured']:,}"
        lines.append(f"| {r['model']} | {r['part']} | {r['method']} | {r['target']:.0%} | {100 * r['ratio']:.2f}% | "
                     f"{r['params']:,} | {kv} | {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--kv-ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--probe-samples", type=int, default=1)
    ap.add_argument("--probe-seq-len", type=int, default=256)
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
    write_results(args.out, "mix", meta, rows, md)
    if args.update_readme:
        update_readme(md, "mix-results")


if __name__ == "__main__":
    main()
