"""Discovery, part 4: the architecture card (`Discovery.summary`)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .types import Discovery, LayerDiscovery

# -------------------------------------------------------------------------------------- summary


def layer_lines(d: LayerDiscovery) -> list[str]:
    if d.qkv_layout is None:
        qkv = f"q {d.q.card_text()}, k {d.k.card_text()}, v {d.v.card_text()}"
    else:
        qkv = f"fused {d.q.module} ({d.qkv_layout}: q {d.heads}x{d.head_dim}, k/v {d.kv_heads}x{d.head_dim})" + (
            " +bias" if d.q.bias else "")
    rope = "no RoPE" if not d.rope else (
        f"RoPE {d.rope}, {d.rot_dim}/{d.head_dim} dims" + (" (partial rotary)" if d.rot_dim < d.head_dim else "")
        + f", cos/sin from {d.rope_source}")
    if d.up is None:
        mlp = "none besides the routed experts"
    elif d.gate is None:
        mlp = f"plain: {d.up.card_text()} -> {d.act} -> {d.down.card_text()}"
    elif d.gate_up_layout is not None:
        mlp = f"gated, fused {d.up.module} {d.gate_up_layout} -> {d.act}(gate) * up -> {d.down.card_text()}"
    else:
        mlp = f"gated: {d.act}({d.gate.card_text()}) * {d.up.card_text()} -> {d.down.card_text()}"
    norms = ", ".join(f"{k} {v}" for k, v in (("pre-attn", d.input_norm), ("attn-out", d.attn_out_norm),
                                                ("pre-MLP", d.mlp_norm), ("MLP-out", d.mlp_out_norm),
                                                ("output", d.output_norm)) if v)
    extra = [f"softcap {d.softcap:g}"] if d.softcap else []
    if d.out_gate:
        extra.append(f"sigmoid output gate from {'the q projection' if d.out_gate == 'q' else d.out_gate}".replace(
            "#head", " (one per head)"))
    if d.q_norm:
        extra.append(f"q/k norm {d.q_norm}/{d.k_norm} over {'each head' if d.qk_norm_scope == 'head' else 'all heads'}")
    return [
        f"  attention  {d.attention_kind} ({d.heads} heads, {d.kv_heads} kv heads, head_dim {d.head_dim}"
        + (f", v head_dim {d.v_head_dim}" if d.v_head_dim != d.head_dim else "") + f"), {d.attention_op}, "
        + {True: "causal, ", None: "masked, ",
           False: "unmasked, "}[d.causal] + f"scale {d.scale:.6g}" + "".join(f", {e}" for e in extra),
        f"  q/k/v      {qkv}",
        f"  positions  {rope}",
        f"  output     {d.o.card_text()}",
        f"  mlp        {mlp}" + ("" if d.up is None else f" (intermediate {d.intermediate}, activation "
        f"{'from config.' + d.act_config if d.act_config else repr(d.act_name) + ' (no config attribute)'})"),
        *([f"  experts    {d.num_experts} routed experts {d.experts} in {d.moe}"
           + (f", shared expert {d.shared} (the mlp line)" if d.shared else "")] if d.moe else []),
        f"  norms      {norms or 'none'}",
        f"  residual   {'parallel (attention and MLP read the same input)' if d.parallel_residual else 'sequential'}",
        f"  biases     {', '.join(d.biases) or 'none'}",
    ]


def summary_text(r: Discovery, evidence: bool = False) -> str:
    first = r.layers[0]
    lines = [f"{r.model_type or '?'}: {len(r.layers)} x {first.layer_class} at {r.layers_path}, hidden {first.hidden}"
             + (f", rotary module {r.rotary}" if r.rotary else "")
             + f" (discovered from {r.exported} exported layer(s) in {r.seconds:.2f} s)"]
    shown = set()
    for d in r.layers:
        key = d.same_as if d.same_as is not None else d.index
        if key in shown:
            continue
        shown.add(key)
        same = [e.index for e in r.layers if (e.same_as if e.same_as is not None else e.index) == key]
        lines.append(f"layers {_ranges(same)}:")
        lines.append(d.summary(evidence))
    if r.left:
        lines.append(f"layers {_ranges(sorted(r.left))}: left as they are (no attention op: a hybrid's mixer layers)")
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)
