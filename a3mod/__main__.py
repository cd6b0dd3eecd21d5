"""`python -m a3mod ...`: the `a3mod` command (a3mod.cli)."""
import sys

from .cli.commands import main

sys.exit(main())
