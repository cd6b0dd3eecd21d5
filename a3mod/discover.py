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
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .errors import DiscoveryError

# ------------------------------------------------------------------------------------------ op classes
_LAYOUT = frozenset({
    "view", "_unsafe_view", "reshape", "transpose", "permute", "t", "slice", "select", "split", "split_with_sizes",
    "chunk", "unbind", "unsqueeze", "squeeze", "expand", "flatten", "unflatten", "narrow", "cat", "stack",
    "repeat_interleave", "repeat", "movedim", "view_as", "expand_as", "flip", "roll", "unfold"})
_IDENTITY = frozenset({"to", "_to_copy", "type_as", "clone", "contiguous", "alias", "detach", "lift_fresh_copy",
                       "dropout", "feature_dropout", "alpha_dropout", "float", "double", "half", "bfloat16"})
_ACTIVATION = frozenset({"silu", "gelu", "relu", "sigmoid", "tanh", "erf", "softplus", "mish", "elu", "leaky_relu",
                         "hardswish", "hardsigmoid", "relu6", "hardtanh", "glu", "celu", "selu", "quick_gelu"})
_ELEMENTWISE = _ACTIVATION | frozenset({
    "add", "sub", "rsub", "mul", "div", "true_divide", "neg", "pow", "rsqrt", "sqrt", "exp", "abs", "reciprocal",
    "square", "where", "clamp", "clamp_min", "clamp_max", "masked_fill", "maximum", "minimum", "sin", "cos"})
_NORM_OPS = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm"})
_REDUCE = frozenset({"mean", "sum", "var", "var_mean", "std", "amax", "amin", "norm", "linalg_vector_norm",
                     "logsumexp", "max", "min", "prod"})
_SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
_MATMUL = frozenset({"matmul", "bmm", "baddbmm", "einsum"})


def _opname(n: fx.Node) -> str:
    if n.op != "call_function":
        return n.op
    t = n.target
    name = getattr(t, "_opname", None) or getattr(t, "__name__", str(t))
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _module_path(n: fx.Node) -> tuple[str, str] | None:
    """(path from the exported layer, class name) of the innermost module that produced `n`."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    path = path.replace("L['self'].", "").replace("L__self___", "")
    return path, (cls if isinstance(cls, str) else cls.__qualname__).rsplit(".", 1)[-1]


def _users(n: fx.Node) -> list[fx.Node]:
    """Users that compute something (not torch.export's metadata asserts, not the graph output)."""
    return [u for u in n.users if u.op != "output" and not _opname(u).startswith("_assert")]


def _shape(n: fx.Node):
    v = n.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _arg(n: fx.Node, pos: int, name: str, default=None):
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)


# ---------------------------------------------------------------------------------------- result types
@dataclass(frozen=True)
class Role:
    """A role (q, k, v, o, gate, up, down) and the linear that plays it."""

    module: str                                  # linear's path from the layer, e.g. "self_attn.q_proj"
    bias: bool
    conv1d: bool                                 # weight stored (in, out) (GPT-2 Conv1D / addmm)
    channels: tuple[int, ...] = dataclasses.field(default=(), repr=False)   # its output channels, role order
    width: int = 0                               # the linear's output features

    def describe(self) -> str:
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
    up: Role
    down: Role
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
    same_as: int | None = None      # this layer has the structure of layer `same_as` and was not exported again
    found: tuple[str, ...] = dataclasses.field(default=(), repr=False)

    @property
    def attention_kind(self) -> str:
        return "MHA" if self.kv_heads == self.heads else "MQA" if self.kv_heads == 1 else "GQA"

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def attn_module(self) -> str:
        return _common_parent([self.q.module, self.k.module, self.v.module])

    @property
    def mlp_module(self) -> str:
        return _common_parent([r.module for r in (self.gate, self.up, self.down) if r is not None])

    @property
    def biases(self) -> tuple[str, ...]:
        roles = dict(q=self.q, k=self.k, v=self.v, o=self.o, gate=self.gate, up=self.up, down=self.down)
        return tuple(n for n, r in roles.items() if r is not None and r.bias)

    @property
    def intermediate(self) -> int:
        return len(self.up.channels)

    def summary(self, evidence: bool = False) -> str:
        return "\n".join(_layer_lines(self) + ([f"  how        {e}" for e in self.found] if evidence else []))


@dataclass(frozen=True)
class Discovery:
    """Discovery result for a whole model: one `LayerDiscovery` per decoder layer."""

    model_type: str | None
    layers_path: str
    rotary: str | None               # path (from the model) of the module producing the layers' (cos, sin)
    layers: tuple[LayerDiscovery, ...]
    exported: int                    # how many layers were exported (the rest share their structure)
    seconds: float

    def summary(self, evidence: bool = False) -> str:
        """An architecture card; `evidence=True` adds how each role was found (the graph ops followed)."""
        return _summary(self, evidence)

    def __str__(self) -> str:
        return self.summary()

    def to_spec(self):
        """An `arch.ArchSpec` for this model, or a `DiscoveryError` naming what does not fit its fields."""
        return _to_spec(self)


# --------------------------------------------------------------------------------------------- graph
@dataclass
class _Lin:
    node: fx.Node
    x: fx.Node
    path: str
    conv1d: bool
    bias: bool
    out: int


