"""Stock transformers export (format "hf"): an a3mod model written as a checkpoint of its base family's own model
type (llama, qwen2, mistral, ...), which transformers loads with no a3mod code, nor any engine that reads the same
config keys.

Exact by construction, by zero padding (docs/export.md has the derivation and what each engine reads):
- One head dim D for q, k and v in every layer (the config's `head_dim`). A layer that kept fewer q/k dims gets zero
  q/k rows (a zero pair adds 0 to every score); fewer value dims get zero value rows and zero o_proj columns.
- RoPE: every frequency some KV group of some layer kept gets one rotary pair slot (rows s and s + D/2, the
  rotate_half layout); kept dims RoPE does not rotate get zero-frequency slots. The slots' frequencies are written
  as `rope_type: "longrope"` with short_factor == long_factor, each factor chosen so that transformers' float32
  inverse frequency equals the original's bit for bit. When every layer kept every pair in place the original
  rope parameters are kept.
- The softmax scale folds into W_q (and its bias): the stock attention uses its own scale.
- One MLP width, the widest layer's: a narrower layer gets zero neurons (a zero down_proj column adds nothing).
Before anything is written the stock model (built on the meta device, sharing the a3mod model's tensors where
nothing is padded) must reproduce the a3mod model's logits; the folder is then published like `a3mod.save`'s.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..arch import layer_views
from ..arch.spec import dims_of, get_path
from ..errors import ExportError
from ..io import files
from ..io.sealed import model_sources, save_dtype
from ..modules import ReducedHeadAttention, ReducedMLP

RECORD = files.EXPORT_RECORD         # what the export cost (padding) and the files it wrote
ZERO_FACTOR = 1e30                  # longrope factor of a zero-frequency slot: angle < 1e-30 rad at any position
# rope_parameters keys that shape the frequencies (replaced by longrope's); a family's other keys are kept
_FREQ_KEYS = {"rope_type", "type", "rope_theta", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "low_freq_factor", "high_freq_factor", "short_factor", "long_factor", "attention_factor", "truncate",
              "original_max_position_embeddings", "partial_rotary_factor"}


@dataclass(frozen=True)
class HeadFacts:
    """One layer's attention as the export sees it: kept q/k and v/o dims per head, rotary dims among the q/k ones,
    and per KV group the original frequency index of each kept rotary pair (reduced dims i and i + rot/2)."""
    qk: int
    vo: int
    rot: int
    pairs: tuple[tuple[int, ...], ...]
    qk_norm: str | None = None
    nope: bool = False          # a NoPE layer of a RoPE model: the stock layer does not rotate either


@dataclass
class StockLayout:
    """The export's geometry: head dim, MLP width, and the frequency of each rotary pair slot (None: zero)."""
    head_dim: int
    inter: int | None
    slots: list[int | None] = field(default_factory=list)
    keep_rope: bool = False         # the original rope parameters express the slots (nothing moved)
    rows: list[list[list[int]]] = field(default_factory=list)   # per layer, per KV group: export row of each q/k dim


def _family_problems(spec) -> list[str]:
    """What of a family's layout the stock export cannot write (architecture facts from its ArchSpec)."""
    checks = [(spec.qkv is not None, "a fused qkv projection"),
              (spec.gate_up is not None, "a fused gate_up projection"),
              (spec.conv1d, "Conv1D weights"), (spec.mla, "multi-head latent attention"),
              (spec.sinks is not None, "attention sinks"), (spec.experts is not None, "routed experts"),
              (spec.alibi is not None, "ALiBi"),
              (spec.attn_residual or spec.mlp_residual, "a residual inside a module"),
              (spec.rope not in (None, "rotate_half"), f"RoPE layout {spec.rope!r}"),
              (spec.rope_table != "half", f"RoPE table layout {spec.rope_table!r}"),
              (spec.o_from_layer, "o_proj outside"),
              ((spec.q, spec.k, spec.v, spec.o) != ("q_proj", "k_proj", "v_proj", "o_proj"),
               "q/k/v/o names other than q_proj, k_proj, v_proj, o_proj"),
              ((spec.up, spec.down) != ("up_proj", "down_proj") or spec.gate not in (None, "gate_proj"),
               "MLP names other than gate_proj, up_proj, down_proj")]
    return [what for bad, what in checks if bad]


