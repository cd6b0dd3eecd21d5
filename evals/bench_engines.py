"""A3 models in llama.cpp: the GGUF export (a3mod.export.llamacpp) scored and timed by llama.cpp itself through the
llama-cpp-python bindings (built from its sdist; not a dependency of a3mod).

For the original model and A3 at each ratio (and with --portable A3 with one shared RoPE pair set, which exports
without padding): write the GGUF (f32, vocabulary from the asset GGUF), then in llama.cpp
perplexity on the same WikiText-2 windows transformers scores (the same token ids, fed directly), prefill tokens/s
(one 512-token window) and decode tokens/s (64 single-token steps), next to transformers' perplexity of the a3mod
model and the ideal speed ratio (bytes of weights the export holds, per token). One JSON line per run in --jsonl
(resumable); evals/results/engines.{json,md} and a plot.

    nohup python evals/bench_engines.py --ratios 0.2 0.4 &
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import a3mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, append_jsonl, asset_models, cached_stats, machine, model_label, pyplot,  # noqa: E402
                    read_jsonl, save_figure, update_readme, write_results)


def _done(path: Path) -> dict:
    return {(r["model"], r["variant"]): r for r in read_jsonl(path)}


def _source_gguf(path: Path) -> Path:
    found = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf"))
    if not found:
        sys.exit(f"{path}: no GGUF to take the vocabulary from")
    return found[0]


def llama_ppl(llm, windows: torch.Tensor) -> float:
    """exp(mean NLL) over the windows as llama.cpp computes the logits (same convention as a3mod.perplexity)."""
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.tensor(np.array(llm.scores[:len(w)]), dtype=torch.float64)[:-1]
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        count += len(w) - 1
    return math.exp(nll / count)


def llama_speed(llm, window: list[int], steps: int = 64, repeats: int = 5) -> tuple[float, float]:
    """(prefill tokens/s over `window`, decode tokens/s over `steps` single-token evals after it): the median of
    `repeats` runs (this machine is shared; run it alone for speed numbers)."""
    pre, dec = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(window)
        pre.append(len(window) / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(steps):
            llm.eval([window[i % len(window)]])
        dec.append(steps / (time.perf_counter() - t))
    return float(np.median(pre)), float(np.median(dec))


def run(path: Path, args, done: dict, out: Path) -> None:
    import llama_cpp

    model, tok = a3mod.load_pretrained(str(path))
    label, vocab = model_label(path), _source_gguf(path)
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    windows = ids[: args.eval_windows * args.eval_seq_len].view(args.eval_windows, args.eval_seq_len)
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=0)
    variants = [("original", None, False)] + [(f"a3-{r:g}", r, False) for r in args.ratios] + [
        (f"portable-{r:g}", r, True) for r in (args.ratios if args.portable else [])]
    stats = None
    for name, ratio, portable in variants:
        if (label, name) in done:
            continue
        m = copy.deepcopy(model)
        if ratio is not None:
            stats = stats or cached_stats(model, calib, {"a3"}, args.stats_cache, f"{label}-seed0")
            a3mod.apply(m, a3mod.a3_passes(ratio, portable=portable), stats=stats, progress=False)
        ppl_hf = a3mod.perplexity(m, ids, seq_len=args.eval_seq_len, max_windows=args.eval_windows,
                                  progress=False)["ppl"]
        tmp = Path(tempfile.mkdtemp(prefix="a3mod-gguf-"))
        try:
            f = a3mod.save(m, tmp / "m.gguf", format="gguf", vocab_from=vocab)
            size = f.stat().st_size
            llm = llama_cpp.Llama(model_path=str(f), n_ctx=args.eval_seq_len + 128, n_batch=args.eval_seq_len,
                                  logits_all=True, verbose=False, n_threads=args.threads)
            ppl_cpp = llama_ppl(llm, windows)
            prefill, decode = llama_speed(llm, windows[0].tolist())
            del llm
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        row = dict(model=label, variant=name, ratio=ratio or 0.0, ppl_transformers=ppl_hf, ppl_llama_cpp=ppl_cpp,
                   ppl_rel_diff=ppl_cpp / ppl_hf - 1, gguf_bytes=size, prefill_tok_s=prefill, decode_tok_s=decode,
                   threads=args.threads, eval=f"{args.eval_windows}x{args.eval_seq_len}", machine=machine())
        append_jsonl(out, row)
        done[(label, name)] = row
        print(json.dumps(row), flush=True)


def table(rows: list[dict]) -> str:
    head = ("| model | variant | ppl transformers | ppl llama.cpp (f32) | diff | GGUF MB | prefill tok/s | decode tok/s "
            "| decode vs original | ideal (bytes) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    orig = {r["model"]: r for r in rows if r["variant"] == "original"}
    lines = []
    for r in sorted(rows, key=lambda r: (r["model"], r["ratio"], r["variant"])):
        o = orig.get(r["model"])
        speed = f"{r['decode_tok_s'] / o['decode_tok_s']:.2f}x" if o else ""
        ideal = f"{o['gguf_bytes'] / r['gguf_bytes']:.2f}x" if o else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['ppl_transformers']:.3f} | {r['ppl_llama_cpp']:.3f} | "
                     f"{100 * r['ppl_rel_diff']:+.3f}% | {r['gguf_bytes'] / 1e6:,.1f} | {r['prefill_tok_s']:,.0f} | "
                     f"{r['decode_tok_s']:,.1f} | {speed} | {ideal} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for mname in sorted({r["model"] for r in rows}):
        for kind, marker in (("a3", "o"), ("portable", "s")):
            rs = sorted((r for r in rows if r["model"] == mname and (r["variant"] == "original" or
                                                                     r["variant"].startswith(kind))),
                        key=lambda r: r["ratio"])
            if len(rs) > 1:
                ax.plot([r["ratio"] for r in rs], [r["decode_tok_s"] for r in rs], marker=marker,
                        label=f"{mname} {kind}")
    ax.set_xlabel("A3 ratio")
    ax.set_ylabel("llama.cpp decode tokens/s")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="asset folders, packaged names or paths (GGUF-sourced)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--portable", action="store_true", help="also A3 with one shared RoPE pair set (no padding)")
    ap.add_argument("--stats-cache", default=None, help="keep / reuse the calibration statistics in this folder")
    ap.add_argument("--jsonl", default=str(ROOT / "evals" / "results" / "engines.jsonl"))
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        sys.exit("needs the llama-cpp-python bindings: pip install llama-cpp-python (builds llama.cpp from source)")
    out = Path(args.jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out)
    for path in asset_models(args.models):
        run(path, args, done, out)
    rows = list(done.values())
    md = table(rows)
    write_results(ROOT / "evals" / "results", "engines", {"args": vars(args), "machine": machine()}, rows, md)
    plot(rows, ROOT / "evals" / "results" / "engines.png")
    if args.update_readme:
        update_readme(md + "\n![llama.cpp](evals/results/engines.png)\n", "engines")


if __name__ == "__main__":
    main()
