"""An undo log for module swaps: every module `apply` swaps out of a model is kept until the rewrite succeeded, so
an error (in a later layer's solve, in the self-check) can put every one back and leave the model as it was.

    with UndoLog(model, budget_bytes) as undo:
        undo.swap(layer, "self_attn", new_attention)      # new module in; the old one logged
        ...
        undo.restore()                                    # on error: every old module back, newest first

Old modules are kept as they are up to `budget_bytes` of tensors in all (the default, `A3MOD_UNDO_MEMORY`, else
1 GiB: small models behave exactly as when the whole model was solved before any swap); beyond it each further
old module's tensors are written to a temporary safetensors file and the module keeps meta tensors, so a large
model's peak is the model plus one layer's work instead of the model twice. The files are deleted on exit.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..arch import get_path, set_child
from ..errors import A3ModError


def default_budget() -> int:
    """Bytes of swapped-out modules kept in memory: $A3MOD_UNDO_MEMORY (bytes), else 1 GiB."""
    raw = os.environ.get("A3MOD_UNDO_MEMORY", str(1 << 30))
    try:
        value = int(raw)
    except ValueError:
        raise A3ModError(f"A3MOD_UNDO_MEMORY={raw!r} must be a whole number of bytes") from None
    if value < 0:
        raise A3ModError(f"A3MOD_UNDO_MEMORY={raw!r} must be >= 0")
    return value


def _own_tensors(old: nn.Module, root: nn.Module, held=frozenset()) -> dict[str, tuple[dict, str, torch.Tensor]]:
    """{name: (its module's parameter or buffer dict, key, tensor)} of every tensor that only `old` holds: none of a
    submodule or tensor that `root` still reaches after the swap (a norm the new module took over, say), nor one in
    `held` (ids of tensors an earlier logged module keeps in memory: a block tied across layers, spilled twice,
    would come back as two copies)."""
    mods = {id(m) for m in root.modules()}
    alive = {id(t) for t in [*root.parameters(), *root.buffers()]} | set(held)
    out = {}
    for name, mod in old.named_modules():
        if id(mod) in mods:
            continue
        prefix = f"{name}." if name else ""
        for store in (mod._parameters, mod._buffers):
            for n, t in store.items():
                if t is not None and not t.is_meta and id(t) not in alive:
                    out[prefix + n] = (store, n, t)
    return out


class UndoLog:
    """See the module docstring."""

    def __init__(self, root: nn.Module, budget_bytes: int | None = None):
        self.root = root                # the model the swaps are made in: what it still holds is never spilled
        self.budget = default_budget() if budget_bytes is None else budget_bytes
        self.kept = 0
        self.entries: list[tuple[nn.Module, str, nn.Module, Path | None]] = []
        self.dir: Path | None = None
        self.spilled = 0

    def __enter__(self) -> "UndoLog":
        return self

    def __exit__(self, *exc) -> None:
        self.entries.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def swap(self, layer: nn.Module, path: str, new: nn.Module) -> None:
        """Put `new` at `path` in `layer`, logging the module it replaces."""
        old = get_path(layer, path)
        set_child(layer, path, new)
        held = {id(t) for _, _, o, _ in self.entries for t in [*o.parameters(), *o.buffers()] if not t.is_meta}
        tensors = _own_tensors(old, self.root, held)
        size = sum(t.numel() * t.element_size() for _, _, t in tensors.values())
        spill = None
        if self.kept + size > self.budget and size:
            spill = self._spill(tensors)
        else:
            self.kept += size
        self.entries.append((layer, path, old, spill))

    def _spill(self, tensors: dict[str, tuple[dict, str, torch.Tensor]]) -> Path:
        """Write the tensors to a file and put meta tensors in their place (in the old module's own dicts: the
        module objects stay, and whatever else holds one of them keeps it)."""
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="a3mod-undo-"))
        f = self.dir / f"{len(self.entries):05d}.safetensors"
        canon: dict[tuple, str] = {}
        for k, (_, _, t) in tensors.items():                 # tied tensors are written once
            canon.setdefault(_key(t), k)
        save_file({k: tensors[k][2].detach().cpu().contiguous() for k in canon.values()}, str(f))
        ties = [f"{k}\t{canon[_key(t)]}\t{t.device}" for k, (_, _, t) in tensors.items()]
        f.with_suffix(".ties").write_text("\n".join(ties))
        for store, n, t in tensors.values():
            meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
            store[n] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        self.spilled += 1
        return f

    def restore(self) -> None:
        """Every logged module back in its place, newest first (spilled ones re-read from their files)."""
        for layer, path, old, spill in reversed(self.entries):
            if spill is not None:
                _reload(old, spill)
            set_child(layer, path, old)
        self.entries.clear()
        self.kept = 0


def _key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def _reload(old: nn.Module, f: Path) -> None:
    """Give `old` back the tensors `_spill` wrote (tied names one object again, each on its first device)."""
    saved = load_file(str(f))
    ties = {k: (c, dev) for k, c, dev in (line.split("\t") for line in f.with_suffix(".ties").read_text().splitlines())}
    made: dict[str, torch.Tensor] = {}
    for name, mod in old.named_modules():
        prefix = f"{name}." if name else ""
        for store in (mod._parameters, mod._buffers):
            for n, t in list(store.items()):
                if prefix + n not in ties:
                    continue
                c, dev = ties[prefix + n]
                if c not in made:
                    value = saved[c].to(dev)
                    made[c] = nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) \
                        else value
                store[n] = made[c]
