"""Which host gets the next agent (strategies) and which hosts exist (discovery)."""

from .discovery import CachedHosts, Discovery, RegistryDiscovery, StaticDiscovery, merge_with_registry
from .strategies import LeastLoaded, PlacementStrategy, RoundRobin, candidates, strategy_named

__all__ = [
    "CachedHosts",
    "Discovery",
    "LeastLoaded",
    "PlacementStrategy",
    "RegistryDiscovery",
    "RoundRobin",
    "StaticDiscovery",
    "candidates",
    "merge_with_registry",
    "strategy_named",
]
