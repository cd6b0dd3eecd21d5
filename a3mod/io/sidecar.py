"""The a3mod.json sidecar: its schema, checked before any module is built, and its self-checksum.

`validate(side)` raises CheckpointError naming the field (e.g. "layers.3.attn.rope_index[5] = 999 is outside
[0, 64)") for a wrong type, an unknown key, a value out of range or inconsistent dims; each layer entry is checked
by the codecs of the kinds it holds (io/codecs.py). `seal` / `check_seal` add
and verify `sha256`, the checksum of the sidecar's own canonical JSON, so a flipped byte anywhere in it is found
even where the value would still be valid. `files` records the size and sha256 of every file `a3mod.save` wrote.
"""
from __future__ import annotations

import hashlib
import json
import re

from ..errors import CheckpointError
from .codecs import validate_entry
from .schema import fail, integer, keys, number, string

FORMATS = (1, 2, 3)       # what each is: io/description.py
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def validate(side, slim: bool = False) -> dict:
    """Check the whole sidecar (see the module docstring); returns it. `slim`: config.json's description, whose
    index lists may be absent."""
    keys(side, "(top level)", ("format", "model_type", "layers"),
          ("a3mod_version", "model_class", "passes", "calib_tokens", "orig_layer_params", "quant", "aliases",
           "files", "sha256", "heal", "sequential", "extra"))
    if side["format"] not in FORMATS or isinstance(side["format"], bool):
        raise CheckpointError(f"a3mod.json format {side['format']!r}; this a3mod reads formats {list(FORMATS)}")
    string(side["model_type"], "model_type")
    for k in ("a3mod_version", "model_class"):
        if side.get(k) is not None:
            string(side[k], k)
    if "passes" in side:
        if not isinstance(side["passes"], list) or not all(isinstance(p, dict) and isinstance(p.get("type"), str)
                                                           for p in side["passes"]):
            fail("passes", "must be a list of pass objects with a 'type'")
    if side.get("calib_tokens") is not None:
        integer(side["calib_tokens"], "calib_tokens")
    if side.get("orig_layer_params") is not None:
        if not isinstance(side["orig_layer_params"], list):
            fail("orig_layer_params", "must be a list of integers")
        for j, x in enumerate(side["orig_layer_params"]):
            integer(x, f"orig_layer_params[{j}]")
    layers = keys(side["layers"], "layers", (), tuple(side["layers"]) if isinstance(side["layers"], dict) else ())
    for k, e in layers.items():
        if not (k.isdigit() and str(int(k)) == k):
            fail("layers", f"has key {k!r}, not a layer index")
        validate_entry(e, f"layers.{k}", slim)
    if "sequential" in side and side["sequential"] is not True:
        fail("sequential", "is written only as true (calibrated layer by layer on the compressed model's inputs)")
    if "heal" in side:
        h = keys(side["heal"], "heal", ("steps", "lr", "batch_size", "temperature", "loss_first", "loss_last",
                                         "seconds", "tokens"))
        for k in ("steps", "batch_size", "tokens"):
            integer(h[k], f"heal.{k}", 1)
        for k in ("lr", "temperature", "loss_first", "loss_last", "seconds"):
            number(h[k], f"heal.{k}", 0, float("inf"))
    if "quant" in side:
        q = keys(side["quant"], "quant", ("config", "compute_dtype"))
        keys(q["config"], "quant.config", ("type",), tuple(q["config"]) if isinstance(q["config"], dict) else ())
        string(q["compute_dtype"], "quant.compute_dtype", {"float32", "float16", "bfloat16", "float64"})
    if "aliases" in side:
        a = keys(side["aliases"], "aliases", (), tuple(side["aliases"]) if isinstance(side["aliases"], dict) else ())
        for k, v in a.items():
            string(v, f"aliases.{k}")
    if "extra" in side:
        if not (isinstance(side["extra"], list) and all(isinstance(n, str) and n and "/" not in n and "\\" not in n
                                                        and not n.startswith(".") for n in side["extra"])):
            fail("extra", "must be a list of plain file names")
    if "files" in side:
        f = keys(side["files"], "files", (), tuple(side["files"]) if isinstance(side["files"], dict) else ())
        for name, e in f.items():
            if "/" in name or "\\" in name or name.startswith(".") or name == "a3mod.json":
                fail("files", f"names {name!r}, which is not a file of the checkpoint folder")
            keys(e, f"files.{name}", ("bytes", "sha256"))
            integer(e["bytes"], f"files.{name}.bytes")
            if not (isinstance(e["sha256"], str) and _HEX64.match(e["sha256"])):
                fail(f"files.{name}.sha256", f"= {e['sha256']!r} is not a sha256 hex digest")
    return side


# ------------------------------------------------------------------------------------------- checksum
def _canonical(side: dict) -> bytes:
    return json.dumps({k: v for k, v in side.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":")).encode()


def seal(side: dict) -> dict:
    """`side` with its self-checksum `sha256` set."""
    return {**side, "sha256": hashlib.sha256(_canonical(side)).hexdigest()}


def check_seal(side: dict) -> None:
    """CheckpointError when the self-checksum is present and does not match (a3mod.json always has one; config.json's
    description has none)."""
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
