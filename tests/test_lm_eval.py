"""lm-eval integration, offline: synthetic local tasks through lm-eval vs a3mod's own log-likelihoods."""
from __future__ import annotations

import copy
import json
import math
import random
import re

import pytest

import a3mod
from a3mod.evaluation import scoring
from a3mod.evaluation.tasks import write_task_dir

from conftest import WORDS, calib_ids, make_tokenizer, tiny_model

lm_eval = pytest.importorskip("lm_eval")
from a3mod.evaluation.harness import A3ModLM, evaluate  # noqa: E402

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""
ROLL_YAML = """task: tiny_rolling
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
MAX_LEN = 24     # lm-eval context length for the tests: the long documents need several rolling windows


def _words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    mc = [{"question": _words(rng, rng.randint(3, 8)), "choices": [_words(rng, rng.randint(1, 3)) for _ in range(4)],
           "label": rng.randrange(4)} for _ in range(12)]
    roll = [{"text": _words(rng, n)} for n in (5, 17, 40, 63)]           # 40 and 63 words: 2-3 windows
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    (d / "roll.jsonl").write_text("".join(json.dumps(r) + "\n" for r in roll))
    return write_task_dir(data_dir=d / "no-data", out_dir=d / "yaml",
                          extra={"tiny_mc.yaml": MC_YAML.format(data=json.dumps(str(d / "mc.jsonl"))),
                                 "tiny_rolling.yaml": ROLL_YAML.format(data=json.dumps(str(d / "roll.jsonl")))}), mc, roll


def _models():
    base = tiny_model("llama", kv_heads=2, layers=2)
    small = a3mod.apply(copy.deepcopy(base), a3mod.a3_passes(0.3), calib=calib_ids(4, 16), progress=False)
    return {"original": base, "a3-30%": small}


@pytest.fixture(scope="module")
def results(task_dir):
    tdir, _, _ = task_dir
    tok = make_tokenizer()
    return {name: evaluate(m, ["tiny_mc", "tiny_rolling"], tokenizer=tok, max_length=MAX_LEN, task_dir=tdir,
                           log_samples=True, bootstrap_iters=0)
            for name, m in _models().items()}, tok


@pytest.mark.parametrize("name", ["original", "a3-30%"])
def test_multiple_choice_matches_own_loglikelihood(results, task_dir, name):
    res, tok = results
    _, mc, _ = task_dir
    model = _models()[name]
    samples = sorted(res[name]["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(mc)
    correct = 0
    for s, doc in zip(samples, mc):
        got = [r[0][0] for r in s["resps"]]                                        # per-choice log-likelihoods
        own = [scoring.continuation_logprob(model, tok, doc["question"], " " + c)[0] for c in doc["choices"]]
        assert got == pytest.approx(own, abs=1e-4)
        correct += int(max(range(4), key=lambda i: own[i]) == doc["label"])
    assert res[name]["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(mc))


@pytest.mark.parametrize("name", ["original", "a3-30%"])
def test_rolling_loglikelihood_matches_own(results, task_dir, name):
    res, tok = results
    _, _, roll = task_dir
    model = _models()[name]
    samples = sorted(res[name]["samples"]["tiny_rolling"], key=lambda s: s["doc_id"])
    own = [scoring.rolling_logprob(model, tok, d["text"], MAX_LEN) for d in roll]
    got = [s["resps"][0][0] for s in samples]
    assert got == pytest.approx(own, abs=1e-4)
    words = sum(len(re.split(r"\s+", d["text"])) for d in roll)
    wppl = res[name]["results"]["tiny_rolling"]["word_perplexity,none"]
    assert wppl == pytest.approx(math.exp(-sum(own) / words), rel=1e-5)


def test_compressed_model_scores_differ(results):
    """The two models really are different models to lm-eval (guards against evaluating the same object)."""
    res, _ = results
    a = res["original"]["results"]["tiny_rolling"]["word_perplexity,none"]
    b = res["a3-30%"]["results"]["tiny_rolling"]["word_perplexity,none"]
    assert a != pytest.approx(b, rel=1e-6)


def test_registered_model_loads_checkpoint(tmp_path, task_dir):
    """`--model a3mod --model_args pretrained=DIR` path: lm-eval's registry builds A3ModLM from a saved checkpoint."""
    tdir, _, roll = task_dir
    model = _models()["a3-30%"]
    tok = make_tokenizer()
    a3mod.save(model, tmp_path / "ckpt", tokenizer=tok)
    cls = lm_eval.api.registry.get_model("a3mod")
    assert cls is A3ModLM
    lm = cls.create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},max_length={MAX_LEN},device=cpu")
    assert isinstance(lm.model.model.layers[0].self_attn, a3mod.ReducedHeadAttention)
    from lm_eval.tasks import TaskManager
    res = lm_eval.simple_evaluate(model=lm, tasks=["tiny_rolling"], task_manager=TaskManager(include_path=str(tdir)),
                                  log_samples=True, bootstrap_iters=0)
    got = [s["resps"][0][0] for s in sorted(res["samples"]["tiny_rolling"], key=lambda s: s["doc_id"])]
    assert got == pytest.approx([scoring.rolling_logprob(model, tok, d["text"], MAX_LEN) for d in roll], abs=1e-4)


