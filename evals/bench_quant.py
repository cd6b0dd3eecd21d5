"""A3 and weight quantization, alone and stacked: WikiText-2 perplexity vs model bytes on the asset models.

Rows: original; HQQ 4/3/2-bit alone (group 64); uniform A3 at each --ratios; A3 at --stack-ratio followed by
HQQ 4-bit and by bitsandbytes nf4. Model bytes are the exact bytes of every tensor (report.model_bytes),
bits/param those of the decoder-layer linear weights including quantization scales. Writes quant.json,
quant.md, quant.png and, with --update-readme, the README table between `<!-- quant-results -->` markers.

    python evals/bench_quant.py --ratios 0.1 0.2 0.3 --n-samples 32 --eval-windows 16 --update-readme
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path


import a3mod
from a3mod.pipeline import recipes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, asset_models, cached_stats, eval_desc, machine, pyplot, save_figure, update_readme, write_results  # noqa: E402


def run_model(path: Path, args) -> list[dict]:
    model, tok = a3mod.load_pretrained(str(path))
    model.eval()
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=0)
    stats = cached_stats(model, calib, ("a3",), args.stats_cache, path.name)
    rows = []

    def run(method, passes):
        if args.only and not re.search(args.only, method):
            return
        m = copy.deepcopy(model)
        t = time.perf_counter()
        try:
            if passes:
                a3mod.apply(m, passes, stats=stats)
        except a3mod.A3ModError as e:
            print(f"skip {method}: {e}", file=sys.stderr)
            return
        rep = a3mod.report(m, context=args.eval_seq_len)
        rows.append({"model": path.name, "method": method, "ratio": rep.ratio, "params": rep.params,
                     "model_bytes": rep.model_bytes, "bits_per_param": rep.bits_per_param,
                     "kv_bytes_per_token": rep.kv_bytes_per_token(), "apply_s": time.perf_counter() - t,
                     "ppl": a3mod.perplexity(m, ids, seq_len=args.eval_seq_len, max_windows=args.eval_windows)["ppl"]})
        print(rows[-1], flush=True)

    run("original", None)
    for nb in (4, 3, 2):
        run(f"HQQ {nb}-bit g{args.group_size}", [a3mod.HQQ(nbits=nb, group_size=args.group_size)])
    for r in args.ratios:
        run(f"A3 {r:.0%}", recipes.passes("a3", r))
    s = args.stack_ratio
    run(f"A3 {s:.0%} + HQQ 4-bit g{args.group_size}", [*recipes.passes("a3", s), a3mod.HQQ(nbits=4, group_size=args.group_size)])
    run(f"A3 {s:.0%} + bnb nf4", [*recipes.passes("a3", s), a3mod.Bnb4bit(quant_type="nf4")])
    run("bnb nf4", [a3mod.Bnb4bit(quant_type="nf4")])
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"WikiText-2 token perplexity, {meta['eval']}; calibration {meta['calib']}; {meta['machine']}. "
             "Model bytes: every tensor (embeddings and lm_head stay fp32); bits/param: decoder-layer linear weights "
             "incl. scales/zeros.", "",
             "| model | method | param ratio | model bytes | bits/param | KV bytes/token | ppl |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {100 * r['ratio']:.2f}% | {r['model_bytes']:,} | "
                     f"{r['bits_per_param']:.2f} | {r['kv_bytes_per_token']:,} | {r['ppl']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        kind = "o" if r["method"].startswith("A3") and "+" not in r["method"] else ("s" if "HQQ" in r["method"] and "+" not in r["method"] else "^")
        ax.plot(r["model_bytes"] / 2**20, r["ppl"], kind, label=r["method"])
    ax.set_xlabel("model bytes (MiB)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def merge(path: Path, new: list[dict], meta: dict) -> list[dict]:
    """The rows of an earlier full run at `path` with the re-run methods replaced (new methods appended)."""
    old = json.loads(path.read_text())
    if (old["meta"]["eval"], old["meta"]["calib"]) != (meta["eval"], meta["calib"]):
        sys.exit(f"{path} was made with {old['meta']['eval']!r} / {old['meta']['calib']!r}, not "
                 f"{meta['eval']!r} / {meta['calib']!r}: run without --only")
    fresh = {(r["model"], r["method"]): r for r in new}
    rows = [fresh.pop((r["model"], r["method"]), r) for r in old["rows"]]
    meta["merged"] = f"rows {sorted(m for _, m in {(r['model'], r['method']) for r in new})} re-run on {machine()}"
    return rows + list(fresh.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--stack-ratio", type=float, default=0.2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "evals" / "results"))
    ap.add_argument("--stats-cache", default=None, help="folder to keep / reuse the calibration statistics in")
    ap.add_argument("--only", default=None, metavar="REGEX",
                    help="re-run only the methods matching REGEX and merge them into the existing <out>/quant.json "
                         "(which must come from the same evaluation and calibration settings)")
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
    if args.only:
        rows = merge(Path(args.out) / "quant.json", rows, meta)
    md = markdown(rows, meta)
    plot(rows, write_results(args.out, "quant", meta, rows, md) / "quant.png")
    if args.update_readme:
        update_readme(md, "quant-results")


if __name__ == "__main__":
    main()
