"""lm-eval on the real asset models: original vs A3 at --ratio, through a3mod's local lm-eval tasks.

For each model in the assets dir: lm-eval's scores on --tasks (default wikitext_local: lm-eval's word and
byte perplexity of whole WikiText-2 test pages, NOT the paper-style token perplexity of bench_core.py),
for the original and for uniform A3 at --ratio (calibration as in bench_core). Writes lm_eval.json and
lm_eval.md to --out and, with --update-readme, the README table between `<!-- lm-eval-results -->` markers.

    python evals/bench_lm_eval.py --ratio 0.2 --n-samples 32 --limit 20 --update-readme
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


import a3mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, asset_models, machine, update_readme, write_results  # noqa: E402


def scores(model, tok, args) -> dict:
    res = a3mod.evaluation.evaluate(model, args.tasks, tokenizer=tok, batch_size=1, limit=args.limit,
                               max_length=args.max_length, log_samples=False, bootstrap_iters=0)
    return {t: {k: v for k, v in m.items() if isinstance(v, (int, float))} for t, m in res["results"].items()}


def run_model(path: Path, args) -> list[dict]:
    model, tok = a3mod.load_pretrained(str(path))
    model.eval()
    rows = []
    t = time.perf_counter()
    rows.append({"model": path.name, "method": "original", "ratio": 0.0, "scores": scores(model, tok, args),
                 "eval_s": time.perf_counter() - t})
    print(rows[-1], flush=True)
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=0)
    a3mod.apply(model, a3mod.a3_passes(args.ratio), calib=calib)
    t = time.perf_counter()
    rows.append({"model": path.name, "method": f"A3 {args.ratio:.0%}", "ratio": a3mod.report(model).ratio,
                 "scores": scores(model, tok, args), "eval_s": time.perf_counter() - t})
    print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    metrics = [(t, m) for t, ms in rows[0]["scores"].items() for m in ms
               if not m.endswith("_stderr,none") and m != "sample_len"]
    head = " | ".join(f"{t} {m.split(',')[0]}" for t, m in metrics)
    lines = [f"lm-eval {meta['lm_eval']} through a3mod's local tasks, {meta['limit']}; max_length {meta['max_length']}; "
             f"{meta['machine']}, fp32. wikitext_local numbers are lm-eval's word/byte perplexity of whole pages, "
             "not the token perplexity of the tables above.", "",
             f"| model | method | achieved ratio | {head} | eval s |", "|---|---|---|" + "---|" * len(metrics) + "---|"]
    for r in rows:
        vals = " | ".join(f"{r['scores'][t][m]:.4f}" for t, m in metrics)
        lines.append(f"| {r['model']} | {r['method']} | {100 * r['ratio']:.2f}% | {vals} | {r['eval_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["wikitext_local"])
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    ap.add_argument("--max-length", type=int, default=2048, help="lm-eval context length (default 2048)")
    ap.add_argument("--out", default=str(ROOT / "evals" / "results"))
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--render", action="store_true", help="only re-render md/README from the existing lm_eval.json")
    args = ap.parse_args()
    if args.render:
        data = json.loads((Path(args.out) / "lm_eval.json").read_text())
        md = markdown(data["rows"], data["meta"])
        write_results(args.out, "lm_eval", data["meta"], data["rows"], md)
        if args.update_readme:
            update_readme(md, "lm-eval-results")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval

    rows = []
    for path in asset_models():
        try:
            rows += run_model(path, args)
        except a3mod.UnsupportedModelError as e:
            print(f"skip {path.name}: {e}", file=sys.stderr)
    meta = {"lm_eval": lm_eval.__version__, "limit": f"first {args.limit} documents" if args.limit else "all documents",
            "max_length": args.max_length, "machine": machine(),
            "args": vars(args)}
    md = markdown(rows, meta)
    write_results(args.out, "lm_eval", meta, rows, md)
    if args.update_readme:
        update_readme(md, "lm-eval-results")


if __name__ == "__main__":
    main()
