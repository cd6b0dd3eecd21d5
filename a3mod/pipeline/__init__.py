"""The compression pipeline: `apply` (compress.py, the whole model in memory) and streaming (stream.py, layer by
layer from a folder), the per-layer steps both layer-by-layer schedules run (steps.py), the plan of per-layer dims
(plan.py), module swaps (rewrite.py), the self-check (verify.py)
and named recipes of passes (recipes.py)."""
