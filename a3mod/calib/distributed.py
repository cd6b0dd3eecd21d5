"""Data-parallel calibration with torch.distributed: shard the windows, sum the statistics, split the solves.

Convention: **every rank passes the full calibration set** (the same (n, T) token ids, e.g. from
`calibration_data` with the same seed); a3mod gives rank r the contiguous slice `shard(calib)` of
`torch.tensor_split(calib, world_size)`. Each rank runs only its windows, then the float64 statistic sums
and the token count are all-reduced (SUM), so every rank holds the statistics of all windows. The A3 solves
are split: layer i is solved on rank i % world_size and its modules are broadcast (in-memory `apply`) or
written to the shared work dir (`compress_streaming`). Every rank ends with the same compressed model.
Backends: gloo (CPU tensors) or nccl (each rank's model on its own GPU). Outside an initialized process
group every function here is a no-op, so single-process code paths are unchanged.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from ..errors import CalibrationError


def active() -> bool:
    """True inside an initialized process group with more than one rank."""
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shard(calib: Tensor) -> Tensor:
    """This rank's windows of the full calibration set (contiguous slice; all of it in a single process)."""
    rank, world = rank_world()
    if world == 1:
        return calib
    if calib.shape[0] < world:
        raise CalibrationError(f"{calib.shape[0]} calibration windows cannot be split over {world} ranks; "
                               f"give at least one window per rank")
    return torch.tensor_split(calib, world)[rank]


def _comm_device(t: Tensor) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_stats(accs: list[dict[str, Tensor]], n: int) -> int:
    """Sum every rank's statistic sums in place (same keys on every rank) and return the total token count."""
    if not active():
        return n
    for acc in accs:
        for key in sorted(acc):
            t = acc[key]
            dev = _comm_device(t)
            buf = t.to(dev).contiguous()
            torch.distributed.all_reduce(buf)
            acc[key] = buf.to(t.device)
    count = torch.tensor([n], dtype=torch.int64, device=_comm_device(torch.empty(0)))
    torch.distributed.all_reduce(count)
    return int(count.item())


def owner(i: int) -> int:
    """The rank that solves layer i."""
    return i % rank_world()[1]


def solve(build, model, view, *args) -> list:
    """`build(model, view, *args)` -> [(path in layer, new module)]; in a process group it runs only on the
    layer's owner (`owner(view.index)`) and the modules are broadcast (sent on the CPU) to every rank."""
    if not active():
        return build(model, view, *args)
    src = owner(view.index)
    swaps = build(model, view, *args) if torch.distributed.get_rank() == src else None
    box = [[(p, m.cpu()) for p, m in swaps] if swaps is not None else None]
    torch.distributed.broadcast_object_list(box, src=src)
    device = view.anchor().device
    return [(p, m.to(device)) for p, m in box[0]]


def barrier() -> None:
    if active():
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (a no-op in one process)."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); gloo on CPU, nccl on
    CUDA. Returns True when this process is part of a multi-rank run."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not torch.distributed.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return active()
