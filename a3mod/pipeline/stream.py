"""Layer-by-layer (streaming) A3 compression of a safetensors or GGUF checkpoint: one decoder layer in memory at a time.

    a3mod.compress_streaming("hf-folder/", "out/", a3mod.a3_passes(0.2), calib)   # -> a normal a3mod checkpoint
    a3mod.compress_streaming("model.gguf", "out/", a3mod.a3_passes(0.2), calib)   # dequantized tensor by tensor

1. The model is a skeleton on the meta device; the source tensors are read from the safetensors shards by
   name (`safe_open`, only the tensors asked for), or from the GGUF file one tensor at a time, dequantized
   (`a3mod.io.gguf_source`: the values `from_pretrained(..., gguf_file=...)` gives).
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
from dataclasses import dataclass, field
from typing import Any
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig

from ..arch import get_path, layer_views, set_child, shared_groups, spec_for
from ..arch.capture import layer_calls, through_layer, with_hidden
from ..calib import distributed
from ..calib.stats import WHOLE_MODEL_KINDS, check_request, check_token_ids
from ..errors import A3ModError, CalibrationError, UnsupportedModelError
from ..io import files, native, tensors
from ..io.sealed import WEIGHTS, write_sidecar
from ..io.codecs import describe_layer
from ..io.description import WEIGHTS_FORMAT, describe_model, materialize_buffers
from ..io.gguf_source import GGUFSource, check_gguf, gguf_config, gguf_file, meta_causal_lm
from ..io.guards import NO_CODE, as_dtype, check_folder, recorded_dtype
from ..passes import pass_to_dict
from ..passes.a3 import preflight
from ..passes.balance import balance
from ..passes.base import check_passes
from ..report import linear_param_count
from ..validate import boolean, integer
from .steps import collect_layer, solve_layer
from .verify import check_layer, view_key
from . import seq_refit, workdir
from .job import Job
from .workdir import work_dir  # noqa: F401  (a3mod.pipeline.stream.work_dir: where a run resumes from)


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
def _layer_entry(config, spec, layer: nn.Module) -> dict | None:
    """The sidecar entry `a3mod.save` writes for this (compressed) layer."""
    return describe_layer(layer, spec) or None


@torch.no_grad()
def compress_streaming(src_dir: str | os.PathLike, out_dir: str | os.PathLike, passes, calib: Tensor, *,
                       batch_size: int = 1, offload_dir: str | os.PathLike | None = None,
                       dtype: torch.dtype = torch.float32, device: str = "cpu", tokenizer=None,
                       overwrite: bool = False, restart: bool = False, progress: bool = True,
                       save_dtype: torch.dtype | str | None = "auto", extra_names: tuple[str, ...] = (),
                       sequential: bool = False) -> Path:
    """Compress the HF safetensors checkpoint in `src_dir` (or a GGUF file, or a folder holding one) with A3 passes,
    one decoder layer in memory at a time, and write an a3mod checkpoint to `out_dir` (what `a3mod.apply` +
    `a3mod.save` would give; `a3mod.load` opens it).

    passes: A3QK / A3OV / A3MLP configs (each once). calib: (n, T) token ids (every rank passes all of them).
    batch_size: windows per forward. offload_dir: keep the calibration hidden states in files there (one per
    batch) instead of memory. dtype/device: compute dtype and device (the hidden states stay on the CPU).
    tokenizer: saved with the checkpoint. restart: discard an interrupted run's work dir instead of resuming.
    save_dtype: of the stored floating-point weights, as in `a3mod.save` ("auto": the dtype src's config.json
    records, else the compute dtype; from a GGUF: the compute dtype). extra_names: files the caller writes into
    out_dir afterwards (e.g. compress_result.json): recorded as a3mod's, so a later overwrite replaces them.
    sequential: each layer's statistics come from the inputs the compressed model gives it (the outputs of the
    layers compressed before it), so its reductions and least-squares updates fit what it will see; the output then
    differs from `a3mod.apply`'s (which calibrates the original model once). Single process only.
    """

    passes = _checked(passes, sequential)
    files.check_extra_names(extra_names, reserved=(WEIGHTS, "config.json", "generation_config.json"))
    check_request(calib, ("a3",))
    batch_size = integer("compress_streaming", "batch_size", batch_size, error=CalibrationError)
    if seq_refit.HELDOUT in seq_refit.dampings(passes).values() and -(-calib.shape[0] // batch_size) < 2:
        raise CalibrationError(f"refit_damping='heldout' holds batches of windows out: calib has {calib.shape[0]} "
                               f"window(s) in batches of {batch_size} (at least 2 batches needed)")
    src, gguf = Path(src_dir), gguf_file(src_dir)
    if gguf is None and (not (src / "config.json").is_file() or not any(src.glob("*.safetensors"))):
        raise A3ModError(f"{str(src)!r} is neither an HF folder with config.json and *.safetensors nor a .gguf file "
                         f"(or a folder holding one); streaming reads those (convert other formats once: "
                         f"a3mod.load_pretrained(path) then save_pretrained)")
    if src.is_dir():
        check_folder(src)
    header = check_gguf(gguf) if gguf is not None else None
    out = files.check_output_dir(out_dir, overwrite, [src])
    config = gguf_config(gguf) if gguf is not None else AutoConfig.from_pretrained(src, **NO_CODE)
    check_token_ids(calib, config.vocab_size)
    skel = meta_causal_lm(config, gguf or src, dtype)
    skel.eval()
    auto = None if gguf is not None else recorded_dtype(src)          # a GGUF stores the compute dtype, as `save`
    skel.a3mod_source_dtype = auto if save_dtype == "auto" else as_dtype(save_dtype)
    views = layer_views(skel)
    _refuse_shared(skel, views)
    passes = balance(passes, views)          # QK kept whole under q/k norms: the others give its share
    preflight(passes, views)
    run = StreamRun(model=skel, views=views, passes=passes, calib=calib, progress=progress, src=gguf or src, out=out,
                    batch_size=batch_size, offload_dir=offload_dir, dtype=dtype, device=device, tokenizer=tokenizer,
                    overwrite=overwrite, restart=restart, extra_names=tuple(extra_names), sequential=sequential,
                    gguf_header=header)
    rank = distributed.rank_world()[0]
    with files.output_lock(out) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            files.recover(out)
            files.check_output_dir(out, overwrite, [src])
        _stream(run)
    return out


@dataclass(kw_only=True)
class StreamRun(Job):
    """One streaming run (`job.Job`: model = the meta-device skeleton): its arguments, then what `_open` derives
    (layers, source, work dir, batches, ...)."""
    src: Path                                         # the safetensors folder, or the GGUF file
    out: Path
    batch_size: int
    offload_dir: str | os.PathLike | None
    dtype: torch.dtype
    device: str
    tokenizer: Any
    overwrite: bool
    restart: bool
    extra_names: tuple = ()
    sequential: bool = False
    gguf_header: Any = None                           # the GGUF source's, read once
    spec: Any = None
    layers: Any = None
    source: Any = None
    work: Path | None = None
    store: Any = None
    comp: Any = None                                  # the compressed model's stream (seq_refit), else None
    batches: list = field(default_factory=list)
    calls: dict = field(default_factory=dict)         # batch shape -> every layer's (args, kwargs)
    n_local: int = 0
    verified: set = field(default_factory=set)        # structure keys whose full-rank rewrite was checked
    nonlayer: list = field(default_factory=list)      # (key, tensor) outside the decoder layers, written as is
    aliases: dict = field(default_factory=dict)
    layers_at: int = 0


def _checked(passes, sequential: bool) -> list:
    """The passes checked for streaming, and the options they run with."""
    passes = check_passes(passes, schedule="stream")
    boolean("compress_streaming", "sequential", sequential)
    if sequential and seq_refit.dampings(passes):
        raise A3ModError("compress_streaming: sequential=True (statistics from the compressed stream) and seq_refit="
                         "True (A3OV / A3MLP: re-fit toward the original layer on the compressed stream) read the "
                         "original layer differently; choose one")
    if any(WHOLE_MODEL_KINDS & set(p.stat_kinds()) for p in passes):
        raise A3ModError("compress_streaming: A3MLP(select='taylor') reads the loss gradient of a backward pass "
                         "through the whole model, which streaming never holds (one layer at a time): use "
                         "a3mod.apply, or select='cur' / 'obs'")
    if (sequential or seq_refit.dampings(passes)) and distributed.rank_world()[1] > 1:
        raise A3ModError("compress_streaming with sequential=True or seq_refit=True runs in one process (each layer "
                         "needs the compressed outputs of the one before it)")
    return passes


def _refuse_shared(skel: nn.Module, views) -> None:
    """UnsupportedModelError for a model whose layers share blocks (Zamba2): each is solved from all its uses."""
    if shared_groups(views):
        raise UnsupportedModelError(
            f"{type(skel).__name__}: layers {shared_groups(views)} run one shared block each, which is solved from "
            f"the statistics of all its uses; streaming holds one layer at a time: compress it in memory "
            f"(a3mod.apply, or `a3mod compress` without --stream)")


def _open(run: StreamRun) -> int:
    """Fill in `run` (every rank), open or resume the work dir (rank 0); returns the first layer to compute."""
    rank, world = distributed.rank_world()
    run.spec = spec_for(run.model)
    run.layers = get_path(run.model, run.spec.layers)
    run.nonlayer, run.aliases, run.layers_at = _nonlayer_keys(run.model, run.spec.layers)
    run.source = (GGUFSource(run.src, run.model, run.spec.layers, run.gguf_header) if run.src.is_file()
                  else workdir.Source(run.src, run.model.base_model_prefix))
    run.work = workdir.work_dir(run.out)
    offload = Path(run.offload_dir) if run.offload_dir is not None else None
    run_id = None
    if rank == 0:
        key = workdir.run_key(run.src, run.passes, run.calib, run.dtype, run.batch_size, world, run.sequential)
        workdir.open_work(run.work, key, run.restart)
        run_id = hashlib.sha256(json.dumps([key, str(run.out)], sort_keys=True).encode()).hexdigest()[:16]
    run_id = distributed.broadcast_object(run_id)
    distributed.barrier()
    tags = ("", "c") if seq_refit.dampings(run.passes) else ("",)
    start = distributed.broadcast_object(workdir.resume_point(run.work, len(run.layers), world, offload, run_id,
                                                              tags) if rank == 0 else None)
    shard = distributed.shard(run.calib)
    run.batches = [shard[b:b + run.batch_size] for b in range(0, shard.shape[0], run.batch_size)]
    run.n_local = int(shard.numel())
    run.store = workdir.Store(run.work, offload, rank, run_id)
    run.comp = workdir.Store(run.work, offload, rank, run_id, "c") if len(tags) > 1 else None
    for j in range(0 if start == 0 else start + 1, len(run.layers) + 1):
        for st in _stores(run):
            st.drop(j)         # hidden states a crashed or restarted run left beyond the resume point
    return start


def _stores(run: StreamRun) -> list:
    return [run.store] + ([run.comp] if run.comp is not None else [])


def _stream(run: StreamRun) -> None:
    start = _open(run)
    rank = distributed.rank_world()[0]
    if start < len(run.layers):
        run.calls = _prepare(run, start)
    for i in tqdm(range(start, len(run.layers)), desc="streaming", disable=not run.progress or rank != 0,
                  unit="layer"):
        _one_layer(run, i)
    distributed.barrier()
    if rank == 0:
        _assemble(run)
        workdir.remove_work(run.work)
    for st in _stores(run):
        for j in range(len(run.layers)):
            st.drop(j)
        st.close()
    distributed.barrier()


def _prepare(run: StreamRun, start: int) -> dict:
    """Load the non-layer weights the forward needs, capture each layer's arguments per batch shape (and, when
    starting at layer 0, layer 0's inputs for every batch), free them; restore the hidden states otherwise."""
    skel = run.model
    head = {id(p) for p in skel.get_output_embeddings().parameters()} if skel.get_output_embeddings() else set()
    tied = {id(p) for p in skel.get_input_embeddings().parameters()}
    keys = [k for k, t in run.nonlayer if id(t) not in head or id(t) in tied]
    skel.load_state_dict(run.source.read(keys, run.dtype, run.device), strict=False, assign=True)
    materialize_buffers(skel, run.device)
    calls: dict[tuple, list] = {}
    for b, ids in enumerate(run.batches):
        if start > 0 and tuple(ids.shape) in calls:
            continue
        seen = layer_calls(skel, run.layers, ids.to(run.device))
        if start == 0:
            args, kw = seen[0]
            for st in _stores(run):
                st.put(0, b, (args[0] if args else kw["hidden_states"]).to("cpu"))
        calls.setdefault(tuple(ids.shape), [with_hidden(c, None) for c in seen])
    if start > 0:
        for st in _stores(run):
            st.restore(start)
    skel.to("meta")         # free them again (the output reads non-layer tensors from the source)
    return calls


