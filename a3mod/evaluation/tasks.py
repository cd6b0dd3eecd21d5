"""Local lm-eval task configs: the harness's own task definitions, reading their data from local files.

Data dir: $A3MOD_EVAL_DATA, default <assets>/data (see a3mod.paths). Layout:
  wikitext-2-raw/test.txt            WikiText-2 raw test split (the assets file) -> task `wikitext_local`
  <task>/<split>.jsonl               rows of the HF dataset lm-eval's task reads -> task `<task>_local`
                                     (written by `a3mod prepare-eval-data` on a connected machine)
`write_task_dir()` writes one YAML per task whose data is present into a directory for lm-eval's
`--include_path` / `TaskManager(include_path=...)`. Downstream configs `include:` lm-eval's own YAML and
override only where the data comes from, so prompts and metrics are exactly lm-eval's.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import A3ModError
from ..paths import assets_dir

# a3mod task -> (lm-eval YAML under lm_eval/tasks, the splits that YAML reads)
DOWNSTREAM = {
    "piqa": ("piqa/piqa.yaml", ("train", "validation")),
    "arc_easy": ("arc/arc_easy.yaml", ("train", "validation", "test")),
    "arc_challenge": ("arc/arc_challenge.yaml", ("train", "validation", "test")),
    "hellaswag": ("hellaswag/hellaswag.yaml", ("train", "validation")),
    "winogrande": ("winogrande/default.yaml", ("train", "validation")),
    "boolq": ("super_glue/boolq/default.yaml", ("train", "validation")),
    "openbookqa": ("openbookqa/openbookqa.yaml", ("train", "validation", "test")),
    "lambada": ("lambada/lambada_openai.yaml", ("test",)),
}
WIKITEXT_TASK = "wikitext_local"


def eval_data_dir() -> Path | None:
    env = os.environ.get("A3MOD_EVAL_DATA")
    if env:
        return Path(env)
    root = assets_dir()
    return root / "data" if root is not None else None


def lm_eval_task_yaml(task: str) -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / DOWNSTREAM[task][0]


def wikitext_pages(raw_test: Path) -> list[str]:
    """Documents of the WikiText-2 raw test file, as EleutherAI/wikitext_document_level builds them.

    A line that (after folding '= = =' / '= =' sub-headings) starts with '= ' and ends with ' =' opens a
    new page; a page is its lines joined with '\n'. lm-eval's `wikitext` task reads these pages.
    """
    lines = raw_test.read_text(encoding="utf-8").split("\n")
    pages, cur = [], []
    for line in lines:
        folded = line.replace("= = =", "===").replace("= =", "==").strip()
        if folded.startswith("= ") and folded.endswith(" ="):
            page = "\n".join(cur)
            if page.strip():
                pages.append(page)
            cur = []
        cur.append(line)
    pages.append("\n".join(cur))
    return pages


_WIKITEXT_YAML = """task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: !function {utils}.wikitext_detokenizer
process_results: !function {utils}.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 2.0
  description: "lm-eval wikitext on the local WikiText-2 raw test split; word/byte perplexity of whole pages
    (rolling windows), NOT the paper-style token perplexity of `a3mod eval ppl`"
"""


def _write_utils(out: Path) -> str:
    """A module next to the YAMLs that re-exports lm-eval's wikitext helpers (for `!function`)."""
    (out / "a3mod_wikitext.py").write_text(
        "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401\n")
    return "a3mod_wikitext"


def write_task_dir(data_dir: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None,
                   extra: dict[str, str] | None = None) -> Path:
    """Write the YAMLs of every local task whose data is present; returns the directory (for include_path).

    extra: more task YAMLs to write as {file name: text} (tests use it for synthetic tasks).
    """
    data = Path(data_dir) if data_dir is not None else eval_data_dir()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="a3mod-lm-eval-tasks-"))
    out.mkdir(parents=True, exist_ok=True)
    if data is not None and (data / "wikitext-2-raw" / "test.txt").is_file():
        pages = out / "wikitext_local.jsonl"
        with open(pages, "w", encoding="utf-8") as f:
            for p in wikitext_pages(data / "wikitext-2-raw" / "test.txt"):
                f.write(json.dumps({"page": p}) + "\n")
        (out / "wikitext_local.yaml").write_text(
            _WIKITEXT_YAML.format(task=WIKITEXT_TASK, data=json.dumps(str(pages)), utils=_write_utils(out)))
    for task, (_, splits) in DOWNSTREAM.items():
        files = {s: data / task / f"{s}.jsonl" for s in splits} if data is not None else {}
        files = {s: p for s, p in files.items() if p.is_file()}
        if not files:
            continue
        lines = [f"include: {json.dumps(str(lm_eval_task_yaml(task)))}", f"task: {task}_local",
                 "dataset_path: json", "dataset_name: null", "dataset_kwargs:", "  data_files:"]
        lines += [f"    {s}: {json.dumps(str(p))}" for s, p in files.items()]
        lines += [f"{k}_split: null" for k in ("training", "validation", "test")
                  if {"training": "train"}.get(k, k) in splits and {"training": "train"}.get(k, k) not in files]
        (out / f"{task}_local.yaml").write_text("\n".join(lines) + "\n")
    for name, text in (extra or {}).items():
        (out / name).write_text(text)
    return out


def local_tasks(task_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(task_dir).glob("*.yaml"))


def check_tasks(tasks: list[str], task_dir: Path) -> None:
    have = local_tasks(task_dir)
    data = eval_data_dir()
    for t in tasks:
        if t.endswith("_local") and t not in have:
            base = t[: -len("_local")]
            where = (f"{data}/wikitext-2-raw/test.txt" if t == WIKITEXT_TASK else
                     f"{data}/{base}/<split>.jsonl (run `a3mod prepare-eval-data --out {data}` on a connected "
                     f"machine)" if base in DOWNSTREAM else None)
            if where is None:
                raise A3ModError(f"unknown local task {t!r}; local tasks: {WIKITEXT_TASK}, "
                                 f"{', '.join(k + '_local' for k in DOWNSTREAM)}")
            raise A3ModError(f"local task {t!r} has no data: expected {where} (data dir: $A3MOD_EVAL_DATA)")
