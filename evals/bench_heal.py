"""Healing (a3mod.heal) on SmolLM2-135M: perplexity of uniform A3 at --ratio, then after N distillation steps.

One calibration draw (--n-samples x --calib-seq-len WikiText-2 validation tokens, seed 0) serves the A3 solve and
the distillation; the distillation reads it in --heal-seq-len windows (each calibration window cut in pieces),
--heal-batch per step. Each --steps value is its own run (its own lr schedule) from the same A3 model. Perplexity: WikiText-2 test, paper style (bench_core). Each row's cost is reported in wall
seconds and relative to one forward pass of the calibration data. Writes heal.json / heal.md / heal.png and, with
--update-readme, the README table between `<!-- heal-results -->` markers.

    python evals/bench_heal.py --ratio 0.2 --steps 0 50 100 --n-samples 32 --eval-windows 16 --update-readme
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


@torch.no_grad()
def forward_seconds(model, calib) -> float:
    t = time.perf_counter()
    for row in calib:
        model(input_ids=row[None], use_cache=False)
    return time.perf_counter() - t


def run(path: Path, args) -> list[dict]:
    model, tok = a3mod.load_pretrained(str(path))
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=0)
    test = a3mod.eval_tokens(tok)
    ppl = lambda m: a3mod.perplexity(m, test, seq_len=args.eval_seq_len, max_windows=args.eval_windows)["ppl"]  # noqa: E731
    base = ppl(model)
    fwd = forward_seconds(model, calib)
    stats = a3mod.collect(model, calib)
    pieces = calib[:, : calib.shape[1] // args.heal_seq_len * args.heal_seq_len].reshape(-1, args.heal_seq_len)
    rows = []
    for steps in sorted(args.steps):     # each row its own run (one lr schedule of `steps` steps) from the same A3
        student = a3mod.apply(copy.deepcopy(model), a3mod.a3_passes(args.ratio), stats=stats, progress=False)
        rep = a3mod.report(student)
        heal_s = 0.0
        if steps:
            heal_s = a3mod.heal(student, model, pieces, steps=steps, lr=args.lr, batch_size=args.heal_batch)["seconds"]
        p = ppl(student)
        rows.append({"model": path.name, "ratio": args.ratio, "steps": steps, "ppl": p, "ppl_orig": base,
                     "x_orig": p / base, "heal_s": heal_s, "heal_x_forward": heal_s / fwd, "forward_s": fwd,
                     "params": rep.params, "params_orig": rep.params_orig,
                     "kv": rep.kv_bytes_per_token() / rep.kv_bytes_per_token(True)})
        print(rows[-1], file=sys.stderr, flush=True)
        del student
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Uniform A3 at {100 * rows[0]['ratio']:.0f}% then `a3mod.heal` (lr {meta['args']['lr']}, "
             f"{meta['args']['heal_batch']} x {meta['args']['heal_seq_len']} tokens per step). {meta['eval']}; "
             f"calibration and distillation data: {meta['calib']}; {meta['machine']}.", "",
             "| model | heal steps | perplexity | x original | heal time | x one calibration forward |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['ppl']:.2f} | {r['x_orig']:.3f} | {r['heal_s']:.0f} s | "
                     f"{r['heal_x_forward']:.1f} |")
    lines.append(f"\nOriginal perplexity {rows[0]['ppl_orig']:.2f}; KV cache x{rows[0]['kv']:.4f} "
                 f"({rows[0]['params_orig']:,} -> {rows[0]['params']:,} decoder-layer params).")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["steps"] for r in rows], [r["ppl"] for r in rows], marker="o", label="A3 + heal")
    ax.axhline(rows[0]["ppl_orig"], color="k", ls="--", lw=1, label="original")
    ax.set_xlabel("distillation steps")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 50, 100])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--heal-seq-len", type=int, default=512)
    ap.add_argument("--heal-batch", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--model", default="smollm2", help="substring of the asset model folder (default smollm2)")
    ap.add_argument("--out", default=str(ROOT / "evals" / "results"))
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = [p for p in asset_models() if args.model in p.name.lower()]
    if not paths:
        sys.exit(f"no asset model matches {args.model!r}")
    rows = run(paths[0], args)
    meta = {"eval": eval_desc(args), "calib": f"{args.n_samples} x {args.calib_seq_len} WikiText-2 validation "
            "tokens, seed 0", "machine": machine(), "args": vars(args)}
    md = markdown(rows, meta)
    plot(rows, write_results(args.out, "heal", meta, rows, md) / "heal.png")
    if args.update_readme:
        update_readme(md, "heal-results")


if __name__ == "__main__":
    main()
