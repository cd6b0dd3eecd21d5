"""Compression speed: where the wall time of A3 goes, against one plain forward pass of the same data.

On every real model in the assets dir (fp32, CPU), with N x L calibration tokens, in one process:
  (a) forward   one plain forward pass of the calibration windows through the model body (no hooks, no
                cache, batch 1 like `collect`): the reference, the min of --forward-reps runs
  (b) collect   a3mod.collect(kinds=("a3",)) = forward + statistics; statistics overhead = (b) - (a)
  (c) solve     a3mod.apply with those statistics: every layer's compact modules (`passes.a3.build_layer`),
                swapped in layer by layer with the undo log, and the self-check
  (e) save      a3mod.save(model, tmp dir, tokenizer)
A3 total = b + c + e; the target is total <= 2 x forward. For comparison, in the same run and on the
same windows (before the A3 rewrite): SVD-LLM's Gram collection and solve, ASVD's |x| collection, its rank
search (sensitivity probes on the first --probe-samples x --probe-seq-len calibration tokens, as in
evals/compare.py) and its factorization. Every piece is timed with time.perf_counter.
Writes compress.json and compress.md to --out; --update-readme fills the README's
`<!-- compress-results -->` markers.

    python evals/bench_compress.py --n-samples 32 --calib-seq-len 2048 --update-readme
    python evals/bench_compress.py --random 4 --n-samples 4 --calib-seq-len 256 --out /tmp/x   # script check
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import replace
from typing import NamedTuple

import torch

import a3mod
from a3mod.math import factorize as fz
from a3mod.arch import layer_views
from a3mod.passes.base import PassContext, run_pass
from a3mod.passes.lowrank import ASVD, SVDLLM
from a3mod.passes.search import PARAM_CANDIDATES, asvd_ranks, targets_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, asset_models, machine, model_label, update_readme, write_results

TARGET = 2.0            # A3 total / one forward pass


class T(NamedTuple):
    """Wall seconds (time.perf_counter) and this process's CPU seconds (time.process_time) of a step."""
    wall: float
    cpu: float

    def __add__(self, o):
        return T(self.wall + o.wall, self.cpu + o.cpu)

    def __sub__(self, o):
        return T(self.wall - o.wall, self.cpu - o.cpu)


def timed(fn) -> tuple[T, object]:
    """(T of the call, fn())."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return T(time.perf_counter() - t, time.process_time() - c), out


def say(step: str, t: T) -> None:
    print(f"{step}: {t.wall:.2f} s (CPU {t.cpu:.2f} s)", flush=True)


@torch.no_grad()
def forward_only(model, calib: torch.Tensor) -> None:
    """What `collect` runs, without its hooks: the body (no lm_head), one window at a time, no cache."""
    body = getattr(model, "base_model", model)
    for b in range(calib.shape[0]):
        body(input_ids=calib[b:b + 1], use_cache=False)


def random_model(layers: int):
    """A SmolLM2-135M-shaped random llama with `layers` layers (checks the script without asset files)."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                   head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def baselines(model, views, calib, args) -> list[tuple[str, T, str]]:
    """(step, T, note) rows of SVD-LLM and ASVD on the uncompressed model; the model is left unchanged."""
    rows = []
    targets = targets_of(views, kv=False)
    t, gram = timed(lambda: a3mod.collect(model, calib, progress=False, kinds=("gram",)))
    say("SVD-LLM collect", t)
    rows.append(("SVD-LLM: collect (forward + X^T X per input group)", t, "a forward pass of its own"))
    cfg = SVDLLM(ratio=args.ratio)
    t, _ = timed(lambda: run_pass(cfg, PassContext(model=model, views=views, stats=gram, calib=calib, progress=False)))
    say("SVD-LLM solve", t)
    rows.append(("SVD-LLM: solve (Cholesky + SVD per linear)", t, f"{len(targets)} linears"))
    gram = None                                    # free the Gram matrices before the next pass
    t, absm = timed(lambda: a3mod.collect(model, calib, progress=False, kinds=("absmean",)))
    say("ASVD collect", t)
    rows.append(("ASVD: collect (forward + sum of abs per input channel)", t, "a forward pass of its own"))
    cfg = ASVD(ratio=args.ratio, probe_samples=args.probe_samples, probe_seq_len=args.probe_seq_len)
    scale = lambda t: fz.asvd_scale(absm.layers[t.layer][f"xa.{t.group}"] / absm.n, cfg.alpha)  # as apply_asvd
    t, _ = timed(lambda: asvd_ranks(cfg, model, views, targets, scale, absm, calib, False))
    say("ASVD rank search", t)
    rows.append(("ASVD: rank search (sensitivity probes + threshold search)", t,
                 (f"{len(targets)} linears x {len(PARAM_CANDIDATES)} sizes, probes {args.probe_samples} x "
                  f"{args.probe_seq_len} tokens")))
    t, _ = timed(lambda: run_pass(cfg, PassContext(model=model, views=views, stats=absm, calib=calib, progress=False)))    # reuses the cached table
    rows.append(("ASVD: factorization (searched ranks)", t, ""))
    return rows