class _Graph:
    """An exported layer's graph with parameter names, linear ops and reachability helpers."""

    def __init__(self, ep, index: int):
        self.index = index
        self.nodes = list(ep.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        sig = ep.graph_signature
        self.params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        self.user_inputs = [n for n in self.nodes if n.op == "placeholder" and n.name in set(sig.user_inputs)]
        self.linears = {n: lin for n in self.nodes if (lin := self._as_linear(n)) is not None}
        self.output = next(n for n in self.nodes if n.op == "output")

    def _param(self, n) -> tuple[str | None, int]:
        """(parameter name, number of transposes) behind a weight operand."""
        flips = 0
        while isinstance(n, fx.Node) and n.op == "call_function":
            op = _opname(n)
            if op in ("t", "transpose", "permute"):
                flips += 1
            elif op not in _IDENTITY:
                return None, 0
            n = n.args[0]
        return (self.params.get(n.name) if isinstance(n, fx.Node) else None), flips

    def _as_linear(self, n: fx.Node) -> _Lin | None:
        op = _opname(n)
        if op == "linear":
            x, w, b = n.args[0], n.args[1], _arg(n, 2, "bias")
            name, flips = self._param(w)
            conv1d = flips % 2 == 1
        elif op in ("addmm", "mm", "matmul"):
            (b, x, w) = n.args[:3] if op == "addmm" else (None, *n.args[:2])
            name, flips = self._param(w)
            conv1d = flips % 2 == 0
        else:
            return None
        if name is None or not isinstance(x, fx.Node):
            return None
        bias = isinstance(b, fx.Node) and self.params.get(b.name) is not None
        return _Lin(n, x, name.rsplit(".", 1)[0], conv1d, bias, _shape(n)[-1])

    def ancestors(self, n: fx.Node) -> set:
        seen, todo = set(), [n]
        while todo:
            for a in todo.pop().all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    todo.append(a)
        return seen

    def descendants(self, n: fx.Node) -> set:
        seen, todo = set(), [n]
        while todo:
            for u in todo.pop().users:
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
        return seen

    def producers(self, n: fx.Node) -> list[_Lin]:
        """The linears nearest upstream of `n` (the walk stops at each linear and at placeholders)."""
        found, seen, todo = [], {n}, [n]
        while todo:
            cur = todo.pop(0)
            if cur is not n and cur in self.linears:
                found.append(self.linears[cur])
                continue
            for a in cur.all_input_nodes:
                if a not in seen and a.name not in self.params:
                    seen.add(a)
                    todo.append(a)
        return sorted(found, key=lambda lin: self.order[lin.node])

    def consumers(self, n: fx.Node) -> list[_Lin]:
        """The linears nearest downstream of `n` that take it (through other ops) as their input."""
        found, seen, todo = [], {n}, [n]
        while todo:
            cur = todo.pop(0)
            for u in cur.users:
                if u in seen:
                    continue
                seen.add(u)
                if u in self.linears and self.linears[u].x is cur:
                    found.append(self.linears[u])
                elif u.op != "output":
                    todo.append(u)
        return sorted(found, key=lambda lin: self.order[lin.node])

    def between(self, src: fx.Node, dst: fx.Node) -> list[fx.Node]:
        """Nodes on some path src -> dst (both included), in graph order."""
        keep = (self.descendants(src) & self.ancestors(dst)) | {src, dst}
        return sorted(keep, key=self.order.__getitem__)

    def err(self, msg: str) -> DiscoveryError:
        return DiscoveryError(f"layer {self.index}: {msg}")


# ------------------------------------------------------------------------------------ channel replay
@dataclass
class _Idx:
    t: Any              # int64 tensor of source channels (-1: not from the source), or a list of them
    depth: int
    act: bool = False   # passed through an activation


@dataclass
class _Trace:
    value: _Idx | None = None
    nodes: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)     # (node, kept _Idx, other _Idx): disagreeing operands
    norms: list = dataclasses.field(default_factory=list)      # (node, normalised width)
    scalars: list = dataclasses.field(default_factory=list)    # constant factors applied to the indexed value
    unknown: list = dataclasses.field(default_factory=list)    # ops the replay cannot follow


def _channels(n: fx.Node) -> torch.Tensor:
    """Channel indices of a linear's output: (..., out) filled with arange(out) along the last dim."""
    shape = _shape(n)
    return torch.arange(shape[-1]).expand(shape)


def _replay(g: _Graph, src: fx.Node, init: torch.Tensor, dst: fx.Node) -> _Trace:
    """Follow the channels of `src` (index tensor `init`) through every op on the way to `dst`."""
    tr = _Trace(nodes=g.between(src, dst))
    vals = {src: _Idx(init, 0)}
    for n in tr.nodes[1:]:
        if any(vals.get(a) is not None for a in n.all_input_nodes):
            vals[n] = _step(n, vals, tr)
    tr.value = vals.get(dst)
    return tr


def _step(n: fx.Node, vals: dict, tr: _Trace) -> _Idx | None:
    op = _opname(n)
    if op == "getitem":
        v = vals.get(n.args[0])
        return None if v is None or not isinstance(v.t, (list, tuple)) else _Idx(v.t[n.args[1]], v.depth, v.act)
    if op in _IDENTITY:
        v = vals.get(n.args[0])
        return None if v is None else _Idx(v.t, v.depth + 1, v.act)
    if op in _LAYOUT:
        return _layout(n, vals, tr)
    if op in _ELEMENTWISE or op in _NORM_OPS:
        return _elementwise(n, op, vals, tr)
    if op not in _REDUCE and op not in _SOFTMAX:
        tr.unknown.append(n)
    elif op in _REDUCE:
        src = n.args[0]
        tr.norms.append((n, _shape(src)[-1] if isinstance(src, fx.Node) and _shape(src) else None))
    return None


def _layout(n: fx.Node, vals: dict, tr: _Trace) -> _Idx | None:
    """Run a layout op for real on the index tensors (other tensors: -1, allowed only for cat/stack)."""
    missing = []

    def conv(a):
        if isinstance(a, fx.Node):
            v = vals.get(a)
            if v is not None:
                return v.t
            missing.append(a)
            s = _shape(a)
            return torch.full(s, -1, dtype=torch.long) if s is not None else a.meta.get("val")
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        return a

    args, kwargs = conv(n.args), {k: conv(v) for k, v in n.kwargs.items()}
    if missing and _opname(n) not in ("cat", "stack"):
        tr.unknown.append(n)
        return None
    try:
        out = n.target(*args, **kwargs)
    except Exception:               # noqa: BLE001 - an op the replay cannot run is reported as unknown
        tr.unknown.append(n)
        return None
    ins = [vals[a] for a in n.all_input_nodes if vals.get(a) is not None]
    return _Idx(out, min(v.depth for v in ins) + 1, any(v.act for v in ins))


