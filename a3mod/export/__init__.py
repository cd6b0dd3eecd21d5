"""Compressed models in other runtimes: a static-KV-cache program for torch.export / ExecuTorch (executorch.py)."""
from .executorch import export_with_static_cache, static_cache_module  # noqa: F401
