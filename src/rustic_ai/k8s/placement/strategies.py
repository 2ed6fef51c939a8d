"""Placement: given the live hosts, in which order to try them for the next agent.

A strategy only orders candidates; the engine tries them in that order and moves on
when a host answers RESOURCE_EXHAUSTED (full) or UNAVAILABLE (draining, gone). Hosts
that are draining or known to be full are never candidates.
"""

from __future__ import annotations

import itertools
from typing import Protocol

from ..base.errors import ConfigError
from ..base.models import HostRecord, LaunchRequest


class PlacementStrategy(Protocol):
    def order(self, hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]: ...


def candidates(hosts: list[HostRecord]) -> list[HostRecord]:
    return [h for h in hosts if h.accepts_agents]


class RoundRobin:
    """Each placement starts one host further along the sorted list."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def order(self, hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]:
        ready = sorted(candidates(hosts), key=lambda h: h.address)
        if not ready:
            return []
        start = next(self._counter) % len(ready)
        return ready[start:] + ready[:start]


class LeastLoaded:
    """Fewest agents relative to capacity first; ties broken round-robin so that equal
    hosts share a burst instead of all of it landing on the first address."""

    def __init__(self) -> None:
        self._rr = RoundRobin()

    def order(self, hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]:
        rotated = self._rr.order(hosts, request)
        position = {h.address: i for i, h in enumerate(rotated)}

        def load(h: HostRecord) -> float:
            return h.agents / h.capacity if h.capacity > 0 else float(h.agents)

        return sorted(rotated, key=lambda h: (load(h), position[h.address]))


def strategy_named(name: str) -> PlacementStrategy:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    raise ConfigError(f"unknown placement strategy {name!r} (round_robin or least_loaded)")
