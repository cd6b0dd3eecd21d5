"""Per-layer working copy of the weights that passes transform, and the compact modules built from it.

`LayerWork.from_view` reads a decoder layer (through its adapter) into float64 per-head weights in
`x @ W` form, with each bias as an extra input row. Passes edit the work; `build` makes a
`ReducedHeadAttention` and a `ReducedMLP` from it; `a3mod.apply` swaps them into the layer.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..arch import LayerView, get_path
from ..arch.experts import narrowed
from ..arch.mla import narrowed_mla
from ..errors import UnsupportedModelError
from ..modules import NarrowLinear, ReducedHeadAttention, ReducedMLP
from ..modules.attention import ROPE_TABLES
from ..modules.mlp import MLPConfig
from ..modules.narrow import NarrowConfig


def _aug(w: Tensor, b: Tensor | None) -> Tensor:
    """(out, in) weight + bias -> (in [+1], out) float64, bias as the last input row."""
    w = w.detach().double().t()
    return torch.cat([w, b.detach().double()[None]], 0) if b is not None else w


def rope_perm(head_dim: int, rot_dim: int, layout: str | None) -> Tensor:
    """Column order that puts a head into rotate_half layout (identity unless the layout is interleaved)."""
    p = torch.arange(head_dim)
    if layout == "interleaved" and rot_dim:
        p[:rot_dim] = torch.cat([torch.arange(0, rot_dim, 2), torch.arange(1, rot_dim, 2)])
    return p


def rope_table_index(rot_dim: int, table: str) -> Tensor:
    """Index into the model's (cos, sin) table for each dim of a head in rotate_half layout: dim d rotates at
    frequency d mod rot/2, which a "half" table holds at d and an "interleaved" table at 2 (d mod rot/2)."""
    if table not in (*ROPE_TABLES, "interleaved"):
        raise UnsupportedModelError(f"rope_table {table!r}; known: {sorted((*ROPE_TABLES, 'interleaved'))}")
    d = torch.arange(rot_dim)
    return 2 * (d % max(rot_dim // 2, 1)) if table == "interleaved" else d    # sin_cos, once: "half" in the module


@dataclass
class AttnWork:
    wq: Tensor            # (H, d_in[+1], r_qk)   query heads, bias row last if q_bias
    wk: Tensor            # (Hkv, d_in[+1], r_qk)
    wv: Tensor            # (Hkv, d_in[+1], r_vo)
    wo: Tensor            # (H, r_vo, d_m)
    bo: Tensor | None     # (d_m,)
    rope_index: Tensor    # (Hkv, rot) original rotary dims kept per KV group (rotate_half order)
    rot_dim: int          # rotary dims in the reduced head (first rot_dim columns)
    q_bias: bool
    k_bias: bool
    v_bias: bool
    perm: Tensor          # column order applied to the original heads (for mapping statistics)
    qk_norm: str | None = None   # q/k norm before RoPE ("head" / "all"): QK must stay at the full head dim
    wg: Tensor | None = None     # (H, d_in[+1], r_vo) output gate per query head (bias row last if g_bias), or None
    g_bias: bool = False
    gate_head: bool = False      # one gate per head (wg (H, d_in[+1], 1)): untouched by the value dims


@dataclass
class MlpWork:
    gate: tuple[Tensor, Tensor | None] | None   # (W (d_i, d_m), b) float64 or None
    up: tuple[Tensor, Tensor | None]
    down: tuple[Tensor, Tensor | None]          # (W (d_m, d_i), b)
    kept: Tensor                                 # original neuron indices, ascending
    orig: int                                    # original intermediate width


@dataclass
class MLAWork:
    """Multi-head latent attention (a3mod.arch.mla): per-head position-free q/k dims and values, float64."""
    wq: Tensor            # (H, d_q, r_nope)   q position-free part from the q projection's input
    wk: Tensor            # (H, kv_lora, r_nope)
    wv: Tensor            # (H, kv_lora, r_v)
    wo: Tensor            # (H, r_v, d_m)
    bo: Tensor | None
    rot_dim: int          # the RoPE dims (untouched)
    qk_norm: str | None = None


@dataclass
class ExpertsWork:
    """An MoE layer's routed experts: which neurons every expert keeps (the weights stay where they are)."""
    kept: Tensor                                 # (E, k) original neuron indices per expert, ascending
    orig: int                                    # original width of each expert
    fallback: list[int] | None = None            # experts scored from their weights (too few routed tokens)
    down: Tensor | None = None                   # (E, d_m, k) re-fitted down columns (A3Experts(update=True))


