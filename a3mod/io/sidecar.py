"""The a3mod.json sidecar: its schema, checked before any module is built, and its self-checksum.

`validate(side)` raises CheckpointError naming the field (e.g. "layers.3.attn.rope_index[5] = 999 is outside
[0, 64)") for a wrong type, an unknown key, a value out of range or inconsistent dims. `seal` / `check_seal` add
and verify `sha256`, the checksum of the sidecar's own canonical JSON, so a flipped byte anywhere in it is found
even where the value would still be valid. `files` records the size and sha256 of every file `a3mod.save` wrote.
"""
from __future__ import annotations

import hashlib
import json
import math
import re

from ..errors import CheckpointError

FORMATS = (1, 2)
_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BIG = 1 << 40


def _fail(path: str, msg: str):
    raise CheckpointError(f"a3mod.json: {path} {msg}")


def _keys(d, path: str, required: tuple, optional: tuple = ()) -> dict:
    if not isinstance(d, dict):
        _fail(path, f"must be an object, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        _fail(path, f"lacks {missing}")
    extra = sorted(k for k in d if k not in required and k not in optional)
    if extra:
        _fail(path, f"has unknown keys {extra}")
    return d


def _int(v, path: str, lo: int = 0, hi: int = _BIG) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        _fail(path, f"= {v!r} must be an integer")
    if not lo <= v < hi:
        _fail(path, f"= {v} is outside [{lo}, {hi})")
    return v


def _bool(v, path: str) -> bool:
    if not isinstance(v, bool):
        _fail(path, f"= {v!r} must be true or false")
    return v


def _num(v, path: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        _fail(path, f"= {v!r} must be a finite number")
    if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
        _fail(path, f"= {v!r} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
    return float(v)


def _str(v, path: str, allowed=None) -> str:
    if not isinstance(v, str):
        _fail(path, f"= {v!r} must be a string")
    if allowed is not None and v not in allowed:
        _fail(path, f"= {v!r}; allowed: {sorted(allowed)}")
    return v


def _indices(v, path: str, n: int | None, bound: int, ascending: bool) -> None:
    if not isinstance(v, list):
        _fail(path, f"must be a list of indices, got {type(v).__name__}")
    if n is not None and len(v) != n:
        _fail(path, f"has {len(v)} entries, expected {n}")
    for j, x in enumerate(v):
        _int(x, f"{path}[{j}]", 0, bound)
    if ascending and any(a >= b for a, b in zip(v, v[1:])):
        _fail(path, "must be strictly ascending (each original index once)")


def _bias(v, path: str, names: str) -> None:
    _keys(v, path, tuple(names))
    for n in names:
        _bool(v[n], f"{path}.{n}")


def _dropouts(e: dict, path: str, names) -> None:
    for n in names:
        if n in e:
            _num(e[n], f"{path}.{n}", 0.0, 1.0)


def _heads(a: dict, path: str) -> None:
    for n in ("hidden", "heads", "kv_heads", "head_dim"):
        _int(a[n], f"{path}.{n}", 1)
    if a["heads"] % a["kv_heads"]:
        _fail(f"{path}.heads", f"= {a['heads']} is not a multiple of kv_heads = {a['kv_heads']}")
    _num(a["scaling"], f"{path}.scaling", 0.0, 1e6, lo_open=True)
    _bool(a["is_causal"], f"{path}.is_causal")
    _dropouts(a, path, ("dropout", "out_dropout"))


def _attn(a: dict, path: str) -> None:
    _keys(a, path, ("hidden", "heads", "kv_heads", "head_dim", "qk_dim", "vo_dim", "rot_dim", "scaling", "bias",
                    "sliding_window", "is_causal", "dropout", "out_dropout", "rope_index"),
          ("out_proj", "qk_norm", "softcap", "rope_table", "alibi", "bool_mask", "residual", "sinks"))
    _heads(a, path)
    hd = a["head_dim"]
    _int(a["qk_dim"], f"{path}.qk_dim", 1, hd + 1)
    _int(a["vo_dim"], f"{path}.vo_dim", 1, hd + 1)
    rot = _int(a["rot_dim"], f"{path}.rot_dim", 0, a["qk_dim"] + 1)
    if rot % 2:
        _fail(f"{path}.rot_dim", f"= {rot} must be even (RoPE rotates pairs)")
    _bias(a["bias"], f"{path}.bias", "qkvo")
    if a["sliding_window"] is not None:
        _int(a["sliding_window"], f"{path}.sliding_window", 1)
    idx = a["rope_index"]
    if not isinstance(idx, list):
        _fail(f"{path}.rope_index", f"must be a list, got {type(idx).__name__}")
    flat = [x for row in idx for x in (row if isinstance(row, list) else [row])]
    _indices(flat, f"{path}.rope_index", a["kv_heads"] * rot, hd, ascending=False)
    if "out_proj" in a and a["out_proj"] is not False:
        _fail(f"{path}.out_proj", f"= {a['out_proj']!r}; only false is written (the projection lives outside)")
    if "qk_norm" in a:
        _str(a["qk_norm"], f"{path}.qk_norm", {"head", "all"})
        if a["qk_dim"] != hd:
            _fail(f"{path}.qk_dim", f"= {a['qk_dim']} must equal head_dim = {hd} under qk_norm")
    if "softcap" in a:
        _num(a["softcap"], f"{path}.softcap", 0.0, 1e6, lo_open=True)
    if "rope_table" in a:
        _str(a["rope_table"], f"{path}.rope_table", {"sin_cos", "once"})
    if "sinks" in a and a["sinks"] is not True:
        _fail(f"{path}.sinks", f"= {a['sinks']!r}; only true is written (the attention has per-head sink logits)")
    if "alibi" in a:
        _str(a["alibi"], f"{path}.alibi", {"position_bias", "alibi"})
    if "bool_mask" in a:
        _str(a["bool_mask"], f"{path}.bool_mask", {"masked"})
    if "residual" in a and a["residual"] is not True:
        _fail(f"{path}.residual", f"= {a['residual']!r}; only true is written (the attention adds the residual)")


def _latent(a: dict, path: str) -> None:
    _keys(a, path, ("hidden", "heads", "kv_heads", "head_dim", "k_rank", "v_rank", "rot_dim", "scaling",
                    "is_causal", "dropout", "out_dropout", "bias"))
    _heads(a, path)
    hd, kv = a["head_dim"], a["kv_heads"]
    _int(a["k_rank"], f"{path}.k_rank", 1, kv * hd + 1)
    _int(a["v_rank"], f"{path}.v_rank", 1, kv * hd + 1)
    rot = _int(a["rot_dim"], f"{path}.rot_dim", 0, hd + 1)
    if rot % 2:
        _fail(f"{path}.rot_dim", f"= {rot} must be even")
    _bias(a["bias"], f"{path}.bias", "qkvo")


def _mlp(m: dict, path: str) -> None:
    from transformers.activations import ACT2FN

    _keys(m, path, ("hidden", "inter", "orig_inter", "act", "gated", "up_bias", "down_bias", "kept"),
          ("dropout", "residual"))
    if "residual" in m and m["residual"] is not True:
        _fail(f"{path}.residual", f"= {m['residual']!r}; only true is written (the MLP adds the residual)")
    _int(m["hidden"], f"{path}.hidden", 1)
    orig = _int(m["orig_inter"], f"{path}.orig_inter", 1)
    inter = _int(m["inter"], f"{path}.inter", 1, orig + 1)
    _str(m["act"], f"{path}.act", set(ACT2FN))
    for n in ("gated", "up_bias", "down_bias"):
        _bool(m[n], f"{path}.{n}")
    _dropouts(m, path, ("dropout",))
    if m["kept"] is not None:
        _indices(m["kept"], f"{path}.kept", inter, orig, ascending=True)


def _experts(x: dict, path: str) -> None:
    """Routed experts narrowed in place: every expert keeps the same number of its orig_inter neurons."""
    _keys(x, path, ("orig_inter", "kept"), ("fallback",))
    orig = _int(x["orig_inter"], f"{path}.orig_inter", 1)
    kept = x["kept"]
    if not (isinstance(kept, list) and kept and all(isinstance(r, list) for r in kept)):
        _fail(f"{path}.kept", "must be a non-empty list (one per expert) of neuron index lists")
    width = len(kept[0])
    for j, r in enumerate(kept):
        _indices(r, f"{path}.kept[{j}]", width, orig, ascending=True)
    if width < 1:
        _fail(f"{path}.kept", "keeps no neuron")
    if "fallback" in x:
        _indices(x["fallback"], f"{path}.fallback", None, len(kept), ascending=True)


def _linear_map(d, path: str, required: tuple, optional: tuple = ()) -> None:
    _keys(d, path, (), tuple(d) if isinstance(d, dict) else ())
    for p, e in d.items():
        if not _PATH.match(p):
            _fail(path, f"names {p!r}, which is not a module path")
        q = f"{path}.{p}"
        _keys(e, q, required, optional)
        for n in ("in_features", "out_features", "rank", "orig_in", "orig_out"):
            if n in e:
                _int(e[n], f"{q}.{n}", 1)
        _bool(e["bias"], f"{q}.bias")


def _narrow(d, path: str) -> None:
    _linear_map(d, path, ("in_features", "out_features", "bias", "orig_in", "orig_out", "kept"))
    for p, e in d.items():
        q = f"{path}.{p}"
        if e["in_features"] > e["orig_in"] or e["out_features"] > e["orig_out"]:
            _fail(q, f"({e['in_features']} -> {e['out_features']}) is wider than the original "
                     f"({e['orig_in']} -> {e['orig_out']})")
        if e["kept"] is not None:
            side = "out" if len(e["kept"]) == e["out_features"] and e["out_features"] < e["orig_out"] else "in"
            _indices(e["kept"], f"{q}.kept", e[f"{side}_features"], e[f"orig_{side}"], ascending=True)


def _entry(e: dict, path: str) -> None:
    _keys(e, path, (), ("attn", "latent_attn", "linears", "narrow", "quantized", "mlp", "experts", "mla"))
    if "mla" in e:
        m = _keys(e["mla"], f"{path}.mla", ("qk_nope", "v", "orig_nope", "orig_v"))
        for n in m:
            _int(m[n], f"{path}.mla.{n}", 1)
    if "attn" in e and "latent_attn" in e:
        _fail(path, "has both attn and latent_attn")
    if "attn" in e:
        _attn(e["attn"], f"{path}.attn")
    if "latent_attn" in e:
        _latent(e["latent_attn"], f"{path}.latent_attn")
    if "mlp" in e:
        _mlp(e["mlp"], f"{path}.mlp")
    if "experts" in e:
        _experts(e["experts"], f"{path}.experts")
    if "linears" in e:
        _linear_map(e["linears"], f"{path}.linears", ("in_features", "rank", "out_features", "bias"))
        for p, lr in e["linears"].items():
            if lr["rank"] > min(lr["in_features"], lr["out_features"]):
                _fail(f"{path}.linears.{p}.rank", f"= {lr['rank']} exceeds min(in, out) = "
                                                  f"{min(lr['in_features'], lr['out_features'])}")
    if "narrow" in e:
        _narrow(e["narrow"], f"{path}.narrow")
    if "quantized" in e:
        _linear_map(e["quantized"], f"{path}.quantized", ("in_features", "out_features", "bias"))


def validate(side) -> dict:
    """Check the whole sidecar (see the module docstring); returns it."""
    _keys(side, "(top level)", ("format", "model_type", "layers"),
          ("a3mod_version", "model_class", "passes", "calib_tokens", "orig_layer_params", "quant", "aliases",
           "files", "sha256", "heal"))
    if side["format"] not in FORMATS or isinstance(side["format"], bool):
        raise CheckpointError(f"a3mod.json format {side['format']!r}; this a3mod reads formats {list(FORMATS)}")
    _str(side["model_type"], "model_type")
    for k in ("a3mod_version", "model_class"):
        if side.get(k) is not None:
            _str(side[k], k)
    if "passes" in side:
        if not isinstance(side["passes"], list) or not all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                                           for p in side["passes"]):
            _fail("passes", "must be a list of pass objects with a 'type'")
    if side.get("calib_tokens") is not None:
        _int(side["calib_tokens"], "calib_tokens")
    if side.get("orig_layer_params") is not None:
        if not isinstance(side["orig_layer_params"], list):
            _fail("orig_layer_params", "must be a list of integers")
        for j, x in enumerate(side["orig_layer_params"]):
            _int(x, f"orig_layer_params[{j}]")
    layers = _keys(side["layers"], "layers", (), tuple(side["layers"]) if isinstance(side["layers"], dict) else ())
    for k, e in layers.items():
        if not (k.isdigit() and str(int(k)) == k):
            _fail("layers", f"has key {k!r}, not a layer index")
        _entry(e, f"layers.{k}")
    if "heal" in side:
        h = _keys(side["heal"], "heal", ("steps", "lr", "batch_size", "temperature", "loss_first", "loss_last",
                                         "seconds", "tokens"))
        for k in ("steps", "batch_size", "tokens"):
            _int(h[k], f"heal.{k}", 1)
        for k in ("lr", "temperature", "loss_first", "loss_last", "seconds"):
            _num(h[k], f"heal.{k}", 0, float("inf"))
    if "quant" in side:
        q = _keys(side["quant"], "quant", ("config", "compute_dtype"))
        _keys(q["config"], "quant.config", ("type",), tuple(q["config"]) if isinstance(q["config"], dict) else ())
        _str(q["compute_dtype"], "quant.compute_dtype", {"float32", "float16", "bfloat16", "float64"})
    if "aliases" in side:
        a = _keys(side["aliases"], "aliases", (), tuple(side["aliases"]) if isinstance(side["aliases"], dict) else ())
        for k, v in a.items():
            _str(v, f"aliases.{k}")
    if "files" in side:
        f = _keys(side["files"], "files", (), tuple(side["files"]) if isinstance(side["files"], dict) else ())
        for name, e in f.items():
            if "/" in name or "\\" in name or name.startswith(".") or name == "a3mod.json":
                _fail("files", f"names {name!r}, which is not a file of the checkpoint folder")
            _keys(e, f"files.{name}", ("bytes", "sha256"))
            _int(e["bytes"], f"files.{name}.bytes")
            if not (isinstance(e["sha256"], str) and _HEX64.match(e["sha256"])):
                _fail(f"files.{name}.sha256", f"= {e['sha256']!r} is not a sha256 hex digest")
    return side


# ------------------------------------------------------------------------------------------- checksum
def _canonical(side: dict) -> bytes:
    return json.dumps({k: v for k, v in side.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":")).encode()


def seal(side: dict) -> dict:
    """`side` with its self-checksum `sha256` set."""
    return {**side, "sha256": hashlib.sha256(_canonical(side)).hexdigest()}


def check_seal(side: dict) -> None:
    """CheckpointError when the self-checksum is present and does not match (sidecars before it have none)."""
    if "sha256" in side and hashlib.sha256(_canonical(side)).hexdigest() != side["sha256"]:
        raise CheckpointError("a3mod.json was modified or corrupted: its checksum (sha256) does not match its "
                              "content")


def dumps(side: dict) -> str:
    """Deterministic text of a sidecar: sorted keys, one indentation."""
    return json.dumps(side, indent=1, sort_keys=True) + "\n"


def parse(text: bytes | str) -> dict:
    """JSON -> sidecar dict, CheckpointError on malformed JSON (or absurd nesting)."""
    try:
        side = json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise CheckpointError(f"a3mod.json is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(side, dict):
        raise CheckpointError(f"a3mod.json must hold a JSON object, got {type(side).__name__}")
    return side
