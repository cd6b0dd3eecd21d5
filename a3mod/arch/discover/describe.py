"""Discovery, part 3: one layer's `LayerDiscovery` from its graph, and `discover(model)`: capture each layer's
inputs with one forward pass and export one layer of every distinct structure."""
from __future__ import annotations

import dataclasses
import time
from collections import UserDict

import torch
from torch import fx, nn

from ...errors import DiscoveryError
from ..capture import probe_ids, recording_inputs, run_until_stopped
from ..experts import ExpertsView, is_experts
from .graph import Lin, OpGraph, Trace, opname, replay_trace, shape_of
from .roles import (
    Attn,
    Mlp,
    NoAttentionError,
    act_config_of,
    act_literal,
    dropout_after,
    find_attention,
    find_mlp,
    find_out_gate,
    head_major,
    find_qk_norm,
    find_qkv_layout,
    find_rope,
    find_rope_source,
    kv_groups,
    layer_out,
    norm_after,
    norm_into,
    projection_of,
)
from .types import Discovery, LayerDiscovery, Role, common_parent


# ----------------------------------------------------------------------------------------- layer
def layer_discovery(g: OpGraph, index: int, layer: nn.Module, config) -> LayerDiscovery:
    a = find_attention(g)
    found = [f"attention op: {a.node.target}" + (f" ({a.count} attention ops; the first is described)"
                                                  if a.count > 1 else "")]
    q, k, v = (projection_of(g, a.q, "query"), projection_of(g, a.k, "key", a.k_transposed),
               projection_of(g, a.v, "value"))
    heads, head_dim = q.heads.shape
    krows, vrows = kv_groups(k.heads, heads), kv_groups(v.heads, heads)
    if heads % krows.shape[0] or krows.shape[0] != vrows.shape[0]:
        raise g.err(f"{heads} query heads, {krows.shape[0]} key heads, {vrows.shape[0]} value heads: not a "
                    "grouping a3mod knows (each KV head serving consecutive query heads)")
    olins = g.consumers(a.out)
    if len(olins) != 1:
        raise g.err(f"expected one linear consuming the attention output, found "
                    f"{[lin.path for lin in olins] or 'none'}")
    o = olins[0]
    gate = _out_gate(g, a, o, q, heads, head_dim, found)
    qrows = torch.arange(heads * head_dim).view(heads, head_dim) if gate and gate.split("@")[0] == "q" else q.heads
    layout = find_qkv_layout(q, k, v, qrows, krows, vrows)
    found += [f"{what} <- {p.lin.path} via {_ops(p.trace)}" for what, p in (("query", q), ("key", k), ("value", v))]
    rq, rk = find_rope(g, q, q.heads), find_rope(g, k, krows)
    if rq != rk:
        raise g.err(f"query RoPE {rq} and key RoPE {rk} differ")
    rope, rot = rq
    qn, qscope = find_qk_norm(g, q, heads, head_dim)
    kn, kscope = find_qk_norm(g, k, krows.shape[0], head_dim)
    if (qn is None) != (kn is None) or qscope != kscope:
        raise g.err(f"q norm {qn} ({qscope}) and k norm {kn} ({kscope}) do not match")
    pre = float(torch.tensor(q.trace.scalars + k.trace.scalars, dtype=torch.float64).prod())
    scale = (a.scale if a.scale is not None else head_dim ** -0.5) * pre
    _check_o(g, a, o, vrows.shape[1])
    found.append(f"attention output -> {o.path} (head-major concat)")
    moe, m, mlp_in, parallel = _read_mlp(g, layer, o, found)
    first = next(iter(g.user_inputs), None)
    attn_mod = _submodule(layer, common_parent([q.lin.path, k.lin.path, v.lin.path]))
    scaling = getattr(attn_mod, "scaling", None)
    return LayerDiscovery(
        index=index, layer_class=type(layer).__name__, hidden=shape_of(first)[-1] if first is not None else o.out,
        q=_role(q.lin, q.heads), k=_role(k.lin, krows), v=_role(v.lin, vrows),
        o=Role(o.path, o.bias, o.conv1d, tuple(range(o.out)), o.out), qkv_layout=layout, heads=heads,
        kv_heads=krows.shape[0], head_dim=head_dim, v_head_dim=vrows.shape[1], attention_op=a.kind,
        causal=a.causal, scale=scale, softcap=a.softcap, rope=rope, rot_dim=rot,
        rope_source=find_rope_source(g, a.q, q.lin) if rope else None, q_norm=qn, k_norm=kn, qk_norm_scope=qscope,
        gate=m and m.gate, up=m and m.up, down=m and m.down, gate_up_layout=m and m.fused,
        act=m.act if m else "none", act_config=m and act_config_of(config, m.act, m.act_ops),
        act_name=m and act_literal(m.act, m.act_ops), input_norm=norm_into(g, q.lin.x),
        mlp_norm=norm_into(g, mlp_in.x), attn_out_norm=norm_after(g, o.node),
        mlp_out_norm=m and norm_after(g, _down_node(g, m)), output_norm=norm_into(g, layer_out(g)),
        parallel_residual=parallel, attn_dropout_module=dropout_after(g, o.node),
        mlp_dropout_module=m and dropout_after(g, _down_node(g, m)), found=tuple(found),
        moe=moe and moe[0], experts=moe and moe[1], shared=moe and moe[2],
        num_experts=ExpertsView(_submodule(layer, moe[1]), o.out).num if moe else 0,
        scaling_attr=float(scaling) if isinstance(scaling, (int, float)) else None, out_gate=gate,
        softcap_attr=None if a.softcap is None else _attr_holding(attn_mod, a.softcap))


