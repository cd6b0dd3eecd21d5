"""`a3mod prepare-eval-data`: on a connected machine, write the files the local task configs read.

For each task, lm-eval's own YAML names the HF dataset (path, config) and splits; every split present is
written as <out>/<task>/<split>.jsonl (one row per line, the dataset's own fields), written to a temporary
file and renamed. Copy <out> to the offline machine and point $A3MOD_EVAL_DATA at it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import A3ModError
from .tasks import DOWNSTREAM, lm_eval_task_yaml


def dataset_of(task: str) -> tuple[str, str | None]:
    """(dataset_path, dataset_name) that lm-eval's YAML for `task` reads (includes followed)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(lm_eval_task_yaml(task), resolve_func=False, recursive=True)
    return cfg["dataset_path"], cfg.get("dataset_name")


def prepare(out_dir: str | os.PathLike, tasks: list[str] | None = None, load_dataset=None) -> dict[str, list[str]]:
    """Download and write every split of `tasks` (default: all of DOWNSTREAM). Returns {task: [split files]}."""
    if load_dataset is None:
        from datasets import load_dataset
    tasks = list(DOWNSTREAM) if not tasks else tasks
    bad = [t for t in tasks if t not in DOWNSTREAM]
    if bad:
        raise A3ModError(f"unknown task(s) {bad}; prepare-eval-data knows {', '.join(DOWNSTREAM)}")
    written: dict[str, list[str]] = {}
    for task in tasks:
        path, name = dataset_of(task)
        ds = load_dataset(path, name)
        splits = DOWNSTREAM[task][1]
        d = Path(out_dir) / task
        d.mkdir(parents=True, exist_ok=True)
        written[task] = []
        for split in splits:
            if split not in ds:
                continue
            target = d / f"{split}.jsonl"
            tmp = target.with_suffix(".jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for row in ds[split]:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, target)
            written[task].append(str(target))
        print(f"{task}: {path} {name or ''} -> {', '.join(written[task]) or 'no splits'}")
    return written
