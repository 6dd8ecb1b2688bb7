"""Device profiles: data files plus the typed registry that loads them."""

from edgeopt.targets.registry import (
    ArtifactFormat,
    Fact,
    IsaClass,
    OpRule,
    QuantScheme,
    Target,
    UnknownTargetError,
    UnsupportedIsaError,
    all_targets,
    get_target,
)

__all__ = [
    "ArtifactFormat",
    "Fact",
    "IsaClass",
    "OpRule",
    "QuantScheme",
    "Target",
    "UnknownTargetError",
    "UnsupportedIsaError",
    "all_targets",
    "get_target",
]
