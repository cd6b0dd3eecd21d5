"""Evaluation with the lm-evaluation-harness (optional: `pip install a3mod[eval]`), offline, from local files.

    results = a3mod.evaluation.evaluate(model, tasks=["wikitext_local"], tokenizer=tok)
"""
from __future__ import annotations

from ..errors import A3ModError


def evaluate(model, tasks, **kwargs) -> dict:
    """See `a3mod.evaluation.harness.evaluate` (imported lazily: lm-eval is an optional dependency)."""
    try:
        from .harness import evaluate as _evaluate
    except ImportError as e:
        raise A3ModError(f"lm-eval is not installed ({e}); pip install 'a3mod[eval]'") from e
    return _evaluate(model, tasks, **kwargs)
