"""CLI smoke tests on a tiny llama saved to disk with an offline tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

import a3mod
from a3mod.cli.commands import main

from conftest import make_tokenizer, tiny_model


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_model("llama", kv_heads=2).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def _eval_args(text_file):
    return ["--eval-source", text_file, "--eval-seq-len", "16"]


def test_compress_then_load_and_eval(tmp_path, model_dir, text_file, capsys):
    out = str(tmp_path / "out")
    rc = main(["compress", "--model", model_dir, "--ratio", "0.2", "--out", out, "--calib", text_file,
               "--n-samples", "4", "--calib-seq-len", "16", *_eval_args(text_file)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "a3mod report: llama" in printed and f"saved to {out}" in printed
    result = json.loads((tmp_path / "out" / "compress_result.json").read_text())
    assert result["calib_tokens"] == 64
    assert result["ppl_before"]["windows"] == result["ppl_after"]["windows"] > 0
    assert 0.1 <= result["report"]["ratio"] <= 0.3
    assert result["ratio"] == {"requested": 0.2, "achieved": result["report"]["ratio"],
                               "achieved_attention_mlp": result["report"]["ratio_reducible"]}
    model = a3mod.load(out)
    assert all(isinstance(layer.self_attn, a3mod.ReducedHeadAttention) for layer in model.model.layers)
    assert [p["ratio"] for p in model.a3mod_info["passes"]] == [0.2, 0.2, 0.2, 0.2]
    # the checkpoint carries the tokenizer and evaluates to the perplexity measured after compression
    rc = main(["eval", "ppl", "--model", out, *_eval_args(text_file), "--json", str(tmp_path / "ppl.json")])
    assert rc == 0
    res = json.loads((tmp_path / "ppl.json").read_text())
    assert res["ppl"] == pytest.approx(result["ppl_after"]["ppl"], rel=1e-5)
    assert res["windows"] == result["ppl_after"]["windows"]
    # report subcommand
    capsys.readouterr()
    assert main(["report", "--model", out, "--json", str(tmp_path / "rep.json")]) == 0
    assert "a3mod report: llama" in capsys.readouterr().out
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["params"] == result["report"]["params"]


def test_compress_with_overrides_and_stats_file(tmp_path, model_dir, text_file):
    stats = str(tmp_path / "stats.safetensors")
    args = ["compress", "--model", model_dir, "--ratio", "0.25", "--mlp-ratio", "0.5", "--calib", text_file,
            "--n-samples", "4", "--calib-seq-len", "16", "--stats", stats, "--no-eval"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "stats.safetensors").is_file()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0          # second run reuses the statistics
    a, b = a3mod.load(tmp_path / "a"), a3mod.load(tmp_path / "b")
    assert all(torch.equal(t, b.state_dict()[k]) for k, t in a.state_dict().items())
    assert [layer.mlp.inter for layer in a.model.layers] == [32, 32]
    assert [layer.self_attn.qk_dim for layer in a.model.layers] == [6, 6]
    result = json.loads((tmp_path / "a" / "compress_result.json").read_text())
    assert "ppl_before" not in result
    src = a3mod.Stats.load(stats).source          # where the statistics' tokens came from, and what was collected
    assert src["calib"] == text_file and (src["n_samples"], src["seq_len"], src["seed"]) == (4, 16, 0)
    assert src["kinds"] == ["a3"]


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "1.0"])
def test_bad_ratio_exit_code(tmp_path, model_dir, text_file, capsys, ratio):
    rc = main(["compress", "--model", model_dir, "--ratio", ratio, "--out", str(tmp_path / "out"),
               "--calib", text_file, "--n-samples", "4", "--calib-seq-len", "16", "--no-eval"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "a3mod: error:" in err and f"ratio={float(ratio)!r}" in err
    assert not (tmp_path / "out").exists()


def test_existing_out_exit_code(tmp_path, model_dir, text_file, capsys):
    (tmp_path / "out").mkdir()
    rc = main(["compress", "--model", model_dir, "--ratio", "0.2", "--out", str(tmp_path / "out"),
               "--calib", text_file, "--no-eval"])
    assert rc == 2
    assert "exists" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_calibration_too_short_exit_code(tmp_path, model_dir, text_file, capsys):
    rc = main(["compress", "--model", model_dir, "--ratio", "0.2", "--out", str(tmp_path / "out"),
               "--calib", text_file, "--n-samples", "2", "--calib-seq-len", "100000", "--no-eval"])
    assert rc == 2
    assert "seq_len=100000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_argparse_rejects_non_numbers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compress", "--model", "x", "--ratio", "abc", "--out", "y"])
    assert e.value.code == 2
    assert "'abc'" in capsys.readouterr().err


def test_eval_plain_hf_folder(model_dir, text_file, capsys):
    assert main(["eval", "ppl", "--model", model_dir, *_eval_args(text_file), "--eval-windows", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["windows"] == 2 and res["tokens"] == 30 and res["ppl"] > 1


def test_missing_model_path_exit_code(tmp_path, text_file, capsys):
    missing = str(tmp_path / "no-such-model")
    rc = main(["eval", "ppl", "--model", missing, *_eval_args(text_file)])
    assert rc == 2
    assert missing in capsys.readouterr().err


@pytest.mark.parametrize("method,extra,kind", [
    ("svd", ["--ratio", "0.3"], a3mod.LowRankLinear),
    ("svd-llm", ["--ratio", "0.3"], a3mod.LowRankLinear),
    ("asvd", ["--ratio", "0.3", "--probe-samples", "2", "--probe-seq-len", "8"], a3mod.LowRankLinear),
    ("asvd", ["--kv-ratio", "0.5", "--no-rank-search"], a3mod.LatentKVAttention),
])
def test_compress_baselines(tmp_path, model_dir, text_file, method, extra, kind):
    out, stats = str(tmp_path / "out"), str(tmp_path / "stats.safetensors")
    args = ["compress", "--model", model_dir, "--method", method, *extra, "--out", out, "--calib", text_file,
            "--n-samples", "4", "--calib-seq-len", "16", "--stats", stats, *_eval_args(text_file)]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "compress_result.json").read_text())
    model = a3mod.load(out)
    assert any(isinstance(m, kind) for m in model.modules())
    rep = a3mod.report(model)
    if "--kv-ratio" in extra:
        assert rep.kv_bytes_per_token() <= 0.5 * rep.kv_bytes_per_token(orig=True)
    else:
        assert 0.3 <= rep.ratio < 0.4 and result["report"]["ratio"] == pytest.approx(rep.ratio)
    # the stats file keeps what the passes cached (ASVD's sensitivity table) for the next run
    if method == "svd":       # plain SVD reads no statistics: none are collected or written
        assert not (tmp_path / "stats.safetensors").exists()
        return
    saved = a3mod.Stats.load(stats)
    assert {"svd-llm": "gram", "asvd": "absmean"}[method] in saved.kinds
    if method == "asvd" and "--ratio" in extra:
        assert any(k.startswith("asvd:params") for k in saved.extra)


@pytest.mark.parametrize("argv,needle", [
    (["--method", "svd"], "needs --ratio"),
    (["--method", "a3", "--kv-ratio", "0.5", "--ratio", "0.2"], "--kv-ratio"),
    (["--method", "asvd", "--ratio", "0.2", "--kv-ratio", "0.5"], "exactly one"),
    (["--method", "svd-llm", "--ratio", "0.2", "--mlp-ratio", "0.5"], "A3 options"),
    (["--method", "asvd", "--ratio", "0.2", "--alpha", "-1"], "alpha=-1"),
    (["--method", "svd-llm", "--ratio", "0.2", "--mlp-update"], "--mlp-update"),
    (["--method", "a3", "--kv-ratio", "0.5", "--mlp-update"], "--mlp-update"),
    (["--method", "a3-mix", "--ratio", "0.2", "--mlp-update", "--mlp-select", "obs"], "--mlp-select"),
    (["--method", "a3-mix", "--ratio", "0.2", "--portable"], "--portable"),
    (["--method", "a3-mix", "--ratio", "0.2", "--kv-budget", "uniform"], "--kv-budget"),
    (["--method", "a3", "--ratio", "0.2", "--kv-budget", "0.2"], "--kv-budget"),
    (["--method", "svd-llm", "--ratio", "0.2", "--qk-update"], "--qk-update"),
    (["--ratio", "0.2", "--sequential"], "with --stream"),
])
def test_compress_method_errors(tmp_path, model_dir, argv, needle, capsys):
    rc = main(["compress", "--model", model_dir, *argv, "--out", str(tmp_path / "o"), "--no-eval"])
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv,want", [
    (["--method", "a3-mix", "--ratio", "0.2"], [a3mod.Allocate(budget=0.2, mlp_update=True, ov_update=True)]),
    (["--method", "a3-mix", "--ratio", "0.2", "--updates", "off"], [a3mod.Allocate(budget=0.2)]),
    (["--method", "a3-mix", "--ratio", "0.3", "--across", "all", "--n-samples", "8"],
     [a3mod.Allocate(budget=0.3, across="all")]),
    (["--method", "a3", "--kv-ratio", "0.5"], [a3mod.A3KV(kv_ratio=0.5)]),
    (["--method", "a3-mix", "--kv-ratio", "0.25"], [a3mod.A3KV(kv_ratio=0.25, mixed=True)]),
    (["--ratio", "0.2", "--mlp-update"], [a3mod.A3QK(ratio=0.2), a3mod.A3OV(ratio=0.2),
                                          a3mod.A3MLP(ratio=0.2, update=True), a3mod.A3Experts(ratio=0.2)]),
    (["--ratio", "0.2", "--ov-update", "--mlp-update"], [a3mod.A3QK(ratio=0.2), a3mod.A3OV(ratio=0.2, update=True),
                                                         a3mod.A3MLP(ratio=0.2, update=True),
                                                         a3mod.A3Experts(ratio=0.2)]),
    (["--ratio", "0.2", "--qk-update", "--mlp-update"], [a3mod.A3QK(ratio=0.2, update=True), a3mod.A3OV(ratio=0.2),
                                                         a3mod.A3MLP(ratio=0.2, update=True),
                                                         a3mod.A3Experts(ratio=0.2)]),
    (["--method", "a3-mix", "--ratio", "0.2", "--across", "all", "--kv-budget", "uniform", "--updates", "on",
      "--qk-update", "--seq-refit"],
     [a3mod.Allocate(budget=0.2, across="all", kv_budget="uniform", mlp_update=True, ov_update=True, qk_update=True,
                     seq_refit=True, refit_damping="heldout")]),
    (["--method", "a3-mix", "--ratio", "0.2", "--across", "all", "--kv-budget", "0.3", "--ov-update"],
     [a3mod.Allocate(budget=0.2, across="all", kv_budget=0.3, ov_update=True)]),
])
def test_compress_mix_and_kv_passes(argv, want):
    from a3mod.cli.commands import build_parser, _passes
    args = build_parser().parse_args(["compress", "--model", "m", "--out", "o", *argv])
    assert _passes(args) == want


@pytest.mark.parametrize("argv,msg", [
    (["--method", "a3", "--kv-ratio", "0.5", "--ratio", "0.2"], "takes no --ratio"),
    (["--method", "svd", "--kv-ratio", "0.5"], "not 'svd'"),
])
def test_compress_kv_ratio_errors(argv, msg):
    from a3mod.cli.commands import build_parser, _passes
    args = build_parser().parse_args(["compress", "--model", "m", "--out", "o", *argv])
    with pytest.raises(a3mod.RatioError, match=msg):
        _passes(args)


def test_dry_run_prints_the_plan_apply_gives_and_writes_nothing(tmp_path, model_dir, text_file, capsys):
    out = tmp_path / "out"
    assert main(["compress", "--model", model_dir, "--ratio", "0.3", "--out", str(out), "--calib", text_file,
                 "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists() and "dry run" in printed
    model = a3mod.apply(a3mod.load_pretrained(model_dir)[0], a3mod.a3_passes(0.3),
                        calib=torch.randint(0, 100, (4, 16)), progress=False)
    assert str(a3mod.report(model)) in printed                  # the same dims, params, FLOPs and KV bytes


@pytest.mark.parametrize("argv", [["--method", "a3-mix"], ["--method", "asvd"], ["--stream"]])
def test_dry_run_refuses_data_dependent_plans(tmp_path, model_dir, text_file, argv, capsys):
    rc = main(["compress", "--model", model_dir, "--ratio", "0.3", "--out", str(tmp_path / "o"), "--calib",
               text_file, "--dry-run", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and "a3mod: error: --dry-run" in err and "Traceback" not in err


def test_compress_writes_a_model_card_and_plot(tmp_path, model_dir, text_file):
    out = tmp_path / "out"
    assert main(["compress", "--model", model_dir, "--ratio", "0.2", "--out", str(out), "--calib", text_file,
                 "--n-samples", "4", "--calib-seq-len", "16", "--seed", "7", *_eval_args(text_file)]) == 0
    card = (out / "README.md").read_text()
    result = json.loads((out / "compress_result.json").read_text())
    assert f"-> {result['ppl_after']['ppl']:.4f}" in card and "seed 7" in card and repr(text_file) in card
    assert "AutoModelForCausalLM.from_pretrained" in card and card.count("| ") > 2 * len(result["report"]["layers"])
    pytest.importorskip("matplotlib")
    assert (out / "kept_dims.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["calibration"]["seed"] == 7 and set(result["versions"]) >= {"a3mod", "torch", "transformers"}


def test_compress_gives_the_ratio_asked_under_qk_norms(tmp_path, text_file, capsys):
    """Under q/k norms QK stays whole and OV / MLP give its share: compress_result.json records the requested and
    achieved fractions, equal up to the rounding of kept dims, and nothing is warned."""
    import transformers

    path = tmp_path / "tiny-qwen3"
    cfg = transformers.Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(path), "--ratio", "0.3", "--out", str(out), "--calib", text_file,
                 "--n-samples", "4", "--calib-seq-len", "40", "--no-eval"]) == 0
    result = json.loads((out / "compress_result.json").read_text())
    assert result["ratio"]["requested"] == 0.3 and abs(result["ratio"]["achieved"] - 0.3) < 0.02
    assert "less than the requested" not in capsys.readouterr().err


def test_compress_says_when_it_removes_less_than_asked(tmp_path, text_file, capsys):
    """A hybrid's mixers stay whole, so the model gives less than --ratio: compress_result.json records the
    requested and achieved fractions (all layer params; the attention and MLP parts) and stderr says why."""
    from zoo import tiny_zoo_model

    path = tmp_path / "tiny-qwen3_5"
    tiny_zoo_model("qwen3_5_text").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    out = tmp_path / "out"
    assert main(["compress", "--model", str(path), "--ratio", "0.3", "--out", str(out), "--calib", text_file,
                 "--n-samples", "4", "--calib-seq-len", "16", "--no-eval"]) == 0
    result = json.loads((out / "compress_result.json").read_text())
    assert result["ratio"]["requested"] == 0.3 and result["ratio"]["achieved"] < 0.29
    assert abs(result["ratio"]["achieved_attention_mlp"] - 0.3) < 0.03      # the parts a3mod compresses
    err = capsys.readouterr().err
    assert "less than the requested 30.00%" in err and "hybrid mixers" in err


@pytest.mark.parametrize("argv,want", [
    (["--ratio", "0.2"], (True, True, False)),                                     # 128 x 2048 by default
    (["--ratio", "0.2", "--n-samples", "16", "--calib-seq-len", "512"], (False, False, False)),   # 8,192 tokens
    (["--ratio", "0.2", "--n-samples", "128", "--calib-seq-len", "512"], (True, True, False)),   # 65,536: on
    (["--ratio", "0.2", "--updates", "off"], (False, False, False)),
    (["--ratio", "0.2", "--updates", "off", "--qk-update"], (False, False, True)),
    (["--ratio", "0.2", "--n-samples", "4", "--updates", "on"], (True, True, False)),
    (["--ratio", "0.2", "--qk-update"], (True, True, True)),
    (["--ratio", "0.2", "--mlp-update"], (True, False, False)),
    (["--ratio", "0.2", "--mlp-update", "--qk-update"], (True, False, True)),
    (["--method", "svd-llm", "--ratio", "0.2"], (False, False, False)),           # auto: a3 only, no error
    (["--method", "a3", "--kv-ratio", "0.3"], (False, False, False)),
])
def test_updates_are_on_by_default_with_enough_calibration(argv, want):
    from a3mod.cli.commands import _passes, _updates, build_parser
    args = build_parser().parse_args(["compress", "--model", "m", "--out", "o", *argv])
    assert _updates(args) == want
    passes = _passes(args)
    ups = {type(p).__name__: p.update for p in passes if hasattr(p, "update")}
    assert not ups.pop("A3Experts", False)           # the routed experts' update is the Python API's only
    assert ups in ({}, {"A3OV": want[1], "A3MLP": want[0], "A3QK": want[2]})


def test_updates_on_for_another_method_is_refused(capsys, tmp_path, model_dir):
    rc = main(["compress", "--model", model_dir, "--method", "svd-llm", "--ratio", "0.2", "--updates", "on",
               "--out", str(tmp_path / "o"), "--no-eval"])
    assert rc == 2 and "--updates on" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_compress_with_updates_by_default_calibrates_layer_by_layer(tmp_path, model_dir, text_file, capsys,
                                                                     monkeypatch):
    """--updates auto with enough tokens (the threshold lowered to this tiny run's 128): both updates in the
    checkpoint's passes, the statistics collected one layer at a time inside apply (not before it)."""
    from a3mod.cli import commands
    from a3mod.pipeline import layerwise
    monkeypatch.setattr(commands, "UPDATE_TOKENS", 128)
    seen, real = [], layerwise.layerwise_swaps
    monkeypatch.setattr(layerwise, "layerwise_swaps", lambda *a, **k: seen.append(1) or real(*a, **k))
    out = tmp_path / "out"
    assert main(["compress", "--model", model_dir, "--ratio", "0.2", "--out", str(out), "--calib", text_file,
                 "--n-samples", "8", "--calib-seq-len", "16", "--no-eval"]) == 0
    assert "least-squares updates: on" in capsys.readouterr().err and seen == [1]
    result = json.loads((out / "compress_result.json").read_text())
    assert result["calib_tokens"] == 128
    info = a3mod.load(out).a3mod_info
    assert {p["type"]: p.get("update") for p in info["passes"]}["A3MLP"] is True
