"""Discovery, part 2: the roles of a layer read from its graph: the attention op, q/k/v and their layout, RoPE,
q/k norms, the output projection, the MLP chain and activation, norms and dropouts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx
from transformers.activations import ACT2CLS

from ...errors import DiscoveryError
from .graph import (
    ACTIVATION,
    IDENTITY,
    LAYOUT,
    MATMUL,
    SOFTMAX,
    Lin,
    OpGraph,
    Trace,
    arg_of,
    channels_of,
    module_path,
    opname,
    replay_trace,
    shape_of,
    users_of,
)
from .types import Role, common_parent


# -------------------------------------------------------------------------------- attention op
@dataclass
class Attn:
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


def find_attention(g: OpGraph) -> Attn:
    sdpa = [n for n in g.nodes if "scaled_dot_product" in opname(n)]
    if sdpa:
        n = sdpa[0]
        out = n if opname(n) == "scaled_dot_product_attention" else next(
            u for u in n.users if opname(u) == "getitem" and u.args[1] == 0)
        causal = True if arg_of(n, 5, "is_causal", False) else None if arg_of(n, 3, "attn_mask") is not None else False
        return Attn("sdpa", n, *n.args[:3], False, out, arg_of(n, 6, "scale"), None, causal, len(sdpa))
    found = [a for s in g.nodes if opname(s) in SOFTMAX and (a := _eager_attention(g, s)) is not None]
    if not found:
        ops = ", ".join(sorted({opname(n) for n in g.nodes if n.op == "call_function"}))
        raise NoAttentionError(g.err("no attention op found (neither aten.scaled_dot_product_attention nor matmul -> "
                                     f"softmax -> matmul); ops seen: {ops}"))
    return dataclasses.replace(found[0], count=len(found))


class NoAttentionError(DiscoveryError):
    """A layer whose graph has no attention op (a hybrid's linear-attention, convolution or state-space layer)."""

    def __init__(self, err: DiscoveryError):
        super().__init__(str(err))


def _eager_attention(g: OpGraph, sm: fx.Node) -> Attn | None:
    """matmul(q, kT) -> [scale, softcap, mask] -> softmax -> [cast, dropout] -> matmul(., v)."""
    chain, cur = [], sm.args[0]
    while isinstance(cur, fx.Node) and opname(cur) not in MATMUL and len(chain) < 16:
        chain.append(cur)
        nxt = [a for a in cur.all_input_nodes if any(opname(x) in MATMUL for x in g.ancestors(a) | {a})]
        if not nxt:
            return None
        cur = nxt[0]
    pv = sm
    sink = any(opname(n) == "cat" for n in chain)     # a sink logit column: [scores | sink] -> softmax -> [..., :-1]
    while True:                 # softmax -> [cast, dropout, drop the sink column] -> matmul(weights, v)
        users = users_of(pv)
        if len(users) != 1:
            return None
        if opname(users[0]) in MATMUL and users[0].args[0] is pv:
            pv = users[0]
            break
        if opname(users[0]) not in IDENTITY and not (sink and opname(users[0]) == "slice"):
            return None
        pv = users[0]
    if not isinstance(cur, fx.Node) or opname(cur) not in MATMUL:
        return None
    scale, softcap = _score_ops(chain[::-1])
    mask = any(n.op == "placeholder" for a in chain for n in a.all_input_nodes)
    return Attn("eager", cur, cur.args[0], cur.args[1], pv.args[1], True, pv, scale, softcap,
                 None if mask else False, 1)


def _score_ops(chain: list[fx.Node]) -> tuple[float, float | None]:
    """(scale, softcap) from the ops between the score matmul and the softmax (in order)."""
    scale, cap, i = 1.0, None, 0
    while i < len(chain):
        n, op = chain[i], opname(chain[i])
        c = next((a for a in n.args[1:] if isinstance(a, (int, float)) and not isinstance(a, bool)), None)
        if op == "div" and c and i + 2 < len(chain) and opname(chain[i + 1]) == "tanh":
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
    lin: Lin
    heads: torch.Tensor          # (rows, d) source channels per head row
    trace: Trace


def _head_rows(t: torch.Tensor, transposed: bool) -> torch.Tensor | None:
    """Index tensor (..., S, d) (or (..., d, S) transposed) -> (rows, d); None when it varies with S."""
    if transposed:
        t = t.transpose(-1, -2)
    if not bool((t == t[..., :1, :]).all()):
        return None
    return t[..., 0, :].reshape(-1, t.shape[-1])


def projection_of(g: OpGraph, target: fx.Node, what: str, transposed: bool = False) -> _Proj:
    lins = g.producers(target)
    if not lins:
        srcs = sorted({a.name for a in g.ancestors(target) if a.op == "placeholder"})
        raise g.err(f"no projection feeds the attention {what}: walking back from {target.name} reaches no "
                    f"linear/addmm/mm on a parameter, only the inputs {srcs}")
    if len(lins) > 1:
        raise g.err(f"the attention {what} is fed by several projections ({', '.join(l.path for l in lins)}); "
                    "a sum of projections has no single role")
    lin = lins[0]
    tr = replay_trace(g, lin.node, channels_of(lin.node), target)
    rows = None if tr.value is None else _head_rows(tr.value.t, transposed)
    if rows is None or bool((rows < 0).any()):
        ops = sorted({opname(n) for n in tr.unknown}) or ["?"]
        raise g.err(f"found {lin.path} feeding the attention {what} but could not follow its channels into the "
                    f"heads (ops the replay cannot follow: {', '.join(ops)})")
    return _Proj(lin, rows, tr)


def kv_groups(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """(heads or Hkv, d) key/value rows -> (Hkv, d): repeat_kv copies (consecutive groups) are folded."""
    if rows.shape[0] != heads or heads == 1:
        return rows
    uniq = torch.unique_consecutive(rows, dim=0)
    g = heads // uniq.shape[0]
    return uniq if g * uniq.shape[0] == heads and torch.equal(uniq.repeat_interleave(g, 0), rows) else rows


def find_qkv_layout(q: _Proj, k: _Proj, v: _Proj, qrows, krows, vrows) -> str | None:
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


def find_out_gate(g: OpGraph, a: Attn, o: Lin) -> tuple[Lin, torch.Tensor, bool, str] | None:
    """(gate projection, gate channel of each o_proj input channel (n,), one gate per head?, its function) of an
    output gate, o_proj reading attn_out * act(gate(x)) with act sigmoid or softplus (Laguna): elementwise per value
    dim (Qwen3.5, Qwen3-Next, AFMoE) or one per head broadcast over its dims (LFM3); None without one."""
    path = g.between(a.out, o.x)
    on_path = set(path)
    for n in path:
        xs = [x for x in n.args if isinstance(x, fx.Node)]
        if opname(n) != "mul" or len(xs) != 2:
            continue
        sigs = [_through_layout(x) for x in xs]
        pick = [i for i, sig in enumerate(sigs) if opname(sig) in GATE_ACTS]
        if not pick:
            off = [x for x in xs if x not in on_path]        # a projection-fed multiplier (another gate function)
            feeds = _data_inputs(g, off[0]) if len(off) == 1 else set()
            if feeds and not ({a.q, a.k} & feeds) and any(x in g.linears for x in feeds):
                raise g.err(f"the attention output is multiplied by {opname(_through_layout(off[0]))}(...) before "
                            f"{o.path}: only {' / '.join(GATE_ACTS)} output gates are modelled")
            continue
        sig, others, ours = sigs[pick[0]], [xs[pick[0]]], [xs[1 - pick[0]]]
        feeds = _data_inputs(g, sig)
        if {a.q, a.k} & feeds:
            continue        # a function of the scores (Granite-SWA's sinks as a post-softmax LSE scaling), no gate
        lins = [g.linears[x] for x in sorted(feeds, key=g.order.__getitem__) if x in g.linears]   # the nearest
        if len(lins) != 1:
            raise g.err(f"the attention's output gate is fed by {[lin.path for lin in lins] or 'no projection'}")
        gl, shape = lins[0], shape_of(n)
        gate = replay_trace(g, gl.node, channels_of(gl.node), others[0]).value
        out_shape = shape_of(a.out)
        attn = replay_trace(g, a.out, head_major(out_shape), ours[0]).value
        if gate is None or attn is None:
            raise g.err(f"found the output gate {gl.path} but could not follow its channels to the heads")
        av, gv = (torch.broadcast_to(v.t, shape).reshape(-1) for v in (attn, gate))
        n_ch = int(head_major(out_shape).max()) + 1
        rows = torch.full((n_ch,), -1, dtype=torch.long)
        rows[av] = gv
        dv = out_shape[-1]
        if torch.equal(rows[av], gv) and len(set(rows.tolist())) == n_ch and not bool((rows < 0).any()):
            return gl, rows, False, opname(sig)
        if torch.equal(rows[av], gv) and torch.equal(rows, torch.arange(n_ch) // dv):
            return gl, rows[::dv], True, opname(sig)
        raise g.err(f"{gl.path} gates the attention output neither per value dim nor per head")
    return None


GATE_ACTS = ("sigmoid", "softplus")         # the output-gate functions a3mod models (ArchSpec.attn_gate_act)
_SHAPE_ONLY = {"view_as", "expand_as", "reshape_as", "type_as"}     # their 2nd operand gives a shape / dtype only


def _data_inputs(g: OpGraph, n: fx.Node) -> set:
    """The nodes whose values reach `n` (not through the shape-only operand of view_as and the like), stopping at
    linears (each linear's own inputs are not followed)."""
    seen, todo = set(), [n]
    while todo:
        cur = todo.pop()
        if cur is not n and cur in g.linears:
            continue
        ins = cur.args[:1] if opname(cur) in _SHAPE_ONLY else cur.all_input_nodes
        for x in ins:
            if isinstance(x, fx.Node) and x not in seen and x.name not in g.params:
                seen.add(x)
                todo.append(x)
    return seen


def _through_layout(x: fx.Node) -> fx.Node:
    """`x` with view / unsqueeze / to(dtype) ops before it stepped over."""
    while (opname(x) in IDENTITY or opname(x) in LAYOUT) and x.args and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return x


def head_major(shape) -> torch.Tensor:
    """Index tensor of the attention op's output (..., T, d_v), its leading dims the (batch of 1 and) heads:
    channel h*d_v + d of the concat o_proj reads."""
    lead = int(torch.tensor(shape[:-2]).prod()) if len(shape) > 2 else 1
    return (torch.arange(lead)[:, None, None] * shape[-1] + torch.arange(shape[-1])).expand(
        lead, shape[-2], shape[-1]).reshape(shape)


def find_rope(g: OpGraph, p: _Proj, rows: torch.Tensor) -> tuple[str | None, int]:
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


def find_qk_norm(g: OpGraph, p: _Proj, heads: int, head_dim: int) -> tuple[str | None, str | None]:
    """(norm module path, scope "head" | "all") of a normalisation between the projection and attention."""
    for n, width in p.trace.norms:
        mod = module_path(n)
        if width is None:
            continue
        scope = "head" if width == head_dim else "all" if width == heads * head_dim else f"width {width}"
        return (mod[0] if mod else n.name), scope
    return None, None


def find_rope_source(g: OpGraph, target: fx.Node, lin: Lin) -> str | None:
    names = {a.name for a in g.ancestors(target) - g.ancestors(lin.node) if a in g.user_inputs}
    if any(nm.startswith("position_embeddings") for nm in names):
        return "position_embeddings"
    return "inside the layer"


# ------------------------------------------------------------------------------------------ MLP
def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for a in x for y in _flat(a)]
    return [x]


def layer_out(g: OpGraph) -> fx.Node:
    return next(a for a in _flat(g.output.args) if isinstance(a, fx.Node))


@dataclass
class Mlp:
    gate: Role | None
    up: Role
    down: Role
    fused: str | None
    act: str
    act_ops: tuple[str, ...]
    inputs: list[Lin]


def find_mlp(g: OpGraph, o: Lin, within: str | None = None) -> Mlp:
    """The MLP chain ending in the down projection; `within`: only linears under that path (an MoE block's shared
    expert, beside the router and the routed experts)."""
    ends = [lin for lin in g.producers(layer_out(g)) if lin.node is not o.node]
    if within is not None:
        ends = [lin for lin in ends if lin.path.startswith(within + ".")]
    after = [lin for lin in ends if o.node in g.ancestors(lin.node)]
    if len(ends) > 1 and len(after) == 1:   # a mixer beside the attention (Falcon-H1's Mamba): the MLP comes after
        ends = after
    first = [lin for lin in ends if not any(e.node in g.ancestors(lin.node) for e in ends if e is not lin)]
    if len(ends) > 1 and len(first) == 1:   # a projection after the MLP (Gemma 4's per-layer input) stays whole
        ends = first
    if len(ends) != 1:
        found = ", ".join(lin.path for lin in ends) or "nothing but the attention output"
        raise g.err(f"expected one MLP down projection (a linear other than {o.path} whose output reaches the "
                    f"layer output through the residual adds); found {found}")
    down = ends[0]
    ins = g.producers(down.x)
    traces = [(lin, replay_trace(g, lin.node, channels_of(lin.node), down.x)) for lin in ins]
    acts = {lin.path: [n for n in tr.nodes if opname(n) in ACTIVATION] for lin, tr in traces}
    down_role = Role(down.path, down.bias, down.conv1d, tuple(range(down.out)), down.out)
    owner = common_parent([down.path] + [lin.path for lin in ins])
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
            return Mlp(Role(lin.path, lin.bias, lin.conv1d, tuple(gch), lin.out), Role(lin.path, lin.bias, lin.conv1d,
                        tuple(uch), lin.out), down_role, fused, *_act_name(acts[lin.path], owner), ins)
        _check_identity(g, tr, lin, down)
        return Mlp(None, Role(lin.path, lin.bias, lin.conv1d, tuple(range(lin.out)), lin.out), down_role, None,
                    *_act_name(acts[lin.path], owner), ins)
    gated = [lin for lin in ins if acts[lin.path]]
    plain = [lin for lin in ins if not acts[lin.path]]
    if len(ins) != 2 or len(gated) != 1:
        raise g.err(f"MLP input projections {[lin.path for lin in ins]} feeding {down.path}: expected one (plain) "
                    "or two (gate through an activation, up without)")
    up = plain[0]
    _check_identity(g, next(tr for lin, tr in traces if lin is up), up, down)
    gate = gated[0]
    return Mlp(Role(gate.path, gate.bias, gate.conv1d, tuple(range(gate.out)), gate.out),
                Role(up.path, up.bias, up.conv1d, tuple(range(up.out)), up.out), down_role, None,
                *_act_name(acts[gate.path], owner), ins)


def _check_identity(g: OpGraph, tr: Trace, lin: Lin, down: Lin) -> None:
    t = None if tr.value is None else tr.value.t
    if t is None or t.reshape(-1, t.shape[-1])[0].tolist() != list(range(lin.out)):
        raise g.err(f"{lin.path}'s channels do not reach {down.path}'s inputs in order")


def _act_name(nodes: list[fx.Node], owner: str) -> tuple[str, tuple[str, ...]]:
    """(activation module class, or its ATen ops when the MLP calls it functionally; the ATen ops)."""
    ops = tuple(dict.fromkeys(opname(n) for n in nodes))
    cls = next((m[1] for n in nodes if (m := module_path(n)) is not None and m[0] != owner), None)
    return (cls or "+".join(ops) or "identity"), ops


def act_literal(act: str, ops: tuple[str, ...]) -> str | None:
    """The transformers ACT2FN name of activation `act` (a class name) or computing `ops`, for layers whose config
    names no activation (CTRL's ReLU, MPT's GELU, GPT's NewGELU). The full-rank self-check confirms the pick."""
    cls_of = lambda v: v[0] if isinstance(v, tuple) else v  # noqa: E731
    by_class = [name for name, v in ACT2CLS.items() if cls_of(v).__name__ == act]
    if by_class:
        return by_class[0]
    by_op = [op for op in ops if op in ACT2CLS]
    return by_op[0] if len(set(by_op)) == 1 else None


def act_config_of(config, act: str, ops: tuple[str, ...]) -> str | None:
    """The config attribute whose activation name builds `act` (a class name) or computes `ops`."""
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
    mod = module_path(n)
    if mod and "norm" in mod[1].lower():
        return mod[0]
    return None


def norm_into(g: OpGraph, x: fx.Node) -> str | None:
    """The norm module whose output is `x` (through layout/cast ops)."""
    while x.op == "call_function":
        if (m := _is_norm(x)) is not None:
            return m
        if opname(x) not in LAYOUT | IDENTITY:
            return None
        x = x.args[0]
    return None


def norm_after(g: OpGraph, n: fx.Node) -> str | None:
    """The norm module applied to `n` before it joins the residual (through layout/cast/dropout ops)."""
    while users_of(n):
        users = users_of(n)
        mods = {m for u in users if (m := _is_norm(u)) is not None}
        if mods:
            return mods.pop()
        if len(users) != 1 or opname(users[0]) not in LAYOUT | IDENTITY:
            return None
        n = users[0]
    return None


def dropout_after(g: OpGraph, n: fx.Node) -> str | None:
    while len(users_of(n)) == 1:
        n = users_of(n)[0]
        if opname(n) in ("dropout", "feature_dropout", "alpha_dropout"):
            mod = module_path(n)
            return mod[0] if mod and mod[1] == "Dropout" else None
        if opname(n) not in LAYOUT | IDENTITY:
            return None
    return None
