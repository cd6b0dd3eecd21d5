"""One compression run as one object, for both schedules of the same steps (check passes, plan, verify, collect,
solve, build, describe):

    Job        what every step reads: the model, its layer views, the passes, the calibration windows, progress
    ApplyJob   `a3mod.apply` (pipeline/compress.py, pipeline/layerwise.py): the whole model in memory, statistics
               given or collected, every swap logged in an undo log
    StreamRun  `compress_streaming` (pipeline/stream.py): one layer loaded from a folder or a GGUF at a time, the
               hidden states in a resumable work dir

Steps take the job instead of long lists of positional parameters; a schedule adds the fields it needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ..passes.base import needs


@dataclass(kw_only=True)
class Job:
    model: nn.Module                 # the model (streaming: its meta-device skeleton, one layer loaded at a time)
    passes: list
    calib: Tensor | None = None      # (n, T) token ids
    progress: bool = True
    views: list = field(default_factory=list)

    @property
    def kinds(self) -> set[str]:
        """The statistic kinds the passes read."""
        return {k for p in self.passes for k in needs(p)}


@dataclass(kw_only=True)
class ApplyJob(Job):
    stats: Any = None                # a3mod.Stats given by the caller (then nothing is collected)
    collected: Any = None            # a3mod.Stats apply already collected (Allocate's ranks, "taylor"): reused
    undo: Any = None                 # pipeline.undo.UndoLog: every swap, to put back on an error
    groups: list = field(default_factory=list)      # layers that run one shared block (Zamba2)
