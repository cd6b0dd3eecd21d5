"""`a3mod` command line: compress a checkpoint, evaluate perplexity, print a report."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

from ..version import __version__
from ..calib import distributed
from ..calib.sources import check_source, is_dataset_source
from ..calib.stats import WHOLE_MODEL_KINDS, Stats, is_stats_file
from ..calib.text import calibration_data, text_file
from ..errors import A3ModError, CalibrationError
from ..evaluation import evaluate
from ..evaluation.ppl import eval_tokens, perplexity
from ..evaluation.prepare import prepare
from ..heal import heal
from ..export.formats import save
from ..export.llamacpp import check_target as gguf_target
from ..export.stock import summary as stock_summary
from ..io.checkpoint import load
from ..io.files import EXPORT_RECORD, KEEP_OTHERS, atomic_write, check_output_dir, output_lock, recover
from ..io.loading import load_pretrained, load_tokenizer
from ..passes.base import needs
from ..paths import dataset_file, model_source
from ..pipeline import layerwise, recipes
from ..pipeline.compress import apply, data_dependent, preview
from ..pipeline.stream import compress_streaming
from ..report import report
from . import card
from .args import DTYPES, UPDATE_TOKENS, build_parser  # noqa: F401  (the parser lives in args.py)


def _load(args, path: str | None = None):
    path = path or model_source(args.model)
    print(f"loading {path}", file=sys.stderr)
    return path, *load_pretrained(path, dtype=DTYPES[args.dtype], device=args.device)


def _ppl(model, tok, args) -> dict:
    ids = eval_tokens(tok, args.eval_source)
    return perplexity(model, ids, seq_len=args.eval_seq_len, batch_size=args.batch_size, max_windows=args.eval_windows)


def _write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def _versions() -> dict:

    return {"a3mod": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def _check_inputs(args) -> tuple:
    """Everything `compress` can check before loading a model: passes, --eval, the text sources, the output
    path (CheckpointError naming it) and the statistics file. Returns (passes, model path, output path)."""
    passes = _passes(args)
    if args.keep_other_files and not args.overwrite:
        raise A3ModError("--keep-other-files keeps your files when --overwrite replaces a checkpoint; give both")
    if args.sequential and not args.stream:
        raise A3ModError("--sequential calibrates layer by layer while streaming: give it with --stream")
    if getattr(args, "seq_refit", False) and (args.sequential or (args.stats and not _loss_kinds(passes))):
        raise A3ModError("--seq-refit calibrates each layer from the windows as it goes: drop " +
                         ("--stats (with --seq-refit the file keeps only the loss statistic of --mlp-select taylor)"
                          if not args.sequential else "--sequential (choose one way of reading the compressed stream)"))
    if args.heal_steps and (args.stream or not 0 < args.heal_lr < 1):
        raise A3ModError("--heal-steps needs the whole model in memory (not --stream)" if args.stream else
                         f"--heal-lr {args.heal_lr} is outside (0, 1)")
    if args.extra_eval:
        _lm_eval_tasks(args.extra_eval)
    for src, used in ((args.calib, not args.dry_run), (args.eval_source, not args.no_eval and not args.dry_run)):
        if used and is_dataset_source(src):      # a dry run reads no text
            check_source(src)
        elif used:
            text_file(dataset_file(src))         # readable UTF-8 text, before any model work
    path = model_source(args.model)
    out = check_output_dir(args.out, _overwrite(args), [path])
    if args.stats and os.path.exists(args.stats) and not is_stats_file(Path(args.stats)):
        raise CalibrationError(f"--stats {args.stats!r} exists and is not an a3mod statistics file")
    return passes, path, out


def _stats(args, model, calib):
    """(statistics for the passes, whether to write --stats): the file's if it belongs to this model and these
    tokens, else freshly collected (a mismatch is an error unless --recompute-stats)."""
    passes = _passes(args)
    want = {k for p in passes for k in needs(p)}
    if args.stats and getattr(args, "seq_refit", False):
        want = _loss_kinds(passes)          # the re-fit calibrates the rest on the compressed stream, layer by layer
    if not args.stats and layerwise.wanted(passes, want, calib, None):
        return None, False          # apply calibrates and solves one layer at a time (one layer's Grams held)
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
    if stats is not None and "calib" not in stats.source:     # collect records only the kinds it was asked for
        stats.source = {**stats.source, "calib": args.calib, "n_samples": args.n_samples,
                        "seq_len": args.calib_seq_len, "seed": args.seed}
    grew = stats is not None and stats.kinds != had
    return stats, bool(args.stats) and (grew or not os.path.exists(args.stats))


def _loss_kinds(passes) -> set[str]:
    """The kinds among the passes' statistics that a backward pass of the original model collects ("taylor"):
    the only ones a statistics file gives a sequential re-fit."""
    return {k for p in passes for k in needs(p)} & WHOLE_MODEL_KINDS


def _given(args, stats):
    """What `apply` is given of the statistics: with --seq-refit, the loss statistic alone (a3mod.Stats.only)."""
    if stats is not None and getattr(args, "seq_refit", False):
        return stats.only(stats.kinds & WHOLE_MODEL_KINDS)
    return stats


def cmd_compress(args) -> int:
    passes, path, out = _check_inputs(args)        # before any loading or calibration
    line = updates_line(args)
    if line and not args.dry_run:
        print(line, file=sys.stderr)
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
    result["timings_s"]["calibration"] = time.perf_counter() - t          # 0 when apply calibrates layer by layer
    teacher = copy.deepcopy(model) if args.heal_steps else None
    t = time.perf_counter()
    apply(model, passes, calib=calib, stats=_given(args, stats))
    result["timings_s"]["solve_and_rewrite"] = time.perf_counter() - t
    result["calib_tokens"] = model.a3mod_info["calib_tokens"]
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
    result["ratio"] = _ratio_check(args, rep)
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
    saved = save(model, out, tokenizer=tok, overwrite=_overwrite(args), extra_files=extra, dtype=args.save_dtype)
    result["timings_s"]["save"] = time.perf_counter() - t
    print(f"wrote {_bytes_written(saved)}")
    if not args.no_eval:
        b, a = result["ppl_before"], result["ppl_after"]
        print(f"\n{_eval_name(args)} token perplexity ({a['windows']} x {a['seq_len']} tokens): "
              f"{b['ppl']:.4f} -> {a['ppl']:.4f}  (ratio removed {100 * rep.ratio:.2f}%)")
    print(f"saved to {out}")
    return 0


def _dry_run(args, passes, path) -> int:
    if args.stream or data_dependent(passes):
        what = "--stream" if args.stream else f"--method {args.method}"
        raise A3ModError(f"--dry-run with {what}: " + ("streaming plans are those of --method a3; drop --stream to "
                         "preview them" if args.stream else "its kept dims come from calibration data"))
    _, model, _ = _load(args, path)
    off = dict(update=False, seq_refit=False, refit_damping=None)
    plain = [dataclasses.replace(p, **{k: v for k, v in off.items() if hasattr(p, k)}) for p in passes]
    rep = preview(model, plain, inplace=True)      # the updates / re-fits change weights, not shapes: not solved here
    print(rep)
    print(f"\ndry run: the plan of {args.method} at the given ratios (kept dims from shapes alone); nothing was "
          f"calibrated or written")
    return 0


def _eval_name(args) -> str:
    return "WikiText-2" if args.eval_source == "wikitext2-test" else repr(args.eval_source)


def _compress_stream(args, passes) -> int:
    """`compress --stream`: a3mod.compress_streaming from safetensors or a GGUF, then report (and perplexity)."""
    if args.method != "a3" or args.stats:
        raise A3ModError("--stream runs the A3 passes layer by layer; it takes neither --method "
                         f"{args.method!r} (baselines need the whole model) nor --stats")
    path = model_source(args.model)
    tok = load_tokenizer(path)
    result = {"model": path, "method": args.method, "passes": [repr(p) for p in passes], "stream": True,
              "sequential": args.sequential,
              "argv": sys.argv[1:], "calibration": {"source": args.calib, "n_samples": args.n_samples,
                                                   "seq_len": args.calib_seq_len, "seed": args.seed},
              "versions": _versions(), "timings_s": {}}
    t = time.perf_counter()
    calib = calibration_data(tok, args.calib, args.n_samples, args.calib_seq_len, args.seed)
    out = compress_streaming(path, args.out, passes, calib, batch_size=args.batch_size, offload_dir=args.offload_dir,
                             dtype=DTYPES[args.dtype], device=args.device, tokenizer=tok, overwrite=_overwrite(args),
                             restart=args.restart, save_dtype=args.save_dtype, extra_names=("compress_result.json",),
                             sequential=args.sequential)
    print(f"wrote {_bytes_written(out)}")
    result["timings_s"]["calibrate_solve_write"] = time.perf_counter() - t
    if distributed.rank_world()[0] != 0:
        return 0
    model = load(out, device=args.device, dtype=DTYPES[args.dtype])
    result["calib_tokens"] = model.a3mod_info["calib_tokens"]
    rep = report(model, context=args.eval_seq_len)
    print(rep)
    result["report"] = rep.to_dict()
    result["ratio"] = _ratio_check(args, rep)
    if not args.no_eval:
        result["ppl_after"] = _ppl(model, tok, args)
        print(f"{_eval_name(args)} token perplexity after: {result['ppl_after']['ppl']:.4f}")
    _write_json(str(out / "compress_result.json"), result)
    print(f"saved to {out}")
    return 0


def _ratio_check(args, rep) -> dict:
    """{requested, achieved} fraction of decoder-layer linear parameters removed (compress_result.json), with a
    warning on stderr when the model gave more than one point less than asked."""
    asked = args.ratio if args.kv_ratio is None else None
    if asked is not None and rep.ratio < asked - 0.01:
        print(f"a3mod: warning: removed {100 * rep.ratio:.2f}% of the decoder-layer linear parameters, less than the "
              f"requested {100 * asked:.2f}%: {rep.kept_whole:,} parameters of hybrid mixers (state-space, "
              f"convolution or linear-attention) stay as they are; the attention and MLP parts lost "
              f"{100 * rep.ratio_reducible:.2f}%; see the report above", file=sys.stderr)
    return {"requested": asked, "achieved": rep.ratio, "achieved_attention_mlp": rep.ratio_reducible}


def _lm_eval_tasks(spec: str) -> list[str]:
    kind, _, tasks = spec.partition(":")
    if kind != "lm-eval" or not tasks.strip(","):
        raise A3ModError(f"--eval {spec!r}: expected lm-eval:TASK[,TASK...], e.g. lm-eval:wikitext_local")
    return [t for t in tasks.split(",") if t]


def _lm_eval(model, tok, tasks, batch_size, limit, num_fewshot, max_length) -> dict:
    """Run lm-eval, print its table, return {task: {metric: value}} (JSON-safe)."""
    limit = int(limit) if limit is not None and limit >= 1 else limit
    res = evaluate(model, tasks, tokenizer=tok, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot,
                   max_length=max_length, log_samples=False)
    from lm_eval.utils import make_table

    print(make_table(res))
    clean = lambda v: v if isinstance(v, (int, float, str)) or v is None else str(v)  # noqa: E731
    return {t: {k: clean(v) for k, v in m.items()} for t, m in res["results"].items()}


FLAGS = {"ratio": "--ratio", "kv_ratio": "--kv-ratio", "multiple_of": "--multiple-of",
         "mlp_update": "--mlp-update / --updates on", "ov_update": "--ov-update / --updates on",
         "qk_update": "--qk-update",
         "portable": "--portable", "seq_refit": "--seq-refit", "refit_damping": "--refit-damping",
         "mlp_select": "--mlp-select", "kv_budget": "--kv-budget", "across": "--across"}


def _passes(args) -> list:
    mlp, ov, qk = _updates(args)
    return recipes.passes(args.method, args.ratio, kv_ratio=args.kv_ratio, across=args.across, qk_ratio=args.qk_ratio,
                          ov_ratio=args.ov_ratio, mlp_ratio=args.mlp_ratio, multiple_of=args.multiple_of,
                          alpha=args.alpha, rank_search=not args.no_rank_search, probe_samples=args.probe_samples,
                          probe_seq_len=args.probe_seq_len, mlp_update=mlp, ov_update=ov, portable=args.portable,
                          seq_refit=getattr(args, "seq_refit", False),
                          refit_damping=_refit_damping(args),
                          mlp_select=getattr(args, "mlp_select", "cur"), qk_update=qk,
                          kv_budget=getattr(args, "kv_budget", None), names=FLAGS)


def _refit_damping(args):
    """--refit-damping as given; with --seq-refit alone "heldout" (it matched or beat 0.01 on both real models)."""
    given = getattr(args, "refit_damping", None)
    return "heldout" if given is None and getattr(args, "seq_refit", False) else given


def _updates(args) -> tuple[bool, bool, bool]:
    """(MLP update, OV update, QK update): --mlp-update / --ov-update as given, else --updates (auto: on for method
    a3 or a3-mix with --ratio when the calibration holds at least UPDATE_TOKENS tokens); the QK update with --qk-update
    only
    (it costs 0.3 forward passes more than both updates: over the 2x budget of the default)."""
    qk = bool(getattr(args, "qk_update", False))
    if getattr(args, "mlp_update", False) or getattr(args, "ov_update", False):
        return bool(args.mlp_update), bool(args.ov_update), qk
    mode = getattr(args, "updates", "off")
    if mode == "auto":
        on = (args.method in ("a3", "a3-mix") and args.ratio is not None and args.kv_ratio is None
              and args.n_samples * args.calib_seq_len >= UPDATE_TOKENS)
        return on, on, qk
    return mode == "on", mode == "on", qk


def updates_line(args) -> str | None:
    """What --updates auto decided, for methods a3 / a3-mix with --ratio (None otherwise or when given explicitly)."""
    if getattr(args, "updates", None) != "auto" or args.mlp_update or args.ov_update \
            or args.method not in ("a3", "a3-mix") or args.ratio is None or args.kv_ratio is not None:
        return None
    n = args.n_samples * args.calib_seq_len
    return (f"least-squares updates: on (--updates auto: {n:,} calibration tokens >= {UPDATE_TOKENS:,}; "
            f"--updates off for selection alone)" if n >= UPDATE_TOKENS else
            f"least-squares updates: off (--updates auto: {n:,} calibration tokens < {UPDATE_TOKENS:,}, where "
            f"they stop paying; --updates on forces them)")


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
    prepare(args.out, [t for t in (args.tasks or "").split(",") if t])
    return 0


def cmd_report(args) -> int:
    _, model, _ = _load(args)
    rep = report(model)
    print(rep)
    if args.json:
        _write_json(args.json, rep.to_dict())
    return 0


def _vocab_source(args, path: str) -> str | None:
    """--vocab-from, else the GGUF the model was compressed from (its compress_result.json's "model")."""
    if args.vocab_from:
        return args.vocab_from
    try:
        src = Path(json.loads((Path(path) / "compress_result.json").read_text())["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ggufs = [src] if src.suffix == ".gguf" else sorted(src.glob("*.gguf")) if src.is_dir() else []
    return str(ggufs[0]) if ggufs else None


def cmd_export(args) -> int:
    path = model_source(args.model)
    if args.format == "gguf":
        vocab = _vocab_source(args, path)
        out = gguf_target(args.out, vocab, args.overwrite, args.gguf_type, [path])    # before the model loads
    else:
        vocab, out = None, check_output_dir(args.out, args.overwrite, [path])          # before the model loads
    _, model, tok = _load(args, path)
    saved = save(model, out, tokenizer=tok, overwrite=args.overwrite, dtype=args.save_dtype, format=args.format,
                 vocab_from=vocab, gguf_type=args.gguf_type)
    if args.format == "gguf":
        print(f"wrote {saved} ({saved.stat().st_size / 1e6:,.1f} MB, {args.gguf_type}, vocabulary from {vocab})")
        return 0
    print(f"wrote {saved} ({_bytes_written(saved)})")
    if args.format == "hf":
        print(stock_summary(json.loads((Path(saved) / EXPORT_RECORD).read_text())))
    return 0


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("A3MOD_ONLINE") != "1":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # local paths only unless the user opts in
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "eval":
            return {"ppl": cmd_eval, "lm-eval": cmd_lm_eval}[args.what](args)
        return {"compress": cmd_compress, "report": cmd_report, "prepare-eval-data": cmd_prepare,
                "export": cmd_export}[args.cmd](args)
    except A3ModError as e:
        if args.debug:
            raise
        print(f"a3mod: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("a3mod: interrupted (outputs are as they were: partial work is never published)", file=sys.stderr)
        return 130



def _bytes_written(folder) -> str:
    """'N files, X MB (weights Y MB in DTYPE)' of a checkpoint folder."""
    files_ = [f for f in Path(folder).iterdir() if f.is_file()]
    total = sum(f.stat().st_size for f in files_)
    w = Path(folder) / "model.safetensors"
    dt = json.loads((Path(folder) / "config.json").read_text()).get("dtype", "?")
    return (f"{len(files_)} files, {total / 1e6:,.1f} MB"
            + (f" (weights {w.stat().st_size / 1e6:,.1f} MB, {dt})" if w.is_file() else ""))


def _overwrite(args):
    """--overwrite [--keep-other-files] as the `overwrite` argument of save / compress_streaming."""
    return KEEP_OTHERS if args.overwrite and args.keep_other_files else args.overwrite


if __name__ == "__main__":
    sys.exit(main())
