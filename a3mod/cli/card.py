"""The model card (README.md) and the per-layer kept-dims plot `a3mod compress` writes beside a checkpoint."""
from __future__ import annotations

import io

from ..report import Report


def model_card(result: dict, rep: Report) -> str:
    """Markdown: what was compressed, how, the result, and how to load it (transformers or a3mod)."""
    cal = result.get("calibration", {})
    v = result.get("versions", {})
    lines = [
        "---", "library_name: transformers", "tags: [a3mod, compressed, low-rank]", "---", "",
        f"# {result.get('model', '?')} compressed with a3mod ({result.get('method', '?')})", "",
        f"{100 * rep.ratio:.2f}% of the decoder-layer linear parameters removed ({rep.params_orig:,} -> "
        f"{rep.params:,}); KV cache x{rep.kv_bytes_per_token() / max(1, rep.kv_bytes_per_token(True)):.4f}; FLOPs "
        f"per token x{rep.flops_per_token() / max(1, rep.flops_per_token(True)):.4f} at context {rep.context}.",
        "",
    ]
    if "ppl_before" in result and "ppl_after" in result:
        b, a = result["ppl_before"], result["ppl_after"]
        lines += [f"Token perplexity on {result.get('eval_source', 'the evaluation text')} "
                  f"({a['windows']} x {a['seq_len']} tokens): {b['ppl']:.4f} -> {a['ppl']:.4f}.", ""]
    lines += [
        "## Load", "",
        "```python",
        "import a3mod                      # registers model type \"a3mod\" with transformers",
        "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(\"<this folder>\")    # or a3mod.load(...): checksums verified",
        "```", "",
        "Without `pip install a3mod`, transformers refuses the folder (unknown model type `a3mod`).", "",
        "## How it was made", "",
        f"- passes: {', '.join(result.get('passes', []))}",
        f"- calibration: {cal.get('source')} ({cal.get('n_samples')} x {cal.get('seq_len')} tokens, "
        f"seed {cal.get('seed')})",
        f"- versions: {', '.join(f'{k} {x}' for k, x in v.items())}",
        f"- command: `a3mod {' '.join(result.get('argv', []))}`", "",
        "## Per-layer kept dims", "",
        "| layer | qk | vo | mlp | params |", "|---|---|---|---|---|",
    ]
    for r in rep.rows:
        if r.left:
            lines.append(f"| {r.layer} | - | - | - | {r.params:,} (left: {r.left}) |")
        elif r.mixer:
            lines.append(f"| {r.layer} | - | - | {r.mlp_orig}->{r.mlp_dim} | {r.params_orig:,}->{r.params:,} (mixer "
                         f"kept: {r.mixer}) |")
        else:
            lines.append(f"| {r.layer} | {r.head_dim if r.qk_orig < 0 else r.qk_orig}->{r.qk_dim} | "
                         f"{r.head_dim if r.vo_orig < 0 else r.vo_orig}->{r.vo_dim} | {r.mlp_orig}->{r.mlp_dim} | "
                         f"{r.params_orig:,}->{r.params:,} |")
    return "\n".join(lines) + "\n"


def kept_dims_plot(rep: Report) -> bytes | None:
    """PNG of the kept fraction of each component per layer; None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rep.rows if not r.left and not r.mixer]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = [r.layer for r in rows]
    for name, kept, full in (("qk", "qk_dim", "qk_orig"), ("vo", "vo_dim", "vo_orig"), ("mlp", "mlp_dim", "mlp_orig")):
        ys = [getattr(r, kept) / max(1, getattr(r, full) if getattr(r, full) >= 0 else r.head_dim) for r in rows]
        ax.plot(x, ys, marker="o", ms=3, label=name)
    if any(r.experts for r in rows):
        ax.plot(x, [r.expert_dim / max(1, r.expert_orig) for r in rows], marker="s", ms=3, label="experts")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept / original")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{rep.model_type}: {100 * rep.ratio:.1f}% of layer params removed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