def _check_modules(model: nn.Module) -> None:
    """Every compact module is one the stock format can hold (reduced attention, reduced MLP), else ExportError."""
    for name, m in model.named_modules():
        if not isinstance(m, (ReducedHeadAttention, ReducedMLP)) and type(m).__module__.startswith(
                ("a3mod.modules", "a3mod.quant", "bitsandbytes")):
            raise ExportError(f"format 'hf': {name} is a {type(m).__name__}, which a stock checkpoint cannot hold "
                              f"(it holds A3's reduced attention and reduced MLPs, no low-rank, narrowed or "
                              f"quantized linears)")


def head_facts(attn: nn.Module, dims) -> HeadFacts:
    """The kept dims of one attention module (reduced or left whole) and each KV group's kept frequencies."""
    half = dims.rot_dim // 2
    if not isinstance(attn, ReducedHeadAttention):
        return HeadFacts(dims.head_dim, dims.head_dim, dims.rot_dim, (tuple(range(half)),) * dims.kv_heads)
    r, idx = attn.rot_dim // 2, attn.rope_index.tolist()
    pairs = []
    for j, row in enumerate(idx):
        f = tuple(i % half for i in row[:r])
        if f != tuple(i % half for i in row[r:]) or len(set(f)) != r:
            raise ExportError(f"format 'hf': KV group {j} of {type(attn).__name__} rotates dims {row}, which are "
                              f"not pairs of one frequency each")
        pairs.append(f)
    return HeadFacts(attn.qk_dim, attn.vo_dim, attn.rot_dim, tuple(pairs), attn.qk_norm)


