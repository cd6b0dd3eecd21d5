"""Peak memory of streaming A3 compression (a3mod.compress_streaming) against the in-memory path (load_pretrained +
apply + save) on the asset model, each in a fresh process; checks that both write the same checkpoint.

    python evals/bench_stream.py [--ratio 0.2 --n-samples 8 --seq-len 512 --src /tmp/smollm2-fp32-st]

The asset model (a GGUF) is converted once to an fp32 safetensors folder (--src), which both paths read.
Peak RSS = VmHWM of the worker process (/proc/self/status), which includes the Python/torch/transformers
import; the "import only" row measures that floor. Writes evals/results/stream.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(args) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoTokenizer

    import a3mod

    torch.manual_seed(0)
    t_import = time.perf_counter() - t0
    res = {"mode": args.worker, "import_s": t_import}
    if args.worker != "import":
        tok = AutoTokenizer.from_pretrained(args.src, trust_remote_code=False)
        calib = a3mod.calibration_data(tok, "wikitext2", n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
        passes = a3mod.a3_passes(args.ratio)
        t = time.perf_counter()
        if args.worker == "memory":
            model, _ = a3mod.load_pretrained(args.src)
            a3mod.apply(model, passes, calib=calib, progress=False)
            a3mod.save(model, args.out, overwrite=True)
        else:
            a3mod.compress_streaming(args.src, args.out, passes, calib, overwrite=True, progress=False,
                                     offload_dir=args.out + ".offload" if args.worker == "stream-offload" else None)
        res["compress_s"] = time.perf_counter() - t
    res["peak_rss_mib"] = vm_hwm_mib()
    print("RESULT " + json.dumps(res), flush=True)


def convert(asset: Path, src: Path) -> None:
    """The GGUF asset dequantized to fp32 and saved as an HF safetensors folder (once)."""
    import a3mod

    model, tok = a3mod.load_pretrained(str(asset))
    model.hf_quantizer = None                      # the weights are dequantized fp32; transformers refuses to save
    if hasattr(model.config, "quantization_config"):    # while the GGUF loader's quantizer is attached
        del model.config.quantization_config
    model.save_pretrained(src)
    tok.save_pretrained(src)


def run(mode: str, args, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--src", args.src, "--out", out, "--ratio", str(args.ratio),
           "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)]
    t = time.perf_counter()
    p = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, check=False)
    if p.returncode:
        sys.exit(f"{mode} failed:\n{p.stderr[-3000:]}")
    line = next(l for l in p.stdout.splitlines() if l.startswith("RESULT "))
    return {**json.loads(line[7:]), "process_s": time.perf_counter() - t}


def compare(a: str, b: str) -> dict:
    """Max relative difference of every tensor (tied aliases resolved) and whether the sidecars agree."""
    from safetensors.torch import load_file

    def tensors(p):
        side = json.loads((Path(p) / "a3mod.json").read_text())
        t = load_file(str(Path(p) / "model.safetensors"))
        t.update({k: t[v] for k, v in side.pop("aliases").items()})
        return t, side

    (ta, sa), (tb, sb) = tensors(a), tensors(b)
    worst = 0.0
    for k in tb:
        if tb[k].is_floating_point() and tb[k].numel():
            worst = max(worst, ((ta[k] - tb[k]).abs().max() / tb[k].abs().max().clamp_min(1e-30)).item())
        elif not (ta[k] == tb[k]).all():
            worst = float("inf")
    return {"same_keys": ta.keys() == tb.keys(), "max_rel_diff": worst, "same_sidecar": sa == sb}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default="/tmp/smollm2-fp32-st", help="fp32 safetensors folder (made once from the asset)")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from common import asset_models, machine, write_results
    from safetensors import safe_open

    asset = asset_models()[0]
    src = Path(args.src)
    if not (src / "config.json").exists():
        print(f"converting {asset.name} -> {src}", file=sys.stderr)
        convert(asset, src)
    fp32 = 0
    for f in src.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            fp32 += sum(math.prod(h.get_slice(k).get_shape()) * 4 for k in h.keys())     # fp32: 4 bytes each
    tmp = Path("/tmp/a3mod-bench-stream")
    rows = [run("import", args, "")]
    for mode in ("memory", "stream", "stream-offload"):
        rows.append(run(mode, args, str(tmp / mode)))
    check = {m: compare(str(tmp / m), str(tmp / "memory")) for m in ("stream", "stream-offload")}
    floor = rows[0]["peak_rss_mib"]
    for r in rows:
        r["above_import_mib"] = r["peak_rss_mib"] - floor
    meta = {"model": asset.name, "src": str(src), "fp32_model_mib": fp32 / 2**20, "ratio": args.ratio,
            "calib": f"{args.n_samples} x {args.seq_len}", "machine": machine(), "identical_to_in_memory": check}
    md = (f"{asset.name} (fp32 weights {fp32 / 2**20:.0f} MiB), A3 {args.ratio:.0%}, calibration {args.n_samples} x "
          f"{args.seq_len} WikiText-2 tokens; {machine()}, 2 cores shared with other jobs (wall times are upper "
          f"bounds). Peak RSS = VmHWM of a fresh process, imports included.\n\n"
          "| path | peak RSS MiB | above import MiB | compress s |\n|---|---|---|---|\n")
    names = {"import": "import only (floor)", "memory": "in memory (load_pretrained + apply + save)",
             "stream": "streaming", "stream-offload": "streaming, hidden states offloaded"}
    for r in rows:
        md += (f"| {names[r['mode']]} | {r['peak_rss_mib']:.0f} | {r['above_import_mib']:.0f} | "
               f"{r.get('compress_s', 0):.1f} |\n")
    md += "\n" + "; ".join(f"{m} vs in memory: max relative tensor difference {c['max_rel_diff']:.3g}, same keys "
                           f"{c['same_keys']}, same sidecar {c['same_sidecar']}" for m, c in check.items()) + "\n"
    write_results(args.results, "stream", meta, rows, md)


if __name__ == "__main__":
    main()
