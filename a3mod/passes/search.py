"""Which linears the baselines factorize, and ASVD's sensitivity-based rank search.

Sensitivity (ASVD, method.md "Baselines"): for every target linear and candidate size, the calibration
perplexity of the model with only that linear truncated. Probes run on the first probe_samples x
probe_seq_len calibration tokens; decoder layers before the changed one replay cached outputs, so a probe
costs the layers from the changed one on. A threshold binary search over the sorted (ppl, target, size)
list then picks, per target, the smallest size whose entry is below the threshold, the smallest
threshold that meets the budget; the slack left (less than one size step) is given back one rank at a
time to the most sensitive targets, so the result is within one rank step of the budget.
The sensitivity table is cached on the Stats object (and saved with it), keyed by the probe settings.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import LayerView, active, get_path, linear_params
from ..arch.capture import recording_outputs, replaying
from ..errors import CalibrationError, RatioError, UnsupportedModelError
from ..math import factorize as fz
from ..report import linear_param_count

PARAM_CANDIDATES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)     # kept fraction of a linear's parameters
KV_CANDIDATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)   # kept fraction of a k/v projection's outputs


@dataclass(frozen=True)
class Target:
    """One weight (or a row block of a fused weight) to factorize."""
    layer: int
    path: str            # module path in the layer
    rows: slice          # output rows of the (out, in) weight (a fused qkv's k or v block), or all
    group: str           # input group (for statistics): attn_in, attn_out, mlp_in, mlp_mid
    role: str            # q, k, v, qkv, o, gate, up, gate_up, down
    out_f: int
    in_f: int


def targets_of(views: list[LayerView], kv: bool, only=None) -> list[Target]:
    """Every projection of every layer (of the layers in `only`, when given), or (kv=True) only the key and value
    projections."""
    out = []
    for v in active(views):             # a hybrid's left layers keep their linears
        if only is not None and v.index not in only:
            continue
        s, d = v.spec, v.dims
        if kv and (s.qkv_layout != "blocks" or s.o_from_layer):
            raise UnsupportedModelError(f"KV-cache mode: the {v.layer.__class__.__name__} layout (fused qkv "
                                        f"{s.qkv_layout!r}, o outside the attention: {s.o_from_layer}) is not "
                                        "supported; use ASVD(ratio=...) or A3KV")
        a, m = (lambda n: f"{s.attn}.{n}"), (lambda n: f"{s.mlp}.{n}" if s.mlp else n)
        roles = {a(s.q): "q", a(s.k): "k", a(s.v): "v", a(s.qkv): "qkv", m(s.gate): "gate", m(s.up): "up",
                 m(s.gate_up): "gate_up", a(s.attn_gate): "attn_gate"}   # by path in the layer (BERT: three "dense")
        for group, paths in v.linear_groups().items():
            for path in paths:
                w, _ = linear_params(get_path(v.layer, path), s.conv1d)
                role = {"attn_out": "o", "mlp_mid": "down"}.get(group) or roles[path]
                if not kv:
                    out.append(Target(v.index, path, slice(None), group, role, w.shape[0], w.shape[1]))
                elif group == "attn_in":
                    q, k = d.heads * d.head_dim, d.kv_heads * d.head_dim
                    blocks = {"k": slice(q, q + k), "v": slice(q + k, q + 2 * k)} if role == "qkv" else \
                        ({role: slice(None)} if role in ("k", "v") else {})
                    for r, sl in blocks.items():
                        out.append(Target(v.index, path, sl, group, r, k, w.shape[1]))
    return out


# -------------------------------------------------------------------------------------------- probes
class Prober:
    """Mean NLL of `model` on `ids` with some weights temporarily changed; earlier layers replay."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor):
        if not getattr(model, "can_generate", lambda: True)():
            raise UnsupportedModelError(f"ASVD's sensitivity probes measure next-token perplexity; "
                                        f"{type(model).__name__} is not a causal LM (use SVDLLM / PlainSVD / A3)")
        self.model, self.layers, self.ids = model, layers, ids
        with recording_outputs(layers) as self.outs:
            self.base = self._nll()

    @torch.no_grad()
    def _nll(self) -> float:
        logits = self.model(input_ids=self.ids, use_cache=False).logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.ids[:, 1:].reshape(-1)).item()

    def nll_from(self, first: int) -> float:
        """NLL with layers before `first` replaying their recorded outputs (their weights are unchanged)."""
        with replaying(self.layers, self.outs, first):
            return self._nll()


def _set_rows(mod: nn.Module, rows: slice, w: torch.Tensor, conv1d: bool) -> None:
    if conv1d:
        mod.weight[:, rows] = w.t().to(mod.weight.dtype)
    else:
        mod.weight[rows] = w.to(mod.weight.dtype)


def _candidate_ranks(t: Target, kv: bool) -> list[int]:
    if kv:
        return [max(1, fz.floor(c * t.out_f)) for c in KV_CANDIDATES]
    return [fz.rank_for_keep(t.out_f, t.in_f, c) for c in PARAM_CANDIDATES]


