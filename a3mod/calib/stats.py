"""Calibration statistics: one forward pass that collects the A3 statistics (the token windows: calib/text.py).

Statistics per decoder layer (sums over calibration tokens, float64; divide by `n` for moments):
  q  (H, d_h, d_h)    queries (pre-RoPE, with bias)        -> QK whitened SVD / RoPE pair scores (diagonal)
  k  (Hkv, d_h, d_h)  keys (pre-RoPE, with bias)
  v  (Hkv, d_h, d_h), v1 (Hkv, d_h)  values and their sum   -> OV for GQA (bias removed via the first moment)
  o  (H, d_h, d_h),  o1 (H, d_h)     per-head attention output entering o_proj -> OV for MHA
  (latent attention: q, k over each head's position-free dims; o over its value dims; no v)
  h2 (d_i,)           squared MLP intermediate activations   -> MLP CUR (an MoE layer: of its shared expert)
  e2 (E, d_e), en (E,)  MoE layers: per routed expert, squared activations times squared combine weights over
                      the tokens routed to it, and their count       -> A3Experts
Optional kinds for the per-linear baselines, for each input group g of `LayerView.linear_groups`
(attn_in, attn_out, mlp_in, mlp_mid):
  x2.g (d_in, d_in)   Gram matrix X^T X of the group's input   -> SVD-LLM whitening      (kind "gram")
  xa.g (d_in,)        sum of |x| per input channel             -> ASVD scaling           (kind "absmean")
Optional for the least-squares updates (`A3MLP(update=True)`, `A3OV(update=True)`):
  hh (d_i, d_i)       Gram matrix of the MLP intermediate activations (what enters down_proj)   (kind "hgram")
  oo (H d_h, H d_h)   Gram matrix of o_proj's input (every head's attention output)             (kind "ogram")
  eh (E, d_e, d_e)    MoE layers: per routed expert, the Gram of its intermediate activations times its combine
                      weight, over the tokens routed to it (`A3Experts(update=True)`)            (kind "ehgram")
  qs (H, d_h, d_h)    layers with fully rotary q/k (no qk-norm, no latent attention): per query head, the
                      attention-weighted Gram of its score's per-pair features (`calib.scores.score_gram`;
                      `A3QK(update=True)`)                                                        (kind "qkgram")
Optional for the loss-aware MLP selection (`A3MLP(select="taylor")`), from a backward pass (`calib.taylor`):
  ht (d_i,)           sum over tokens of (h * dL/dh)^2 per MLP neuron                             (kind "taylor")
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..arch import LayerView, get_path, layer_views
from .. import validate
from ..errors import CalibrationError
from ..io.files import atomic_write
from .rotary import qkv_hooks, rotary_hook, scored
from .scores import score_gram
from .sums import add, add_gram, finish, outer, sq_sum
from .taylor import taylor_sums
from ..io.fingerprint import model_fingerprint, tokens_fingerprint
from . import distributed

STATS_FORMAT = 1
KINDS = ("a3", "gram", "absmean", "hgram", "ogram", "ehgram", "qkgram", "taylor")
_KIND_KEY = {"a3": "q", "gram": "x2.", "absmean": "xa.", "hgram": "hh", "ogram": "oo",
             "ehgram": "eh", "qkgram": "qs", "taylor": "ht"}              # the key (prefix) of each kind
WHOLE_MODEL_KINDS = frozenset({"taylor"})    # from a backward pass of the whole model, not from per-layer hooks


def _is_key(name: str, key: str) -> bool:
    """Whether a layer's statistic `name` is of the kind whose key (or key prefix, ending in ".") is `key`."""
    return name == key or (key.endswith(".") and name.startswith(key))


