"""Peak memory and time of streaming A3 compression (a3mod.compress_streaming) against the in-memory path
(load_pretrained + apply + save), each in a fresh process; checks that both write the same checkpoint.

    python evals/bench_stream.py                                   # SmolLM2-135M (assets), 8 x 512 calibration
    python evals/bench_stream.py --model qwen2.5-coder-1.5b --n-samples 16 --modes stream,memory
    python evals/bench_stream.py --model /tmp/llama8b-shaped --modes stream --n-samples 4   # see bench_synthetic.py

Sources: a GGUF (the asset, the packaged Qwen2.5-Coder checkpoints) is streamed straight from the file, one tensor
dequantized at a time; the in-memory path loads it with transformers (dequantized whole). A safetensors folder is
read by both as it is. Peak RSS = VmHWM of the worker process (/proc/self/status), which includes the
Python/torch/transformers import; the "import" mode measures that floor. "forward s" is one forward pass of the
calibration windows through the original model (the memory worker times it before compressing): compression time
is reported relative to it. Each finished (model, mode, ratio, calibration) run is appended to
evals/results/stream_runs.jsonl and skipped when found there (resumable; --rerun forces); the table of every run
is written to evals/results/stream.{json,md}.
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
MODES = ("import", "memory", "stream", "stream-offload")


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(args) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    t0 = time.perf_counter()
    import torch

    import a3mod
    from a3mod.io.loading import load_tokenizer

    torch.manual_seed(0)
    res = {"mode": args.worker, "import_s": time.perf_counter() - t0}
    if args.worker != "import":
        tok = load_tokenizer(args.src)
        calib = a3mod.calibration_data(tok, "wikitext2", n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
        passes = a3mod.a3_passes(args.ratio)
        if args.worker == "memory":
            t = time.perf_counter()
            model, _ = a3mod.load_pretrained(args.src)
            res["load_s"] = time.perf_counter() - t
            res["forward_s"] = forward_s(model, calib)
            t = time.perf_counter()
            a3mod.apply(model, passes, calib=calib, progress=False)
            a3mod.save(model, args.out, overwrite=True)
        else:
            t = time.perf_counter()
            a3mod.compress_streaming(args.src, args.out, passes, calib, overwrite=True, progress=False,
                                     offload_dir=args.out + ".offload" if args.worker == "stream-offload" else None)
        res["compress_s"] = time.perf_counter() - t
    res["peak_rss_mib"] = vm_hwm_mib()
    print("RESULT " + json.dumps(res), flush=True)


def forward_s(model, calib) -> float:
    """Seconds of one forward pass of every calibration window (one at a time, no logits kept)."""
    import torch

    base = getattr(model, "base_model", model)
    t = time.perf_counter()
    with torch.no_grad():
        for ids in calib:
            base(ids[None])
    return time.perf_counter() - t


def run(mode: str, src: str, args, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--src", src, "--out", out, "--ratio", str(args.ratio),
           "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
    t = time.perf_counter()
    p = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, check=False)
    if p.returncode:
        sys.exit(f"{mode} failed:\n{p.stderr[-3000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[7:]), "process_s": time.perf_counter() - t}


def compare(a: Path, b: Path) -> dict:
    """Max relative difference of every tensor (tied aliases resolved) and whether the sidecars agree (their
    checksums and file lists aside)."""
    from safetensors.torch import load_file

    def tensors(p):
        side = json.loads((p / "a3mod.json").read_text())
        t = load_file(str(p / "model.safetensors"))
        t.update({k: t[v] for k, v in side.pop("aliases").items()})
        for k in ("files", "sha256", "extra"):
            side.pop(k, None)
        return t, side

    (ta, sa), (tb, sb) = tensors(a), tensors(b)
    worst = 0.0
    for k in tb:
        if k not in ta:
            continue
        if tb[k].is_floating_point() and tb[k].numel():
            worst = max(worst, ((ta[k] - tb[k]).abs().max() / tb[k].abs().max().clamp_min(1e-30)).item())
        elif not (ta[k] == tb[k]).all():
            worst = float("inf")
    return {"same_keys": ta.keys() == tb.keys(), "max_rel_diff": worst, "same_sidecar": sa == sb}


def fp32_mib(src: Path) -> float:
    """The model's parameters (tied once) in fp32, from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from a3mod.io.gguf_source import gguf_config, gguf_file

    g = gguf_file(src)
    config = gguf_config(g) if g is not None else AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in m.parameters()) * 4 / 2**20