def with_updates(model, calib, passes, f: T) -> list[tuple[str, T, str]]:
    """(step, T, note) rows of A3 with both least-squares updates (apply from calib=: the layer-by-layer schedule,
    statistics collected inside), of the same with the sequential re-fit, with the QK update and with the MLP's
    loss-aware selection (A3MLP(select="taylor"): a backward pass first), each on a copy."""
    rows = []
    for step, seq, qk, sel in (
            ("(f) A3 + both updates: apply(calib=), layer by layer, everything included", False, False, "cur"),
            ("(g) A3 + both updates + the sequential re-fit (seq_refit=True)", True, False, "cur"),
            ("(h) A3 + both updates + the QK update (A3QK(update=True))", False, True, "cur"),
            ("(i) A3 + both updates + the loss-aware MLP selection (A3MLP(select='taylor'))", False, False, "taylor")):
        m = copy.deepcopy(model)
        ps = [replace(p, update=True, seq_refit=seq, **({"select": sel} if isinstance(p, a3mod.A3MLP) else {}))
              if hasattr(p, "seq_refit") else
              replace(p, update=True) if qk and isinstance(p, a3mod.A3QK) else p for p in passes]
        t, _ = timed(lambda m=m, ps=ps: a3mod.apply(m, ps, calib=calib, progress=False))
        say(step, t)
        rows.append((step, t, f"target <= {TARGET:g}x forward: {'PASS' if t.wall <= TARGET * f.wall else 'FAIL'}"))
        del m
    return rows