@dataclass
class LayerWork:
    view: LayerView
    attn: AttnWork | MLAWork | None              # None: a hybrid's mixer layer (its MLP only)
    mlp: MlpWork | None                          # None: an MoE layer without a shared expert
    experts: ExpertsWork | None = None

    @classmethod
    def from_view(cls, v: LayerView) -> "LayerWork":
        if v.left:
            raise UnsupportedModelError(f"layer {v.index}: {v.left}")
        d = v.dims
        if v.attn is None:          # a hybrid's mixer layer: the mixer stays, the MLP is reduced
            return cls(v, None, *cls._mlp_work(v))
        if v.spec.mla:
            mv = v.mla_view()
            attn = MLAWork(*mv.weights(), rot_dim=mv.rope)
            return cls(v, attn, *cls._mlp_work(v))
        (wq, bq), (wk, bk), (wv, bv) = v.qkv_params()
        wo, bo = v.o_params()
        gate = v.gate_params()
        perm = rope_perm(d.head_dim, d.rot_dim, d.rope)

        def heads(w, b, n):  # (out, in) -> (n, in[+1], d_h) with columns in rotate_half order
            a = _aug(w, b)
            return a.view(a.shape[0], n, d.head_dim).permute(1, 0, 2)

        attn = AttnWork(
            wq=heads(wq, bq, d.heads)[..., perm], wk=heads(wk, bk, d.kv_heads)[..., perm],
            wv=heads(wv, bv, d.kv_heads), wo=wo.detach().double().t().reshape(d.heads, d.head_dim, d.hidden),
            bo=None if bo is None else bo.detach().double(),
            rope_index=rope_table_index(d.rot_dim, v.spec.rope_table).repeat(d.kv_heads, 1), rot_dim=d.rot_dim,
            q_bias=bq is not None, k_bias=bk is not None, v_bias=bv is not None, perm=perm, qk_norm=v.qk_norm,
            wg=None if gate is None else _aug(*gate).view(-1, d.heads, 1).permute(1, 0, 2) if v.spec.attn_gate_head
            else heads(*gate, d.heads), g_bias=gate is not None and gate[1] is not None,
            gate_head=v.spec.attn_gate_head)
        return cls(v, attn, *cls._mlp_work(v))

    @staticmethod
    def _mlp_work(v: LayerView) -> tuple[MlpWork | None, ExpertsWork | None]:
        mlp = experts = None
        if v.has_mlp:
            gate, up, down = v.mlp_params()
            f64 = lambda p: (p[0].detach().double(), None if p[1] is None else p[1].detach().double())  # noqa: E731
            mlp = MlpWork(None if gate is None else f64(gate), f64(up), f64(down), torch.arange(up[0].shape[0]),
                          up[0].shape[0])
        if v.experts is not None:
            ev = v.experts_view()
            experts = ExpertsWork(torch.arange(ev.inter).repeat(ev.num, 1), ev.inter)
        return mlp, experts

    # ------------------------------------------------------------------------------------ install
    def build(self, config, dtype: torch.dtype, device, mlp: bool = True) -> list[tuple[str, nn.Module]]:
        """The compact modules as (path in the layer, module) swaps: the attention (and, for BERT, its
        output projection), then, if `mlp`, the MLP (a ReducedMLP, or narrower linears on the layer)."""
        a, d, v = self.attn, self.view.dims, self.view
        kw = dict(device=device, dtype=dtype)
        old = v.attn
        if a is None:                       # a hybrid's mixer layer: its MLP only
            return self._mlp_swaps(config, kw) if mlp else []
        if isinstance(a, MLAWork):          # narrowed in place of the original (same class and forward)
            swaps = [(v.spec.attn, narrowed_mla(old, a.wq, a.wk, a.wv, a.wo, a.bo))]
            return swaps + (self._mlp_swaps(config, kw) if mlp else [])
        attn = ReducedHeadAttention(
            config, v.index, hidden=d.hidden, heads=d.heads, kv_heads=d.kv_heads, head_dim=d.head_dim,
            qk_dim=a.wq.shape[-1], vo_dim=a.wv.shape[-1], rot_dim=a.rot_dim, scaling=v.scaling(),
            bias=dict(q=a.q_bias, k=a.k_bias, v=a.v_bias, o=a.bo is not None),
            sliding_window=v.sliding_window(config), is_causal=v.is_causal(),
            dropout=v.attn_dropout(), out_dropout=v.out_dropouts()[0], softcap=v.softcap(),
            rope_table=v.spec.rope_table if v.spec.rope_table in ROPE_TABLES else "half",   # interleaved: permuted
            alibi=v.spec.alibi, **_temperature_args(v),
            sinks=v.has_sinks, gate=a.wg is not None, gate_bias=a.g_bias, gate_per_head=a.gate_head,
            **({"gate_act": v.spec.attn_gate_act} if a.wg is not None and v.spec.attn_gate_act != "sigmoid" else {}),
            bool_mask=v.spec.bool_mask, residual=v.spec.attn_residual,
            out_proj=not v.spec.o_from_layer,
            **_qk_norm_args(a, v), **kw)
        with torch.no_grad():
            _load_heads(attn.q_proj, a.wq, a.q_bias)
            _load_heads(attn.k_proj, a.wk, a.k_bias)
            _load_heads(attn.v_proj, a.wv, a.v_bias)
            if a.wg is not None:
                _load_heads(attn.g_proj, a.wg, a.g_bias)
            o = attn.o_proj if attn.o_proj is not None else NarrowLinear(NarrowConfig(
                in_features=d.heads * a.wv.shape[-1], out_features=d.hidden, bias=a.bo is not None,
                orig_in=d.heads * d.head_dim, orig_out=d.hidden), **kw)
            o.weight.copy_(a.wo.reshape(-1, d.hidden).t())
            if a.bo is not None:
                o.bias.copy_(a.bo)
            attn.rope_index = a.rope_index.to(device=device, dtype=torch.long).contiguous()
            if attn.sinks is not None:      # per-head logits: untouched by any reduction of the head dims
                attn.sinks.copy_(getattr(old, v.spec.sinks))
        attn.train(old.training)
        swaps = [(v.spec.attn, attn)]
        if attn.o_proj is None:                         # BERT: the output projection follows the attention module
            swaps.append((v.spec.o, o.train(v.o_module().training)))
        return swaps + (self._mlp_swaps(config, kw) if mlp else [])

    def _mlp_swaps(self, config, kw) -> list[tuple[str, nn.Module]]:
        m, v, d = self.mlp, self.view, self.view.dims
        swaps = []
        if self.experts is not None:      # the experts module, narrowed in place of the original (same class)
            x = self.experts
            swaps.append((v.experts_path, narrowed(v.experts, d.hidden, x.kept, x.fallback, x.down)
                          .train(v.experts.training)))
        if m is None:
            return swaps
        if not v.spec.mlp:
            return self._narrow_mlp(kw)
        if v.spec.mlp_adapters:
            return swaps + self._adapted_mlp(kw)
        cfg = MLPConfig(hidden=d.hidden, orig_inter=m.orig, inter=m.up[0].shape[0], act=v.act_name(config),
                        gated=m.gate is not None, up_bias=m.up[1] is not None, down_bias=m.down[1] is not None,
                        dropout=v.out_dropouts()[1], residual=v.spec.mlp_residual)
        mlp = _materialize(ReducedMLP(cfg, device="meta", dtype=kw["dtype"]), kw["device"])   # weights copied in:
        with torch.no_grad():                                                                # no random init first
            for lin, wb in ((mlp.gate_proj, m.gate), (mlp.up_proj, m.up), (mlp.down_proj, m.down)):
                if lin is None:
                    continue
                w, b = wb
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
        mlp.kept = m.kept.tolist()
        _keep_learned_activation(mlp, v.mlp)
        mlp.train(v.mlp.training)
        return swaps + [(v.mlp_path, mlp)]

    def _narrow_mlp(self, kw) -> list[tuple[str, nn.Module]]:
        """An MLP whose linears live on the layer (OPT, BERT): up / down become narrower linears in place,
        so the layer's own activation, dropout, residual and norms keep running."""
        m, v = self.mlp, self.view
        if m.gate is not None or v.spec.conv1d:
            raise UnsupportedModelError("an MLP on the layer itself must be non-gated nn.Linear up/down "
                                        f"(spec gate={v.spec.gate!r}, conv1d={v.spec.conv1d})")
        kept = m.kept.tolist()
        old_up, old_down = get_path(v.layer, v.spec.up), v.down_module()
        return [(v.spec.up, _narrowed(m.up, m.orig, kept, "out", kw).train(old_up.training)),
                (v.spec.down, _narrowed(m.down, m.orig, kept, "in", kw).train(old_down.training))]

    def _adapted_mlp(self, kw) -> list[tuple[str, nn.Module]]:
        """A gated MLP with a fused [gate | up] projection and per-use low-rank adapters added to its output
        (Zamba2's shared MLP, `ArchSpec.mlp_adapters`): gate_up, the output linear of every adapter and down become
        narrower linears in place (the kept neurons' rows of each half, and their columns of down), so the MLP's own
        forward keeps running and picks the adapter of the layer it runs in."""
        m, v, s = self.mlp, self.view, self.view.spec
        kept = m.kept.tolist()
        rows = kept + [m.orig + k for k in kept]                  # the kept neurons in [gate | up]
        (wg, bg), (wu, bu) = m.gate, m.up
        fused = (torch.cat([wg, wu]), None if bu is None else torch.cat([bg, bu]))     # (2r, d_m)
        old_gu, old_down = get_path(v.mlp, s.gate_up), v.down_module()
        swaps = [(f"{v.mlp_path}.{s.gate_up}", _narrowed(fused, 2 * m.orig, rows, "out", kw).train(old_gu.training)),
                 (f"{v.mlp_path}.{s.down}", _narrowed(m.down, m.orig, kept, "in", kw).train(old_down.training))]
        for i, ad in enumerate(get_path(v.mlp, s.mlp_adapters)):
            if isinstance(ad, nn.Identity):                       # a slot of another shared block
                continue
            out = ad[-1] if isinstance(ad, nn.Sequential) and len(ad) else None
            if type(out) is not nn.Linear or out.out_features != 2 * m.orig:
                raise UnsupportedModelError(f"{v.mlp_path}.{s.mlp_adapters}.{i}: an adapter must be Identity or a "
                                            f"Sequential ending in an nn.Linear with {2 * m.orig} outputs, got {ad}")
            w, b = out.weight.detach().double()[rows], None if out.bias is None else out.bias.detach().double()[rows]
            swaps.append((f"{v.mlp_path}.{s.mlp_adapters}.{i}.{len(ad) - 1}",
                          _narrowed((w, b), 2 * m.orig, rows, "out", kw).train(out.training)))
        return swaps


