"""Graph discovery: which parameters of each decoder layer play which role, read from its computation graph.

`discover(model)` runs the model once on a few tokens (sdpa attention where the model has it), captures the
arguments each decoder layer receives (forward pre-hook) and exports one layer of every distinct structure
with `torch.export` (non-strict). It then follows the dataflow of the exported ATen graph:

    attention op    aten.scaled_dot_product_attention, or matmul -> softmax -> matmul (eager); the ops between
                    the score matmul and the softmax give the scale and a tanh softcap
    q / k / v       walk back from the op's query/key/value inputs to the linear that produces each
                    (aten.linear / addmm / mm on a parameter; parameter names come from the graph signature).
                    Which output channels of that linear make each head is found by *replaying* the ops in
                    between on channel-index tensors: view/transpose/split/slice/cat/... run for real, an
                    elementwise op keeps the index of its shallower indexed operand. This reads fused layouts
                    ([q|k|v] blocks, GPT-NeoX's per-head (H, 3, d_h)), GQA groups (enable_gqa or repeat_kv)
    RoPE            an add of two indexed operands that disagree (x*cos + rotate(x)*sin) pairs the channels:
                    d <-> d + r/2 is rotate_half, 2j <-> 2j+1 interleaved; r = the rotary dims (partial rotary)
    q/k norm        a normalisation (reduction or layer_norm op) between the projection and the attention op;
                    over one head's d_h ("head") or over the whole projection ("all")
    o               the linear the attention output flows into; its input must be the head-major concat
    MLP             down = the linear other than o whose output reaches the layer output through the residual
                    adds; the linears feeding its input are gate (through the activation) and up, or one fused
                    gate_up (the replay tells the halves apart); the activation is read from the module stack
    residual        parallel when the MLP input does not depend on the attention output

`Discovery.to_spec()` turns the result into an `arch.ArchSpec` when the layout fits ArchSpec's fields;
`arch.spec_for` uses that for model types without an explicit adapter.

Files: graph.py (the exported graph, channel replay), roles.py (attention op, q/k/v, RoPE, norms, MLP),
describe.py (a layer's LayerDiscovery; discover(model)), summary.py (architecture card), tospec.py
(Discovery.to_spec), fallback.py (the spec_for fallback), types.py (result types).
"""
from __future__ import annotations

from .describe import discover
from .fallback import clear_spec_cache, discovered_spec
from .types import Discovery, LayerDiscovery, Role

__all__ = ["discover", "Discovery", "LayerDiscovery", "Role", "discovered_spec", "clear_spec_cache"]
