"""Compressed models in other runtimes: stock transformers checkpoints (stock.py, `a3mod.save(format="hf")`,
formats.py) and a static-KV-cache program for torch.export / ExecuTorch (executorch.py)."""
from .executorch import export_with_static_cache, static_cache_module  # noqa: F401
from .formats import FORMATS, save  # noqa: F401
from .stock import save_hf, to_stock  # noqa: F401