def _out_gate(g: OpGraph, a: Attn, o: Lin, q, heads: int, head_dim: int, found: list[str]) -> str | None:
    """The output gate's source: "q" (the q projection emits each head's [query | gate]), the gate projection's
    path, or None without a gate; a DiscoveryError for a gate in another channel layout."""
    hit = find_out_gate(g, a, o)
    if hit is None:
        return None
    gl, rows, per_head, act = hit
    tag = "" if act == "sigmoid" else f"@{act}"              # "@softplus": Laguna
    n = heads * head_dim
    if per_head:
        if gl.path == q.lin.path or gl.out != heads or not torch.equal(rows, torch.arange(heads)):
            raise g.err(f"the per-head output gate {gl.path} is not its own projection with one output per head")
        found.append(f"output gate: attn_out * {act}({gl.path}(x)), one per head")
        return gl.path + "#head" + tag
    if gl.path == q.lin.path:
        both = torch.arange(2 * n).view(heads, 2, head_dim)
        if not (torch.equal(q.heads, both[:, 0]) and torch.equal(rows, both[:, 1].reshape(-1))):
            raise g.err(f"{gl.path} emits queries and an output gate in a channel layout other than each head's "
                        "[query | gate]")
        found.append(f"output gate: attn_out * {act}(gate), the gate from {gl.path} (each head's [query | gate])")
        return "q" + tag
    if gl.out != n or not torch.equal(rows, torch.arange(n)):
        raise g.err(f"the output gate {gl.path} does not emit one channel per head dim in head-major order")
    found.append(f"output gate: attn_out * {act}({gl.path}(x))")
    return gl.path + tag


def find_moe(layer: nn.Module) -> tuple[str, str, str | None] | None:
    """(block, routed experts, shared expert or None) of an MoE layer, found by structure: the module holding 3-D
    expert parameters (`arch.experts.is_experts`), its parent block, and the block's child MLP (two linears or more
    under it). None for a dense layer; a DiscoveryError when the block's parts are ambiguous."""
    hits = [n for n, m in layer.named_modules() if n and is_experts(m)]
    if not hits:
        return None
    if len(hits) > 1:
        raise DiscoveryError(f"layer holds several expert modules {hits}: one MoE block per layer is supported")
    block, _, _ = hits[0].rpartition(".")
    if not block:
        raise DiscoveryError(f"experts {hits[0]} sit directly on the layer, not in an MoE block")
    owner = layer.get_submodule(block)
    mlps = [n for n, c in owner.named_children() if n != hits[0].rpartition(".")[2]
            and sum(_is_linear(x) for x in c.modules()) >= 2]
    if len(mlps) > 1:
        raise DiscoveryError(f"MoE block {block} has several shared-expert candidates {mlps}")
    if mlps:
        return block, hits[0], f"{block}.{mlps[0]}"
    beside = [n for n, c in layer.named_children() if n != block and "mlp" in n.lower()      # Granite 4.0-H
              and sum(_is_linear(x) for x in c.modules()) >= 2]
    return block, hits[0], beside[0] if len(beside) == 1 else None