def run_model(name: str, model, tok, calib: torch.Tensor, args) -> list[dict]:
    model.eval()
    passes = a3mod.a3_passes(args.ratio)
    fwd = []
    for _ in range(args.forward_reps):                     # noisy shared machine: the min of a few runs
        fwd.append(timed(lambda: forward_only(model, calib))[0])
        say("forward", fwd[-1])
    f = T(min(x.wall for x in fwd), min(x.cpu for x in fwd))
    t_collect, stats = timed(lambda: a3mod.collect(model, calib, progress=False, kinds=("a3",)))
    say("collect", t_collect)
    views = layer_views(model)
    base = [] if args.skip_baselines else baselines(model, views, calib, args)
    base = (with_updates(model, calib, passes, f) if args.updates else []) + base
    t_solve, _ = timed(lambda: a3mod.apply(model, passes, stats=stats, progress=False))
    ratio = a3mod.report(model).ratio
    with tempfile.TemporaryDirectory(prefix="a3mod-bench-compress-") as tmp:
        t_save, out = timed(lambda: a3mod.save(model, Path(tmp) / "out", tokenizer=tok))
        size = sum(p.stat().st_size for p in out.iterdir())
    total = t_collect + t_solve + t_save
    passed = total.wall <= TARGET * f.wall
    steps = [("(a) forward pass (reference)", f, f"min of {len(fwd)}: {[round(x.wall, 2) for x in fwd]} s"),
             ("(b) collect = forward + A3 statistics", t_collect, ""),
             ("statistics overhead (b - a)", t_collect - f, ""),
             ("(c) solve and swap in (apply with the statistics: every layer's build_layer, its swap, the "
              "undo log, the self-check)", t_solve, f"{len(views)} layers"),
             ("(e) save (safetensors + sidecar + tokenizer)", t_save, f"{size / 2**20:.0f} MiB"),
             ("**A3 total (b + c + e)**", total, f"target <= {TARGET:g}x forward: {'PASS' if passed else 'FAIL'}"),
             *base]
    rows = [{"model": name, "tokens": int(calib.numel()), "step": s, "seconds": t.wall, "cpu_s": t.cpu,
             "x_forward": t.wall / f.wall, "x_forward_cpu": t.cpu / f.cpu, "note": n} for s, t, n in steps]
    rows[0]["forward_runs"] = [x._asdict() for x in fwd]
    next(r for r in rows if r["step"].startswith("**A3 total")).update(achieved_ratio=ratio, passed=passed)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [(f"A3 at {meta['ratio']:.0%} (uniform), calibration {meta['calib']}; {meta['machine']}, "
              f"{meta['threads']} torch thread(s), fp32. Wall seconds (time.perf_counter) and CPU seconds of this "
              f"process (time.process_time) of each step, in one process; x forward = that time over one plain "
              f"forward pass of the same windows. Target: A3 total <= {TARGET:g}x forward (wall). The machine is "
              f"shared, so times are upper bounds."), "",
             "| model | step | wall s | x forward | CPU s | x forward (CPU) | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['step']} | {r['seconds']:.2f} | {r['x_forward']:.3f} | {r['cpu_s']:.2f} | "
                     f"{r['x_forward_cpu']:.3f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--calib-seq-len", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--forward-reps", type=int, default=2, help="plain forward passes; the min is the reference")
    ap.add_argument("--probe-samples", type=int, default=1, help="ASVD sensitivity probe windows")
    ap.add_argument("--probe-seq-len", type=int, default=256, help="ASVD sensitivity probe length")
    ap.add_argument("--skip-baselines", action="store_true", help="A3 only (no SVD-LLM / ASVD rows)")
    ap.add_argument("--updates", action="store_true",
                    help="also time A3 with both least-squares updates, and with the sequential re-fit (from calib=)")
    ap.add_argument("--random", type=int, metavar="LAYERS", default=None,
                    help="a SmolLM2-shaped random llama with LAYERS layers and random tokens instead of the assets")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--models", nargs="+", default=None,
                    help="packaged names, asset folders or paths (default: the asset models)")
    ap.add_argument("--tag", default="compress", help="results file name (default: compress -> compress.json/md)")
    ap.add_argument("--out", default=str(ROOT / "evals" / "results"))
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if args.random is not None:
        g = torch.Generator().manual_seed(args.seed)
        calib = torch.randint(0, 49152, (args.n_samples, args.calib_seq_len), generator=g)
        rows += run_model(f"random-llama-{args.random}L", random_model(args.random), None, calib, args)
    else:
        for path in asset_models(args.models):
            model, tok = a3mod.load_pretrained(str(path))
            calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=args.seed)
            try:
                rows += run_model(model_label(path), model, tok, calib, args)
            except a3mod.UnsupportedModelError as e:
                print(f"skip {path.name}: {e}", file=sys.stderr)
            del model
    src = "random token ids" if args.random is not None else "WikiText-2 validation"
    meta = {"calib": f"{args.n_samples} x {args.calib_seq_len} tokens of {src}, seed {args.seed}",
            "ratio": args.ratio, "machine": machine(), "threads": torch.get_num_threads(), "args": vars(args)}
    md = markdown(rows, meta)
    write_results(args.out, args.tag, meta, rows, md)
    if args.update_readme:
        update_readme(md, "compress-results")


if __name__ == "__main__":
    main()