def plan_layout(facts: list[HeadFacts], inters: list[int | None], dims, value_extra: int = 0,
                assign=None) -> StockLayout:
    """One head dim and MLP width for every layer, the rotary slots and each layer's q/k row map; `value_extra`
    value dims more than any layer keeps (a slot for an output bias, see `_attention_state`). assign(used, d): the
    frequency of each of the d/2 slots (None: free); default in order."""
    used = sorted({f for h in facts for group in h.pairs for f in group})
    zero = max([math.ceil((h.qk - h.rot) / 2) for h in facts if not h.nope] or [0])
    d = max(2 * (len(used) + zero), max(h.vo for h in facts) + value_extra)
    d += d % 2
    keep = dims.rot_dim == dims.head_dim == d and used == list(range(d // 2))
    slots = [*used, *[None] * (d // 2 - len(used))] if keep or assign is None else assign(used, d)
    slot_of = {f: s for s, f in enumerate(slots) if f is not None}
    free = [s for s, f in enumerate(slots) if f is None][:zero]          # zero-frequency slots: dims RoPE skips
    rows = []
    for h in facts:
        pass_rows = [] if h.nope else [free[k // 2] + (d // 2 if k % 2 else 0) for k in range(h.qk - h.rot)]
        rows.append([[slot_of[f] for f in g] + [slot_of[f] + d // 2 for f in g] + pass_rows for g in h.pairs]
                    if dims.rot_dim and not h.nope else [list(range(h.qk))] * len(h.pairs))
        if h.qk_norm and rows[-1] != [list(range(d))] * len(h.pairs):
            raise ExportError(f"format 'hf': a q/k norm ({h.qk_norm}) over a padded or reordered head cannot be "
                              f"written in the stock format (head dim {d}, kept q/k dims {h.qk})")
    widths = [w for w in inters if w is not None]
    return StockLayout(d, max(widths) if widths else None, slots, keep, rows)


def slot_powers(base: float, d: int) -> torch.Tensor:
    """base ** (2s / D) per slot s, in float32 exactly as transformers computes it."""
    return base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)


def exact_factors(target: float, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per slot (p (S,) float32), a longrope factor e (float32) with 1 / (e * p) == target as transformers
    computes it, and whether it is exact; the nearest float32 value where no value hits it exactly (e * p rounds:
    some targets are out of some slots' reach)."""
    if target == 0.0:
        return torch.full_like(p, ZERO_FACTOR), torch.ones(p.shape, dtype=torch.bool)
    t = torch.tensor(target, dtype=torch.float32)
    x = (1.0 / (target * p.double())).float()
    out, hit = x.clone(), torch.zeros(p.shape, dtype=torch.bool)
    for direction in (math.inf, -math.inf):
        c, to = x.clone(), torch.full_like(x, direction)
        for _ in range(64):
            now = (1.0 / (c * p) == t) & ~hit
            out[now], hit = c[now], hit | now
            c = torch.nextafter(c, to)
    return out, hit


def exact_factor(target: float, p: torch.Tensor) -> float:
    """`exact_factors` for one slot."""
    return float(exact_factors(target, p.reshape(1))[0][0])


def assign_slots(used: list[int], d: int, inv: torch.Tensor, base: float) -> list[int | None]:
    """The frequency each rotary slot holds: each kept frequency takes the first free slot whose factor reproduces
    it exactly in float32 (the first free slot when none does: off by one float32 rounding, as the angle itself)."""
    p = slot_powers(base, d)
    slots: list[int | None] = [None] * (d // 2)
    for f in used:
        _, hit = exact_factors(float(inv[f]), p)
        free = [s for s in range(d // 2) if slots[s] is None]
        slots[next((s for s in free if hit[s]), free[0])] = f
    return slots


def rope_source(rotary: nn.Module, config) -> tuple[torch.Tensor, float]:
    """(the original inverse frequencies (R/2,) float32, rope_theta) of a model's rotary embedding; ExportError
    for rope the stock format's one fixed vector cannot hold."""
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or "rope_type" not in rp or not hasattr(rotary, "inv_freq"):
        raise ExportError(f"format 'hf': rope_parameters {rp!r} are per layer type or missing; the stock export "
                          f"writes one rope vector per model")
    if rp["rope_type"] == "dynamic" or (rp["rope_type"] == "longrope" and rp["short_factor"] != rp["long_factor"]):
        raise ExportError(f"format 'hf': rope_type {rp['rope_type']!r} changes its frequencies with the sequence "
                          f"length; the export writes one fixed set")
    return (getattr(rotary, "original_inv_freq", rotary.inv_freq).float().cpu(),
            float(rp.get("rope_theta", getattr(config, "rope_theta", 10000.0))))


def rope_parameters(layout: StockLayout, rotary: nn.Module, config) -> dict:
    """The stock config's rope_parameters: the original's, or longrope with the slots' exact factors."""
    inv, base = rope_source(rotary, config)
    rp = config.rope_parameters
    if layout.keep_rope:
        return dict(rp)
    d = layout.head_dim
    p = slot_powers(base, d)
    factors = [exact_factor(0.0 if f is None else float(inv[f]), p[s]) for s, f in enumerate(layout.slots)]
    out = {k: v for k, v in rp.items() if k not in _FREQ_KEYS}        # a family's own keys (Ministral-3's beta)
    out.update(rope_type="longrope", rope_theta=base, short_factor=factors, long_factor=list(factors), factor=1.0,
               original_max_position_embeddings=int(rp.get("original_max_position_embeddings")
                                                    or config.max_position_embeddings),
               attention_factor=float(getattr(rotary, "attention_scaling", 1.0)))
    if "partial_rotary_factor" in rp:        # every dim is a slot now: kept dims RoPE skips have zero frequency
        out["partial_rotary_factor"] = 1.0
    return out


def _place_rows(w: torch.Tensor, rows: list[list[int]], heads: int, d: int, scale: float = 1.0) -> torch.Tensor:
    """(heads*r, ...) -> (heads*d, ...): head h's dim i goes to row rows[h // g][i], other rows zero."""
    r, g = w.shape[0] // heads, heads // len(rows)
    src = w.reshape(heads, r, *w.shape[1:])
    out = w.new_zeros(heads, d, *w.shape[1:])
    for j, rj in enumerate(rows):
        out[j * g:(j + 1) * g, rj] = src[j * g:(j + 1) * g] * scale
    return out.reshape(heads * d, *w.shape[1:])


def _pad(w: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """w zero-padded along `dim` to n."""
    if w.shape[dim] == n:
        return w
    pad = list(w.shape)
    pad[dim] = n - w.shape[dim]
    return torch.cat([w, w.new_zeros(pad)], dim)


# ------------------------------------------------------------------------------------------- the stock model
@dataclass
class StockExport:
    """A stock model sharing the a3mod model's tensors where nothing is padded, and what the padding cost."""
    model: nn.Module
    record: dict


def base_classes(model: nn.Module):
    """(stock model class, stock config class) of an a3mod model (or of a plain transformers model)."""
    cfg_cls = getattr(type(model.config), "a3mod_base_config", type(model.config))
    return getattr(type(model), "a3mod_base", type(model)), cfg_cls


def stock_config(model: nn.Module, layout: StockLayout, rotary: nn.Module | None):
    """The base family's own config with the export's head dim, MLP width and rope parameters."""
    model_cls, cfg_cls = base_classes(model)
    d = model.config.to_dict()
    for k in ("a3mod", "a3mod_base_model_type"):
        d.pop(k, None)
    d["model_type"] = cfg_cls.model_type
    cfg = cfg_cls.from_dict(d)
    cfg.head_dim = layout.head_dim
    if layout.inter is not None:
        cfg.intermediate_size = layout.inter
    if rotary is not None:
        cfg.rope_parameters = rope_parameters(layout, rotary, model.config)
    cfg.architectures = [model_cls.__name__]
    cfg._attn_implementation = getattr(model.config, "_attn_implementation", None)
    return cfg


def _attention_state(sd: dict, a: str, dims, vo: int, rows, d: int, scale: float, stock_bias: dict) -> None:
    """One layer's q/k/v/o tensors (keys `a` + name) in the stock layout, in place in `sd`. A bias the stock family
    has and the a3mod model not is zero. An o_proj bias the family has no place for (A3OV folds the value bias into
    it; Qwen2 has v biases but no o bias) rides in value dim `vo` of KV head 0: zero weights, bias 1, so that dim of
    every head's output is exactly 1 (attention weights sum to 1), and o_proj's column for it in query head 0 holds
    the bias."""
    value_rows = [list(range(vo))] * dims.kv_heads
    for name, heads, r, s in (("q", dims.heads, rows, scale), ("k", dims.kv_heads, rows, 1.0),
                              ("v", dims.kv_heads, value_rows, 1.0)):
        w, b = a + f"{name}_proj.weight", a + f"{name}_proj.bias"
        sd[w] = _place_rows(sd[w], r, heads, d, s)
        if b in sd:
            sd[b] = _place_rows(sd[b], r, heads, d, s)
        elif stock_bias[name]:
            sd[b] = sd[w].new_zeros(heads * d)
    o, ob = a + "o_proj.weight", a + "o_proj.bias"
    sd[o] = _place_rows(sd[o].t(), [list(range(vo))] * dims.kv_heads, dims.heads, d).t().contiguous()
    if ob in sd and not stock_bias["o"]:
        bias = sd.pop(ob)
        sd[a + "v_proj.bias"][vo] = 1.0
        sd[o][:, vo] = bias
    elif ob not in sd and stock_bias["o"]:
        sd[ob] = sd[o].new_zeros(sd[o].shape[0])


def stock_state(model, views, layout: StockLayout, scales: list[float], stock_bias: dict) -> dict[str, torch.Tensor]:
    """The a3mod model's state dict in the stock layout (rope_index dropped, heads and MLPs padded)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith(".rope_index")}
    d, spec = layout.head_dim, views[0].spec
    for v, rows, scale in zip(views, layout.rows, scales):
        vo = v.attn.vo_dim if isinstance(v.attn, ReducedHeadAttention) else v.dims.head_dim
        _attention_state(sd, f"{spec.layers}.{v.index}.{spec.attn}.", v.dims, vo, rows, d, scale, stock_bias)
        if layout.inter is not None and isinstance(v.mlp, ReducedMLP):
            m = f"{spec.layers}.{v.index}.{v.mlp_path}."
            for name in ("gate_proj", "up_proj"):
                for p in ("weight", "bias"):
                    if m + f"{name}.{p}" in sd:
                        sd[m + f"{name}.{p}"] = _pad(sd[m + f"{name}.{p}"], layout.inter, 0)
            sd[m + "down_proj.weight"] = _pad(sd[m + "down_proj.weight"], layout.inter, 1)
    return sd


def _stock_biases(model_cls, cfg, spec) -> dict[str, bool]:
    """Which of q/k/v/o the stock family gives a bias (read from a meta-device model of the config)."""
    with torch.device("meta"):
        attn = get_path(model_cls(cfg), f"{spec.layers}.0.{spec.attn}")
    return {n: getattr(attn, f"{n}_proj").bias is not None for n in "qkvo"}


def _real_buffers(stock: nn.Module, model: nn.Module, config, device) -> None:
    """Buffers left on the meta device: rotary embeddings are built again from the stock config (their
    frequencies differ), any other buffer is the a3mod model's (same name)."""
    theirs = dict(model.named_buffers())
    for name, mod in list(stock.named_modules()):
        if hasattr(mod, "inv_freq") and mod.inv_freq.is_meta:
            parent, _, child = name.rpartition(".")
            setattr(get_path(stock, parent) if parent else stock, child, type(mod)(config=config).to(device))
    for name, buf in list(stock.named_buffers()):
        if buf.is_meta:
            if name not in theirs:
                raise ExportError(f"format 'hf': the stock model's buffer {name} has no counterpart to copy")
            parent, _, child = name.rpartition(".")
            get_path(stock, parent)._buffers[child] = theirs[name]


def to_stock(model: nn.Module) -> StockExport:
    """The stock model of `model` (see the module docstring), checked against it; ExportError when a construct of
    the model has no stock form."""
    views = layer_views(model)
    spec = views[0].spec
    problems = _family_problems(spec)
    if problems or any(v.left for v in views):
        problems += ["layers without the family's attention (a hybrid)"] if any(v.left for v in views) else []
        raise ExportError(f"format 'hf': {model.config.model_type} models have {', '.join(problems)}; the stock "
                          f"export writes llama-style layouts (separate q/k/v/o, gate/up/down, rotate_half RoPE)")
    _check_modules(model)
    model_dims = dims_of(model.config, spec)            # views[i].dims has no rotary dims in a NoPE layer
    facts = [head_facts(v.attn, v.dims) for v in views]
    if spec.rope:            # NoPE layers (a3mod.arch.views.applies_rope): rows in place, no zero-frequency slots
        facts = [replace(f, nope=True) if not v.dims.rot_dim or not f.rot else f for f, v in zip(facts, views)]
    inters = [v.mlp.inter if isinstance(v.mlp, ReducedMLP) else getattr(model.config, "intermediate_size", None)
              for v in views]
    rotary = get_path(model, spec.rotary) if spec.rope and spec.rotary else None
    model_cls, _ = base_classes(model)
    assign = None
    if rotary is not None:
        inv, base = rope_source(rotary, model.config)
        assign = lambda used, d: assign_slots(used, d, inv, base)  # noqa: E731
    layout = plan_layout(facts, inters, model_dims, assign=assign)
    stock_bias = _stock_biases(model_cls, stock_config(model, layout, rotary), spec)
    if not stock_bias["o"] and any(isinstance(v.attn, ReducedHeadAttention) and v.attn.o_proj.bias is not None
                                   for v in views):
        if not stock_bias["v"]:
            raise ExportError(f"format 'hf': the stock {model_cls.__name__} has neither an o_proj nor a v_proj bias "
                              f"for the output bias the a3mod model holds")
        layout = plan_layout(facts, inters, model_dims, value_extra=1, assign=assign)
    cfg = stock_config(model, layout, rotary)
    with torch.device("meta"):
        stock = model_cls(cfg)
    scales = [v.attn.scaling / get_path(stock, f"{spec.layers}.{v.index}.{spec.attn}").scaling for v in views]
    state = stock_state(model, views, layout, scales, stock_bias)
    try:
        stock.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"format 'hf': the stock {model_cls.__name__} does not take the exported weights "
                          f"({' '.join(str(e).split())[:300]})") from None
    _real_buffers(stock, model, cfg, next(model.parameters()).device)
    stock.eval()
    if getattr(model, "generation_config", None) is not None:
        stock.generation_config = copy.deepcopy(model.generation_config)
    return StockExport(stock, _record(model, views, facts, layout, state))


def _layer_elems(sd: dict, prefix: str) -> int:
    return sum(t.numel() for k, t in sd.items() if k.startswith(prefix) and not k.endswith(".rope_index"))


def _record(model, views, facts: list[HeadFacts], layout: StockLayout, state: dict) -> dict:
    """What the stock format costs: head dim, MLP width, rope form, zero parameters and KV-cache bytes per token."""
    spec, d = views[0].spec, layout.head_dim
    prefix = f"{spec.layers}."
    ours = _layer_elems(model.state_dict(), prefix)
    theirs = _layer_elems(state, prefix)
    kv = [v.dims.kv_heads for v in views]
    mtype = base_classes(model)[1].model_type
    return {"format": "hf", "model_type": mtype, "head_dim": d, "intermediate_size": layout.inter,
            "rope": "original" if layout.keep_rope else "longrope",
            "rope_slots": sum(f is not None for f in layout.slots),
            "decoder_layer_params": {"a3mod": ours, "export": theirs, "zeros": theirs - ours},
            "kv_elements_per_token": {"a3mod": sum(h * (f.qk + f.vo) for h, f in zip(kv, facts)),
                                      "export": sum(2 * h * d for h in kv)}}


@torch.no_grad()
def max_logit_error(model: nn.Module, stock: nn.Module, tokens: int = 16) -> float:
    """Relative error (Frobenius) of the stock model's logits against the a3mod model's on `tokens` random ids."""
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    a = model(input_ids=ids, use_cache=False).logits.float()
    b = stock(input_ids=ids, use_cache=False).logits.float()
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def save_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False,
            dtype: torch.dtype | str | None = "auto") -> Path:
    """Write `model` as a stock checkpoint of its base family (see the module docstring); returns the path.
    ExportError, before any file is written, when the model has a construct the format cannot express or the
    stock model does not reproduce its logits. The files are published like `a3mod.save`'s (atomic, locked);
    overwrite replaces an earlier export (or an a3mod checkpoint, or an empty folder), nothing else."""
    dtype = save_dtype(model, dtype)
    out = files.check_output_dir(out_dir, overwrite, model_sources(model))
    exp = to_stock(model)
    param = next(model.parameters())
    err = max_logit_error(model, exp.model)
    if not err <= (1e-4 if param.dtype == torch.float32 else 2e-2):
        raise ExportError(f"format 'hf': the stock model's logits differ from the a3mod model's by {err:.2e} "
                          f"(relative); nothing was written")
    stock = exp.model.to(dtype) if dtype is not None else exp.model
    size = (dtype or param.dtype).itemsize
    p, kv = exp.record["decoder_layer_params"], exp.record["kv_elements_per_token"]
    record = {**exp.record, "logit_error": err, "bytes_per_element": size, "zero_weight_bytes": p["zeros"] * size,
              "kv_bytes_per_token": {k: n * size for k, n in kv.items()}}
    with files.staged_output(out, overwrite, model_sources(model)) as tmp:
        stock.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record["files"] = sorted(f.name for f in tmp.iterdir())
        (tmp / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return out


def summary(record: dict) -> str:
    """Two lines on what an export record says the stock format cost."""
    p, kv = record["decoder_layer_params"], record["kv_elements_per_token"]
    pct = lambda a, b: f"{100 * (a - b) / b:+.1f}%" if b else "n/a"  # noqa: E731
    rope = ("the original rope" if record["rope"] == "original" else
            f"longrope ({record['rope_slots']} kept frequencies)")
    mb = f", {record['zero_weight_bytes'] / 1e6:,.1f} MB" if "zero_weight_bytes" in record else ""
    return (f"stock {record['model_type']}: head_dim {record['head_dim']} for q/k/v of every layer, "
            f"intermediate_size {record['intermediate_size']}, {rope}\n"
            f"padding: {p['zeros']:,} zero weights in the decoder layers ({pct(p['export'], p['a3mod'])} over "
            f"a3mod's {p['a3mod']:,}{mb}); KV cache {kv['export']:,} elements per token "
            f"({pct(kv['export'], kv['a3mod'])} over a3mod's {kv['a3mod']:,})")
