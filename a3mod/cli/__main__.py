"""`python -m a3mod.cli` (and `torchrun -m a3mod.cli` for data-parallel calibration)."""
import sys

from .commands import main

sys.exit(main())
