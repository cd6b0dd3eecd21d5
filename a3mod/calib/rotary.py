"""Hooks that capture an attention's rotary queries and keys as the layer computes them: the q/k/v projections'
outputs, and the rotation the model passes its attention (position_embeddings). Read by the score statistic
(kind "qkgram", `calib.stats`) and the sequential QK re-fit's targets (`pipeline.seq_refit`)."""
from __future__ import annotations

from torch import Tensor

from ..arch import LayerView
from ..errors import CalibrationError
from ..modules.attention import ROPE_TABLES, half_table
from ..pipeline.rewrite import rope_perm, rope_table_index


def scored(view: LayerView) -> bool:
    """Whether the QK update covers this layer: fully rotary q/k that A3QK reduces by pair selection (no qk-norm,
    no latent attention, no partial rotary)."""
    d = view.dims
    return view.attn is not None and not view.spec.mla and not view.qk_norm and 0 < d.rot_dim == d.head_dim


def qkv_hooks(view: LayerView, on_qkv) -> list:
    """Forward hooks calling on_qkv(q, k, v) with the outputs of a (non-latent) attention's q, k and v projections
    (split when fused) once per call of the layer; returns the handles."""
    mods = view.qkv_modules()
    if len(mods) == 1:
        return [mods[0].register_forward_hook(lambda m, i, out: on_qkv(*view.split_qkv(out)))]
    got: dict[int, Tensor] = {}

    def make(j):
        def hook(m, i, out):
            got[j] = out
            if len(got) == 3:
                on_qkv(got[0], got[1], got[2])
                got.clear()
        return hook
    return [m.register_forward_hook(make(j)) for j, m in enumerate(mods)]


def rotary_hook(view: LayerView, hs: list):
    """A pre-hook on the attention (appended to `hs`) that keeps the rotation the layer is given; returns
    rotary(q, k) -> (q (B,T,H,rot), k (B,T,Hkv,rot), cos, sin (B|1,T,rot)): a batch's projected queries (without an
    output gate's channels) and keys as heads in rotate_half layout, with that batch's rotation in the same layout
    (what `calib.scores` reads). Only for `scored` layers."""
    d, table = view.dims, view.spec.rope_table
    perm, index = rope_perm(d.head_dim, d.rot_dim, d.rope), rope_table_index(d.rot_dim, table)
    seen: dict = {}

    def on_attn(m, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is None:
            raise CalibrationError(f"A3QK(update=True): layer {view.index}'s attention was called without "
                                   f"position_embeddings (the rotation it applies), which the QK update reads")
        cos, sin = half_table(pe, table) if table in ROPE_TABLES else pe
        seen["rot"] = tuple(t.reshape(-1, *t.shape[-2:])[..., index.to(t.device)] for t in (cos, sin))

    def rotary(q: Tensor, k: Tensor):
        cos, sin = seen.pop("rot")
        q = q.reshape(*q.shape[:-1], d.heads, d.head_dim)[..., perm]
        k = k.reshape(*k.shape[:-1], d.kv_heads, d.head_dim)[..., perm]
        return q, k, cos, sin

    hs.append(view.attn.register_forward_pre_hook(on_attn, with_kwargs=True))
    return rotary