def _narrowed(wb: tuple[Tensor, Tensor | None], orig: int, kept: list[int], side: str, kw) -> NarrowLinear:
    """A NarrowLinear holding weight (out, in) and bias `wb`, cut from a linear whose `side` was `orig` wide."""
    w, b = wb
    out_f, in_f = w.shape
    lin = NarrowLinear(NarrowConfig(in_features=in_f, out_features=out_f, bias=b is not None,
                                    orig_in=orig if side == "in" else in_f, orig_out=orig if side == "out" else out_f,
                                    side=side), kept, **kw)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _temperature_args(v: LayerView) -> dict:
    t = v.temperature()
    return {} if t is None else dict(temperature_scale=t[0], temperature_floor=t[1])


def _qk_norm_args(a: AttnWork, v: LayerView) -> dict:
    """Copies of the q/k norm modules for a qk-norm layer (its QK part is kept at the full head dim)."""
    if not a.qk_norm:
        return {}
    q_norm, k_norm = v.qk_norm_modules()
    return dict(qk_norm=a.qk_norm, q_norm=copy.deepcopy(q_norm), k_norm=copy.deepcopy(k_norm),
                **({"qk_norm_after_rope": True} if v.spec.qk_norm_after_rope else {}))


def _load_heads(lin: nn.Linear, w: Tensor, has_bias: bool) -> None:
    """(n, d_in[+1], r) per-head work -> Linear weight (n*r, d_in) and bias."""
    n, _, r = w.shape
    flat = w.permute(1, 0, 2).reshape(w.shape[1], n * r)       # (d_in[+1], n*r)
    if has_bias:
        lin.weight.copy_(flat[:-1].t())
        lin.bias.copy_(flat[-1])
    else:
        lin.weight.copy_(flat.t())



def _keep_learned_activation(mlp: nn.Module, orig: nn.Module) -> None:
    """An activation with learned parameters (Apertus' xIELU: alpha_p, alpha_n, beta, eps) is elementwise, so it
    commutes with dropping neurons: the reduced MLP keeps a copy of the original's, values and dtype included
    (a fresh ACT2FN instance would hold the defaults)."""
    act = mlp.act_fn
    if not isinstance(act, nn.Module) or not (list(act.parameters()) or list(act.buffers())):
        return
    same = [m for m in orig.modules() if type(m) is type(act)]
    if len(same) == 1:
        mlp.act_fn = copy.deepcopy(same[0])


def _materialize(mod: nn.Module, device) -> nn.Module:
    """`mod` with the parameters and buffers it was built with on the meta device put on `device` (None: the default
    device) uninitialized, for a module whose every weight is copied in next: nn.Linear's random init skipped (about
    a twentieth of A3's time on Qwen2.5-1.5B). Parts built elsewhere (a learned activation) keep their values."""
    device = torch.get_default_device() if device is None else device
    for m in mod.modules():
        if any(t.is_meta for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))):
            m.to_empty(device=device, recurse=False)
    return mod
