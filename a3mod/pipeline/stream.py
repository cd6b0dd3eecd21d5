"""Layer-by-layer (streaming) A3 compression of a safetensors checkpoint: one decoder layer in memory at a time.

    a3mod.compress_streaming("hf-folder/", "out/", a3mod.a3_passes(0.2), calib)   # -> a normal a3mod checkpoint

1. The model is a skeleton on the meta device; the source tensors are read from the safetensors shards by
   name (`safe_open`, only the tensors asked for).
2. Capture: the weights the forward needs before the first layer (embeddings; not lm_head) are loaded and each
   batch of calibration windows runs through the model with every decoder layer's `forward` replaced by a
   recorder: layer 0's hidden states for every batch, and every layer's other arguments (position embeddings,
   masks; per layer, since some families give layers different masks) once per batch shape. They are freed.
3. Per layer: load its original tensors, run every batch through it with `calib.recording`'s statistic hooks
   attached, keep the outputs as the next layer's inputs. Every layer thus sees the activations of the
   *original* model, exactly like `a3mod.collect`, so the statistics (and the compressed model) are the same
   as the in-memory path's. Solve and build the compact modules (`passes.a3.build_layer`), write the layer's
   tensors and sidecar entry to the work dir, free it.
4. Assemble: one model.safetensors streamed tensor by tensor (non-layer tensors from the source, layers from
   the work dir), config, generation config, a3mod.json (the format of `a3mod.save`); a temporary directory is
   renamed to `out_dir`, then the work dir is removed.

Resume: the work dir `<out_dir's parent>/.<out_dir name>.a3mod-work` keeps every finished layer and the hidden
states at the last layer boundaries; re-running with the same arguments continues after the last finished
layer. Different arguments are refused (CheckpointError naming them) unless `restart=True`.
Distributed (see `a3mod.calib.distributed`): every rank passes the full calib and the same arguments, runs its slice
of the windows, the statistics are all-reduced per layer, layer i is solved and written by rank i % world_size,
rank 0 assembles; the work dir, out_dir and offload_dir must be on a filesystem every rank sees.
"""
from __future__ import annotations

import contextlib
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
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from ..arch import get_path, layer_views, set_child, spec_for
from ..arch.capture import layer_inputs
from ..calib import distributed
from ..calib.stats import Stats, check_request, check_token_ids, recording
from ..errors import A3ModError, CheckpointError, UnsupportedModelError
from ..io import files, native, tensors
from ..io.checkpoint import WEIGHTS, write_sidecar
from ..io.codecs import describe_layer
from ..io.description import FORMAT, describe_model, materialize_buffers
from ..io.fingerprint import file_digest
from ..io.guards import NO_CODE, as_dtype, check_folder, recorded_dtype
from ..passes import PASSES, pass_to_dict
from ..passes.a3 import build_layer, preflight
from ..passes.base import pass_def
from ..report import linear_param_count
from .verify import check_layer, structure_key


# ------------------------------------------------------------------------------------------- source
class _Source:
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


def _fingerprint(src: Path) -> dict:
    """The source folder as a resume must find it again: path, config bytes and each weight file's sampled digest
    (a3mod.io.fingerprint.file_digest: size, header and 64 blocks of data)."""
    return {"src": str(src.resolve()), "files": {f.name: file_digest(f) for f in sorted(src.glob("*.safetensors"))},
            "config_sha256": hashlib.sha256((src / "config.json").read_bytes()).hexdigest()}


# ------------------------------------------------------------------------------------ hidden states
class _Store:
    """Hidden states between layers, per batch b: `get(j, b)` = inputs of layer j. In memory (a resume
    checkpoint is one file per layer boundary in the work dir), or with `offload` one safetensors file per
    batch under offload_dir/r<rank>_in<j>/ (those files are then the checkpoint)."""

    def __init__(self, work: Path, offload: Path | None, rank: int, run_id: str = ""):
        self.work, self.rank, self.mem, self.run_id = work, rank, {}, run_id
        self.offload = offload / f"a3mod-run-{run_id}" if offload is not None else None   # one folder per run

    def _dir(self, j: int) -> Path:
        return self.offload / f"r{self.rank}_in{j:04d}"

    def _file(self, j: int) -> Path:
        return self.work / f"hidden_r{self.rank}_in{j:04d}.safetensors"

    def get(self, j: int, b: int) -> Tensor:
        if self.offload is None:
            return self.mem[b]
        return _read_tagged(self._dir(j) / f"b{b:05d}.safetensors", self.run_id)["h"]

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
            self.mem = {int(k[1:]): t for k, t in _read_tagged(self._file(j), self.run_id).items()}

    def close(self) -> None:
        """Remove this run's offload folder once it is empty."""
        if self.offload is not None and self.offload.is_dir() and not any(self.offload.iterdir()):
            self.offload.rmdir()