def _load_layer(run: StreamRun, i: int) -> nn.Module:
    """Layer i of the skeleton with its original tensors from the source."""
    layer, prefix = run.layers[i], f"{run.spec.layers}.{i}."
    sd = run.source.read([prefix + k for k in layer.state_dict()], run.dtype, run.device)
    layer.load_state_dict({k[len(prefix):]: t for k, t in sd.items()}, strict=True, assign=True)
    if any(t.is_meta for t in [*layer.parameters(), *layer.buffers()]):
        raise UnsupportedModelError(f"layer {i} has tensors that are neither in the checkpoint nor rebuildable "
                                    f"(non-persistent buffers); streaming does not support this model type yet")
    return layer


def _one_layer(run: StreamRun, i: int) -> None:
    """Statistics of original layer i over every batch (outputs kept as layer i+1's inputs), all-reduced;
    on the layer's owner rank solve, build and write the compressed layer. Layer i is freed afterwards. The first
    layer of each structure is verified first (its full-rank rewrite on the first batch == the original).
    Sequential runs keep the compressed layer's outputs as the next inputs instead (one more pass per layer);
    with seq_refit, the compressed model's stream is carried beside (`_refit`)."""
    layer, prefix, store = _load_layer(run, i), f"{run.spec.layers}.{i}.", run.store
    views = layer_views(run.model)
    view = views[i]
    key = view_key(view)
    if key not in run.verified and not view.left:
        first = with_hidden(run.calls[tuple(run.batches[0].shape)][i], store.get(i, 0).to(run.device))
        check_layer(run.model, view, *first)
        run.verified.add(key)
    orig = linear_param_count(layer)
    ahead = i + 1 < len(run.layers)
    keep = ahead and not (run.sequential and not view.left)
    qk = "qk" in seq_refit.dampings(run.passes)
    targets = (seq_refit.Targets(view, _Stream(store, i), _Stream(run.comp, i), qk)
               if run.comp is not None and not view.left else None)
    out0 = []                                         # window 0's output: the seq_refit layout check

    def put(b, h):
        if b == 0:
            out0.append(h)
        if keep:
            store.put(i + 1, b, h)
    with targets.hooked() if targets else contextlib.nullcontext():
        acc = collect_layer(layer, view, run.calls, [tuple(ids.shape) for ids in run.batches],
                            lambda b: store.get(i, b), put, run.kinds, run.device)
    if targets:
        targets.check_outputs(out0)
    n = distributed.all_reduce_stats([acc], run.n_local)
    meta = {"entry": None, "orig_layer_params": orig, "calib_tokens": n}
    if distributed.rank_world()[0] == distributed.owner(i) and view.left:     # a hybrid's mixer layer: as it is
        _refit(run, i, layer, view, None, ahead)
        workdir.write_layer(run.work, i, layer, prefix, meta)
    elif distributed.rank_world()[0] == distributed.owner(i):
        swaps = solve_layer(run.model, views, view, run.passes, acc, n)
        old = [(path, get_path(layer, path)) for path, _ in swaps]
        for path, new in swaps:
            set_child(layer, path, new)
        _refit(run, i, layer, view, targets, ahead)
        workdir.write_layer(run.work, i, layer, prefix, {**meta, "entry": _layer_entry(run.model.config, run.spec,
                                                                                        layer)})
        if run.sequential and ahead:
            _forward(run, i, layer, keep=True)      # the next layer sees what the compressed model computes
        for path, mod in old:
            set_child(layer, path, mod)
    if ahead:
        for st in _stores(run):
            st.commit(i + 1)
    run.layers[i] = layer.to("meta")


