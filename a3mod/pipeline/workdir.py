"""Streaming's files: the source checkpoint read tensor by tensor (`Source`), the hidden states between layers
(`Store`, in memory or in offload files tagged with the run id), and the resumable work dir (finished layers, the
run key that a resume must match)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import CheckpointError
from ..io import files
from ..io.fingerprint import file_digest
from ..io.tensors import TORCH_DTYPES
from ..passes import pass_to_dict


# ------------------------------------------------------------------------------------------- source
class Source:
    """The tensors of an HF safetensors folder (one file or shards), read by name without loading the rest."""

    def __init__(self, src: Path, prefix: str):
        self.files: dict[str, Path] = {}
        for f in sorted(src.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                self.files.update({k: f for k in h.keys()})
        self.prefix = prefix + "." if prefix else ""

    def name(self, key: str) -> str | None:
        """The file's name of model key `key` (with or without the base model prefix, as hub files vary)."""
        if key in self.files:
            return key
        if self.prefix and key.startswith(self.prefix) and key[len(self.prefix):] in self.files:
            return key[len(self.prefix):]
        return None

    def stored_dtype(self, key: str) -> torch.dtype | None:
        """The dtype model key `key` has in the files (None for tensors assembled from several)."""
        name = self.name(key)
        if name is None:
            return None
        with safe_open(str(self.files[name]), "pt") as h:
            return TORCH_DTYPES.get(h.get_slice(name).get_dtype())

    def read(self, keys: list[str], dtype: torch.dtype, device="cpu") -> dict[str, Tensor]:
        """{key: tensor} for model keys (floating tensors cast to `dtype`); one file opened at a time. Routed
        experts that the file keeps per expert (the hub layout) are stacked into the model's 3-D parameters."""
        fused = {k: parts for k in keys if self.name(k) is None and (parts := self._expert_parts(k))}
        extra = sorted({n for parts in fused.values() for ns in parts for n in ns})
        out = self._read([k for k in keys if k not in fused] + extra, dtype, device)
        for k, parts in fused.items():       # (E, 2I, d) from [gate; up] per expert, or (E, d, I) from down
            out[k] = torch.stack([torch.cat([out[n] for n in ns], 0) for ns in parts])
        for n in extra:
            out.pop(n)
        return out

    _EXPERT_NAMES = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}

    def _expert_parts(self, key: str) -> list[list[str]] | None:
        """For a fused experts parameter `...experts.gate_up_proj` / `.down_proj` the file lacks: the per-expert
        weight keys that make it, one list per expert (`experts.{e}.gate_proj.weight`, Mixtral's w1/w3/w2)."""
        base, _, leaf = key.rpartition(".")
        if not base.endswith(".experts") or leaf not in self._EXPERT_NAMES:
            return None
        for names in self._EXPERT_NAMES[leaf]:
            parts, e = [], 0
            while all(self.name(f"{base}.{e}.{n}.weight") for n in names):
                parts.append([f"{base}.{e}.{n}.weight" for n in names])
                e += 1
            if parts:
                return parts
        return None

    def _read(self, keys: list[str], dtype: torch.dtype, device="cpu") -> dict[str, Tensor]:
        names = {k: self.name(k) for k in keys}
        lost = [k for k, n in names.items() if n is None]
        if lost:
            raise CheckpointError(f"the source checkpoint lacks {len(lost)} tensors the model needs, e.g. {lost[:3]}")
        out = {}
        for f in sorted({self.files[n] for n in names.values()}):
            with safe_open(str(f), "pt", device=str(device)) as h:
                for k, n in names.items():
                    if self.files[n] == f:
                        t = h.get_tensor(n)
                        out[k] = t.to(dtype) if t.is_floating_point() else t
        return out


def fingerprint(src: Path) -> dict:
    """The source as a resume must find it again: path, config bytes and each weight file's sampled digest
    (a3mod.io.fingerprint.file_digest: size, header and 64 blocks of data); a GGUF file: path and its digest."""
    if src.is_file():
        return {"src": str(src.resolve()), "files": {src.name: file_digest(src)}}
    return {"src": str(src.resolve()), "files": {f.name: file_digest(f) for f in sorted(src.glob("*.safetensors"))},
            "config_sha256": hashlib.sha256((src / "config.json").read_bytes()).hexdigest()}


