"""The four checks every row of the support matrix must pass, for any model factory.

Each check takes `make()` -> a fresh tiny random model in eval mode (same weights on every call) so that
test files per family stay one line per check:

    full_rank_reproduces_outputs(make)      A3 at ratio 0 reproduces logits (eager and sdpa)
    compresses_at(make, 0.3)                30% compression: finite, changed, report ratio near the target
    cached_generate_matches_uncached(make)  greedy generate with the KV cache == without it (decoders)
    save_load_round_trip(make, tmp_path)    a3mod.save / a3mod.load is bit exact and reproduces outputs
"""
from __future__ import annotations

import torch

import a3mod
from a3mod.pipeline.compress import compact_modules

from conftest import assert_close_logits, calib_ids, input_ids

IMPLS = ("eager", "sdpa")


@torch.no_grad()
def outputs(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a causal LM, or the last hidden state of an encoder (models without logits)."""
    out = model(input_ids=ids, **({"use_cache": False} if _is_decoder(model) else {}))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _is_decoder(model) -> bool:
    return bool(getattr(model.config, "is_decoder", False) or model.can_generate())


def full_rank_reproduces_outputs(make, impls=IMPLS, rel: float = 1e-4, calib=None) -> None:
    model, ids = make(), input_ids()
    ref = {}
    for impl in impls:
        model.set_attn_implementation(impl)
        ref[impl] = outputs(model, ids)
    a3mod.apply(model, a3mod.a3_passes(0.0), calib=calib_ids() if calib is None else calib, progress=False)
    assert compact_modules(model), "nothing was rewritten"
    for impl in impls:
        model.set_attn_implementation(impl)
        assert_close_logits(outputs(model, ids), ref[impl], rel=rel)


def compresses_at(make, ratio: float = 0.3, lo: float = 0.2, hi: float = 0.4) -> a3mod.Report:
    model, ids = make(), input_ids()
    ref = outputs(model, ids)
    a3mod.apply(model, a3mod.a3_passes(ratio), calib=calib_ids(), progress=False)
    out = outputs(model, ids)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, ref), "compression changed nothing"
    rep = a3mod.report(model)
    assert lo <= rep.ratio <= hi, f"report ratio {rep.ratio:.3f} outside [{lo}, {hi}] for target {ratio}"
    assert rep.params < rep.params_orig
    return rep


def _greedy(model, prompt, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=use_cache,
                              pad_token_id=0, attention_mask=torch.ones_like(prompt))


def cached_generate_matches_uncached(make, ratio: float = 0.3, impls=IMPLS) -> None:
    for impl in impls:
        model = make()
        model.set_attn_implementation(impl)
        prompt = input_ids(1, 6, seed=5)
        original = _greedy(model, prompt, True)
        a3mod.apply(model, a3mod.a3_passes(ratio), calib=calib_ids(), progress=False)
        cached, uncached = _greedy(model, prompt, True), _greedy(model, prompt, False)
        assert cached.shape == (1, 11)
        assert torch.equal(cached, uncached), impl
        if ratio == 0.0:
            assert torch.equal(cached, original), impl


def save_load_round_trip(make, tmp_path, ratio: float = 0.3) -> None:
    model = make()
    a3mod.apply(model, a3mod.a3_passes(ratio), calib=calib_ids(), progress=False)
    out = a3mod.save(model, tmp_path / "ckpt")
    loaded = a3mod.load(out)
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    model.set_attn_implementation("eager")
    loaded.set_attn_implementation("eager")
    ids = input_ids()
    assert torch.equal(outputs(loaded, ids), outputs(model, ids))
    assert a3mod.report(loaded).to_dict() == a3mod.report(model).to_dict()
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
