"""The `a3mod` command line: `a3mod compress | report | eval | export ...` (commands.py), its parser (args.py) and
the model card written beside a compressed checkpoint (card.py)."""
from .commands import main

__all__ = ["main"]
