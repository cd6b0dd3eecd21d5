"""Results on the real checkpoints this machine can run: perplexity, compression time and peak memory of A3 at
several ratios and of the baselines, each run in a fresh process.

    python evals/bench_real.py                                              # the asset model and both Qwen models
    python evals/bench_real.py --models qwen2.5-coder-1.5b --methods a3 --ratios 0.2 --update-readme

Protocol: calibration = --n-samples random windows of --seq-len tokens from WikiText-2's validation split (the
assets hold no train split), seed 0, the same windows for every method; perplexity over the first --eval-windows
non-overlapping windows of --seq-len tokens of the test split. Each (model, method, ratio) runs in its own process:
load (GGUF dequantized block by block), compress in memory (a3mod.apply with calibration), report, perplexity;
peak RSS = that process's VmHWM (imports and the evaluation included). The "original" row times one forward pass
of the calibration windows through the model body: compression time is reported as a multiple of it. Finished
runs are appended to evals/results/real_runs.jsonl and skipped when found there (resumable; --rerun measures them
again); ASVD's sensitivity table is checkpointed row by row into the cache, so a killed ASVD run resumes where it
stopped (its row then says "resumed" and its time covers the resumed part only); the table goes to evals/results/real.{json,md,png} and, with --update-readme, between the README's
`<!-- real-results -->` markers.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_MODELS = ("smollm2-135m-instruct-q4_1-gguf", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
METHODS = ("a3", "svd-llm", "asvd", "asvd-uniform")
# "asvd-uniform": ASVD without its sensitivity search (rank_search=False: every linear at the ratio's uniform rank,
# the activation-aware scaling kept); the search probes every linear at several ranks, hours on the 1.5B model here
RECIPE = {"asvd-uniform": ("asvd", {"rank_search": False})}


def worker(args) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    import torch

    import a3mod
    from a3mod.pipeline import recipes
    from bench_stream import forward_s, vm_hwm_mib

    t = time.perf_counter()
    model, tok = a3mod.load_pretrained(args.src)
    res = {"load_s": time.perf_counter() - t}
    calib = a3mod.calibration_data(tok, "wikitext2", n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed)
    torch.manual_seed(0)
    res["forward_s"] = forward_s(model, calib)       # in this process too: "x one forward" is a ratio within one run
    if args.method != "original":
        method, extra = RECIPE.get(args.method, (args.method, {}))
        passes = recipes.passes(method, args.ratio, probe_samples=1, probe_seq_len=256, **extra)
        t = time.perf_counter()
        stats = _resumable_stats(model, calib, passes, args) if args.method == "asvd" else None
        if stats is not None and stats.saved_at == 0.0:
            res["resumed"] = True             # the sensitivity rows an interrupted run saved: its time not counted
        a3mod.apply(model, passes, calib=calib, stats=stats, progress=False)
        res["compress_s"] = time.perf_counter() - t
        if stats is not None:
            stats.save(stats.autosave)        # the whole table: a --rerun reuses it (and says "resumed")
    rep = a3mod.report(model, context=args.seq_len)
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    res.update(ppl=a3mod.perplexity(model, ids, seq_len=args.seq_len, max_windows=args.eval_windows)["ppl"],
               ratio=rep.ratio, params=rep.params, kv_bytes_per_token=rep.kv_bytes_per_token(),
               peak_rss_mib=vm_hwm_mib())
    print("RESULT " + json.dumps(res), flush=True)


def _resumable_stats(model, calib, passes, args):
    """ASVD's statistics in a file of the cache (`a3mod.paths.cache_dir()`), its sensitivity table checkpointed
    there row by row (`Stats.autosave`): a run killed part way (hours on the 1.5B model) resumes from the rows it
    probed. A fresh file is collected and saved first; one left by an interrupted run is loaded (its
    `saved_at` is 0 then)."""
    import a3mod
    from a3mod.paths import cache_dir

    n, seq = calib.shape
    base = Path(args.state_dir) if args.state_dir else cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"bench-real-{Path(args.src).stem}-{args.method}-{n}x{seq}-seed{args.seed}.safetensors"
    if path.is_file():
        stats = a3mod.Stats.load(path)
    else:
        stats = a3mod.collect(model, calib, kinds=sorted({k for p in passes for k in p.stat_kinds()}), progress=False)
        stats.save(path)
        stats.saved_at = time.monotonic()
    stats.autosave = path
    return stats


def run(src: str, method: str, ratio: float, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--src", src, "--method", method, "--ratio", str(ratio),
           "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len), "--eval-windows",
           str(args.eval_windows), "--seed", str(args.seed)] + (["--state-dir", args.state_dir] if args.state_dir else [])
    t = time.perf_counter()
    p = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, check=False)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1][:300],
                "process_s": time.perf_counter() - t}
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[7:]), "process_s": time.perf_counter() - t}


def table(rows: list[dict]) -> str:
    base = {r["model"]: r for r in rows if r["method"] == "original" and "ppl" in r}
    md = ("| model | method | target | achieved ratio | KV bytes/token | ppl | x original | compress s | "
          "x one forward | peak RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        b = base.get(r["model"])
        if "error" in r:
            md += f"| {r['model']} | {r['method']} | {r['ratio_target']:.0%} | failed: {r['error']} | | | | | | |\n"
            continue
        cs = r.get("compress_s")
        fwd = r.get("forward_s") or (b or {}).get("forward_s")      # rows before the worker timed its own forward
        rel = f"{cs / fwd:.2f}" if cs and fwd and not r.get("resumed") else "-"
        cs_s = "-" if cs is None else f"{cs:.0f}" + (" (resumed)" if r.get("resumed") else "")
        md += (f"| {r['model']} | {r['method']} | {r['ratio_target']:.0%} | {100 * r['ratio']:.2f}% | "
               f"{r['kv_bytes_per_token']:,} | {r['ppl']:.2f} | {r['ppl'] / b['ppl']:.3f} | "
               f"{cs_s} | {rel} | {r['peak_rss_mib']:,.0f} |\n"
               if b else "")
    return md


def plot(rows: list[dict], path: Path) -> None:
    from common import ppl_vs_ratio_plot

    ppl_vs_ratio_plot(rows, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ratio", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                    help="packaged names, asset folders or paths (default: %(default)s)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="A3's ratios")
    ap.add_argument("--baseline-ratio", type=float, default=0.2, help="the baselines' one ratio")
    ap.add_argument("--skip", nargs="*", default=[], help="model:method pairs not to run")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rerun", nargs="*", default=None, metavar="METHOD",
                    help="measure again runs already in the results: all of them, or only these methods")
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--state-dir", default=None,
                    help="where ASVD's resumable statistics and sensitivity table live (default: the a3mod cache); a "
                         "folder in the repository, committed as the search goes, lets a search longer than one "
                         "machine's life resume on the next")
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from common import append_jsonl, asset_models, machine, model_label, read_jsonl, update_readme, write_results

    log = Path(args.results) / "real_runs.jsonl"
    proto = {"calib": f"{args.n_samples} x {args.seq_len}", "eval": f"{args.eval_windows} x {args.seq_len}",
             "seed": args.seed}
    done = {(r["model"], r["method"], r["ratio_target"]) for r in read_jsonl(log)
            if all(r.get(k) == v for k, v in proto.items())}
    for name in args.models:
        src = asset_models([name])[0]
        label = model_label(src)
        plan = [("original", 0.0)] + [(m, r) for m in args.methods
                                      for r in (args.ratios if m == "a3" else [args.baseline_ratio])]
        for method, ratio in plan:
            again = args.rerun is not None and (not args.rerun or method in args.rerun)
            if (label, method, ratio) in done and not again or f"{name}:{method}" in args.skip:
                continue
            print(f"{label} {method} {ratio:.0%} ...", file=sys.stderr, flush=True)
            row = {"model": label, "method": method, "ratio_target": ratio, **proto, "machine": machine(),
                   **run(str(src), method, ratio, args)}
            append_jsonl(log, row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    latest = {(r["model"], r["method"], r["ratio_target"]): r for r in read_jsonl(log)
              if all(r.get(k) == v for k, v in proto.items())}          # a rerun replaces the earlier row
    order = {m: i for i, m in enumerate(("original", *METHODS))}
    models = list(dict.fromkeys(k[0] for k in latest))
    rows = sorted(latest.values(), key=lambda r: (models.index(r["model"]), order.get(r["method"], 99),
                                                  r["ratio_target"]))
    md = (f"WikiText-2 token perplexity over the first {proto['eval']} test windows; calibration {proto['calib']} "
          f"tokens of WikiText-2 validation, seed {args.seed}, the same windows for every method; {machine()}, fp32, "
          f"each run in a fresh process (2 cores shared with other jobs: times are upper bounds). x one forward = "
          f"compression time over one forward pass of the calibration windows, timed in the same process where the row "
          f"has it, else in the original's (\"resumed\": the run finished a search "
          f"an earlier run left part way, its time that last part only); peak RSS includes the imports and "
          f"the evaluation. `python evals/bench_real.py`\n\n" + table(rows))
    write_results(args.results, "real", {**proto, "runs": log.name}, rows, md)
    plot(rows, Path(args.results) / "real.png")
    if args.update_readme:
        update_readme(md, "real-results")


if __name__ == "__main__":
    main()
