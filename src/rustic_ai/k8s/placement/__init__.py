"""Which host gets the next agent (strategies) and which hosts exist (discovery)."""

from .discovery import CachedHosts, Discovery, RegistryDiscovery, StaticDiscovery, merge_with_registry
from .fit import explain_no_fit, fitting, shortfall
from .strategies import (
    BinPacking,
    LeastLoaded,
    PlacementStrategy,
    RoundRobin,
    candidates,
    strategy_named,
    with_affinity,
)

__all__ = [
    "BinPacking",
    "CachedHosts",
    "Discovery",
    "LeastLoaded",
    "PlacementStrategy",
    "RegistryDiscovery",
    "RoundRobin",
    "StaticDiscovery",
    "candidates",
    "explain_no_fit",
    "fitting",
    "merge_with_registry",
    "shortfall",
    "strategy_named",
    "with_affinity",
]