class _Stream:
    """One stream's hidden states entering layer j as a sequence over batches (`store.get(j, b)`)."""

    def __init__(self, store, j: int):
        self.store, self.j = store, j

    def __getitem__(self, b: int) -> Tensor:
        return self.store.get(self.j, b)


def _refit(run: StreamRun, i: int, layer: nn.Module, view, targets, ahead: bool) -> None:
    """With seq_refit: re-fit compressed layer i's o_proj / down_proj toward `targets` on the compressed stream
    (`seq_refit.refit_layer`; none for a layer left as it is) and put its outputs as layer i+1's inputs."""
    if run.comp is None:
        return
    damping = {} if targets is None else seq_refit.dampings(run.passes)
    put = (lambda b, h: run.comp.put(i + 1, b, h)) if ahead else (lambda b, h: None)
    seq_refit.refit_layer(layer, view, run.calls, [tuple(ids.shape) for ids in run.batches], _Stream(run.comp, i),
                          targets, damping, put=put)


def _forward(run: StreamRun, i: int, layer: nn.Module, keep: bool) -> None:
    """Run every calibration batch through `layer` (layer i) from its stored inputs; keep: store the outputs as
    layer i+1's inputs."""
    through_layer(layer, i, run.calls, [tuple(ids.shape) for ids in run.batches], lambda b: run.store.get(i, b),
                  (lambda b, h: run.store.put(i + 1, b, h)) if keep else None, run.device)


