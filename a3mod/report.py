"""Per-layer dims, parameters, FLOPs and KV-cache bytes of a (compressed) model.

Parameters counted: weights and biases of the linear layers inside the decoder layers (embeddings and
lm_head excluded), the quantity every a3mod ratio refers to.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from torch import nn

from .arch import dims_of, find_path, get_path, layer_views, mlp_paths, shared_groups, spec_for
from .arch.experts import ExpertsView, is_experts
from .arch.mla import is_mla
from .arch.views import kv_heads_of, left_reason, mixer_reason
from .errors import UnsupportedModelError
from .io.tensors import dedup_tensors
from .modules import LowRankLinear
from .modules.linears import is_quantized
from .pipeline.plan import COMPONENTS, layer_plan


def _linear_sizes(m: nn.Module) -> tuple[int, int] | None:
    """(weight, bias) element counts of a linear layer, counted logically: a quantized linear (bitsandbytes,
    HQQ) as the float in x out weight it stands for. None for modules that are not linear layers."""
    if type(m).__name__ == "Conv1D":
        return m.weight.numel(), (m.bias.numel() if m.bias is not None else 0)
    if is_experts(m):           # routed experts: E stacked (gate/)up and down linears as 3-D parameters
        ps = list(m._parameters.values())
        return sum(p.numel() for p in ps if p.dim() == 3), sum(p.numel() for p in ps if p.dim() < 3)
    if isinstance(m, nn.Linear) or type(m).__name__ == "HQQLinear":
        bias = getattr(m, "bias", None)
        return m.in_features * m.out_features, (bias.numel() if bias is not None else 0)
    return None


def linear_param_count(module: nn.Module) -> int:
    """Weights + biases of the nn.Linear (and GPT-2 Conv1D, and quantized linear) modules inside `module`."""
    return sum(sum(s) for m in module.modules() if (s := _linear_sizes(m)) is not None)


def _storage(model: nn.Module, spec) -> tuple[int, int, int]:
    """(bytes of the state dict as a3mod.save writes it, bytes of the decoder-layer linear weights with their
    quantization metadata (biases excluded), their logical weight count)."""
    tensors, _ = dedup_tensors(model.state_dict())
    owners, weights = [], 0
    for i, layer in enumerate(get_path(model, spec.layers)):
        for n, m in layer.named_modules():
            if (s := _linear_sizes(m)) is not None:
                owners.append(f"{spec.layers}.{i}.{n}.")
                weights += s[0]
    owners, biases = tuple(owners), {o + "bias" for o in owners}
    lin = sum(t.nbytes for k, t in tensors.items() if k.startswith(owners) and k not in biases)
    return sum(t.nbytes for t in tensors.values()), lin, weights


@dataclass
class LayerRow:
    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_dim: int
    vo_dim: int
    mlp_dim: int
    mlp_orig: int
    params: int
    params_orig: int
    kv_elems: int = 0        # elements cached per token (K + V, or the latents of a LatentKVAttention)
    kv_elems_orig: int = 0
    lowrank: int = 0         # linears stored as two low-rank factors (baselines)
    quantized: int = 0       # quantized linears (BnbInt8, Bnb4bit, HQQ)
    left: str = ""           # why a3mod left the layer as it is (a hybrid's mixer layer); its dims read 0
    experts: int = 0         # an MoE layer's routed experts, how many a token uses, and each one's width
    experts_active: int = 0
    expert_dim: int = 0
    expert_orig: int = 0
    experts_fallback: int = 0    # experts whose neurons were scored from their weights (too few routed tokens)
    mixer: str = ""          # why the attention part is left (a hybrid's mixer beside a reduced MLP); qk/vo read 0
    kept_whole: int = 0      # linear params a3mod leaves by design: a mixer's, a router's (a left layer: all)
    active: int = -1         # parameters one token runs through (routed experts at top-k); -1: all of `params`
    active_orig: int = -1
    qk_orig: int = -1        # original q/k and v/o head dims when they differ from head_dim (latent attention)
    vo_orig: int = -1

    def active_params(self, orig: bool = False) -> int:
        a = self.active_orig if orig else self.active
        return a if a >= 0 else (self.params_orig if orig else self.params)


@dataclass
class Report:
    model_type: str
    rows: list[LayerRow]
    dtype_bytes: int
    context: int
    model_bytes: int = 0             # every state-dict tensor (tied weights once, quantization metadata included)
    linear_weight_bytes: int = 0     # decoder-layer linear weights + their quantization metadata (no biases)
    linear_weights: int = 0          # their logical element count (in x out per linear)
    attn_whole: str = ""             # why every layer's attention stays as it is (ArchSpec.attn_whole), or ""
    shared: list = field(default_factory=list)   # the layers running each shared block (Zamba2), counted per use

    @property
    def bits_per_param(self) -> float:
        """Stored bits per decoder-layer linear weight, quantization metadata included (32 for plain fp32)."""
        return 8 * self.linear_weight_bytes / self.linear_weights if self.linear_weights else 0.0

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def params_orig(self) -> int:
        return sum(r.params_orig for r in self.rows)

    @property
    def ratio(self) -> float:
        """Achieved fraction of decoder-layer linear parameters removed."""
        return 1.0 - self.params / self.params_orig

    @property
    def kept_whole(self) -> int:
        """Linear params a3mod leaves by design: hybrid mixers, MoE routers and left layers."""
        return sum(r.kept_whole for r in self.rows)

    @property
    def ratio_reducible(self) -> float:
        """Achieved fraction of the attention and MLP parameters removed (what a ratio asks of a hybrid, whose mixers
        stay as they are); equals `ratio` for a model without mixers."""
        whole = self.kept_whole
        return 1.0 - (self.params - whole) / max(1, self.params_orig - whole)

    def kv_bytes_per_token(self, orig: bool = False) -> int:
        return sum(r.kv_elems_orig if orig else r.kv_elems for r in self.rows) * self.dtype_bytes

    def flops_per_token(self, orig: bool = False) -> int:
        """Decoder-layer FLOPs for one token at `context` positions: 2 * the linear params it runs through (an MoE
        layer's routed experts at its top-k) + attention scores/mix."""
        attn = sum(2 * r.heads * self.context * (
            (r.qk_orig if r.qk_orig >= 0 else r.head_dim) + (r.vo_orig if r.vo_orig >= 0 else r.head_dim) if orig
            else r.qk_dim + r.vo_dim) for r in self.rows if not r.left)   # a left mixer: its linear params only
        return 2 * sum(r.active_params(orig) for r in self.rows) + attn

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, "params": self.params, "params_orig": self.params_orig,
                "ratio": self.ratio, "ratio_reducible": self.ratio_reducible, "kept_whole": self.kept_whole,
                "kv_bytes_per_token": self.kv_bytes_per_token(),
                "kv_bytes_per_token_orig": self.kv_bytes_per_token(True), "flops_per_token": self.flops_per_token(),
                "flops_per_token_orig": self.flops_per_token(True), "context": self.context,
                "active_params": sum(r.active_params() for r in self.rows),
                "active_params_orig": sum(r.active_params(True) for r in self.rows),
                "model_bytes": self.model_bytes, "bits_per_param": self.bits_per_param, "attn_whole": self.attn_whole,
                "shared": self.shared, "layers": [asdict(r) for r in self.rows]}

    def __str__(self) -> str:
        head = (f"{'layer':>5} {'heads':>7} {'qk':>9} {'vo':>9} {'mlp':>11} {'kv/token':>11} {'low-rank':>8} "
                f"{'params':>21}")
        lines = [f"a3mod report: {self.model_type}, decoder-layer linear parameters (embeddings/lm_head excluded)",
                 head, "-" * len(head)]
        for r in self.rows:
            if r.left:
                lines.append(f"{r.layer:>5} left as it is ({r.left.split('(children: ', 1)[-1].split(' (')[0]}: no "
                             f"attention a3mod reduces) {r.params_orig:>10,}->{r.params:<10,}")
                continue
            qk0, vo0 = (r.qk_orig if r.qk_orig >= 0 else r.head_dim), (r.vo_orig if r.vo_orig >= 0 else r.head_dim)
            if r.mixer:
                what = r.mixer.split("(children: ", 1)[-1].split(" (")[0].split(":")[0]
                lines.append(f"{r.layer:>5} {'mixer':>7} {'(' + what[:17] + ')':>19} {r.mlp_orig:>5}->{r.mlp_dim:<5} "
                             f"{'-':>11} {r.lowrank:>8} {r.params_orig:>10,}->{r.params:<10,}")
            else:
                lines.append(f"{r.layer:>5} {r.heads:>3}/{r.kv_heads:<3} {qk0:>3}->{r.qk_dim:<4} "
                             f"{vo0:>3}->{r.vo_dim:<4} {r.mlp_orig:>5}->{r.mlp_dim:<5} "
                             f"{r.kv_elems_orig:>5}->{r.kv_elems:<5} {r.lowrank:>8} "
                             f"{r.params_orig:>10,}->{r.params:<10,}")
            if r.experts:
                lines.append(f"{'':>5} {r.experts} routed experts (top-{r.experts_active}), each "
                             f"{r.expert_orig}->{r.expert_dim}; params per token {r.active_params(True):,}->"
                             f"{r.active_params():,}" + (f"; {r.experts_fallback} scored from weights (too few "
                                                         f"routed calibration tokens)" if r.experts_fallback else ""))
        kv0, kv1 = self.kv_bytes_per_token(True), self.kv_bytes_per_token()
        f0, f1 = self.flops_per_token(True), self.flops_per_token()
        lines += ["-" * len(head),
                  f"params        {self.params_orig:,} -> {self.params:,}  (removed {100 * self.ratio:.4f}%)"]
        if self.kept_whole:
            lines.append(f"              attention and MLP parts: removed {100 * self.ratio_reducible:.4f}% "
                         f"({self.kept_whole:,} params of hybrid mixers, routers and left layers kept as they are)")
        if self.attn_whole:
            lines.append(f"              attention kept whole in every layer: {self.attn_whole}")
        for g in self.shared:
            lines.append(f"              layers {g} run one shared block (tied): its parameters are counted once per "
                         f"use above, stored once")
        lines += [
                  f"KV bytes/token {kv0:,} -> {kv1:,}  ({kv1 / kv0:.4f}x, {self.dtype_bytes}-byte elements)",
                  f"FLOPs/token   {f0:,} -> {f1:,}  ({f1 / f0:.4f}x at context {self.context})",
                  f"storage       {self.model_bytes:,} bytes (state dict, tied weights once); decoder-layer linear "
                  f"weights {self.bits_per_param:.3f} bits/param ({sum(r.quantized for r in self.rows)} quantized)"]
        return "\n".join(lines)


