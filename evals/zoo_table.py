"""The zoo table: what a3mod does with every decoder-only causal-LM type of the installed transformers.

Runs tests/zoo.py's `check_type` on a tiny random model of each type (the same checks as tests/test_zoo.py:
full-rank equivalence, 30% finite and on target, cached generate == uncached, save/load; or a typed refusal)
and writes evals/results/zoo.{json,md,csv}; `--update-readme` puts the table into the README's support section.

    python evals/zoo_table.py [--types llama glm ...] [--update-readme]
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import io
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch
import transformers

from common import atomic_write, machine, update_readme, write_results
from zoo import check_type, zoo_types


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="*", help="model types to check (default: the whole zoo)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    ap.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--merge", action="store_true",
                    help="with --types: replace only those rows of the existing zoo.json (the others are kept)")
    args = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in args.types or zoo_types():
            t0 = time.perf_counter()
            r = check_type(t, tmp)
            rows.append({"model_type": t, "status": r.status, "detail": r.detail,
                         "seconds": round(time.perf_counter() - t0, 2)})
            print(f"{t:28s} {r.status:10s} {r.detail[:100]}", file=sys.stderr)
    if args.merge:
        done = {r["model_type"]: r for r in rows}
        prev = json.loads((Path(args.out) / "zoo.json").read_text())["rows"]
        rows = [done.pop(r["model_type"], r) for r in prev] + list(done.values())
        rows.sort(key=lambda r: r["model_type"])
    counts = collections.Counter(r["status"] for r in rows)
    head = (f"transformers {transformers.__version__}: {len(rows)} decoder-only causal-LM types; "
            + ", ".join(f"{counts[s]} {s}" for s in ("compressed", "refused", "not run")) + ".\n\n")
    md = head + "| model type | result | detail |\n|---|---|---|\n" + "".join(
        f"| {r['model_type']} | {r['status']} | {r['detail'].replace('|', '/')} |\n" for r in rows)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "machine": machine(),
            "counts": dict(counts)}
    out = write_results(args.out, "zoo", meta, rows, md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "zoo.csv", buf.getvalue())
    if args.update_readme:
        update_readme(md, "zoo-results")


if __name__ == "__main__":
    main()