def _source_entry(run: StreamRun, key: str, t: Tensor, store: torch.dtype | None) -> tuple:
    """The write-plan entry of non-layer tensor `key`, read from the source when written: in the stored dtype when
    the source holds it so (no compute-dtype copy to cast back: the embedding and lm_head are the largest
    tensors), else in the compute dtype (cast by the plan)."""
    if store is not None and run.source.stored_dtype(key) == store:
        return key, store, tuple(t.shape), lambda: run.source.read([key], store)[key]
    return key, t.dtype, tuple(t.shape), lambda: run.source.read([key], run.dtype)[key]


def _assemble(run: StreamRun) -> None:
    """Write the a3mod checkpoint (the format of `a3mod.save`) from the work dir, atomically."""
    skel, src, work = run.model, run.src, run.work
    metas = [json.loads(workdir.layer_file(work, i, "json").read_text()) for i in range(len(run.layers))]
    store = skel.a3mod_source_dtype
    plan = [_source_entry(run, k, t, store) for k, t in run.nonlayer]
    plan[run.layers_at:run.layers_at] = [e for i in range(len(run.layers))
                                         for e in tensors.file_plan(workdir.layer_file(work, i, "safetensors"))]
    skel.a3mod_info = {"passes": [pass_to_dict(p) for p in run.passes], "calib_tokens": None,
                       "orig_layer_params": [m["orig_layer_params"] for m in metas], "sequential": run.sequential}
    side = describe_model(skel)
    side["calib_tokens"] = metas[0]["calib_tokens"]
    side["layers"] = {str(i): m["entry"] for i, m in enumerate(metas) if m["entry"]}
    config = native.config_for(skel.config, side)
    config.dtype = store or next((dt for _, dt, _, _ in plan if dt.is_floating_point), None)   # what is stored
    gen = (GenerationConfig.from_pretrained(src, **NO_CODE) if (src / "generation_config.json").exists()
           else GenerationConfig.from_model_config(skel.config))
    with files.staged_output(run.out, run.overwrite, [src]) as tmp:
        config.save_pretrained(tmp)                                     # model_type "a3mod" (a3mod.io.native)
        gen.save_pretrained(tmp)
        tensors.write(tmp / WEIGHTS, tensors.cast_plan(plan, store), {"format": "pt", "a3mod": str(WEIGHTS_FORMAT)})
        if run.tokenizer is not None:
            run.tokenizer.save_pretrained(tmp)
        write_sidecar(tmp, {**side, "aliases": run.aliases,
                            **({"extra": sorted(run.extra_names)} if run.extra_names else {})})
