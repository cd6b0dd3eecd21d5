"""End to end on the real SmolLM2-135M GGUF from the assets dir (skipped when the assets are absent)."""
import pytest
import torch

import a3mod
from a3mod.paths import SMOLLM2, assets_dir

ROOT = assets_dir()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(ROOT is None or not (ROOT / SMOLLM2).is_dir(), reason="assets dir not found")]


@pytest.fixture(scope="module")
def smollm2():
    return a3mod.load_pretrained(str(ROOT / SMOLLM2))


def test_compress_save_load_generate(smollm2, tmp_path):
    model, tok = smollm2
    ids = a3mod.eval_tokens(tok)
    assert ids.numel() == 304_986                      # matches the assets README's count
    before = a3mod.perplexity(model, ids, seq_len=256, max_windows=2, progress=False)["ppl"]
    assert 10 < before < 80
    calib = a3mod.calibration_data(tok, "wikitext2", n_samples=4, seq_len=128)
    a3mod.apply(model, a3mod.a3_passes(0.2), calib=calib, progress=False)
    rep = a3mod.report(model)
    assert abs(rep.ratio - 0.2) < 0.01
    assert rep.kv_bytes_per_token() == 30 * 3 * (52 + 52) * 4
    after = a3mod.perplexity(model, ids, seq_len=256, max_windows=2, progress=False)["ppl"]
    assert before < after < 4 * before                 # compressed, still a language model
    prompt = tok("The capital of France is", return_tensors="pt")
    g1 = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    g2 = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(g1, g2)
    a3mod.save(model, tmp_path / "out", tokenizer=tok)
    back = a3mod.load(tmp_path / "out")
    x = ids[:64][None]
    assert torch.equal(model(x).logits, back(x).logits)