def _read_tagged(f: Path, run_id: str) -> dict[str, Tensor]:
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


# ------------------------------------------------------------------------------------------ capture
def _capture(model: nn.Module, layers: nn.ModuleList, ids: Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) every decoder layer receives when `ids` runs through the model (no layer is run: each passes
    its hidden states on unchanged; the run stops after the last one)."""
    calls = layer_inputs(getattr(model, "base_model", model), layers, ids, run_layers=False)
    return [calls[i] for i in range(len(layers))]


def _with_hidden(call: tuple[tuple, dict], h: Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


# -------------------------------------------------------------------------------------------- output
def _nonlayer_keys(skel: nn.Module, layers_path: str) -> tuple[list[tuple[str, Tensor]], dict[str, str], int]:
    """Non-layer tensors of the (meta) skeleton in state-dict order, each once; tied aliases (like `dedup_tensors`); how
    many of them precede the decoder layers in the state dict."""
    seen, keep, aliases, at = {}, [], {}, None
    for k, t in skel.state_dict(keep_vars=True).items():
        if k.startswith(layers_path + "."):
            at = len(keep) if at is None else at
            continue
        if id(t) in seen:
            aliases[k] = seen[id(t)]
        else:
            seen[id(t)] = k
            keep.append((k, t))
    return keep, aliases, len(keep) if at is None else at


# --------------------------------------------------------------------------------------------- main
def _check_passes(passes) -> list:
    """Layer-scope passes only (each once): they solve one layer from its own statistics."""
    if passes is None or isinstance(passes, (str, bytes, dict)) or not hasattr(passes, "__iter__"):
        raise A3ModError(f"passes={passes!r} must be a list of pass configs, e.g. a3mod.a3_passes(0.2)")
    passes = list(passes)
    if not passes:
        raise A3ModError("passes is empty; give e.g. a3mod.a3_passes(0.2)")
    names = [type(p).__name__ for p in passes]
    bad = [n for p, n in zip(passes, names) if pass_def(p).scope != "layer"]
    if bad:
        layer = sorted(t.__name__ for t, d in PASSES.items() if d.scope == "layer")
        raise A3ModError(f"compress_streaming runs layer-scope passes ({', '.join(layer)}); {bad} need the whole "
                         f"model (baselines ASVD/SVDLLM/PlainSVD, Allocate, A3KV) or are quantization: use "
                         f"a3mod.apply on a loaded model")
    if len(set(names)) != len(names):
        raise A3ModError(f"each pass may appear once, got {names}")
    return passes


def work_dir(out_dir: str | os.PathLike) -> Path:
    """Where `compress_streaming` keeps finished layers and resume state for `out_dir`."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.a3mod-work"


def _run_key(src: Path, passes, calib: Tensor, dtype, batch_size: int, world: int) -> dict:
    c = calib.contiguous()
    return {"source": _fingerprint(src), "passes": [pass_to_dict(p) for p in passes],
            "calib": {"shape": list(c.shape), "sha256": hashlib.sha256(c.cpu().numpy().tobytes()).hexdigest()},
            "dtype": str(dtype), "batch_size": batch_size, "world_size": world}


_WORK_FILES = re.compile(r"^(run\.json|layer_\d{4}\.(safetensors|json|tmp|jtmp)"
                         r"|hidden_r\d+_in\d{4}\.(safetensors|tmp))$")