def _moe_row(row: LayerRow, experts: nn.Module, plan, config) -> None:
    """Fill an MoE layer's expert columns: count, top-k, widths, and the parameters a token runs through."""
    n = next(p for p in experts._parameters.values() if p.dim() == 3).shape[0]
    k = int(getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None) or n)
    row.experts, row.experts_active = n, k
    row.expert_dim, row.expert_orig = plan.kept("experts"), plan.full("experts")
    row.experts_fallback = len(getattr(experts, "a3mod_experts", {}).get("fallback", []))

    v = ExpertsView(experts, config.hidden_size)
    now = sum(_linear_sizes(experts))
    per_neuron = n * ((2 if v.gated else 1) * (v.hidden + v.bias) + v.hidden)   # its gate/up rows, its down column
    was = now + (row.expert_orig - row.expert_dim) * per_neuron
    row.active = row.params - now + now * k // n
    row.active_orig = row.params_orig - was + was * k // n


def _kept_whole(layer: nn.Module, spec, attn: nn.Module | None, n: int) -> int:
    """Linear params of `layer` outside the attention and MLP a3mod reduces: a hybrid's mixer (in its own layer or
    beside the attention, Falcon-H1), an MoE router. 0 when the MLP's linears sit on the layer itself (OPT, BERT)."""
    if not spec.mlp:
        return 0
    used = (linear_param_count(attn) if attn is not None else 0) + sum(
        linear_param_count(get_path(layer, p)) for p in mlp_paths(layer, spec) if p)
    if spec.o_from_layer:
        used += linear_param_count(get_path(layer, spec.o))
    return max(0, n - used)


