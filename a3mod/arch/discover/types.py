"""Discovery results: `Role`, `LayerDiscovery` (one decoder layer) and `Discovery` (the model)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .summary import layer_lines, summary_text
from .tospec import spec_from_discovery


# ---------------------------------------------------------------------------------------- result types
@dataclass(frozen=True)
class Role:
    """A role (q, k, v, o, gate, up, down) and the linear that plays it."""

    module: str                                  # linear's path from the layer, e.g. "self_attn.q_proj"
    bias: bool
    conv1d: bool                                 # weight stored (in, out) (GPT-2 Conv1D / addmm)
    channels: tuple[int, ...] = dataclasses.field(default=(), repr=False)   # its output channels, role order
    width: int = 0                               # the linear's output features

    def card_text(self) -> str:
        c = self.channels
        span = "" if not c or list(c) == list(range(self.width)) else (
            f" [{c[0]}:{c[-1] + 1}]" if list(c) == list(range(c[0], c[-1] + 1)) else " (strided rows)")
        return f"{self.module}{span}" + (" +bias" if self.bias else "")


@dataclass(frozen=True)
class LayerDiscovery:
    """What discovery found in one decoder layer, and how (`found` lists the evidence)."""

    index: int
    layer_class: str
    hidden: int
    q: Role
    k: Role
    v: Role
    o: Role
    qkv_layout: str | None          # None (separate q/k/v), "blocks" ([q|k|v]), "per_head" ((H, 3, d_h)), "other"
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    attention_op: str               # "sdpa" or "eager"
    causal: bool | None
    scale: float                    # effective score scale (query/key pre-scaling included)
    softcap: float | None
    rope: str | None                # "rotate_half", "interleaved", "other" or None
    rot_dim: int
    rope_source: str | None         # "position_embeddings" (the layer's cos/sin input) or "inside the layer"
    q_norm: str | None              # q/k norm modules (paths from the layer) and their scope
    k_norm: str | None
    qk_norm_scope: str | None       # "head" (over d_h) or "all" (over the whole projection)
    gate: Role | None
    up: Role | None                 # None: an MoE layer without a shared expert (no dense MLP)
    down: Role | None
    gate_up_layout: str | None      # fused gate/up: "[gate|up]", "[up|gate]", "other"; None when separate
    act: str                        # activation module class (or ATen ops when called functionally)
    act_config: str | None          # config attribute naming that activation
    input_norm: str | None          # norm feeding the attention projections / MLP input projections
    mlp_norm: str | None
    attn_out_norm: str | None       # norms on the attention / MLP output before the residual add (sandwich)
    mlp_out_norm: str | None
    output_norm: str | None         # norm on the layer output (post-LN encoders)
    parallel_residual: bool
    attn_dropout_module: str | None = None  # output dropouts (paths from the layer)
    mlp_dropout_module: str | None = None
    scaling_attr: float | None = None       # the attention module's own `scaling` attribute, if any
    softcap_attr: str | None = None         # the attention-module attribute holding the softcap value
    act_name: str | None = None     # the activation's ACT2FN name when no config attribute names it
    same_as: int | None = None      # this layer has the structure of layer `same_as` and was not exported again
    moe: str | None = None          # mixture of experts: the block (path from the layer) holding the routed experts
    experts: str | None = None      # ... the experts module (3-D parameters; path from the layer)
    shared: str | None = None       # ... the block's shared-expert MLP, whose roles gate / up / down describe
    num_experts: int = 0
    out_gate: str | None = None     # output gate attn_out * sigmoid(gate): "q" (in the q projection), its path (with
                                    # "#head" when it is one gate per head, "@softplus" for another function), None
    found: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    @property
    def attention_kind(self) -> str:
        return "MHA" if self.kv_heads == self.heads else "MQA" if self.kv_heads == 1 else "GQA"

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def attn_module(self) -> str:
        return common_parent([self.q.module, self.k.module, self.v.module])

    @property
    def mlp_module(self) -> str | None:
        """The module holding the dense MLP's (or the shared expert's) linears; None when there is none."""
        if self.up is None:
            return None
        return common_parent([r.module for r in (self.gate, self.up, self.down) if r is not None])

    @property
    def biases(self) -> tuple[str, ...]:
        roles = dict(q=self.q, k=self.k, v=self.v, o=self.o, gate=self.gate, up=self.up, down=self.down)
        return tuple(n for n, r in roles.items() if r is not None and r.bias)

    @property
    def intermediate(self) -> int:
        return len(self.up.channels) if self.up is not None else 0

    def summary(self, evidence: bool = False) -> str:
        return "\n".join(layer_lines(self) + ([f"  how        {e}" for e in self.found] if evidence else []))


@dataclass(frozen=True)
class Discovery:
    """Discovery result for a whole model: one `LayerDiscovery` per decoder layer."""

    model_type: str | None
    layers_path: str
    rotary: str | None               # path (from the model) of the module producing the layers' (cos, sin)
    layers: tuple[LayerDiscovery, ...]
    exported: int                    # how many layers were exported (the rest share their structure)
    seconds: float
    rope_table: str | None = None    # layout of the (cos, sin) passed in: "half", "interleaved" (None: none seen)
    left: dict = dataclasses.field(default_factory=dict)   # layer index -> why it has no attention (hybrid mixers)

    def summary(self, evidence: bool = False) -> str:
        """An architecture card; `evidence=True` adds how each role was found (the graph ops followed)."""
        return summary_text(self, evidence)

    def __str__(self) -> str:
        return self.summary()

    def to_spec(self):
        """An `arch.ArchSpec` for this model, or a `DiscoveryError` naming what does not fit its fields."""
        return spec_from_discovery(self)



def common_parent(paths: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        common.append(xs[0])
    return ".".join(common)