def test_local_wikitext_and_downstream_configs(tmp_path):
    """wikitext_local from a raw test file; <task>_local appear only when their files exist."""
    raw = tmp_path / "data" / "wikitext-2-raw"
    raw.mkdir(parents=True)
    raw.joinpath("test.txt").write_text(" \n = A = \n \n w1 w2 . \n \n = = Sub = = \n \n w3 \n \n = B = \n \n w4 \n")
    (tmp_path / "data" / "piqa").mkdir()
    (tmp_path / "data" / "piqa" / "validation.jsonl").write_text(
        json.dumps({"goal": "w1 w2", "sol1": "w3", "sol2": "w4", "label": 1}) + "\n")
    d = write_task_dir(tmp_path / "data", tmp_path / "yaml")
    names = sorted(p.stem for p in d.glob("*.yaml"))
    assert names == ["piqa_local", "wikitext_local"]
    pages = [json.loads(l)["page"] for l in (d / "wikitext_local.jsonl").read_text().splitlines()]
    assert len(pages) == 2 and pages[0].startswith(" = A = ") and "Sub" in pages[0] and pages[1].startswith(" = B = ")
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(d))
    tasks = tm.load(["wikitext_local", "piqa_local"])["tasks"]
    assert len(list(tasks["piqa_local"].validation_docs())) == 1
    assert len(list(tasks["wikitext_local"].test_docs())) == 2


def test_wikitext_pages_of_the_real_test_split():
    from a3mod.evaluation.tasks import eval_data_dir, wikitext_pages

    d = eval_data_dir()
    f = d / "wikitext-2-raw" / "test.txt" if d else None
    if f is None or not f.is_file():
        pytest.skip("no WikiText-2 raw test file in the assets")
    pages = wikitext_pages(f)
    assert len(pages) == 62                        # as EleutherAI/wikitext_document_level's test split
    assert " \n" + "\n".join(pages) == f.read_text(encoding="utf-8")    # every line, in order (a blank first)


def test_prepare_eval_data_writes_what_the_configs_read(tmp_path):
    from a3mod.evaluation.prepare import prepare

    seen = []

    def fake_load(path, name):
        seen.append((path, name))
        row = {"goal": "w1 w2", "sol1": "w3", "sol2": "w4", "label": 0}
        return {"train": [row, row], "validation": [row]}

    out = prepare(tmp_path / "data", ["piqa"], load_dataset=fake_load)
    assert seen == [("baber/piqa", None)]
    assert sorted(out["piqa"]) == sorted(str(tmp_path / "data" / "piqa" / f"{s}.jsonl") for s in ("train", "validation"))
    d = write_task_dir(tmp_path / "data", tmp_path / "yaml")
    res = evaluate(tiny_model("llama"), ["piqa_local"], tokenizer=make_tokenizer(), task_dir=d, bootstrap_iters=0)
    assert res["results"]["piqa_local"]["acc,none"] in (0.0, 1.0)
    with pytest.raises(a3mod.A3ModError, match="knows"):
        prepare(tmp_path / "x", ["nope"], load_dataset=fake_load)


def test_missing_local_data_is_a_clear_error(tmp_path):
    d = write_task_dir(tmp_path / "empty", tmp_path / "yaml")
    with pytest.raises(a3mod.A3ModError, match="hellaswag_local.*prepare-eval-data"):
        evaluate(tiny_model("llama"), ["hellaswag_local"], tokenizer=make_tokenizer(), task_dir=d)
    with pytest.raises(a3mod.A3ModError, match="tasks is empty"):
        evaluate(tiny_model("llama"), [], tokenizer=make_tokenizer(), task_dir=d)