def _remove_work(work: Path) -> None:
    """Delete a work dir, but only if everything in it is a file streaming writes (never a user's folder)."""
    if not work.exists():
        return
    alien = [e.name for e in work.iterdir() if not (e.is_file() and _WORK_FILES.match(e.name))]
    if alien or work.is_symlink():
        raise CheckpointError(f"{str(work)!r} holds files a3mod streaming does not write ({alien[:3]}); it is not "
                              f"removed. Move them away (or the folder) and rerun")
    shutil.rmtree(work)


def _open_work(work: Path, key: dict, restart: bool) -> None:
    """Rank 0: create the work dir, or check that the one there belongs to this run."""
    run = work / "run.json"
    if restart:
        _remove_work(work)
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
    _remove_work(work)
    work.mkdir(parents=True)
    files.atomic_write(work / "run.json", json.dumps(key, indent=1, sort_keys=True))


def _layer_file(work: Path, i: int, ext: str) -> Path:
    return work / f"layer_{i:04d}.{ext}"


def _resume_point(work: Path, n_layers: int, world: int, offload: Path | None, run_id: str) -> int:
    """First layer to compute: after the longest prefix of finished layers whose inputs every rank still has."""
    done = 0
    while done < n_layers and _layer_file(work, done, "json").exists():
        done += 1
    if done == n_layers:
        return done
    for k in range(done, 0, -1):
        if all(_Store(work, offload, r, run_id).has(k) for r in range(world)):
            return k
    return 0


