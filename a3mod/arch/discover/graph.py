"""Discovery, part 1: the exported layer graph (`OpGraph`), op classes and the channel replay that follows
output channels of a linear through layout and elementwise ops."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ...errors import DiscoveryError

# ------------------------------------------------------------------------------------------ op classes
LAYOUT = frozenset({
    "view", "_unsafe_view", "reshape", "transpose", "permute", "t", "slice", "select", "split", "split_with_sizes",
    "chunk", "unbind", "unsqueeze", "squeeze", "expand", "flatten", "unflatten", "narrow", "cat", "stack",
    "repeat_interleave", "repeat", "movedim", "view_as", "expand_as", "flip", "roll", "unfold"})
IDENTITY = frozenset({"to", "_to_copy", "type_as", "clone", "contiguous", "alias", "detach", "lift_fresh_copy",
                       "dropout", "feature_dropout", "alpha_dropout", "float", "double", "half", "bfloat16"})
ACTIVATION = frozenset({"silu", "gelu", "relu", "sigmoid", "tanh", "erf", "softplus", "mish", "elu", "leaky_relu",
                         "hardswish", "hardsigmoid", "relu6", "hardtanh", "glu", "celu", "selu", "quick_gelu",
                         "expm1"})       # expm1: xIELU's negative branch (Apertus)
_ELEMENTWISE = ACTIVATION | frozenset({
    "add", "sub", "rsub", "mul", "div", "true_divide", "neg", "pow", "rsqrt", "sqrt", "exp", "abs", "reciprocal",
    "square", "where", "clamp", "clamp_min", "clamp_max", "masked_fill", "maximum", "minimum", "sin", "cos"})
_NORM_OPS = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm"})
_REDUCE = frozenset({"mean", "sum", "var", "var_mean", "std", "amax", "amin", "norm", "linalg_vector_norm",
                     "logsumexp", "max", "min", "prod"})
SOFTMAX = frozenset({"softmax", "_softmax", "_safe_softmax"})
MATMUL = frozenset({"matmul", "bmm", "baddbmm", "einsum"})


def opname(n: fx.Node) -> str:
    if n.op != "call_function":
        return n.op
    t = n.target
    name = getattr(t, "_opname", None) or getattr(t, "__name__", str(t))
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def module_path(n: fx.Node) -> tuple[str, str] | None:
    """(path from the exported layer, class name) of the innermost module that produced `n`."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    path = path.replace("L['self'].", "").replace("L__self___", "")
    return path, (cls if isinstance(cls, str) else cls.__qualname__).rsplit(".", 1)[-1]


def users_of(n: fx.Node) -> list[fx.Node]:
    """Users that compute something (not torch.export's metadata asserts, not the graph output)."""
    return [u for u in n.users if u.op != "output" and not opname(u).startswith("_assert")]


def shape_of(n: fx.Node):
    v = n.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def arg_of(n: fx.Node, pos: int, name: str, default=None):
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name, default)



# --------------------------------------------------------------------------------------------- graph
@dataclass
class Lin:
    node: fx.Node
    x: fx.Node
    path: str
    conv1d: bool
    bias: bool
    out: int


class OpGraph:
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
            op = opname(n)
            if op in ("t", "transpose", "permute"):
                flips += 1
            elif op not in IDENTITY:
                return None, 0
            n = n.args[0]
        return (self.params.get(n.name) if isinstance(n, fx.Node) else None), flips

    def _as_linear(self, n: fx.Node) -> Lin | None:
        op = opname(n)
        if op == "linear":
            x, w, b = n.args[0], n.args[1], arg_of(n, 2, "bias")
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
        return Lin(n, x, name.rsplit(".", 1)[0], conv1d, bias, shape_of(n)[-1])

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

    def producers(self, n: fx.Node) -> list[Lin]:
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

    def consumers(self, n: fx.Node) -> list[Lin]:
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
class Trace:
    value: _Idx | None = None
    nodes: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)     # (node, kept _Idx, other _Idx): disagreeing operands
    norms: list = dataclasses.field(default_factory=list)      # (node, normalised width)
    scalars: list = dataclasses.field(default_factory=list)    # constant factors applied to the indexed value
    unknown: list = dataclasses.field(default_factory=list)    # ops the replay cannot follow


