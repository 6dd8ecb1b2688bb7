"""Device profiles: data files plus the typed registry that loads them."""

from edgeopt.targets.registry import (
    ArtifactFormat,
    Fact,
    OpRule,
    QuantScheme,
    Target,
    UnknownTargetError,
    all_targets,
    get_target,
)

__all__ = [
    "ArtifactFormat",
    "Fact",
    "OpRule",
    "QuantScheme",
    "Target",
    "UnknownTargetError",
    "all_targets",
    "get_target",
]