def _block_input(g: OpGraph, block: str) -> Lin:
    """A linear of the MoE block (its router) reading the block's input."""
    lins = [lin for lin in g.linears.values() if lin.path.startswith(block + ".")]
    if not lins:
        raise g.err(f"no linear of MoE block {block} (its router) found in the graph")
    return min(lins, key=lambda lin: g.order[lin.node])


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


def _down_node(g: OpGraph, m: Mlp) -> fx.Node:
    return next(n for n, lin in g.linears.items() if lin.path == m.down.module)


def _ops(tr: Trace) -> str:
    return ", ".join(dict.fromkeys(opname(n) for n in tr.nodes[1:] if not opname(n).startswith("_assert")))


def _role(lin: Lin, rows: torch.Tensor) -> Role:
    return Role(lin.path, lin.bias, lin.conv1d, tuple(rows.flatten().tolist()), lin.out)



def _read_mlp(g: OpGraph, layer: nn.Module, o: Lin, found: list[str]):
    """(MoE block paths or None, the MLP roles or None, the MLP's input, parallel residual?) after the attention
    output projection `o`; appends how each was found to `found`."""
    moe = find_moe(layer)
    m = find_mlp(g, o) if moe is None else find_mlp(g, o, moe[2]) if moe[2] else None
    if moe is not None:
        found.append(f"MoE block {moe[0]}: routed experts {moe[1]} (3-D parameters)"
                     + (f", shared expert {moe[2]}" if moe[2] else ""))
    if m is not None:
        found += [f"down = {m.down.module}: the linear besides {o.path} whose output reaches the layer output",
                  (f"{' + '.join(lin.path for lin in m.inputs)} -> {m.down.module}: activation {m.act} "
                   f"({', '.join(m.act_ops) or 'none'})")]
    mlp_in = m.inputs[0] if m is not None else _block_input(g, moe[0])
    parallel = o.node not in g.ancestors(mlp_in.node)
    found.append(f"MLP input {'does not depend' if parallel else 'depends'} on {o.path}")
    return moe, m, mlp_in, parallel

def _check_o(g: OpGraph, a: Attn, o: Lin, dv: int) -> None:
    """The output projection must read the heads concatenated head-major: input channel h*d_v + d."""
    shape = shape_of(a.out)
    lead = int(torch.tensor(shape[:-2]).prod()) if len(shape) > 2 else 1
    tr = replay_trace(g, a.out, head_major(shape), o.x)
    t = None if tr.value is None else tr.value.t
    got = None if t is None else t.reshape(-1, t.shape[-1])[0].tolist()
    if got != list(range(lead * shape[-1])):
        raise g.err(f"{o.path} does not read the attention heads as a head-major concat (d_v {dv})")


