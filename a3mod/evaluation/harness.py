"""lm-evaluation-harness integration: the `a3mod` model class, `evaluate`, and the `a3mod-lm-eval` command.

lm-eval 0.4 has no plugin discovery, so `a3mod-lm-eval` is lm-eval's own command line with the `a3mod` model
registered and the local task directory added to --include_path:

    a3mod-lm-eval --model a3mod --model_args pretrained=out/smollm2-a3-20 --tasks wikitext_local --device cpu

(`lm_eval --model a3mod ...` works in any Python process that has imported `a3mod.evaluation.harness`.) lm-eval's own
`--model hf` reads a compressed folder too once a3mod is imported (its native model type, a3mod.io.native), e.g.
`a3mod-lm-eval --model hf --model_args pretrained=DIR`. A user's --include_path (several joined by os.pathsep)
is read together with a3mod's local tasks.
"""
from __future__ import annotations

import os
import sys

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer

from ..errors import A3ModError
from ..io.guards import NO_CODE, as_dtype, check_folder
from ..io.loading import load_pretrained
from .tasks import check_tasks, write_task_dir


@register_model("a3mod")
class A3ModLM(HFLM):
    """HFLM over an a3mod checkpoint (or any path `a3mod.load_pretrained` reads: HF folder, GGUF) or a model object.

    Batching, loglikelihood, rolling loglikelihood and generation are HFLM's.
    """

    def __init__(self, pretrained, tokenizer=None, device: str | None = None, dtype: str | torch.dtype = "float32",
                 **kwargs):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if kwargs.pop("trust_remote_code", False) not in (False, "False", "false", None):
            raise A3ModError("the a3mod model class never runs code from a checkpoint (trust_remote_code=True)")
        if isinstance(pretrained, str):
            pretrained, tok = load_pretrained(pretrained, dtype=as_dtype(dtype), device=device)
            tokenizer = tokenizer if tokenizer is not None else tok
        if tokenizer is None:
            raise A3ModError("A3ModLM with a model object needs tokenizer= (a transformers tokenizer)")
        if isinstance(tokenizer, str):
            check_folder(tokenizer)
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, **NO_CODE)
        pretrained.eval()
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, **kwargs)


def evaluate(model, tasks: list[str], tokenizer=None, batch_size: int | str = 1, limit: int | float | None = None,
             num_fewshot: int | None = None, max_length: int | None = None, task_dir=None, **kwargs) -> dict:
    """Run lm-eval tasks on an in-memory model (or a path) and return lm-eval's results dict.

    Local tasks (`wikitext_local`, `<task>_local`) are available automatically; any task lm-eval knows works
    too when its data can be reached. kwargs go to `lm_eval.simple_evaluate`.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise A3ModError("evaluate: tasks is empty; e.g. tasks=['wikitext_local']")
    task_dir = task_dir or write_task_dir()
    check_tasks(tasks, task_dir)
    lm = A3ModLM(model, tokenizer=tokenizer, batch_size=batch_size,
                 **({"max_length": max_length} if max_length else {}))
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                   task_manager=TaskManager(include_path=str(task_dir)), **kwargs)


def main(argv: list[str] | None = None) -> None:
    """`a3mod-lm-eval`: lm-eval's CLI with the a3mod model class and the local tasks."""
    from lm_eval.__main__ import cli_evaluate

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    undo = lambda: None  # noqa: E731
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        undo = with_local_tasks(str(write_task_dir()))   # lm-eval's CLI takes one path: a3mod's tasks join it
    else:
        argv += ["--include_path", str(write_task_dir())]
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        undo()


def with_local_tasks(task_dir: str):
    """Make every `lm_eval.tasks.TaskManager` of this process also read `task_dir`, after the include_path it is
    given (which may list several directories separated by os.pathsep). Returns the undo function."""
    from lm_eval.tasks import TaskManager

    orig = TaskManager.__init__

    def init(self, *args, include_path=None, **kwargs):
        if isinstance(include_path, (str, os.PathLike)):
            include_path = [p for p in str(include_path).split(os.pathsep) if p]
        return orig(self, *args, include_path=[*(include_path or []), task_dir], **kwargs)

    TaskManager.__init__ = init

    def undo():
        TaskManager.__init__ = orig
    return undo