def _write_layer(work: Path, i: int, layer: nn.Module, prefix: str, meta: dict) -> None:
    """The compressed layer's tensors, then its sidecar entry (the marker that layer i is finished)."""
    tensors = {f"{prefix}{k}": t.detach().cpu().contiguous() for k, t in layer.state_dict().items()}
    tmp = _layer_file(work, i, "tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, _layer_file(work, i, "safetensors"))
    _layer_file(work, i, "jtmp").write_text(json.dumps(meta))
    os.replace(_layer_file(work, i, "jtmp"), _layer_file(work, i, "json"))


def _layer_entry(config, spec, layer: nn.Module) -> dict | None:
    """The sidecar entry `a3mod.save` writes for this (compressed) layer."""
    return describe_layer(layer, spec) or None


@torch.no_grad()
def compress_streaming(src_dir: str | os.PathLike, out_dir: str | os.PathLike, passes, calib: Tensor, *,
                       batch_size: int = 1, offload_dir: str | os.PathLike | None = None,
                       dtype: torch.dtype = torch.float32, device: str = "cpu", tokenizer=None,
                       overwrite: bool = False, restart: bool = False, progress: bool = True,
                       save_dtype: torch.dtype | str | None = "auto") -> Path:
    """Compress the HF safetensors checkpoint in `src_dir` with A3 passes, one decoder layer in memory at a time,
    and write an a3mod checkpoint to `out_dir` (what `a3mod.apply` + `a3mod.save` would give; `a3mod.load` opens it).

    passes: A3QK / A3OV / A3MLP configs (each once). calib: (n, T) token ids (every rank passes all of them).
    batch_size: windows per forward. offload_dir: keep the calibration hidden states in files there (one per
    batch) instead of memory. dtype/device: compute dtype and device (the hidden states stay on the CPU).
    tokenizer: saved with the checkpoint. restart: discard an interrupted run's work dir instead of resuming.
    save_dtype: of the stored floating-point weights, as in `a3mod.save` ("auto": the dtype src's config.json
    records, else the compute dtype).
    """

    passes = _check_passes(passes)
    check_request(calib, ("a3",))
    src = Path(src_dir)
    if not (src / "config.json").is_file() or not any(src.glob("*.safetensors")):
        raise A3ModError(f"{str(src)!r} is not an HF folder with config.json and *.safetensors; streaming reads "
                         f"those (convert other formats once: a3mod.load_pretrained(path) then save_pretrained)")
    check_folder(src)
    out = files.check_output_dir(out_dir, overwrite, [src])
    config = AutoConfig.from_pretrained(src, **NO_CODE)
    check_token_ids(calib, config.vocab_size)
    with torch.device("meta"):
        skel = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skel.eval()
    skel.a3mod_source_dtype = recorded_dtype(src) if save_dtype == "auto" else as_dtype(save_dtype)
    preflight(passes, layer_views(skel))
    rank = distributed.rank_world()[0]
    with files.output_lock(out) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            files.recover(out)
            files.check_output_dir(out, overwrite, [src])
        _stream(skel, src, out, passes, calib, batch_size, offload_dir, dtype, device, tokenizer, overwrite, restart,
                progress)
    return out


def _stream(skel, src, out, passes, calib, batch_size, offload_dir, dtype, device, tokenizer, overwrite, restart,
            progress) -> None:

    rank, world = distributed.rank_world()
    spec = spec_for(skel)
    layers = get_path(skel, spec.layers)
    nonlayer, aliases, layers_at = _nonlayer_keys(skel, spec.layers)
    source = _Source(src, skel.base_model_prefix)
    work, offload = work_dir(out), Path(offload_dir) if offload_dir is not None else None
    run_id = None
    if rank == 0:
        key = _run_key(src, passes, calib, dtype, batch_size, world)
        _open_work(work, key, restart)
        run_id = hashlib.sha256(json.dumps([key, str(out)], sort_keys=True).encode()).hexdigest()[:16]
    run_id = distributed.broadcast_object(run_id)
    distributed.barrier()
    start = distributed.broadcast_object(_resume_point(work, len(layers), world, offload, run_id) if rank == 0
                                         else None)
    shard = distributed.shard(calib)
    batches = [shard[b:b + batch_size] for b in range(0, shard.shape[0], batch_size)]
    store = _Store(work, offload, rank, run_id)
    for j in range(0 if start == 0 else start + 1, len(layers) + 1):
        store.drop(j)          # hidden states a crashed or restarted run left beyond the resume point
    calls = (_prepare(skel, layers, source, nonlayer, batches, store, start, dtype, device)
             if start < len(layers) else {})
    n_local = int(shard.numel())
    verified: set = set()        # structure keys whose full-rank rewrite was checked (a3mod.pipeline.verify)
    for i in tqdm(range(start, len(layers)), desc="streaming", disable=not progress or rank != 0, unit="layer"):
        _one_layer(skel, spec, layers, i, source, store, batches, calls, passes, n_local, work, dtype, device,
                   verified)
    distributed.barrier()
    if rank == 0:
        gen = (GenerationConfig.from_pretrained(src, **NO_CODE) if (src / "generation_config.json").exists()
               else GenerationConfig.from_model_config(skel.config))
        _assemble(skel, spec, source, nonlayer, aliases, layers_at, work, out, passes, gen, tokenizer, dtype,
                  overwrite, src)
        _remove_work(work)
    for j in range(len(layers)):
        store.drop(j)
    store.close()
    distributed.barrier()


def _prepare(skel, layers, source, nonlayer, batches, store, start, dtype, device) -> dict:
    """Load the non-layer weights the forward needs, capture each layer's arguments per batch shape (and, when
    starting at layer 0, layer 0's inputs for every batch), free them; restore the hidden states otherwise."""
    head = {id(p) for p in skel.get_output_embeddings().parameters()} if skel.get_output_embeddings() else set()
    tied = {id(p) for p in skel.get_input_embeddings().parameters()}
    keys = [k for k, t in nonlayer if id(t) not in head or id(t) in tied]
    skel.load_state_dict(source.read(keys, dtype, device), strict=False, assign=True)
    materialize_buffers(skel, device)
    calls: dict[tuple, list] = {}
    for b, ids in enumerate(batches):
        if start > 0 and tuple(ids.shape) in calls:
            continue
        seen = _capture(skel, layers, ids.to(device))
        if start == 0:
            args, kw = seen[0]
            store.put(0, b, (args[0] if args else kw["hidden_states"]).to("cpu"))
        calls.setdefault(tuple(ids.shape), [_with_hidden(c, None) for c in seen])
    if start > 0:
        store.restore(start)
    skel.to("meta")         # free them again (the output reads non-layer tensors from the source)
    return calls


def _one_layer(skel, spec, layers, i, source, store, batches, calls, passes, n_local, work, dtype, device,
               verified: set) -> None:
    """Statistics of original layer i over every batch (outputs kept as layer i+1's inputs), all-reduced;
    on the layer's owner rank solve, build and write the compressed layer. Layer i is freed afterwards. The first
    layer of each structure is verified first (its full-rank rewrite on the first batch == the original)."""
    layer = layers[i]
    prefix = f"{spec.layers}.{i}."
    sd = source.read([prefix + k for k in layer.state_dict()], dtype, device)
    layer.load_state_dict({k[len(prefix):]: t for k, t in sd.items()}, strict=True, assign=True)
    del sd
    if any(t.is_meta for t in [*layer.parameters(), *layer.buffers()]):
        raise UnsupportedModelError(f"layer {i} has tensors that are neither in the checkpoint nor rebuildable "
                                    f"(non-persistent buffers); streaming does not support this model type yet")
    view = layer_views(skel)[i]
    key = structure_key(layer)
    if key not in verified and not view.left:
        check_layer(skel, view, *_with_hidden(calls[tuple(batches[0].shape)][i], store.get(i, 0).to(device)))
        verified.add(key)
    orig = linear_param_count(layer)
    with recording([view]) as (acc,):
        for b, ids in enumerate(batches):
            args, kw = _with_hidden(calls[tuple(ids.shape)][i], store.get(i, b).to(device))
            h = layer(*args, **kw)
            if i + 1 < len(layers):
                store.put(i + 1, b, (h[0] if isinstance(h, tuple) else h).to("cpu"))
    n = distributed.all_reduce_stats([acc], n_local)
    if distributed.rank_world()[0] == distributed.owner(i) and view.left:     # a hybrid's mixer layer: as it is
        _write_layer(work, i, layer, prefix, {"entry": None, "orig_layer_params": orig, "calib_tokens": n})
    elif distributed.rank_world()[0] == distributed.owner(i):
        stats = Stats(n, [{} for _ in layers])
        stats.layers[i] = acc
        stats.check(min_tokens=view.dims.head_dim + 1)
        swaps = build_layer(skel, view, passes, stats)
        old = [(path, get_path(layer, path)) for path, _ in swaps]
        for path, new in swaps:
            set_child(layer, path, new)
        _write_layer(work, i, layer, prefix, {"entry": _layer_entry(skel.config, spec, layer),
                                              "orig_layer_params": orig, "calib_tokens": n})
        for path, mod in old:
            set_child(layer, path, mod)
    if i + 1 < len(layers):
        store.commit(i + 1)
    layers[i] = layer.to("meta")


def _assemble(skel, spec, source, nonlayer, aliases, layers_at, work, out, passes, gen, tokenizer, dtype,
              overwrite, src) -> None:
    """Write the a3mod checkpoint (the format of `a3mod.save`) from the work dir, atomically."""
    n_layers = len(get_path(skel, spec.layers))
    metas = [json.loads(_layer_file(work, i, "json").read_text()) for i in range(n_layers)]
    plan = [(k, t.dtype, tuple(t.shape), lambda k=k: source.read([k], dtype)[k]) for k, t in nonlayer]
    layer_plan = [e for i in range(n_layers) for e in tensors.file_plan(_layer_file(work, i, "safetensors"))]
    plan[layers_at:layers_at] = layer_plan
    skel.a3mod_info = {"passes": [pass_to_dict(p) for p in passes], "calib_tokens": None,
                       "orig_layer_params": [m["orig_layer_params"] for m in metas]}
    side = describe_model(skel)
    side["calib_tokens"] = metas[0]["calib_tokens"]
    side["layers"] = {str(i): m["entry"] for i, m in enumerate(metas) if m["entry"]}
    store = skel.a3mod_source_dtype
    config = native.config_for(skel.config, side)
    config.dtype = store or next((dt for _, dt, _, _ in plan if dt.is_floating_point), None)   # what is stored
    with files.staged_output(out, overwrite, [src]) as tmp:
        config.save_pretrained(tmp)                                     # model_type "a3mod" (a3mod.io.native)
        gen.save_pretrained(tmp)
        tensors.write(tmp / WEIGHTS, tensors.cast_plan(plan, store), {"format": "pt", "a3mod": str(FORMAT)})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_sidecar(tmp, {**side, "aliases": aliases})