def table(rows: list[dict]) -> str:
    names = {"import": "import only (floor)", "memory": "in memory (load_pretrained + apply + save)",
             "stream": "streaming", "stream-offload": "streaming, hidden states offloaded"}
    md = ("| model | fp32 weights MiB | calibration | path | peak RSS MiB | x fp32 weights | compress s | "
          "x one forward | code |\n|---|---|---|---|---|---|---|---|---|\n")
    fwd = {(r["model"], r["calib"]): r["forward_s"] for r in rows if r.get("forward_s")}
    for r in rows:
        f = fwd.get((r["model"], r["calib"]))
        rel = f"{r['compress_s'] / f:.2f}" if f and r.get("compress_s") else "-"
        md += (f"| {r['model']} | {r['fp32_mib']:.0f} | {r['calib']} | {names[r['mode']]} | "
               f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / r['fp32_mib']:.2f} | "
               f"{r.get('compress_s', 0):.1f} | {rel} | {r.get('commit', '')} {r.get('note', '')} |\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="packaged name, asset folder or path (default: the asset model)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--keep", action="store_true", help="keep the outputs in /tmp/a3mod-bench-stream/<model> (a "
                    "later run compares its stream outputs with a kept in-memory one)")
    ap.add_argument("--rerun", action="store_true", help="measure again runs found in stream_runs.jsonl")
    ap.add_argument("--note", default="", help="what this run measures (shown in the table; e.g. a code change)")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from common import append_jsonl, asset_models, machine, model_label, read_jsonl, write_results

    src = asset_models([args.model] if args.model else None)[0]
    label, calib = model_label(src), f"{args.n_samples} x {args.seq_len}"
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - set(MODES):
        sys.exit(f"--modes: {sorted(set(modes) - set(MODES))} not in {MODES}")
    log = Path(args.results) / "stream_runs.jsonl"
    done = {(r["model"], r["mode"], r["ratio"], r["calib"]) for r in read_jsonl(log)}
    tmp = Path("/tmp/a3mod-bench-stream") / label
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    base = {"model": label, "ratio": args.ratio, "calib": calib, "fp32_mib": fp32_mib(src), "machine": machine(),
            "commit": commit, "note": args.note}
    for mode in modes:
        if (label, mode, args.ratio, calib) in done and not args.rerun:
            print(f"{label} {mode}: in {log.name}, skipped", file=sys.stderr)
            continue
        print(f"{label} {mode} ...", file=sys.stderr, flush=True)
        row = {**base, **run(mode, str(src), args, str(tmp / mode))}
        append_jsonl(log, row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    checks = Path(args.results) / "stream_checks.jsonl"
    for mode in ("stream", "stream-offload"):
        if (tmp / mode / "a3mod.json").exists() and (tmp / "memory" / "a3mod.json").exists():
            append_jsonl(checks, {"model": label, "mode": mode, "ratio": args.ratio, "calib": calib,
                                  **compare(tmp / mode, tmp / "memory")})
    if not args.keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    rows = read_jsonl(log)
    md = (f"A3 at the ratio shown, WikiText-2 calibration windows (validation split), each path in a fresh process; "
          f"{machine()}, 2 cores shared with other jobs (wall times are upper bounds). Peak RSS = VmHWM, imports "
          f"included.\n\n" + table(rows))
    same = [f"{c['model']} {c['mode']} ({c['calib']}): max relative tensor difference to in memory "
            f"{c['max_rel_diff']:.3g}, same keys {c['same_keys']}, same sidecar {c['same_sidecar']}"
            for c in read_jsonl(checks)]
    write_results(args.results, "stream", {"runs": log.name, "checks": read_jsonl(checks)}, rows,
                  md + ("\n" + "; ".join(same) + "\n" if same else ""))


if __name__ == "__main__":
    main()