# ------------------------------------------------------------------------------------- the model
def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of same-class blocks that contain linears."""
    n_cfg = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        mixed = len({type(m) for m in mod}) != 1      # hybrids (Jamba, OLMo-hybrid): layer classes per mixer
        if (mixed and len(mod) != n_cfg) or not all(any(_is_linear(x) for x in m.modules()) for m in mod):
            continue
        key = (len(mod) == n_cfg, len(mod), -name.count("."))
        if best is None or key > best[0]:
            best = (key, name, mod)
    if best is None:
        raise DiscoveryError(f"{type(model).__name__}: no ModuleList of repeated blocks with linear layers")
    return best[1], best[2]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def layer_signature(layer: nn.Module) -> tuple:
    return (type(layer), tuple((n, tuple(p.shape)) for n, p in layer.named_parameters()),
            tuple((n, type(m).__name__) for n, m in layer.named_modules()))


class _Outputs:
    """Output hooks on every module outside the decoder layers (the rotary module's (cos, sin), ...)."""

    def __init__(self, model, layers_path):
        self.outputs, self.handles = {}, []
        for name, mod in model.named_modules():
            if name and not (name == layers_path or name.startswith(layers_path + ".")):
                self.handles.append(mod.register_forward_hook(self._post(name)))

    def _post(self, name):
        def hook(mod, args, out):
            if isinstance(out, tuple) and out and all(isinstance(t, torch.Tensor) for t in out):
                self.outputs.setdefault(name, []).append(out)     # every call (Gemma-3: one per layer type)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


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


def _rotary_path(cap: _Outputs, kwargs: dict) -> str | None:
    pe = kwargs.get("position_embeddings")
    if not isinstance(pe, (tuple, list)) or not pe or not isinstance(pe[0], torch.Tensor):
        return None
    return next((name for name, outs in cap.outputs.items() if any(out[0] is pe[0] for out in outs)), None)


def _export(layer: nn.Module, index: int, args, kwargs):
    # a dict-like container torch.export does not take (Gemma 4's KVSharingDict, a UserDict) goes in as a plain dict
    kwargs = {k: dict(v) if isinstance(v, UserDict) else v for k, v in kwargs.items()}
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
    path, layers = find_layers(model)
    groups: dict[tuple, int] = {}
    rep = {i: (i if all_layers else groups.setdefault(layer_signature(layer), i)) for i, layer in enumerate(layers)}
    wanted = sorted(set(rep.values()))
    config = getattr(model, "config", None)
    was_training = model.training
    restore = _switch_attention(model, attn_implementation)
    cap = _Outputs(model, path)
    try:                        # the export re-runs the layers: same implementation and mode as the capture
        model.eval()
        with recording_inputs(layers, wanted) as calls:
            run_until_stopped(model, probe_ids(model, seq_len))
        cap.close()
        missing = [i for i in wanted if i not in calls]
        if missing:
            raise DiscoveryError(f"layers {missing} of {path} were not called by a forward pass on input_ids")
        described, mixers = {}, {}
        for i in wanted:
            try:
                described[i] = layer_discovery(OpGraph(_export(layers[i], i, *calls[i]), i), i, layers[i], config)
            except NoAttentionError as e:     # a hybrid's mixer layer, if other layers have attention
                mixers[i] = e
        if not described:
            raise DiscoveryError(f"no layer has attention (a state-space or recurrent model: nothing a3mod reduces); "
                                 f"{next(iter(mixers.values()))}")
    finally:
        cap.close()
        model.train(was_training)
        if restore is not None:
            model.set_attn_implementation(restore)
    out = tuple(described[i] if rep[i] == i else dataclasses.replace(described[rep[i]], index=i, same_as=rep[i])
                for i in range(len(layers)) if rep[i] in described)
    left = {i: f"{type(layers[i]).__name__}: {mixers[rep[i]]}" for i in range(len(layers)) if rep[i] in mixers}
    rotary = _rotary_path(cap, calls[min(described)][1])
    first = min(described)
    return Discovery(getattr(config, "model_type", None), path, rotary, out, len(wanted),
                     time.perf_counter() - t0, _table_layout(calls[first][1].get("position_embeddings")), left)


def _table_layout(pe) -> str | None:
    """"half" when the cos table is cat(freqs, freqs), "interleaved" when each frequency sits twice in a row."""
    if not isinstance(pe, (tuple, list)) or not pe or not isinstance(pe[0], torch.Tensor) or pe[0].shape[-1] < 2:
        return None
    cos = pe[0]
    r = cos.shape[-1]
    if len(pe) == 2 and pe[1].shape == cos.shape and cos.shape[-2] > 1 and torch.all(cos[..., 0, :] == 0) and \
            torch.all(pe[1][..., 0, :] == 1):       # (sin, cos): position 0 has sin 0, cos 1 (GPT-J)
        return "sin_cos"
    if torch.equal(cos[..., : r // 2], cos[..., r // 2:]):
        return "half"
    if torch.equal(cos[..., 0::2], cos[..., 1::2]):
        return "interleaved"
    return "other"