# ------------------------------------------------------------------------------------ hidden states
class Store:
    """Hidden states between layers, per batch b: `get(j, b)` = inputs of layer j. In memory (a resume
    checkpoint is one file per layer boundary in the work dir), or with `offload` one safetensors file per
    batch under offload_dir/r<rank>_in<j>/ (those files are then the checkpoint). `tag` names a second stream
    (the compressed model's, for the sequential re-fit) kept beside the first."""

    def __init__(self, work: Path, offload: Path | None, rank: int, run_id: str = "", tag: str = ""):
        self.work, self.rank, self.mem, self.run_id, self.tag = work, rank, {}, run_id, tag
        self.offload = offload / f"a3mod-run-{run_id}" if offload is not None else None   # one folder per run

    def _dir(self, j: int) -> Path:
        return self.offload / f"{self.tag}r{self.rank}_in{j:04d}"

    def _file(self, j: int) -> Path:
        return self.work / f"hidden{self.tag}_r{self.rank}_in{j:04d}.safetensors"

    def get(self, j: int, b: int) -> Tensor:
        if self.offload is None:
            return self.mem[b]
        return read_tagged(self._dir(j) / f"b{b:05d}.safetensors", self.run_id)["h"]

    def put(self, j: int, b: int, t: Tensor) -> None:
        if self.offload is None:
            self.mem[b] = t
        else:
            self._dir(j).mkdir(parents=True, exist_ok=True)
            save_file({"h": t.contiguous()}, str(self._dir(j) / f"b{b:05d}.safetensors"), metadata={"run": self.run_id})

    def has(self, j: int) -> bool:
        return (self._dir(j) / "done").exists() if self.offload is not None else self._file(j).exists()

    def commit(self, j: int) -> None:
        """Inputs of layer j are complete: make them the resume checkpoint; drop those of layer j - 2."""
        if self.offload is None:
            tmp = self._file(j).with_suffix(".tmp")
            save_file({f"b{b}": t.contiguous() for b, t in self.mem.items()}, str(tmp), metadata={"run": self.run_id})
            os.replace(tmp, self._file(j))
        else:
            (self._dir(j) / "done").write_text("")
        self.drop(j - 2)

    def drop(self, j: int) -> None:
        if j < 0:
            return
        if self.offload is None:
            self._file(j).unlink(missing_ok=True)
        else:
            shutil.rmtree(self._dir(j), ignore_errors=True)

    def restore(self, j: int) -> None:
        if self.offload is None:
            self.mem = {int(k[1:]): t for k, t in read_tagged(self._file(j), self.run_id).items()}

    def close(self) -> None:
        """Remove this run's offload folder once it is empty."""
        if self.offload is not None and self.offload.is_dir() and not any(self.offload.iterdir()):
            self.offload.rmdir()


def read_tagged(f: Path, run_id: str) -> dict[str, Tensor]:
    """A hidden-state file of this run (its metadata names the run), else CheckpointError."""
    try:
        with safe_open(str(f), "pt") as h:
            tag = (h.metadata() or {}).get("run")
    except Exception as e:      # truncated or not safetensors
        raise CheckpointError(f"hidden-state file {str(f)!r} cannot be read ({str(e)[:120]}); rerun with restart=True "
                              f"(CLI: --restart)") from None
    if tag != run_id:
        raise CheckpointError(f"hidden-state file {str(f)!r} belongs to another run ({tag!r}, this is {run_id!r}); "
                              f"rerun with restart=True (CLI: --restart)")
    return load_file(str(f))


def work_dir(out_dir: str | os.PathLike) -> Path:
    """Where `compress_streaming` keeps finished layers and resume state for `out_dir`."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.a3mod-work"


def run_key(src: Path, passes, calib: Tensor, dtype, batch_size: int, world: int, sequential: bool = False) -> dict:
    c = calib.contiguous()
    return {"source": fingerprint(src), "passes": [pass_to_dict(p) for p in passes],
            "calib": {"shape": list(c.shape), "sha256": hashlib.sha256(c.cpu().numpy().tobytes()).hexdigest()},
            "dtype": str(dtype), "batch_size": batch_size, "world_size": world,
            **({"sequential": True} if sequential else {})}


WORK_FILES = re.compile(r"^(run\.json|layer_\d{4}\.(safetensors|json|tmp|jtmp)"
                         r"|hidden(c)?_r\d+_in\d{4}\.(safetensors|tmp))$")


def remove_work(work: Path) -> None:
    """Delete a work dir, but only if everything in it is a file streaming writes (never a user's folder)."""
    if not work.exists():
        return
    alien = [e.name for e in work.iterdir() if not (e.is_file() and WORK_FILES.match(e.name))]
    if alien or work.is_symlink():
        raise CheckpointError(f"{str(work)!r} holds files a3mod streaming does not write ({alien[:3]}); it is not "
                              f"removed. Move them away (or the folder) and rerun")
    shutil.rmtree(work)


def open_work(work: Path, key: dict, restart: bool) -> None:
    """Rank 0: create the work dir, or check that the one there belongs to this run."""
    run = work / "run.json"
    if restart:
        remove_work(work)
    if run.exists():
        try:
            old = json.loads(run.read_text())
        except ValueError:
            old = {}
        diff = [k for k in key if old.get(k) != key[k]]
        if diff:
            raise CheckpointError(
                f"work dir {str(work)!r} holds an interrupted run with different {', '.join(diff)} "
                f"(was {[old.get(k) for k in diff]}, now {[key[k] for k in diff]}); rerun with the same "
                f"arguments to resume, or pass restart=True (CLI: --restart) to start over")
        return
    remove_work(work)
    work.mkdir(parents=True)
    files.atomic_write(work / "run.json", json.dumps(key, indent=1, sort_keys=True))


def layer_file(work: Path, i: int, ext: str) -> Path:
    return work / f"layer_{i:04d}.{ext}"


def resume_point(work: Path, n_layers: int, world: int, offload: Path | None, run_id: str,
                 tags: tuple[str, ...] = ("",)) -> int:
    """First layer to compute: after the longest prefix of finished layers whose inputs (of every stream in `tags`)
    every rank still has."""
    done = 0
    while done < n_layers and layer_file(work, done, "json").exists():
        done += 1
    if done == n_layers:
        return done
    for k in range(done, 0, -1):
        if all(Store(work, offload, r, run_id, t).has(k) for r in range(world) for t in tags):
            return k
    return 0


def write_layer(work: Path, i: int, layer: nn.Module, prefix: str, meta: dict) -> None:
    """The compressed layer's tensors, then its sidecar entry (the marker that layer i is finished)."""
    tensors = {f"{prefix}{k}": t.detach().cpu().contiguous() for k, t in layer.state_dict().items()}
    tmp = layer_file(work, i, "tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, layer_file(work, i, "safetensors"))
    layer_file(work, i, "jtmp").write_text(json.dumps(meta))
    os.replace(layer_file(work, i, "jtmp"), layer_file(work, i, "json"))