def _attention_row(attn, whole, mixer: bool, plan, d) -> tuple[int, int, int, int, tuple[int, int] | None]:
    """(kept qk, kept vo, KV elements per token now and originally, (full qk, full vo) when not the model's head
    dim) of one layer: 0 for a hybrid's mixer, the module's own dims for an attention kept whole (Gemma 4's global
    layers have their own head dim; K and V are cached even where V = K)."""
    if mixer:
        return 0, 0, 0, 0, (0, 0)
    if whole is not None:
        hd = int(getattr(whole, "head_dim", d.head_dim))
        kv = _whole_kv(whole)
        return hd, hd, kv, kv, (hd, hd) if hd != d.head_dim else None
    kv0 = sum(COMPONENTS[c].kv_per_dim(d.kv_heads) * plan.full(c) for c in COMPONENTS)
    kv = getattr(attn, "kv_elems_per_token", None) or sum(    # a latent cache says its own size
        COMPONENTS[c].kv_per_dim(d.kv_heads) * plan.kept(c) for c in COMPONENTS)
    if is_mla(attn):           # MLA caches its latent and the shared RoPE key, which A3 leaves whole
        kv = kv0 = attn.kv_a_proj_with_mqa.out_features
    full = (plan.full("qk"), plan.full("ov"))
    return plan.kept("qk"), plan.kept("ov"), kv, kv0, full if full != (d.head_dim, d.head_dim) else None


