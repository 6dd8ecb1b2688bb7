"""Device profiles: data files plus the typed registry that loads them (its `__all__` is the public API)."""

from edgeopt.targets.registry import *  # noqa: F403
from edgeopt.targets.registry import __all__  # noqa: F401