@torch.no_grad()
def sensitivity(model, views, targets, scale_fn, ids, kv: bool, progress: bool, table: torch.Tensor | None = None,
                start: int = 0, on_row=None) -> torch.Tensor:
    """ppl[t, j]: calibration perplexity with only target t truncated to its j-th candidate rank. Resuming: `table`
    with its rows before `start` filled; on_row(t) after row t is."""
    layers = get_path(model, views[0].spec.layers)
    was_training = model.training
    model.eval()
    try:
        prober = Prober(model, layers, ids)
        if table is None:
            table = torch.empty(len(targets), len(_candidate_ranks(targets[0], kv)), dtype=torch.float64)
        bar = tqdm(total=table.numel(), initial=start * table.shape[1], desc="ASVD sensitivity",
                   disable=not progress, unit="probe")
        for ti, t in enumerate(targets):
            if ti < start:
                continue
            v = views[t.layer]
            mod = get_path(v.layer, t.path)
            w_full, _ = linear_params(mod, v.spec.conv1d)
            w = w_full[t.rows].detach().clone()
            sc = scale_fn(t)
            svd = fz.asvd_svd(w, sc)
            try:
                for j, r in enumerate(_candidate_ranks(t, kv)):
                    b, a = fz.asvd_truncate(svd, sc, r)
                    _set_rows(mod, t.rows, b @ a, v.spec.conv1d)
                    table[ti, j] = math.exp(prober.nll_from(t.layer))
                    bar.update()
            finally:
                _set_rows(mod, t.rows, w, v.spec.conv1d)
            if on_row is not None:
                on_row(ti)
        bar.close()
    finally:
        model.train(was_training)
    return table


# ------------------------------------------------------------------------------------------- search
def threshold_search(ppl: torch.Tensor, saved: list[list[int]], goal: int) -> list[int | None]:
    """Per target, the chosen candidate (None: unchanged): smallest threshold on the sorted ppl list meeting `goal`."""
    entries = sorted((float(ppl[t, j]), t, j) for t in range(ppl.shape[0]) for j in range(ppl.shape[1]))

    def pick(n: int) -> list[int | None]:
        choice: list[int | None] = [None] * ppl.shape[0]
        for _, t, j in entries[:n]:
            if choice[t] is None or saved[t][j] > saved[t][choice[t]]:
                choice[t] = j
        return choice

    total = lambda ch: sum(saved[t][c] for t, c in enumerate(ch) if c is not None)  # noqa: E731
    if total(pick(len(entries))) < goal:
        raise RatioError(f"ASVD rank search cannot remove {goal:,} (the target) even with every candidate at its "
                         f"smallest size; lower the ratio")
    lo, hi = 0, len(entries)
    while lo < hi:
        mid = (lo + hi) // 2
        if total(pick(mid)) >= goal:
            hi = mid
        else:
            lo = mid + 1
    return pick(lo)


def asvd_ranks(cfg, model, views, targets, scale_fn, stats, calib, progress) -> list[int | None]:
    """Per-target ranks from ASVD's sensitivity search (budget: params for ratio=, cache size for kv_ratio=)."""
    kv = cfg.kv_ratio is not None
    key = f"asvd:{'kv' if kv else 'params'}:alpha={cfg.alpha:g}:probe={cfg.probe_samples}x{cfg.probe_seq_len}"
    table = _sensitivity_table(cfg, key, model, views, targets, scale_fn, stats, calib, kv, progress)
    cands = [_candidate_ranks(t, kv) for t in targets]
    cost = [(1 if kv else t.out_f + t.in_f) for t in targets]           # budget units per rank
    full = [(t.out_f if kv else None) for t in targets]
    if kv:
        saved = [[t.out_f - r for r in c] for t, c in zip(targets, cands)]
        goal = math.ceil(cfg.kv_ratio * sum(t.out_f for t in targets))
    else:
        saved = [[t.out_f * t.in_f - r * (t.out_f + t.in_f) for r in c] for t, c in zip(targets, cands)]
        goal = math.ceil(cfg.ratio * sum(linear_param_count(v.layer) for v in views))
    choice = threshold_search(table, saved, goal)
    ranks = [full[t] if ch is None else cands[t][ch] for t, ch in enumerate(choice)]
    # give the slack back, one rank at a time, to the most sensitive factorized targets
    slack = sum(saved[t][ch] for t, ch in enumerate(choice) if ch is not None) - goal
    order = sorted((t for t, ch in enumerate(choice) if ch is not None), key=lambda t: -float(table[t, choice[t]]))
    for t in order:
        top = targets[t].out_f if kv else fz.rank_for_keep(targets[t].out_f, targets[t].in_f, 1.0)
        add = min(slack // cost[t], max(0, top - ranks[t]))
        ranks[t] += add
        slack -= add * cost[t]
    return ranks                     # None: the target stays dense (params mode only)


def _sensitivity_table(cfg, key, model, views, targets, scale_fn, stats, calib, kv, progress) -> torch.Tensor:
    """ASVD's sensitivity table from `stats.extra[key]`, else probed; a table an interrupted run left part way
    (`key:done` rows, saved by `Stats.checkpoint` when the stats have an `autosave` file) is resumed."""
    table, done = stats.extra.get(key), stats.extra.get(key + ":done")
    if table is not None and table.shape[0] == len(targets) and done is None:
        return table
    start = int(done[0]) if table is not None and table.shape[0] == len(targets) and done is not None else 0
    start = start if 0 <= start <= len(targets) else 0          # a damaged record: probe everything again
    if calib is None:
        raise CalibrationError("ASVD rank_search probes calibration perplexity: pass calib= (token ids) too, "
                               "or rank_search=False")
    ids = calib[: cfg.probe_samples, : cfg.probe_seq_len].to(next(model.parameters()).device)
    table = table.clone() if start else torch.empty(len(targets), len(_candidate_ranks(targets[0], kv)),
                                                    dtype=torch.float64)
    t0 = time.perf_counter()

    def on_row(ti: int) -> None:                 # rows 0..ti are filled: what a resumed run starts from
        stats.extra[key], stats.extra[key + ":done"] = table, torch.tensor([ti + 1])
        stats.checkpoint()

    sensitivity(model, views, targets, scale_fn, ids, kv, progress, table, start, on_row)     # fills `table`
    stats.extra.pop(key + ":done", None)
    stats.extra[key] = table
    stats.extra[key + ":seconds"] = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    return table

