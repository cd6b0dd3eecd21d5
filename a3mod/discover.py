"""Moved to `a3mod.arch.discover` (this alias keeps `import a3mod.discover` working)."""
from .arch.discover import *  # noqa: F401,F403
from .arch.discover import _SPECS, Discovery, LayerDiscovery, Role, discover, discovered_spec  # noqa: F401