def channels_of(n: fx.Node) -> torch.Tensor:
    """Channel indices of a linear's output: (..., out) filled with arange(out) along the last dim."""
    shape = shape_of(n)
    return torch.arange(shape[-1]).expand(shape)


def replay_trace(g: OpGraph, src: fx.Node, init: torch.Tensor, dst: fx.Node) -> Trace:
    """Follow the channels of `src` (index tensor `init`) through every op on the way to `dst`."""
    tr = Trace(nodes=g.between(src, dst))
    vals = {src: _Idx(init, 0)}
    for n in tr.nodes[1:]:
        if any(vals.get(a) is not None for a in n.all_input_nodes):
            vals[n] = _step(n, vals, tr)
    tr.value = vals.get(dst)
    return tr


def _step(n: fx.Node, vals: dict, tr: Trace) -> _Idx | None:
    op = opname(n)
    if op == "getitem":
        v = vals.get(n.args[0])
        return None if v is None or not isinstance(v.t, (list, tuple)) else _Idx(v.t[n.args[1]], v.depth, v.act)
    if op in IDENTITY:
        v = vals.get(n.args[0])
        return None if v is None else _Idx(v.t, v.depth + 1, v.act)
    if op in LAYOUT:
        return _layout(n, vals, tr)
    if op in _ELEMENTWISE or op in _NORM_OPS:
        return _elementwise(n, op, vals, tr)
    if op not in _REDUCE and op not in SOFTMAX:
        tr.unknown.append(n)
    elif op in _REDUCE:
        src = n.args[0]
        tr.norms.append((n, shape_of(src)[-1] if isinstance(src, fx.Node) and shape_of(src) else None))
    return None


def _layout(n: fx.Node, vals: dict, tr: Trace) -> _Idx | None:
    """Run a layout op for real on the index tensors (other tensors: -1, allowed only for cat/stack)."""
    missing = []

    def conv(a):
        if isinstance(a, fx.Node):
            v = vals.get(a)
            if v is not None:
                return v.t
            missing.append(a)
            s = shape_of(a)
            return torch.full(s, -1, dtype=torch.long) if s is not None else a.meta.get("val")
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x) for x in a)
        return a

    args, kwargs = conv(n.args), {k: conv(v) for k, v in n.kwargs.items()}
    shape_only = opname(n) in ("view_as", "expand_as", "reshape_as") and n.args[0] not in missing
    if missing and opname(n) not in ("cat", "stack") and not shape_only:    # view_as: its 2nd operand a shape
        tr.unknown.append(n)
        return None
    try:
        out = n.target(*args, **kwargs)
    except Exception:               # noqa: BLE001 - an op the replay cannot run is reported as unknown
        tr.unknown.append(n)
        return None
    ins = [vals[a] for a in n.all_input_nodes if vals.get(a) is not None]
    return _Idx(out, min(v.depth for v in ins) + 1, any(v.act for v in ins))


def _elementwise(n: fx.Node, op: str, vals: dict, tr: Trace) -> _Idx | None:
    """Keep the shallowest indexed operand; record disagreeing operands (RoPE, gating) and constant factors."""
    shape = shape_of(n)
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
    return _Idx(t.contiguous(), best.depth + 1, best.act or op in ACTIVATION)


def _norm_width(n: fx.Node) -> int | None:
    shape = arg_of(n, 1, "normalized_shape")
    if isinstance(shape, (list, tuple)) and shape:
        return int(torch.tensor(shape).prod())
    return None