def _elementwise(n: fx.Node, op: str, vals: dict, tr: _Trace) -> _Idx | None:
    """Keep the shallowest indexed operand; record disagreeing operands (RoPE, gating) and constant factors."""
    shape = _shape(n)
    tensor_args = n.args[:1] if op in _NORM_OPS else n.args
    cands = [vals[a] for a in tensor_args if isinstance(a, fx.Node) and vals.get(a) is not None]
    if not cands or shape is None:
        tr.unknown.append(n)
        return None
    try:
        best = min(cands, key=lambda v: v.depth)
        t = torch.broadcast_to(best.t, shape)
        for c in cands:
            if c is not best and not torch.equal(t, other := torch.broadcast_to(c.t, shape)):
                tr.events.append((n, _Idx(t, best.depth, best.act), _Idx(other, c.depth, c.act)))
    except (RuntimeError, TypeError):
        tr.unknown.append(n)
        return None
    if op in _NORM_OPS:
        tr.norms.append((n, _norm_width(n)))
    consts = [a for a in n.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    if op in ("mul", "div") and len(cands) == 1 and len(consts) == 1 and not best.act:
        tr.scalars.append(consts[0] if op == "mul" else 1.0 / consts[0])
    return _Idx(t.contiguous(), best.depth + 1, best.act or op in _ACTIVATION)


def _norm_width(n: fx.Node) -> int | None:
    shape = _arg(n, 1, "normalized_shape")
    if isinstance(shape, (list, tuple)) and shape:
        return int(torch.tensor(shape).prod())
    return None


# -------------------------------------------------------------------------------- attention op
@dataclass
class _Attn:
    kind: str
    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    k_transposed: bool    # eager: the key operand is (..., d_h, S)
    out: fx.Node
    scale: float | None
    softcap: float | None
    causal: bool | None
    count: int


def _find_attention(g: _Graph) -> _Attn:
    sdpa = [n for n in g.nodes if "scaled_dot_product" in _opname(n)]
    if sdpa:
        n = sdpa[0]
        out = n if _opname(n) == "scaled_dot_product_attention" else next(
            u for u in n.users if _opname(u) == "getitem" and u.args[1] == 0)
        causal = True if _arg(n, 5, "is_causal", False) else None if _arg(n, 3, "attn_mask") is not None else False
        return _Attn("sdpa", n, *n.args[:3], False, out, _arg(n, 6, "scale"), None, causal, len(sdpa))
    found = [a for s in g.nodes if _opname(s) in _SOFTMAX and (a := _eager_attention(g, s)) is not None]
    if not found:
        raise g.err("no attention op found (neither aten.scaled_dot_product_attention nor matmul -> softmax -> "
                    "matmul); ops seen: " + ", ".join(sorted({_opname(n) for n in g.nodes if n.op == "call_function"})))
    return dataclasses.replace(found[0], count=len(found))


def _eager_attention(g: _Graph, sm: fx.Node) -> _Attn | None:
    """matmul(q, kT) -> [scale, softcap, mask] -> softmax -> [cast, dropout] -> matmul(., v)."""
    chain, cur = [], sm.args[0]
    while isinstance(cur, fx.Node) and _opname(cur) not in _MATMUL and len(chain) < 16:
        chain.append(cur)
        nxt = [a for a in cur.all_input_nodes if any(_opname(x) in _MATMUL for x in g.ancestors(a) | {a})]
        if not nxt:
            return None
        cur = nxt[0]
    pv = sm
    while True:                 # softmax -> [cast, dropout] -> matmul(weights, v)
        users = _users(pv)
        if len(users) != 1:
            return None
        if _opname(users[0]) in _MATMUL and users[0].args[0] is pv:
            pv = users[0]
            break
        if _opname(users[0]) not in _IDENTITY:
            return None
        pv = users[0]
    if not isinstance(cur, fx.Node) or _opname(cur) not in _MATMUL:
        return None
    scale, softcap = _score_ops(chain[::-1])
    mask = any(n.op == "placeholder" for a in chain for n in a.all_input_nodes)
    return _Attn("eager", cur, cur.args[0], cur.args[1], pv.args[1], True, pv, scale, softcap,
                 None if mask else False, 1)


def _score_ops(chain: list[fx.Node]) -> tuple[float, float | None]:
    """(scale, softcap) from the ops between the score matmul and the softmax (in order)."""
    scale, cap, i = 1.0, None, 0
    while i < len(chain):
        n, op = chain[i], _opname(chain[i])
        c = next((a for a in n.args[1:] if isinstance(a, (int, float)) and not isinstance(a, bool)), None)
        if op == "div" and c and i + 2 < len(chain) and _opname(chain[i + 1]) == "tanh":
            cap, i = float(c), i + 3            # x / c -> tanh -> * c
            continue
        if op == "mul" and c is not None:
            scale *= c
        elif op == "div" and c:
            scale /= c
        i += 1
    return scale, cap


# ------------------------------------------------------------------------------------- q / k / v
@dataclass
class _Proj:
    lin: _Lin
    heads: torch.Tensor          # (rows, d) source channels per head row
    trace: _Trace


def _head_rows(t: torch.Tensor, transposed: bool) -> torch.Tensor | None:
    """Index tensor (..., S, d) (or (..., d, S) transposed) -> (rows, d); None when it varies with S."""
    if transposed:
        t = t.transpose(-1, -2)
    if not bool((t == t[..., :1, :]).all()):
        return None
    return t[..., 0, :].reshape(-1, t.shape[-1])


def _projection(g: _Graph, target: fx.Node, what: str, transposed: bool = False) -> _Proj:
    lins = g.producers(target)
    if not lins:
        srcs = sorted({a.name for a in g.ancestors(target) if a.op == "placeholder"})
        raise g.err(f"no projection feeds the attention {what}: walking back from {target.name} reaches no "
                    f"linear/addmm/mm on a parameter, only the inputs {srcs}")
    if len(lins) > 1:
        raise g.err(f"the attention {what} is fed by several projections ({', '.join(l.path for l in lins)}); "
                    "a sum of projections has no single role")
    lin = lins[0]
    tr = _replay(g, lin.node, _channels(lin.node), target)
    rows = None if tr.value is None else _head_rows(tr.value.t, transposed)
    if rows is None or bool((rows < 0).any()):
        ops = sorted({_opname(n) for n in tr.unknown}) or ["?"]
        raise g.err(f"found {lin.path} feeding the attention {what} but could not follow its channels into the "
                    f"heads (ops the replay cannot follow: {', '.join(ops)})")
    return _Proj(lin, rows, tr)


def _kv_groups(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads or Hkv, d) key/value rows -> (Hkv, d): repeat_kv copies (consecutive groups) are folded."""
    if rows.shape[0] != heads or heads == 1:
        return rows
    uniq = torch.unique_consecutive(rows, dim=0)
    g = heads // uniq.shape[0]
    return uniq if g * uniq.shape[0] == heads and torch.equal(uniq.repeat_interleave(g, 0), rows) else rows


def _qkv_layout(q: _Proj, k: _Proj, v: _Proj, qrows, krows, vrows) -> str | None:
    paths = {q.lin.path, k.lin.path, v.lin.path}
    flat = [r.flatten().tolist() for r in (qrows, krows, vrows)]
    if len(paths) == 3:
        ok = all(f == list(range(len(f))) for f in flat)
        return None if ok else "other"
    if len(paths) == 2:
        return "other"
    H, d = qrows.shape
    nq, nk = qrows.numel(), krows.numel()
    if flat[0] == list(range(nq)) and flat[1] == list(range(nq, nq + nk)) and \
            flat[2] == list(range(nq + nk, nq + nk + vrows.numel())):
        return "blocks"
    per_head = torch.arange(H * 3 * d).view(H, 3, d)
    if krows.shape[0] == H and vrows.shape == qrows.shape and all(
            torch.equal(r, per_head[:, j]) for j, r in enumerate((qrows, krows, vrows))):
        return "per_head"
    return "other"


def _rope(g: _Graph, p: _Proj, rows: torch.Tensor) -> tuple[str | None, int]:
    """(layout, rotary dims) from the channel pairs that RoPE's add mixes."""
    head_of = {int(c): (h, d) for h, r in enumerate(rows) for d, c in enumerate(r)}
    partner: dict[int, int] = {}
    for _, kept, other in p.trace.events:
        if kept.act or other.act:
            continue
        a, b = kept.t.flatten(), other.t.flatten()
        sel = (a >= 0) & (b >= 0) & (a != b)
        for c, o in set(zip(a[sel].tolist(), b[sel].tolist())):
            (hc, dc), (ho, do) = head_of.get(c, (-1, -1)), head_of.get(o, (-2, -2))
            if hc != ho:
                return "other", 0
            partner[dc] = do
    if not partner:
        return None, 0
    dims = sorted(set(partner) | set(partner.values()))
    r = len(dims)
    if dims != list(range(r)):
        return "other", r
    if all(partner[d] == (d + r // 2) % r for d in partner):
        return "rotate_half", r
    if all(partner[d] == d ^ 1 for d in partner):
        return "interleaved", r
    return "other", r


def _qk_norm(g: _Graph, p: _Proj, heads: int, head_dim: int) -> tuple[str | None, str | None]:
    """(norm module path, scope "head" | "all") of a normalisation between the projection and attention."""
    for n, width in p.trace.norms:
        mod = _module_path(n)
        if width is None:
            continue
        scope = "head" if width == head_dim else "all" if width == heads * head_dim else f"width {width}"
        return (mod[0] if mod else n.name), scope
    return None, None


def _rope_source(g: _Graph, target: fx.Node, lin: _Lin) -> str | None:
    names = {a.name for a in g.ancestors(target) - g.ancestors(lin.node) if a in g.user_inputs}
    if any(nm.startswith("position_embeddings") for nm in names):
        return "position_embeddings"
    return "inside the layer"


# ------------------------------------------------------------------------------------------ MLP
def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for a in x for y in _flat(a)]
    return [x]


def _layer_out(g: _Graph) -> fx.Node:
    return next(a for a in _flat(g.output.args) if isinstance(a, fx.Node))


@dataclass
class _Mlp:
    gate: Role | None
    up: Role
    down: Role
    fused: str | None
    act: str
    act_ops: tuple[str, ...]
    inputs: list[_Lin]


def _mlp(g: _Graph, o: _Lin) -> _Mlp:
    ends = [lin for lin in g.producers(_layer_out(g)) if lin.node is not o.node]
    if len(ends) != 1:
        found = ", ".join(lin.path for lin in ends) or "nothing but the attention output"
        raise g.err(f"expected one MLP down projection (a linear other than {o.path} whose output reaches the "
                    f"layer output through the residual adds); found {found}")
    down = ends[0]
    ins = g.producers(down.x)
    traces = [(lin, _replay(g, lin.node, _channels(lin.node), down.x)) for lin in ins]
    acts = {lin.path: [n for n in tr.nodes if _opname(n) in _ACTIVATION] for lin, tr in traces}
    down_role = Role(down.path, down.bias, down.conv1d, tuple(range(down.out)), down.out)
    owner = _common_parent([down.path] + [lin.path for lin in ins])
    if len(ins) == 1:
        lin, tr = traces[0]
        gate_ev = [(k, o2) for _, k, o2 in tr.events if k.act != o2.act]
        if gate_ev:                                    # fused gate_up: the activated half is the gate
            k, o2 = gate_ev[0]
            gt, ut = (k.t, o2.t) if k.act else (o2.t, k.t)
            gch, uch = gt.reshape(-1, gt.shape[-1])[0].tolist(), ut.reshape(-1, ut.shape[-1])[0].tolist()
            n = len(uch)
            fused = "[gate|up]" if gch == list(range(n)) and uch == list(range(n, 2 * n)) else \
                "[up|gate]" if uch == list(range(n)) and gch == list(range(n, 2 * n)) else "other"
            return _Mlp(Role(lin.path, lin.bias, lin.conv1d, tuple(gch), lin.out), Role(lin.path, lin.bias, lin.conv1d,
                        tuple(uch), lin.out), down_role, fused, *_act_name(acts[lin.path], owner), ins)
        _check_identity(g, tr, lin, down)
        return _Mlp(None, Role(lin.path, lin.bias, lin.conv1d, tuple(range(lin.out)), lin.out), down_role, None,
                    *_act_name(acts[lin.path], owner), ins)
    gated = [lin for lin in ins if acts[lin.path]]
    plain = [lin for lin in ins if not acts[lin.path]]
    if len(ins) != 2 or len(gated) != 1:
        raise g.err(f"MLP input projections {[lin.path for lin in ins]} feeding {down.path}: expected one (plain) "
                    "or two (gate through an activation, up without)")
    up = plain[0]
    _check_identity(g, next(tr for lin, tr in traces if lin is up), up, down)
    gate = gated[0]
    return _Mlp(Role(gate.path, gate.bias, gate.conv1d, tuple(range(gate.out)), gate.out),
                Role(up.path, up.bias, up.conv1d, tuple(range(up.out)), up.out), down_role, None,
                *_act_name(acts[gate.path], owner), ins)


def _check_identity(g: _Graph, tr: _Trace, lin: _Lin, down: _Lin) -> None:
    t = None if tr.value is None else tr.value.t
    if t is None or t.reshape(-1, t.shape[-1])[0].tolist() != list(range(lin.out)):
        raise g.err(f"{lin.path}'s channels do not reach {down.path}'s inputs in order")


def _act_name(nodes: list[fx.Node], owner: str) -> tuple[str, tuple[str, ...]]:
    """(activation module class, or its ATen ops when the MLP calls it functionally; the ATen ops)."""
    ops = tuple(dict.fromkeys(_opname(n) for n in nodes))
    cls = next((m[1] for n in nodes if (m := _module_path(n)) is not None and m[0] != owner), None)
    return (cls or "+".join(ops) or "identity"), ops


def _act_config(config, act: str, ops: tuple[str, ...]) -> str | None:
    """The config attribute whose activation name builds `act` (a class name) or computes `ops`."""
    try:
        from transformers.activations import ACT2CLS
    except ImportError:      # pragma: no cover
        return None
    by_op = {"silu": {"silu", "swish"}, "gelu": {"gelu"}, "relu": {"relu"}, "sigmoid": {"sigmoid"}}
    items = config.to_dict().items() if hasattr(config, "to_dict") else vars(config).items()
    hits = []
    for attr, val in items:
        if not isinstance(val, str) or val not in ACT2CLS:
            continue
        cls = ACT2CLS[val][0] if isinstance(ACT2CLS[val], tuple) else ACT2CLS[val]
        if cls.__name__ == act or any(val in by_op.get(op, ()) for op in ops):
            hits.append(attr)
    pref = ("hidden_act", "hidden_activation", "activation_function")
    return next((a for a in pref if a in hits), hits[0] if hits else None)


# ----------------------------------------------------------------------------------------- norms
def _is_norm(n: fx.Node) -> str | None:
    mod = _module_path(n)
    if mod and "norm" in mod[1].lower():
        return mod[0]
    return None


def _norm_into(g: _Graph, x: fx.Node) -> str | None:
    """The norm module whose output is `x` (through layout/cast ops)."""
    while x.op == "call_function":
        if (m := _is_norm(x)) is not None:
            return m
        if _opname(x) not in _LAYOUT | _IDENTITY:
            return None
        x = x.args[0]
    return None


def _norm_after(g: _Graph, n: fx.Node) -> str | None:
    """The norm module applied to `n` before it joins the residual (through layout/cast/dropout ops)."""
    while _users(n):
        users = _users(n)
        mods = {m for u in users if (m := _is_norm(u)) is not None}
        if mods:
            return mods.pop()
        if len(users) != 1 or _opname(users[0]) not in _LAYOUT | _IDENTITY:
            return None
        n = users[0]
    return None


def _dropout_after(g: _Graph, n: fx.Node) -> str | None:
    while len(_users(n)) == 1:
        n = _users(n)[0]
        if _opname(n) in ("dropout", "feature_dropout", "alpha_dropout"):
            mod = _module_path(n)
            return mod[0] if mod and mod[1] == "Dropout" else None
        if _opname(n) not in _LAYOUT | _IDENTITY:
            return None
    return None


# ----------------------------------------------------------------------------------------- layer
def _describe(g: _Graph, index: int, layer: nn.Module, config) -> LayerDiscovery:
    a = _find_attention(g)
    found = [f"attention op: {a.node.target}" + (f" ({a.count} attention ops; the first is described)"
                                                  if a.count > 1 else "")]
    q, k, v = (_projection(g, a.q, "query"), _projection(g, a.k, "key", a.k_transposed),
               _projection(g, a.v, "value"))
    heads, head_dim = q.heads.shape
    krows, vrows = _kv_groups(k.heads, heads), _kv_groups(v.heads, heads)
    if heads % krows.shape[0] or krows.shape[0] != vrows.shape[0]:
        raise g.err(f"{heads} query heads, {krows.shape[0]} key heads, {vrows.shape[0]} value heads: not a "
                    "grouping a3mod knows (each KV head serving consecutive query heads)")
    layout = _qkv_layout(q, k, v, q.heads, krows, vrows)
    found += [f"{what} <- {p.lin.path} via {_ops(p.trace)}" for what, p in (("query", q), ("key", k), ("value", v))]
    rq, rk = _rope(g, q, q.heads), _rope(g, k, krows)
    if rq != rk:
        raise g.err(f"query RoPE {rq} and key RoPE {rk} differ")
    rope, rot = rq
    qn, qscope = _qk_norm(g, q, heads, head_dim)
    kn, kscope = _qk_norm(g, k, krows.shape[0], head_dim)
    if (qn is None) != (kn is None) or qscope != kscope:
        raise g.err(f"q norm {qn} ({qscope}) and k norm {kn} ({kscope}) do not match")
    pre = float(torch.tensor(q.trace.scalars + k.trace.scalars, dtype=torch.float64).prod())
    scale = (a.scale if a.scale is not None else head_dim ** -0.5) * pre
    olins = g.consumers(a.out)
    if len(olins) != 1:
        raise g.err(f"expected one linear consuming the attention output, found "
                    f"{[lin.path for lin in olins] or 'none'}")
    o = olins[0]
    _check_o(g, a, o, vrows.shape[1])
    m = _mlp(g, o)
    parallel = o.node not in g.ancestors(m.inputs[0].node)
    found += [f"attention output -> {o.path} (head-major concat)",
              f"down = {m.down.module}: the linear besides {o.path} whose output reaches the layer output",
              (f"{' + '.join(lin.path for lin in m.inputs)} -> {m.down.module}: activation {m.act} "
               f"({', '.join(m.act_ops) or 'none'})"),
              f"MLP input {'does not depend' if parallel else 'depends'} on {o.path}"]
    first = next(iter(g.user_inputs), None)
    attn_mod = _submodule(layer, _common_parent([q.lin.path, k.lin.path, v.lin.path]))
    scaling = getattr(attn_mod, "scaling", None)
    return LayerDiscovery(
        index=index, layer_class=type(layer).__name__, hidden=_shape(first)[-1] if first is not None else o.out,
        q=_role(q.lin, q.heads), k=_role(k.lin, krows), v=_role(v.lin, vrows),
        o=Role(o.path, o.bias, o.conv1d, tuple(range(o.out)), o.out), qkv_layout=layout, heads=heads,
        kv_heads=krows.shape[0], head_dim=head_dim, v_head_dim=vrows.shape[1], attention_op=a.kind,
        causal=a.causal, scale=scale, softcap=a.softcap, rope=rope, rot_dim=rot,
        rope_source=_rope_source(g, a.q, q.lin) if rope else None, q_norm=qn, k_norm=kn, qk_norm_scope=qscope,
        gate=m.gate, up=m.up, down=m.down, gate_up_layout=m.fused, act=m.act,
        act_config=_act_config(config, m.act, m.act_ops), input_norm=_norm_into(g, q.lin.x),
        mlp_norm=_norm_into(g, m.inputs[0].x), attn_out_norm=_norm_after(g, o.node),
        mlp_out_norm=_norm_after(g, _down_node(g, m)), output_norm=_norm_into(g, _layer_out(g)),
        parallel_residual=parallel, attn_dropout_module=_dropout_after(g, o.node),
        mlp_dropout_module=_dropout_after(g, _down_node(g, m)), found=tuple(found),
        scaling_attr=float(scaling) if isinstance(scaling, (int, float)) else None,
        softcap_attr=None if a.softcap is None else _attr_holding(attn_mod, a.softcap))


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _attr_holding(mod: nn.Module | None, value: float) -> str | None:
    """The numeric attribute of `mod` equal to `value` (names with "cap", then floats, first)."""
    hits = [(name, val) for name, val in vars(mod or object()).items() if isinstance(val, (int, float))
            and not isinstance(val, bool) and abs(val - value) <= 1e-9 * abs(value)]
    hits.sort(key=lambda nv: ("cap" not in nv[0].lower(), not isinstance(nv[1], float)))
    return hits[0][0] if hits else None


def _down_node(g: _Graph, m: _Mlp) -> fx.Node:
    return next(n for n, lin in g.linears.items() if lin.path == m.down.module)


def _ops(tr: _Trace) -> str:
    return ", ".join(dict.fromkeys(_opname(n) for n in tr.nodes[1:] if not _opname(n).startswith("_assert")))


def _role(lin: _Lin, rows: torch.Tensor) -> Role:
    return Role(lin.path, lin.bias, lin.conv1d, tuple(rows.flatten().tolist()), lin.out)


def _check_o(g: _Graph, a: _Attn, o: _Lin, dv: int) -> None:
    """The output projection must read the heads concatenated head-major: input channel h*d_v + d."""
    shape = _shape(a.out)
    lead = int(torch.tensor(shape[:-2]).prod()) if len(shape) > 2 else 1
    init = (torch.arange(lead)[:, None, None] * shape[-1] + torch.arange(shape[-1])).expand(
        lead, shape[-2], shape[-1]).reshape(shape)
    tr = _replay(g, a.out, init, o.x)
    t = None if tr.value is None else tr.value.t
    got = None if t is None else t.reshape(-1, t.shape[-1])[0].tolist()
    if got != list(range(lead * shape[-1])):
        raise g.err(f"{o.path} does not read the attention heads as a head-major concat (d_v {dv})")


# ------------------------------------------------------------------------------------- the model
def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of same-class blocks that contain linears."""
    n_cfg = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not any(_is_linear(x) for x in mod[0].modules()):
            continue
        key = (len(mod) == n_cfg, len(mod), -name.count("."))
        if best is None or key > best[0]:
            best = (key, name, mod)
    if best is None:
        raise DiscoveryError(f"{type(model).__name__}: no ModuleList of repeated blocks with linear layers")
    return best[1], best[2]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _signature(layer: nn.Module) -> tuple:
    return (type(layer), tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()),
            tuple((n, type(m).__name__) for n, m in layer.named_modules()))


def _sample_ids(model: nn.Module, seq_len: int) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 2
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    return (torch.arange(seq_len, device=dev) * 7 + 3).remainder(vocab)[None]


class _Stop(Exception):
    """Raised by the capture hook once every wanted layer has its inputs: the rest of the forward is skipped."""


class _Capture:
    """Forward pre-hooks on the layers (their args/kwargs) and output hooks on every module outside them."""

    def __init__(self, model, layers_path, layers, wanted):
        self.calls, self.outputs, self.handles, self.wanted = {}, {}, [], set(wanted)
        for i in wanted:
            self.handles.append(layers[i].register_forward_pre_hook(self._pre(i), with_kwargs=True))
        for name, mod in model.named_modules():
            if name and not (name == layers_path or name.startswith(layers_path + ".")):
                self.handles.append(mod.register_forward_hook(self._post(name)))

    def _pre(self, i):
        def hook(mod, args, kwargs):
            self.calls.setdefault(i, (args, kwargs))
            if self.wanted <= set(self.calls):
                raise _Stop
        return hook

    def _post(self, name):
        def hook(mod, args, out):
            if isinstance(out, tuple) and out and all(isinstance(t, torch.Tensor) for t in out):
                self.outputs.setdefault(name, out)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _run(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        try:
            try:
                model(input_ids=ids, use_cache=False)
            except TypeError:                  # models without a use_cache argument
                model(input_ids=ids)
        except _Stop:
            pass


def _switch_attention(model: nn.Module, impl: str | None):
    """Switch to attention implementation `impl` when the model supports it; returns the one to restore."""
    old = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is None or old == impl or not hasattr(model, "set_attn_implementation"):
        return None
    try:
        model.set_attn_implementation(impl)
    except (ValueError, ImportError, AttributeError):   # e.g. Gemma-2 refuses sdpa: the graph keeps eager
        return None
    return old


def _rotary_path(cap: _Capture, kwargs: dict) -> str | None:
    pe = kwargs.get("position_embeddings")
    if not isinstance(pe, (tuple, list)) or not pe or not isinstance(pe[0], torch.Tensor):
        return None
    return next((name for name, out in cap.outputs.items() if out[0] is pe[0]), None)


def _export(layer: nn.Module, index: int, args, kwargs):
    try:
        return torch.export.export(layer, tuple(args), dict(kwargs), strict=False)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiscoveryError(f"layer {index} ({type(layer).__name__}): torch.export could not trace it: "
                             f"{type(e).__name__}: {msg[:300]}") from e


def discover(model: nn.Module, *, all_layers: bool = False, seq_len: int = 7,
             attn_implementation: str | None = "sdpa") -> Discovery:
    """Describe every decoder layer of `model` from its computation graph (see the module docstring).

    One forward pass on `seq_len` tokens captures each layer's inputs (with `attn_implementation` while it
    runs, when the model supports it; None keeps the model's own); one layer per distinct structure is
    exported (`all_layers=True` exports every layer). Raises `DiscoveryError` naming what was found and what
    is missing when a layer cannot be explained.
    """
    t0 = time.perf_counter()
    path, layers = _find_layers(model)
    groups: dict[tuple, int] = {}
    rep = {i: (i if all_layers else groups.setdefault(_signature(layer), i)) for i, layer in enumerate(layers)}
    wanted = sorted(set(rep.values()))
    config = getattr(model, "config", None)
    was_training = model.training
    restore = _switch_attention(model, attn_implementation)
    cap = _Capture(model, path, layers, wanted)
    try:                        # the export re-runs the layers: same implementation and mode as the capture
        model.eval()
        _run(model, _sample_ids(model, seq_len))
        cap.close()
        missing = [i for i in wanted if i not in cap.calls]
        if missing:
            raise DiscoveryError(f"layers {missing} of {path} were not called by a forward pass on input_ids")
        described = {i: _describe(_Graph(_export(layers[i], i, *cap.calls[i]), i), i, layers[i], config)
                     for i in wanted}
    finally:
        cap.close()
        model.train(was_training)
        if restore is not None:
            model.set_attn_implementation(restore)
    out = tuple(described[i] if rep[i] == i else dataclasses.replace(described[rep[i]], index=i, same_as=rep[i])
                for i in range(len(layers)))
    rotary = _rotary_path(cap, cap.calls[wanted[0]][1])
    return Discovery(getattr(config, "model_type", None), path, rotary, out, len(wanted),
                     time.perf_counter() - t0)


# -------------------------------------------------------------------------------------- summary
def _common_parent(paths: list[str]) -> str:
    parts = [p.split(".")[:-1] for p in paths]
    common = []
    for xs in zip(*parts):
        if len(set(xs)) != 1:
            break
        common.append(xs[0])
    return ".".join(common)


def _layer_lines(d: LayerDiscovery) -> list[str]:
    if d.qkv_layout is None:
        qkv = f"q {d.q.describe()}, k {d.k.describe()}, v {d.v.describe()}"
    else:
        qkv = f"fused {d.q.module} ({d.qkv_layout}: q {d.heads}x{d.head_dim}, k/v {d.kv_heads}x{d.head_dim})" + (
            " +bias" if d.q.bias else "")
    rope = "no RoPE" if not d.rope else (
        f"RoPE {d.rope}, {d.rot_dim}/{d.head_dim} dims" + (" (partial rotary)" if d.rot_dim < d.head_dim else "")
        + f", cos/sin from {d.rope_source}")
    if d.gate is None:
        mlp = f"plain: {d.up.describe()} -> {d.act} -> {d.down.describe()}"
    elif d.gate_up_layout is not None:
        mlp = f"gated, fused {d.up.module} {d.gate_up_layout} -> {d.act}(gate) * up -> {d.down.describe()}"
    else:
        mlp = f"gated: {d.act}({d.gate.describe()}) * {d.up.describe()} -> {d.down.describe()}"
    norms = ", ".join(f"{k} {v}" for k, v in (("pre-attn", d.input_norm), ("attn-out", d.attn_out_norm),
                                                ("pre-MLP", d.mlp_norm), ("MLP-out", d.mlp_out_norm),
                                                ("output", d.output_norm)) if v)
    extra = [f"softcap {d.softcap:g}"] if d.softcap else []
    if d.q_norm:
        extra.append(f"q/k norm {d.q_norm}/{d.k_norm} over {'each head' if d.qk_norm_scope == 'head' else 'all heads'}")
    return [
        f"  attention  {d.attention_kind} ({d.heads} heads, {d.kv_heads} kv heads, head_dim {d.head_dim}"
        + (f", v head_dim {d.v_head_dim}" if d.v_head_dim != d.head_dim else "") + f"), {d.attention_op}, "
        + {True: "causal, ", None: "masked, ", False: "unmasked, "}[d.causal] + f"scale {d.scale:.6g}" + "".join(f", {e}" for e in extra),
        f"  q/k/v      {qkv}",
        f"  positions  {rope}",
        f"  output     {d.o.describe()}",
        f"  mlp        {mlp} (intermediate {d.intermediate}, activation from config.{d.act_config})",
        f"  norms      {norms or 'none'}",
        f"  residual   {'parallel (attention and MLP read the same input)' if d.parallel_residual else 'sequential'}",
        f"  biases     {', '.join(d.biases) or 'none'}",
    ]


def _summary(r: Discovery, evidence: bool = False) -> str:
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
    return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


# -------------------------------------------------------------------------------------- ArchSpec
def _rel(path: str, parent: str) -> str:
    return path[len(parent) + 1:] if parent and path.startswith(parent + ".") else path


def _to_spec(r: Discovery):
    from .arch import ArchSpec

    fields = {f.name for f in dataclasses.fields(ArchSpec)}
    d = r.layers[0]
    others = [e.index for e in r.layers if _spec_key(e) != _spec_key(d)]
    if others:
        raise DiscoveryError(f"layers {others} differ in structure from layer 0; an ArchSpec describes one layout")

    def need(cond: bool, what: str, field: str):
        if cond and field not in fields:
            raise DiscoveryError(f"{r.model_type!r}: discovered {what}, which ArchSpec cannot express yet "
                                 f"(no field {field!r})")

    problems = []
    if d.qkv_layout == "other":
        problems.append(f"q/k/v channel layout of {d.q.module}/{d.k.module}/{d.v.module} is neither separate, "
                        "[q|k|v] blocks nor per-head (H, 3, d_h)")
    if d.rope == "other":
        problems.append("RoPE pairs channels in a layout that is neither rotate_half nor interleaved")
    if d.rope and d.rope_source != "position_embeddings":
        problems.append("RoPE cos/sin are computed inside the layer, not passed in as position_embeddings")
    if d.rope and r.rotary is None:
        problems.append("no module of the model produces the layers' (cos, sin)")
    if d.gate_up_layout not in (None, "[gate|up]"):
        problems.append(f"fused gate/up layout {d.gate_up_layout}")
    if d.v_head_dim != d.head_dim:
        problems.append(f"value head dim {d.v_head_dim} != query/key head dim {d.head_dim}")
    if d.act_config is None:
        problems.append(f"no config attribute names the MLP activation {d.act}")
    if abs((d.scaling_attr if d.scaling_attr is not None else d.head_dim ** -0.5) - d.scale) > 1e-6 * d.scale:
        problems.append(f"score scale {d.scale:g} differs from the attention module's scaling "
                        f"({d.scaling_attr if d.scaling_attr is not None else 'none, i.e. 1/sqrt(d_h)'})")
    if d.softcap is not None and d.softcap_attr is None:
        problems.append(f"no attribute of the attention module holds the softcap {d.softcap:g}")
    if problems:
        raise DiscoveryError(f"{r.model_type!r}: discovered the layer roles but they do not fit an ArchSpec: "
                             + "; ".join(problems))
    need(d.qkv_layout == "per_head", "a per-head fused q/k/v layout", "qkv_layout")
    need(d.gate_up_layout is not None, "a fused gate_up projection", "gate_up")
    need(d.q_norm is not None, "q/k norms", "qk_norm")
    need(d.softcap is not None, "an attention logit softcap", "softcap")
    attn = d.attn_module
    mlp = d.mlp_module
    kw: dict[str, Any] = dict(layers=r.layers_path, attn=attn, mlp=mlp, act=d.act_config, conv1d=d.q.conv1d,
                              rope=d.rope, rotary=r.rotary if d.rope else None, down=_rel(d.down.module, mlp))
    if d.qkv_layout is None:
        kw.update(q=_rel(d.q.module, attn), k=_rel(d.k.module, attn), v=_rel(d.v.module, attn), qkv=None)
    else:
        kw.update(q=None, k=None, v=None, qkv=_rel(d.q.module, attn))
        if d.qkv_layout == "per_head":
            kw["qkv_layout"] = "per_head"
    if d.o.module.startswith(attn + ".") or not attn:
        kw["o"] = _rel(d.o.module, attn)
    else:
        need(True, f"an output projection {d.o.module} outside the attention module {attn}", "o_from_layer")
        kw.update(o=d.o.module, o_from_layer=True)
    if d.gate_up_layout is not None:
        kw.update(gate=None, gate_up=_rel(d.up.module, mlp))
    else:
        kw.update(gate=_rel(d.gate.module, mlp) if d.gate else None, up=_rel(d.up.module, mlp))
    if d.q_norm:
        kw.update(qk_norm=d.qk_norm_scope, qk_norm_names=(_rel(d.q_norm, attn), _rel(d.k_norm, attn)))
    if d.softcap is not None:
        kw["softcap"] = d.softcap_attr
    norms = (d.input_norm or d.attn_out_norm, d.mlp_norm or d.mlp_out_norm)
    if d.output_norm and not d.input_norm:
        norms = (d.mlp_norm, d.output_norm)
    if all(norms):
        kw["norms"] = norms
    drops = (d.attn_dropout_module, d.mlp_dropout_module)
    if "dropouts" in fields and all(drops) and drops[0].startswith(attn + ".") and (
            not mlp or drops[1].startswith(mlp + ".")):
        kw["dropouts"] = (_rel(drops[0], attn), _rel(drops[1], mlp))
    if any(not (c.conv1d == d.q.conv1d) for c in (d.k, d.v, d.o, d.up, d.down)):
        raise DiscoveryError(f"{r.model_type!r}: projections mix nn.Linear and Conv1D weight layouts")
    return ArchSpec(**{k: v for k, v in kw.items() if k in fields})


def _spec_key(d: LayerDiscovery) -> tuple:
    return (d.q.module, d.k.module, d.v.module, d.o.module, d.qkv_layout, d.rope, d.rot_dim, d.q_norm,
            d.gate and d.gate.module, d.up.module, d.down.module, d.gate_up_layout, d.act_config)



# ------------------------------------------------------------------------------- arch.spec_for fallback
_SPECS: dict = {}       # (model class, config JSON) -> ArchSpec: discovery runs once per architecture


def discovered_spec(model: nn.Module, context: str = ""):
    """The `ArchSpec` graph discovery builds for a model type without an explicit adapter (cached per model
    class and config, so a compressed model keeps the spec of its original). `DiscoveryError` otherwise."""
    key = _cache_key(model)
    if key is not None and key in _SPECS:
        return _SPECS[key]
    try:
        result = discover(_stand_in(model))
        spec = result.to_spec()
        _check_dims(model, spec, result.layers[0])
    except DiscoveryError as e:
        raise DiscoveryError(f"{context}{'; ' if context else ''}graph discovery could not describe it: {e}") from e
    if key is not None:
        _SPECS[key] = spec
    return spec


def _stand_in(model: nn.Module) -> nn.Module:
    """What to discover: the model itself, or for a meta-device skeleton (as `a3mod.load` builds) or a model
    already holding a3mod's compact modules (not traceable, and not the original roles) a small CPU probe of
    the original architecture."""
    compact = any(type(m).__module__.startswith("a3mod.") for m in model.modules())
    if compact:
        try:
            with torch.device("meta"):
                model = type(model)(model.config)
        except Exception as e:
            raise DiscoveryError(f"the model holds a3mod's compact modules and {type(model).__name__}(config) "
                                 f"could not rebuild the original to discover it: {e}") from e
    return _probe(model) if compact or any(p.is_meta for p in model.parameters()) else model


def _probe(model: nn.Module) -> nn.Module:
    """A CPU stand-in for a meta-device skeleton (as `a3mod.load` builds): the same modules with only the first
    decoder layer, random weights. Discovery only needs the graph, not the values."""
    path, _ = _find_layers(model)
    probe = copy.deepcopy(model)                       # meta tensors: no memory
    parent, _, name = path.rpartition(".")
    owner = probe.get_submodule(parent) if parent else probe
    setattr(owner, name, nn.ModuleList(list(getattr(owner, name))[:1]))
    probe.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(probe.parameters()) + list(probe.buffers()):
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
            else:
                t.zero_()
    return probe.eval()


def _cache_key(model: nn.Module):
    to_json = getattr(getattr(model, "config", None), "to_json_string", None)
    try:
        return (type(model), to_json(use_diff=False)) if to_json else None
    except (TypeError, ValueError):
        return None


def _check_dims(model: nn.Module, spec, d: LayerDiscovery) -> None:
    """The rest of a3mod reads head geometry from the config (`arch.dims_of`): it must agree with the graph."""
    from .arch import dims_of

    try:
        dims = dims_of(model.config, spec)
    except AttributeError as e:
        raise DiscoveryError(f"the config lacks a standard attribute for the head geometry ({e})") from e
    got = (dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.rot_dim)
    want = (d.hidden, d.heads, d.kv_heads, d.head_dim, d.rot_dim)
    if got != want:
        names = "hidden, heads, kv_heads, head_dim, rot_dim"
        raise DiscoveryError(f"the config reads ({names}) = {got}, the graph shows {want}")