def test_cli_eval_lm_eval_and_compress_eval(tmp_path, task_dir, monkeypatch, capsys):
    """`a3mod eval lm-eval` and `a3mod compress --eval lm-eval:TASKS` (tasks found through the local data dir)."""
    from a3mod.cli.commands import main

    _, mc, _ = task_dir
    data = tmp_path / "data"
    (data / "piqa").mkdir(parents=True)
    (data / "piqa" / "validation.jsonl").write_text("".join(
        json.dumps({"goal": d["question"], "sol1": d["choices"][0], "sol2": d["choices"][1], "label": d["label"] % 2})
        + "\n" for d in mc))
    monkeypatch.setenv("A3MOD_EVAL_DATA", str(data))
    mdir = tmp_path / "tiny"
    tiny_model("llama", kv_heads=2).save_pretrained(mdir)
    make_tokenizer().save_pretrained(mdir)
    assert main(["eval", "lm-eval", "--model", str(mdir), "--tasks", "piqa_local", "--limit", "5",
                 "--json", str(tmp_path / "le.json")]) == 0
    before = json.loads((tmp_path / "le.json").read_text())["results"]["piqa_local"]
    assert 0.0 <= before["acc,none"] <= 1.0
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(_words(random.Random(i), 12) for i in range(40)))
    out = tmp_path / "out"
    assert main(["compress", "--model", str(mdir), "--ratio", "0.3", "--out", str(out), "--calib", str(text),
                 "--n-samples", "4", "--calib-seq-len", "16", "--no-eval", "--eval", "lm-eval:piqa_local",
                 "--lm-eval-limit", "5"]) == 0
    result = json.loads((out / "compress_result.json").read_text())
    assert set(result["lm_eval"]) == {"piqa_local"} and "acc,none" in result["lm_eval"]["piqa_local"]
    assert "piqa_local" in capsys.readouterr().out
    assert main(["compress", "--model", str(mdir), "--ratio", "0.3", "--out", str(tmp_path / "o2"), "--no-eval",
                 "--eval", "piqa_local"]) == 2
    assert "expected lm-eval:TASK" in capsys.readouterr().err


def test_a3mod_lm_eval_command(tmp_path, task_dir, monkeypatch):
    """`a3mod-lm-eval --model a3mod --model_args pretrained=DIR ...`: lm-eval's own CLI with the a3mod model."""
    from a3mod.evaluation.harness import main

    tdir, _, roll = task_dir
    model = _models()["a3-30%"]
    tok = make_tokenizer()
    a3mod.save(model, tmp_path / "ckpt", tokenizer=tok)
    main(["--model", "a3mod", "--model_args", f"pretrained={tmp_path / 'ckpt'},max_length={MAX_LEN}",
          "--tasks", "tiny_rolling", "--include_path", str(tdir), "--device", "cpu",
          "--output_path", str(tmp_path / "res")])
    files = list((tmp_path / "res").rglob("results_*.json"))
    assert len(files) == 1
    got = json.loads(files[0].read_text())["results"]["tiny_rolling"]["word_perplexity,none"]
    own = sum(scoring.rolling_logprob(model, tok, d["text"], MAX_LEN) for d in roll)
    words = sum(len(re.split(r"\s+", d["text"])) for d in roll)
    assert got == pytest.approx(math.exp(-own / words), rel=1e-5)


def test_stock_hf_model_reads_a_native_folder(tmp_path, task_dir):
    """lm-eval's own `--model hf` (HFLM, AutoModelForCausalLM inside) on a save_pretrained folder of a compressed
    model, in a process that imported a3mod: the same rolling log-likelihoods as the model in memory."""
    from a3mod.evaluation.harness import main

    tdir, _, roll = task_dir
    model, tok = _models()["a3-30%"], make_tokenizer()
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    main(["--model", "hf", "--model_args", f"pretrained={tmp_path / 'hf'},max_length={MAX_LEN},dtype=float32",
          "--tasks", "tiny_rolling", "--include_path", str(tdir), "--device", "cpu",
          "--output_path", str(tmp_path / "res")])
    got = json.loads(next((tmp_path / "res").rglob("results_*.json")).read_text())["results"]["tiny_rolling"]
    own = sum(scoring.rolling_logprob(model, tok, d["text"], MAX_LEN) for d in roll)
    words = sum(len(re.split(r"\s+", d["text"])) for d in roll)
    assert got["word_perplexity,none"] == pytest.approx(math.exp(-own / words), rel=1e-5)


def test_user_include_path_keeps_the_local_tasks(task_dir, tmp_path):
    """a3mod's own task dir is read together with the user's include_path, and only while the patch holds."""
    from lm_eval.tasks import TaskManager

    from a3mod.evaluation.harness import with_local_tasks

    tdir = task_dir[0]
    local = tmp_path / "local"           # stands in for a3mod's task dir (which holds only what the assets allow)
    local.mkdir()
    (local / "probe.yaml").write_text((tdir / "tiny_rolling.yaml").read_text().replace(
        "task: tiny_rolling", "task: a3mod_probe_local"))
    undo = with_local_tasks(str(local))
    try:
        names = set(TaskManager(include_path=str(tdir)).all_tasks)
    finally:
        undo()
    assert {"tiny_rolling", "a3mod_probe_local"} <= names
    assert "a3mod_probe_local" not in set(TaskManager(include_path=str(tdir)).all_tasks)