def _whole_kv(attn: nn.Module) -> int:
    """KV elements per token an attention kept whole caches: MLA its latent and RoPE key, else K and V (cached as two
    tensors even where one projection gives both, DeepSeek-V4's kv_proj; its compressor's entries not counted)."""
    if is_mla(attn):
        return attn.kv_a_proj_with_mqa.out_features
    return 2 * (find_path(attn, "k_proj") or find_path(attn, "kv_proj")).out_features


def report(model: nn.Module, context: int = 2048) -> Report:
    """Describe every decoder layer of `model` (compressed by a3mod or not)."""
    spec = spec_for(model)
    d = dims_of(model.config, spec)
    orig = getattr(model, "a3mod_info", {}).get("orig_layer_params")
    rows = []
    for i, layer in enumerate(get_path(model, spec.layers)):
        n = linear_param_count(layer)
        left = left_reason(layer, spec)
        if left:        # no attention / MLP a3mod knows: no K/V cache of this kind either (the mixer keeps its state)
            rows.append(LayerRow(i, d.heads, d.kv_heads, d.head_dim, 0, 0, 0, 0, n, orig[i] if orig else n,
                                 quantized=sum(is_quantized(m) for m in layer.modules()), left=left, kept_whole=n))
            continue
        whole = find_path(layer, spec.attn) if spec.attn_whole else None     # kept as it is by design (Gemma 4)
        mixer = "" if whole is not None else mixer_reason(layer, spec) or ""   # a hybrid's mixer beside an MLP
        attn = None if mixer else get_path(layer, spec.attn)
        plan = layer_plan(i, layer, spec, d)            # kept dims per component, from the modules themselves
        kvh = kv_heads_of(attn, spec, d) if attn is not None else d.kv_heads     # MiMo-V2: per layer
        qk, vo, kv, kv0, full = _attention_row(attn, whole, bool(mixer), plan, replace(d, kv_heads=kvh))
        lowrank = sum(isinstance(m, LowRankLinear) for m in layer.modules())
        quantized = sum(is_quantized(m) for m in layer.modules())
        row = LayerRow(i, d.heads, d.kv_heads, d.head_dim, qk, vo, plan.kept("mlp"), plan.full("mlp"), n,
                       orig[i] if orig else n, kv, kv0, lowrank, quantized, mixer=mixer)
        row.kept_whole = _kept_whole(layer, spec, attn if attn is not None else whole, n)
        if full is not None:
            row.qk_orig, row.vo_orig = full
        if "experts" in plan.parts:
            _moe_row(row, get_path(layer, mlp_paths(layer, spec)[1]), plan, model.config)
        rows.append(row)
    p = next(model.parameters())
    return Report(model.config.model_type, rows, p.element_size() if p.is_floating_point() else 2, context,
                  *_storage(model, spec), attn_whole=spec.attn_whole or "", shared=_shared(model))


def _shared(model: nn.Module) -> list[list[int]]:
    """The layers running each shared block (tied), or [] (also where a3mod sees no layer it reduces)."""
    try:
        return shared_groups(layer_views(model))
    except UnsupportedModelError:
        return []
