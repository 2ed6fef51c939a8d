"""Placement: given the live hosts, in which order to try them for the next agent.

A strategy orders the hosts that fit (fit.py: serving, a free slot, the selector's labels and
room for the agent's resources by the last listing); the engine tries them in that order and
moves on when a host answers RESOURCE_EXHAUSTED (full, or the claim found the resources gone
meanwhile) or UNAVAILABLE (draining, gone). Three strategies:

* ``least_loaded``: emptiest first, by the dominant share of what the agent asks for (spreads
  load; ties go round-robin so a burst over equal hosts is shared);
* ``bin_packing``: fullest that still fits first (fills a host before the next, so the hosts
  left empty can be scaled away);
* ``round_robin``: each placement starts one host further along.

Affinity (a guild's agents packed on few hosts or spread over many) is applied by the
engine on top of any strategy's order (``with_affinity``), since it needs the guild's
current placement.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Protocol

from ..base.errors import ConfigError
from ..base.models import HostRecord, LaunchRequest
from .fit import fitting, ranked


class PlacementStrategy(Protocol):
    def order(self, hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]: ...


def candidates(hosts: list[HostRecord], request: LaunchRequest | None = None) -> list[HostRecord]:
    if request is None:
        return [h for h in hosts if h.accepts_agents]
    return fitting(hosts, request)


class RoundRobin:
    """Each placement starts one host further along the sorted list."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def order(self, hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]:
        ready = sorted((h for _, h in ranked(hosts, request)), key=lambda h: h.address)
        if not ready:
            return []
        start = next(self._counter) % len(ready)
        return ready[start:] + ready[:start]


class LeastLoaded:
    """Emptiest first (relative load of slots and of the resources asked for); ties broken
    round-robin so that equal hosts share a burst instead of all of it landing on the first."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def order(self, hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]:
        ready = sorted(ranked(hosts, request), key=lambda lh: lh[1].address)
        if not ready:
            return []
        n, start = len(ready), next(self._counter) % len(ready)
        keyed = sorted((load, (i - start) % n, i) for i, (load, _) in enumerate(ready))
        return [ready[i][1] for _, _, i in keyed]


class BinPacking:
    """Fullest host that still fits first, ties by address: hosts fill one after another."""

    def order(self, hosts: list[HostRecord], request: LaunchRequest) -> list[HostRecord]:
        ready = ranked(hosts, request)
        keyed = sorted((-load, h.address, i) for i, (load, h) in enumerate(ready))
        return [ready[i][1] for _, _, i in keyed]


def with_affinity(order: list[HostRecord], affinity: str, guild_load: Mapping[str, int]) -> list[HostRecord]:
    """Applies a guild affinity to a strategy's order; ``guild_load``: host -> the guild's agents there.

    pack: hosts already running the guild's agents first (most first); spread: fewest first;
    strict_pack: only hosts with the guild's agents, once it has any; strict_spread: only hosts
    with none. Stable: within a group the strategy's order stands.
    """
    count = lambda h: guild_load.get(h.address, 0)
    if affinity == "pack":
        return sorted(order, key=lambda h: -count(h))
    if affinity == "spread":
        return sorted(order, key=count)
    if affinity == "strict_pack":
        with_guild = [h for h in order if count(h)]
        return sorted(with_guild, key=lambda h: -count(h)) if any(guild_load.values()) else order
    if affinity == "strict_spread":
        return [h for h in order if not count(h)]
    return order


STRATEGIES = {"least_loaded": LeastLoaded, "bin_packing": BinPacking, "round_robin": RoundRobin}


def strategy_named(name: str) -> PlacementStrategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ConfigError(f"unknown placement strategy {name!r} ({', '.join(STRATEGIES)})") from None