# ------------------------------------------------------------------------------------------ stats
@dataclass
class Stats:
    """Calibration statistics of every decoder layer. `layers[i][name]` are float64 sums over `n` tokens.

    `model` and `calib` fingerprint what they were collected on (a3mod.io.fingerprint: the model's config and sampled
    weights; the token ids' sha256 and shape); `apply(stats=...)` refuses statistics of another model or, when
    calib is given too, of other tokens. `source` records how the tokens were drawn (e.g. seed), when known."""

    n: int
    layers: list[dict[str, Tensor]] = field(default_factory=list)
    extra: dict[str, Tensor] = field(default_factory=dict)     # derived tables cached by passes (ASVD sensitivity)
    model: str | None = None                                   # model_fingerprint of the model collected on
    calib: dict | None = None                                  # tokens_fingerprint of the calibration ids
    source: dict = field(default_factory=dict)                 # free-form: seed, text source, sample counts
    autosave: str | os.PathLike | None = field(default=None, repr=False, compare=False)   # checkpoint()'s file
    saved_at: float = field(default=0.0, repr=False, compare=False)

    @property
    def kinds(self) -> set[str]:
        """Which statistic kinds (see KINDS) these stats hold (in any layer: a hybrid's first layer may be a mixer,
        an MoE model's first MLP may be routed experts)."""
        keys = {k for layer in self.layers for k in layer}
        found = {k for k, p in _KIND_KEY.items() if any(_is_key(n, p) for n in keys)}
        asked = self.source.get("kinds", ())         # what collect was asked for, even where no layer has that part
        return found | ({k for k in asked if k in KINDS} if isinstance(asked, list) else set())

    def merge(self, other: "Stats") -> None:
        """Add the statistics of `other` (same model and tokens, other kinds) to these."""
        if other.n != self.n or len(other.layers) != len(self.layers):
            raise CalibrationError(f"cannot merge stats over {other.n} tokens / {len(other.layers)} layers into "
                                   f"stats over {self.n} tokens / {len(self.layers)} layers")
        for what in ("model", "calib"):
            a, b = getattr(self, what), getattr(other, what)
            if a is not None and b is not None and a != b:
                raise CalibrationError(f"cannot merge statistics of another {what} (fingerprints differ)")
        for mine, theirs in zip(self.layers, other.layers):
            mine.update(theirs)
        if "kinds" in self.source or "kinds" in other.source:
            self.source["kinds"] = sorted(self.kinds | other.kinds)

    def only(self, kinds) -> "Stats":
        """These statistics restricted to `kinds` (a new object whose layer dicts hold the same tensors), e.g.
        `stats.only({"taylor"})`: the loss statistic, which `apply(stats=..., calib=...)` with seq_refit=True reuses."""
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise CalibrationError(f"unknown statistic kinds {unknown}; allowed: {', '.join(KINDS)}")
        keys = [_KIND_KEY[k] for k in kinds]
        keep = lambda n: any(_is_key(n, p) for p in keys)      # noqa: E731
        source = dict(self.source)
        if isinstance(source.get("kinds"), list):
            source["kinds"] = sorted(set(source["kinds"]) & set(kinds))
        return Stats(n=self.n, layers=[{n: t for n, t in layer.items() if keep(n)} for layer in self.layers],
                     model=self.model, calib=self.calib, source=source)

    @classmethod
    def ensure(cls, model: nn.Module, calib: Tensor | None, kinds, stats: "Stats | None" = None, *,
               batch_size: int = 1, progress: bool = True, who: str = "these passes") -> "Stats | None":
        """Statistics of `kinds` for `model`: `stats` (checked to belong to this model and, if given, these tokens)
        with the kinds it lacks collected from `calib` and merged in, or all collected from `calib`. None when no
        kinds are wanted and no stats were given. The one place that decides what to collect."""
        want = sorted(set(kinds))
        if stats is not None:
            stats.check_origin(model, calib)
        if not want:
            return stats
        missing = sorted(set(want) - (stats.kinds if stats is not None else set()))
        if missing and calib is None:
            raise CalibrationError(
                f"{who} need the {missing} statistics: pass calib= (token ids) or stats= (from a3mod.collect(model, "
                f"calib, kinds={want}))")
        if missing:
            fresh = collect(model, calib, batch_size=batch_size, progress=progress, kinds=missing)
            if stats is None:
                return fresh
            stats.merge(fresh)
        return stats

    def check_origin(self, model=None, calib: Tensor | None = None) -> None:
        """CalibrationError when these statistics were collected on another model or other tokens than given.
        Statistics without a model fingerprint (built by hand, not by `collect`) pass with a warning."""
        if self.model is None:
            warnings.warn("a3mod: these statistics carry no model fingerprint (not made by a3mod.collect); cannot "
                          "check they belong to this model", stacklevel=3)
        elif model is not None and self.model != (fp := model_fingerprint(model)):
            raise CalibrationError(f"these statistics were collected on another model (fingerprint {self.model[:12]}, "
                                   f"this model {fp[:12]}: other weights or config); collect them on this model "
                                   f"(CLI: --recompute-stats)")
        if calib is not None and self.calib is not None and self.calib != (tf := tokens_fingerprint(calib)):
            raise CalibrationError(f"these statistics were collected on other calibration tokens (shape "
                                   f"{self.calib['shape']}, sha256 {self.calib['sha256'][:12]}; given: shape "
                                   f"{tf['shape']}, sha256 {tf['sha256'][:12]}: another seed, source or sample "
                                   f"count?); collect them again (CLI: --recompute-stats)")

    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` atomically (temporary sibling + rename); an existing file is replaced only when it is an
        a3mod statistics file."""
        p = Path(path)
        if p.exists() and not is_stats_file(p):
            raise CalibrationError(f"{str(p)!r} exists and is not an a3mod statistics file; not replacing it")
        flat = {f"{i}.{k}": t.contiguous() for i, d in enumerate(self.layers) for k, t in d.items()}
        flat.update({f"extra.{k}": t.contiguous() for k, t in self.extra.items()})
        meta = {"a3mod_stats": str(STATS_FORMAT), "n": str(self.n), "layers": str(len(self.layers)),
                **({"model": self.model} if self.model else {}),
                **({"calib": json.dumps(self.calib, sort_keys=True)} if self.calib else {}),
                **({"source": json.dumps(self.source, sort_keys=True)} if self.source else {})}
        meta["sha256"] = _stats_digest(flat, meta)
        atomic_write(p, save(flat, metadata=meta))

    def checkpoint(self, every_s: float = 300.0) -> None:
        """Save to `autosave` (when set) if `every_s` seconds passed since the last checkpoint, so a long derived
        table (ASVD's sensitivity, filled row by row) survives an interrupted run: a run given the saved file
        resumes from the rows it holds."""
        if self.autosave is not None and time.monotonic() - self.saved_at >= every_s:
            self.save(self.autosave)
            self.saved_at = time.monotonic()

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Stats":
        """Read a file written by `save`; CalibrationError for anything else (another model's weights, a truncated
        file)."""
        p = Path(path)
        try:
            flat = load(p.read_bytes())
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:          # safetensors raises its own error types for malformed files
            raise CalibrationError(f"{str(p)!r} is not a readable a3mod statistics file ({str(e)[:160]})") from None
        unknown = sorted(set(meta) - {"a3mod_stats", "n", "layers", "model", "calib", "source", "sha256"})
        if unknown or ("a3mod_stats" in meta) != ("sha256" in meta):
            raise CalibrationError(f"{str(p)!r} is not an a3mod statistics file or is corrupted (metadata keys "
                                   f"{sorted(meta)})")
        if "sha256" in meta and meta["sha256"] != _stats_digest(flat, meta):
            raise CalibrationError(f"{str(p)!r} is corrupted: its checksum does not match its statistics")
        try:
            n, n_layers = int(meta["n"]), int(meta["layers"])
            calib = json.loads(meta["calib"]) if "calib" in meta else None
            source = json.loads(meta["source"]) if "source" in meta else {}
            if n < 0 or not 0 <= n_layers < 1 << 20:
                raise ValueError("n / layers out of range")
        except (KeyError, ValueError) as e:
            raise CalibrationError(f"{str(p)!r} is not an a3mod statistics file (its metadata lacks a valid "
                                   f"{e}); a3mod.Stats.save writes those") from None
        layers = [dict() for _ in range(n_layers)]
        extra = {}
        for key, t in flat.items():
            i, _, name = key.partition(".")
            if i == "extra":
                extra[name] = t
            elif i.isdigit() and int(i) < n_layers and name and t.dtype == torch.float64:
                layers[int(i)][name] = t
            else:
                raise CalibrationError(f"{str(p)!r}: tensor {key!r} ({t.dtype}) is not a statistic of layers "
                                       f"0..{n_layers - 1}")
        return cls(n, layers, extra, meta.get("model"), calib, source)

    def check(self, min_tokens: int = 1) -> None:
        """Raise CalibrationError on too few tokens or non-finite statistics."""
        if self.n < min_tokens:
            raise CalibrationError(f"only {self.n} calibration tokens; need at least {min_tokens}")
        for i, d in enumerate(self.layers):
            for k, t in d.items():
                if not torch.isfinite(t).all():
                    raise CalibrationError(f"layer {i} statistic {k!r} has NaN/inf values "
                                           f"(overflowing activations? try float32 or fewer tokens per window)")


def _input_hooks(view: LayerView, acc: dict[str, Tensor], kinds) -> list:
    """Per input group (shared by its projections): Gram matrix X^T X and/or sum |x| of the input."""
    hs = []
    for group, paths in view.linear_groups().items():
        def hook(m, inp, group=group):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            if "gram" in kinds:
                add_gram(acc, f"x2.{group}", x)
            if "absmean" in kinds:
                add(acc, f"xa.{group}", x.abs().sum(0, dtype=torch.float64))   # |x| exact, float64 sums
        hs.append(get_path(view.layer, paths[0]).register_forward_pre_hook(hook))
    return hs


def _hooks(view: LayerView, acc: dict[str, Tensor], kinds=("a3",)) -> list:
    if view.left:                       # a layer a3mod leaves untouched needs no statistics
        return []
    hs = _input_hooks(view, acc, kinds) if set(kinds) & {"gram", "absmean"} else []
    if "hgram" in kinds and view.has_mlp:
        hs.append(view.down_module().register_forward_pre_hook(lambda m, inp: add_gram(acc, "hh", inp[0])))
    if view.attn is not None:           # a hybrid's mixer layer has only its MLP
        hs += _attention_hooks(view, acc, kinds)
    if view.experts is not None and {"a3", "ehgram"} & set(kinds):
        hs.append(_experts_hook(view, acc, kinds))
    if "a3" not in kinds:
        return hs

    def on_down(m, inp):
        add(acc, "h2", sq_sum(inp[0]))

    if view.has_mlp:
        hs.append(view.down_module().register_forward_pre_hook(on_down))
    return hs


def _attention_hooks(view: LayerView, acc: dict[str, Tensor], kinds) -> list:
    """The attention's moments: per-head q, k, v and o_proj input ("a3"), the Gram of o_proj's input ("ogram"), the
    score statistic ("qkgram", with or without "a3")."""
    d, hs = view.dims, []
    if "ogram" in kinds:
        hs.append(view.o_module().register_forward_pre_hook(lambda m, inp: add_gram(acc, "oo", inp[0])))
    a3 = "a3" in kinds
    scores = _score_hook(view, acc, hs) if "qkgram" in kinds and scored(view) else None
    if not a3:              # the score statistic alone (e.g. added to statistics that hold "a3" already)
        return hs + (qkv_hooks(view, lambda q, k, v: scores(view.query_of(q), k)) if scores is not None else [])

    def on_qkv(q, k, v):
        add(acc, "q", outer(view.query_of(q), d.heads)[0])     # without the output gate's channels (Qwen3.5)
        add(acc, "k", outer(k, d.kv_heads)[0])
        vv, v1 = outer(v, d.kv_heads)
        add(acc, "v", vv)
        add(acc, "v1", v1)
        if scores is not None:
            scores(view.query_of(q), k)

    if view.spec.mla:       # latent attention: each head's position-free q and k dims (a3mod.arch.mla)
        mv = view.mla_view()
        hs.append(mv.q_linear.register_forward_hook(
            lambda m, i, out: add(acc, "q", outer(mv.split_q(out), mv.heads)[0])))
        hs.append(view.attn.kv_b_proj.register_forward_hook(
            lambda m, i, out: add(acc, "k", outer(mv.split_kv(out), mv.heads)[0])))
    else:
        hs += qkv_hooks(view, on_qkv)

    def on_o(m, inp):
        oo, o1 = outer(inp[0], d.heads)
        add(acc, "o", oo)
        add(acc, "o1", o1)

    hs.append(view.o_module().register_forward_pre_hook(on_o))
    return hs


def _score_hook(view: LayerView, acc: dict[str, Tensor], hs: list):
    """Kind "qkgram": returns the function that adds `score_gram` of a batch's q and k (called where they are
    captured), its rotation kept by a pre-hook on the attention (`rotary.rotary_hook`)."""
    rotary = rotary_hook(view, hs)
    window = view.sliding_window(getattr(view.attn, "config", None))     # the rule the rewrite uses

    def add_scores(q, k):
        q, k, cos, sin = rotary(q, k)
        add(acc, "qs", score_gram(q, k, cos, sin, view.scaling(), window=window, softcap=view.softcap()))
    return add_scores


def _experts_hook(view: LayerView, acc: dict[str, Tensor], kinds=("a3",)):
    """Routed experts ("a3"): e2 (E, I) sums over the tokens routed to each expert of (combine weight)^2 * h^2 (h: the
    expert's intermediate activations, recomputed from its inputs with its own gate), en (E,) those token counts;
    ("ehgram"): eh (E, I, I) the sums of (w h)(w h)^T."""
    ev = view.experts_view()
    a3, per_expert = "a3" in kinds, "ehgram" in kinds

    def hook(mod, args, kwargs, out):
        dev = mod.down_proj.device
        e2 = torch.zeros(ev.num, ev.inter, dtype=torch.float64, device=dev)
        en = torch.zeros(ev.num, dtype=torch.float64, device=dev)
        eh = torch.zeros(ev.num, ev.inter, ev.inter, dtype=torch.float64, device=dev) if per_expert else None
        for e, x, w in ev.routed(args, kwargs):
            h, w = ev.hidden_states(x, e).double(), w.double()
            e2[e] = (h.square() * w.square()[:, None]).sum(0)
            en[e] = x.shape[0]
            if per_expert:
                hw = h * w[:, None]
                eh[e] = hw.T @ hw
        if a3:
            add(acc, "e2", e2)
            add(acc, "en", en)
        if per_expert:
            add(acc, "eh", eh)
    return view.experts.register_forward_hook(hook, with_kwargs=True)


@contextmanager
def recording(views: list[LayerView], kinds=("a3",)):
    """Attach the statistic hooks to `views` while the block runs; yields one accumulator dict per view.

    Whatever runs through those layers meanwhile (the whole model in `collect`, one layer at a time in
    `a3mod.pipeline.stream`) adds to the sums, so both paths share the statistics code.
    """
    accs: list[dict[str, Tensor]] = [dict() for _ in views]
    handles = [h for v, a in zip(views, accs) for h in _hooks(v, a, kinds)]
    try:
        yield accs
        for a in accs:
            finish(a)                   # the Grams' last chunks
    finally:
        for h in handles:
            h.remove()


def _stats_digest(flat: dict[str, Tensor], meta: dict[str, str]) -> str:
    """sha256 over every metadata entry but itself and every tensor (name, dtype, shape, bytes), in sorted order."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for k in sorted(flat):
        t = flat[k].contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_stats_file(p: Path) -> bool:
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return "a3mod_stats" in meta or {"n", "layers"} <= set(meta)


def check_token_ids(ids: Tensor, vocab: int | None, what: str = "calibration") -> None:
    """CalibrationError when token ids fall outside [0, vocab): the embedding would raise an IndexError."""
    if vocab is None or ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise CalibrationError(f"{what} token ids span [{lo}, {hi}], outside the model's vocabulary [0, {vocab}); "
                               f"was the text tokenized with this model's tokenizer?")


def vocab_size(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    return n if n is not None else getattr(getattr(model, "config", None), "vocab_size", None)


def check_request(calib, kinds) -> tuple:
    """Validated `kinds` tuple; CalibrationError on unknown kinds or a calib that is not (n, T) token ids."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise CalibrationError(f"kinds={kinds!r}: choose one or more of {KINDS}")
    if not isinstance(calib, Tensor) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise CalibrationError(f"calib must be an integer tensor (n_samples, seq_len), got "
                               f"{type(calib).__name__} {getattr(calib, 'shape', '')}")
    return kinds


@torch.no_grad()
def collect(model: nn.Module, calib: Tensor, batch_size: int = 1, progress: bool = True,
            kinds=("a3",)) -> Stats:
    """Run `calib` (n, T) token ids through `model` once and return the statistics of every layer.

    kinds: any of "a3" (A3 passes), "gram" (SVD-LLM), "absmean" (ASVD), "hgram" / "ogram" / "ehgram" (the MLP / OV /
    routed experts' updates), "qkgram" (the QK update), "taylor" (the loss-aware MLP selection: a backward pass);
    see the module docstring.
    Under torch.distributed (an initialized process group), every rank passes the full `calib`, runs its own
    slice of the windows (`a3mod.calib.distributed.shard`) and the sums are all-reduced: every rank returns the
    statistics of all windows.
    """
    kinds = check_request(calib, kinds)
    batch_size = validate.integer("collect", "batch_size", batch_size, error=CalibrationError)
    views = layer_views(model)
    check_token_ids(calib, vocab_size(model))
    fingerprints = model_fingerprint(model), tokens_fingerprint(calib)
    calib = distributed.shard(calib)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    body = getattr(model, "base_model", model)      # the decoder stack without lm_head: logits are not needed
    forward = [k for k in kinds if k not in WHOLE_MODEL_KINDS]      # those: a backward pass of their own
    try:
        with recording(views, forward) as accs:
            for b in tqdm(range(0, calib.shape[0] if forward else 0, batch_size), desc="calibrating",
                          disable=not progress, unit="batch"):
                body(input_ids=calib[b:b + batch_size].to(device), use_cache=False)
    finally:
        model.train(was_training)
    if "taylor" in kinds:
        for acc, sums in zip(accs, taylor_sums(model, views, calib, batch_size, progress)):
            acc.update(sums)
    stats = Stats(distributed.all_reduce_stats(accs, int(calib.numel())), accs, model=fingerprints[0],
                  calib=fingerprints[1], source={"kinds": sorted(kinds)})
    stats.check(min_tokens=max(v.dims.head_dim for v in views) + 1)
    return stats
