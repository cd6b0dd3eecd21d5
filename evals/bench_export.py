"""Stock transformers export of real models: perplexity of the a3mod model and of its stock export (reloaded by
transformers as the base family's own class), the padding each costs, and what the portable selection costs.

For each (model, ratio, variant) one JSON line is appended to --jsonl as soon as it finishes (resumable):
ppl of the a3mod model, ppl of the stock export reloaded from disk, their ratio, the export's head dim, zero
weights and KV elements per token against a3mod's, and the folder size. Variants: "a3" (A3 as it is: per-layer,
per-KV-group RoPE pairs, padded in the export) and "portable" (`a3_passes(r, portable=True)`: one set of pairs,
no padding); every variant of a model shares one calibration draw and its statistics. Writes
evals/results/export.{json,md}, a plot, and with --update-readme the README table.

    nohup python evals/bench_export.py --models smollm2-135m-instruct-q4_1-gguf qwen2.5-coder-0.5b &
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import a3mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, append_jsonl, asset_models, cached_stats, machine, model_label, pyplot,  # noqa: E402
                    read_jsonl, save_figure, update_readme, write_results)

VARIANTS = {"a3": lambda r: a3mod.a3_passes(r), "portable": lambda r: a3mod.a3_passes(r, portable=True)}


def _done(path: Path) -> dict:
    return {(r["model"], r["ratio"], r["variant"], r["calib"]): r for r in read_jsonl(path)}


def _folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def run_model(path: Path, args, done: dict, out: Path) -> None:
    model, tok = a3mod.load_pretrained(str(path))
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=0)
    label, cal = model_label(path), f"{args.n_samples}x{args.calib_seq_len}"

    def ppl(m) -> float:
        return a3mod.perplexity(m, ids, seq_len=args.eval_seq_len, max_windows=args.eval_windows,
                                progress=False)["ppl"]

    stats = None
    for ratio in args.ratios:
        for name in args.variants:
            if (label, ratio, name, cal) in done:
                continue
            if stats is None:
                stats = cached_stats(model, calib, {"a3"}, args.stats_cache, f"{label}-seed0")
            m = copy.deepcopy(model)
            t = time.perf_counter()
            a3mod.apply(m, VARIANTS[name](ratio), stats=stats, progress=False)
            seconds = time.perf_counter() - t
            tmp = Path(tempfile.mkdtemp(prefix="a3mod-export-"))
            try:
                t = time.perf_counter()
                folder = a3mod.save(m, tmp / "hf", tokenizer=tok, format="hf", dtype=torch.float32)
                export_s = time.perf_counter() - t
                rec = json.loads((folder / "a3mod_export.json").read_text())
                stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                row = dict(model=label, ratio=ratio, variant=name, calib=cal, eval=f"{args.eval_windows}x"
                           f"{args.eval_seq_len}", ppl_a3mod=ppl(m), ppl_stock=ppl(stock),
                           stock_class=type(stock).__name__, head_dim=rec["head_dim"],
                           orig_head_dim=getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads, rope=rec["rope"],
                           zeros=rec["decoder_layer_params"]["zeros"], layer_params=rec["decoder_layer_params"],
                           kv=rec["kv_elements_per_token"], folder_bytes=_folder_bytes(folder),
                           params_removed=a3mod.report(m).ratio, seconds=seconds, export_seconds=export_s,
                           machine=machine())
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            row["ppl_stock_over_a3mod"] = row["ppl_stock"] / row["ppl_a3mod"]
            append_jsonl(out, row)
            done[(label, ratio, name, cal)] = row
            print(json.dumps(row), flush=True)
            del m, stock


def table(rows: list[dict]) -> str:
    """Markdown: one row per (model, ratio, variant)."""
    head = ("| model | A3 ratio | selection | ppl a3mod | ppl stock export | stock / a3mod | export head dim | "
            "zero weights (of layers) | KV per token, export / a3mod |\n|---|---|---|---|---|---|---|---|---|\n")
    base = {(r["model"], r["ratio"]): r for r in rows if r["variant"] == "a3"}
    lines = []
    for r in sorted(rows, key=lambda r: (r["model"], r["ratio"], r["variant"])):
        p, kv = r["layer_params"], r["kv"]
        cost = ""
        if r["variant"] == "portable" and (r["model"], r["ratio"]) in base:
            cost = f" ({100 * (r['ppl_a3mod'] / base[r['model'], r['ratio']]['ppl_a3mod'] - 1):+.1f}% vs per-group)"
        lines.append(f"| {r['model']} | {r['ratio']:.0%} | {r['variant']} | {r['ppl_a3mod']:.2f}{cost} | "
                     f"{r['ppl_stock']:.2f} | {r['ppl_stock_over_a3mod']:.6f} | {r['head_dim']} of "
                     f"{r['orig_head_dim']} | {p['zeros']:,} ({100 * p['zeros'] / p['a3mod']:.1f}%) | "
                     f"{kv['export']:,} / {kv['a3mod']:,} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, mname in zip(axes[0], models):
        for name, marker in (("a3", "o"), ("portable", "s")):
            rs = sorted((r for r in rows if r["model"] == mname and r["variant"] == name), key=lambda r: r["ratio"])
            ax.plot([r["ratio"] for r in rs], [r["ppl_a3mod"] for r in rs], marker=marker, label=f"{name} (a3mod)")
            ax.plot([r["ratio"] for r in rs], [r["ppl_stock"] for r in rs], marker="x", ls="--",
                    label=f"{name} (stock export)")
        ax.set_title(mname, fontsize=9)
        ax.set_xlabel("A3 ratio")
        ax.set_ylabel("WikiText-2 ppl")
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help="asset folders, packaged names or paths "
                    "(default: the asset models)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--stats-cache", default=None, help="keep / reuse the calibration statistics in this folder")
    ap.add_argument("--jsonl", default=str(ROOT / "evals" / "results" / "export.jsonl"))
    ap.add_argument("--update-readme", action="store_true", help="write the table into the README")
    args = ap.parse_args()
    out = Path(args.jsonl)
    done = _done(out)
    for path in asset_models(args.models):
        run_model(path, args, done, out)
    rows = [r for r in done.values() if r["calib"] == f"{args.n_samples}x{args.calib_seq_len}"]
    md = table(rows)
    write_results(ROOT / "evals" / "results", "export", {"args": vars(args), "machine": machine()}, rows, md)
    plot(rows, ROOT / "evals" / "results" / "export.png")
    if args.update_readme:
        update_readme(md + "\n![stock export](evals/results/export.png)\n", "export_results")


if __name__ == "__main__":
    main()
